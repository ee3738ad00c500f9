//! DeltaFS: DeltaBox's layered copy-on-write filesystem.
//!
//! The paper builds DeltaFS as a kernel filesystem; the target kernel loads no modules, so
//! DeltaFS is a userspace shim: FUSE for metadata, FUSE passthrough for data I/O, behind the
//! same control interface (freeze the writable layer, stack a new one, switch the visible
//! stack). For now the crate holds only [`probe`], the check that this kernel's FUSE
//! passthrough works the way DeltaFS needs it to.

pub mod probe;
