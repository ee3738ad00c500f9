//! Running the tracer on its tracee's CPU while it drives it.
//!
//! Every ptrace round trip wakes the other side twice (the resume wakes the tracee,
//! its next stop wakes the tracer). When the two run on different CPUs each wake-up
//! is an inter-processor interrupt, which on this project's VMs costs tens of
//! microseconds: one injected syscall took ~55 µs with the tracer and the tracee on
//! different CPUs and ~13 µs on the same one
//! (`cargo test --release -p deltabox-tests --test cr_inject -- --ignored --nocapture`,
//! under `taskset -c 1` for the second figure). [`PinnedToTracee`] moves the calling
//! thread to the CPU the tracee last ran on for the length of an operation; the
//! tracee, woken from there, stays there. Only the tracer's own affinity changes: the
//! tracee's (which its forks would inherit) is never touched.
//!
//! Best effort: where the thread may not run on that CPU (a cpuset that excludes it)
//! nothing changes.

use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
use nix::unistd::Pid;

use super::procfs;

/// The calling thread pinned to one CPU until dropped, when its previous affinity
/// comes back. Not `Send`: it concerns the thread that made it.
#[derive(Debug)]
pub struct PinnedToTracee {
    saved: Option<CpuSet>,
    _same_thread: std::marker::PhantomData<*const ()>,
}

impl PinnedToTracee {
    /// Pins the calling thread to the CPU that `pid` last ran on, unless it is pinned
    /// to exactly that CPU already.
    pub fn pin(pid: Pid) -> Self {
        let saved = (|| {
            let cpu = procfs::stat(pid.as_raw()).ok()?.processor;
            // Pid 0: the calling thread.
            let saved = sched_getaffinity(Pid::from_raw(0)).ok()?;
            let mut one = CpuSet::new();
            one.set(cpu).ok()?;
            if saved == one || !saved.is_set(cpu).unwrap_or(false) {
                return None;
            }
            sched_setaffinity(Pid::from_raw(0), &one).ok()?;
            Some(saved)
        })();
        Self {
            saved,
            _same_thread: std::marker::PhantomData,
        }
    }

    /// Whether the thread was moved (false: it stays where it was allowed to run).
    pub fn is_pinned(&self) -> bool {
        self.saved.is_some()
    }
}

impl Drop for PinnedToTracee {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            let _ = sched_setaffinity(Pid::from_raw(0), saved);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_thread_runs_on_the_tracees_cpu_and_gets_its_affinity_back() {
        let before = sched_getaffinity(Pid::from_raw(0)).unwrap();
        let me = nix::unistd::gettid();
        {
            let pinned = PinnedToTracee::pin(me);
            let now = sched_getaffinity(Pid::from_raw(0)).unwrap();
            let cpu = procfs::stat(me.as_raw()).unwrap().processor;
            if pinned.is_pinned() {
                assert!(now.is_set(cpu).unwrap());
                let allowed = (0..CpuSet::count()).filter(|&c| now.is_set(c).unwrap());
                assert_eq!(allowed.count(), 1);
            } else {
                assert_eq!(now, before, "not pinned, yet moved");
            }
        }
        assert_eq!(sched_getaffinity(Pid::from_raw(0)).unwrap(), before);
    }
}
