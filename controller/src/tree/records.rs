//! The records the tree database stores, and their versioned encoding.
//!
//! Each record is stored as JSON inside an envelope `{"version": N, "record": {...}}`.
//! [`RECORD_VERSION`] is the version this build writes; [`decode`] reads every version
//! it knows (today only 1) and refuses newer ones with an error that names the record,
//! so a downgraded daemon stops instead of misreading a newer database.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::ids::{NodeId, SandboxId, SessionId, TreeId};

/// The record encoding version this build writes.
pub const RECORD_VERSION: u32 = 1;

/// A sandbox's lifecycle state as recorded. A sandbox found `Creating` or `Removing`
/// after a restart was half made or half removed, and is cleaned up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxState {
    /// Being set up; not yet acknowledged to the client.
    Creating,
    /// Set up and acknowledged.
    Running,
    /// Being torn down.
    Removing,
}

/// A live sandbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxRecord {
    /// The sandbox.
    pub id: SandboxId,
    /// The checkpoint tree its nodes belong to.
    pub tree: TreeId,
    /// When it was created, unix ms.
    pub created_ms: u64,
    /// Its base root tree; `None` = the embedded default base.
    pub rootfs: Option<PathBuf>,
    /// The runtime's resource limits, opaque here.
    pub limits: serde_json::Value,
    /// Whether the daemon checkpoints it after each command.
    pub auto_checkpoint: bool,
    /// The node it last checkpointed or rolled back to: the parent of its next checkpoint.
    pub head: Option<NodeId>,
    /// The node it was branched from, if it is a branch.
    pub branched_from: Option<NodeId>,
    /// Its persistent sessions.
    pub sessions: Vec<SessionRecord>,
    /// Its lifecycle state.
    pub state: SandboxState,
}

/// A persistent session of a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// The session.
    pub id: SessionId,
    /// The interpreter: `"bash"` or `"python"`.
    pub kind: String,
    /// When it was started, unix ms.
    pub started_ms: u64,
}

/// Where a node stands: the two fields of a [`NodeRecord`] the database's checks read,
/// decoded without the rest (its sessions' register state is most of a record).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct NodePlace {
    /// The tree it belongs to.
    pub tree: TreeId,
    /// Its parent.
    pub parent: Option<NodeId>,
}

/// A checkpoint: a node of a tree.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// The node.
    pub id: NodeId,
    /// The tree it belongs to.
    pub tree: TreeId,
    /// The sandbox it was taken in.
    pub sandbox: SandboxId,
    /// The node the sandbox was at when it was taken; `None` for a tree's first node.
    /// Never changes once stored.
    pub parent: Option<NodeId>,
    /// The user's label.
    pub label: Option<String>,
    /// When it was taken, unix ms.
    pub created_ms: u64,
    /// The DeltaFS snapshot id of its files (a UUID, as DeltaFS prints it).
    pub snapshot: String,
    /// Its sessions' process state, one per session.
    pub sessions: Vec<NodeSession>,
    /// Bytes owned (file layer + dump); 0 if unknown.
    pub bytes: u64,
    /// How long the checkpoint took, ms.
    pub checkpoint_ms: f64,
    /// The limits of the sandbox it was taken in (the runtime's `Limits`, opaque here):
    /// branches get them even once that sandbox is gone.
    #[serde(default)]
    pub limits: serde_json::Value,
    /// The sandbox's other processes at the checkpoint (background jobs, children of
    /// sessions, servers), one template each.
    #[serde(default)]
    pub processes: Vec<NodeProcess>,
    /// DeltaCR's record of the pipes to and between those processes, with the bytes
    /// unread in them (`Vec<PipeState>`, opaque here); `null` when there are none.
    #[serde(default)]
    pub pipes: serde_json::Value,
}

/// A process of a sandbox other than its sessions, in a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeProcess {
    /// Its pid in the host's pid namespace at the checkpoint.
    pub pid: i32,
    /// Its name.
    pub comm: String,
    /// The live DeltaCR template, if one is kept.
    pub template: Option<TemplateRecord>,
}

/// One session's process state in a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeSession {
    /// The session.
    pub session: SessionId,
    /// The interpreter: `"bash"` or `"python"`.
    pub kind: String,
    /// The live DeltaCR template, if one is kept.
    pub template: Option<TemplateRecord>,
}

/// A frozen DeltaCR template process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TemplateRecord {
    /// Its pid in the host's pid namespace.
    pub host_pid: i32,
    /// The cgroup that keeps it frozen.
    pub cgroup: PathBuf,
    /// DeltaCR's `ProcessState`, opaque here.
    pub state: serde_json::Value,
}

/// A checkpoint tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeRecord {
    /// The tree.
    pub id: TreeId,
    /// When it was created, unix ms.
    pub created_ms: u64,
    /// The base root tree of its sandboxes; `None` = the embedded default base.
    pub rootfs: Option<PathBuf>,
}

