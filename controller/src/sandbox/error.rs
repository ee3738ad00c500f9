//! Errors of sandbox operations, each with a stable machine-readable kind.

/// Errors of sandbox operations. [`SandboxError::kind`] is the API's stable `kind`.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// No sandbox has this id or prefix.
    #[error("unknown sandbox {id:?}")]
    UnknownSandbox {
        /// What was asked for.
        id: String,
    },
    /// No node has this id or prefix.
    #[error("unknown node {id:?}")]
    UnknownNode {
        /// What was asked for.
        id: String,
    },
    /// The sandbox has no session with this id or prefix.
    #[error("sandbox {sandbox} has no session {id:?}")]
    UnknownSession {
        /// The sandbox.
        sandbox: String,
        /// What was asked for.
        id: String,
    },
    /// A prefix matches several ids.
    #[error("{what} prefix {prefix:?} is ambiguous: it matches {}", candidates.join(", "))]
    Ambiguous {
        /// `sandbox`, `node` or `session`.
        what: &'static str,
        /// The prefix.
        prefix: String,
        /// What it matches.
        candidates: Vec<String>,
    },
    /// The node belongs to another tree than the sandbox.
    #[error(
        "node {node} belongs to tree {node_tree}, sandbox {sandbox} to tree {sandbox_tree}: \
         a sandbox can only go to nodes of its own tree (branch from the node instead)"
    )]
    NodeOfAnotherTree {
        /// The node.
        node: String,
        /// Its tree.
        node_tree: String,
        /// The sandbox.
        sandbox: String,
        /// Its tree.
        sandbox_tree: String,
    },
    /// The node's processes can no longer be restored (its templates are gone).
    #[error(
        "node {node} has no live template for session {session}: its processes cannot be restored ({why})"
    )]
    NodeNotRestorable {
        /// The node.
        node: String,
        /// The session.
        session: String,
        /// Why.
        why: String,
    },
    /// The request is well-formed JSON but asks for something invalid.
    #[error("invalid request: {message}")]
    Invalid {
        /// What is wrong.
        message: String,
    },
    /// The node is still the head of a live sandbox.
    #[error("node {node} is in use by sandbox(es) {}: roll them elsewhere or remove them first", sandboxes.join(", "))]
    NodeInUse {
        /// The node.
        node: String,
        /// The sandboxes whose head is in the subtree.
        sandboxes: Vec<String>,
    },
    /// Another operation on the sandbox did not end within the wait.
    #[error(
        "sandbox {sandbox} is busy: {operation} has run for {for_ms} ms and this request \
         waited {waited_ms} ms for it; retry later"
    )]
    Busy {
        /// The sandbox.
        sandbox: String,
        /// The operation in progress (`exec`, `session run`, `checkpoint`, …).
        operation: String,
        /// How long it has run.
        for_ms: u64,
        /// How long this request waited.
        waited_ms: u64,
    },
    /// A limit of the sandbox stopped the operation: the memory limit (the OOM killer
    /// killed the session) or the pids limit (a process could not be forked).
    #[error("sandbox {sandbox}: its {limit} limit is reached: {message}")]
    LimitsExceeded {
        /// The sandbox.
        sandbox: String,
        /// `memory` or `pids`.
        limit: &'static str,
        /// What failed.
        message: String,
    },
    /// The sandbox's store is out of space.
    #[error("disk full: {message}")]
    DiskFull {
        /// What failed.
        message: String,
    },
    /// A session failed (exited, unresponsive).
    #[error("session {session} of sandbox {sandbox}: {message}")]
    Session {
        /// The sandbox.
        sandbox: String,
        /// The session.
        session: String,
        /// What happened.
        message: String,
    },
    /// A process of the sandbox cannot be checkpointed or restored.
    #[error("sandbox {sandbox}: {message}")]
    Process {
        /// The sandbox.
        sandbox: String,
        /// DeltaCR's error.
        message: String,
    },
    /// Anything else.
    #[error("{message}")]
    Internal {
        /// What failed.
        message: String,
    },
}

impl SandboxError {
    /// The stable `kind` of the API's error body.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::UnknownSandbox { .. } => "unknown_sandbox",
            Self::UnknownNode { .. } => "unknown_node",
            Self::UnknownSession { .. } => "unknown_session",
            Self::Ambiguous { .. } => "ambiguous_id",
            Self::NodeOfAnotherTree { .. } => "node_of_another_tree",
            Self::NodeNotRestorable { .. } => "node_not_restorable",
            Self::Invalid { .. } => "invalid_request",
            Self::NodeInUse { .. } => "node_in_use",
            Self::Busy { .. } => "busy",
            Self::LimitsExceeded { .. } => "limits_exceeded",
            Self::DiskFull { .. } => "disk_full",
            Self::Session { .. } => "session_failed",
            Self::Process { .. } => "process_not_restorable",
            Self::Internal { .. } => "internal",
        }
    }

    /// The HTTP status that fits.
    pub fn http_status(&self) -> u16 {
        match self {
            Self::UnknownSandbox { .. }
            | Self::UnknownNode { .. }
            | Self::UnknownSession { .. } => 404,
            Self::Ambiguous { .. } | Self::Invalid { .. } => 400,
            Self::NodeOfAnotherTree { .. } | Self::NodeInUse { .. } | Self::Busy { .. } => 409,
            Self::NodeNotRestorable { .. }
            | Self::Process { .. }
            | Self::Session { .. }
            | Self::LimitsExceeded { .. } => 422,
            Self::DiskFull { .. } => 507,
            Self::Internal { .. } => 500,
        }
    }

    /// Every kind, for the contract test.
    pub const KINDS: [&'static str; 14] = [
        "unknown_sandbox",
        "unknown_node",
        "unknown_session",
        "ambiguous_id",
        "node_of_another_tree",
        "node_not_restorable",
        "invalid_request",
        "node_in_use",
        "busy",
        "limits_exceeded",
        "disk_full",
        "session_failed",
        "process_not_restorable",
        "internal",
    ];

    /// Whether `err` (or an error it wraps) is the errno `errno`: how a fork refused by
    /// the pids limit (`EAGAIN`) is told from other failures.
    pub fn caused_by_errno(err: &(dyn std::error::Error + 'static), errno: i32) -> bool {
        let mut cur = Some(err);
        while let Some(e) = cur {
            if let Some(io) = e.downcast_ref::<std::io::Error>()
                && io.raw_os_error() == Some(errno)
            {
                return true;
            }
            if let Some(nix) = e.downcast_ref::<nix::errno::Errno>()
                && *nix as i32 == errno
            {
                return true;
            }
            cur = e.source();
        }
        false
    }

    /// An internal error from anything printable, with context.
    pub fn internal(context: impl std::fmt::Display, err: impl std::fmt::Display) -> Self {
        Self::Internal {
            message: format!("{context}: {err}"),
        }
    }
}
