//! [`ApiRequest`]: one API call as data (method, path, body, time limit), so that the
//! CLI's `--json` can send any call and print the daemon's bytes as they came.

use std::time::Duration;

use crate::routes;
use crate::sandbox_types::{
    BranchRequest, CheckpointRequest, CreateSandbox, ExecRequest, RollbackRequest, SessionRun,
    SessionStart,
};
use crate::types::CgroupRequest;

/// Longest a cgroup request may take, connection included: the daemon answers in
/// milliseconds, so this only bounds a wedged daemon.
pub(super) const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Added to an `exec`'s or `run`'s own timeout: the daemon kills the command at its
/// timeout, then still has to collect it, take an auto-checkpoint and answer.
const COMMAND_MARGIN: Duration = Duration::from_secs(60);

/// One API call.
#[derive(Clone, Debug, PartialEq)]
pub enum ApiRequest {
    /// `GET /v1/status`.
    Status,
    /// `GET /v1/cgroups`.
    Cgroups,
    /// `POST /v1/cgroups/watch`.
    Watch {
        /// The cgroup path.
        path: String,
    },
    /// `POST /v1/cgroups/unwatch`.
    Unwatch {
        /// The cgroup path.
        path: String,
    },
    /// `POST /v1/cgroups/epoch`.
    Epoch {
        /// The cgroup path.
        path: String,
    },
    /// `GET /v1/inode-stats[?cgroup=PATH]`.
    InodeStats {
        /// Only this cgroup.
        cgroup: Option<String>,
    },
    /// `GET /v1/stats`.
    Stats,
    /// `POST /v1/sandboxes`.
    CreateSandbox(CreateSandbox),
    /// `GET /v1/sandboxes`.
    ListSandboxes,
    /// `GET /v1/sandboxes/{id}`.
    GetSandbox {
        /// Sandbox id or prefix.
        sandbox: String,
    },
    /// `DELETE /v1/sandboxes/{id}`.
    RemoveSandbox {
        /// Sandbox id or prefix.
        sandbox: String,
    },
    /// `POST /v1/sandboxes/{id}/exec`.
    Exec {
        /// Sandbox id or prefix.
        sandbox: String,
        /// The command.
        req: ExecRequest,
    },
    /// `POST /v1/sandboxes/{id}/sessions`.
    SessionStart {
        /// Sandbox id or prefix.
        sandbox: String,
        /// The kind of session.
        req: SessionStart,
    },
    /// `POST /v1/sandboxes/{id}/sessions/{session}/run`.
    SessionRun {
        /// Sandbox id or prefix.
        sandbox: String,
        /// Session id or prefix.
        session: String,
        /// The code.
        req: SessionRun,
    },
    /// `DELETE /v1/sandboxes/{id}/sessions/{session}`.
    SessionStop {
        /// Sandbox id or prefix.
        sandbox: String,
        /// Session id or prefix.
        session: String,
    },
    /// `POST /v1/sandboxes/{id}/checkpoint`.
    Checkpoint {
        /// Sandbox id or prefix.
        sandbox: String,
        /// Its label.
        req: CheckpointRequest,
    },
    /// `POST /v1/sandboxes/{id}/rollback`.
    Rollback {
        /// Sandbox id or prefix.
        sandbox: String,
        /// The node and what to restore.
        req: RollbackRequest,
    },
    /// `POST /v1/nodes/{node}/branch`.
    Branch {
        /// Node id or prefix.
        node: String,
        /// How many sandboxes.
        req: BranchRequest,
    },
    /// `GET /v1/sandboxes/{id}/tree`.
    SandboxTree {
        /// Sandbox id or prefix.
        sandbox: String,
    },
    /// `GET /v1/nodes/{node}/tree`.
    NodeTree {
        /// Node id or prefix.
        node: String,
    },
    /// `GET /v1/diff?from=NODE&to=NODE`.
    Diff {
        /// The older node.
        from: String,
        /// The newer node.
        to: String,
    },
    /// `DELETE /v1/nodes/{node}`.
    RemoveNode {
        /// Node id or prefix.
        node: String,
    },
    /// `POST /v1/gc`.
    Gc,
}

impl ApiRequest {
    pub(super) fn method(&self) -> hyper::Method {
        match self {
            Self::Status
            | Self::Cgroups
            | Self::InodeStats { .. }
            | Self::Stats
            | Self::ListSandboxes
            | Self::GetSandbox { .. }
            | Self::SandboxTree { .. }
            | Self::NodeTree { .. }
            | Self::Diff { .. } => hyper::Method::GET,
            Self::Watch { .. }
            | Self::Unwatch { .. }
            | Self::Epoch { .. }
            | Self::CreateSandbox(_)
            | Self::Exec { .. }
            | Self::SessionStart { .. }
            | Self::SessionRun { .. }
            | Self::Checkpoint { .. }
            | Self::Rollback { .. }
            | Self::Branch { .. }
            | Self::Gc => hyper::Method::POST,
            Self::RemoveSandbox { .. } | Self::SessionStop { .. } | Self::RemoveNode { .. } => {
                hyper::Method::DELETE
            }
        }
    }

    /// How long the client waits for the answer; `None`: as long as it takes.
    pub(super) fn timeout(&self) -> Option<Duration> {
        match self {
            Self::Status
            | Self::Cgroups
            | Self::Watch { .. }
            | Self::Unwatch { .. }
            | Self::Epoch { .. }
            | Self::InodeStats { .. }
            | Self::Stats => Some(REQUEST_TIMEOUT),
            Self::Exec { req, .. } => req
                .timeout_ms
                .map(|ms| Duration::from_millis(ms).saturating_add(COMMAND_MARGIN)),
            Self::SessionRun { req, .. } => req
                .timeout_ms
                .map(|ms| Duration::from_millis(ms).saturating_add(COMMAND_MARGIN)),
            _ => None,
        }
    }

