//! Freezing and killing a cgroup v2 (`cgroup.freeze`, `cgroup.kill`, or SIGKILL through
//! pidfds while frozen), each confirmed by the kernel through `cgroup.events`.

use std::{
    fs,
    io::{self, Read as _, Seek as _, SeekFrom},
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use nix::poll::{PollFd, PollFlags, ppoll};
use nix::sys::time::TimeSpec;

use super::cgroups::{CgroupSetupError, io_err, write};
use crate::cr::pidfd::Pidfd;

/// How long freeze and kill wait for the kernel to confirm.
pub(super) const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);
/// The first and the longest sleep of `wait_event` between two reads of
/// `cgroup.events` without a notification: the kernel rate-limits a cgroup file's
/// notifications to one per 10 ms (`CGROUP_FILE_NOTIFY_MIN_INTV`) and delays the next
/// one meanwhile, so a state reached right after another change is seen by reading,
/// not by the notification (waiting on it alone made a rollback's freeze 2-19 ms in
/// `cargo xtask bench sandbox`).
const FIRST_TICK: Duration = Duration::from_micros(50);
/// The longest: each sleep doubles the one before, up to this.
const LAST_TICK: Duration = Duration::from_millis(1);

/// Writes `cgroup.freeze` and waits for `cgroup.events` to say `frozen <want>`.
pub(crate) fn set_frozen(cg: &Path, frozen: bool) -> Result<(), CgroupSetupError> {
    let want = if frozen { "1" } else { "0" };
    write(&cg.join("cgroup.freeze"), want)?;
    wait_event(cg, "frozen", want)
}

/// `cgroup.kill` and waits until `populated 0`.
pub(crate) fn kill(cg: &Path) -> Result<(), CgroupSetupError> {
    write(&cg.join("cgroup.kill"), "1")?;
    wait_event(cg, "populated", "0")
}

/// Kills every process of `cg` without `cgroup.kill` (see `TreeRuntime::kill_work`):
/// [`kill_frozen_start`], then waits until `populated 0`.
pub(crate) fn kill_frozen(cg: &Path) -> Result<(), CgroupSetupError> {
    drop(kill_frozen_start(cg)?);
    wait_event(cg, "populated", "0")
}

/// The processes [`kill_frozen_start`] killed, held by pidfd: they may still be exiting.
pub(crate) struct Killed {
    cg: PathBuf,
    pidfds: Vec<Pidfd>,
}

impl Killed {
    /// Waits until every killed process has exited (its memory, files and pid given
    /// back; a pidfd polls readable only then). Processes born in the cgroup since, a
    /// restore's, are not waited for.
    pub(crate) fn wait(self) -> Result<(), CgroupSetupError> {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        for pidfd in &self.pidfds {
            let left = deadline.saturating_duration_since(Instant::now());
            let exited = pidfd
                .wait_exit(left)
                .map_err(|e| io_err("poll a pidfd of", &self.cg)(io::Error::other(e)))?;
            if !exited {
                return Err(CgroupSetupError::Timeout {
                    path: self.cg.clone(),
                    what: "every killed process gone",
                    timeout: SETTLE_TIMEOUT,
                });
            }
        }
        Ok(())
    }
}

/// Freezes `cg` (nothing forks any more), sends SIGKILL to each listed process through a
/// pidfd opened while it is frozen (so a pid reused since is never hit; a frozen task
/// dies of SIGKILL), and thaws: the processes exit meanwhile, and [`Killed::wait`] waits
/// for them.
pub(crate) fn kill_frozen_start(cg: &Path) -> Result<Killed, CgroupSetupError> {
    set_frozen(cg, true)?;
    let procs = cg.join("cgroup.procs");
    let listed = fs::read_to_string(&procs).map_err(io_err("read", &procs))?;
    let mut pidfds = Vec::new();
    for pid in listed.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        // Gone already (exited before the freeze completed): fine.
        let Ok(pidfd) = Pidfd::open(nix::unistd::Pid::from_raw(pid)) else {
            continue;
        };
        if pidfd.send_signal(libc::SIGKILL).is_ok() {
            pidfds.push(pidfd);
        }
    }
    set_frozen(cg, false)?;
    Ok(Killed {
        cg: cg.to_owned(),
        pidfds,
    })
}

