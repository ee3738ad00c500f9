//! Namespace and attribute operations of a view, as the FUSE adapter calls them: each
//! resolves node ids, applies the change to the index through a [`crate::index::Txn`] and
//! returns what the reply needs.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::SystemTime;

use fuser::{Errno, FileAttr, FileType, INodeNo, TimeOrNow};
use nix::sys::stat::futimens;
use nix::sys::time::TimeSpec;

use super::nodeids::Resolved;
use super::open::{OpenBacking, OpenReply};
use super::state::{DirHandle, FsResult, IntoErrno, Listing, ViewState};
use crate::ids::Ino;
use crate::index::RenameMode;
use crate::layer::Layers;
use crate::node::{Bytes, DataRef, Kind, Node, Time};

/// Who asks: owner of what they create.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Caller {
    pub uid: u32,
    /// The file-system group id.
    pub gid: u32,
    /// As the daemon sees it (0 when the kernel sent none).
    pub pid: u32,
}

/// What a `MKDIR`, `MKNOD` or `CREATE` asks for: the mode (not masked: the umask is the
/// daemon's, see [`super::acl::inherit`]), the caller's umask, and the caller.
#[derive(Clone, Copy, Debug)]
pub(crate) struct NewNode {
    pub mode: u32,
    pub umask: u32,
    pub caller: Caller,
}

/// The attribute changes of a `SETATTR`.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeOrNow>,
    pub mtime: Option<TimeOrNow>,
    pub ctime: Option<SystemTime>,
    /// Clear set-user-ID, and set-group-ID if group-executable (see [`SetAttr::kills_suidgid`]).
    pub kill_suidgid: bool,
}

impl SetAttr {
    /// Whether this `SETATTR` asks for set-user/group-ID to be cleared. With
    /// `FUSE_HANDLE_KILLPRIV_V2` the kernel leaves that to the filesystem, but fuser 0.18
    /// hides the request's `FATTR_KILL_SUIDGID`, so it is inferred from what the kernel
    /// sends it with: a chown (always, like the kernel's own chown), a `SETATTR` with no
    /// attribute at all (what `file_remove_privs` sends before a write by a caller
    /// without `CAP_FSETID`, and a `chown(f, -1, -1)`), a truncate by a non-root caller
    /// (the kernel flags it when the caller lacks `CAP_FSETID`; uid 0 stands for that).
    pub fn kills_suidgid(&self, caller_uid: u32) -> bool {
        let nothing = self.mode.is_none()
            && self.uid.is_none()
            && self.gid.is_none()
            && self.size.is_none()
            && self.atime.is_none()
            && self.mtime.is_none()
            && self.ctime.is_none();
        self.mode.is_none()
            && (self.uid.is_some()
                || self.gid.is_some()
                || nothing
                || (self.size.is_some() && caller_uid != 0))
    }
}

/// `perm` without set-user-ID, and without set-group-ID when group-executable (without
/// group execute it marks mandatory locking, which a write keeps): what the kernel clears.
pub(crate) fn killed_suidgid(perm: u16) -> u16 {
    let mut perm = u32::from(perm) & !libc::S_ISUID;
    if perm & (libc::S_ISGID | libc::S_IXGRP) == libc::S_ISGID | libc::S_IXGRP {
        perm &= !libc::S_ISGID;
    }
    perm as u16
}

fn resolve_time(t: TimeOrNow) -> Time {
    match t {
        TimeOrNow::Now => Time::now(),
        TimeOrNow::SpecificTime(t) => t.into(),
    }
}

fn timespec(t: Option<TimeOrNow>) -> TimeSpec {
    match t {
        None => TimeSpec::UTIME_OMIT,
        Some(TimeOrNow::Now) => TimeSpec::UTIME_NOW,
        Some(TimeOrNow::SpecificTime(t)) => {
            let t = Time::from(t);
            TimeSpec::new(t.sec, t.nsec.into())
        }
    }
}

impl ViewState {
    /// Records the entry for regular files (see [`super::nodeids`]) and returns `attr`.
    fn entry(&mut self, parent: INodeNo, name: &OsStr, attr: FileAttr) -> FileAttr {
        if attr.kind == FileType::RegularFile {
            self.nids
                .record_name(attr.ino.0, parent.0, &name.to_owned());
        }
        attr
    }

