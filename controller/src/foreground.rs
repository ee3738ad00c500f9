//! State operations first: while a checkpoint, rollback or branch runs (and for
//! [`GRACE`] after, while its answer goes out and the client's next request comes in),
//! the daemon's background threads — dump writing, the template pool's measures, the
//! copy-on-write harvest, standby forks, re-roots, the write tracker's clean-up of old
//! epochs — wait at their next step.
//!
//! A lower CPU priority is not enough on this kernel: with `SCHED_IDLE` threads the SWE
//! bench's rollbacks still waited 3–9 ms for a CPU (sched_switch traces: the restored
//! process, woken on the CPU a background thread held, ran only at the next 4 ms tick
//! while the other CPU idled). The scheduler picks among the cgroups' entities by
//! eligibility first, and the sandbox's cgroup, busy a moment before, was not eligible;
//! with `preempt=none` nothing cut the background thread's kernel work short.
//!
//! Each background step is short (a read of 256 pages, a template's measure), so an
//! operation that starts in the middle of one waits for at most that step. A background
//! thread never waits more than its `max` at a time: under a stream of operations with
//! no gap it still makes progress.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long after a state operation ends background work still waits: the operation's
/// answer is written after it ends, and a client often sends its next operation at once
/// (a checkpoint then a rollback). Starting the dump right after its checkpoint delayed
/// the checkpoint's answer on this 2-vCPU machine: client time minus the daemon's
/// `total_ms`, median of 30 checkpoints of a small python session, 1.51 / 1.71 ms
/// starting at once, 1.13 / 0.96 ms after 5 ms (two interleaved runs, a probe over the
/// API).
pub const GRACE: Duration = Duration::from_millis(5);

/// How long a background step waits for the operations at most.
pub const BACKGROUND_WAIT: Duration = Duration::from_millis(50);

/// How often a waiting background thread looks again.
const POLL: Duration = Duration::from_millis(1);

static ACTIVE: AtomicUsize = AtomicUsize::new(0);
/// When the last operation ended, in nanoseconds since [`epoch`] (0: none yet).
static LAST_END: AtomicU64 = AtomicU64::new(0);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ns() -> u64 {
    // Never 0 for an end: 0 means none.
    (epoch().elapsed().as_nanos() as u64).max(1)
}

/// A state operation in progress; background work waits until it is dropped (and
/// [`GRACE`] more).
#[must_use = "the operation counts as running until this is dropped"]
pub struct Operation(());

/// Marks a state operation as running until the returned guard is dropped.
pub fn begin() -> Operation {
    epoch();
    ACTIVE.fetch_add(1, Ordering::SeqCst);
    Operation(())
}

impl Drop for Operation {
    fn drop(&mut self) {
        LAST_END.store(now_ns(), Ordering::SeqCst);
        ACTIVE.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Waits until no state operation runs (ended ones are not waited for), or `max` at
/// most. How long it waited.
pub fn yield_to_running(max: Duration) -> Duration {
    wait_while(|| ACTIVE.load(Ordering::SeqCst) > 0, max)
}

/// Whether no state operation runs and none ended within [`GRACE`].
fn quiet() -> bool {
    if ACTIVE.load(Ordering::SeqCst) > 0 {
        return false;
    }
    let last = LAST_END.load(Ordering::SeqCst);
    last == 0 || now_ns().saturating_sub(last) >= GRACE.as_nanos() as u64
}

/// For background work, before its next step: waits until [`quiet`], or `max` at
/// most. How long it waited.
pub fn yield_to_operations(max: Duration) -> Duration {
    wait_while(|| !quiet(), max)
}

/// Polls `busy` every [`POLL`] while it holds, `max` at most. How long it waited.
fn wait_while(busy: impl Fn() -> bool, max: Duration) -> Duration {
    let start = Instant::now();
    while busy() && start.elapsed() < max {
        std::thread::sleep(POLL);
    }
    start.elapsed()
}

#[cfg(test)]
mod tests {
    use super::*;

    // One test, asserting nothing another test's operation could break: the state is
    // process-wide, and the tests of one binary run in parallel.
    #[test]
    fn background_waits_for_operations_and_their_grace() {
        let op = begin();
        assert!(!quiet());
        let waited = yield_to_operations(Duration::from_millis(20));
        assert!(waited >= Duration::from_millis(20), "{waited:?}");
        let other = std::thread::spawn(|| {
            let waited = yield_to_operations(Duration::from_secs(10));
            (waited, Instant::now())
        });
        std::thread::sleep(Duration::from_millis(30));
        let dropped = Instant::now();
        drop(op);
        let (waited, returned) = other.join().unwrap();
        assert!(
            returned >= dropped + GRACE,
            "returned {:?} after the end",
            returned - dropped
        );
        assert!(waited < Duration::from_secs(10), "{waited:?}");
    }
}
