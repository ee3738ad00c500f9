//! The checkpoint tree's records in an embedded database (redb), and their rendering.
//!
//! A *tree* holds every checkpoint (*node*) taken in a sandbox and in the branches made
//! from it; a *sandbox* record says where each live sandbox is (its `head`). The daemon
//! writes a record ([`TreeDb::commit`] returns once redb wrote it to the kernel:
//! durable against the daemon's death, see [`file`]) before it acknowledges the operation, and reads the database back after a restart. See
//! `docs/tree.md`.
//!
//! - [`ids`]: UUIDv7 ids, short forms and prefix matching;
//! - [`records`]: the stored records and their versioned encoding;
//! - [`db`]: the database, [`TreeDb`];
//! - [`file`]: its file, synced for the daemon's death, not the machine's;
//! - [`error`]: the errors, [`TreeDbError`];
//! - [`render`]: drawing a forest of nodes as text.

pub mod db;
pub mod error;
pub(crate) mod file;
pub mod ids;
pub mod records;
pub mod render;

#[cfg(test)]
mod tests;

pub use db::{Op, TreeDb};
pub use error::TreeDbError;
pub use ids::{NodeId, ParseIdError, SandboxId, SessionId, TreeId};
pub use records::{
    NodeRecord, NodeSession, SandboxRecord, SandboxState, SessionRecord, TemplateRecord,
    TreeRecord, unix_ms_now,
};
pub use render::{RenderNode, render_nodes, render_tree};