    /// `LOOKUP`.
    pub fn lookup(&mut self, parent: INodeNo, name: &OsStr) -> FsResult<FileAttr> {
        let dir = self.live(parent)?;
        let ino = self.txn().lookup(dir, name).map_err(IntoErrno::errno)?;
        let attr = self.attr_of_ino(ino)?;
        Ok(self.entry(parent, name, attr))
    }

    /// A new node of `kind` made in directory `parent` (setgid directories give their
    /// group, and their setgid bit to subdirectories; the directory's default ACL, or
    /// else the umask, limits the mode).
    fn new_node(&self, parent: Ino, kind: Kind, new: NewNode) -> FsResult<Node> {
        let dir = self.node(parent)?;
        let (uid, gid) = (new.caller.uid, new.caller.gid);
        let mut node = Node::new(kind, (new.mode & 0o7777) as u16, uid, gid);
        if u32::from(dir.perm) & libc::S_ISGID != 0 {
            node.gid = dir.gid;
            if kind == Kind::Dir {
                node.perm |= libc::S_ISGID as u16;
            }
        }
        super::acl::inherit(&dir, &mut node, new.umask);
        Ok(node)
    }

    /// Inserts `node` as `parent/name` under a fresh inode number; returns its attributes.
    fn insert(&mut self, parent: INodeNo, name: &OsStr, node: Node) -> FsResult<(Ino, FileAttr)> {
        let dir = self.live(parent)?;
        let ino = self.alloc_ino();
        let data = node.data.clone();
        if let Err(e) = self.txn().insert(dir, name, ino, node) {
            if let Some(data) = data {
                let _ = fs::remove_file(self.data_path(&data));
            }
            return Err(e.errno());
        }
        let attr = self.attr_of_ino(ino)?;
        Ok((ino, self.entry(parent, name, attr)))
    }

    /// A new empty backing file in the writable layer, open read-write.
    fn new_backing(&mut self) -> FsResult<(DataRef, File)> {
        let file = self.alloc_file();
        let opened = self
            .store
            .layers
            .create(self.writable, file)
            .map_err(IntoErrno::errno)?;
        let data = DataRef::Layer {
            layer: self.writable,
            file,
        };
        Ok((data, opened))
    }

    /// `MKDIR`.
    pub fn mkdir(&mut self, parent: INodeNo, name: &OsStr, new: NewNode) -> FsResult<FileAttr> {
        let dir = self.live(parent)?;
        let node = self.new_node(dir, Kind::Dir, new)?;
        Ok(self.insert(parent, name, node)?.1)
    }

    /// `MKNOD`: FIFOs, sockets, device nodes and regular files.
    pub fn mknod(
        &mut self,
        parent: INodeNo,
        name: &OsStr,
        new: NewNode,
        rdev: u32,
    ) -> FsResult<FileAttr> {
        let kind = Kind::from_mode(new.mode).ok_or(Errno::EINVAL)?;
        if kind == Kind::Dir {
            return Err(Errno::EINVAL);
        }
        let dir = self.live(parent)?;
        let mut node = self.new_node(dir, kind, new)?;
        node.rdev = rdev.into();
        if kind == Kind::File {
            self.txn().lookup(dir, name).err().ok_or(Errno::EEXIST)?;
            node.data = Some(self.new_backing()?.0);
        }
        Ok(self.insert(parent, name, node)?.1)
    }

    /// `SYMLINK`.
    pub fn symlink(
        &mut self,
        parent: INodeNo,
        name: &OsStr,
        target: &OsStr,
        caller: Caller,
    ) -> FsResult<FileAttr> {
        if target.len() >= libc::PATH_MAX as usize {
            return Err(Errno::ENAMETOOLONG);
        }
        let dir = self.live(parent)?;
        // No ACL or umask applies to a symlink: its node is made here, not by `new_node`.
        let mut node = Node::new(Kind::Symlink, 0o777, caller.uid, caller.gid);
        let parent_node = self.node(dir)?;
        if u32::from(parent_node.perm) & libc::S_ISGID != 0 {
            node.gid = parent_node.gid;
        }
        node.size = target.len() as u64;
        node.target = Some(Bytes(target.as_bytes().to_vec()));
        Ok(self.insert(parent, name, node)?.1)
    }

