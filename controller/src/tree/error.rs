//! [`TreeDbError`]: what can go wrong in the tree database, each naming the file or
//! the ids involved.

use std::path::PathBuf;

use super::db::SCHEMA_VERSION;
use super::ids::{NodeId, SandboxId, TreeId};
use super::records::RecordError;

/// Errors of the tree database.
#[derive(Debug, thiserror::Error)]
pub enum TreeDbError {
    /// Another process, or another handle in this process, has the file open.
    #[error(
        "tree database {} is locked: another deltaboxd (or another handle in this process) has it open",
        path.display()
    )]
    Locked {
        /// The database file.
        path: PathBuf,
    },
    /// The file is not a readable redb database.
    #[error("tree database {} is corrupt or not a redb file: {detail}", path.display())]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// redb's description.
        detail: String,
    },
    /// The file could not be opened or created.
    #[error("cannot open tree database {}: {source}", path.display())]
    Open {
        /// The database file.
        path: PathBuf,
        /// redb's error (boxed: redb's errors are large, and errors are rare).
        #[source]
        source: Box<redb::DatabaseError>,
    },
    /// The file was written with another table layout.
    #[error(
        "tree database {} has schema version {found}; this build reads version {SCHEMA_VERSION}",
        path.display()
    )]
    Schema {
        /// The database file.
        path: PathBuf,
        /// The version found.
        found: u32,
    },
    /// A redb transaction, table or commit failed.
    #[error("tree database {}: {op}: {source}", path.display())]
    Db {
        /// The database file.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// redb's error (boxed: redb's errors are large, and errors are rare).
        #[source]
        source: Box<redb::Error>,
    },
    /// A stored record could not be read.
    #[error("tree database {}: {table} record {key}: {source}", path.display())]
    Decode {
        /// The database file.
        path: PathBuf,
        /// The table.
        table: &'static str,
        /// The record's key.
        key: String,
        /// Why.
        #[source]
        source: RecordError,
    },
    /// A record could not be encoded.
    #[error("cannot encode {what}: {source}")]
    Encode {
        /// The record.
        what: String,
        /// serde_json's error.
        #[source]
        source: serde_json::Error,
    },
    /// A node's latency is NaN or infinite (JSON would store it as null).
    #[error("node {node}: checkpoint_ms {value} is not a finite number")]
    NotFinite {
        /// The node.
        node: NodeId,
        /// The value.
        value: f64,
    },
    /// A node names itself as its parent.
    #[error("node {node} names itself as its parent")]
    SelfParent {
        /// The node.
        node: NodeId,
    },
    /// A new node's parent is not in the database.
    #[error("node {node}: parent node {parent} does not exist")]
    UnknownParent {
        /// The node.
        node: NodeId,
        /// The missing parent.
        parent: NodeId,
    },
    /// A node's parent belongs to another tree.
    #[error("node {node} is in tree {tree} but its parent {parent} is in tree {parent_tree}")]
    ParentInOtherTree {
        /// The node.
        node: NodeId,
        /// The node's tree.
        tree: TreeId,
        /// The parent.
        parent: NodeId,
        /// The parent's tree.
        parent_tree: TreeId,
    },
    /// A stored node was written again with another parent or tree.
    #[error(
        "node {node} is stored with parent {} in tree {old_tree}; a node's parent and tree never change",
        old_parent.map_or_else(|| "none".to_owned(), |p| p.to_string())
    )]
    NodeMoved {
        /// The node.
        node: NodeId,
        /// Its stored parent.
        old_parent: Option<NodeId>,
        /// Its stored tree.
        old_tree: TreeId,
    },
    /// A sandbox's head node is not in the database.
    #[error("sandbox {sandbox}: head node {head} does not exist")]
    UnknownHead {
        /// The sandbox.
        sandbox: SandboxId,
        /// The missing node.
        head: NodeId,
    },
    /// A sandbox's head node belongs to another tree.
    #[error("sandbox {sandbox} is in tree {tree} but its head {head} is in tree {head_tree}")]
    HeadInOtherTree {
        /// The sandbox.
        sandbox: SandboxId,
        /// The sandbox's tree.
        tree: TreeId,
        /// The head node.
        head: NodeId,
        /// The head's tree.
        head_tree: TreeId,
    },
    /// A prefix holds something other than hex digits and dashes.
    #[error("{prefix:?} is not a {kind} id or id prefix (hex digits and dashes)")]
    BadPrefix {
        /// `"node"` or `"sandbox"`.
        kind: &'static str,
        /// The user's text.
        prefix: String,
    },
    /// No id matches a prefix.
    #[error("no {kind} matches {prefix:?}")]
    UnknownId {
        /// `"node"` or `"sandbox"`.
        kind: &'static str,
        /// The user's text.
        prefix: String,
    },
    /// Several ids match a prefix.
    #[error("{prefix:?} matches {} {kind}s: {}; give more digits", candidates.len(), candidates.join(", "))]
    Ambiguous {
        /// `"node"` or `"sandbox"`.
        kind: &'static str,
        /// The user's text.
        prefix: String,
        /// The full ids that match, in creation order.
        candidates: Vec<String>,
    },
}
