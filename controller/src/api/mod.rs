//! The daemon's HTTP/JSON API, served on a Unix socket.
//!
//! - [`types`]: request and response bodies, shared by server and client.
//! - [`service`]: what each endpoint does, synchronous and HTTP-free.
//! - [`server`]: the axum routers (API and `/metrics`) over a [`service::ApiService`].
//! - [`client`]: the `deltabox-client` crate (a hyper client over the Unix socket, used
//!   by the `deltabox` CLI), re-exported with [`types`], [`sandbox_types`] and [`routes`].
//! - [`render`]: API values as text tables, for the binaries.
//! - [`sandbox_types`]: bodies of the sandbox endpoints; [`sandbox_server`]: their
//!   handlers over a [`crate::sandbox::SandboxOps`]; [`sandbox_render`]: their text.
//! - [`exec_stream`]: the streamed `exec` (newline-delimited JSON events).
//!
//! The contract is `controller/api/openapi.yaml`; tests check that the router serves
//! exactly the routes it lists and answers with the fields it documents. Every error
//! is `{"error": "<message>", "kind": "<snake_case kind>"}` with a fitting status.

/// The API's client: the `deltabox-client` crate, which the `deltabox` CLI uses.
pub use deltabox_client as client;
pub mod exec_stream;
pub mod render;
pub mod sandbox_render;
pub mod sandbox_server;
pub use deltabox_client::sandbox_types;
pub mod server;
pub mod service;
pub use deltabox_client::types;

#[cfg(test)]
pub(crate) mod fake;
#[cfg(test)]
mod tests;

use std::error::Error as _;

use axum::http::StatusCode;

use crate::bpf::BpfError;
use crate::cgroup::CgroupError;
use crate::sandbox::SandboxError;

/// Paths of the API's routes, shared by server, client and tests.
pub use deltabox_client::routes;

/// Machine-readable kinds of API errors (the `kind` field).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The JSON body is malformed, has the wrong fields, or the content type is wrong.
    InvalidBody,
    /// The query string is malformed or has unknown parameters.
    InvalidQuery,
    /// The cgroup path is empty or resolves outside the cgroup2 mount.
    InvalidCgroupPath,
    /// No directory exists at the cgroup path.
    CgroupNotFound,
    /// The path exists but is not a cgroup v2 directory.
    NotACgroup,
    /// The cgroup is not watched.
    NotWatched,
    /// The eBPF programs are no longer pinned (unloaded under the daemon).
    BpfNotLoaded,
    /// An eBPF map operation failed.
    Bpf,
    /// Reading the cgroup filesystem failed.
    CgroupIo,
    /// No such route.
    RouteNotFound,
    /// The route exists, not with this method.
    MethodNotAllowed,
    /// Anything else that went wrong in the daemon.
    Internal,
    /// A path parameter (a sandbox, node or session id) is not valid UTF-8.
    InvalidPath,
    /// The request body is larger than [`MAX_BODY_BYTES`].
    BodyTooLarge,
    /// The daemon runs without sandbox support.
    SandboxesDisabled,
    /// A sandbox operation failed: one of [`SandboxError::KINDS`].
    Sandbox(&'static str),
}

impl ErrorKind {
    /// Every kind but the sandbox ones ([`Self::all_names`] has those too).
    pub const ALL: [Self; 15] = [
        Self::InvalidBody,
        Self::InvalidQuery,
        Self::InvalidCgroupPath,
        Self::CgroupNotFound,
        Self::NotACgroup,
        Self::NotWatched,
        Self::BpfNotLoaded,
        Self::Bpf,
        Self::CgroupIo,
        Self::RouteNotFound,
        Self::MethodNotAllowed,
        Self::Internal,
        Self::InvalidPath,
        Self::BodyTooLarge,
        Self::SandboxesDisabled,
    ];

    /// The name of every kind the API can answer, sandbox kinds included, sorted and
    /// without duplicates (`internal` is both an API and a sandbox kind).
    pub fn all_names() -> Vec<&'static str> {
        let mut names: Vec<&'static str> = Self::ALL
            .iter()
            .map(|k| k.as_str())
            .chain(SandboxError::KINDS)
            .collect();
        names.sort_unstable();
        names.dedup();
        names
    }

    /// The snake_case name sent in the `kind` field.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidBody => "invalid_body",
            Self::InvalidQuery => "invalid_query",
            Self::InvalidCgroupPath => "invalid_cgroup_path",
            Self::CgroupNotFound => "cgroup_not_found",
            Self::NotACgroup => "not_a_cgroup",
            Self::NotWatched => "not_watched",
            Self::BpfNotLoaded => "bpf_not_loaded",
            Self::Bpf => "bpf",
            Self::CgroupIo => "cgroup_io",
            Self::RouteNotFound => "route_not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::Internal => "internal",
            Self::InvalidPath => "invalid_path",
            Self::BodyTooLarge => "body_too_large",
            Self::SandboxesDisabled => "sandboxes_disabled",
            Self::Sandbox(kind) => kind,
        }
    }
}

/// Largest request body the API reads (a sandbox's `exec` may carry its stdin).
pub const MAX_BODY_BYTES: usize = 16 << 20;

