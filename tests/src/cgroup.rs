//! A cgroup v2 created for one test and removed when dropped.

use std::{
    ffi::CString,
    fs,
    os::unix::{ffi::OsStrExt as _, fs::MetadataExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Output},
    thread,
    time::Duration,
};

/// The cgroup2 mount point, from `/proc/self/mountinfo`.
pub fn cgroup2_root() -> PathBuf {
    let info = fs::read_to_string("/proc/self/mountinfo").expect("read /proc/self/mountinfo");
    info.lines()
        .find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let dir = left.split_whitespace().nth(4)?;
            (right.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(dir))
        })
        .expect("cgroup v2 is not mounted (the tests need it; `cargo xtask setup` checks it)")
}

/// A child cgroup of the cgroup2 root. Dropping it kills what is left in it (by pid,
/// through `cgroup.kill`) and removes the directory.
pub struct TestCgroup {
    path: PathBuf,
}

impl TestCgroup {
    /// Creates `<cgroup2 root>/<name>`.
    pub fn new(name: &str) -> Self {
        let path = cgroup2_root().join(name);
        if path.exists() {
            // Left by a crashed earlier run of this same test process id: reuse is wrong.
            remove_cgroup(&path);
        }
        fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Self { path }
    }

    /// Its directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its cgroup v2 id (the directory's inode number).
    pub fn id(&self) -> u64 {
        fs::metadata(&self.path).expect("stat cgroup").ino()
    }

    /// Runs `cmd` to completion inside this cgroup: the child moves itself in before
    /// exec, so every write of the command is the cgroup's.
    pub fn run(&self, cmd: &mut Command) -> Output {
        self.enter_before_exec(cmd);
        let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
        assert!(
            out.status.success(),
            "{cmd:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Starts `cmd` inside this cgroup; dropping the cgroup kills it.
    pub fn spawn(&self, cmd: &mut Command) -> Child {
        self.enter_before_exec(cmd);
        cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"))
    }

    fn enter_before_exec(&self, cmd: &mut Command) {
        let procs = CString::new(self.path.join("cgroup.procs").as_os_str().as_bytes())
            .expect("cgroup path without NUL");
        // SAFETY: the closure runs between fork and exec and only makes
        // async-signal-safe syscalls (open, write, close) on memory prepared before fork.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // "0" moves the writing process.
                let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                let err = std::io::Error::last_os_error();
                libc::close(fd);
                if n != 1 {
                    return Err(err);
                }
                Ok(())
            });
        }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        remove_cgroup(&self.path);
    }
}

fn remove_cgroup(path: &Path) {
    let _ = fs::write(path.join("cgroup.kill"), "1");
    // rmdir fails with EBUSY until the killed tasks are reaped.
    for _ in 0..200 {
        match fs::remove_dir(path) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(_) => thread::sleep(Duration::from_millis(10)),
        }
    }
    eprintln!("warning: could not remove cgroup {}", path.display());
}
