//! What the API asks of sandboxes: one trait, implemented by the real manager and, in
//! the API's tests, by an in-memory fake. Ids are full ids or unique prefixes.

use crate::api::sandbox_types::{
    BranchRequest, BranchResult, CheckpointRequest, CreateSandbox, DiffResult, ExecRequest,
    ExecResult, GcResult, NodeInfo, Removed, RollbackRequest, RollbackResult, SandboxInfo,
    SessionInfo, SessionRun, SessionRunResult, SessionStart, TreeView,
};

use std::time::Instant;

use super::error::SandboxError;

/// Which of a command's outputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputStream {
    /// Its stdout.
    Stdout,
    /// Its stderr.
    Stderr,
}

/// Where a streamed `exec` sends what happens as it happens.
pub trait ExecSink {
    /// The command has started: from now on, errors belong to the stream (before, they
    /// are the call's own).
    fn started(&mut self) {}
    /// A chunk of output, as read from the pipe (a chunk may end inside a UTF-8
    /// character). It may block while the consumer is behind (the command's pipes then
    /// fill and it blocks on its writes, as on a terminal), but not past `until`;
    /// returns whether the chunk was taken.
    fn output(&mut self, stream: OutputStream, bytes: &[u8], until: Instant) -> bool;
}

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
    /// Runs a one-shot command and collects its output.
    fn exec(&self, sandbox: &str, req: &ExecRequest) -> Result<ExecResult, SandboxError>;
    /// Runs a one-shot command like [`Self::exec`], with the same caps, timeout,
    /// auto-checkpoint and serialisation, but hands its output to `sink` as it comes;
    /// the result's `stdout` and `stderr` are then empty.
    ///
    /// The default runs [`Self::exec`] and hands over the whole output at its end, for
    /// implementations that cannot stream (the API tests' fake).
    fn exec_streamed(
        &self,
        sandbox: &str,
        req: &ExecRequest,
        sink: &mut dyn ExecSink,
    ) -> Result<ExecResult, SandboxError> {
        let mut result = self.exec(sandbox, req)?;
        sink.started();
        let far = Instant::now() + std::time::Duration::from_secs(3600);
        let stdout = std::mem::take(&mut result.stdout);
        let stderr = std::mem::take(&mut result.stderr);
        for (stream, text) in [
            (OutputStream::Stdout, stdout),
            (OutputStream::Stderr, stderr),
        ] {
            if !text.is_empty() && !sink.output(stream, text.as_bytes(), far) {
                result.truncated = true;
            }
        }
        Ok(result)
    }
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
