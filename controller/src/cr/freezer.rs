//! The frozen cgroup v2 that holds one template: `cgroup.freeze`, `cgroup.kill`.
//!
//! Templates (and restored processes) are born in their cgroups by
//! `clone3(CLONE_INTO_CGROUP)`, never moved through `cgroup.procs`: a migration waits
//! for an RCU grace period on this kernel (see `super::inject::CLONE_FLAGS`).
//!
//! A task in a cgroup whose `cgroup.freeze` is 1 carries `JOBCTL_TRAP_FREEZE` from the
//! moment the write returns: whatever resumes it (a `SIGCONT`, a tracer that detaches
//! or dies), it traps again before it reaches user mode. A thaw does not wake a task
//! that is in a ptrace-stop, which is how DeltaCR thaws a template only while it holds
//! it stopped.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use crate::cgroup::{CgroupError, CgroupFs};

/// How long [`TemplateCgroup::remove`] waits for killed tasks to leave.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors of template cgroups.
#[derive(Debug, thiserror::Error)]
pub enum FreezerError {
    /// The cgroup2 mount or the parent cgroup could not be resolved.
    #[error("cannot resolve the parent cgroup of templates")]
    Resolve(#[from] CgroupError),
    /// A cgroup file could not be written or the directory created or removed.
    #[error("cannot {op} {}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// A cgroup v2 directory created for one template, removed by [`TemplateCgroup::remove`]
/// (or on drop, after killing what is left in it).
#[derive(Debug)]
pub struct TemplateCgroup {
    path: PathBuf,
    removed: bool,
}

fn write(path: &Path, op: &'static str, value: &str) -> Result<(), FreezerError> {
    fs::write(path, value).map_err(|source| FreezerError::Io {
        op,
        path: path.to_path_buf(),
        source,
    })
}

impl TemplateCgroup {
    /// Creates `<parent>/<name>`, `parent` absolute or relative to the cgroup2 mount.
    pub fn create(parent: &Path, name: &str) -> Result<Self, FreezerError> {
        let parent = CgroupFs::host()?.resolve(parent)?;
        let path = parent.path.join(name);
        fs::create_dir(&path).map_err(|source| FreezerError::Io {
            op: "create cgroup",
            path: path.clone(),
            source,
        })?;
        Ok(Self {
            path,
            removed: false,
        })
    }

    /// Takes over an existing template cgroup (a restarted controller adopting it).
    pub fn adopt(path: PathBuf) -> Self {
        Self {
            path,
            removed: false,
        }
    }

    /// Its directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `cgroup.freeze` = 1.
    pub fn freeze(&self) -> Result<(), FreezerError> {
        write(&self.path.join("cgroup.freeze"), "freeze", "1")
    }

    /// `cgroup.freeze` = 0. Call only while every task in it is held in a ptrace-stop.
    pub fn thaw(&self) -> Result<(), FreezerError> {
        write(&self.path.join("cgroup.freeze"), "thaw", "0")
    }

    /// Whether `cgroup.freeze` reads 1.
    pub fn is_frozen(&self) -> bool {
        fs::read_to_string(self.path.join("cgroup.freeze")).is_ok_and(|s| s.trim() == "1")
    }

    /// `cgroup.kill`, then removes the directory once the tasks have left it.
    pub fn remove(&mut self) -> Result<(), FreezerError> {
        remove(&self.path)?;
        self.removed = true;
        Ok(())
    }
}

fn remove(path: &Path) -> Result<(), FreezerError> {
    if !path.exists() {
        return Ok(());
    }
    let _ = fs::write(path.join("cgroup.kill"), "1");
    let start = Instant::now();
    loop {
        match fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            // EBUSY until the killed tasks have exited.
            Err(_) if start.elapsed() < REMOVE_TIMEOUT => thread::sleep(Duration::from_millis(1)),
            Err(source) => {
                return Err(FreezerError::Io {
                    op: "remove cgroup",
                    path: path.to_path_buf(),
                    source,
                });
            }
        }
    }
}

impl Drop for TemplateCgroup {
    fn drop(&mut self) {
        if !self.removed {
            let _ = remove(&self.path);
        }
    }
}
