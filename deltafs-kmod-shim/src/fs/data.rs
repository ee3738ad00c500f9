//! Data operations of daemon-served handles (passthrough handles never reach these,
//! except `fsync`, `fallocate` and `lseek`, which the kernel still sends).

use std::os::unix::fs::FileExt;

use fuser::{
    Errno, FileHandle, FopenFlags, Generation, ReplyCreate, ReplyData, ReplyEmpty, ReplyLseek,
    ReplyOpen, ReplyWrite,
};
use nix::fcntl::FallocateFlags;
use nix::unistd::{Whence, lseek as sys_lseek};

use super::DeltaFs;
use crate::view::open::OpenReply;
use crate::view::state::{FsResult, IntoErrno};

pub(super) fn reply_open(reply: ReplyOpen, result: FsResult<OpenReply>) {
    match result {
        Ok(OpenReply::Passthrough { fh, id }) => {
            reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &id)
        }
        Ok(OpenReply::Daemon { fh, keep_cache }) => {
            let flags = if keep_cache {
                FopenFlags::FOPEN_KEEP_CACHE
            } else {
                FopenFlags::empty()
            };
            reply.opened(FileHandle(fh), flags)
        }
        Err(e) => reply.error(e),
    }
}

/// A created file's attributes, how long the kernel may cache them, and its open.
pub(super) type Created = (fuser::FileAttr, std::time::Duration, OpenReply);

pub(super) fn reply_create(reply: ReplyCreate, result: FsResult<Created>) {
    match result {
        Ok((attr, ttl, OpenReply::Passthrough { fh, id })) => reply.created_passthrough(
            &ttl,
            &attr,
            Generation(0),
            FileHandle(fh),
            FopenFlags::empty(),
            &id,
        ),
        Ok((attr, ttl, OpenReply::Daemon { fh, .. })) => reply.created(
            &ttl,
            &attr,
            Generation(0),
            FileHandle(fh),
            FopenFlags::empty(),
        ),
        Err(e) => reply.error(e),
    }
}

pub(super) fn read(fs: &DeltaFs, fh: FileHandle, offset: u64, size: u32, reply: ReplyData) {
    let backing = match fs.with(|s| s.handle(fh.0)) {
        Ok((backing, _)) => backing,
        Err(e) => return reply.error(e),
    };
    let file = backing.file();
    let mut buf = vec![0; size as usize];
    let mut filled = 0;
    while filled < buf.len() {
        match file.read_at(&mut buf[filled..], offset + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return reply.error(e.errno()),
        }
    }
    reply.data(&buf[..filled]);
}

pub(super) fn write(
    fs: &DeltaFs,
    fh: FileHandle,
    offset: u64,
    data: &[u8],
    kill_suidgid: bool,
    reply: ReplyWrite,
) {
    if kill_suidgid && let Some(nid) = fs.with(|s| s.kill_suidgid_for_write(fh.0)) {
        fs.inval_attrs(nid);
    }
    let backing = match fs.with(|s| s.handle(fh.0)) {
        Ok((backing, true)) => backing,
        Ok((_, false)) => return reply.error(Errno::EBADF),
        Err(e) => return reply.error(e),
    };
    // Held so that a copy-up or a freeze clone does not run mid-write.
    let file = backing.hold();
    match file.write_all_at(data, offset) {
        Ok(()) => reply.written(data.len() as u32),
        Err(e) => reply.error(e.errno()),
    }
}

pub(super) fn fsync(fs: &DeltaFs, fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
    let backing = match fs.with(|s| s.handle(fh.0)) {
        Ok((backing, _)) => backing,
        Err(e) => return reply.error(e),
    };
    let file = backing.file();
    let result = if datasync {
        file.sync_data()
    } else {
        file.sync_all()
    };
    match result {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e.errno()),
    }
}

pub(super) fn fallocate(
    fs: &DeltaFs,
    fh: FileHandle,
    offset: u64,
    length: u64,
    mode: i32,
    reply: ReplyEmpty,
) {
    let backing = match fs.with(|s| s.handle(fh.0)) {
        Ok((backing, true)) => backing,
        Ok((_, false)) => return reply.error(Errno::EBADF),
        Err(e) => return reply.error(e),
    };
    let file = backing.hold();
    match nix::fcntl::fallocate(
        &**file,
        FallocateFlags::from_bits_retain(mode),
        offset as i64,
        length as i64,
    ) {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e.errno()),
    }
}

pub(super) fn lseek(fs: &DeltaFs, fh: FileHandle, offset: i64, whence: i32, reply: ReplyLseek) {
    let backing = match fs.with(|s| s.handle(fh.0)) {
        Ok((backing, _)) => backing,
        Err(e) => return reply.error(e),
    };
    let whence = match whence {
        libc::SEEK_DATA => Whence::SeekData,
        libc::SEEK_HOLE => Whence::SeekHole,
        libc::SEEK_SET => Whence::SeekSet,
        libc::SEEK_END => Whence::SeekEnd,
        _ => return reply.error(Errno::EINVAL),
    };
    let file = backing.file();
    match sys_lseek(&*file, offset, whence) {
        Ok(pos) => reply.offset(pos),
        Err(e) => reply.error(e.errno()),
    }
}
