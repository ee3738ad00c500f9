//! The FUSE adapter: fuser's `Filesystem` over a view. Each method locks the view's
//! state for the metadata work and answers; data I/O of daemon-served handles runs
//! outside the lock on the handle's backing file.

mod data;
mod init;

use std::ffi::OsStr;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BsdFileFlags, Errno, FileAttr, FileHandle, Filesystem, FopenFlags, Generation,
    INodeNo, KernelConfig, OpenFlags, RenameFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
    TimeOrNow,
};

use crate::stats::OpKind;
use crate::sync::lock;
use crate::view::state::{FsResult, TTL, ViewState, file_type};
use crate::view::{Caller, NewNode, SetAttr, ViewShared};

/// The FUSE filesystem of one view.
pub(crate) struct DeltaFs {
    view: Arc<ViewShared>,
}

impl DeltaFs {
    pub(crate) fn new(view: Arc<ViewShared>) -> Self {
        Self { view }
    }

    fn with<T>(&self, f: impl FnOnce(&mut ViewState) -> T) -> T {
        f(&mut lock(&self.view.state))
    }

    /// Runs `f` for an entry's attributes and adds how long the kernel may cache them.
    fn entry(&self, f: impl FnOnce(&mut ViewState) -> FsResult<FileAttr>) -> FsResult<Entry> {
        self.with(|s| f(s).map(|attr| (attr, s.attr_ttl(&attr))))
    }

    /// Tells the kernel to drop its copy of node `nid`'s attributes (not its pages).
    fn inval_attrs(&self, nid: u64) {
        if let Some(notifier) = self.view.notifier.get() {
            // ENOENT: the kernel holds nothing for it.
            let _ = notifier.inval_inode(INodeNo(nid), -1, 0);
        }
    }
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
        pid: req.pid(),
    }
}

/// What a `MKDIR`, `MKNOD` or `CREATE` asks for.
fn new_node(mode: u32, umask: u32, req: &Request) -> NewNode {
    NewNode {
        mode,
        umask,
        caller: caller(req),
    }
}

/// An entry's attributes and how long the kernel may cache them.
type Entry = (FileAttr, Duration);

fn reply_entry(reply: ReplyEntry, result: FsResult<Entry>) {
    match result {
        Ok((attr, attr_ttl)) => reply.entry_with_ttls(&attr_ttl, &TTL, &attr, Generation(0)),
        Err(e) => reply.error(e),
    }
}

/// A negative entry: node id 0 tells the kernel to cache the name as missing for the
/// entry TTL, so the next lookup of it costs no round trip. Creating the name through
/// the mount replaces the negative dentry; a switch that adds it invalidates the entry.
fn reply_negative(reply: ReplyEntry) {
    let attr = FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: fuser::FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 0,
        flags: 0,
    };
    reply.entry_with_ttls(&Duration::ZERO, &TTL, &attr, Generation(0));
}