    /// `READLINK`.
    pub fn readlink(&mut self, nid: INodeNo) -> FsResult<Vec<u8>> {
        let ino = self.live(nid)?;
        let node = self.node(ino)?;
        node.target
            .as_ref()
            .map(|t| t.0.clone())
            .ok_or(Errno::EINVAL)
    }

    /// `LINK`.
    pub fn link(&mut self, nid: INodeNo, parent: INodeNo, name: &OsStr) -> FsResult<FileAttr> {
        let ino = self.live(nid)?;
        let dir = self.live(parent)?;
        self.txn().link(ino, dir, name).map_err(IntoErrno::errno)?;
        let attr = self.attr_of_ino(ino)?;
        Ok(self.entry(parent, name, attr))
    }

    /// `UNLINK`.
    pub fn unlink(&mut self, parent: INodeNo, name: &OsStr) -> FsResult<()> {
        let dir = self.live(parent)?;
        let (ino, _) = self.txn().unlink(dir, name).map_err(IntoErrno::errno)?;
        self.reap(ino);
        Ok(())
    }

    /// `RMDIR`.
    pub fn rmdir(&mut self, parent: INodeNo, name: &OsStr) -> FsResult<()> {
        let dir = self.live(parent)?;
        self.txn().rmdir(dir, name).map_err(IntoErrno::errno)?;
        Ok(())
    }

    /// `RENAME` (`renameat2` flags `RENAME_NOREPLACE`, `RENAME_EXCHANGE`).
    pub fn rename(
        &mut self,
        parent: INodeNo,
        name: &OsStr,
        new_parent: INodeNo,
        new_name: &OsStr,
        flags: u32,
    ) -> FsResult<()> {
        if flags & !(libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE) != 0 {
            return Err(Errno::EINVAL);
        }
        let mode = RenameMode {
            noreplace: flags & libc::RENAME_NOREPLACE != 0,
            exchange: flags & libc::RENAME_EXCHANGE != 0,
        };
        let (dir, new_dir) = (self.live(parent)?, self.live(new_parent)?);
        let moved = self.txn().lookup(dir, name).map_err(IntoErrno::errno)?;
        // An exchange moves the other file too: the kernel's dentry of the old name now
        // names it (without this, a switch that retired it left `stat` of that name
        // answering from the retired state: the old size, the old `st_ino`).
        let exchanged = if mode.exchange {
            self.txn().lookup(new_dir, new_name).ok()
        } else {
            None
        };
        let replaced = self
            .txn()
            .rename(dir, name, new_dir, new_name, mode)
            .map_err(IntoErrno::errno)?;
        for (ino, dir_nid, entry) in [
            (Some(moved), new_parent, new_name),
            (exchanged, parent, name),
        ] {
            if let Some(ino) = ino
                && self.node(ino)?.kind == Kind::File
            {
                let nid = self.nids.nid(ino);
                self.nids.record_name(nid, dir_nid.0, &entry.to_owned());
            }
        }
        if let Some((ino, _)) = replaced {
            self.reap(ino);
        }
        Ok(())
    }

    /// `CREATE`: a new regular file, opened (always passthrough: nothing else has it open).
    pub fn create(
        &mut self,
        parent: INodeNo,
        name: &OsStr,
        new: NewNode,
        flags: i32,
        open_backing: OpenBacking<'_>,
    ) -> FsResult<(FileAttr, OpenReply)> {
        let dir = self.live(parent)?;
        match self.txn().lookup(dir, name) {
            Ok(_) => return Err(Errno::EEXIST),
            Err(crate::index::IndexError::NotFound) => {}
            Err(e) => return Err(e.errno()),
        }
        let mut node = self.new_node(dir, Kind::File, new)?;
        let (data, file) = self.new_backing()?;
        node.data = Some(data);
        let (ino, attr) = self.insert(parent, name, node)?;
        let write = flags & libc::O_ACCMODE != libc::O_RDONLY;
        let reply = self.attach(attr.ino.0, ino, write, false, Some(file), open_backing)?;
        Ok((attr, reply))
    }

