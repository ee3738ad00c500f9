//! POSIX namespace operations over an [`Index`], each recorded in a [`Delta`]: the rules
//! of ext4 for names, links, renames and directory link counts, independent of FUSE (so
//! they are unit-tested without a mount).

use std::ffi::OsStr;
use std::sync::Arc;

use super::{Delta, Dir, Index, IndexError, NAME_MAX};
use crate::base::BaseTree;
use crate::ids::{Ino, ROOT_INO};
use crate::node::{Kind, Node, Time};

/// `renameat2` flags DeltaFS handles.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RenameMode {
    /// `RENAME_NOREPLACE`: fail with `EEXIST` if the target exists.
    pub noreplace: bool,
    /// `RENAME_EXCHANGE`: swap the two names atomically.
    pub exchange: bool,
}

/// A batch of changes to an index, recorded in a delta.
pub struct Txn<'a> {
    index: &'a mut Index,
    delta: &'a mut Delta,
    base: &'a BaseTree,
}

fn check_name(name: &OsStr) -> Result<(), IndexError> {
    if name.len() > NAME_MAX {
        return Err(IndexError::NameTooLong);
    }
    if name.is_empty() || name == "." || name == ".." {
        return Err(IndexError::Invalid);
    }
    Ok(())
}

impl<'a> Txn<'a> {
    pub(super) fn new(index: &'a mut Index, delta: &'a mut Delta, base: &'a BaseTree) -> Self {
        Self { index, delta, base }
    }

    /// The node of `ino`.
    pub fn node(&self, ino: Ino) -> Result<Arc<Node>, IndexError> {
        self.index.node(ino).cloned().ok_or(IndexError::NotFound)
    }

    /// The inode `name` names in directory `parent`.
    pub fn lookup(&mut self, parent: Ino, name: &OsStr) -> Result<Ino, IndexError> {
        if name.len() > NAME_MAX {
            return Err(IndexError::NameTooLong);
        }
        self.index
            .ensure_dir(parent, self.base)?
            .get(name)
            .copied()
            .ok_or(IndexError::NotFound)
    }

    /// The entries of directory `dir` (an O(1) clone).
    pub fn list(&mut self, dir: Ino) -> Result<Dir, IndexError> {
        self.index.ensure_dir(dir, self.base).cloned()
    }

    /// Replaces the node of `ino` by `f` applied to a copy of it.
    pub fn update(&mut self, ino: Ino, f: impl FnOnce(&mut Node)) -> Result<Arc<Node>, IndexError> {
        let mut node = Node::clone(self.index.node(ino).ok_or(IndexError::NotFound)?);
        f(&mut node);
        let node = Arc::new(node);
        self.index
            .put_node(ino, Some(Arc::clone(&node)), self.delta);
        Ok(node)
    }

    /// Removes the node of `ino` (an orphan whose last link and last open are gone).
    pub fn remove(&mut self, ino: Ino) {
        self.index.put_node(ino, None, self.delta);
    }

    /// Bumps a directory's mtime and ctime and adds `links` to its link count.
    fn touch_dir(&mut self, dir: Ino, links: i32, now: Time) -> Result<(), IndexError> {
        self.update(dir, |node| {
            node.mtime = now;
            node.ctime = now;
            node.nlink = node.nlink.saturating_add_signed(links);
        })?;
        Ok(())
    }

    /// Adds the new inode `ino` with `node` as `name` in directory `parent`.
    pub fn insert(
        &mut self,
        parent: Ino,
        name: &OsStr,
        ino: Ino,
        mut node: Node,
    ) -> Result<Arc<Node>, IndexError> {
        check_name(name)?;
        if self.index.ensure_dir(parent, self.base)?.contains_key(name) {
            return Err(IndexError::Exists);
        }
        let is_dir = node.kind == Kind::Dir;
        if is_dir {
            node.parent = parent;
        }
        let now = node.ctime;
        let node = Arc::new(node);
        self.index
            .put_node(ino, Some(Arc::clone(&node)), self.delta);
        self.index.put_entry(parent, name, Some(ino), self.delta);
        self.touch_dir(parent, i32::from(is_dir), now)?;
        Ok(node)
    }

