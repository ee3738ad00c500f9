//! DeltaFS: DeltaBox's layered copy-on-write filesystem.
//!
//! The paper builds DeltaFS as a kernel filesystem; the target kernel loads no modules, so
//! DeltaFS is a userspace shim: FUSE for metadata, FUSE passthrough for data I/O where that
//! is safe, behind the same control interface (freeze the writable layer and stack a new
//! one, switch the visible state, branch). `docs/deltafs.md` describes the scheme.
//!
//! The control interface: [`Store::open`], [`Store::mount`] → [`View`],
//! [`View::freeze`], [`View::switch`], [`View::unmount`], [`Store::drop_snapshot`],
//! [`Store::gc`], [`Store::squash`].
//!
//! - [`index`]: the namespace in persistent maps (O(1) snapshots, no per-layer scan);
//! - [`base`]: the read-only base tree, read lazily;
//! - [`layer`], [`persist`]: layer directories and their on-disk metadata;
//! - [`chunks`]: chunk-granular copy-up where the store cannot reflink;
//! - [`squash`]: merging chains of dropped snapshots;
//! - [`store`], [`view`]: the control interface;
//! - [`stats`]: what the views did (requests, copy-ups, freezes), read by [`Store::stats`];
//! - [`probe`]: the check that this kernel's FUSE passthrough works as DeltaFS needs.

pub mod acl;
pub mod backing;
pub mod base;
pub mod chunks;
pub mod diff;
mod fs;
pub mod ids;
pub mod index;
pub mod ioctl;
pub mod layer;
pub mod lease;
pub mod maps;
pub mod node;
pub mod persist;
pub mod probe;
pub mod squash;
pub mod stats;
pub mod store;
mod sync;
pub mod view;
pub mod writeback;
mod writer;
pub mod xattr;

pub use crate::backing::{BackingError, BackingFile};
pub use crate::chunks::ChunkPolicy;
pub use crate::diff::{Change, ChangeKind, Changed, DiffError, FileType};
pub use crate::ids::{LayerId, SnapshotId};
pub use crate::squash::SquashReport;
pub use crate::stats::{OpKind, OpStats, SnapshotWrites, StatsSnapshot};
pub use crate::store::{GcReport, SnapshotInfo, Store, StoreError};
pub use crate::view::{FreezeOpts, FreezeReport, MappedFiles, SwitchReport, View, ViewError};
