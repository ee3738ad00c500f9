//! The index: what a view shows, held in persistent (structurally shared) maps.
//!
//! `nodes: ino → Arc<Node>` and `dirs: ino → OrdMap<name, ino>` are `imbl` maps, so a
//! snapshot is a clone of two pointers (O(1)) and a change copies only the path to the
//! changed entry. A lookup is one probe per path component whatever the number of
//! layers. A directory that comes from the base is absent from `dirs` until first used,
//! then filled from the [`BaseTree`] cache.
//!
//! Every change made through a [`Txn`] is recorded in a [`Delta`]: the inodes and the
//! `(directory, name)` entries that changed. Switch and persistence work from deltas, so
//! neither ever walks the tree.

mod ops;

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::sync::Arc;

use crate::base::{BaseError, BaseTree};
use crate::ids::{Ino, ROOT_INO};
use crate::node::{DataRef, Kind, Node};

pub use self::ops::{RenameMode, Txn};

/// A directory's entries: name → inode number.
pub type Dir = imbl::OrdMap<OsString, Ino>;

/// Changed nodes as persisted: inode and its node (`None`: removed).
pub type NodeChanges = Vec<(Ino, Option<Node>)>;

/// Changed entries as persisted: directory, name and the inode named (`None`: removed).
pub type EntryChanges = Vec<(Ino, OsString, Option<Ino>)>;

/// Longest name a directory entry may have, as on ext4.
pub const NAME_MAX: usize = 255;

/// Why an index operation failed; each maps to the errno the caller gets.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// No such file or directory.
    #[error("no such file or directory")]
    NotFound,
    /// The name exists already.
    #[error("file exists")]
    Exists,
    /// A directory was expected.
    #[error("not a directory")]
    NotDir,
    /// A non-directory was expected.
    #[error("is a directory")]
    IsDir,
    /// The directory is not empty.
    #[error("directory not empty")]
    NotEmpty,
    /// The operation makes no sense (moving a directory under itself, a bad flag).
    #[error("invalid argument")]
    Invalid,
    /// A name longer than [`NAME_MAX`].
    #[error("file name too long")]
    NameTooLong,
    /// Not allowed on this kind of file (hard link to a directory).
    #[error("operation not permitted")]
    NotPermitted,
    /// No such extended attribute.
    #[error("no such attribute")]
    NoAttr,
    /// Too many links.
    #[error("too many links")]
    TooManyLinks,
    /// Reading the base tree failed.
    #[error(transparent)]
    Base(#[from] BaseError),
}

impl IndexError {
    /// The errno this error is reported as.
    pub fn errno(&self) -> i32 {
        match self {
            Self::NotFound => libc::ENOENT,
            Self::Exists => libc::EEXIST,
            Self::NotDir => libc::ENOTDIR,
            Self::IsDir => libc::EISDIR,
            Self::NotEmpty => libc::ENOTEMPTY,
            Self::Invalid => libc::EINVAL,
            Self::NameTooLong => libc::ENAMETOOLONG,
            Self::NotPermitted => libc::EPERM,
            Self::NoAttr => libc::ENODATA,
            Self::TooManyLinks => libc::EMLINK,
            Self::Base(_) => libc::EIO,
        }
    }
}

/// What changed in an index since a point (the last freeze or switch).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Delta {
    /// Inodes whose node changed, appeared or went away.
    pub nodes: HashSet<Ino>,
    /// Directory entries that changed, appeared or went away.
    pub entries: HashSet<(Ino, OsString)>,
}

impl Delta {
    /// Nothing changed.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty() && self.entries.is_empty()
    }

    /// Adds everything `other` records.
    pub fn extend(&mut self, other: &Delta) {
        self.nodes.extend(other.nodes.iter().copied());
        self.entries.extend(other.entries.iter().cloned());
    }
}

/// The namespace of a view or snapshot. Cloning is O(1).
#[derive(Clone, Debug)]
pub struct Index {
    nodes: imbl::HashMap<Ino, Arc<Node>>,
    dirs: imbl::HashMap<Ino, Dir>,
}

impl Index {
    /// An index holding only the root directory `root` (its listing is read from the base
    /// when its data is a base directory, else it starts empty).
    pub fn new(root: Arc<Node>) -> Self {
        let mut index = Self {
            nodes: imbl::HashMap::new(),
            dirs: imbl::HashMap::new(),
        };
        if !matches!(root.data, Some(DataRef::Base(_))) {
            index.dirs.insert(ROOT_INO, Dir::new());
        }
        index.nodes.insert(ROOT_INO, root);
        index
    }

    /// The node of `ino`, if the index has it (base objects appear once their directory
    /// was read).
    pub fn node(&self, ino: Ino) -> Option<&Arc<Node>> {
        self.nodes.get(&ino)
    }

