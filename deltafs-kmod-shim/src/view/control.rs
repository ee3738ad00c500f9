//! Freeze (checkpoint) and switch (rollback) of a view.

use std::collections::HashSet;
use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use fuser::INodeNo;

use super::open::Mode;
use super::{FreezeOpts, FreezeReport, MappedFiles, SwitchReport, ViewError, ViewShared};
use crate::ids::{Ino, LayerId, SnapshotId};
use crate::index::Delta;
use crate::layer::{CopyStats, Layers};
use crate::node::{Bytes, DataRef};
use crate::persist::{FORMAT_VERSION, Manifest};
use crate::store::{Snapshot, StoreError};
use crate::sync::lock;
use crate::writer::Job;
use crate::{lease, maps};

impl ViewShared {
    pub(crate) fn freeze(&self, opts: &FreezeOpts) -> Result<FreezeReport, ViewError> {
        let start = Instant::now();
        let mapped = match &opts.mapped {
            MappedFiles::Probe | MappedFiles::Conservative => None,
            MappedFiles::Pids(pids) => Some(maps::shared_writable(pids.iter().copied())?),
            MappedFiles::AllProcesses => Some(maps::shared_writable_all()),
        };
        self.write_back_daemon_served()?;
        let layers = &self.store.layers;
        let mut store = lock(&self.store.state);
        let mut state = lock(&self.state);
        let frozen = state.writable;
        let next = LayerId::generate();

        // Files that stay with the live view: open ones, and those that may be mapped.
        let mut keep: Vec<Ino> = state.opens.keys().copied().collect();
        for &ino in state.maybe_mapped.keys() {
            if state.opens.contains_key(&ino) {
                continue;
            }
            let Some(data) = state.index.node(ino).and_then(|n| n.data.clone()) else {
                continue;
            };
            let path = state.data_path(&data);
            let still_mapped = match (&opts.mapped, &mapped) {
                (MappedFiles::Conservative, _) => true,
                (_, Some(found)) => {
                    std::fs::metadata(&path).is_ok_and(|m| found.contains(&(m.dev(), m.ino())))
                }
                (_, None) => lease::in_use(&path).unwrap_or(true),
            };
            if still_mapped {
                keep.push(ino);
            }
        }
        let mut moved = Vec::new();
        let mut orphans = Vec::new();
        let mut copies = CopyStats::default();
        for ino in keep {
            let Some(node) = state.index.node(ino).cloned() else {
                continue;
            };
            let Some(DataRef::Layer { layer, file }) = node.data else {
                continue;
            };
            if layer != frozen {
                continue;
            }
            layers.ensure(next)?;
            let live = layers.file(frozen, file);
            let target = layers.file(next, file);
            if node.nlink > 0 {
                let tmp = live.with_extension("freeze");
                let (_, stats) = match state.opens.get(&ino) {
                    Some(entry) => entry.backing.exclusive(|f| layers.copy_to(f, &tmp))?,
                    None => layers.copy_to(&Layers::open_file(&live, false)?, &tmp)?,
                };
                copies.add(stats);
                Layers::rename(&live, &target)?;
                Layers::rename(&tmp, &live)?;
            } else {
                // Open but unlinked: no snapshot shows it; its handles keep writing to it.
                Layers::rename(&live, &target)?;
                orphans.push(ino);
            }
            moved.push((ino, file));
        }

        // The snapshot: the index as it is (orphans left out), and its delta on disk.
        let mut index = state.index.clone();
        let mut scratch = Delta::default();
        for &ino in &orphans {
            index.put_node(ino, None, &mut scratch);
        }
        let changes = (state.delta.nodes.len() + state.delta.entries.len()) as u64;
        let manifest = Manifest {
            version: FORMAT_VERSION,
            id: frozen,
            parent: state.parent,
            base: Bytes(state.base.root().as_os_str().as_bytes().to_vec()),
            next_ino: self.store.next_ino.load(Ordering::Relaxed),
            absorbed: Vec::new(),
        };
        let id = SnapshotId::of_layer(frozen);
        let delta = Arc::new(std::mem::take(&mut state.delta));
        self.store.writer.send(Job::Frozen {
            dir: layers.dir(frozen),
            manifest,
            delta: Arc::clone(&delta),
            index: index.clone(),
        });
        store.snapshots.insert(
            id,
            Snapshot {
                parent: state.parent,
                base: state.base.root().to_owned(),
                delta: Some(delta),
                index: Some(index),
                dropped: false,
                absorbed: Vec::new(),
            },
        );
        drop(store);

        // The live view: a fresh writable layer that owns the files kept live.
        state.parent = Some(id);
        state.writable = next;
        let kept: HashSet<Ino> = moved.iter().map(|(ino, _)| *ino).collect();
        state.maybe_mapped.retain(|ino, _| kept.contains(ino));
        state.renew_mapped_generations();
        state.kept.clear();
        for (ino, file) in &moved {
            let file = *file;
            // The node exists: it was read from the index above under the same lock.
            let _ = state.txn().update(*ino, |node| {
                node.data = Some(DataRef::Layer { layer: next, file });
            });
            if let Ok(meta) = std::fs::metadata(layers.file(next, file)) {
                state.kept.insert(*ino, (id, ctime(&meta)));
            }
        }
        self.store.stats.frozen(frozen, id, &copies);
        Ok(FreezeReport {
            id,
            kept_live: moved.len() as u64,
            copies,
            changes,
            elapsed: start.elapsed(),
        })
    }