    /// Removes the non-directory `name` from `parent`. Returns its inode and its node
    /// after the change: with `nlink` 0 it is an orphan, to be removed with [`Txn::remove`]
    /// once no handle has it open.
    pub fn unlink(&mut self, parent: Ino, name: &OsStr) -> Result<(Ino, Arc<Node>), IndexError> {
        let ino = self.lookup(parent, name)?;
        if self.node(ino)?.kind == Kind::Dir {
            return Err(IndexError::IsDir);
        }
        let now = Time::now();
        self.index.put_entry(parent, name, None, self.delta);
        let node = self.update(ino, |node| {
            node.nlink = node.nlink.saturating_sub(1);
            node.ctime = now;
        })?;
        self.touch_dir(parent, 0, now)?;
        Ok((ino, node))
    }

    /// Removes the empty directory `name` from `parent`. Returns its inode.
    pub fn rmdir(&mut self, parent: Ino, name: &OsStr) -> Result<Ino, IndexError> {
        if name == "." {
            return Err(IndexError::Invalid);
        }
        if name == ".." {
            return Err(IndexError::NotEmpty);
        }
        let ino = self.lookup(parent, name)?;
        if self.node(ino)?.kind != Kind::Dir {
            return Err(IndexError::NotDir);
        }
        if !self.index.ensure_dir(ino, self.base)?.is_empty() {
            return Err(IndexError::NotEmpty);
        }
        self.index.put_entry(parent, name, None, self.delta);
        self.index.put_node(ino, None, self.delta);
        self.touch_dir(parent, -1, Time::now())?;
        Ok(ino)
    }

    /// Adds the name `name` in `parent` for the existing non-directory `ino`.
    pub fn link(&mut self, ino: Ino, parent: Ino, name: &OsStr) -> Result<Arc<Node>, IndexError> {
        check_name(name)?;
        let node = self.node(ino)?;
        if node.kind == Kind::Dir {
            return Err(IndexError::NotPermitted);
        }
        if node.nlink >= 65_000 {
            return Err(IndexError::TooManyLinks);
        }
        if self.index.ensure_dir(parent, self.base)?.contains_key(name) {
            return Err(IndexError::Exists);
        }
        let now = Time::now();
        self.index.put_entry(parent, name, Some(ino), self.delta);
        let node = self.update(ino, |node| {
            node.nlink += 1;
            node.ctime = now;
        })?;
        self.touch_dir(parent, 0, now)?;
        Ok(node)
    }

    /// True when directory `ancestor` is `dir` or one of its ancestors.
    fn is_ancestor(&self, ancestor: Ino, mut dir: Ino) -> bool {
        loop {
            if dir == ancestor {
                return true;
            }
            if dir == ROOT_INO {
                return false;
            }
            match self.index.node(dir) {
                Some(node) if node.parent != 0 && node.parent != dir => dir = node.parent,
                _ => return false,
            }
        }
    }

