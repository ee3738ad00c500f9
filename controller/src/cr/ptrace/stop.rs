//! Decoding `waitpid` statuses of a tracee into [`Stop`]s: pure functions, tested
//! without a process.

use nix::unistd::Pid;

/// Why a tracee is in a ptrace-stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// A syscall-enter or syscall-exit stop (`SIGTRAP | 0x80`, `PTRACE_O_TRACESYSGOOD`);
    /// which of the two is known from the sequence of resumes.
    Syscall,
    /// `PTRACE_EVENT_STOP` with a stop signal: the tracee is in group-stop.
    Group(i32),
    /// `PTRACE_EVENT_STOP` with `SIGTRAP`: after `PTRACE_INTERRUPT`, or the first stop of
    /// an auto-attached child.
    Interrupt,
    /// `PTRACE_EVENT_FORK`, `_VFORK` or `_CLONE`: the tracee created `child`, which is
    /// auto-attached and will report its own [`Stop::Interrupt`].
    NewChild {
        /// The `PTRACE_EVENT_*` number.
        event: i32,
        /// The new task.
        child: Pid,
    },
    /// Another `PTRACE_EVENT_*` stop (exec, exit, vfork-done, seccomp).
    Event(i32),
    /// A signal-delivery-stop: the signal is delivered only if the next resume passes it.
    Signal(i32),
}

/// A `waitpid` status, decoded without side effects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitReport {
    /// In a ptrace-stop: `WSTOPSIG` and the `PTRACE_EVENT_*` number (0 for none).
    Stopped {
        /// `WSTOPSIG(status)`.
        signal: i32,
        /// `status >> 16`.
        event: i32,
    },
    /// Exited with this status.
    Exited(i32),
    /// Killed by this signal.
    Killed(i32),
    /// Resumed by `SIGCONT` (only reported with `WCONTINUED`, which DeltaCR never asks).
    Continued,
}

/// Decodes a raw `waitpid` status.
pub fn decode_status(status: libc::c_int) -> WaitReport {
    if libc::WIFEXITED(status) {
        WaitReport::Exited(libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        WaitReport::Killed(libc::WTERMSIG(status))
    } else if libc::WIFSTOPPED(status) {
        WaitReport::Stopped {
            signal: libc::WSTOPSIG(status),
            event: (status >> 16) & 0xff,
        }
    } else {
        WaitReport::Continued
    }
}

/// Classifies a stop, except the child pid of fork events (which needs a request).
pub(super) fn classify(signal: i32, event: i32) -> Stop {
    match event {
        0 if signal == libc::SIGTRAP | 0x80 => Stop::Syscall,
        0 => Stop::Signal(signal),
        libc::PTRACE_EVENT_STOP => match signal {
            libc::SIGSTOP | libc::SIGTSTP | libc::SIGTTIN | libc::SIGTTOU => Stop::Group(signal),
            _ => Stop::Interrupt,
        },
        libc::PTRACE_EVENT_FORK | libc::PTRACE_EVENT_VFORK | libc::PTRACE_EVENT_CLONE => {
            Stop::NewChild {
                event,
                child: Pid::from_raw(0),
            }
        }
        other => Stop::Event(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a stopped status as the kernel encodes it: `0x7f | sig << 8 | event << 16`.
    fn stopped(signal: i32, event: i32) -> libc::c_int {
        0x7f | (signal << 8) | (event << 16)
    }

    #[test]
    fn decodes_wait_statuses() {
        assert_eq!(decode_status(3 << 8), WaitReport::Exited(3));
        assert_eq!(
            decode_status(libc::SIGKILL),
            WaitReport::Killed(libc::SIGKILL)
        );
        assert_eq!(
            decode_status(stopped(libc::SIGTRAP, libc::PTRACE_EVENT_FORK)),
            WaitReport::Stopped {
                signal: libc::SIGTRAP,
                event: libc::PTRACE_EVENT_FORK
            }
        );
        assert_eq!(decode_status(0xffff), WaitReport::Continued);
    }

    #[test]
    fn classifies_stops() {
        assert_eq!(classify(libc::SIGTRAP | 0x80, 0), Stop::Syscall);
        assert_eq!(classify(libc::SIGCHLD, 0), Stop::Signal(libc::SIGCHLD));
        assert_eq!(classify(libc::SIGTRAP, 0), Stop::Signal(libc::SIGTRAP));
        assert_eq!(
            classify(libc::SIGSTOP, libc::PTRACE_EVENT_STOP),
            Stop::Group(libc::SIGSTOP)
        );
        assert_eq!(
            classify(libc::SIGTTOU, libc::PTRACE_EVENT_STOP),
            Stop::Group(libc::SIGTTOU)
        );
        assert_eq!(
            classify(libc::SIGTRAP, libc::PTRACE_EVENT_STOP),
            Stop::Interrupt
        );
        assert!(matches!(
            classify(libc::SIGTRAP, libc::PTRACE_EVENT_CLONE),
            Stop::NewChild { event, .. } if event == libc::PTRACE_EVENT_CLONE
        ));
        assert_eq!(
            classify(libc::SIGTRAP, libc::PTRACE_EVENT_EXEC),
            Stop::Event(libc::PTRACE_EVENT_EXEC)
        );
    }
}
