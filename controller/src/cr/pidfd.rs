//! pidfds (`pidfd_open`, `pidfd_send_signal`, `pidfd_getfd`, `waitid(P_PIDFD)`): a
//! handle on one process that a recycled pid can never redirect.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Duration;

use nix::unistd::Pid;

/// Errors of pidfd operations.
#[derive(Debug, thiserror::Error)]
pub enum PidfdError {
    /// A pidfd syscall failed.
    #[error("{op} on pid {pid}")]
    Syscall {
        /// The syscall.
        op: &'static str,
        /// The process.
        pid: i32,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// The process did not exit in time after SIGKILL.
    #[error("pid {pid} still runs {waited:?} after SIGKILL")]
    NotDead {
        /// The process.
        pid: i32,
        /// How long DeltaCR waited.
        waited: Duration,
    },
}

/// An open pidfd and the pid it was opened for.
#[derive(Debug)]
pub struct Pidfd {
    pid: Pid,
    fd: OwnedFd,
}

fn check(ret: libc::c_long, op: &'static str, pid: Pid) -> Result<libc::c_long, PidfdError> {
    if ret < 0 {
        return Err(PidfdError::Syscall {
            op,
            pid: pid.as_raw(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(ret)
}

impl Pidfd {
    /// `pidfd_open(pid)`.
    pub fn open(pid: Pid) -> Result<Self, PidfdError> {
        // SAFETY: pidfd_open takes two integers and returns a new fd or -1.
        let ret = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
        let fd = check(ret, "pidfd_open", pid)?;
        let fd = i32::try_from(fd).map_err(|_| PidfdError::Syscall {
            op: "pidfd_open",
            pid: pid.as_raw(),
            source: io::ErrorKind::InvalidData.into(),
        })?;
        // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { pid, fd })
    }

    /// A pidfd the caller already has for `pid` (from `clone3(CLONE_PIDFD)`, say).
    pub fn from_fd(pid: Pid, fd: OwnedFd) -> Self {
        Self { pid, fd }
    }

    /// The pid.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// `pidfd_send_signal`. A process that has exited but is not reaped yet accepts
    /// (and ignores) signals; one that is reaped gives `ESRCH`.
    pub fn send_signal(&self, signal: i32) -> Result<(), PidfdError> {
        self.send(signal, 0, "pidfd_send_signal")
    }

    /// `pidfd_send_signal(PIDFD_SIGNAL_PROCESS_GROUP)` (Linux 6.9): `signal` to every
    /// process whose process group is this process's pid — the group it leads. Unlike
    /// `killpg(pid)`, a group whose leader is gone and whose pid was reused can never
    /// be confused with another: the pidfd names the group's own `struct pid`. `ESRCH`
    /// once no process is left in the group.
    pub fn signal_process_group(&self, signal: i32) -> Result<(), PidfdError> {
        self.send(
            signal,
            libc::PIDFD_SIGNAL_PROCESS_GROUP,
            "pidfd_send_signal(PIDFD_SIGNAL_PROCESS_GROUP)",
        )
    }

    /// `pidfd_send_signal` with `flags` and no siginfo; `op` names it in an error.
    fn send(&self, signal: i32, flags: libc::c_uint, op: &'static str) -> Result<(), PidfdError> {
        // SAFETY: pidfd_send_signal with a null siginfo reads no memory of ours.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                flags,
            )
        };
        check(ret, op, self.pid).map(drop)
    }

    /// `pidfd_getfd`: a duplicate, in this process, of the target's fd `target_fd`
    /// (the same open file description). Needs ptrace rights over the target.
    pub fn get_fd(&self, target_fd: i32) -> Result<File, PidfdError> {
        // SAFETY: pidfd_getfd takes three integers and returns a new fd or -1.
        let ret =
            unsafe { libc::syscall(libc::SYS_pidfd_getfd, self.fd.as_raw_fd(), target_fd, 0) };
        let fd = check(ret, "pidfd_getfd", self.pid)?;
        let fd = i32::try_from(fd).map_err(|_| PidfdError::Syscall {
            op: "pidfd_getfd",
            pid: self.pid.as_raw(),
            source: io::ErrorKind::InvalidData.into(),
        })?;
        // SAFETY: `fd` was just returned by the kernel (close-on-exec) and is owned by
        // nobody else.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    /// Waits up to `timeout` for the process to exit (the pidfd becomes readable).
    pub fn wait_exit(&self, timeout: Duration) -> Result<bool, PidfdError> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        loop {
            // SAFETY: `pfd` is one valid pollfd that lives for the call.
            let ret = unsafe { libc::poll(&mut pfd, 1, ms) };
            if ret >= 0 {
                return Ok(ret == 1);
            }
            let source = io::Error::last_os_error();
            if source.kind() != io::ErrorKind::Interrupted {
                return Err(PidfdError::Syscall {
                    op: "poll",
                    pid: self.pid.as_raw(),
                    source,
                });
            }
        }
    }

    /// Reaps the process if it is a dead child of this process; `false` if it is not
    /// ours to reap (its parent will) or not dead yet.
    pub fn try_reap(&self) -> bool {
        // SAFETY: siginfo_t is plain data; all-zero is a valid value.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is a valid, writable siginfo_t for the call.
        let ret = unsafe {
            libc::waitid(
                libc::P_PIDFD,
                self.fd.as_raw_fd() as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG,
            )
        };
        // SAFETY: si_pid is valid to read after a successful waitid (0 if nothing reaped).
        ret == 0 && unsafe { info.si_pid() } != 0
    }

    /// SIGKILLs the process, waits up to `timeout` for it to die, and reaps it if it
    /// is a child of this process. A process already gone is not an error.
    pub fn kill_and_wait(&self, timeout: Duration) -> Result<(), PidfdError> {
        match self.send_signal(libc::SIGKILL) {
            Ok(()) => {}
            Err(PidfdError::Syscall { source, .. })
                if source.raw_os_error() == Some(libc::ESRCH) => {}
            Err(e) => return Err(e),
        }
        if !self.wait_exit(timeout)? {
            return Err(PidfdError::NotDead {
                pid: self.pid.as_raw(),
                waited: timeout,
            });
        }
        self.try_reap();
        Ok(())
    }
}

impl AsFd for Pidfd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::CommandExt as _;
    use std::process::Command;

    use super::*;

    #[test]
    fn a_process_group_is_signalled_through_its_leaders_pidfd() {
        let mut leader = Command::new("sleep")
            .arg("100")
            .process_group(0)
            .spawn()
            .expect("spawn the leader");
        let leader_pid = i32::try_from(leader.id()).expect("pid");
        let mut member = Command::new("sleep")
            .arg("100")
            .process_group(leader_pid)
            .spawn()
            .expect("spawn a member of its group");
        let pidfd = Pidfd::open(Pid::from_raw(leader_pid)).expect("pidfd_open");
        pidfd
            .signal_process_group(libc::SIGKILL)
            .expect("signal the group");
        for child in [&mut leader, &mut member] {
            let status = child.wait().expect("wait");
            assert_eq!(
                std::os::unix::process::ExitStatusExt::signal(&status),
                Some(libc::SIGKILL)
            );
        }
        let gone = pidfd.signal_process_group(libc::SIGKILL);
        assert!(
            matches!(&gone, Err(PidfdError::Syscall { source, .. }) if source.raw_os_error() == Some(libc::ESRCH)),
            "an empty group: {gone:?}"
        );
    }
}
