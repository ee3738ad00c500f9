//! The squash pass of gc: after the store's gc, every run of dropped snapshots that
//! each have a single child is merged into the snapshot above it
//! ([`deltafs::Store::squash`], docs/deltafs.md "Squash").
//!
//! Such runs appear when a node is removed while a live chain still stacks on its
//! snapshot: a sandbox rolled back with `processes_only` keeps its files, so its next
//! node's snapshot sits on the files' chain, not on the node's parent, and removing the
//! nodes in between drops snapshots in the middle of that chain (a failed checkpoint
//! leaves one too). Squashing them shortens the chain a restarted daemon replays and
//! frees the files they superseded, without changing what any snapshot or view shows.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard, TryLockError};

use deltafs::{SnapshotId, SnapshotInfo, StoreError};

use super::tree_ops::snapshot_of;
use super::{Live, SandboxManager, db_err, lock, store_err};
use crate::sandbox::error::SandboxError;
use crate::tree::ids::SandboxId;

/// What the squash pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct SquashTotals {
    /// Snapshots (layers) merged into the one above them.
    pub layers: usize,
    /// Disk bytes of the superseded files removed.
    pub bytes: u64,
    /// Runs left for a later gc: a sandbox whose chain they are in was busy.
    pub deferred: usize,
}

/// The snapshots to squash at: each one that cannot itself be merged into a child
/// (kept by a node, or with no child or several) and whose parent can (dropped, with
/// exactly one child). One per run, so no two squashes touch the same snapshots.
/// Mounted views are not listed here: a view on a dropped snapshot makes the store
/// refuse to merge it, which is correct, only not counted in advance.
pub(super) fn squash_tops(snapshots: &[SnapshotInfo]) -> Vec<SnapshotId> {
    let mut children: HashMap<SnapshotId, usize> = HashMap::new();
    for parent in snapshots.iter().filter_map(|s| s.parent) {
        *children.entry(parent).or_default() += 1;
    }
    let dropped: HashSet<SnapshotId> = snapshots
        .iter()
        .filter(|s| s.dropped)
        .map(|s| s.id)
        .collect();
    let mergeable = |id: SnapshotId| dropped.contains(&id) && children.get(&id) == Some(&1);
    snapshots
        .iter()
        .filter(|s| !mergeable(s.id) && s.parent.is_some_and(mergeable))
        .map(|s| s.id)
        .collect()
}

/// The snapshots from `head` down to the base.
fn chain_of(
    head: SnapshotId,
    parents: &HashMap<SnapshotId, Option<SnapshotId>>,
) -> Vec<SnapshotId> {
    let mut chain = Vec::new();
    let mut cur = Some(head);
    while let Some(id) = cur {
        if chain.contains(&id) {
            break;
        }
        chain.push(id);
        cur = parents.get(&id).copied().flatten();
    }
    chain
}

