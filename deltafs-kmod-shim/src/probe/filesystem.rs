//! The probe's filesystem: a root directory holding one read-only file whose opens are
//! passthrough to a backing file, and the observations it shares with the probe.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyEmpty, ReplyEntry,
    ReplyOpen, Request,
};
use nix::unistd::{getegid, geteuid};

use super::ProbeError;

/// Name of the probe's only file, in the mount's root.
pub(super) const FILE_NAME: &str = "probe.bin";
/// FUSE node id of that file (1 is the root).
const FILE_INO: INodeNo = INodeNo(2);
const TTL: Duration = Duration::from_secs(1);

/// What the daemon side saw, shared between the filesystem (on fuser's thread) and the probe.
#[derive(Debug, Default)]
pub(super) struct Observed {
    pub(super) kernel_abi: Mutex<Option<String>>,
    pub(super) init_failure: Mutex<Option<ProbeError>>,
    pub(super) open_backing_error: Mutex<Option<io::Error>>,
    pub(super) opens: AtomicU64,
    pub(super) reads: AtomicU64,
}

impl Observed {
    pub(super) fn kernel_abi(&self) -> String {
        lock(&self.kernel_abi)
            .clone()
            .unwrap_or_else(|| "unknown".to_owned())
    }

    pub(super) fn take_init_failure(&self) -> Option<ProbeError> {
        lock(&self.init_failure).take()
    }

    pub(super) fn take_open_backing_error(&self) -> Option<io::Error> {
        lock(&self.open_backing_error).take()
    }
}

/// Locks a mutex, ignoring poisoning: the data are plain observations, valid at any point.
pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The probe filesystem: a root directory holding one read-only file whose opens are
/// passthrough to `backing`.
pub(super) struct ProbeFs {
    backing: File,
    root_attr: FileAttr,
    file_attr: FileAttr,
    /// One backing id per inode, created on the first open and reused for every later one
    /// (the kernel wants every open of an inode to pass through to the same backing file).
    backing_id: Mutex<Option<Arc<BackingId>>>,
    next_fh: AtomicU64,
    observed: Arc<Observed>,
}

impl ProbeFs {
    pub(super) fn new(backing: File, size: u64, observed: Arc<Observed>) -> Self {
        let attr = |ino, kind, size, perm, nlink| FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind,
            perm,
            nlink,
            uid: geteuid().as_raw(),
            gid: getegid().as_raw(),
            rdev: 0,
            blksize: 4096,
            flags: 0,
        };
        Self {
            backing,
            root_attr: attr(INodeNo::ROOT, FileType::Directory, 0, 0o555, 2),
            file_attr: attr(FILE_INO, FileType::RegularFile, size, 0o444, 1),
            backing_id: Mutex::new(None),
            next_fh: AtomicU64::new(1),
            observed,
        }
    }

    fn backing_id(&self, reply: &ReplyOpen) -> io::Result<Arc<BackingId>> {
        let mut slot = lock(&self.backing_id);
        if let Some(id) = slot.as_ref() {
            return Ok(Arc::clone(id));
        }
        let id = Arc::new(reply.open_backing(&self.backing)?);
        *slot = Some(Arc::clone(&id));
        Ok(id)
    }
}

impl Filesystem for ProbeFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let kernel_abi = config.kernel_abi().to_string();
        *lock(&self.observed.kernel_abi) = Some(kernel_abi.clone());
        let failure = if config
            .add_capabilities(InitFlags::FUSE_PASSTHROUGH)
            .is_err()
        {
            Some(ProbeError::NotOffered { kernel_abi })
        } else if let Err(max) = config.set_max_stack_depth(1) {
            Some(ProbeError::StackDepth { max })
        } else {
            None
        };
        match failure {
            None => Ok(()),
            Some(failure) => {
                let message = failure.to_string();
                *lock(&self.observed.init_failure) = Some(failure);
                Err(io::Error::new(io::ErrorKind::Unsupported, message))
            }
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent == INodeNo::ROOT && name == FILE_NAME {
            reply.entry(&TTL, &self.file_attr, Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match ino {
            INodeNo::ROOT => reply.attr(&TTL, &self.root_attr),
            FILE_INO => reply.attr(&TTL, &self.file_attr),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino != FILE_INO {
            reply.error(Errno::ENOENT);
            return;
        }
        match self.backing_id(&reply) {
            Ok(id) => {
                self.observed.opens.fetch_add(1, Ordering::Relaxed);
                let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
                reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &id);
            }
            Err(e) => {
                let errno = Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO));
                *lock(&self.observed.open_backing_error) = Some(e);
                reply.error(errno);
            }
        }
    }

    /// Serves the data correctly, so that a failed passthrough shows as "the daemon was
    /// asked" rather than as a content mismatch.
    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.observed.reads.fetch_add(1, Ordering::Relaxed);
        let mut buf = vec![0; size as usize];
        match self.backing.read_at(&mut buf, offset) {
            Ok(n) => reply.data(&buf[..n]),
            Err(e) => reply.error(Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }
}