    /// `renameat2(parent/name, new_parent/new_name, mode)`. Returns the non-directory the
    /// rename replaced, if any, with its node after the change (an orphan at `nlink` 0).
    pub fn rename(
        &mut self,
        parent: Ino,
        name: &OsStr,
        new_parent: Ino,
        new_name: &OsStr,
        mode: RenameMode,
    ) -> Result<Option<(Ino, Arc<Node>)>, IndexError> {
        if mode.exchange && mode.noreplace {
            return Err(IndexError::Invalid);
        }
        check_name(new_name)?;
        let src = self.lookup(parent, name)?;
        let src_node = self.node(src)?;
        self.index.ensure_dir(new_parent, self.base)?;
        let dst = match self.lookup(new_parent, new_name) {
            Ok(ino) => Some(ino),
            Err(IndexError::NotFound) => None,
            Err(e) => return Err(e),
        };
        let src_is_dir = src_node.kind == Kind::Dir;
        if src_is_dir && parent != new_parent && self.is_ancestor(src, new_parent) {
            return Err(IndexError::Invalid);
        }
        let now = Time::now();
        if mode.exchange {
            let dst = dst.ok_or(IndexError::NotFound)?;
            let dst_is_dir = self.node(dst)?.kind == Kind::Dir;
            if dst_is_dir && parent != new_parent && self.is_ancestor(dst, parent) {
                return Err(IndexError::Invalid);
            }
            self.index.put_entry(parent, name, Some(dst), self.delta);
            self.index
                .put_entry(new_parent, new_name, Some(src), self.delta);
            let moved = i32::from(src_is_dir) - i32::from(dst_is_dir);
            for (ino, dir_parent) in [(src, new_parent), (dst, parent)] {
                self.update(ino, |node| {
                    node.ctime = now;
                    if node.kind == Kind::Dir {
                        node.parent = dir_parent;
                    }
                })?;
            }
            if parent == new_parent {
                self.touch_dir(parent, 0, now)?;
            } else {
                self.touch_dir(parent, -moved, now)?;
                self.touch_dir(new_parent, moved, now)?;
            }
            return Ok(None);
        }
        let mut replaced = None;
        if let Some(dst) = dst {
            if mode.noreplace {
                return Err(IndexError::Exists);
            }
            if dst == src {
                // Two names of one inode: POSIX says do nothing.
                return Ok(None);
            }
            let dst_node = self.node(dst)?;
            match (src_is_dir, dst_node.kind == Kind::Dir) {
                (true, false) => return Err(IndexError::NotDir),
                (false, true) => return Err(IndexError::IsDir),
                (true, true) => {
                    if !self.index.ensure_dir(dst, self.base)?.is_empty() {
                        return Err(IndexError::NotEmpty);
                    }
                    self.index.put_node(dst, None, self.delta);
                    self.touch_dir(new_parent, -1, now)?;
                }
                (false, false) => {
                    let node = self.update(dst, |node| {
                        node.nlink = node.nlink.saturating_sub(1);
                        node.ctime = now;
                    })?;
                    replaced = Some((dst, node));
                }
            }
        }
        self.index.put_entry(parent, name, None, self.delta);
        self.index
            .put_entry(new_parent, new_name, Some(src), self.delta);
        self.update(src, |node| {
            node.ctime = now;
            if src_is_dir {
                node.parent = new_parent;
            }
        })?;
        if parent == new_parent {
            self.touch_dir(parent, 0, now)?;
        } else {
            let moved = i32::from(src_is_dir);
            self.touch_dir(parent, -moved, now)?;
            self.touch_dir(new_parent, moved, now)?;
        }
        Ok(replaced)
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsString;
    use std::fs;

    use super::*;

    struct Fixture {
        _dir: tempfile::TempDir,
        base: BaseTree,
        index: Index,
        delta: Delta,
        next: Ino,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            fs::create_dir(dir.path().join("etc")).unwrap();
            fs::write(dir.path().join("etc/passwd"), b"root").unwrap();
            let base = BaseTree::open(dir.path()).unwrap();
            let index = Index::new(base.root_node());
            Self {
                _dir: dir,
                base,
                index,
                delta: Delta::default(),
                next: 100,
            }
        }

        fn txn(&mut self) -> Txn<'_> {
            self.index.txn(&mut self.delta, &self.base)
        }

        fn mk(&mut self, parent: Ino, name: &str, kind: Kind) -> Ino {
            self.next += 1;
            let ino = self.next;
            self.txn()
                .insert(parent, OsStr::new(name), ino, Node::new(kind, 0o755, 0, 0))
                .unwrap();
            ino
        }

