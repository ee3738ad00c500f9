//! A view: one mount of DeltaFS, its index and writable layer, and its control
//! operations ([`View::freeze`], [`View::switch`], [`View::unmount`]).

mod acl;
mod control;
mod janitor;
mod nodeids;
pub(crate) mod open;
mod ops;
mod partial;
pub(crate) mod state;
mod told;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use fuser::{BackgroundSession, Config, MountOption, Notifier, SessionACL};
use nix::mount::{MntFlags, umount2};

use self::state::ViewState;
use crate::base::BaseTree;
use crate::fs::DeltaFs;
use crate::ids::{LayerId, SnapshotId};
use crate::index::Index;
use crate::layer::{CopyStats, LayerError};
use crate::maps::MapsError;
use crate::persist::PersistError;
use crate::store::{StoreError, StoreShared};
use crate::sync::lock;

pub(crate) use self::ops::{Caller, NewNode, SetAttr};

/// Failures of control operations on a view.
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    /// A store-level failure (unknown or dropped snapshot, other base, rebuild).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Moving or cloning a backing file failed.
    #[error(transparent)]
    Layer(#[from] LayerError),
    /// Writing the frozen layer's metadata failed.
    #[error(transparent)]
    Persist(#[from] PersistError),
    /// Reading the mappings of the named processes failed.
    #[error(transparent)]
    Maps(#[from] MapsError),
    /// Making the kernel write back the dirty pages of daemon-served files (`syncfs` on
    /// the mount) before a freeze failed: a write-back to the daemon failed (its error).
    #[error("cannot write back the dirty pages of {mountpoint} before a freeze")]
    WriteBack {
        /// The mount point.
        mountpoint: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Unmounting failed.
    #[error("cannot unmount {mountpoint}")]
    Unmount {
        /// The mount point.
        mountpoint: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// How a freeze finds the files that may still be mapped `MAP_SHARED` and writable after
/// their fd was closed (such a mapping writes to the backing file directly, so the file
/// must stay with the live view and the snapshot gets a clone). Candidates are the files
/// of the writable layer that had a writable passthrough open; each way below narrows
/// them down.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum MappedFiles {
    /// Keep a candidate while its backing file is still open elsewhere, as a write-lease
    /// probe tells (see [`crate::lease`]): microseconds per candidate, never misses a
    /// mapping, may keep a file mapped read-only.
    #[default]
    Probe,
    /// Keep every candidate (one clone per candidate per freeze).
    Conservative,
    /// Keep those found mapped shared-writable in `/proc/<pid>/maps` of these processes
    /// (the caller vouches that no other process maps files of this view).
    Pids(Vec<u32>),
    /// Keep those found mapped shared-writable by any process of the machine.
    AllProcesses,
}

/// Options of [`View::freeze`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FreezeOpts {
    /// Which files may still be mapped writable.
    pub mapped: MappedFiles,
}

/// What a freeze did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FreezeReport {
    /// The new snapshot.
    pub id: SnapshotId,
    /// Files that stayed with the live view (open or mapped), their snapshot copy cloned.
    pub kept_live: u64,
    /// How those copies were made.
    pub copies: CopyStats,
    /// Nodes and entries the frozen epoch changed (the delta persisted).
    pub changes: u64,
    /// Wall time.
    pub elapsed: Duration,
}

/// What a switch did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwitchReport {
    /// The snapshot now shown.
    pub id: SnapshotId,
    /// Inodes compared (the deltas between the two states).
    pub candidates: u64,
    /// Kernel inodes invalidated.
    pub inodes_invalidated: u64,
    /// Kernel directory entries invalidated.
    pub entries_invalidated: u64,
    /// Open files whose handles kept the previous state (under a retired node id).
    pub retired: u64,
    /// Wall time.
    pub elapsed: Duration,
}

/// What a view shares with its FUSE session.
pub(crate) struct ViewShared {
    pub store: Arc<StoreShared>,
    pub state: Mutex<ViewState>,
    pub notifier: OnceLock<Notifier>,
    pub mountpoint: PathBuf,
    pub janitor: Arc<janitor::Janitor>,
}

impl ViewShared {
    pub(crate) fn new(
        store: Arc<StoreShared>,
        base: Arc<BaseTree>,
        index: Index,
        parent: Option<SnapshotId>,
        mountpoint: PathBuf,
    ) -> Self {
        let janitor = Arc::new(janitor::Janitor::default());
        Self {
            state: Mutex::new(ViewState::new(
                Arc::clone(&store),
                base,
                index,
                parent,
                Arc::clone(&janitor),
            )),
            store,
            notifier: OnceLock::new(),
            mountpoint,
            janitor,
        }
    }

    /// The writable layer and the snapshot the state is stacked on. The writable layers
    /// left behind by switches are not in use: handles opened before a switch hold their
    /// files open by fd, never by path, and no index refers to them.
    pub(crate) fn layers_in_use(&self) -> (LayerId, Option<SnapshotId>) {
        let state = lock(&self.state);
        (state.writable, state.parent)
    }
}

/// Threads reading and answering the view's FUSE requests. One: the kernel hands each
/// request to the reader that has waited longest, so with two the thread answering
/// alternated at every request of a sequential caller (`tar`, `git`), and each request
/// woke a thread that had been asleep for a whole round trip instead of the one that had
/// just replied, possibly on the other CPU. With one, an untar of the bench's tree with
/// both on one CPU took 1.30 s instead of 1.46 s, and with another task busy on the other
/// CPU 2.1 s instead of 4.9 s (docs/deltafs.md, "One session thread" and "Measured"), with
/// the same request count. Nothing a handler does waits for another request: metadata work runs
/// under the view's lock anyway, the kernel notifications sent from handlers are
/// attribute-only (no page write-back), and the freeze's `syncfs` and the switch's
/// invalidations run on the caller's thread, outside the view's lock.
const SESSION_THREADS: usize = 1;

/// A mounted DeltaFS view. Dropping it unmounts (lazily if busy).
pub struct View {
    shared: Arc<ViewShared>,
    session: Option<BackgroundSession>,
    /// Joined at unmount: a pass in progress holds the view's state, and a `Store::gc`
    /// right after the unmount would keep its layers.
    janitor: Option<std::thread::JoinHandle<()>>,
}

impl View {
    /// Mounts `shared` at its mount point and runs the FUSE session in the background.
    pub(crate) fn spawn(shared: Arc<ViewShared>) -> io::Result<Self> {
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("deltafs".to_owned()),
            MountOption::Subtype("deltafs".to_owned()),
            MountOption::DefaultPermissions,
            MountOption::RW,
            MountOption::Dev,
            MountOption::Suid,
        ];
        config.acl = SessionACL::All;
        config.n_threads = Some(SESSION_THREADS);
        let fs = DeltaFs::new(Arc::clone(&shared));
        let session = fuser::Session::new(fs, &shared.mountpoint, &config)?;
        let _ = shared.notifier.set(session.notifier());
        let session = session.spawn()?;
        let janitor = janitor::spawn(Arc::downgrade(&shared))?;
        Ok(Self {
            shared,
            session: Some(session),
            janitor,
        })
    }

    /// Where the view is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.shared.mountpoint
    }

    /// The snapshot the current state is stacked on (`None`: the bare base).
    pub fn parent(&self) -> Option<SnapshotId> {
        lock(&self.shared.state).parent
    }

    /// The layer new and modified files go to.
    pub fn writable_layer(&self) -> LayerId {
        lock(&self.shared.state).writable
    }

    /// Checkpoint: freezes the writable layer into a snapshot and stacks a fresh one.
    /// O(files open or mapped) + O(changes since the last freeze); no data copied except
    /// clones of files still open or mapped for writing (see `docs/deltafs.md`). The
    /// caller quiesces the processes using the view first.
    pub fn freeze(&self, opts: &FreezeOpts) -> Result<FreezeReport, ViewError> {
        self.shared.freeze(opts)
    }

    /// Rollback: shows snapshot `to` over a fresh writable layer, invalidating in the
    /// kernel only what differs.
    pub fn switch(&self, to: SnapshotId) -> Result<SwitchReport, ViewError> {
        self.shared.switch(to)
    }

    /// Unmounts and waits for the FUSE session to end. If the mount is busy it is
    /// detached instead (it goes away when its last user does).
    pub fn unmount(mut self) -> Result<(), ViewError> {
        self.unmount_inner()
    }

    /// Detaches the mount (lazily: it leaves the namespace now) without waiting for its
    /// users: the FUSE session keeps serving whoever still holds a file, a mapping or a
    /// directory of the view (a DeltaCR template forked from one of its processes maps
    /// its libraries), and ends by itself once the last of them is gone.
    pub fn detach(mut self) -> Result<(), ViewError> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        if let Err(e) = self.shared.store.writer.flush() {
            log::error!("deltafs: {e}");
        }
        let detached = umount2(&self.shared.mountpoint, MntFlags::MNT_DETACH).map_err(|e| {
            ViewError::Unmount {
                mountpoint: self.shared.mountpoint.clone(),
                source: e.into(),
            }
        });
        let janitor = Arc::clone(&self.shared.janitor);
        let janitor_thread = self.janitor.take();
        let served = std::thread::Builder::new()
            .name("deltafs-detached".to_owned())
            .spawn(move || {
                let _ = session.join();
                janitor.stop();
                if let Some(thread) = janitor_thread {
                    let _ = thread.join();
                }
            });
        if let Err(e) = served {
            log::warn!("deltafs: cannot wait for a detached view in the background: {e}");
        }
        detached
    }

    fn unmount_inner(&mut self) -> Result<(), ViewError> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        self.shared.janitor.stop();
        // Snapshot metadata first: a busy mount is only detached below, and its session
        // thread (which holds the store) may outlive this process's orderly exit.
        if let Err(e) = self.shared.store.writer.flush() {
            log::error!("deltafs: {e}");
        }
        nix::unistd::sync();
        let unmounted = session.umount_and_join();
        // After the session: a pass's attribute notifications then fail at once.
        if let Some(thread) = self.janitor.take() {
            let _ = thread.join();
        }
        match unmounted {
            Ok(()) => Ok(()),
            Err(source) => {
                let detached = umount2(&self.shared.mountpoint, MntFlags::MNT_DETACH);
                if detached.is_ok() {
                    Ok(())
                } else {
                    Err(ViewError::Unmount {
                        mountpoint: self.shared.mountpoint.clone(),
                        source,
                    })
                }
            }
        }
    }
}

impl Drop for View {
    fn drop(&mut self) {
        if let Err(e) = self.unmount_inner() {
            log::warn!("{e}");
        }
    }
}

impl std::fmt::Debug for View {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("View")
            .field("mountpoint", &self.shared.mountpoint)
            .finish()
    }
}