    /// `SETATTR`: mode, owner, size, times.
    pub fn setattr(&mut self, nid: INodeNo, set: SetAttr) -> FsResult<FileAttr> {
        if matches!(self.nids.resolve(nid.0), Resolved::Retired) {
            return self.setattr_retired(nid, set);
        }
        let ino = self.live(nid)?;
        if let Some(size) = set.size {
            match self.node(ino)?.kind {
                Kind::File => self.truncate(ino, size)?,
                Kind::Dir => return Err(Errno::EISDIR),
                _ => return Err(Errno::EINVAL),
            }
        }
        let node = self.node(ino)?;
        let writable_file = node.kind == Kind::File && self.is_writable(&node);
        if writable_file && (set.atime.is_some() || set.mtime.is_some()) {
            let file = match self.opens.get(&ino) {
                Some(entry) => entry.backing.file(),
                None => {
                    let data = node.data.as_ref().ok_or(Errno::EIO)?;
                    Arc::new(
                        Layers::open_file(&self.data_path(data), true).map_err(IntoErrno::errno)?,
                    )
                }
            };
            futimens(&*file, &timespec(set.atime), &timespec(set.mtime))
                .map_err(IntoErrno::errno)?;
        }
        let now = Time::now();
        self.txn()
            .update(ino, |node| {
                if let Some(mode) = set.mode {
                    node.perm = (mode & 0o7777) as u16;
                    super::acl::chmod(node);
                }
                if set.kill_suidgid && node.kind != Kind::Dir {
                    node.perm = killed_suidgid(node.perm);
                }
                if let Some(uid) = set.uid {
                    node.uid = uid;
                }
                if let Some(gid) = set.gid {
                    node.gid = gid;
                }
                if let Some(atime) = set.atime {
                    node.atime = resolve_time(atime);
                }
                if let Some(mtime) = set.mtime
                    && !writable_file
                {
                    node.mtime = resolve_time(mtime);
                    node.mtime_from_data = false;
                }
                node.ctime = set.ctime.map(Time::from).unwrap_or(now);
            })
            .map_err(IntoErrno::errno)?;
        self.attr_of(nid)
    }

    /// `SETATTR` through a handle opened before a switch (`ftruncate`, `fchmod`, …): it
    /// changes the state that handle lives in, which nothing else shows. A handle that
    /// can truncate was opened for writing, so its backing file is the abandoned writable
    /// layer's, never a frozen one.
    fn setattr_retired(&mut self, nid: INodeNo, set: SetAttr) -> FsResult<FileAttr> {
        let retired = self.nids.retired.get_mut(&nid.0).ok_or(Errno::ESTALE)?;
        let file = retired.open.as_ref().map(|entry| entry.backing.file());
        let mut node = Node::clone(&retired.node);
        if let Some(size) = set.size {
            let file = file.as_ref().ok_or(Errno::ESTALE)?;
            if let Some(partial) = super::partial::cut(node.partial.as_ref(), file, size)? {
                node.partial = partial;
            }
            file.set_len(size).map_err(IntoErrno::errno)?;
        }
        if let Some(mode) = set.mode {
            node.perm = (mode & 0o7777) as u16;
            super::acl::chmod(&mut node);
        }
        if set.kill_suidgid && node.kind != Kind::Dir {
            node.perm = killed_suidgid(node.perm);
        }
        if let Some(uid) = set.uid {
            node.uid = uid;
        }
        if let Some(gid) = set.gid {
            node.gid = gid;
        }
        if let Some(atime) = set.atime {
            node.atime = resolve_time(atime);
        }
        if let Some(mtime) = set.mtime {
            node.mtime = resolve_time(mtime);
            node.mtime_from_data = false;
        }
        node.ctime = set.ctime.map(Time::from).unwrap_or_else(Time::now);
        retired.node = Arc::new(node);
        self.attr_of(nid)
    }

    /// `OPENDIR`.
    pub fn opendir(&mut self, nid: INodeNo) -> FsResult<u64> {
        let ino = self.live(nid)?;
        if self.node(ino)?.kind != Kind::Dir {
            return Err(Errno::ENOTDIR);
        }
        let fh = self.alloc_fh();
        self.dir_handles
            .insert(fh, DirHandle { ino, entries: None });
        Ok(fh)
    }