/// The current unix time in milliseconds (0 if the clock is before 1970).
pub fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Why a stored value could not be turned into a record.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The value is not JSON of the expected shape.
    #[error("malformed record: {0}")]
    Malformed(#[source] serde_json::Error),
    /// The value was written by a newer build.
    #[error("record version {found} is newer than this build reads (up to {RECORD_VERSION})")]
    TooNew {
        /// The version found.
        found: u32,
    },
    /// The value has a version this build never wrote.
    #[error("record version {found} is unknown")]
    Unknown {
        /// The version found.
        found: u32,
    },
}

#[derive(Serialize)]
struct EnvelopeOut<'a, T> {
    version: u32,
    record: &'a T,
}

/// The envelope's version alone (the record is skipped unparsed).
#[derive(Deserialize)]
struct EnvelopeVersion {
    version: u32,
}

/// A version 1 envelope, its record parsed straight into `T` (no `Value` tree: a node
/// holds thousands of numbers of register state).
#[derive(Deserialize)]
struct EnvelopeV1<T> {
    record: T,
}

/// Encodes a record in the current version's envelope.
pub fn encode<T: Serialize>(record: &T) -> Result<String, serde_json::Error> {
    serde_json::to_string(&EnvelopeOut {
        version: RECORD_VERSION,
        record,
    })
}

/// Decodes a record from its envelope. A future version 2 adds its migration from 1
/// here, so callers always see the current shape.
pub fn decode<T: DeserializeOwned>(stored: &str) -> Result<T, RecordError> {
    let env: EnvelopeVersion = serde_json::from_str(stored).map_err(RecordError::Malformed)?;
    match env.version {
        1 => serde_json::from_str::<EnvelopeV1<T>>(stored)
            .map(|env| env.record)
            .map_err(RecordError::Malformed),
        found if found > RECORD_VERSION => Err(RecordError::TooNew { found }),
        found => Err(RecordError::Unknown { found }),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sandbox(tree: TreeId, head: Option<NodeId>) -> SandboxRecord {
        SandboxRecord {
            id: SandboxId::new(),
            tree,
            created_ms: 1_700_000_000_000,
            rootfs: Some(PathBuf::from("/srv/rootfs/debian")),
            limits: serde_json::json!({"memory": 2147483648u64, "cpus": 1.5}),
            auto_checkpoint: true,
            head,
            branched_from: head,
            sessions: vec![SessionRecord {
                id: SessionId::new(),
                kind: "python".into(),
                started_ms: 1_700_000_000_500,
            }],
            state: SandboxState::Running,
        }
    }

    pub(crate) fn node(
        tree: TreeId,
        sandbox: SandboxId,
        parent: Option<NodeId>,
        created_ms: u64,
    ) -> NodeRecord {
        NodeRecord {
            id: NodeId::new(),
            tree,
            sandbox,
            parent,
            label: Some("after pip install".into()),
            created_ms,
            snapshot: "01a20200-0000-7000-8000-000000000042".to_owned(),
            sessions: vec![NodeSession {
                session: SessionId::new(),
                kind: "bash".into(),
                template: Some(TemplateRecord {
                    host_pid: 4242,
                    cgroup: PathBuf::from("/sys/fs/cgroup/unified/deltabox/t/x"),
                    state: serde_json::json!({"regs": [1, 2, 3], "cwd": "/workspace"}),
                }),
            }],
            bytes: 4096,
            checkpoint_ms: 1.25,
            limits: serde_json::Value::Null,
            processes: Vec::new(),
            pipes: serde_json::Value::Null,
        }
    }

    fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(r: &T) {
        let s = encode(r).unwrap();
        assert!(s.starts_with("{\"version\":1,\"record\":{"), "{s}");
        assert_eq!(&decode::<T>(&s).unwrap(), r);
    }

    #[test]
    fn every_record_round_trips() {
        let tree = TreeRecord {
            id: TreeId::new(),
            created_ms: 7,
            rootfs: None,
        };
        round_trip(&tree);
        let mut sb = sandbox(tree.id, Some(NodeId::new()));
        round_trip(&sb);
        sb.state = SandboxState::Creating;
        sb.head = None;
        round_trip(&sb);
        sb.state = SandboxState::Removing;
        round_trip(&sb);
        let mut n = node(tree.id, sb.id, None, 9);
        round_trip(&n);
        n.sessions[0].template = None;
        n.label = None;
        n.parent = Some(NodeId::new());
        round_trip(&n);
        round_trip(&n.sessions[0]);
        round_trip(&sb.sessions[0]);
    }

    #[test]
    fn state_is_stored_lower_case() {
        let s = serde_json::to_string(&SandboxState::Running).unwrap();
        assert_eq!(s, "\"running\"");
    }

    #[test]
    fn newer_and_malformed_versions_are_refused() {
        let e = decode::<TreeRecord>(r#"{"version":2,"record":{}}"#).unwrap_err();
        assert!(matches!(e, RecordError::TooNew { found: 2 }), "{e}");
        let e = decode::<TreeRecord>(r#"{"version":0,"record":{}}"#).unwrap_err();
        assert!(matches!(e, RecordError::Unknown { found: 0 }), "{e}");
        let e = decode::<TreeRecord>(r#"{"id":"x"}"#).unwrap_err();
        assert!(matches!(e, RecordError::Malformed(_)), "{e}");
    }
}