    /// Makes the kernel write back to the daemon the dirty pages it holds of this mount's
    /// files, so that the freeze's clone of a kept file has them. Only a daemon-served
    /// handle open for writing can leave such pages: a `MAP_SHARED` writable mapping made
    /// through it dirties the FUSE page cache (fuser's writes are write-through, with no
    /// writeback cache), whereas a passthrough file's mapping dirties the backing file's
    /// page cache, which the clone reads anyway. Without this, those pages reached the
    /// daemon after the freeze and landed in the live file only. `syncfs` on the mount
    /// waits for the `WRITE`s, which the daemon's session threads answer: so it runs
    /// before the state lock is taken. Cost: none unless such a handle is open; then two
    /// round trips (`OPENDIR`, `RELEASEDIR`) and O(dirty inodes of the mount).
    fn write_back_daemon_served(&self) -> Result<(), ViewError> {
        let nids: Vec<u64> = {
            let state = lock(&self.state);
            state
                .handles
                .values()
                .filter(|handle| {
                    handle.write
                        && state.opens.values().any(|entry| {
                            matches!(entry.mode, Mode::Daemon)
                                && Arc::ptr_eq(&entry.backing, &handle.backing)
                        })
                })
                .map(|handle| handle.nid)
                .collect()
        };
        if nids.is_empty() {
            return Ok(());
        }
        let failed = |source| ViewError::WriteBack {
            mountpoint: self.mountpoint.clone(),
            source,
        };
        let root = std::fs::File::open(&self.mountpoint).map_err(failed)?;
        nix::unistd::syncfs(&root).map_err(|e| failed(e.into()))?;
        // `syncfs` can return before the daemon has answered the `WRITE`s it started
        // (seen: the `WRITE` of a dirty mapped page reached the daemon after the freeze
        // had taken its snapshot, about one run in six of `tests/invariants.rs`,
        // `dirty_pages_of_a_daemon_served_mapping_are_in_the_checkpoint`, on a store
        // without reflink, whose chunk-granular copies are always daemon-served).
        // Invalidating the pages makes the kernel launder dirty ones synchronously and
        // wait for those in flight before the notification returns. Cost: these files'
        // pages are read from the daemon again after the freeze.
        if let Some(notifier) = self.notifier.get() {
            for nid in nids {
                // ENOENT: the kernel holds nothing for it.
                let _ = notifier.inval_inode(INodeNo(nid), 0, 0);
            }
        }
        Ok(())
    }

