//! Sandboxes: namespaces, cgroups and a DeltaFS root per sandbox; commands and
//! persistent sessions; one atomic checkpoint over files and processes.
//!
//! - [`rootfs`]: the base trees a sandbox's DeltaFS root is layered over;
//! - [`runtime`]: a tree's namespaces, its init process, and spawning into a sandbox;
//! - [`session`]: persistent `bash` / `python` interpreters driven over pipes;
//! - [`manager`]: the real [`SandboxOps`]: sandboxes, trees, checkpoint, rollback, branch;
//! - [`ops`]: what the API asks of sandboxes ([`SandboxOps`]); [`error`]: its errors.

pub mod error;
pub mod manager;
pub mod ops;
pub mod rootfs;
pub mod runtime;
pub mod session;

pub use error::SandboxError;
pub use manager::{ManagerConfig, SandboxManager};
pub use ops::SandboxOps;
