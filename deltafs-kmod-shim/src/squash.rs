//! Squash: merging a chain of frozen layers that nothing needs individually into the
//! snapshot above them.
//!
//! A snapshot's ancestor can be merged into it when the ancestor is dropped (no node
//! names it), has exactly one child (this chain; no other snapshot, dropped or not, and no
//! mounted view is stacked on it) and has the same base. [`Store::squash`] merges the
//! longest such run of ancestors: the snapshot's delta becomes the union of the run's
//! deltas valued in the snapshot's own index (which does not change, so every view,
//! descendant and open handle sees exactly what it saw), its parent becomes the run's
//! parent, and the run's snapshots cease to exist (their metadata files are removed).
//!
//! Data never moves: the merged layers' directories become the snapshot's *absorbed*
//! layers (listed in its manifest, kept by `gc` while it is), holding only the backing
//! files the snapshot's nodes still use. Every other backing file of theirs was
//! superseded within the run and is removed. (A node can refer to a layer's file only if
//! it changed in that layer's epoch, so the union of the deltas names every user; states
//! stacked on the snapshot inherit its references and never make new ones to frozen
//! layers.)
//!
//! What it buys: shorter chains (a restarted daemon replays fewer deltas; `switch` and
//! `diff` walk fewer), fewer snapshots, and the disk of superseded files. Order on disk:
//! the snapshot's new `layer.bin` first (atomically), then the merged layers' metadata,
//! then the superseded files: an interrupted squash leaves either the old chain or the
//! new one, plus at worst files or metadata that `gc` removes.

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crate::ids::{LayerId, SnapshotId};
use crate::index::Delta;
use crate::layer::LayerError;
use crate::node::DataRef;
use crate::persist::{self, DeltaRecord, FORMAT_VERSION};
use crate::store::{Store, StoreError};
use crate::sync::lock;

/// What [`Store::squash`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SquashReport {
    /// The snapshot squashed into.
    pub id: SnapshotId,
    /// Its parent now (the parent of the last snapshot merged).
    pub parent: Option<SnapshotId>,
    /// The snapshots merged into it, nearest first; they no longer exist. Empty when no
    /// ancestor could be merged.
    pub merged: Vec<SnapshotId>,
    /// Nodes and entries of its merged delta (0 when nothing was merged).
    pub changes: u64,
    /// Superseded backing files removed.
    pub files_removed: u64,
    /// Disk bytes those files had allocated (`st_blocks * 512`; extents shared by
    /// reflinks with files that stay are counted, though not freed).
    pub bytes_removed: u64,
    /// Layer directories removed (every file of theirs was superseded).
    pub layers_removed: u64,
    /// Time taken.
    pub elapsed: Duration,
}

