//! A cgroup v2 created for one test and removed when dropped, and the robust removal
//! of a test's cgroup tree that every test guard shares ([`remove_tree`]).

use std::{
    ffi::CString,
    fs, io,
    os::unix::{ffi::OsStrExt as _, fs::MetadataExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Output},
    thread,
    time::{Duration, Instant},
};

use deltabox_controller::cr::pidfd::Pidfd;
use nix::unistd::Pid;

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

/// A child cgroup of the cgroup2 root. Dropping it kills what is left in it and
/// removes the directory ([`remove_tree`]).
pub struct TestCgroup {
    path: PathBuf,
}

impl TestCgroup {
    /// Creates `<cgroup2 root>/<name>`.
    pub fn new(name: &str) -> Self {
        let path = cgroup2_root().join(name);
        // Left by a crashed earlier run of this same test process id: reuse is wrong.
        remove_tree(&path);
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
        remove_tree(&self.path);
    }
}

/// How long [`remove_tree`] waits for a tree to empty, and then again for its
/// directories to go: a killed task leaves its cgroup only once the kernel has
/// finished its exit, which on 2 loaded CPUs once took longer than 2 s (an empty
/// `deltabox-test-prom-<pid>` was left after a CI run).
pub const REMOVE_TIMEOUT: Duration = Duration::from_secs(15);

/// Removes the cgroup tree at `dir`, even if processes are still in it: kills them
/// (`cgroup.kill`, and by pid from every `cgroup.procs`, each checked still to be in
/// the tree through a pidfd, so a reused pid is never hit), waits until the tree is
/// empty (`populated 0` in `cgroup.events`), then removes its cgroups depth first,
/// retrying `rmdir` while the kernel lets go of exited tasks, each wait bounded by
/// [`REMOVE_TIMEOUT`]. Returns whether `dir` is gone; if not, says on stderr what is
/// left (a failing clean-up must not pass silently).
pub fn remove_tree(dir: &Path) -> bool {
    if !dir.exists() {
        return true;
    }
    let deadline = Instant::now() + REMOVE_TIMEOUT;
    loop {
        kill_all(dir);
        if !populated(dir) {
            break;
        }
        if Instant::now() >= deadline {
            eprintln!(
                "warning: cgroup {} still holds pids {:?} {REMOVE_TIMEOUT:?} after SIGKILL",
                dir.display(),
                pids_in_tree(dir)
            );
            break;
        }
        thread::sleep(Duration::from_millis(10));
    }
    let deadline = Instant::now() + REMOVE_TIMEOUT;
    match remove_dirs(dir, deadline) {
        Ok(()) => true,
        Err(e) => {
            eprintln!(
                "warning: could not remove cgroup {} within {REMOVE_TIMEOUT:?}: {e} \
                 (pids left: {:?})",
                dir.display(),
                pids_in_tree(dir)
            );
            false
        }
    }
}

/// Every pid in the cgroup tree at `dir` (none if it is missing).
pub fn pids_under(dir: &Path) -> Vec<i32> {
    pids_in_tree(dir).into_iter().map(|(_, pid)| pid).collect()
}

/// SIGKILL to everything in the tree: `cgroup.kill` where the kernel has it, and by
/// pid, which also reaches a task that forked just as the tree was killed.
fn kill_all(dir: &Path) {
    let _ = fs::write(dir.join("cgroup.kill"), "1");
    let me = std::process::id() as i32;
    for (cgroup, pid) in pids_in_tree(dir) {
        if pid == me {
            continue;
        }
        // Open first, then check membership: the pidfd pins the process, so the check
        // is about the process the signal goes to, not a later holder of the pid.
        let Ok(pidfd) = Pidfd::open(Pid::from_raw(pid)) else {
            continue; // exited already
        };
        if in_cgroup(pid, &cgroup) {
            let _ = pidfd.send_signal(libc::SIGKILL);
        }
    }
}

/// Every (cgroup, pid) in the tree at `dir`.
fn pids_in_tree(dir: &Path) -> Vec<(PathBuf, i32)> {
    let mut out = Vec::new();
    if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
        out.extend(
            procs
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .map(|pid| (dir.to_path_buf(), pid)),
        );
    }
    for child in child_cgroups(dir) {
        out.extend(pids_in_tree(&child));
    }
    out
}

fn child_cgroups(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// Whether `pid` is in cgroup `dir` now (its v2 line in `/proc/<pid>/cgroup`).
fn in_cgroup(pid: i32, dir: &Path) -> bool {
    let Ok(rel) = dir.strip_prefix(cgroup2_root()) else {
        return false;
    };
    let want = format!("0::/{}", rel.display());
    fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .is_ok_and(|text| text.lines().any(|l| l == want))
}

/// Whether a task is still anywhere in the tree: `populated` of `cgroup.events`
/// (recursive, and only 0 once the kernel has let go of every exited task), or the
/// tree's `cgroup.procs` where there is no such file.
fn populated(dir: &Path) -> bool {
    match fs::read_to_string(dir.join("cgroup.events")) {
        Ok(events) => events.lines().any(|l| l.trim() == "populated 1"),
        Err(e) if e.kind() == io::ErrorKind::NotFound && !dir.exists() => false,
        Err(_) => !pids_in_tree(dir).is_empty(),
    }
}

/// `rmdir` of the tree, children first, each retried until `deadline` (EBUSY while
/// the kernel still holds an exited task).
fn remove_dirs(dir: &Path, deadline: Instant) -> io::Result<()> {
    for child in child_cgroups(dir) {
        remove_dirs(&child, deadline)?;
    }
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => thread::sleep(Duration::from_millis(10)),
        }
    }
}
