//! On-disk state of frozen layers: `layer.json` (the manifest, written last: its presence
//! marks the layer frozen) and `delta.json` (what the layer's epoch changed in the index).
//! Both carry a format version. A restarted daemon rebuilds a snapshot's index by
//! replaying the deltas of its chain from the root.
//!
//! Files are written to a temporary name and renamed into place, without `fsync` (a freeze
//! must stay in the tens of microseconds): after a power loss the newest freezes may be
//! missing, never half-written. Unmount syncs the store.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ids::{Ino, LayerId, SnapshotId};
use crate::index::{Delta, EntryChanges, Index, NodeChanges};
use crate::node::{Bytes, Node};

/// Version of `layer.json` and `delta.json` this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

const MANIFEST: &str = "layer.json";
const DELTA: &str = "delta.json";
const DROPPED: &str = "dropped";

/// Failures reading or writing layer metadata.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// Reading or writing a metadata file failed.
    #[error("cannot access {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A metadata file is not valid JSON of the expected shape.
    #[error("cannot parse {path}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },
    /// A metadata file has a format version this build does not know.
    #[error("{path} has format version {found}, this build reads {FORMAT_VERSION}")]
    Version {
        /// The file.
        path: PathBuf,
        /// The version found.
        found: u32,
    },
}

/// `layer.json`: a frozen layer's identity and place in the snapshot tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Format version ([`FORMAT_VERSION`]).
    pub version: u32,
    /// The layer (and snapshot) id.
    pub id: LayerId,
    /// The snapshot this layer was stacked on; `None` for one stacked on the bare base.
    pub parent: Option<SnapshotId>,
    /// The base tree's canonical path.
    pub base: Bytes,
    /// The store's inode allocator when the layer was frozen (a restart resumes above the
    /// highest).
    pub next_ino: Ino,
}

/// `delta.json`: the nodes and entries the epoch changed (`None`: removed).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaRecord {
    /// Format version ([`FORMAT_VERSION`]).
    pub version: u32,
    /// Changed inodes and their node in the snapshot.
    pub nodes: Vec<(Ino, Option<Node>)>,
    /// Changed entries `(directory, name)` and the inode they name in the snapshot.
    pub entries: Vec<(Ino, Bytes, Option<Ino>)>,
}

impl DeltaRecord {
    /// What `delta` changed, as `index` (the frozen snapshot) has it.
    pub fn capture(delta: &Delta, index: &Index) -> Self {
        let mut nodes: Vec<_> = delta
            .nodes
            .iter()
            .map(|&ino| (ino, index.node(ino).map(|node| Node::clone(node))))
            .collect();
        nodes.sort_by_key(|(ino, _)| *ino);
        let mut entries: Vec<_> = delta
            .entries
            .iter()
            .map(|(dir, name)| {
                let target = index
                    .loaded_dir(*dir)
                    .and_then(|entries| entries.get(name.as_os_str()).copied());
                (*dir, Bytes(name.as_bytes().to_vec()), target)
            })
            .collect();
        entries.sort();
        Self {
            version: FORMAT_VERSION,
            nodes,
            entries,
        }
    }

    /// The delta this record describes.
    pub fn delta(&self) -> Delta {
        Delta {
            nodes: self.nodes.iter().map(|(ino, _)| *ino).collect(),
            entries: self
                .entries
                .iter()
                .map(|(dir, name, _)| (*dir, OsString::from_vec(name.0.clone())))
                .collect(),
        }
    }

    /// The record's parts in the form [`Index::apply`] takes.
    pub(crate) fn into_parts(self) -> (NodeChanges, EntryChanges) {
        let entries = self
            .entries
            .into_iter()
            .map(|(dir, name, target)| (dir, OsString::from_vec(name.0), target))
            .collect();
        (self.nodes, entries)
    }
}

/// A frozen layer as found on disk.
#[derive(Debug, Clone)]
pub struct FrozenLayer {
    /// Its manifest.
    pub manifest: Manifest,
    /// Whether the snapshot was dropped (the layer stays while descendants need it).
    pub dropped: bool,
}

/// Writes `path` through a temporary file and a rename; returns the bytes written.
fn write_atomic(path: &Path, data: &[u8]) -> Result<u64, PersistError> {
    let io_err = |source| PersistError::Io {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, data).map_err(io_err)?;
    fs::rename(&tmp, path).map_err(io_err)?;
    Ok(data.len() as u64)
}

