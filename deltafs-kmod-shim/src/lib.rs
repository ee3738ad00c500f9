//! DeltaFS: DeltaBox's layered copy-on-write filesystem.
//!
//! The paper builds DeltaFS as a kernel filesystem; the target kernel loads no modules, so
//! DeltaFS is a userspace shim: FUSE for metadata, FUSE passthrough for data I/O where that
//! is safe, behind the same control interface (freeze the writable layer and stack a new
//! one, switch the visible state, branch). `docs/deltafs.md` describes the scheme.
//!
//! - [`index`]: the namespace in persistent maps (O(1) snapshots, no per-layer scan);
//! - [`base`]: the read-only base tree, read lazily;
//! - [`probe`]: the check that this kernel's FUSE passthrough works as DeltaFS needs.

pub mod base;
pub mod ids;
pub mod index;
pub mod node;
pub mod probe;
mod sync;
pub mod ioctl;
pub mod layer;
pub mod persist;
