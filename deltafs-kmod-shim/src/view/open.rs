//! Opening regular files: the passthrough safety scheme (DESIGN invariant 1).
//!
//! - A file whose backing file is the writable layer's is opened passthrough (one
//!   `BackingId` per inode, shared by all its opens), unless the inode already has
//!   daemon-served opens (the kernel refuses to mix the two on one inode).
//! - A frozen file (a frozen layer's or the base's) opened for reading is served by the
//!   daemon, never passthrough: a later writer can then copy it up without meeting an
//!   open passthrough file bound to the frozen backing file.
//! - Opening a frozen file for writing (or with `O_TRUNC`), or truncating it, first copies
//!   it up into the writable layer. Daemon-served handles follow the inode's current
//!   backing file ([`Backing`]), so readers see the writer's data.
//! - A file being executed is not truncated by an `O_RDONLY | O_TRUNC` open: the kernel
//!   refuses writes to it (`ETXTBSY`) only after the open reached the daemon, and the
//!   daemon truncates at open (`FUSE_ATOMIC_O_TRUNC`), so it checks itself (see
//!   [`OpenEntry::exec`]).

use std::fs::File;
use std::io;
use std::sync::{Arc, RwLock, RwLockReadGuard};

use fuser::{BackingId, Errno, INodeNo};
use nix::sys::stat::futimens;
use nix::sys::time::TimeSpec;

use super::nodeids::Resolved;
use super::state::{FsResult, IntoErrno, ViewState};
use crate::ids::Ino;
use crate::layer::Layers;
use crate::node::{DataRef, Kind, Node, Time};
use crate::sync::{read, write};

/// The backing file an open inode's handles read and write through. Replaced in place by
/// a copy-up; write-locked by a freeze while it clones the file, so no daemon-served write
/// lands half in the checkpoint.
pub(crate) struct Backing {
    file: RwLock<Arc<File>>,
}

impl Backing {
    fn new(file: File) -> Self {
        Self {
            file: RwLock::new(Arc::new(file)),
        }
    }

    /// The current backing file.
    pub fn file(&self) -> Arc<File> {
        Arc::clone(&read(&self.file))
    }

    /// The current backing file, held against replacement and freeze while writing.
    pub fn hold(&self) -> RwLockReadGuard<'_, Arc<File>> {
        read(&self.file)
    }

    /// Replaces the backing file (copy-up).
    pub fn replace(&self, file: File) {
        *write(&self.file) = Arc::new(file);
    }

    /// Runs `f` with writes through this backing file held off.
    pub fn exclusive<T>(&self, f: impl FnOnce(&File) -> T) -> T {
        let guard = write(&self.file);
        f(&guard)
    }
}

/// How an inode's opens are served while it has any.
pub(crate) enum Mode {
    /// By the kernel from the backing file.
    Passthrough(Arc<BackingId>),
    /// By the daemon.
    Daemon,
}

/// The kernel's `__FMODE_EXEC` open flag: `OPEN` requests of `execve` (and of the ELF
/// interpreter and script interpreters it loads) carry it.
pub(crate) const FMODE_EXEC: i32 = 0x20;

/// The shared state of an inode's open handles.
pub(crate) struct OpenEntry {
    pub backing: Arc<Backing>,
    pub handles: u32,
    /// Handles opened by an `execve`: while one is open a process may run the file, and
    /// the kernel denies writes to it (`ETXTBSY`). The kernel checks an `O_TRUNC` open
    /// whose access mode is `O_RDONLY` only after the daemon answered the open (which
    /// truncates), so the daemon refuses those itself. The kernel lets writers in again
    /// when the process exits; the `RELEASE` of its handle comes slightly later
    /// (asynchronously), so for that moment such an open may still get `ETXTBSY`.
    pub exec: u32,
    pub mode: Mode,
}

/// An open file handle.
pub(crate) struct Handle {
    /// The node id it was opened on.
    pub nid: u64,
    pub backing: Arc<Backing>,
    pub write: bool,
    /// Opened by an `execve` ([`FMODE_EXEC`]).
    pub exec: bool,
}

/// How to answer an `OPEN` or `CREATE`.
pub(crate) enum OpenReply {
    /// Passthrough to the backing file.
    Passthrough { fh: u64, id: Arc<BackingId> },
    /// Served by the daemon; `keep_cache` unless the page cache may be stale.
    Daemon { fh: u64, keep_cache: bool },
}

/// Registers a backing file with the kernel for passthrough.
pub(crate) type OpenBacking<'a> = &'a dyn Fn(&File) -> io::Result<BackingId>;

