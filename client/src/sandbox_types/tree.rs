//! Checkpoints, rollbacks, branches, the tree, diffs, removal and gc.

use serde::{Deserialize, Serialize};

use super::{SandboxInfo, SessionInfo};

/// `POST /v1/sandboxes/{id}/checkpoint`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointRequest {
    /// A label shown in the tree.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

/// A session's part of a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSessionInfo {
    /// The session.
    pub session: String,
    /// `bash` or `python`.
    pub kind: String,
    /// `live` (a template process holds it), `dumped` (its template is gone, its dump
    /// restores it, more slowly) or `none`.
    pub template: String,
    /// A live template's generation: how many forks separate it from a fresh process
    /// (each rollback adds two; deep templates are re-rooted in the background).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u32>,
}

/// A process of the sandbox other than its sessions (a background job, a session's
/// child, a server) in a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeProcessInfo {
    /// Its pid at the checkpoint (in the host's pid namespace).
    pub pid: i32,
    /// Its name.
    pub comm: String,
    /// `live` (a template process holds it, it can be restored) or `none` (its
    /// template is gone: these processes are not dumped, the node's processes can no
    /// longer be restored).
    pub template: String,
}

/// Where a checkpoint's time went (milliseconds).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CheckpointTimings {
    /// The whole operation, as the API handler saw it.
    pub total_ms: f64,
    /// Freezing and thawing the sandbox's cgroup.
    pub quiesce_ms: f64,
    /// The DeltaFS freeze.
    pub files_ms: f64,
    /// The DeltaCR templates.
    pub processes_ms: f64,
    /// Writing the node to the database.
    pub record_ms: f64,
}

/// A node of the checkpoint tree.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Its id.
    pub id: String,
    /// Its tree.
    pub tree: String,
    /// The sandbox it was taken in.
    pub sandbox: String,
    /// Its parent node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Its label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// When it was taken (unix ms).
    pub created_ms: u64,
    /// Disk bytes its file layer owns.
    pub bytes: u64,
    /// Its sessions.
    pub sessions: Vec<NodeSessionInfo>,
    /// The sandbox's other processes at the checkpoint (absent when none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub processes: Vec<NodeProcessInfo>,
    /// How long the checkpoint took.
    pub timings: CheckpointTimings,
}

/// What a rollback restores.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RollbackMode {
    /// Files and processes.
    #[default]
    All,
    /// Only the file layers; the processes keep running.
    FilesOnly,
    /// Only the processes; the files stay as they are.
    ProcessesOnly,
}

/// `POST /v1/sandboxes/{id}/rollback`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    /// The node to go back to (any node of the sandbox's tree).
    pub node: String,
    /// What to restore.
    #[serde(default)]
    pub mode: RollbackMode,
    /// Pre-fault, after the answer, the pages the sandbox wrote after this node last
    /// time (the warm-up, docs/deltacr.md); absent: the daemon's `--warm-up` default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm_up: Option<bool>,
}

/// Where a rollback's time went (milliseconds).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RollbackTimings {
    /// The whole operation.
    pub total_ms: f64,
    /// Killing the sandbox's processes.
    pub kill_ms: f64,
    /// The DeltaFS switch.
    pub files_ms: f64,
    /// Forking the templates into the restored sessions.
    pub processes_ms: f64,
    /// Of `processes_ms`, summed over the restored sessions: the injected fork of each
    /// template.
    #[serde(default)]
    pub fork_ms: f64,
    /// Summed over the sessions: a fallback restore's memory made the dump's (0 when
    /// every template was live).
    #[serde(default)]
    pub fallback_ms: f64,
    /// Summed over the sessions: the fix-up of each child (root, registers, threads,
    /// shared mappings, fd table with its own open file descriptions, fresh stdio).
    #[serde(default)]
    pub fixup_ms: f64,
    /// Summed over the sessions: letting each go (xstate, signals, detach).
    #[serde(default)]
    pub resume_ms: f64,
}

