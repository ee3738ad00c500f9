//! Request and response bodies of the sandbox endpoints (sandboxes, commands, sessions,
//! checkpoints, the tree), shared by the server, the client and the SDK's contract.
//!
//! Ids in requests may be any unique prefix of a full id; responses carry full ids.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

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

/// `POST /v1/sandboxes/{id}/exec`: a one-shot command.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// The command and its arguments (`argv[0]` is searched in `PATH`).
    pub argv: Vec<String>,
    /// Extra environment (over the sandbox's default `PATH`, `HOME`, `LANG`, `TERM`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Working directory inside the sandbox (default `/workspace`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Data for its stdin (default: none, stdin is `/dev/null`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    /// Kill it (its whole process group) after this long (default 600 000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// The result of `exec`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExecResult {
    /// Exit code, if it exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The signal that killed it, if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// What it wrote to stdout (lossy UTF-8).
    pub stdout: String,
    /// What it wrote to stderr.
    pub stderr: String,
    /// Killed by the timeout.
    pub timed_out: bool,
    /// Output beyond the cap (8 MiB per stream) was dropped.
    pub truncated: bool,
    /// Wall time.
    pub duration_ms: f64,
    /// The checkpoint taken after it (`auto_checkpoint`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<NodeInfo>,
}

/// One event of a streamed `exec` (asked for with `Accept: application/x-ndjson`): one
/// JSON object per line, tagged by its `type`. Output events come as the command
/// writes; the last event is `exit` or `error`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExecEvent {
    /// A chunk of the command's stdout.
    Stdout(OutputChunk),
    /// A chunk of the command's stderr.
    Stderr(OutputChunk),
    /// The command ended (or was killed by its timeout): the last event.
    Exit(ExecExit),
    /// The call failed after the command started (its sandbox was removed, the
    /// auto-checkpoint failed): the last event.
    Error(StreamError),
}

/// Output bytes: `data` when they are UTF-8 text, else `data_b64` (standard base64,
/// padded). A character split between two reads is held back and sent whole.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputChunk {
    /// The bytes, when they are UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// The bytes in base64, when they are not UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_b64: Option<String>,
}

impl OutputChunk {
    /// The chunk for `bytes`: text if they are UTF-8, else base64.
    pub fn of(bytes: Vec<u8>) -> Self {
        match String::from_utf8(bytes) {
            Ok(text) => Self {
                data: Some(text),
                data_b64: None,
            },
            Err(e) => Self {
                data: None,
                data_b64: Some(base64::encode(e.as_bytes())),
            },
        }
    }

    /// The bytes it carries (`None`: `data_b64` is not valid base64).
    pub fn bytes(&self) -> Option<Vec<u8>> {
        match (&self.data, &self.data_b64) {
            (Some(text), _) => Some(text.clone().into_bytes()),
            (None, Some(b64)) => base64::decode(b64),
            (None, None) => Some(Vec::new()),
        }
    }
}

/// How a streamed command ended: the fields of [`ExecResult`] but its output, which
/// came as events.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExecExit {
    /// Exit code, if it exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The signal that killed it, if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// Killed by the timeout.
    pub timed_out: bool,
    /// Output was dropped: beyond the cap (8 MiB per stream), or not taken by the
    /// client before the timeout.
    pub truncated: bool,
    /// Wall time.
    pub duration_ms: f64,
    /// The checkpoint taken after it (`auto_checkpoint`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<NodeInfo>,
}

impl From<ExecResult> for ExecExit {
    fn from(r: ExecResult) -> Self {
        Self {
            exit_code: r.exit_code,
            signal: r.signal,
            timed_out: r.timed_out,
            truncated: r.truncated,
            duration_ms: r.duration_ms,
            node: r.node,
        }
    }
}

impl ExecExit {
    /// The collected result, with the output gathered from the events.
    pub fn into_result(self, stdout: &[u8], stderr: &[u8]) -> ExecResult {
        ExecResult {
            exit_code: self.exit_code,
            signal: self.signal,
            stdout: String::from_utf8_lossy(stdout).into_owned(),
            stderr: String::from_utf8_lossy(stderr).into_owned(),
            timed_out: self.timed_out,
            truncated: self.truncated,
            duration_ms: self.duration_ms,
            node: self.node,
        }
    }
}

/// An error after a streamed command started.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamError {
    /// The error's kind, as in the `kind` field of an error answer.
    pub code: String,
    /// What went wrong.
    pub message: String,
    /// The HTTP status the same error has as an answer.
    pub status: u16,
}

/// Standard base64 (RFC 4648, padded), for output that is not UTF-8: a few lines do not
/// warrant a dependency.
pub mod base64 {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    /// `bytes` in base64.
    pub fn encode(bytes: &[u8]) -> String {
        let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
        for group in bytes.chunks(3) {
            let b = [
                group[0],
                *group.get(1).unwrap_or(&0),
                *group.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= group.len() {
                    out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    /// The bytes of base64 `text` (`None` if it is not padded base64).
    pub fn decode(text: &str) -> Option<Vec<u8>> {
        let text = text.as_bytes();
        if !text.len().is_multiple_of(4) {
            return None;
        }
        let mut out = Vec::with_capacity(text.len() / 4 * 3);
        for (index, group) in text.chunks(4).enumerate() {
            let last = index + 1 == text.len() / 4;
            let pad = group.iter().rev().take_while(|&&c| c == b'=').count();
            if pad > 2 || (pad > 0 && !last) {
                return None;
            }
            let mut n = 0u32;
            for &c in &group[..4 - pad] {
                let v = ALPHABET.iter().position(|&a| a == c)?;
                n = (n << 6) | v as u32;
            }
            n <<= 6 * pad as u32;
            let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
            out.extend_from_slice(&bytes[..3 - pad]);
        }
        Some(out)
    }
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