/// Writes a frozen layer's metadata into `dir` (delta first, manifest last). Returns the
/// bytes written.
pub fn write_frozen(
    dir: &Path,
    manifest: &Manifest,
    record: &DeltaRecord,
) -> Result<u64, PersistError> {
    let delta_path = dir.join(DELTA);
    let manifest_path = dir.join(MANIFEST);
    let delta = serde_json::to_vec(record).map_err(|source| PersistError::Parse {
        path: delta_path.clone(),
        source,
    })?;
    let manifest_bytes = serde_json::to_vec(manifest).map_err(|source| PersistError::Parse {
        path: manifest_path.clone(),
        source,
    })?;
    Ok(write_atomic(&delta_path, &delta)? + write_atomic(&manifest_path, &manifest_bytes)?)
}

/// Marks a frozen layer's snapshot as dropped.
pub fn mark_dropped(dir: &Path) -> Result<(), PersistError> {
    write_atomic(&dir.join(DROPPED), b"").map(drop)
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, PersistError> {
    let data = fs::read(path).map_err(|source| PersistError::Io {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_slice(&data).map_err(|source| PersistError::Parse {
        path: path.to_owned(),
        source,
    })
}

/// Reads the manifest of the layer in `dir`; `None` when the layer was never frozen.
pub fn read_manifest(dir: &Path) -> Result<Option<FrozenLayer>, PersistError> {
    let path = dir.join(MANIFEST);
    if !path.exists() {
        return Ok(None);
    }
    let manifest: Manifest = read_json(&path)?;
    if manifest.version != FORMAT_VERSION {
        return Err(PersistError::Version {
            path,
            found: manifest.version,
        });
    }
    Ok(Some(FrozenLayer {
        manifest,
        dropped: dir.join(DROPPED).exists(),
    }))
}

/// Reads the delta of the frozen layer in `dir`.
pub fn read_delta(dir: &Path) -> Result<DeltaRecord, PersistError> {
    let path = dir.join(DELTA);
    let record: DeltaRecord = read_json(&path)?;
    if record.version != FORMAT_VERSION {
        return Err(PersistError::Version {
            path,
            found: record.version,
        });
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;
    use std::sync::Arc;

    use super::*;
    use crate::base::BaseTree;
    use crate::ids::ROOT_INO;
    use crate::node::Kind;

    #[test]
    fn a_delta_round_trips_and_rebuilds_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let base_dir = dir.path().join("base");
        fs::create_dir_all(base_dir.join("etc")).unwrap();
        let base = BaseTree::open(&base_dir).unwrap();
        let mut index = Index::new(base.root_node());
        let mut delta = Delta::default();
        let etc = {
            let mut txn = index.txn(&mut delta, &base);
            let etc = txn.lookup(ROOT_INO, OsStr::new("etc")).unwrap();
            txn.insert(
                etc,
                OsStr::new("hosts"),
                10,
                Node::new(Kind::File, 0o644, 0, 0),
            )
            .unwrap();
            txn.insert(
                ROOT_INO,
                OsStr::new("d"),
                11,
                Node::new(Kind::Dir, 0o755, 0, 0),
            )
            .unwrap();
            txn.insert(11, OsStr::new("x"), 12, Node::new(Kind::Fifo, 0o600, 0, 0))
                .unwrap();
            etc
        };
        let record = DeltaRecord::capture(&delta, &index);
        let layer = dir.path().join("layer");
        fs::create_dir(&layer).unwrap();
        let manifest = Manifest {
            version: FORMAT_VERSION,
            id: LayerId::generate(),
            parent: None,
            base: Bytes(base_dir.as_os_str().as_bytes().to_vec()),
            next_ino: 13,
        };
        let written = write_frozen(&layer, &manifest, &record).unwrap();
        assert!(written > 0);
        assert_eq!(read_manifest(&layer).unwrap().unwrap().manifest, manifest);
        let read = read_delta(&layer).unwrap();
        assert_eq!(read, record);
        assert_eq!(read.delta(), delta);

        let mut rebuilt = Index::new(base.root_node());
        let (nodes, entries) = read.into_parts();
        rebuilt.apply(nodes, entries, &base).unwrap();
        let mut scratch = Delta::default();
        let mut txn = rebuilt.txn(&mut scratch, &base);
        assert_eq!(txn.lookup(etc, OsStr::new("hosts")).unwrap(), 10);
        assert_eq!(txn.lookup(11, OsStr::new("x")).unwrap(), 12);
        assert_eq!(txn.node(12).unwrap(), Arc::clone(index.node(12).unwrap()));
        assert!(
            read_manifest(&dir.path().join("nothing"))
                .unwrap()
                .is_none()
        );
    }
}