/// The result of a rollback.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RollbackResult {
    /// The sandbox.
    pub sandbox: String,
    /// The node it is now at.
    pub node: String,
    /// What was restored.
    pub mode: RollbackMode,
    /// Its sessions now.
    pub sessions: Vec<SessionInfo>,
    /// How long it took.
    pub timings: RollbackTimings,
    /// How many sessions came from standby forks: forked from their templates ahead of
    /// the rollback (after the checkpoint of the node, or a rollback to it), so that the
    /// rollback only moved and finished them (docs/deltacr.md, "Standby forks").
    #[serde(default)]
    pub standby_sessions: u32,
    /// Whether a warm-up of its sessions was started (it runs after this answer; the
    /// sandbox's next operation waits for it).
    #[serde(default)]
    pub warm_up: bool,
}

/// `POST /v1/nodes/{node}/branch`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BranchRequest {
    /// How many sandboxes (1 to 64).
    #[serde(default = "one")]
    pub count: u32,
}

fn one() -> u32 {
    1
}

/// The result of a branch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BranchResult {
    /// The node branched from.
    pub node: String,
    /// The new sandboxes.
    pub sandboxes: Vec<SandboxInfo>,
    /// How long each took (ms).
    pub branch_ms: Vec<f64>,
}

/// `GET /v1/sandboxes/{id}/tree`: the tree a sandbox belongs to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TreeView {
    /// The tree.
    pub tree: String,
    /// Its nodes, oldest first.
    pub nodes: Vec<NodeInfo>,
    /// Its sandboxes and their heads.
    pub sandboxes: Vec<SandboxHead>,
    /// The tree drawn as text (what `deltabox tree` prints).
    pub text: String,
}

/// A sandbox and the node it is at.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxHead {
    /// The sandbox.
    pub sandbox: String,
    /// Its head.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<String>,
}

/// Query of `GET /v1/diff`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiffQuery {
    /// The older node.
    pub from: String,
    /// The newer node.
    pub to: String,
}

/// One path that differs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiffEntry {
    /// Path from the sandbox root.
    pub path: String,
    /// `added`, `removed` or `modified`.
    pub change: String,
    /// `file`, `dir`, `symlink` or `other`.
    pub file_type: String,
}

/// The result of a diff.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiffResult {
    /// The older node.
    pub from: String,
    /// The newer node.
    pub to: String,
    /// What differs, sorted by path.
    pub changes: Vec<DiffEntry>,
}

/// The result of removing a node (and its subtree) or a sandbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Removed {
    /// The removed nodes.
    pub nodes: Vec<String>,
    /// The removed sandboxes.
    pub sandboxes: Vec<String>,
}

/// The result of `gc`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcResult {
    /// Layer directories removed from the store.
    pub layers_removed: usize,
    /// Trees with no sandbox and no node left, shut down.
    pub trees_removed: usize,
    /// Dumps of nodes that are gone, deleted.
    #[serde(default)]
    pub dumps_removed: usize,
    /// Snapshots of removed nodes merged into the snapshot above them (DeltaFS squash:
    /// runs of them with one child each, in the middle of a chain something still uses).
    #[serde(default)]
    pub layers_squashed: usize,
    /// Disk bytes of the files those merges left superseded, removed.
    #[serde(default)]
    pub squash_bytes_freed: u64,
    /// Runs not squashed because a sandbox whose chain holds them was busy (a later gc
    /// squashes them).
    #[serde(default)]
    pub squash_deferred: usize,
}

/// What one sandbox dirtied since its last checkpoint (`GET /v1/stats`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxDirty {
    /// The sandbox.
    pub sandbox: String,
    /// Its `work/` cgroup (v2) the tracker counts.
    pub cgroup: String,
    /// The tracker's epoch for it (advanced at each checkpoint and rollback).
    pub epoch: u64,
    /// Page-cache pages its processes turned dirty (writes and `mmap` stores to regular
    /// files).
    pub pages_dirtied: u64,
    /// `pages_dirtied` in bytes.
    pub bytes_dirtied: u64,
    /// Write-family syscalls on regular files.
    pub writes: u64,
    /// Bytes those syscalls wrote.
    pub bytes_written: u64,
    /// Distinct files written or dirtied.
    pub inodes: u64,
    /// Copy-on-write faults its processes took since its last checkpoint or rollback
    /// (eBPF; 0 when the daemon does not count them).
    #[serde(default)]
    pub cow_faults: u64,
    /// Pages the warm-up after its last rollback pre-faulted (0 without one).
    #[serde(default)]
    pub warmed_up_pages: u64,
}
