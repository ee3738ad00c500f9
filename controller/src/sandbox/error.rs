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
            Self::NodeNotRestorable { .. } | Self::Process { .. } | Self::Session { .. } => 422,
            Self::DiskFull { .. } => 507,
            Self::Internal { .. } => 500,
        }
    }

    /// Every kind, for the contract test.
    pub const KINDS: [&'static str; 13] = [
        "unknown_sandbox",
        "unknown_node",
        "unknown_session",
        "ambiguous_id",
        "node_of_another_tree",
        "node_not_restorable",
        "invalid_request",
        "node_in_use",
        "busy",
        "disk_full",
        "session_failed",
        "process_not_restorable",
        "internal",
    ];

    /// An internal error from anything printable, with context.
    pub fn internal(context: impl std::fmt::Display, err: impl std::fmt::Display) -> Self {
        Self::Internal {
            message: format!("{context}: {err}"),
        }
    }
}