    pub(super) fn path_and_query(&self) -> String {
        match self {
            Self::Status => routes::STATUS.to_owned(),
            Self::Cgroups => routes::CGROUPS.to_owned(),
            Self::Watch { .. } => routes::WATCH.to_owned(),
            Self::Unwatch { .. } => routes::UNWATCH.to_owned(),
            Self::Epoch { .. } => routes::EPOCH.to_owned(),
            Self::InodeStats { cgroup: None } => routes::INODE_STATS.to_owned(),
            Self::InodeStats {
                cgroup: Some(cgroup),
            } => format!("{}?cgroup={}", routes::INODE_STATS, percent_encode(cgroup)),
            Self::Stats => routes::STATS.to_owned(),
            Self::CreateSandbox(_) | Self::ListSandboxes => routes::SANDBOXES.to_owned(),
            Self::GetSandbox { sandbox } | Self::RemoveSandbox { sandbox } => {
                routes::fill(routes::SANDBOX, &[sandbox])
            }
            Self::Exec { sandbox, .. } => routes::fill(routes::SANDBOX_EXEC, &[sandbox]),
            Self::SessionStart { sandbox, .. } => {
                routes::fill(routes::SANDBOX_SESSIONS, &[sandbox])
            }
            Self::SessionRun {
                sandbox, session, ..
            } => routes::fill(routes::SANDBOX_SESSION_RUN, &[sandbox, session]),
            Self::SessionStop { sandbox, session } => {
                routes::fill(routes::SANDBOX_SESSION, &[sandbox, session])
            }
            Self::Checkpoint { sandbox, .. } => {
                routes::fill(routes::SANDBOX_CHECKPOINT, &[sandbox])
            }
            Self::Rollback { sandbox, .. } => routes::fill(routes::SANDBOX_ROLLBACK, &[sandbox]),
            Self::Branch { node, .. } => routes::fill(routes::NODE_BRANCH, &[node]),
            Self::SandboxTree { sandbox } => routes::fill(routes::SANDBOX_TREE, &[sandbox]),
            Self::NodeTree { node } => routes::fill(routes::NODE_TREE, &[node]),
            Self::RemoveNode { node } => routes::fill(routes::NODE, &[node]),
            Self::Diff { from, to } => format!(
                "{}?from={}&to={}",
                routes::DIFF,
                routes::encode_segment(from),
                routes::encode_segment(to)
            ),
            Self::Gc => routes::GC.to_owned(),
        }
    }

    pub(super) fn body(&self) -> Option<String> {
        // These bodies are plain structs of strings, numbers and maps with string
        // keys: serialising them cannot fail.
        fn json<T: serde::Serialize>(value: &T) -> Option<String> {
            Some(serde_json::to_string(value).unwrap_or_default())
        }
        match self {
            Self::Watch { path } | Self::Unwatch { path } | Self::Epoch { path } => {
                json(&CgroupRequest { path: path.clone() })
            }
            Self::CreateSandbox(req) => json(req),
            Self::Exec { req, .. } => json(req),
            Self::SessionStart { req, .. } => json(req),
            Self::SessionRun { req, .. } => json(req),
            Self::Checkpoint { req, .. } => json(req),
            Self::Rollback { req, .. } => json(req),
            Self::Branch { req, .. } => json(req),
            _ => None,
        }
    }
}

/// Percent-encodes a query value: everything but RFC 3986 unreserved characters and `/`.
fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~/".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_wait_as_long_as_they_may_run() {
        let exec = |timeout_ms| ApiRequest::Exec {
            sandbox: "sb".into(),
            req: ExecRequest {
                argv: vec!["true".into()],
                timeout_ms,
                ..ExecRequest::default()
            },
        };
        assert_eq!(exec(None).timeout(), None);
        assert_eq!(
            exec(Some(1_200_000)).timeout(),
            Some(Duration::from_secs(1260))
        );
        let run = ApiRequest::SessionRun {
            sandbox: "sb".into(),
            session: "s".into(),
            req: SessionRun {
                code: String::new(),
                timeout_ms: Some(5),
            },
        };
        assert_eq!(run.timeout(), Some(Duration::from_millis(60_005)));
        assert_eq!(ApiRequest::Gc.timeout(), None);
        assert_eq!(ApiRequest::Status.timeout(), Some(REQUEST_TIMEOUT));
    }

    #[test]
    fn fills_paths_and_queries() {
        let run = ApiRequest::SessionRun {
            sandbox: "a/b".into(),
            session: "s 1".into(),
            req: SessionRun {
                code: String::new(),
                timeout_ms: None,
            },
        };
        assert_eq!(
            run.path_and_query(),
            "/v1/sandboxes/a%2Fb/sessions/s%201/run"
        );
        let diff = ApiRequest::Diff {
            from: "n&1".into(),
            to: "n2".into(),
        };
        assert_eq!(diff.path_and_query(), "/v1/diff?from=n%261&to=n2");
        assert_eq!(ApiRequest::Gc.method(), hyper::Method::POST);
        assert_eq!(run.body().as_deref(), Some(r#"{"code":""}"#));
    }
    #[test]
    fn encodes_query_values() {
        assert_eq!(percent_encode("/sys/fs/cgroup/a b"), "/sys/fs/cgroup/a%20b");
        assert_eq!(percent_encode("x&y=z%"), "x%26y%3Dz%25");
        assert_eq!(percent_encode("é"), "%C3%A9");
    }
}