    /// The entries of directory handle `fh`, as they were at its first read, and the
    /// directory's inode and parent.
    pub fn dir_entries(&mut self, fh: u64) -> FsResult<(Ino, Ino, Listing)> {
        let handle = self.dir_handles.get(&fh).ok_or(Errno::EBADF)?;
        let ino = handle.ino;
        let entries = match &handle.entries {
            Some(entries) => Arc::clone(entries),
            None => {
                let listing = self.txn().list(ino).map_err(IntoErrno::errno)?;
                let entries: Arc<Vec<_>> = Arc::new(
                    listing
                        .iter()
                        .map(|(name, ino)| (name.clone(), *ino))
                        .collect(),
                );
                if let Some(handle) = self.dir_handles.get_mut(&fh) {
                    handle.entries = Some(Arc::clone(&entries));
                }
                entries
            }
        };
        let parent = self
            .index
            .node(ino)
            .map(|n| n.parent)
            .filter(|p| *p != 0)
            .unwrap_or(ino);
        Ok((ino, parent, entries))
    }

    /// The node whose xattrs node id `nid` shows: a retired id's own (the kernel asks for
    /// `security.capability` and ACLs through handles opened before a switch too).
    fn xattr_node(&mut self, nid: INodeNo) -> FsResult<Arc<Node>> {
        if matches!(self.nids.resolve(nid.0), Resolved::Retired) {
            let retired = self.nids.retired.get(&nid.0).ok_or(Errno::ESTALE)?;
            return Ok(Arc::clone(&retired.node));
        }
        let ino = self.live(nid)?;
        self.node(ino)
    }

    /// `GETXATTR`.
    pub fn getxattr(&mut self, nid: INodeNo, name: &OsStr) -> FsResult<Vec<u8>> {
        let node = self.xattr_node(nid)?;
        node.xattrs
            .get(&Bytes(name.as_bytes().to_vec()))
            .map(|v| v.0.clone())
            .ok_or(Errno::NO_XATTR)
    }

    /// `LISTXATTR`: the names, each NUL-terminated.
    pub fn listxattr(&mut self, nid: INodeNo) -> FsResult<Vec<u8>> {
        let node = self.xattr_node(nid)?;
        let mut list = Vec::new();
        for name in node.xattrs.keys() {
            list.extend_from_slice(&name.0);
            list.push(0);
        }
        Ok(list)
    }

    /// `SETXATTR` with `XATTR_CREATE` / `XATTR_REPLACE`; POSIX ACLs (`system.posix_acl_*`)
    /// as ext4 keeps them, other `system.*` names are not supported.
    pub fn setxattr(
        &mut self,
        nid: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        caller: Caller,
    ) -> FsResult<()> {
        let ino = self.live(nid)?;
        if super::acl::is_acl(name.as_bytes()) {
            return self.set_acl(ino, name.as_bytes(), value, caller);
        }
        if name.as_bytes().starts_with(b"system.") {
            return Err(Errno::EOPNOTSUPP);
        }
        let key = Bytes(name.as_bytes().to_vec());
        let exists = self.node(ino)?.xattrs.contains_key(&key);
        if flags & libc::XATTR_CREATE != 0 && exists {
            return Err(Errno::EEXIST);
        }
        if flags & libc::XATTR_REPLACE != 0 && !exists {
            return Err(Errno::NO_XATTR);
        }
        let now = Time::now();
        self.txn()
            .update(ino, |node| {
                node.xattrs.insert(key, Bytes(value.to_vec()));
                node.ctime = now;
            })
            .map_err(IntoErrno::errno)?;
        Ok(())
    }

    /// `REMOVEXATTR`.
    pub fn removexattr(&mut self, nid: INodeNo, name: &OsStr) -> FsResult<()> {
        let ino = self.live(nid)?;
        let key = Bytes(name.as_bytes().to_vec());
        if !self.node(ino)?.xattrs.contains_key(&key) {
            // Removing an ACL that is not there succeeds, as on ext4.
            return match super::acl::is_acl(name.as_bytes()) {
                true => Ok(()),
                false => Err(Errno::NO_XATTR),
            };
        }
        let now = Time::now();
        self.txn()
            .update(ino, |node| {
                node.xattrs.remove(&key);
                node.ctime = now;
            })
            .map_err(IntoErrno::errno)?;
        Ok(())
    }
}