fn reply_empty(reply: ReplyEmpty, result: FsResult<()>) {
    match result {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

/// Answers an xattr read: the size when `size` is 0, else the data if it fits.
fn reply_xattr(reply: ReplyXattr, size: u32, result: FsResult<Vec<u8>>) {
    match result {
        Ok(data) if size == 0 => reply.size(data.len() as u32),
        Ok(data) if data.len() > size as usize => reply.error(Errno::ERANGE),
        Ok(data) => reply.data(&data),
        Err(e) => reply.error(e),
    }
}

impl Filesystem for DeltaFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        init::negotiate(config)
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _op = self.view.store.stats.op(OpKind::Lookup);
        match self.entry(|s| s.lookup(parent, name)) {
            Err(Errno::ENOENT) => reply_negative(reply),
            result => reply_entry(reply, result),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, _nlookup: u64) {
        self.with(|s| {
            s.nids.forget(ino.0);
            // The kernel's inode, and its page cache, are gone.
            s.stale_cache.remove(&ino.0);
        });
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let _op = self.view.store.stats.op(OpKind::Getattr);
        match self.entry(|s| s.attr_of(ino)) {
            Ok((attr, ttl)) => reply.attr(&ttl, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let _op = self.view.store.stats.op(OpKind::Setattr);
        let mut set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
            ctime,
            kill_suidgid: false,
        };
        set.kill_suidgid = set.kills_suidgid(req.uid());
        match self.entry(|s| s.setattr(ino, set)) {
            Ok((attr, ttl)) => reply.attr(&ttl, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let _op = self.view.store.stats.op(OpKind::Other);
        match self.with(|s| s.readlink(ino)) {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let _op = self.view.store.stats.op(OpKind::Create);
        let new = new_node(mode, umask, req);
        reply_entry(reply, self.entry(|s| s.mknod(parent, name, new, rdev)));
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let _op = self.view.store.stats.op(OpKind::Create);
        let new = new_node(mode, umask, req);
        reply_entry(reply, self.entry(|s| s.mkdir(parent, name, new)));
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _op = self.view.store.stats.op(OpKind::Unlink);
        reply_empty(reply, self.with(|s| s.unlink(parent, name)));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _op = self.view.store.stats.op(OpKind::Unlink);
        reply_empty(reply, self.with(|s| s.rmdir(parent, name)));
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let _op = self.view.store.stats.op(OpKind::Create);
        let target = target.as_os_str();
        reply_entry(
            reply,
            self.entry(|s| s.symlink(parent, link_name, target, caller(req))),
        );
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let _op = self.view.store.stats.op(OpKind::Rename);
        let result = self.with(|s| s.rename(parent, name, newparent, newname, flags.bits()));
        reply_empty(reply, result);
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let _op = self.view.store.stats.op(OpKind::Create);
        reply_entry(reply, self.entry(|s| s.link(ino, newparent, newname)));
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let _op = self.view.store.stats.op(OpKind::Open);
        let open_backing = |file: &std::fs::File| reply.open_backing(file);
        let (result, stale) = self.with(|s| {
            let result = s.open(ino, flags.0, &open_backing);
            (result, std::mem::take(&mut s.inval_attrs))
        });
        for nid in stale {
            self.inval_attrs(nid);
        }
        data::reply_open(reply, result);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let _op = self.view.store.stats.op(OpKind::Open);
        match self.with(|s| s.opendir(ino)) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let _op = self.view.store.stats.op(OpKind::Readdir);
        let mut state = lock(&self.view.state);
        let (dir, parent, entries) = match state.dir_entries(fh.0) {
            Ok(found) => found,
            Err(e) => return reply.error(e),
        };
        let dots = [(OsStr::new("."), dir), (OsStr::new(".."), parent)];
        let all = dots
            .into_iter()
            .chain(entries.iter().map(|(name, ino)| (name.as_os_str(), *ino)));
        for (i, (name, ino)) in all.enumerate().skip(offset as usize) {
            let Some(node) = state.index.node(ino) else {
                continue;
            };
            let nid = state.nids.nid(ino);
            if reply.add(INodeNo(nid), i as u64 + 1, file_type(node.kind), name) {
                break;
            }
        }
        drop(state);
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let _op = self.view.store.stats.op(OpKind::Readdir);
        let mut state = lock(&self.view.state);
        let (dir, parent, entries) = match state.dir_entries(fh.0) {
            Ok(found) => found,
            Err(e) => return reply.error(e),
        };
        let dir_nid = state.nids.nid(dir);
        let dots = [(OsStr::new("."), dir), (OsStr::new(".."), parent)];
        let all = dots
            .into_iter()
            .chain(entries.iter().map(|(name, ino)| (name.as_os_str(), *ino)));
        for (i, (name, ino)) in all.enumerate().skip(offset as usize) {
            let Ok(attr) = state.attr_of_ino(ino) else {
                continue;
            };
            let ttl = state.attr_ttl(&attr);
            if reply.add(attr.ino, i as u64 + 1, name, &ttl, &attr, Generation(0)) {
                break;
            }
            if i >= 2 && attr.kind == fuser::FileType::RegularFile {
                state
                    .nids
                    .record_name(attr.ino.0, dir_nid, &name.to_owned());
            }
        }
        drop(state);
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        let _op = self.view.store.stats.op(OpKind::Other);
        self.with(|s| s.dir_handles.remove(&fh.0));
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _op = self.view.store.stats.op(OpKind::Fsync);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let _op = self.view.store.stats.op(OpKind::Other);
        match nix::sys::statvfs::statvfs(&self.view.store.root) {
            Ok(st) => reply.statfs(
                st.blocks(),
                st.blocks_free(),
                st.blocks_available(),
                st.files(),
                st.files_free(),
                st.block_size() as u32,
                crate::index::NAME_MAX as u32,
                st.fragment_size() as u32,
            ),
            Err(e) => reply.error(Errno::from_i32(e as i32)),
        }
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let _op = self.view.store.stats.op(OpKind::Other);
        let result = self.with(|s| s.setxattr(ino, name, value, flags, caller(req)));
        reply_empty(reply, result);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let _op = self.view.store.stats.op(OpKind::Other);
        reply_xattr(reply, size, self.with(|s| s.getxattr(ino, name)));
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let _op = self.view.store.stats.op(OpKind::Other);
        reply_xattr(reply, size, self.with(|s| s.listxattr(ino)));
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _op = self.view.store.stats.op(OpKind::Other);
        reply_empty(reply, self.with(|s| s.removexattr(ino, name)));
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        let _op = self.view.store.stats.op(OpKind::Getattr);
        // `default_permissions`: the kernel checks modes itself; only existence is ours.
        reply_empty(reply, self.with(|s| s.attr_of(ino).map(drop)));
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: fuser::ReplyCreate,
    ) {
        let _op = self.view.store.stats.op(OpKind::Create);
        let open_backing = |file: &std::fs::File| reply.open_backing(file);
        let new = new_node(mode, umask, req);
        let result = self.with(|s| {
            let (attr, opened) = s.create(parent, name, new, flags, &open_backing)?;
            Ok((attr, s.attr_ttl(&attr), opened))
        });
        data::reply_create(reply, result);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        let _op = self.view.store.stats.op(OpKind::Read);
        data::read(self, fh, offset, size, reply);
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: fuser::WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: fuser::ReplyWrite,
    ) {
        let _op = self.view.store.stats.op(OpKind::Write);
        let kill = write_flags.contains(fuser::WriteFlags::FUSE_WRITE_KILL_SUIDGID);
        data::write(self, fh, offset, data, kill, reply);
    }

    /// Answered `ENOSYS` once, so the kernel stops sending `FLUSH` (a round trip per
    /// close): there is no writeback cache to flush, and locks are the kernel's own.
    /// No ioctl is implemented: answer as ext4 does for one it does not know (`isatty`'s
    /// `TCGETS` on every file Python opens lands here), without fuser's log line each.
    #[allow(clippy::too_many_arguments)] // fuser's signature
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        let _op = self.view.store.stats.op(OpKind::Other);
        reply.error(Errno::ENOTTY);
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: fuser::LockOwner,
        reply: ReplyEmpty,
    ) {
        let _op = self.view.store.stats.op(OpKind::Other);
        reply.error(Errno::ENOSYS);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let _op = self.view.store.stats.op(OpKind::Other);
        self.with(|s| s.release(fh.0));
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _op = self.view.store.stats.op(OpKind::Fsync);
        data::fsync(self, fh, datasync, reply);
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let _op = self.view.store.stats.op(OpKind::Other);
        data::fallocate(self, fh, offset, length, mode, reply);
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: fuser::ReplyLseek,
    ) {
        let _op = self.view.store.stats.op(OpKind::Other);
        data::lseek(self, fh, offset, whence, reply);
    }
}
