//! The mutable state of a view behind its lock, and what every FUSE operation needs from
//! it: resolving node ids, attributes, backing paths, allocation.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fs::{self, File};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use fuser::{Errno, FileAttr, FileType, INodeNo};

use super::janitor::Janitor;
use super::nodeids::{NodeIds, Resolved};
use super::open::{Handle, OpenEntry};
use crate::base::BaseTree;
use crate::ids::{Ino, LayerId, SnapshotId};
use crate::index::{Delta, Index, IndexError, Txn};
use crate::layer::LayerError;
use crate::node::{DataRef, Kind, Node, Time};
use crate::store::StoreShared;

/// How long the kernel may cache entries (names, also of missing names: negative
/// dentries) and attributes. Long: nothing changes them behind the kernel's back. Every
/// change made through the mount updates or invalidates the kernel's copy, a switch
/// invalidates every inode and entry it changes (`View::switch`), the base never changes,
/// and the one exception — writes through a `MAP_SHARED` mapping — is watched
/// (`super::told`).
pub(crate) const TTL: Duration = Duration::from_secs(3600);

/// How long the kernel may cache the attributes of a retired node id (a file that changed
/// at a switch while open): old handles keep writing to it, and nothing watches it.
pub(crate) const SHORT_TTL: Duration = Duration::from_secs(1);

/// Result of a FUSE-side operation: the errno is what the caller sees.
pub(crate) type FsResult<T> = Result<T, Errno>;

/// Conversion of the crate's errors into the errno a FUSE caller gets.
pub(crate) trait IntoErrno {
    fn errno(self) -> Errno;
}

impl IntoErrno for IndexError {
    fn errno(self) -> Errno {
        Errno::from_i32(IndexError::errno(&self))
    }
}

impl IntoErrno for LayerError {
    fn errno(self) -> Errno {
        Errno::from_i32(LayerError::errno(&self))
    }
}

impl IntoErrno for std::io::Error {
    fn errno(self) -> Errno {
        Errno::from_i32(self.raw_os_error().unwrap_or(libc::EIO))
    }
}

impl IntoErrno for nix::errno::Errno {
    fn errno(self) -> Errno {
        Errno::from_i32(self as i32)
    }
}

/// A directory's entries as a directory handle holds them.
pub(crate) type Listing = Arc<Vec<(OsString, Ino)>>;

/// A directory handle: the entries as they were at the first `readdir`, so offsets stay
/// stable whatever happens to the directory meanwhile.
pub(crate) struct DirHandle {
    pub ino: Ino,
    pub entries: Option<Listing>,
}

/// Everything a view changes, behind its lock.
pub(crate) struct ViewState {
    pub store: Arc<StoreShared>,
    pub base: Arc<BaseTree>,
    /// What the view shows.
    pub index: Index,
    /// What changed since the last freeze or switch.
    pub delta: Delta,
    /// The snapshot the current state was stacked on.
    pub parent: Option<SnapshotId>,
    /// The layer new and copied-up files go to (this view's only).
    pub writable: LayerId,
    /// Next backing-file number (never reused within the view, across layers).
    pub next_file: u64,
    /// Shared state of the open inodes of the current index.
    pub opens: HashMap<Ino, OpenEntry>,
    /// Open file handles.
    pub handles: HashMap<u64, Handle>,
    /// Open directory handles.
    pub dir_handles: HashMap<u64, DirHandle>,
    pub next_fh: u64,
    pub nids: NodeIds,
    /// Files that had a writable passthrough open: a `MAP_SHARED` mapping of them may still
    /// write to their backing file after the fd is closed.
    /// Each with the generation of its last writable passthrough open.
    pub maybe_mapped: HashMap<Ino, u64>,
    pub mapped_generation: u64,
    /// Files the last freeze kept with the live view: the snapshot and the live backing
    /// file's ctime right after the freeze moved it. A switch back to that snapshot while
    /// the ctime is unchanged finds the file still equal to the snapshot's copy. An open
    /// for writing since the freeze removes the file: its handles do not all predate the
    /// checkpoint (see `ViewState::attach`).
    pub kept: HashMap<Ino, (SnapshotId, Time)>,
    /// Candidates whose last handle was released since the janitor's last pass, and when.
    pub released: Vec<(Ino, std::time::Instant)>,
    pub janitor: Arc<Janitor>,
    /// Node ids whose FUSE page cache may be stale (their data was changed through
    /// passthrough, which bypasses it).
    pub stale_cache: HashSet<u64>,
    /// Node ids whose attributes the kernel may hold with the long [`TTL`] and must drop
    /// before the current request is answered (a file that just became `maybe_mapped`).
    pub inval_attrs: Vec<u64>,
    /// The attributes last sent to the kernel of the `maybe_mapped` files (`super::told`).
    pub told: HashMap<Ino, super::told::Told>,
}