/// Errors the API answers with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request body was rejected.
    #[error("invalid request body: {message}")]
    InvalidBody {
        /// What is wrong with it.
        message: String,
    },
    /// The query string was rejected.
    #[error("invalid query: {message}")]
    InvalidQuery {
        /// What is wrong with it.
        message: String,
    },
    /// The cgroup path did not resolve.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// The cgroup exists but is not watched.
    #[error("cgroup {path} (id {id}) is not watched")]
    NotWatched {
        /// Its path.
        path: String,
        /// Its id.
        id: u64,
    },
    /// A tracker operation failed.
    #[error("eBPF tracker failed to {op}")]
    Bpf {
        /// The operation (`watch a cgroup`, `read counters`...).
        op: &'static str,
        /// Why (boxed: aya's errors are large and this travels in every `Result`).
        #[source]
        source: Box<BpfError>,
    },
    /// No route for this path.
    #[error("no route for {method} {path}")]
    RouteNotFound {
        /// Request method.
        method: String,
        /// Request path.
        path: String,
    },
    /// The route does not take this method.
    #[error("{path} does not accept {method}")]
    MethodNotAllowed {
        /// Request method.
        method: String,
        /// Request path.
        path: String,
    },
    /// A path parameter was rejected.
    #[error("invalid path parameter: {message}")]
    InvalidPath {
        /// What is wrong with it.
        message: String,
    },
    /// The body is larger than [`MAX_BODY_BYTES`].
    #[error("request body is larger than the limit of {limit} bytes")]
    BodyTooLarge {
        /// The limit.
        limit: usize,
    },
    /// No [`crate::sandbox::SandboxOps`] was given to the service.
    #[error("sandboxes are disabled in this daemon (it was started without sandbox support)")]
    SandboxesDisabled,
    /// A sandbox operation failed.
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    /// Something else failed in the daemon.
    #[error("internal error: {message}")]
    Internal {
        /// What failed.
        message: String,
    },
}

impl ApiError {
    /// The `kind` field and HTTP status of this error.
    pub fn kind_and_status(&self) -> (ErrorKind, StatusCode) {
        match self {
            Self::InvalidBody { .. } => (ErrorKind::InvalidBody, StatusCode::BAD_REQUEST),
            Self::InvalidQuery { .. } => (ErrorKind::InvalidQuery, StatusCode::BAD_REQUEST),
            Self::Cgroup(err) => match err {
                CgroupError::NotFound { .. } => (ErrorKind::CgroupNotFound, StatusCode::NOT_FOUND),
                CgroupError::NotACgroup { .. } => (ErrorKind::NotACgroup, StatusCode::NOT_FOUND),
                CgroupError::OutsideMount { .. } | CgroupError::EmptyPath => {
                    (ErrorKind::InvalidCgroupPath, StatusCode::BAD_REQUEST)
                }
                CgroupError::MountInfo { .. }
                | CgroupError::NoCgroup2Mount { .. }
                | CgroupError::Reconfigure { .. }
                | CgroupError::Io { .. } => {
                    (ErrorKind::CgroupIo, StatusCode::INTERNAL_SERVER_ERROR)
                }
            },
            Self::NotWatched { .. } => (ErrorKind::NotWatched, StatusCode::NOT_FOUND),
            Self::Bpf { source, .. } => match &**source {
                BpfError::NotWatched { .. } => (ErrorKind::NotWatched, StatusCode::NOT_FOUND),
                // The pins were removed under a running daemon: a state to fix, not a bug.
                BpfError::NotLoaded { .. } | BpfError::Incomplete { .. } => {
                    (ErrorKind::BpfNotLoaded, StatusCode::CONFLICT)
                }
                // Load, map and filesystem failures: internal (new variants land here too).
                _ => (ErrorKind::Bpf, StatusCode::INTERNAL_SERVER_ERROR),
            },
            Self::RouteNotFound { .. } => (ErrorKind::RouteNotFound, StatusCode::NOT_FOUND),
            Self::MethodNotAllowed { .. } => {
                (ErrorKind::MethodNotAllowed, StatusCode::METHOD_NOT_ALLOWED)
            }
            Self::Internal { .. } => (ErrorKind::Internal, StatusCode::INTERNAL_SERVER_ERROR),
            Self::InvalidPath { .. } => (ErrorKind::InvalidPath, StatusCode::BAD_REQUEST),
            Self::BodyTooLarge { .. } => (ErrorKind::BodyTooLarge, StatusCode::PAYLOAD_TOO_LARGE),
            Self::SandboxesDisabled => (
                ErrorKind::SandboxesDisabled,
                StatusCode::SERVICE_UNAVAILABLE,
            ),
            Self::Sandbox(err) => (
                ErrorKind::Sandbox(err.kind()),
                StatusCode::from_u16(err.http_status())
                    .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            ),
        }
    }

    /// The message sent in the `error` field: this error and its causes, joined by `: `.
    pub fn message(&self) -> String {
        // `transparent` forwards `source()` to the inner error's own cause, so nothing
        // is printed twice.
        let mut causes = Vec::new();
        let mut source = self.source();
        while let Some(err) = source {
            causes.push(err.to_string());
            source = err.source();
        }
        join_causes(std::iter::once(self.to_string()).chain(causes))
    }
}

/// Joins an error's message and its causes' with `: `, skipping a cause whose text
/// the message already ends with (some errors print their source in their own
/// message and also return it from `source()`).
pub fn join_causes(messages: impl IntoIterator<Item = String>) -> String {
    let mut joined = String::new();
    for message in messages {
        if joined.is_empty() {
            joined = message;
        } else if !joined.ends_with(&message) {
            joined.push_str(": ");
            joined.push_str(&message);
        }
    }
    joined
}

#[cfg(test)]
mod message_tests {
    use super::*;

    #[test]
    fn causes_already_printed_are_not_repeated() {
        let joined = join_causes(["a: b: c".to_owned(), "b: c".to_owned(), "c".to_owned()]);
        assert_eq!(joined, "a: b: c");
        let joined = join_causes(["a".to_owned(), "b".to_owned()]);
        assert_eq!(joined, "a: b");
    }
}