impl ViewState {
    /// `OPEN` of node id `nid` with open flags `flags`.
    pub fn open(
        &mut self,
        nid: INodeNo,
        flags: i32,
        open_backing: OpenBacking<'_>,
    ) -> FsResult<OpenReply> {
        let ino = self.live(nid)?;
        let node = self.node(ino)?;
        if node.kind != Kind::File {
            return Err(Errno::EINVAL);
        }
        let write = flags & libc::O_ACCMODE != libc::O_RDONLY;
        let trunc = flags & libc::O_TRUNC != 0;
        // A writing open of a running file never gets here (the kernel refuses it before
        // sending it); a read-only truncating one does, and would truncate the program.
        if trunc && !write && self.opens.get(&ino).is_some_and(|entry| entry.exec > 0) {
            return Err(Errno::ETXTBSY);
        }
        if (write || trunc) && !self.is_writable(&node) {
            self.copy_up(ino, trunc)?;
        }
        if trunc {
            self.truncate(ino, 0)?;
        }
        let exec = flags & FMODE_EXEC != 0;
        let was_mapped = self.maybe_mapped.contains_key(&ino);
        let reply = self.attach(nid.0, ino, write, exec, None, open_backing)?;
        if !was_mapped && self.maybe_mapped.contains_key(&ino) {
            // The kernel may hold its attributes with the long TTL: a mapping could now
            // change them unseen.
            self.inval_attrs.push(nid.0);
        }
        Ok(reply)
    }

    /// Adds a handle on `ino` (node id `nid`), deciding passthrough or daemon service if
    /// it is the inode's first open. `exec`: opened by an `execve`. `file` is its backing
    /// file if the caller has it open already (read-write).
    pub fn attach(
        &mut self,
        nid: u64,
        ino: Ino,
        write: bool,
        exec: bool,
        file: Option<File>,
        open_backing: OpenBacking<'_>,
    ) -> FsResult<OpenReply> {
        if !self.opens.contains_key(&ino) {
            let node = self.node(ino)?;
            let writable = self.is_writable(&node);
            let file = match file {
                Some(file) => file,
                None => {
                    let data = node.data.as_ref().ok_or(Errno::EIO)?;
                    Layers::open_file(&self.data_path(data), writable).map_err(IntoErrno::errno)?
                }
            };
            // A chunk-granular copy is served by the daemon: the kernel would read the
            // holes of its backing file where the file below holds the bytes.
            let mode = if writable && node.partial.is_none() {
                match open_backing(&file) {
                    Ok(id) => Mode::Passthrough(Arc::new(id)),
                    Err(e) => {
                        log::warn!("passthrough refused for inode {ino}, serving it: {e}");
                        Mode::Daemon
                    }
                }
            } else {
                Mode::Daemon
            };
            self.opens.insert(
                ino,
                OpenEntry {
                    backing: Arc::new(Backing::new(file)),
                    handles: 0,
                    exec: 0,
                    mode,
                },
            );
        }
        if write {
            // A switch back to the last checkpoint keeps handles connected only when they
            // predate it. Whether the freeze kept this file live can depend on timing (a
            // closed fd's asynchronous `RELEASE` still pending, a mapping probe), so
            // without this a handle opened after the freeze stayed connected or not by
            // chance (the model test's `Truncate, Freeze, Hold, Switch, WriteHeld`).
            self.kept.remove(&ino);
        }
        let fh = self.alloc_fh();
        let entry = self.opens.get_mut(&ino).ok_or(Errno::EIO)?;
        entry.handles += 1;
        entry.exec += u32::from(exec);
        let handle = Handle {
            nid,
            backing: Arc::clone(&entry.backing),
            write,
            exec,
        };
        let reply = match &entry.mode {
            Mode::Passthrough(id) => OpenReply::Passthrough {
                fh,
                id: Arc::clone(id),
            },
            Mode::Daemon => OpenReply::Daemon {
                fh,
                keep_cache: true,
            },
        };
        self.handles.insert(fh, handle);
        Ok(match reply {
            OpenReply::Passthrough { fh, id } => {
                if write {
                    self.mapped_generation += 1;
                    self.maybe_mapped.insert(ino, self.mapped_generation);
                }
                self.stale_cache.insert(nid);
                OpenReply::Passthrough { fh, id }
            }
            OpenReply::Daemon { fh, .. } => OpenReply::Daemon {
                fh,
                keep_cache: !self.stale_cache.remove(&nid),
            },
        })
    }