impl SandboxManager {
    /// Squashes every run of dropped single-child snapshots (run after the store's gc,
    /// which removes dead branches: they would count as children).
    ///
    /// Each idle sandbox is locked for the pass, so no checkpoint or rollback of it runs
    /// meanwhile; a run in the chain of a busy sandbox (found from its head node, which
    /// its view or a checkpoint in progress stacks on) is left for a later gc. The store
    /// itself serialises each squash with freezes and switches.
    pub(super) fn squash_chains(&self) -> Result<SquashTotals, SandboxError> {
        let mut totals = SquashTotals::default();
        let snapshots = self.store.snapshots();
        let tops = squash_tops(&snapshots);
        if tops.is_empty() {
            return Ok(totals);
        }
        let parents: HashMap<SnapshotId, Option<SnapshotId>> =
            snapshots.iter().map(|s| (s.id, s.parent)).collect();

        let lives: Vec<(SandboxId, std::sync::Arc<Mutex<Live>>)> = lock(&self.sandboxes)
            .iter()
            .map(|(id, l)| (*id, std::sync::Arc::clone(l)))
            .collect();
        // Held (never waited for: a long exec must not stall gc) until the pass ends.
        let mut held: Vec<MutexGuard<'_, Live>> = Vec::new();
        let mut busy_chains: HashSet<SnapshotId> = HashSet::new();
        for (id, live) in &lives {
            match live.try_lock() {
                Ok(guard) => held.push(guard),
                Err(TryLockError::Poisoned(p)) => held.push(p.into_inner()),
                Err(TryLockError::WouldBlock) => {
                    let head = self
                        .db
                        .sandbox(id)
                        .map_err(db_err)?
                        .and_then(|s| s.head)
                        .map(|n| self.db.node(&n))
                        .transpose()
                        .map_err(db_err)?
                        .flatten();
                    if let Some(node) = head {
                        busy_chains.extend(chain_of(snapshot_of(&node)?, &parents));
                    }
                }
            }
        }

        tracing::debug!(
            sandboxes = lives.len(),
            held = held.len(),
            busy_chain = busy_chains.len(),
            tops = tops.len(),
            "squash pass"
        );
        for top in tops {
            if busy_chains.contains(&top) {
                totals.deferred += 1;
                continue;
            }
            match self.store.squash(top) {
                Ok(report) => {
                    if !report.merged.is_empty() {
                        tracing::info!(
                            snapshot = %top,
                            merged = report.merged.len(),
                            files_removed = report.files_removed,
                            bytes_removed = report.bytes_removed,
                            ms = report.elapsed.as_secs_f64() * 1e3,
                            "squashed"
                        );
                    }
                    totals.layers += report.merged.len();
                    totals.bytes += report.bytes_removed;
                }
                // Dropped and collected meanwhile by another gc: nothing left to do.
                Err(StoreError::UnknownSnapshot(_)) => {}
                Err(e) => return Err(store_err(format!("squashing snapshot {top}"), e)),
            }
        }
        drop(held);
        Ok(totals)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sid(n: u8) -> SnapshotId {
        SnapshotId::of_layer(deltafs::LayerId::from_bytes([n; 16]))
    }

    fn snap(id: u8, parent: Option<u8>, dropped: bool) -> SnapshotInfo {
        SnapshotInfo {
            id: sid(id),
            parent: parent.map(sid),
            dropped,
        }
    }

    #[test]
    fn one_top_per_run_of_dropped_single_child_snapshots() {
        // 1 <- 2(d) <- 3(d) <- 4 <- 5(d) <- 6(d, two children) <- 7, 8
        let list = vec![
            snap(1, None, false),
            snap(2, Some(1), true),
            snap(3, Some(2), true),
            snap(4, Some(3), false),
            snap(5, Some(4), true),
            snap(6, Some(5), true),
            snap(7, Some(6), false),
            snap(8, Some(6), false),
        ];
        let mut tops = squash_tops(&list);
        tops.sort();
        // 4 takes 3 and 2; 6 (two children: not mergeable itself) takes 5.
        assert_eq!(tops, vec![sid(4), sid(6)]);
    }

    #[test]
    fn nothing_to_squash_without_a_dropped_single_child_parent() {
        let list = vec![
            snap(1, None, true),
            snap(2, Some(1), false),
            snap(3, Some(1), false),
            snap(4, Some(3), false),
        ];
        assert!(squash_tops(&list).is_empty());
    }

    #[test]
    fn a_dropped_leaf_a_view_stacks_on_is_a_top() {
        // A failed checkpoint leaves the view on dropped 3; 2 below it is dropped too.
        let list = vec![
            snap(1, None, false),
            snap(2, Some(1), true),
            snap(3, Some(2), true),
        ];
        assert_eq!(squash_tops(&list), vec![sid(3)]);
    }

    #[test]
    fn chains_stop_at_the_base() {
        let parents: HashMap<SnapshotId, Option<SnapshotId>> =
            [(sid(1), None), (sid(2), Some(sid(1)))]
                .into_iter()
                .collect();
        assert_eq!(chain_of(sid(2), &parents), vec![sid(2), sid(1)]);
    }
}