    pub(crate) fn switch(&self, to: SnapshotId) -> Result<SwitchReport, ViewError> {
        let start = Instant::now();
        let mut store = lock(&self.store.state);
        let base_root = lock(&self.state).base.root().to_owned();
        let target = store.index_of(&self.store.layers, to, &base_root)?;
        let mut state = lock(&self.state);

        // What may differ: the deltas on the path between the current state and `to`.
        let mut candidates = state.delta.clone();
        let mut ours = Vec::new();
        let mut cur = state.parent;
        while let Some(id) = cur {
            ours.push(id);
            cur = store.snapshots.get(&id).and_then(|s| s.parent);
        }
        let ours_set: HashSet<SnapshotId> = ours.iter().copied().collect();
        let mut cur = Some(to);
        let mut common = None;
        while let Some(id) = cur {
            if ours_set.contains(&id) {
                common = Some(id);
                break;
            }
            candidates.extend(&*store.delta_of(&self.store.layers, id)?);
            cur = store
                .snapshots
                .get(&id)
                .ok_or(StoreError::UnknownSnapshot(id))?
                .parent;
        }
        for id in ours {
            if Some(id) == common {
                break;
            }
            candidates.extend(&*store.delta_of(&self.store.layers, id)?);
        }
        drop(store);

        let old = std::mem::replace(&mut state.index, target);
        let mut inodes = Vec::new();
        let mut entries: Vec<(u64, OsString)> = Vec::new();
        let mut retired = 0;
        let mut unchanged = Vec::new();
        for &ino in &candidates.nodes {
            let (before, after) = (old.node(ino), state.index.node(ino));
            let same = match (before, after) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b) || a == b,
                (None, None) => true,
                _ => false,
            };
            if same {
                continue;
            }
            if let (Some(before), Some(after)) = (before, after)
                && let Some(file) = state.unchanged_since_kept(ino, to, before, after)
            {
                // Still what the snapshot holds: it stays live, its handles connected.
                unchanged.push((ino, file));
                continue;
            }
            inodes.push(state.nids.nid(ino));
            if let Some(open) = state.opens.remove(&ino) {
                let new_nid = self.store.next_ino.fetch_add(1, Ordering::Relaxed);
                let node = before
                    .cloned()
                    .unwrap_or_else(|| Arc::clone(&open_node_fallback()));
                let (_, names) = state.nids.retire(ino, node, Some(open), new_nid);
                entries.extend(names);
                retired += 1;
            }
        }
        let base = Arc::clone(&state.base);
        for (dir, name) in &candidates.entries {
            let before = old.known_entry(*dir, name, &base);
            let after = state.index.known_entry(*dir, name, &base);
            if before.is_none() || after.is_none() || before != after {
                entries.push((state.nids.nid(*dir), name.clone()));
            }
        }
        // The old writable layer is left to gc: handles opened before keep its files.
        let old_writable = std::mem::replace(&mut state.writable, LayerId::generate());
        self.store.stats.switched(old_writable);
        state.delta = Delta::default();
        state.parent = Some(to);
        let still: HashSet<Ino> = unchanged.iter().map(|(ino, _)| *ino).collect();
        state.maybe_mapped.retain(|ino, _| still.contains(ino));
        state.renew_mapped_generations();
        state.released.clear();
        state.kept.clear();
        let next = state.writable;
        for (ino, file) in unchanged {
            let from = self.store.layers.file(old_writable, file);
            let moved = self
                .store
                .layers
                .ensure(next)
                .and_then(|_| Layers::rename(&from, &self.store.layers.file(next, file)));
            match moved {
                Ok(()) => {
                    let _ = state.txn().update(ino, |node| {
                        node.data = Some(DataRef::Layer { layer: next, file });
                    });
                }
                Err(e) => {
                    // Cannot happen short of a broken store; the file then shows the
                    // snapshot's copy and its handles keep the old one.
                    log::error!("deltafs: {e}");
                    state.opens.remove(&ino);
                    inodes.push(state.nids.nid(ino));
                }
            }
        }
        for nid in &inodes {
            state.stale_cache.remove(nid);
        }
        drop(state);
        drop(old);

        if let Some(notifier) = self.notifier.get() {
            // ENOENT means the kernel holds nothing for it: nothing to invalidate.
            for nid in &inodes {
                let _ = notifier.inval_inode(INodeNo(*nid), 0, 0);
            }
            for (dir, name) in &entries {
                let _ = notifier.inval_entry(INodeNo(*dir), name);
            }
        }
        Ok(SwitchReport {
            id: to,
            candidates: candidates.nodes.len() as u64,
            inodes_invalidated: inodes.len() as u64,
            entries_invalidated: entries.len() as u64,
            retired,
            elapsed: start.elapsed(),
        })
    }
}

/// A file's ctime.
fn ctime(meta: &std::fs::Metadata) -> crate::node::Time {
    crate::node::Time {
        sec: meta.ctime(),
        nsec: meta.ctime_nsec() as u32,
    }
}

impl super::state::ViewState {
    /// Gives every mapping candidate a new generation, after a freeze or a switch moved
    /// their backing files: a janitor pass that read a candidate's path before the move
    /// probes whatever is at that path now (after a freeze, the frozen copy, which nothing
    /// holds), and must not drop the candidate on that verdict.
    fn renew_mapped_generations(&mut self) {
        let mut generation = self.mapped_generation;
        for g in self.maybe_mapped.values_mut() {
            generation += 1;
            *g = generation;
        }
        self.mapped_generation = generation;
    }

    /// For a switch to `to`: if file `ino` was kept live by the freeze that made
    /// `to`, and neither its node (but for where its data lives) nor its backing file
    /// (ctime) changed since, returns its backing file's number in the writable layer.
    fn unchanged_since_kept(
        &self,
        ino: Ino,
        to: SnapshotId,
        before: &crate::node::Node,
        after: &crate::node::Node,
    ) -> Option<u64> {
        let (snapshot, at_freeze) = self.kept.get(&ino)?;
        if *snapshot != to {
            return None;
        }
        let Some(DataRef::Layer { layer, file }) = before.data else {
            return None;
        };
        if layer != self.writable {
            return None;
        }
        let mut same = before.clone();
        same.data = after.data.clone();
        if same != *after {
            return None;
        }
        let meta = match self.opens.get(&ino) {
            Some(entry) => entry.backing.file().metadata().ok()?,
            None => std::fs::metadata(self.data_path(before.data.as_ref()?)).ok()?,
        };
        (ctime(&meta) == *at_freeze).then_some(file)
    }
}

/// The node a retired id reports if the previous index did not hold it (cannot happen
/// for an open inode; kept total rather than panicking).
fn open_node_fallback() -> Arc<crate::node::Node> {
    Arc::new(crate::node::Node::new(crate::node::Kind::File, 0, 0, 0))
}