impl ViewState {
    /// A fresh state showing `index`, stacked on `parent`.
    pub fn new(
        store: Arc<StoreShared>,
        base: Arc<BaseTree>,
        index: Index,
        parent: Option<SnapshotId>,
        janitor: Arc<Janitor>,
    ) -> Self {
        Self {
            store,
            base,
            index,
            delta: Delta::default(),
            parent,
            writable: LayerId::generate(),
            next_file: 1,
            opens: HashMap::new(),
            handles: HashMap::new(),
            dir_handles: HashMap::new(),
            next_fh: 1,
            nids: NodeIds::default(),
            maybe_mapped: HashMap::new(),
            mapped_generation: 0,
            released: Vec::new(),
            kept: HashMap::new(),
            janitor,
            stale_cache: HashSet::new(),
            inval_attrs: Vec::new(),
            told: HashMap::new(),
        }
    }

    /// A batch of index changes recorded in the view's delta.
    pub fn txn(&mut self) -> Txn<'_> {
        self.index.txn(&mut self.delta, &self.base)
    }

    /// A fresh inode number from the store's allocator.
    pub fn alloc_ino(&self) -> Ino {
        self.store.next_ino.fetch_add(1, Ordering::Relaxed)
    }

    /// A fresh backing-file number.
    pub fn alloc_file(&mut self) -> u64 {
        let file = self.next_file;
        self.next_file += 1;
        file
    }

    /// A fresh file handle.
    pub fn alloc_fh(&mut self) -> u64 {
        let fh = self.next_fh;
        self.next_fh += 1;
        fh
    }

    /// The current inode named by node id `nid`; `ESTALE` for a retired id.
    /// The node is read from the base if the index has not read its directory yet.
    pub fn live(&mut self, nid: INodeNo) -> FsResult<Ino> {
        match self.nids.resolve(nid.0) {
            Resolved::Live(ino) => {
                self.index
                    .ensure_node(ino, &self.base)
                    .ok_or(Errno::ENOENT)?;
                Ok(ino)
            }
            Resolved::Retired => Err(Errno::ESTALE),
        }
    }

    /// The node of a current inode.
    pub fn node(&self, ino: Ino) -> FsResult<Arc<Node>> {
        self.index.node(ino).cloned().ok_or(Errno::ENOENT)
    }

    /// The path of a backing file or base object.
    pub fn data_path(&self, data: &DataRef) -> PathBuf {
        data_path(&self.base, &self.store, data)
    }

    /// What finds backing files and base objects without the view's lock (reads through
    /// a chunk-granular copy's chain).
    pub fn paths(&self) -> Paths {
        Paths {
            base: Arc::clone(&self.base),
            store: Arc::clone(&self.store),
        }
    }

    /// Whether `node`'s backing file belongs to the writable layer.
    pub fn is_writable(&self, node: &Node) -> bool {
        node.data_layer() == Some(self.writable)
    }

    /// Attributes of node id `nid`, whatever it names (current inode or retired id).
    pub fn attr_of(&mut self, nid: INodeNo) -> FsResult<FileAttr> {
        match self.nids.resolve(nid.0) {
            Resolved::Live(_) => {
                let ino = self.live(nid)?;
                let node = self.node(ino)?;
                let open = self.opens.get(&ino).map(|entry| entry.backing.file());
                self.attr(nid.0, &node, open.as_deref())
            }
            Resolved::Retired => {
                let retired = &self.nids.retired[&nid.0];
                let open = retired.open.as_ref().map(|entry| entry.backing.file());
                self.attr(nid.0, &retired.node, open.as_deref())
            }
        }
    }

    /// How long the kernel may cache the attributes of node id `nid` ([`TTL`];
    /// [`SHORT_TTL`] for a retired id). Also records them if the file may be mapped
    /// (`super::told`): call it with the attributes about to be sent.
    pub fn attr_ttl(&mut self, attr: &FileAttr) -> Duration {
        match self.nids.resolve(attr.ino.0) {
            Resolved::Live(_) => {
                self.told(attr);
                TTL
            }
            Resolved::Retired => SHORT_TTL,
        }
    }

    /// Attributes of a current inode.
    pub fn attr_of_ino(&self, ino: Ino) -> FsResult<FileAttr> {
        let node = self.node(ino)?;
        let open = self.opens.get(&ino).map(|entry| entry.backing.file());
        self.attr(self.nids.nid(ino), &node, open.as_deref())
    }

    /// Attributes of `node` reported under node id `nid`. A regular file's size, blocks
    /// and (with `mtime_from_data`) mtime are its backing file's: passthrough writes
    /// change them without the daemon seeing.
    pub fn attr(&self, nid: u64, node: &Node, open: Option<&File>) -> FsResult<FileAttr> {
        let (mut size, mut blocks) = (node.size, node.size.div_ceil(512));
        let (mut mtime, mut ctime) = (node.mtime, node.ctime);
        if node.kind == Kind::File {
            let meta = match (open, &node.data) {
                (Some(file), _) => file.metadata(),
                (None, Some(data)) => fs::metadata(self.data_path(data)),
                (None, None) => return Err(Errno::EIO),
            }
            .map_err(IntoErrno::errno)?;
            size = meta.size();
            blocks = meta.blocks();
            if let Some(partial) = &node.partial {
                // What the chain holds too (a chunk-granular copy's own file holds only
                // what was written since; 0 blocks for a file with data reads as all
                // holes to some tools), at most what the whole file could take.
                let below: u64 = partial
                    .files()
                    .filter_map(|data| fs::metadata(self.data_path(data)).ok())
                    .map(|m| m.blocks())
                    .sum();
                blocks = (blocks + below).min(size.div_ceil(4096) * 8);
            }
            if node.mtime_from_data {
                mtime = Time {
                    sec: meta.mtime(),
                    nsec: meta.mtime_nsec() as u32,
                };
                ctime = ctime.max(mtime);
            }
        }
        Ok(FileAttr {
            ino: INodeNo(nid),
            size,
            blocks,
            atime: node.atime.to_system(),
            mtime: mtime.to_system(),
            ctime: ctime.to_system(),
            crtime: ctime.to_system(),
            kind: file_type(node.kind),
            perm: node.perm,
            nlink: node.nlink,
            uid: node.uid,
            gid: node.gid,
            rdev: node.rdev as u32,
            blksize: 4096,
            flags: 0,
        })
    }

    /// Removes `ino` if it is an orphan (no name left) that no handle holds open, and
    /// its backing file when that is the writable layer's (no snapshot refers to it).
    pub fn reap(&mut self, ino: Ino) {
        if self.opens.contains_key(&ino) {
            return;
        }
        let Some(node) = self.index.node(ino).cloned() else {
            return;
        };
        if node.nlink > 0 || node.kind == Kind::Dir {
            return;
        }
        self.txn().remove(ino);
        self.maybe_mapped.remove(&ino);
        if self.is_writable(&node)
            && let Some(data) = &node.data
        {
            // The file may still be mapped; unlinking it is harmless then.
            let _ = fs::remove_file(self.data_path(data));
        }
    }
}

/// Finds backing files and base objects (see [`ViewState::paths`]).
pub(crate) struct Paths {
    base: Arc<BaseTree>,
    store: Arc<StoreShared>,
}

impl Paths {
    /// The path of a backing file or base object.
    pub fn path(&self, data: &DataRef) -> PathBuf {
        data_path(&self.base, &self.store, data)
    }
}

fn data_path(base: &BaseTree, store: &StoreShared, data: &DataRef) -> PathBuf {
    match data {
        DataRef::Base(rel) => base.path(&rel.0),
        DataRef::Layer { layer, file } => store.layers.file(*layer, *file),
    }
}

/// fuser's name for a kind.
pub(crate) fn file_type(kind: Kind) -> FileType {
    match kind {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
        Kind::CharDev => FileType::CharDevice,
        Kind::BlockDev => FileType::BlockDevice,
    }
}