impl Store {
    /// Merges into snapshot `id` the longest run of its ancestors that nothing needs
    /// individually (dropped, a single child, the same base): see [`crate::squash`]. Every
    /// remaining snapshot and mounted view shows exactly what it showed. Drop snapshots
    /// and run [`Store::gc`] first (a dead branch still counts as a child).
    pub fn squash(&self, id: SnapshotId) -> Result<SquashReport, StoreError> {
        let started = Instant::now();
        let shared = &self.shared;
        let layers = &shared.layers;
        let mut state = lock(&shared.state);
        shared.writer.flush()?;

        let (base, top_parent) = state
            .snapshots
            .get(&id)
            .map(|top| (top.base.clone(), top.parent))
            .ok_or(StoreError::UnknownSnapshot(id))?;
        let mut children: std::collections::HashMap<SnapshotId, usize> = Default::default();
        for parent in state.snapshots.values().filter_map(|s| s.parent) {
            *children.entry(parent).or_default() += 1;
        }
        state.views.retain(|v| v.strong_count() > 0);
        for view in state.views.iter().filter_map(Weak::upgrade) {
            if let (_, Some(parent)) = view.layers_in_use() {
                *children.entry(parent).or_default() += 1;
            }
        }
        let mut merged = Vec::new();
        let mut parent = top_parent;
        while let Some(ancestor) = parent {
            let s = state
                .snapshots
                .get(&ancestor)
                .ok_or(StoreError::UnknownSnapshot(ancestor))?;
            if !s.dropped || children.get(&ancestor) != Some(&1) || s.base != base {
                break;
            }
            merged.push(ancestor);
            parent = s.parent;
        }
        let mut report = SquashReport {
            id,
            parent: top_parent,
            merged: Vec::new(),
            changes: 0,
            files_removed: 0,
            bytes_removed: 0,
            layers_removed: 0,
            elapsed: Duration::ZERO,
        };
        if merged.is_empty() {
            report.elapsed = started.elapsed();
            return Ok(report);
        }

        // The merged delta, valued in the snapshot's (unchanged) index.
        let index = state.rebuild_index(layers, id, &base)?;
        let mut delta = Delta::clone(&*state.delta_of(layers, id)?);
        for ancestor in &merged {
            delta.extend(&*state.delta_of(layers, *ancestor)?);
        }
        let record = DeltaRecord::capture(&delta, &index);
        // A chunk-granular copy uses the files of its chain too.
        let used: HashSet<(LayerId, u64)> = record
            .nodes
            .iter()
            .filter_map(|(_, node)| node.as_ref())
            .flat_map(|node| {
                let chain = node.partial.iter().flat_map(|p| p.files());
                node.data.iter().chain(chain)
            })
            .filter_map(|data| match data {
                DataRef::Layer { layer, file } => Some((*layer, *file)),
                DataRef::Base(_) => None,
            })
            .collect();

        // Absorbed layers: the snapshot's, the merged ones and theirs; a layer none of
        // whose files is used goes entirely.
        let mut candidates: Vec<LayerId> = state.snapshots[&id].absorbed.clone();
        for ancestor in &merged {
            candidates.push(ancestor.layer());
            candidates.extend(state.snapshots[ancestor].absorbed.iter().copied());
        }
        let mut absorbed = Vec::new();
        let mut doomed_layers = Vec::new();
        for layer in candidates {
            if used.iter().any(|(l, _)| *l == layer) {
                absorbed.push(layer);
            } else {
                doomed_layers.push(layer);
            }
        }

        let dir = layers.dir(id.layer());
        let mut manifest = persist::read_manifest(&dir)?
            .ok_or(StoreError::UnknownSnapshot(id))?
            .manifest;
        manifest.version = FORMAT_VERSION;
        manifest.parent = parent;
        manifest.absorbed = absorbed.clone();
        persist::write_frozen(&dir, &manifest, &record)?;
        persist::remove_json(&dir)?;

        for ancestor in &merged {
            persist::remove_metadata(&layers.dir(ancestor.layer()))?;
            state.snapshots.remove(ancestor);
        }
        let gone: HashSet<SnapshotId> = merged.iter().copied().collect();
        shared.stats.retain_snapshots(|s| !gone.contains(s));
        let top = state
            .snapshots
            .get_mut(&id)
            .ok_or(StoreError::UnknownSnapshot(id))?;
        top.parent = parent;
        top.delta = Some(Arc::new(delta));
        top.absorbed = absorbed.clone();
        drop(state);

        for layer in &absorbed {
            let (files, bytes) = remove_unused(layers.dir(*layer), *layer, &used)?;
            report.files_removed += files;
            report.bytes_removed += bytes;
        }
        for layer in doomed_layers {
            let (files, bytes) = remove_unused(layers.dir(layer), layer, &used)?;
            report.files_removed += files;
            report.bytes_removed += bytes;
            layers.remove(layer)?;
            report.layers_removed += 1;
        }
        report.parent = parent;
        report.merged = merged;
        report.changes = (record.nodes.len() + record.entries.len()) as u64;
        report.elapsed = started.elapsed();
        Ok(report)
    }
}

/// Removes the backing files of `layer` (directory `dir`) that `used` does not name;
/// returns how many and their allocated bytes. Backing files are named `f<n>`, `n` in
/// hex ([`Layers::file`](crate::layer::Layers::file)); nothing else is touched.
fn remove_unused(
    dir: std::path::PathBuf,
    layer: LayerId,
    used: &HashSet<(LayerId, u64)>,
) -> Result<(u64, u64), StoreError> {
    let io_err = |path: &std::path::Path| {
        let path = path.to_owned();
        move |source| LayerError::Remove { path, source }
    };
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((0, 0)),
        Err(e) => return Err(io_err(&dir)(e).into()),
    };
    let (mut files, mut bytes) = (0, 0);
    for entry in entries {
        let entry = entry.map_err(io_err(&dir))?;
        let name = entry.file_name();
        let Some(file) = name
            .to_str()
            .and_then(|n| n.strip_prefix('f'))
            .and_then(|n| u64::from_str_radix(n, 16).ok())
        else {
            continue;
        };
        if used.contains(&(layer, file)) {
            continue;
        }
        let path = entry.path();
        let allocated = entry.metadata().map(|m| m.blocks() * 512).unwrap_or(0);
        fs::remove_file(&path).map_err(io_err(&path))?;
        files += 1;
        bytes += allocated;
    }
    Ok((files, bytes))
}
