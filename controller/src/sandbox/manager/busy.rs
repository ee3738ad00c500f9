//! One operation at a time per sandbox, and what the others are told meanwhile.
//!
//! Operations on one sandbox are serialised by its lock. A request that finds the lock
//! taken waits for it (30 s by default, `deltaboxd --busy-wait-ms`), then fails with
//! `busy`, naming the operation
//! in progress and how long it has run. Reads (`status`, `ls`) never wait: while an
//! operation runs they answer from the sandbox's state as that operation found it, with
//! `busy` set.

use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::sync::{Condvar, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use super::{Live, lock};
use crate::api::sandbox_types::{BusyInfo, SandboxInfo};
use crate::sandbox::error::SandboxError;
use crate::tree::ids::SandboxId;

/// How long a request waits by default for an operation on the same sandbox to end.
pub const BUSY_WAIT: Duration = Duration::from_secs(30);
/// How often a waiter looks again even without a wake-up (a lock taken without
/// [`BusyTable::acquire`], by removal or clean-up, is released without one).
const RECHECK: Duration = Duration::from_millis(50);

/// The operation holding a sandbox, and its state when the operation began.
struct Running {
    operation: &'static str,
    since: Instant,
    info: SandboxInfo,
}

/// The operations in progress, by sandbox.
pub(crate) struct BusyTable {
    running: Mutex<HashMap<SandboxId, Running>>,
    released: Condvar,
    wait: Duration,
}

/// A sandbox's lock taken for `operation`; released (and waiters woken) on drop.
pub(crate) struct Held<'a> {
    guard: Option<MutexGuard<'a, Live>>,
    table: &'a BusyTable,
    id: SandboxId,
}

impl BusyTable {
    /// A table whose requests wait up to `wait`.
    pub(super) fn new(wait: Duration) -> Self {
        Self {
            running: Mutex::new(HashMap::new()),
            released: Condvar::new(),
            wait,
        }
    }

    /// Takes sandbox `id`'s lock for `operation`, waiting up to the table's wait.
    pub(super) fn acquire<'a>(
        &'a self,
        id: SandboxId,
        live: &'a Mutex<Live>,
        operation: &'static str,
    ) -> Result<Held<'a>, SandboxError> {
        let deadline = Instant::now() + self.wait;
        let mut running = lock(&self.running);
        let guard = loop {
            match live.try_lock() {
                Ok(guard) => break guard,
                Err(TryLockError::Poisoned(poisoned)) => break poisoned.into_inner(),
                Err(TryLockError::WouldBlock) => {}
            }
            let now = Instant::now();
            if now >= deadline {
                let (operation, for_ms) = running.get(&id).map_or(("another operation", 0), |r| {
                    (r.operation, r.since.elapsed().as_millis() as u64)
                });
                return Err(SandboxError::Busy {
                    sandbox: id.to_string(),
                    operation: operation.to_owned(),
                    for_ms,
                    waited_ms: self.wait.as_millis() as u64,
                });
            }
            let wait = RECHECK.min(deadline - now);
            running = self
                .released
                .wait_timeout(running, wait)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        };
        running.insert(
            id,
            Running {
                operation,
                since: Instant::now(),
                info: guard.info(),
            },
        );
        Ok(Held {
            guard: Some(guard),
            table: self,
            id,
        })
    }

    /// The tree of sandbox `id` as the operation holding it found it; `None` when no
    /// operation taken by [`Self::acquire`] holds it.
    pub(super) fn tree_of(&self, id: SandboxId) -> Option<String> {
        lock(&self.running).get(&id).map(|r| r.info.tree.clone())
    }

    /// Sandbox `live`'s state without waiting: as it is, or, while an operation holds
    /// it, as that operation found it, with `busy` saying which.
    pub(super) fn info(&self, id: SandboxId, live: &Mutex<Live>) -> SandboxInfo {
        loop {
            match live.try_lock() {
                Ok(guard) => return guard.info(),
                Err(TryLockError::Poisoned(poisoned)) => return poisoned.into_inner().info(),
                Err(TryLockError::WouldBlock) => {}
            }
            if let Some(r) = lock(&self.running).get(&id) {
                let mut info = r.info.clone();
                info.busy = Some(BusyInfo {
                    operation: r.operation.to_owned(),
                    for_ms: r.since.elapsed().as_millis() as u64,
                });
                return info;
            }
            // Held without `acquire` (removal, clean-up): brief; look again.
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Deref for Held<'_> {
    type Target = Live;

    fn deref(&self) -> &Live {
        self.guard.as_deref().expect("held until dropped")
    }
}

impl DerefMut for Held<'_> {
    fn deref_mut(&mut self) -> &mut Live {
        self.guard.as_deref_mut().expect("held until dropped")
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        // The sandbox's lock first: a waiter woken below must find it free.
        drop(self.guard.take());
        lock(&self.table.running).remove(&self.id);
        self.table.released.notify_all();
    }
}