        fn names(&mut self, dir: Ino) -> Vec<OsString> {
            self.txn().list(dir).unwrap().keys().cloned().collect()
        }
    }

    #[test]
    fn base_directories_are_read_on_first_lookup_and_not_recorded() {
        let mut f = Fixture::new();
        let etc = f.txn().lookup(ROOT_INO, OsStr::new("etc")).unwrap();
        let passwd = f.txn().lookup(etc, OsStr::new("passwd")).unwrap();
        assert_eq!(f.txn().node(passwd).unwrap().kind, Kind::File);
        assert!(f.delta.is_empty());
        assert!(matches!(
            f.txn().lookup(etc, OsStr::new("shadow")),
            Err(IndexError::NotFound)
        ));
        let long = "x".repeat(256);
        assert!(matches!(
            f.txn().lookup(etc, OsStr::new(&long)),
            Err(IndexError::NameTooLong)
        ));
    }

    #[test]
    fn snapshots_are_o1_clones_that_later_changes_do_not_touch() {
        let mut f = Fixture::new();
        let a = f.mk(ROOT_INO, "a", Kind::File);
        let snapshot = f.index.clone();
        f.txn().unlink(ROOT_INO, OsStr::new("a")).unwrap();
        f.txn().remove(a);
        assert!(f.index.node(a).is_none());
        assert!(snapshot.node(a).is_some());
        assert_eq!(
            snapshot.loaded_dir(ROOT_INO).unwrap().get(OsStr::new("a")),
            Some(&a)
        );
        assert!(f.delta.nodes.contains(&a));
        assert!(f.delta.entries.contains(&(ROOT_INO, OsString::from("a"))));
    }

    #[test]
    fn directory_link_counts_follow_mkdir_rmdir_and_rename() {
        let mut f = Fixture::new();
        let root_links = f.txn().node(ROOT_INO).unwrap().nlink;
        let d1 = f.mk(ROOT_INO, "d1", Kind::Dir);
        let d2 = f.mk(ROOT_INO, "d2", Kind::Dir);
        assert_eq!(f.txn().node(ROOT_INO).unwrap().nlink, root_links + 2);
        let sub = f.mk(d1, "sub", Kind::Dir);
        assert_eq!(f.txn().node(d1).unwrap().nlink, 3);
        f.txn()
            .rename(
                d1,
                OsStr::new("sub"),
                d2,
                OsStr::new("sub"),
                RenameMode::default(),
            )
            .unwrap();
        assert_eq!(f.txn().node(d1).unwrap().nlink, 2);
        assert_eq!(f.txn().node(d2).unwrap().nlink, 3);
        assert_eq!(f.txn().node(sub).unwrap().parent, d2);
        // Moving a directory under itself is refused.
        assert!(matches!(
            f.txn().rename(
                ROOT_INO,
                OsStr::new("d2"),
                sub,
                OsStr::new("x"),
                RenameMode::default()
            ),
            Err(IndexError::Invalid)
        ));
        assert!(matches!(
            f.txn().rmdir(ROOT_INO, OsStr::new("d2")),
            Err(IndexError::NotEmpty)
        ));
        f.txn().rmdir(d2, OsStr::new("sub")).unwrap();
        f.txn().rmdir(ROOT_INO, OsStr::new("d2")).unwrap();
        assert_eq!(f.txn().node(ROOT_INO).unwrap().nlink, root_links + 1);
    }

    #[test]
    fn rename_replaces_exchanges_and_refuses() {
        let mut f = Fixture::new();
        let a = f.mk(ROOT_INO, "a", Kind::File);
        let b = f.mk(ROOT_INO, "b", Kind::File);
        let d = f.mk(ROOT_INO, "d", Kind::Dir);
        let noreplace = RenameMode {
            noreplace: true,
            ..Default::default()
        };
        let exchange = RenameMode {
            exchange: true,
            ..Default::default()
        };
        assert!(matches!(
            f.txn().rename(
                ROOT_INO,
                OsStr::new("a"),
                ROOT_INO,
                OsStr::new("b"),
                noreplace
            ),
            Err(IndexError::Exists)
        ));
        assert!(matches!(
            f.txn().rename(
                ROOT_INO,
                OsStr::new("a"),
                ROOT_INO,
                OsStr::new("d"),
                RenameMode::default()
            ),
            Err(IndexError::IsDir)
        ));
        f.txn()
            .rename(
                ROOT_INO,
                OsStr::new("a"),
                ROOT_INO,
                OsStr::new("d"),
                exchange,
            )
            .unwrap();
        assert_eq!(f.txn().lookup(ROOT_INO, OsStr::new("d")).unwrap(), a);
        assert_eq!(f.txn().lookup(ROOT_INO, OsStr::new("a")).unwrap(), d);
        let replaced = f
            .txn()
            .rename(
                ROOT_INO,
                OsStr::new("d"),
                ROOT_INO,
                OsStr::new("b"),
                RenameMode::default(),
            )
            .unwrap()
            .unwrap();
        assert_eq!(replaced.0, b);
        assert_eq!(replaced.1.nlink, 0);
        assert_eq!(f.names(ROOT_INO), ["a", "b", "etc"]);
    }

    #[test]
    fn hard_links_share_one_node() {
        let mut f = Fixture::new();
        let a = f.mk(ROOT_INO, "a", Kind::File);
        let node = f.txn().link(a, ROOT_INO, OsStr::new("b")).unwrap();
        assert_eq!(node.nlink, 2);
        let d = f.mk(ROOT_INO, "d", Kind::Dir);
        assert!(matches!(
            f.txn().link(d, ROOT_INO, OsStr::new("e")),
            Err(IndexError::NotPermitted)
        ));
        // Renaming one name over the other of the same inode does nothing.
        assert!(
            f.txn()
                .rename(
                    ROOT_INO,
                    OsStr::new("a"),
                    ROOT_INO,
                    OsStr::new("b"),
                    RenameMode::default()
                )
                .unwrap()
                .is_none()
        );
        assert_eq!(f.names(ROOT_INO), ["a", "b", "d", "etc"]);
        let (ino, node) = f.txn().unlink(ROOT_INO, OsStr::new("a")).unwrap();
        assert_eq!((ino, node.nlink), (a, 1));
    }
}
