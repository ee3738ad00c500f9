//! Request and response bodies of the sandbox endpoints (sandboxes, commands, sessions,
//! checkpoints, the tree), shared by the server, the client and the SDK's contract.
//!
//! Ids in requests may be any unique prefix of a full id; responses carry full ids.
//! One-shot commands and their output stream are in [`exec`], checkpoints, rollbacks,
//! branches and the tree in [`tree`]; both are re-exported here.

use serde::{Deserialize, Serialize};

pub mod exec;
pub mod tree;

pub use exec::*;
pub use tree::*;

/// Resource limits of a sandbox (cgroup v2 `memory.max`, `cpu.max`, `pids.max`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSpec {
    /// Memory limit in bytes (swap off when set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// CPUs (e.g. `1.5`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    /// Maximum number of processes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
}

/// `POST /v1/sandboxes`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSandbox {
    /// A root tree to layer the sandbox over; absent: the embedded default (the host's
    /// system directories read-only, empty `/root`, `/tmp`, `/home`, `/workspace`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs: Option<String>,
    /// Limits.
    #[serde(default)]
    pub limits: LimitsSpec,
    /// End every `exec` and `session run` with a checkpoint (a node per tool call).
    #[serde(default)]
    pub auto_checkpoint: bool,
}

/// A session, as listed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    /// Its id.
    pub id: String,
    /// `bash` or `python`.
    pub kind: String,
    /// The interpreter's pid (host pid namespace).
    pub pid: i32,
    /// When it was started (unix ms).
    pub started_ms: u64,
}

/// A sandbox.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SandboxInfo {
    /// Its id.
    pub id: String,
    /// The tree it belongs to (a sandbox and its branches share one).
    pub tree: String,
    /// When it was created (unix ms).
    pub created_ms: u64,
    /// Its `--rootfs`, absent for the embedded default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs: Option<String>,
    /// Its limits.
    pub limits: LimitsSpec,
    /// Whether every command ends in a checkpoint.
    pub auto_checkpoint: bool,
    /// The node it last checkpointed or rolled back to (the parent of its next
    /// checkpoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<String>,
    /// The node it was branched from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branched_from: Option<String>,
    /// Its live sessions.
    pub sessions: Vec<SessionInfo>,
    /// `running` (or `creating` / `removing` while that is under way).
    pub state: String,
    /// The operation in progress, if any: the rest is the sandbox as that operation
    /// found it (a status never waits for an operation to end).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub busy: Option<BusyInfo>,
    /// What its processes dirtied since its last checkpoint (the eBPF write tracker),
    /// when the daemon tracks it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirty: Option<SandboxDirty>,
}

/// An operation in progress on a sandbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BusyInfo {
    /// `exec`, `session run`, `checkpoint`, `rollback`, …
    pub operation: String,
    /// How long it has run.
    pub for_ms: u64,
}

/// `GET /v1/sandboxes`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SandboxList {
    /// Every sandbox, oldest first.
    pub sandboxes: Vec<SandboxInfo>,
}

/// `POST /v1/sandboxes/{id}/sessions`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionStart {
    /// `bash` or `python`.
    pub kind: String,
}

/// `POST /v1/sandboxes/{id}/sessions/{session}/run`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionRun {
    /// The code (bash or python source).
    pub code: String,
    /// Interrupt the code (not the session) after this long (default 600 000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// The result of `session run`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionRunResult {
    /// What the code printed to stdout.
    pub stdout: String,
    /// What it printed to stderr.
    pub stderr: String,
    /// bash: `$?` of the last command; python: 0, 1 for an uncaught exception, 130 when
    /// interrupted, the `SystemExit` code.
    pub status: i32,
    /// The timeout interrupted it.
    pub timed_out: bool,
    /// Output beyond the cap was dropped.
    pub truncated: bool,
    /// Wall time.
    pub duration_ms: f64,
    /// The checkpoint taken after it (`auto_checkpoint`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<NodeInfo>,
}
