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
use crate::chunks;
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
    let plan = match fs.with(|s| s.read_plan(fh.0)) {
        Ok(plan) => plan,
        Err(e) => return reply.error(e),
    };
    let file = plan.file;
    if let Some((partial, paths)) = plan.partial {
        // A chunk-granular copy: bytes it does not hold come from the files below.
        let len = match file.metadata() {
            Ok(meta) => meta.len(),
            Err(e) => return reply.error(e.errno()),
        };
        let n = len.saturating_sub(offset).min(size.into()) as usize;
        let mut buf = vec![0; n];
        return match chunks::fill(&file, Some(&partial), &|d| paths.path(d), &mut buf, offset) {
            Ok(()) => reply.data(&buf),
            Err(e) => reply.error(e.errno()),
        };
    }
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
    let end = offset.saturating_add(data.len() as u64);
    let backing = match fs.with(|s| s.prepare_write(fh.0, offset, end, true)) {
        Ok(backing) => backing,
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
    let flags = FallocateFlags::from_bits_retain(mode);
    let end = offset.saturating_add(length);
    // On a chunk-granular copy: punching or zeroing copies the chunks the range cuts
    // into; moving data (collapse, insert) completes the file first; allocating changes
    // no byte.
    let prepared = fs.with(|s| {
        if flags.intersects(
            FallocateFlags::FALLOC_FL_COLLAPSE_RANGE | FallocateFlags::FALLOC_FL_INSERT_RANGE,
        ) {
            s.complete_for(fh.0)
        } else if flags
            .intersects(FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_ZERO_RANGE)
        {
            s.prepare_write(fh.0, offset, end, true)
        } else {
            s.prepare_write(fh.0, offset, offset, true)
        }
    });
    let backing = match prepared {
        Ok(backing) => backing,
        Err(e) => return reply.error(e),
    };
    let file = backing.hold();
    match nix::fcntl::fallocate(&**file, flags, offset as i64, length as i64) {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e.errno()),
    }
}

pub(super) fn lseek(fs: &DeltaFs, fh: FileHandle, offset: i64, whence: i32, reply: ReplyLseek) {
    let plan = match fs.with(|s| s.read_plan(fh.0)) {
        Ok(plan) => plan,
        Err(e) => return reply.error(e),
    };
    let file = plan.file;
    if let Some((partial, paths)) = &plan.partial
        && matches!(whence, libc::SEEK_DATA | libc::SEEK_HOLE)
    {
        // A chunk-granular copy: held ranges answer from its backing file, the others
        // from the files below (its backing file's holes there are not the file's).
        let len = match file.metadata() {
            Ok(meta) => meta.len(),
            Err(e) => return reply.error(e.errno()),
        };
        let Ok(off) = u64::try_from(offset) else {
            return reply.error(Errno::EINVAL);
        };
        if off >= len {
            return reply.error(Errno::ENXIO);
        }
        let hole = whence == libc::SEEK_HOLE;
        return match chunks::seek(&file, Some(partial), &|d| paths.path(d), off, len, hole) {
            Ok(Some(pos)) => reply.offset(pos as i64),
            // No data after `off`; a hole at the end of the file for SEEK_HOLE.
            Ok(None) if hole => reply.offset(len as i64),
            Ok(None) => reply.error(Errno::ENXIO),
            Err(e) => reply.error(e.errno()),
        };
    }
    let whence = match whence {
        libc::SEEK_DATA => Whence::SeekData,
        libc::SEEK_HOLE => Whence::SeekHole,
        libc::SEEK_SET => Whence::SeekSet,
        libc::SEEK_END => Whence::SeekEnd,
        _ => return reply.error(Errno::EINVAL),
    };
    match sys_lseek(&*file, offset, whence) {
        Ok(pos) => reply.offset(pos),
        Err(e) => reply.error(e.errno()),
    }
}
