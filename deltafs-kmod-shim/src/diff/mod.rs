//! What changed between two snapshots of one base ([`Change`]), and the disk bytes a
//! snapshot's own layer holds ([`layer_bytes`]).
//!
//! A diff never walks the tree. The inodes and `(directory, name)` entries that can differ
//! between two snapshots are the union of the deltas on the path between them through
//! their common ancestor (as for a switch); only those are compared, in each snapshot's
//! index. Paths are found upwards: a directory's through its `parent` inode, a changed
//! file's through the entries that name it — first those in the deltas between the two
//! snapshots, then its base path, then the deltas of the common ancestor's chain, newest
//! first, until its link count of names is found. Base directories are read only along
//! those paths. `docs/deltafs.md` ("Diff and bytes") states what is reported.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::base::BaseTree;
use crate::ids::SnapshotId;
use crate::index::{Delta, Index};
use crate::layer::Layers;
use crate::node::{Kind, Node};
use crate::store::{StoreError, StoreState};

use self::compare::Differ;

mod compare;

/// Failures of diffs and layer measurements.
#[derive(Debug, thiserror::Error)]
pub enum DiffError {
    /// The two snapshots are over different base trees: their inodes are unrelated.
    #[error(
        "cannot diff snapshot {from} (base {from_base}) with snapshot {to} (base {to_base}): \
         they are over different bases"
    )]
    DifferentBases {
        /// The snapshot diffed from.
        from: SnapshotId,
        /// Its base.
        from_base: PathBuf,
        /// The snapshot diffed to.
        to: SnapshotId,
        /// Its base.
        to_base: PathBuf,
    },
    /// A layer directory or one of its files could not be measured.
    #[error("cannot measure {path}")]
    Measure {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// How a path differs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    /// The path exists only in the older snapshot (`from`). Sorts before `Added`, so a
    /// path whose file type changed lists its removal first.
    Removed,
    /// The path exists only in the newer snapshot (`to`).
    Added,
    /// The path exists in both and what it names changed (see [`Changed`]).
    Modified,
}

/// The type of the file a change is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileType {
    /// Regular file.
    File,
    /// Directory.
    Dir,
    /// Symbolic link.
    Symlink,
    /// FIFO, socket or device node.
    Other,
}

impl From<Kind> for FileType {
    fn from(kind: Kind) -> Self {
        match kind {
            Kind::File => Self::File,
            Kind::Dir => Self::Dir,
            Kind::Symlink => Self::Symlink,
            _ => Self::Other,
        }
    }
}

/// What a [`ChangeKind::Modified`] change changed (all false for added and removed).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Changed {
    /// The data: another backing file (a write copies up; identity, not bytes, is
    /// compared), another file under the name, or a device number.
    pub content: bool,
    /// Permission bits.
    pub mode: bool,
    /// Owner or group.
    pub owner: bool,
    /// A symlink's target.
    pub target: bool,
    /// Extended attributes.
    pub xattrs: bool,
}

impl Changed {
    /// What differs from `old` to `new`; times and link counts are not compared, nor a
    /// directory's entries (they are reported as their own paths).
    pub fn between(old: &Node, new: &Node) -> Self {
        Self {
            content: new.kind != Kind::Dir && (old.data != new.data || old.rdev != new.rdev),
            mode: old.perm != new.perm,
            owner: old.uid != new.uid || old.gid != new.gid,
            target: old.target != new.target,
            xattrs: old.xattrs != new.xattrs,
        }
    }

    /// True when anything is flagged.
    pub fn any(&self) -> bool {
        self.content || self.mode || self.owner || self.target || self.xattrs
    }
}

/// One path that differs between two snapshots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub struct Change {
    /// The path from the view's root, starting with `/` (`/workspace/a.py`; `/` is the
    /// root itself). Serialized as a string when UTF-8, else as an array of bytes.
    #[serde(with = "path_bytes")]
    pub path: PathBuf,
    /// Added, removed or modified.
    pub kind: ChangeKind,
    /// The file's type (in `to`, or in `from` for a removal).
    pub file_type: FileType,
    /// For a modification, what changed.
    #[serde(default)]
    pub changed: Changed,
}

mod path_bytes {
    use std::ffi::OsString;
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    use std::path::{Path, PathBuf};

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use crate::node::Bytes;

    pub fn serialize<S: Serializer>(path: &Path, s: S) -> Result<S::Ok, S::Error> {
        Bytes(path.as_os_str().as_bytes().to_vec()).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
        Ok(PathBuf::from(OsString::from_vec(Bytes::deserialize(d)?.0)))
    }
}

