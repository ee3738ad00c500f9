//! Background pruning of the "may be mapped" candidates of a view.
//!
//! A file that had a writable passthrough open may be written through a `MAP_SHARED`
//! mapping after its last fd is closed, so a freeze must keep it with the live view while
//! that can happen. Shortly after such a file's last handle is released, this thread
//! probes it once ([`crate::lease::in_use`]) and drops it from the candidates if nothing holds
//! it open any more — unless it was opened for writing again meanwhile (each writable
//! passthrough open bumps the candidate's generation), or a freeze or switch moved its
//! backing file while it probed the old path (they renew every generation). A freeze
//! then only has to probe
//! files closed in the last few milliseconds.
//!
//! It also watches the attributes the kernel holds of those candidates (`super::told`):
//! at each pass, and every [`CHECK_PERIOD`] while there are any.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, Weak};
use std::thread;
use std::time::Duration;

use super::ViewShared;
use crate::lease;
use crate::sync::lock;

/// How long after a release the probe waits: the kernel drops its passthrough backing
/// file only once our reply to the `RELEASE` is processed.
const DELAY: Duration = Duration::from_millis(10);

/// How often the attributes the kernel holds of possibly mapped files are compared with
/// their backing files: how long a write through a mapping may go unseen by `stat`.
pub(crate) const CHECK_PERIOD: Duration = Duration::from_secs(1);

/// The wake-up signal of a view's janitor thread.
#[derive(Default)]
pub(crate) struct Janitor {
    pending: Mutex<bool>,
    wake: Condvar,
    stop: AtomicBool,
}

impl Janitor {
    /// Asks for a pass (a candidate's last handle was released). Only the poke that
    /// sets the flag wakes the thread: under `tar` one comes with every file's
    /// `RELEASE`, and each `notify_one` is a `futex` system call even with no waiter.
    pub fn poke(&self) {
        let mut pending = lock(&self.pending);
        if !*pending {
            *pending = true;
            self.wake.notify_one();
        }
    }

    /// Ends the thread.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        self.poke();
    }

    /// Waits for a poke, or at most `timeout`: `Some(poked)`, `None` when stopping.
    fn wait(&self, timeout: Option<Duration>) -> Option<bool> {
        let mut pending = lock(&self.pending);
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        while !*pending {
            let left = match deadline {
                Some(deadline) => {
                    match deadline.checked_duration_since(std::time::Instant::now()) {
                        Some(left) if !left.is_zero() => Some(left),
                        _ => break,
                    }
                }
                None => None,
            };
            pending = match left {
                Some(left) => {
                    self.wake
                        .wait_timeout(pending, left)
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .0
                }
                None => self
                    .wake
                    .wait(pending)
                    .unwrap_or_else(|poisoned| poisoned.into_inner()),
            };
        }
        let poked = std::mem::take(&mut *pending);
        (!self.stop.load(Ordering::Relaxed)).then_some(poked)
    }
}

/// Starts the janitor thread of `view`; it ends once [`Janitor::stop`] is called.
pub(crate) fn spawn(view: Weak<ViewShared>) -> std::io::Result<Option<thread::JoinHandle<()>>> {
    let janitor = match view.upgrade() {
        Some(view) => std::sync::Arc::clone(&view.janitor),
        None => return Ok(None),
    };
    let thread = thread::Builder::new()
        .name("deltafs-janitor".to_owned())
        .spawn(move || {
            let mut timeout = None;
            let mut checked_all = std::time::Instant::now();
            while let Some(poked) = janitor.wait(timeout) {
                if poked {
                    thread::sleep(DELAY);
                }
                let Some(view) = view.upgrade() else {
                    return;
                };
                if poked && view.prune_mapped() {
                    // Some were released too recently: another pass.
                    janitor.poke();
                }
                // Every file once a period (pokes come every few ms under tar), the ones
                // just dropped from the candidates at every pass.
                let all = checked_all.elapsed() >= CHECK_PERIOD;
                if all {
                    checked_all = std::time::Instant::now();
                }
                timeout = view.check_told(all).then_some(CHECK_PERIOD);
            }
        })?;
    Ok(Some(thread))
}

impl ViewShared {
    /// Invalidates the kernel's attributes of possibly mapped files that changed since
    /// they were sent (`super::told`): of all of them when `all`, else of those no longer
    /// candidates. Returns whether any are still watched.
    pub(crate) fn check_told(&self, all: bool) -> bool {
        let (stale, watching) = {
            let mut state = lock(&self.state);
            let stale = state.stale_told(all);
            (stale, !state.told.is_empty())
        };
        if let Some(notifier) = self.notifier.get() {
            for nid in stale {
                // Attributes only; ENOENT: the kernel forgot the inode.
                let _ = notifier.inval_inode(fuser::INodeNo(nid), -1, 0);
            }
        }
        watching
    }

    /// Probes the candidates released at least [`DELAY`] ago (each once: one still in
    /// use stays a candidate until a freeze probes it again) and drops those that nothing
    /// holds open any more. Returns whether younger ones are left for a later pass.
    pub(crate) fn prune_mapped(&self) -> bool {
        let (candidates, left): (Vec<_>, bool) = {
            let mut state = lock(&self.state);
            let now = std::time::Instant::now();
            let (due, young): (Vec<_>, Vec<_>) = std::mem::take(&mut state.released)
                .into_iter()
                .partition(|(_, at)| now.duration_since(*at) >= DELAY);
            let left = !young.is_empty();
            state.released = young;
            let candidates = due
                .into_iter()
                .map(|(ino, _)| ino)
                .filter(|ino| !state.opens.contains_key(ino))
                .filter_map(|ino| {
                    let generation = *state.maybe_mapped.get(&ino)?;
                    let data = state.index.node(ino)?.data.clone()?;
                    Some((ino, generation, state.data_path(&data)))
                })
                .collect();
            (candidates, left)
        };
        let free: Vec<_> = candidates
            .into_iter()
            .filter(|(_, _, path)| matches!(lease::in_use(path), Ok(false)))
            .collect();
        if free.is_empty() {
            return left;
        }
        let mut state = lock(&self.state);
        for (ino, generation, _) in free {
            if state.maybe_mapped.get(&ino) == Some(&generation) && !state.opens.contains_key(&ino)
            {
                state.maybe_mapped.remove(&ino);
            }
        }
        left
    }
}
