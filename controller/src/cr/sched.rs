//! Scheduling policies (sched_setscheduler(2)): the dump thread runs at `SCHED_IDLE`,
//! which a task of its own cgroup and any other policy preempts on wake-up. Not a
//! guarantee across cgroups (see [`crate::foreground`], which the dump thread also
//! waits for).

use std::io;

/// A task's scheduling policy (only the policies without a priority: `SCHED_OTHER`,
/// `SCHED_BATCH`, `SCHED_IDLE`; or a real-time one with its priority).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    policy: i32,
    priority: i32,
}

impl Policy {
    /// `SCHED_IDLE`: runs only when nothing else wants the CPU.
    pub const IDLE: Self = Self {
        policy: libc::SCHED_IDLE,
        priority: 0,
    };

    /// `SCHED_OTHER`, the default (its nice value is the task's own, untouched).
    pub const NORMAL: Self = Self {
        policy: libc::SCHED_OTHER,
        priority: 0,
    };

    /// The policy of task `tid` (0: the calling thread).
    pub fn of(tid: i32) -> io::Result<Self> {
        // SAFETY: sched_getscheduler(2) takes a plain tid and touches no memory of ours.
        let policy = unsafe { libc::sched_getscheduler(tid) };
        if policy < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut param = libc::sched_param { sched_priority: 0 };
        // SAFETY: `param` is a valid, writable sched_param for the call to fill.
        if unsafe { libc::sched_getparam(tid, &mut param) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SCHED_RESET_ON_FORK is or-ed into the policy; kept as it was.
        Ok(Self {
            policy,
            priority: param.sched_priority,
        })
    }

    /// Gives task `tid` (0: the calling thread) this policy. The nice value of a
    /// `SCHED_OTHER` task is kept across a switch to `SCHED_IDLE` and back.
    pub fn set(self, tid: i32) -> io::Result<()> {
        let param = libc::sched_param {
            sched_priority: self.priority,
        };
        // SAFETY: `param` is a valid sched_param, read only during the call.
        if unsafe { libc::sched_setscheduler(tid, self.policy, &param) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Whether this is `SCHED_IDLE`.
    pub fn is_idle(self) -> bool {
        self.policy & !libc::SCHED_RESET_ON_FORK == libc::SCHED_IDLE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_goes_idle_and_back_with_its_nice_value() {
        std::thread::spawn(|| {
            // SAFETY: setpriority(2)/getpriority(2) on the calling thread (0) take
            // plain integers.
            unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 5) };
            let before = Policy::of(0).unwrap();
            assert_eq!(before, Policy::NORMAL);
            Policy::IDLE.set(0).unwrap();
            assert!(Policy::of(0).unwrap().is_idle());
            before.set(0).unwrap();
            assert_eq!(Policy::of(0).unwrap(), Policy::NORMAL);
            // SAFETY: as above.
            let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
            assert_eq!(nice, 5);
        })
        .join()
        .unwrap();
    }
}