/// Disk bytes a layer directory holds: the allocated blocks (`st_blocks * 512`) of its
/// backing files and metadata files and of the directory itself. A layer that was never
/// created (an epoch that wrote nothing, before its metadata is written) holds 0.
/// Extents a file shares with another through a reflink count in full here.
pub fn layer_bytes(dir: &Path) -> Result<u64, DiffError> {
    use std::os::unix::fs::MetadataExt;
    let measure_err = |path: &Path| {
        let path = path.to_owned();
        move |source| DiffError::Measure { path, source }
    };
    let meta = match fs::symlink_metadata(dir) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(measure_err(dir)(e)),
    };
    let mut total = meta.blocks() * 512;
    if meta.is_dir() {
        for entry in fs::read_dir(dir).map_err(measure_err(dir))? {
            let entry = entry.map_err(measure_err(dir))?;
            // A temporary metadata file may be renamed away meanwhile: skip it.
            match layer_bytes(&entry.path()) {
                Ok(bytes) => total += bytes,
                Err(DiffError::Measure { source, .. })
                    if source.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(total)
}

/// What a diff needs, taken under the store's lock (then released: the comparison reads
/// base directories and old deltas, and must not stall freezes meanwhile).
pub(crate) struct Plan {
    from: Index,
    to: Index,
    base: Arc<BaseTree>,
    /// The union of the deltas between the two snapshots.
    candidates: Delta,
    /// The common ancestor and its ancestors, newest first: where the names of files
    /// changed in place between the two snapshots were made.
    older: Vec<SnapshotId>,
}

impl Plan {
    /// The indexes of `from` (or the bare base) and `to`, and the deltas between them.
    pub(crate) fn gather(
        state: &mut StoreState,
        layers: &Layers,
        from: Option<SnapshotId>,
        to: SnapshotId,
    ) -> Result<Self, StoreError> {
        let base_path = state
            .snapshots
            .get(&to)
            .ok_or(StoreError::UnknownSnapshot(to))?
            .base
            .clone();
        if let Some(from) = from {
            let from_base = &state
                .snapshots
                .get(&from)
                .ok_or(StoreError::UnknownSnapshot(from))?
                .base;
            if *from_base != base_path {
                return Err(DiffError::DifferentBases {
                    from,
                    from_base: from_base.clone(),
                    to,
                    to_base: base_path,
                }
                .into());
            }
        }
        let to_index = state.index_of(layers, to, &base_path)?;
        let base = state.base(&base_path)?;
        let from_index = match from {
            Some(from) => state.index_of(layers, from, &base_path)?,
            None => Index::new(base.root_node()),
        };
        let parent = |state: &StoreState, id: SnapshotId| {
            state
                .snapshots
                .get(&id)
                .map(|s| s.parent)
                .ok_or(StoreError::UnknownSnapshot(id))
        };
        let mut from_chain = Vec::new();
        let mut cur = from;
        while let Some(id) = cur {
            from_chain.push(id);
            cur = parent(state, id)?;
        }
        let from_set: HashSet<SnapshotId> = from_chain.iter().copied().collect();
        let mut candidates = Delta::default();
        let mut common = None;
        let mut cur = Some(to);
        while let Some(id) = cur {
            if from_set.contains(&id) {
                common = Some(id);
                break;
            }
            candidates.extend(&*state.delta_of(layers, id)?);
            cur = parent(state, id)?;
        }
        for id in from_chain {
            if Some(id) == common {
                break;
            }
            candidates.extend(&*state.delta_of(layers, id)?);
        }
        let mut older = Vec::new();
        let mut cur = common;
        while let Some(id) = cur {
            older.push(id);
            cur = parent(state, id)?;
        }
        Ok(Self {
            from: from_index,
            to: to_index,
            base,
            candidates,
            older,
        })
    }

    /// The changes, sorted by path (bytewise). `older_delta` gives the delta of an
    /// ancestor snapshot (it takes the store's lock, and may read a layer's delta from disk).
    pub(crate) fn changes(
        self,
        older_delta: impl FnMut(SnapshotId) -> Result<Arc<Delta>, StoreError>,
    ) -> Result<Vec<Change>, StoreError> {
        if self.candidates.is_empty() {
            return Ok(Vec::new());
        }
        let mut differ = Differ::new(self.from, self.to, self.base);
        differ.entries(&self.candidates);
        differ.nodes(&self.candidates, &self.older, older_delta)?;
        let mut out = differ.into_changes();
        out.sort_by(|a, b| {
            (a.path.as_os_str().as_bytes(), a.kind).cmp(&(b.path.as_os_str().as_bytes(), b.kind))
        });
        out.dedup();
        Ok(out)
    }
}