    /// Copies a frozen file up into the writable layer (empty when `empty`: the caller
    /// truncates it to 0 anyway). Handles already open on it follow.
    pub fn copy_up(&mut self, ino: Ino, empty: bool) -> FsResult<Arc<Node>> {
        let node = self.node(ino)?;
        if self.is_writable(&node) {
            return Ok(node);
        }
        let data = node.data.clone().ok_or(Errno::EIO)?;
        let file = self.alloc_file();
        let layers = &self.store.layers;
        let dest = layers.file(self.writable, file);
        let (new_file, partial) = if empty {
            let created = layers
                .create(self.writable, file)
                .map_err(IntoErrno::errno)?;
            self.store.stats.copied_up(self.writable, None);
            (created, None)
        } else {
            let src = match self.opens.get(&ino) {
                Some(entry) => entry.backing.file(),
                None => Arc::new(
                    Layers::open_file(&self.data_path(&data), false).map_err(IntoErrno::errno)?,
                ),
            };
            let resolve = |d: &DataRef| self.data_path(d);
            let (new_file, partial, copied) = layers
                .copy_up(&src, &data, node.partial.as_ref(), &resolve, &dest)
                .map_err(IntoErrno::errno)?;
            self.store
                .stats
                .copied_up(self.writable, Some((&copied, &new_file)));
            (new_file, partial)
        };
        if !node.mtime_from_data {
            let atime = TimeSpec::new(node.atime.sec, node.atime.nsec.into());
            let mtime = TimeSpec::new(node.mtime.sec, node.mtime.nsec.into());
            futimens(&new_file, &atime, &mtime).map_err(IntoErrno::errno)?;
        }
        let writable = self.writable;
        let node = self
            .txn()
            .update(ino, |node| {
                node.data = Some(DataRef::Layer {
                    layer: writable,
                    file,
                });
                node.partial = partial;
                node.mtime_from_data = true;
            })
            .map_err(IntoErrno::errno)?;
        if let Some(entry) = self.opens.get(&ino) {
            entry.backing.replace(new_file);
        }
        Ok(node)
    }

    /// Truncates (or extends) a regular file to `size`, copying it up first if frozen.
    pub fn truncate(&mut self, ino: Ino, size: u64) -> FsResult<()> {
        let node = self.copy_up(ino, size == 0)?;
        let file = match self.opens.get(&ino) {
            Some(entry) => entry.backing.file(),
            None => {
                let data = node.data.as_ref().ok_or(Errno::EIO)?;
                Arc::new(Layers::open_file(&self.data_path(data), true).map_err(IntoErrno::errno)?)
            }
        };
        if let Some(partial) = super::partial::cut(node.partial.as_ref(), &file, size)? {
            self.txn()
                .update(ino, |node| node.partial = partial)
                .map_err(IntoErrno::errno)?;
        }
        file.set_len(size).map_err(IntoErrno::errno)
    }

    /// `RELEASE` of file handle `fh`.
    pub fn release(&mut self, fh: u64) {
        let Some(handle) = self.handles.remove(&fh) else {
            return;
        };
        match self.nids.resolve(handle.nid) {
            Resolved::Retired => {
                if let Some(retired) = self.nids.retired.get_mut(&handle.nid)
                    && let Some(open) = &mut retired.open
                {
                    open.handles -= 1;
                    if open.handles == 0 {
                        self.nids.released(handle.nid);
                    }
                }
            }
            Resolved::Live(ino) => {
                if let Some(entry) = self.opens.get_mut(&ino) {
                    entry.handles -= 1;
                    entry.exec -= u32::from(handle.exec);
                    if entry.handles == 0 {
                        self.opens.remove(&ino);
                        if self.maybe_mapped.contains_key(&ino) {
                            self.released.push((ino, std::time::Instant::now()));
                            self.janitor.poke();
                        }
                        self.reap(ino);
                    }
                }
            }
        }
    }

    /// A daemon-served `WRITE` flagged `FUSE_WRITE_KILL_SUIDGID` (a caller without
    /// `CAP_FSETID`, `FUSE_HANDLE_KILLPRIV_V2`): clears set-user/group-ID of the handle's
    /// inode. Returns its node id when that changed the mode (the kernel's copy is then
    /// stale). A retired handle's node is left alone: nothing shows it but its own `fstat`.
    pub fn kill_suidgid_for_write(&mut self, fh: u64) -> Option<u64> {
        let nid = self.handles.get(&fh)?.nid;
        let Resolved::Live(ino) = self.nids.resolve(nid) else {
            return None;
        };
        let node = self.index.node(ino)?;
        let perm = super::ops::killed_suidgid(node.perm);
        if perm == node.perm {
            return None;
        }
        let now = Time::now();
        self.txn()
            .update(ino, |node| {
                node.perm = perm;
                node.ctime = now;
            })
            .ok()?;
        Some(nid)
    }

    /// The backing file of handle `fh`.
    pub fn handle(&self, fh: u64) -> FsResult<(Arc<Backing>, bool)> {
        self.handles
            .get(&fh)
            .map(|handle| (Arc::clone(&handle.backing), handle.write))
            .ok_or(Errno::EBADF)
    }
}
