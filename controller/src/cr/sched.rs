//! The calling thread's scheduling policy (sched_setscheduler(2)): the dump thread runs
//! at `SCHED_IDLE`, which a task of its own cgroup and any other policy preempts on
//! wake-up. Not a guarantee across cgroups (see [`crate::foreground`], which the dump
//! thread also waits for).

use std::io;

/// Whether the calling thread is at `SCHED_IDLE`.
pub fn is_idle() -> bool {
    // SAFETY: sched_getscheduler(2) takes the calling thread (0) and touches no memory.
    let policy = unsafe { libc::sched_getscheduler(0) };
    policy >= 0 && policy & !libc::SCHED_RESET_ON_FORK == libc::SCHED_IDLE
}

/// Puts the calling thread at `SCHED_IDLE` (`idle`) or `SCHED_OTHER`. Its nice value,
/// which `SCHED_IDLE` ignores, is kept for its return to `SCHED_OTHER`.
pub fn set_idle(idle: bool) -> io::Result<()> {
    let policy = if idle {
        libc::SCHED_IDLE
    } else {
        libc::SCHED_OTHER
    };
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param, read only during the call; pid 0 is the
    // calling thread.
    if unsafe { libc::sched_setscheduler(0, policy, &param) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
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
            // SAFETY: sched_getscheduler(2) on the calling thread touches no memory.
            let normal = || unsafe { libc::sched_getscheduler(0) } == libc::SCHED_OTHER;
            assert!(normal() && !is_idle());
            set_idle(true).unwrap();
            assert!(is_idle());
            set_idle(false).unwrap();
            assert!(normal() && !is_idle());
            // SAFETY: as above.
            let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
            assert_eq!(nice, 5);
        })
        .join()
        .unwrap();
    }
}