    /// The entries of directory `ino` if they were read already.
    pub fn loaded_dir(&self, ino: Ino) -> Option<&Dir> {
        self.dirs.get(&ino)
    }

    /// Number of nodes held (for tests and reports).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// True when the index holds no node (never: the root is always there).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The entries of directory `ino`, reading them from the base on first use.
    pub fn ensure_dir(&mut self, ino: Ino, base: &BaseTree) -> Result<&Dir, IndexError> {
        if !self.dirs.contains_key(&ino) {
            let node = self.nodes.get(&ino).ok_or(IndexError::NotFound)?;
            if node.kind != Kind::Dir {
                return Err(IndexError::NotDir);
            }
            let Some(DataRef::Base(rel)) = &node.data else {
                // A directory made in a layer always has its entries in `dirs`.
                return Err(IndexError::NotFound);
            };
            let listing = base.dir(ino, &rel.0)?;
            for (child, node) in &listing.children {
                if !self.nodes.contains_key(child) {
                    self.nodes.insert(*child, Arc::clone(node));
                }
            }
            self.dirs.insert(ino, listing.entries.clone());
        }
        Ok(&self.dirs[&ino])
    }

    /// The node of `ino`, reading the base directories on its path if this index did not
    /// read them yet (the kernel may hold a base inode that another index, the one shown
    /// before a switch, read). `None` when the index does not have it (removed).
    pub fn ensure_node(&mut self, ino: Ino, base: &BaseTree) -> Option<Arc<Node>> {
        if let Some(node) = self.nodes.get(&ino) {
            return Some(Arc::clone(node));
        }
        if ino & crate::ids::BASE_INO_FLAG == 0 {
            return None;
        }
        let parent = base.parent_of(ino)?;
        self.ensure_node(parent, base)?;
        if self.dirs.contains_key(&parent) {
            // Read already: the node is gone from this index.
            return None;
        }
        self.ensure_dir(parent, base).ok()?;
        self.nodes.get(&ino).cloned()
    }

    /// What `name` in directory `dir` maps to, reading base listings from the shared
    /// cache without changing this index (for comparisons between indexes); `None` when
    /// this index cannot tell without loading: `dir` is not loaded here (an unchanged
    /// base directory nothing looked into yet) or its base listing cannot be read. A
    /// comparison must count that as a difference: taking it for "no such entry" kept a
    /// negative dentry alive across a switch that brought the name back.
    pub fn known_entry(&self, dir: Ino, name: &OsStr, base: &BaseTree) -> Option<Option<Ino>> {
        if let Some(entries) = self.dirs.get(&dir) {
            return Some(entries.get(name).copied());
        }
        let node = self.nodes.get(&dir)?;
        let Some(DataRef::Base(rel)) = &node.data else {
            return Some(None);
        };
        Some(base.dir(dir, &rel.0).ok()?.entries.get(name).copied())
    }

    /// Sets or removes a node, recording the change.
    pub(crate) fn put_node(&mut self, ino: Ino, node: Option<Arc<Node>>, delta: &mut Delta) {
        match node {
            Some(node) => {
                if node.kind == Kind::Dir
                    && !self.dirs.contains_key(&ino)
                    && !matches!(node.data, Some(DataRef::Base(_)))
                {
                    self.dirs.insert(ino, Dir::new());
                }
                self.nodes.insert(ino, node);
            }
            None => {
                self.nodes.remove(&ino);
                self.dirs.remove(&ino);
            }
        }
        delta.nodes.insert(ino);
    }

    /// Sets or removes an entry of a directory whose entries are loaded, recording it.
    pub(crate) fn put_entry(
        &mut self,
        dir: Ino,
        name: &OsStr,
        target: Option<Ino>,
        delta: &mut Delta,
    ) {
        if let Some(entries) = self.dirs.get_mut(&dir) {
            match target {
                Some(ino) => {
                    entries.insert(name.to_owned(), ino);
                }
                None => {
                    entries.remove(name);
                }
            }
            delta.entries.insert((dir, name.to_owned()));
        }
    }

    /// Applies a persisted delta (see [`crate::persist`]) without recording it.
    pub(crate) fn apply(
        &mut self,
        nodes: NodeChanges,
        entries: EntryChanges,
        base: &BaseTree,
    ) -> Result<(), IndexError> {
        let mut scratch = Delta::default();
        for (ino, node) in nodes {
            self.put_node(ino, node.map(Arc::new), &mut scratch);
        }
        for (dir, name, target) in entries {
            if !self.nodes.contains_key(&dir) {
                continue;
            }
            self.ensure_dir(dir, base)?;
            self.put_entry(dir, &name, target, &mut scratch);
        }
        Ok(())
    }

    /// Starts a batch of changes recorded in `delta`.
    pub fn txn<'a>(&'a mut self, delta: &'a mut Delta, base: &'a BaseTree) -> Txn<'a> {
        Txn::new(self, delta, base)
    }
}
