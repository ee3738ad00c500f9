//! On-disk state of frozen layers. A frozen layer's directory holds `layer.bin` (format
//! version 2, [`binary`]): its manifest (identity, parent, base, inode allocator) and its
//! delta (what the layer's epoch changed in the index), in one compact binary file whose
//! presence marks the layer frozen. Stores written before hold version 1 ([`json`]):
//! `delta.json` and then `layer.json`; they are still read, never written. A restarted
//! daemon rebuilds a snapshot's index by replaying the deltas of its chain from the root.
//!
//! The file is written to a temporary name and renamed into place, without `fsync` (a
//! freeze must stay in the tens of microseconds): after a power loss the newest freezes
//! may be missing, never half-written. Unmount syncs the store.

pub mod binary;
pub mod json;

use std::ffi::OsString;
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ids::{Ino, LayerId, SnapshotId};
use crate::index::{Delta, EntryChanges, Index, NodeChanges};
use crate::node::{Bytes, Node};

/// Version of the layer metadata this build writes (it reads 1 to 4; 3 is 2 plus the
/// manifest's `absorbed` layers, 4 is 3 plus the chunk records of nodes copied up chunk
/// by chunk).
pub const FORMAT_VERSION: u32 = 4;

/// The metadata file of version 2.
pub const LAYER_FILE: &str = "layer.bin";

/// Every name a frozen layer's metadata may have, any version: what a freeze writes
/// besides backing files.
pub const METADATA_FILES: [&str; 3] = [LAYER_FILE, json::MANIFEST, json::DELTA];

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
    /// A version-1 metadata file is not valid JSON of the expected shape.
    #[error("cannot parse {path}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },
    /// A binary metadata file is damaged.
    #[error("cannot decode {path} at byte {offset}: {what}")]
    Decode {
        /// The file.
        path: PathBuf,
        /// Where decoding stopped.
        offset: usize,
        /// What was wrong there.
        what: &'static str,
    },
    /// A metadata file has a format version this build does not know.
    #[error("{path} has format version {found}, this build reads 1 to {FORMAT_VERSION}")]
    Version {
        /// The file.
        path: PathBuf,
        /// The version found.
        found: u32,
    },
}

/// A frozen layer's identity and place in the snapshot tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Format version it was read from or is written in.
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
    /// Layers squashed into this one ([`Store::squash`](crate::Store::squash)): no longer
    /// snapshots, their directories hold backing files this snapshot's nodes still use.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub absorbed: Vec<LayerId>,
}

/// The nodes and entries the epoch changed (`None`: removed).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaRecord {
    /// Format version it was read from or is written in.
    pub version: u32,
    /// Changed inodes and their node in the snapshot, sorted by inode.
    pub nodes: Vec<(Ino, Option<Node>)>,
    /// Changed entries `(directory, name)` and the inode they name in the snapshot,
    /// sorted.
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
pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> Result<u64, PersistError> {
    let io_err = |source| PersistError::Io {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, data).map_err(io_err)?;
    fs::rename(&tmp, path).map_err(io_err)?;
    Ok(data.len() as u64)
}

/// Writes a frozen layer's metadata into `dir` (format [`FORMAT_VERSION`], one file).
/// Returns the bytes written.
pub fn write_frozen(
    dir: &Path,
    manifest: &Manifest,
    record: &DeltaRecord,
) -> Result<u64, PersistError> {
    write_atomic(&dir.join(LAYER_FILE), &binary::encode(manifest, record))
}

/// Removes a layer's metadata files (any format) and its dropped mark, so that it is no
/// longer a snapshot (its backing files stay). Missing files are fine.
pub fn remove_metadata(dir: &Path) -> Result<(), PersistError> {
    for name in METADATA_FILES.iter().chain([&DROPPED]) {
        let path = dir.join(name);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error(&path)(e)),
        }
    }
    Ok(())
}

/// Removes a layer's version-1 metadata files (after its `layer.bin` replaced them).
pub fn remove_json(dir: &Path) -> Result<(), PersistError> {
    for name in [json::MANIFEST, json::DELTA] {
        let path = dir.join(name);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error(&path)(e)),
        }
    }
    Ok(())
}

/// Marks a frozen layer's snapshot as dropped.
pub fn mark_dropped(dir: &Path) -> Result<(), PersistError> {
    write_atomic(&dir.join(DROPPED), b"").map(drop)
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> PersistError + '_ {
    move |source| PersistError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Reads the manifest of the layer in `dir`, whichever format it is in; `None` when the
/// layer was never frozen. Reads only the head of a version-2 file.
pub fn read_manifest(dir: &Path) -> Result<Option<FrozenLayer>, PersistError> {
    let path = dir.join(LAYER_FILE);
    let manifest = match fs::File::open(&path) {
        Ok(file) => {
            let mut head = Vec::with_capacity(binary::MANIFEST_MAX);
            let mut file = file;
            (&mut file)
                .take(binary::MANIFEST_MAX as u64)
                .read_to_end(&mut head)
                .map_err(io_error(&path))?;
            match binary::decode_manifest(&path, &head) {
                // A manifest longer than the head (many absorbed layers): read it all.
                Err(_) if head.len() == binary::MANIFEST_MAX => {
                    file.read_to_end(&mut head).map_err(io_error(&path))?;
                    binary::decode_manifest(&path, &head)?
                }
                result => result?,
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => match json::read_manifest(dir)? {
            Some(manifest) => manifest,
            None => return Ok(None),
        },
        Err(e) => return Err(io_error(&path)(e)),
    };
    Ok(Some(FrozenLayer {
        manifest,
        dropped: dir.join(DROPPED).exists(),
    }))
}

/// Reads the delta of the frozen layer in `dir`, whichever format it is in.
pub fn read_delta(dir: &Path) -> Result<DeltaRecord, PersistError> {
    let path = dir.join(LAYER_FILE);
    match fs::read(&path) {
        Ok(data) => Ok(binary::decode(&path, &data)?.1),
        Err(e) if e.kind() == io::ErrorKind::NotFound => json::read_delta(dir),
        Err(e) => Err(io_error(&path)(e)),
    }
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
            absorbed: Vec::new(),
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

        // A layer of format version 1 (two JSON files) reads the same.
        let old = dir.path().join("old");
        fs::create_dir(&old).unwrap();
        let json_bytes = json::write_frozen(&old, &manifest, &record).unwrap();
        assert!(json_bytes > written, "json {json_bytes}, binary {written}");
        let frozen = read_manifest(&old).unwrap().unwrap();
        assert_eq!(frozen.manifest.version, json::VERSION);
        assert_eq!(
            Manifest {
                version: FORMAT_VERSION,
                ..frozen.manifest
            },
            manifest
        );
        let read = read_delta(&old).unwrap();
        assert_eq!(read.version, json::VERSION);
        assert_eq!((read.nodes, read.entries), (record.nodes, record.entries));
    }
}
