//! What the API asks of sandboxes: one trait, implemented by the real manager and, in
//! the API's tests, by an in-memory fake. Ids are full ids or unique prefixes.

use crate::api::sandbox_types::{
    BranchRequest, BranchResult, CheckpointRequest, CreateSandbox, DiffResult, ExecRequest,
    ExecResult, GcResult, NodeInfo, Removed, RollbackRequest, RollbackResult, SandboxInfo,
    SessionInfo, SessionRun, SessionRunResult, SessionStart, TreeView,
};

use super::error::SandboxError;

/// Sandbox operations. Calls on different sandboxes run in parallel; calls on one
/// sandbox are serialised. Every call blocks (the server runs it on a blocking thread).
pub trait SandboxOps: Send + Sync {
    /// Creates a sandbox (and a new tree for it).
    fn create(&self, req: &CreateSandbox) -> Result<SandboxInfo, SandboxError>;
    /// Every sandbox, oldest first.
    fn list(&self) -> Result<Vec<SandboxInfo>, SandboxError>;
    /// One sandbox.
    fn get(&self, sandbox: &str) -> Result<SandboxInfo, SandboxError>;
    /// Removes a sandbox: its processes, root view and cgroups (its nodes stay).
    fn remove(&self, sandbox: &str) -> Result<Removed, SandboxError>;
    /// Runs a one-shot command.
    fn exec(&self, sandbox: &str, req: &ExecRequest) -> Result<ExecResult, SandboxError>;
    /// Starts a persistent session.
    fn session_start(&self, sandbox: &str, req: &SessionStart)
    -> Result<SessionInfo, SandboxError>;
    /// Runs code in a session.
    fn session_run(
        &self,
        sandbox: &str,
        session: &str,
        req: &SessionRun,
    ) -> Result<SessionRunResult, SandboxError>;
    /// Stops a session.
    fn session_stop(&self, sandbox: &str, session: &str) -> Result<SessionInfo, SandboxError>;
    /// Checkpoints files and sessions together.
    fn checkpoint(&self, sandbox: &str, req: &CheckpointRequest) -> Result<NodeInfo, SandboxError>;
    /// Rolls back to a node of the sandbox's tree.
    fn rollback(
        &self,
        sandbox: &str,
        req: &RollbackRequest,
    ) -> Result<RollbackResult, SandboxError>;
    /// New sandboxes from a node.
    fn branch(&self, node: &str, req: &BranchRequest) -> Result<BranchResult, SandboxError>;
    /// The tree of a sandbox or of a node.
    fn tree(&self, sandbox_or_node: &str) -> Result<TreeView, SandboxError>;
    /// Files added, removed and changed from one node to another.
    fn diff(&self, from: &str, to: &str) -> Result<DiffResult, SandboxError>;
    /// Removes a node and its subtree.
    fn remove_node(&self, node: &str) -> Result<Removed, SandboxError>;
    /// Drops unreferenced layers and empty trees.
    fn gc(&self) -> Result<GcResult, SandboxError>;
}
