//! Where a snapshot keeps a regular file's data.
//!
//! A frozen snapshot never changes, so the backing file of one of its regular files (a
//! frozen layer's `f<n>`, or the base tree's own file) holds exactly what the file shows
//! in that snapshot, for good. A process that mapped the file through a view can be
//! given a mapping of the backing file instead, which keeps working after the FUSE
//! connection of that view is gone (the controller does that for templates it adopts
//! after a restart).

use std::ffi::OsStr;
use std::path::{Component, Path, PathBuf};

use crate::ids::{Ino, ROOT_INO, SnapshotId};
use crate::index::IndexError;
use crate::node::{DataRef, Kind};
use crate::store::{StoreError, StoreShared};
use crate::sync::lock;

/// A regular file of a snapshot and the file on the backing filesystem holding its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingFile {
    /// The file's DeltaFS inode number (what `st_ino` shows in a view).
    pub ino: Ino,
    /// The backing file: read it, never write it (it belongs to a frozen snapshot).
    pub path: PathBuf,
}

/// Why a snapshot's file has no backing file to give.
#[derive(Debug, thiserror::Error)]
pub enum BackingError {
    /// The snapshot or its index could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The path does not resolve in the snapshot.
    #[error("{} in snapshot {id}: {source}", path.display())]
    Lookup {
        /// The snapshot.
        id: SnapshotId,
        /// The path looked up.
        path: PathBuf,
        /// Why it does not resolve.
        #[source]
        source: IndexError,
    },
    /// The path names something other than a regular file with data.
    #[error("{} in snapshot {id} is not a regular file", path.display())]
    NotAFile {
        /// The snapshot.
        id: SnapshotId,
        /// The path looked up.
        path: PathBuf,
    },
    /// The file is a chunk-granular copy ([`crate::chunks`]): its backing file holds only
    /// the chunks written since, the rest is in the files below, so no one file holds
    /// its data.
    #[error(
        "{} in snapshot {id} is a chunk-granular copy: no single backing file holds its data",
        path.display()
    )]
    Chunked {
        /// The snapshot.
        id: SnapshotId,
        /// The path looked up.
        path: PathBuf,
    },
}

/// Resolves `path` (relative to the view's root; a leading `/` is allowed) in snapshot
/// `id`: one index probe per component, base directories read on first use.
pub(crate) fn resolve(
    shared: &StoreShared,
    id: SnapshotId,
    path: &Path,
) -> Result<BackingFile, BackingError> {
    let lookup = |source| BackingError::Lookup {
        id,
        path: path.to_owned(),
        source,
    };
    let (mut index, base) = {
        let mut state = lock(&shared.state);
        let base_path = state
            .snapshots
            .get(&id)
            .ok_or(StoreError::UnknownSnapshot(id))?
            .base
            .clone();
        let index = state.index_of(&shared.layers, id, &base_path)?;
        (index, state.base(&base_path)?)
    };
    let mut ino = ROOT_INO;
    for component in path.components() {
        let name: &OsStr = match component {
            Component::RootDir | Component::CurDir => continue,
            Component::Normal(name) => name,
            Component::ParentDir | Component::Prefix(_) => {
                return Err(lookup(IndexError::Invalid));
            }
        };
        let dir = index.ensure_dir(ino, &base).map_err(lookup)?;
        ino = *dir.get(name).ok_or_else(|| lookup(IndexError::NotFound))?;
    }
    let node = index
        .node(ino)
        .ok_or_else(|| lookup(IndexError::NotFound))?;
    let data = match (&node.kind, &node.data) {
        (Kind::File, Some(data)) => data,
        _ => {
            return Err(BackingError::NotAFile {
                id,
                path: path.to_owned(),
            });
        }
    };
    if node.partial.is_some() {
        return Err(BackingError::Chunked {
            id,
            path: path.to_owned(),
        });
    }
    let path = match data {
        DataRef::Base(rel) => base.path(&rel.0),
        DataRef::Layer { layer, file } => shared.layers.file(*layer, *file),
    };
    Ok(BackingFile { ino, path })
}
