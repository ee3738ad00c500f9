//! The store: layer directories under one root, the snapshots (frozen layers) made in
//! it, the base trees of its views, and garbage collection.
//!
//! Lock order: the store's state, then a view's state. FUSE handlers take only their
//! view's lock (they use the store's immutable parts and its atomic inode allocator), so
//! control operations never wait on the kernel while holding a lock the kernel waits on.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, Weak};

use nix::fcntl::{Flock, FlockArg};

use crate::backing::{BackingError, BackingFile};
use crate::base::{BaseError, BaseTree};
use crate::chunks::ChunkPolicy;
use crate::diff::{Change, DiffError, Plan};
use crate::ids::{LayerId, ROOT_INO, SnapshotId};
use crate::index::{Delta, Index, IndexError};
use crate::layer::{LayerError, Layers};
use crate::persist::{self, PersistError};
use crate::stats::{SnapshotWrites, Stats, StatsSnapshot};
use crate::sync::lock;
use crate::view::{View, ViewShared};
use crate::writer::{Job, Writer};

/// Failures of store operations.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store directory could not be created or opened.
    #[error("cannot open store directory {path}")]
    Open {
        /// The store root.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Another process holds the store.
    #[error("store {path} is in use by another process")]
    Locked {
        /// The store root.
        path: PathBuf,
    },
    /// A layer directory operation failed.
    #[error(transparent)]
    Layer(#[from] LayerError),
    /// Layer metadata could not be read or written.
    #[error(transparent)]
    Persist(#[from] PersistError),
    /// The base tree could not be read.
    #[error(transparent)]
    Base(#[from] BaseError),
    /// A snapshot's index could not be rebuilt from its deltas.
    #[error("cannot rebuild the index of snapshot {id}")]
    Rebuild {
        /// The snapshot.
        id: SnapshotId,
        /// The underlying error.
        #[source]
        source: IndexError,
    },
    /// No such snapshot in this store.
    #[error("no snapshot {0} in this store")]
    UnknownSnapshot(SnapshotId),
    /// The snapshot was dropped.
    #[error("snapshot {0} was dropped")]
    Dropped(SnapshotId),
    /// The snapshot was taken over another base tree.
    #[error("snapshot {id} is over base {expected}, not {got}")]
    BaseMismatch {
        /// The snapshot.
        id: SnapshotId,
        /// Its base.
        expected: PathBuf,
        /// The base asked for.
        got: PathBuf,
    },
    /// A diff or a layer measurement failed.
    #[error(transparent)]
    Diff(#[from] DiffError),
    /// Mounting the view failed.
    #[error("cannot mount DeltaFS at {mountpoint}")]
    Mount {
        /// The mount point.
        mountpoint: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// A snapshot: a frozen layer and the index it froze.
pub(crate) struct Snapshot {
    pub parent: Option<SnapshotId>,
    pub base: PathBuf,
    /// What its epoch changed relative to its parent; `None` until read from disk after a
    /// restart (a store with many snapshots opens without reading them all).
    pub delta: Option<Arc<Delta>>,
    /// Its index; `None` until rebuilt from disk after a restart.
    pub index: Option<Index>,
    pub dropped: bool,
    /// Layers squashed into it, whose directories hold backing files it still uses.
    pub absorbed: Vec<LayerId>,
}

/// What [`Store::snapshots`] lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// The snapshot.
    pub id: SnapshotId,
    /// The snapshot it was stacked on.
    pub parent: Option<SnapshotId>,
    /// Dropped: kept only while something stacked on it needs its layer.
    pub dropped: bool,
}

/// What [`Store::gc`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Layer directories removed.
    pub removed: Vec<LayerId>,
    /// Layer directories kept.
    pub kept: usize,
}

/// The store's state behind its lock.
pub(crate) struct StoreState {
    pub snapshots: HashMap<SnapshotId, Snapshot>,
    bases: HashMap<PathBuf, Arc<BaseTree>>,
    pub views: Vec<Weak<ViewShared>>,
}

/// What views share with their store.
pub(crate) struct StoreShared {
    pub root: PathBuf,
    pub layers: Layers,
    /// Next inode number (store-wide, never reused).
    pub next_ino: AtomicU64,
    pub state: Mutex<StoreState>,
    /// Writes frozen layers' metadata in the background.
    pub writer: Writer,
    /// What the store's views did (see [`crate::stats`]).
    pub stats: Stats,
    _lock: Flock<File>,
}

/// A DeltaFS store: `<root>/layers/<layer-id>/…` on a backing filesystem.
pub struct Store {
    pub(crate) shared: Arc<StoreShared>,
}

impl Store {
    /// Opens (creating) the store at `root`, taking its lock, and loads the snapshots
    /// found on disk (their indexes are rebuilt when first used).
    pub fn open(root: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with(root, ChunkPolicy::default())
    }

    /// [`Store::open`], copying files up chunk by chunk as `policy` says where the store
    /// cannot clone them (the chunk records on disk do not depend on it).
    pub fn open_with(root: impl AsRef<Path>, policy: ChunkPolicy) -> Result<Self, StoreError> {
        let root = root.as_ref();
        let open_err = |source| StoreError::Open {
            path: root.to_owned(),
            source,
        };
        fs::create_dir_all(root).map_err(open_err)?;
        let root = fs::canonicalize(root).map_err(open_err)?;
        let lock_file = File::create(root.join("lock")).map_err(|source| StoreError::Open {
            path: root.clone(),
            source,
        })?;
        let lock_file = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock)
            .map_err(|_| StoreError::Locked { path: root.clone() })?;
        let layers = Layers::open_with(root.join("layers"), policy)?;
        let mut snapshots = HashMap::new();
        let mut next_ino = ROOT_INO + 1;
        for layer in layers.list()? {
            let dir = layers.dir(layer);
            let Some(frozen) = persist::read_manifest(&dir)? else {
                continue;
            };
            next_ino = next_ino.max(frozen.manifest.next_ino);
            snapshots.insert(
                SnapshotId::of_layer(layer),
                Snapshot {
                    parent: frozen.manifest.parent,
                    base: PathBuf::from(std::ffi::OsStr::from_bytes(&frozen.manifest.base.0)),
                    delta: None,
                    index: None,
                    dropped: frozen.dropped,
                    absorbed: frozen.manifest.absorbed,
                },
            );
        }
        let writer = Writer::start().map_err(|source| StoreError::Open {
            path: root.clone(),
            source,
        })?;
        Ok(Self {
            shared: Arc::new(StoreShared {
                root,
                layers,
                next_ino: AtomicU64::new(next_ino),
                state: Mutex::new(StoreState {
                    snapshots,
                    bases: HashMap::new(),
                    views: Vec::new(),
                }),
                writer,
                stats: Stats::default(),
                _lock: lock_file,
            }),
        })
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.shared.root
    }

    /// Whether copy-ups and freeze clones are reflinks (`FICLONE`) on this store.
    pub fn reflink(&self) -> bool {
        self.shared.layers.reflink()
    }

    /// How copy-ups that cannot clone are made chunk by chunk.
    pub fn chunk_policy(&self) -> ChunkPolicy {
        self.shared.layers.policy()
    }

    /// Mounts a view of `base` at `mountpoint`: the state of snapshot `from` (or the bare
    /// base) over a fresh writable layer. The FUSE session runs on background threads
    /// until [`View::unmount`] or the view is dropped.
    pub fn mount(
        &self,
        base: &Path,
        mountpoint: &Path,
        from: Option<SnapshotId>,
    ) -> Result<View, StoreError> {
        let shared = {
            let mut state = lock(&self.shared.state);
            let base = state.base(base)?;
            let (index, parent) = match from {
                Some(id) => (
                    state.index_of(&self.shared.layers, id, base.root())?,
                    Some(id),
                ),
                None => (Index::new(base.root_node()), None),
            };
            let view = Arc::new(ViewShared::new(
                Arc::clone(&self.shared),
                base,
                index,
                parent,
                mountpoint.to_owned(),
            ));
            state.views.retain(|v| v.strong_count() > 0);
            state.views.push(Arc::downgrade(&view));
            view
        };
        View::spawn(shared).map_err(|source| StoreError::Mount {
            mountpoint: mountpoint.to_owned(),
            source,
        })
    }

    /// The snapshots of this store.
    pub fn snapshots(&self) -> Vec<SnapshotInfo> {
        let state = lock(&self.shared.state);
        let mut list: Vec<_> = state
            .snapshots
            .iter()
            .map(|(id, s)| SnapshotInfo {
                id: *id,
                parent: s.parent,
                dropped: s.dropped,
            })
            .collect();
        list.sort_by_key(|s| s.id);
        list
    }

    /// Drops snapshot `id`: it can no longer be switched to or mounted; its layer goes at
    /// the next [`Store::gc`] unless a view or a kept snapshot is stacked on it.
    pub fn drop_snapshot(&self, id: SnapshotId) -> Result<(), StoreError> {
        let mut state = lock(&self.shared.state);
        let snapshot = state
            .snapshots
            .get_mut(&id)
            .ok_or(StoreError::UnknownSnapshot(id))?;
        snapshot.dropped = true;
        self.shared.writer.send(Job::Dropped {
            dir: self.shared.layers.dir(id.layer()),
        });
        Ok(())
    }

    /// Waits until the metadata of every snapshot taken so far is on disk (freezes hand
    /// it to a background writer). Returns the bytes written since the last flush.
    pub fn flush(&self) -> Result<u64, StoreError> {
        Ok(self.shared.writer.flush()?)
    }

    /// Removes every layer directory that no mounted view and no kept snapshot needs
    /// (including the writable layers switches left behind: handles still open on their
    /// files keep the files, not the directory).
    pub fn gc(&self) -> Result<GcReport, StoreError> {
        let mut state = lock(&self.shared.state);
        self.shared.writer.flush()?;
        let mut keep: HashSet<LayerId> = HashSet::new();
        let mut roots: Vec<SnapshotId> = Vec::new();
        state.views.retain(|v| v.strong_count() > 0);
        for view in state.views.iter().filter_map(Weak::upgrade) {
            let (writable, parent) = view.layers_in_use();
            keep.insert(writable);
            roots.extend(parent);
        }
        roots.extend(
            state
                .snapshots
                .iter()
                .filter(|(_, s)| !s.dropped)
                .map(|(id, _)| *id),
        );
        for root in roots {
            let mut cur = Some(root);
            while let Some(id) = cur {
                if !keep.insert(id.layer()) {
                    break;
                }
                cur = state.snapshots.get(&id).and_then(|s| s.parent);
            }
        }
        // Layers squashed into a kept snapshot keep their backing files, not their
        // metadata (left behind only if a squash was interrupted).
        let mut absorbed: HashSet<LayerId> = HashSet::new();
        for (id, snapshot) in &state.snapshots {
            if keep.contains(&id.layer()) {
                absorbed.extend(snapshot.absorbed.iter().copied());
            }
        }
        for layer in &absorbed {
            if state
                .snapshots
                .remove(&SnapshotId::of_layer(*layer))
                .is_some()
            {
                persist::remove_metadata(&self.shared.layers.dir(*layer))?;
            }
        }
        state.snapshots.retain(|id, _| keep.contains(&id.layer()));
        keep.extend(absorbed);
        self.shared
            .stats
            .retain_snapshots(|id| keep.contains(&id.layer()));
        let mut report = GcReport::default();
        for layer in self.shared.layers.list()? {
            if keep.contains(&layer) {
                report.kept += 1;
            } else {
                self.shared.layers.remove(layer)?;
                report.removed.push(layer);
            }
        }
        Ok(report)
    }

    /// The paths that differ from snapshot `from` (or the bare base, `None`) to snapshot
    /// `to`, sorted by path. Costs what changed between the two (their deltas through the
    /// common ancestor), not the size of the tree: see [`crate::diff`].
    pub fn diff(
        &self,
        from: Option<SnapshotId>,
        to: SnapshotId,
    ) -> Result<Vec<Change>, StoreError> {
        let plan = Plan::gather(&mut lock(&self.shared.state), &self.shared.layers, from, to)?;
        plan.changes(|id| lock(&self.shared.state).delta_of(&self.shared.layers, id))
    }

    /// Disk bytes snapshot `id`'s own layer holds: the allocated blocks of the files its
    /// epoch wrote, and of its metadata once written (see [`Store::flush`]). A walk of that
    /// one layer directory.
    pub fn snapshot_bytes(&self, id: SnapshotId) -> Result<u64, StoreError> {
        if !lock(&self.shared.state).snapshots.contains_key(&id) {
            return Err(StoreError::UnknownSnapshot(id));
        }
        Ok(crate::diff::layer_bytes(
            &self.shared.layers.dir(id.layer()),
        )?)
    }

    /// The backing file of regular file `path` (relative to the root) in snapshot `id`:
    /// what a view of `id` shows at `path`, as a file of the backing filesystem (see
    /// [`crate::backing`]).
    pub fn backing_file(&self, id: SnapshotId, path: &Path) -> Result<BackingFile, BackingError> {
        crate::backing::resolve(&self.shared, id, path)
    }

    /// What the store's views did since it was opened: requests by kind, copy-ups,
    /// freezes, switches, and the layers of each mounted view's chain.
    pub fn stats(&self) -> StatsSnapshot {
        crate::stats::snapshot(&self.shared)
    }

    /// What snapshot `id` made the store write: its epoch's copy-ups, the freeze's
    /// copies, its metadata files (waiting for the background writer first). `None` for
    /// a snapshot this process did not freeze.
    pub fn written_by_snapshot(
        &self,
        id: SnapshotId,
    ) -> Result<Option<SnapshotWrites>, StoreError> {
        crate::stats::written_by_snapshot(&self.shared, id)
    }

    /// Bytes allocated under the store's `layers/` directory, as the sum of `st_blocks`
    /// (extents shared by reflinked files count once per file).
    pub fn disk_usage(&self) -> u64 {
        self.shared.layers.disk_usage()
    }
}

impl StoreState {
    /// The base tree at `path`, opened once per store.
    pub fn base(&mut self, path: &Path) -> Result<Arc<BaseTree>, StoreError> {
        let canonical = fs::canonicalize(path).map_err(|source| BaseError::Read {
            path: path.to_owned(),
            source,
        })?;
        if let Some(base) = self.bases.get(&canonical) {
            return Ok(Arc::clone(base));
        }
        let base = Arc::new(BaseTree::open(&canonical)?);
        self.bases.insert(canonical, Arc::clone(&base));
        Ok(base)
    }

    /// What snapshot `id`'s epoch changed, read from disk on first use.
    pub fn delta_of(&mut self, layers: &Layers, id: SnapshotId) -> Result<Arc<Delta>, StoreError> {
        let snapshot = self
            .snapshots
            .get_mut(&id)
            .ok_or(StoreError::UnknownSnapshot(id))?;
        if let Some(delta) = &snapshot.delta {
            return Ok(Arc::clone(delta));
        }
        let delta = Arc::new(persist::read_delta(&layers.dir(id.layer()))?.delta());
        snapshot.delta = Some(Arc::clone(&delta));
        Ok(delta)
    }

    /// The index of snapshot `id` over base `base`, rebuilt from the deltas of its chain
    /// if this process did not make it.
    pub fn index_of(
        &mut self,
        layers: &Layers,
        id: SnapshotId,
        base: &Path,
    ) -> Result<Index, StoreError> {
        let snapshot = self
            .snapshots
            .get(&id)
            .ok_or(StoreError::UnknownSnapshot(id))?;
        if snapshot.dropped {
            return Err(StoreError::Dropped(id));
        }
        if snapshot.base != base {
            return Err(StoreError::BaseMismatch {
                id,
                expected: snapshot.base.clone(),
                got: base.to_owned(),
            });
        }
        if let Some(index) = &snapshot.index {
            return Ok(index.clone());
        }
        self.rebuild_index(layers, id, base)
    }

    /// The index of snapshot `id` (dropped or not) over `base`, rebuilt from the deltas
    /// of its chain down to the nearest snapshot whose index is in memory.
    pub fn rebuild_index(
        &mut self,
        layers: &Layers,
        id: SnapshotId,
        base: &Path,
    ) -> Result<Index, StoreError> {
        let tree = self.base(base)?;
        let mut chain = Vec::new();
        let mut cur = Some(id);
        let mut index = None;
        while let Some(c) = cur {
            let s = self
                .snapshots
                .get(&c)
                .ok_or(StoreError::UnknownSnapshot(c))?;
            if let Some(found) = &s.index {
                index = Some(found.clone());
                break;
            }
            chain.push(c);
            cur = s.parent;
        }
        let mut index = index.unwrap_or_else(|| Index::new(tree.root_node()));
        for c in chain.into_iter().rev() {
            let record = persist::read_delta(&layers.dir(c.layer()))?;
            if let Some(s) = self.snapshots.get_mut(&c) {
                s.delta.get_or_insert_with(|| Arc::new(record.delta()));
            }
            let (nodes, entries) = record.into_parts();
            index
                .apply(nodes, entries, &tree)
                .map_err(|source| StoreError::Rebuild { id: c, source })?;
            if let Some(s) = self.snapshots.get_mut(&c) {
                s.index = Some(index.clone());
            }
        }
        Ok(index)
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("root", &self.shared.root)
            .finish()
    }
}