/// Waits until `cgroup.events` says `key want`. The file is re-read when the kernel
/// signals a change (kernfs notifies changes of `cgroup.events` to `poll` as `POLLPRI`)
/// and at least every [`LAST_TICK`] (notifications are rate-limited: see
/// [`FIRST_TICK`]), so the wait ends within a tick of the state being reached.
fn wait_event(cg: &Path, key: &'static str, want: &str) -> Result<(), CgroupSetupError> {
    let events = cg.join("cgroup.events");
    let mut file = fs::File::open(&events).map_err(io_err("open", &events))?;
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    let mut text = String::new();
    let mut tick = FIRST_TICK;
    loop {
        text.clear();
        // Reading also tells kernfs which change we have seen (a later one wakes poll).
        file.seek(SeekFrom::Start(0))
            .and_then(|_| file.read_to_string(&mut text))
            .map_err(io_err("read", &events))?;
        if event_value(&text, key) == Some(want) {
            return Ok(());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(CgroupSetupError::Timeout {
                path: cg.to_owned(),
                what: if key == "frozen" {
                    "frozen"
                } else {
                    "populated 0"
                },
                timeout: SETTLE_TIMEOUT,
            });
        }
        // Woken by the notification, or after the tick (doubling up to LAST_TICK).
        let mut fds = [PollFd::new(file.as_fd(), PollFlags::POLLPRI)];
        let timeout = TimeSpec::from_duration(left.min(tick));
        tick = (tick * 2).min(LAST_TICK);
        match ppoll(&mut fds, Some(timeout), None) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(io_err("poll", &events)(e.into())),
        }
    }
}

/// The value of `key` in the text of a `cgroup.events` file.
fn event_value<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        (k == key).then(|| v.trim())
    })
}

#[cfg(test)]
mod tests {
    use super::super::cgroups::rmdir;
    use super::*;

    /// A cgroup of its own under the cgroup2 mount, removed (its process killed first)
    /// even when the test fails.
    struct Scratch {
        cg: PathBuf,
        child: std::process::Child,
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            // Our own unreaped child: its pid cannot have been reused.
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = rmdir(&self.cg);
        }
    }

    /// Needs root and cgroup2, as every machine of the project has.
    #[test]
    fn a_kill_started_is_waited_for_until_the_process_is_gone() {
        use std::os::unix::process::ExitStatusExt as _;
        let root = crate::cgroup::CgroupFs::host()
            .expect("cgroup2 mount")
            .root()
            .to_owned();
        let cg = root.join(format!("deltabox-unit-kill-{}", std::process::id()));
        fs::create_dir(&cg).expect("mkdir the test cgroup");
        let child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .expect("spawn sleep");
        let mut scratch = Scratch { cg, child };
        fs::write(
            scratch.cg.join("cgroup.procs"),
            scratch.child.id().to_string(),
        )
        .expect("move sleep into the test cgroup");

        let killed = kill_frozen_start(&scratch.cg).expect("kill");
        assert_eq!(killed.pidfds.len(), 1);
        killed.wait().expect("wait");
        // Exited (a zombie of ours until reaped) means out of the cgroup.
        let events = fs::read_to_string(scratch.cg.join("cgroup.events")).expect("events");
        assert_eq!(event_value(&events, "populated"), Some("0"), "{events}");
        assert_eq!(event_value(&events, "frozen"), Some("0"), "{events}");
        let status = scratch.child.wait().expect("reap");
        assert_eq!(status.signal(), Some(libc::SIGKILL));
    }

    #[test]
    fn event_values_are_read_by_key() {
        let text = "populated 1\nfrozen 0\n";
        assert_eq!(event_value(text, "populated"), Some("1"));
        assert_eq!(event_value(text, "frozen"), Some("0"));
        assert_eq!(event_value(text, "froze"), None);
        assert_eq!(event_value("", "frozen"), None);
    }
}
