//! What is left when a daemon could not clean up after itself (it hung and was killed):
//! processes in its sandbox cgroup, the mounts under its run directory (bind mounts of the
//! host's `/usr` and `/etc` among them: its run directory must never be removed
//! recursively while they are there: `util::unmount_under`), the cgroup tree and its v1
//! limit mirrors.

use std::fs;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

/// The v1 controllers the daemon mirrors its sandbox cgroup into for limits.
const V1_CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];

/// SIGKILLs every process left in the cgroup2 subtree `cgroup` (`cgroup.kill`) and waits
/// until it is empty. Nothing to do if it does not exist.
pub fn kill_cgroup_tree(cgroup: &Path) -> Result<()> {
    if !cgroup.exists() {
        return Ok(());
    }
    let events = cgroup.join("cgroup.events");
    let populated = || -> Result<bool> {
        let text = fs::read_to_string(&events)
            .with_context(|| format!("cannot read {}", events.display()))?;
        Ok(text.lines().any(|l| l == "populated 1"))
    };
    if !populated()? {
        return Ok(());
    }
    let kill = cgroup.join("cgroup.kill");
    fs::write(&kill, "1").with_context(|| format!("cannot write 1 to {}", kill.display()))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while populated()? {
        if Instant::now() >= deadline {
            bail!(
                "cgroup {} still has processes 5 s after cgroup.kill",
                cgroup.display()
            );
        }
        thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Removes the cgroup directory `dir` and every cgroup below it, deepest first.
pub fn remove_cgroup_tree(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let entries =
        fs::read_dir(dir).with_context(|| format!("cannot list cgroup {}", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list cgroup {}", dir.display()))?;
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup_tree(&entry.path())?;
        }
    }
    // rmdir can race the release of the last task that left: retry briefly on EBUSY.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(10));
            }
            Err(e) => {
                return Err(e).with_context(|| format!("cannot remove cgroup {}", dir.display()));
            }
        }
    }
}

/// Where the daemon mirrors the cgroup2 directory `name` (a child of the cgroup2 root) in
/// the v1 hierarchies: `<v1 mount>/<this process's v1 cgroup>/<name>` (the daemon, our
/// child, starts in our v1 cgroups). Only those that exist.
pub fn v1_mirrors(cgroup2_mount: &Path, name: &str) -> Vec<PathBuf> {
    let Some(v1_root) = cgroup2_mount.parent() else {
        return Vec::new();
    };
    let own = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mut dirs = Vec::new();
    for line in own.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        for controller in controllers.split(',') {
            if V1_CONTROLLERS.contains(&controller) {
                let dir = v1_root
                    .join(controller)
                    .join(path.trim_start_matches('/'))
                    .join(name);
                if dir.is_dir() && !dirs.contains(&dir) {
                    dirs.push(dir);
                }
            }
        }
    }
    dirs
}
