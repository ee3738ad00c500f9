//! The base tree (layer 0): a read-only host directory or rootfs, read lazily.
//!
//! A directory is read from disk the first time a view looks into it; the listing and
//! its children's nodes are cached here and shared by every view over this base (the base
//! never changes, so the cache never goes stale). Inode numbers are derived from the
//! base's own `(st_dev, st_ino)`, so hard links in the base stay one inode and the numbers
//! are the same in every view and after a restart. Extended attributes are read with the
//! node (but for `system.*`), so a base file's `security.capability` still works.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::hash::{Hash, Hasher};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::ids::{BASE_INO_FLAG, Ino, ROOT_INO};
use crate::node::{Bytes, DataRef, Kind, Node, Time};
use crate::sync::lock;

/// Failures reading the base tree.
#[derive(Debug, thiserror::Error)]
pub enum BaseError {
    /// The base root is missing or not a directory.
    #[error("base {path} is not a directory")]
    NotADirectory {
        /// The base root.
        path: PathBuf,
    },
    /// Reading a base directory or file failed.
    #[error("cannot read base {path}")]
    Read {
        /// The path in the base.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// A base directory's listing and its children's nodes.
#[derive(Debug)]
pub struct BaseDir {
    /// Name → inode number.
    pub entries: imbl::OrdMap<OsString, Ino>,
    /// The children's nodes (each once, even when hard-linked under two names).
    pub children: Vec<(Ino, Arc<Node>)>,
}

/// The base tree of a store's views.
#[derive(Debug)]
pub struct BaseTree {
    root: PathBuf,
    root_dev: u64,
    root_node: Arc<Node>,
    dirs: Mutex<HashMap<Ino, Arc<BaseDir>>>,
    nodes: Mutex<HashMap<Ino, Arc<Node>>>,
    /// The directory each base object was first read from.
    parents: Mutex<HashMap<Ino, Ino>>,
}

impl BaseTree {
    /// Opens the base tree rooted at `root` (canonicalised).
    pub fn open(root: &Path) -> Result<Self, BaseError> {
        let read_err = |source| BaseError::Read {
            path: root.to_owned(),
            source,
        };
        let root = fs::canonicalize(root).map_err(read_err)?;
        let meta = fs::metadata(&root).map_err(|source| BaseError::Read {
            path: root.clone(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(BaseError::NotADirectory { path: root });
        }
        let mut root_node = node_from_meta(&meta, Vec::new(), None);
        root_node.parent = ROOT_INO;
        root_node.xattrs = crate::xattr::read_all(&root).map_err(|source| BaseError::Read {
            path: root.clone(),
            source,
        })?;
        Ok(Self {
            root_dev: meta.dev(),
            root,
            root_node: Arc::new(root_node),
            dirs: Mutex::new(HashMap::new()),
            nodes: Mutex::new(HashMap::new()),
            parents: Mutex::new(HashMap::new()),
        })
    }

    /// The base root's canonical path.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The root directory's node (inode [`ROOT_INO`]).
    pub fn root_node(&self) -> Arc<Node> {
        Arc::clone(&self.root_node)
    }

    /// The absolute path of a base-relative path.
    pub fn path(&self, rel: &[u8]) -> PathBuf {
        if rel.is_empty() {
            self.root.clone()
        } else {
            self.root.join(OsStr::from_bytes(rel))
        }
    }

    /// The listing of base directory `rel` (inode `ino`), read once and cached.
    pub fn dir(&self, ino: Ino, rel: &[u8]) -> Result<Arc<BaseDir>, BaseError> {
        if let Some(dir) = lock(&self.dirs).get(&ino) {
            return Ok(Arc::clone(dir));
        }
        let dir = Arc::new(self.read_dir(ino, rel)?);
        // Another thread may have read it meanwhile: keep the first, so pointers match.
        Ok(Arc::clone(lock(&self.dirs).entry(ino).or_insert(dir)))
    }

    fn read_dir(&self, ino: Ino, rel: &[u8]) -> Result<BaseDir, BaseError> {
        let path = self.path(rel);
        let read_err = |path: &Path| {
            let path = path.to_owned();
            move |source| BaseError::Read { path, source }
        };
        let mut entries = imbl::OrdMap::new();
        let mut children = Vec::new();
        for entry in fs::read_dir(&path).map_err(read_err(&path))? {
            let entry = entry.map_err(read_err(&path))?;
            let name = entry.file_name();
            let child_path = entry.path();
            let meta = fs::symlink_metadata(&child_path).map_err(read_err(&child_path))?;
            let child_ino = self.ino_of(&meta);
            let mut child_rel = rel.to_vec();
            if !child_rel.is_empty() {
                child_rel.push(b'/');
            }
            child_rel.extend_from_slice(name.as_bytes());
            let node = {
                let mut nodes = lock(&self.nodes);
                match nodes.get(&child_ino) {
                    Some(node) => Arc::clone(node),
                    None => {
                        let target = if meta.file_type().is_symlink() {
                            let target =
                                fs::read_link(&child_path).map_err(read_err(&child_path))?;
                            Some(Bytes(target.into_os_string().into_vec()))
                        } else {
                            None
                        };
                        let mut node = node_from_meta(&meta, child_rel, target);
                        node.xattrs =
                            crate::xattr::read_all(&child_path).map_err(read_err(&child_path))?;
                        if node.kind == Kind::Dir {
                            node.parent = ino;
                        }
                        let node = Arc::new(node);
                        nodes.insert(child_ino, Arc::clone(&node));
                        node
                    }
                }
            };
            lock(&self.parents).entry(child_ino).or_insert(ino);
            entries.insert(name, child_ino);
            children.push((child_ino, node));
        }
        Ok(BaseDir { entries, children })
    }

    /// The directory base object `ino` was first read from, if it was read.
    pub fn parent_of(&self, ino: Ino) -> Option<Ino> {
        lock(&self.parents).get(&ino).copied()
    }

    /// The DeltaFS inode number of a base object.
    fn ino_of(&self, meta: &fs::Metadata) -> Ino {
        base_ino(meta.dev(), meta.ino(), self.root_dev)
    }
}

/// `BASE_INO_FLAG`, a 14-bit device tag (0 for the base root's device) and the low 48
/// bits of the base inode number.
fn base_ino(dev: u64, ino: u64, root_dev: u64) -> Ino {
    let tag = if dev == root_dev {
        0
    } else {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        dev.hash(&mut hasher);
        hasher.finish() % 0x3fff + 1
    };
    BASE_INO_FLAG | (tag << 48) | (ino & ((1 << 48) - 1))
}

use std::os::unix::ffi::OsStringExt;

fn node_from_meta(meta: &fs::Metadata, rel: Vec<u8>, target: Option<Bytes>) -> Node {
    let kind = Kind::from_mode(meta.mode()).unwrap_or(Kind::File);
    let time = |sec, nsec: i64| Time {
        sec,
        nsec: nsec as u32,
    };
    let data = match kind {
        Kind::File | Kind::Dir => Some(DataRef::Base(Bytes(rel))),
        _ => None,
    };
    Node {
        kind,
        perm: (meta.mode() & 0o7777) as u16,
        uid: meta.uid(),
        gid: meta.gid(),
        nlink: meta.nlink() as u32,
        rdev: meta.rdev(),
        size: meta.size(),
        atime: time(meta.atime(), meta.atime_nsec()),
        mtime: time(meta.mtime(), meta.mtime_nsec()),
        ctime: time(meta.ctime(), meta.ctime_nsec()),
        mtime_from_data: kind == Kind::File,
        parent: 0,
        target,
        xattrs: Default::default(),
        data,
        partial: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_is_read_lazily_and_hard_links_share_an_inode() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("d")).unwrap();
        fs::write(dir.path().join("d/a"), b"x").unwrap();
        fs::hard_link(dir.path().join("d/a"), dir.path().join("b")).unwrap();
        std::os::unix::fs::symlink("d/a", dir.path().join("s")).unwrap();
        let base = BaseTree::open(dir.path()).unwrap();
        let root = base.dir(ROOT_INO, b"").unwrap();
        assert_eq!(root.entries.len(), 3);
        let d_ino = root.entries[OsStr::new("d")];
        let d = base.dir(d_ino, b"d").unwrap();
        assert_eq!(d.entries[OsStr::new("a")], root.entries[OsStr::new("b")]);
        let (_, a) = &d.children[0];
        // One node for both names, its data at whichever path was read first.
        let data = a.data.clone();
        assert!(
            data == Some(DataRef::Base(Bytes(b"d/a".to_vec())))
                || data == Some(DataRef::Base(Bytes(b"b".to_vec()))),
            "{data:?}"
        );
        assert_eq!(a.nlink, 2);
        let s = root
            .children
            .iter()
            .find(|(ino, _)| *ino == root.entries[OsStr::new("s")])
            .unwrap();
        assert_eq!(s.1.target, Some(Bytes(b"d/a".to_vec())));
        // Cached: the same listing is returned.
        assert!(Arc::ptr_eq(&root, &base.dir(ROOT_INO, b"").unwrap()));
    }

    #[test]
    fn base_inodes_are_flagged_and_tagged_by_device() {
        assert_eq!(base_ino(5, 42, 5), BASE_INO_FLAG | 42);
        let other = base_ino(6, 42, 5);
        assert_ne!(other, BASE_INO_FLAG | 42);
        assert_eq!(other & BASE_INO_FLAG, BASE_INO_FLAG);
    }
}
