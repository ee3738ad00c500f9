//! `deltabox-client`: the Rust client of `deltaboxd`'s HTTP/JSON API, over the daemon's
//! Unix socket (hyper 1, HTTP/1.1, one connection per request). The `deltabox` CLI is
//! built on it; a Rust agent uses it the same way:
//!
//! ```no_run
//! use deltabox_client::sandbox_types::{
//!     CheckpointRequest, CreateSandbox, ExecRequest, RollbackMode, RollbackRequest,
//! };
//! use deltabox_client::{Client, DEFAULT_SOCKET};
//!
//! # async fn agent() -> Result<(), deltabox_client::ClientError> {
//! let client = Client::new(DEFAULT_SOCKET);
//! let sandbox = client.create_sandbox(&CreateSandbox::default()).await?;
//! let shell = |line: &str| ExecRequest {
//!     argv: vec!["bash".into(), "-c".into(), line.into()],
//!     ..ExecRequest::default()
//! };
//! client.exec(&sandbox.id, &shell("echo one > /workspace/f")).await?;
//! let node = client.checkpoint(&sandbox.id, &CheckpointRequest::default()).await?;
//! client.exec(&sandbox.id, &shell("rm /workspace/f")).await?;
//! let back = RollbackRequest {
//!     node: node.id.clone(),
//!     mode: RollbackMode::All,
//!     warm_up: None,
//! };
//! client.rollback(&sandbox.id, &back).await?;
//! let out = client.exec(&sandbox.id, &shell("cat /workspace/f")).await?;
//! assert_eq!(out.stdout, "one\n");
//! client.remove_sandbox(&sandbox.id).await?;
//! # Ok(())
//! # }
//! ```
//!
//! - [`Client`]: one method per route, each returning the route's typed answer or a
//!   [`ClientError`] (an API error keeps its stable `kind`, as listed in `docs/api.md`);
//! - [`sandbox_types`], [`types`]: the request and response bodies (serde), the same
//!   values the daemon serialises; [`routes`]: the paths;
//! - [`ApiRequest`]: every request as a value, for [`Client::call`] / [`Client::send`];
//! - [`ExecEvents`]: a streamed `exec`'s events as they come.
//!
//! Time limits: the cgroup endpoints answer in milliseconds and get 30 s; a sandbox
//! `exec` or session `run` gets its own `timeout_ms` plus a margin (none without one);
//! the other sandbox calls have no client-side limit (a branch of 64 sandboxes or a
//! `gc` over a large store may take long, and calls on one sandbox wait their turn).

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::header::{ACCEPT, CONTENT_TYPE, HOST};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;
use tokio::task::JoinHandle;

use crate::sandbox_types::{
    BranchRequest, BranchResult, CheckpointRequest, CreateSandbox, DiffResult, ExecRequest,
    ExecResult, GcResult, NodeInfo, Removed, RollbackRequest, RollbackResult, SandboxInfo,
    SandboxList, SessionInfo, SessionRun, SessionRunResult, SessionStart, TreeView,
};
use crate::types::{CgroupsResponse, ErrorBody, InodeStatsResponse, StatusResponse, WatchedCgroup};

/// The media type of a streamed `exec` answer (newline-delimited JSON events).
pub const NDJSON: &str = "application/x-ndjson";

/// Default path of the API socket.
pub const DEFAULT_SOCKET: &str = "/run/deltabox/api.sock";

mod request;
pub mod routes;
pub mod sandbox_types;
mod stream;
pub mod types;

pub use request::ApiRequest;
pub use stream::ExecEvents;

/// Errors of API calls.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No socket file at the path.
    #[error(
        "deltaboxd is not running (no socket at {}): start it with `deltaboxd serve`",
        socket.display()
    )]
    NotRunning {
        /// The socket path.
        socket: PathBuf,
    },
    /// A socket file, but nothing listens on it (the daemon died without removing it).
    #[error(
        "deltaboxd is not running (nothing listens on {}): start it with `deltaboxd serve`",
        socket.display()
    )]
    StaleSocket {
        /// The socket path.
        socket: PathBuf,
    },
    /// The socket is mode 0600 root.
    #[error("permission denied on {}: run as root", socket.display())]
    PermissionDenied {
        /// The socket path.
        socket: PathBuf,
    },
    /// Connecting failed otherwise.
    #[error("cannot connect to deltaboxd at {}", socket.display())]
    Connect {
        /// The socket path.
        socket: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The HTTP exchange failed (the daemon closed the connection, for instance).
    #[error("HTTP exchange with deltaboxd at {} failed", socket.display())]
    Http {
        /// The socket path.
        socket: PathBuf,
        /// Why.
        #[source]
        source: hyper::Error,
    },
    /// The daemon did not answer in time.
    #[error("deltaboxd at {} did not answer within {} s", socket.display(), timeout.as_secs())]
    Timeout {
        /// The socket path.
        socket: PathBuf,
        /// The limit.
        timeout: Duration,
    },
    /// The daemon answered with an API error.
    #[error("{message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// The error's `kind`.
        kind: String,
        /// The error's message.
        message: String,
    },
    /// The daemon answered something that is not the API's JSON.
    #[error("unexpected answer from deltaboxd (HTTP {status}): {detail}")]
    BadResponse {
        /// HTTP status.
        status: u16,
        /// What was wrong with it.
        detail: String,
    },
}

impl ClientError {
    /// The `deltabox` exit code for this error, documented in `docs/cli.md` (0 is
    /// success, 1 an error that is not a `ClientError`, 2 clap's bad arguments).
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::NotRunning { .. } | Self::StaleSocket { .. } => 3,
            Self::PermissionDenied { .. } => 4,
            Self::Api { status, .. } if (400..500).contains(status) => 5,
            Self::Api { .. }
            | Self::Connect { .. }
            | Self::Http { .. }
            | Self::Timeout { .. }
            | Self::BadResponse { .. } => 6,
        }
    }
}

/// A client of one daemon's API socket.
#[derive(Clone, Debug)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    /// A client of the daemon listening on `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
        }
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `GET /v1/status`.
    pub async fn status(&self) -> Result<StatusResponse, ClientError> {
        self.call(&ApiRequest::Status).await
    }

    /// `GET /v1/cgroups`.
    pub async fn cgroups(&self) -> Result<CgroupsResponse, ClientError> {
        self.call(&ApiRequest::Cgroups).await
    }

    /// `POST /v1/cgroups/watch`.
    pub async fn watch(&self, path: &str) -> Result<WatchedCgroup, ClientError> {
        let path = path.to_owned();
        self.call(&ApiRequest::Watch { path }).await
    }

    /// `POST /v1/cgroups/unwatch`.
    pub async fn unwatch(&self, path: &str) -> Result<WatchedCgroup, ClientError> {
        let path = path.to_owned();
        self.call(&ApiRequest::Unwatch { path }).await
    }

    /// `POST /v1/cgroups/epoch`.
    pub async fn advance_epoch(&self, path: &str) -> Result<WatchedCgroup, ClientError> {
        let path = path.to_owned();
        self.call(&ApiRequest::Epoch { path }).await
    }

    /// `GET /v1/inode-stats`.
    pub async fn inode_stats(
        &self,
        cgroup: Option<&str>,
    ) -> Result<InodeStatsResponse, ClientError> {
        let cgroup = cgroup.map(str::to_owned);
        self.call(&ApiRequest::InodeStats { cgroup }).await
    }

    /// `POST /v1/sandboxes`.
    pub async fn create_sandbox(&self, req: &CreateSandbox) -> Result<SandboxInfo, ClientError> {
        self.call(&ApiRequest::CreateSandbox(req.clone())).await
    }

    /// `GET /v1/sandboxes`.
    pub async fn list_sandboxes(&self) -> Result<SandboxList, ClientError> {
        self.call(&ApiRequest::ListSandboxes).await
    }

    /// `GET /v1/sandboxes/{id}`.
    pub async fn sandbox(&self, sandbox: &str) -> Result<SandboxInfo, ClientError> {
        let sandbox = sandbox.to_owned();
        self.call(&ApiRequest::GetSandbox { sandbox }).await
    }

    /// `DELETE /v1/sandboxes/{id}`.
    pub async fn remove_sandbox(&self, sandbox: &str) -> Result<Removed, ClientError> {
        let sandbox = sandbox.to_owned();
        self.call(&ApiRequest::RemoveSandbox { sandbox }).await
    }

    /// `POST /v1/sandboxes/{id}/exec`: waits as long as the command may run.
    pub async fn exec(&self, sandbox: &str, req: &ExecRequest) -> Result<ExecResult, ClientError> {
        let (sandbox, req) = (sandbox.to_owned(), req.clone());
        self.call(&ApiRequest::Exec { sandbox, req }).await
    }

    /// `POST /v1/sandboxes/{id}/exec` with `Accept: application/x-ndjson`: the
    /// command's events as they come. Errors before the command started are this
    /// call's; later ones are the stream's last item.
    pub async fn exec_stream(
        &self,
        sandbox: &str,
        req: &ExecRequest,
    ) -> Result<ExecEvents, ClientError> {
        let request = ApiRequest::Exec {
            sandbox: sandbox.to_owned(),
            req: req.clone(),
        };
        let deadline = request
            .timeout()
            .map(|limit| (tokio::time::Instant::now() + limit, limit));
        let opened = self.open(&request, Some(NDJSON));
        let (response, connection) = match deadline {
            None => opened.await?,
            Some((at, limit)) => tokio::time::timeout_at(at, opened)
                .await
                .map_err(|_| self.timeout_error(limit))??,
        };
        let status = response.status();
        if !status.is_success() {
            let bytes = self.whole_body(response, connection).await?;
            return Err(api_error(status.as_u16(), &bytes));
        }
        Ok(ExecEvents::new(
            self.clone(),
            response,
            connection,
            deadline,
        ))
    }

    fn timeout_error(&self, timeout: Duration) -> ClientError {
        ClientError::Timeout {
            socket: self.socket.clone(),
            timeout,
        }
    }

    /// `POST /v1/sandboxes/{id}/sessions`.
    pub async fn session_start(
        &self,
        sandbox: &str,
        req: &SessionStart,
    ) -> Result<SessionInfo, ClientError> {
        let (sandbox, req) = (sandbox.to_owned(), req.clone());
        self.call(&ApiRequest::SessionStart { sandbox, req }).await
    }

    /// `POST /v1/sandboxes/{id}/sessions/{session}/run`: waits as long as the code may run.
    pub async fn session_run(
        &self,
        sandbox: &str,
        session: &str,
        req: &SessionRun,
    ) -> Result<SessionRunResult, ClientError> {
        let (sandbox, session, req) = (sandbox.to_owned(), session.to_owned(), req.clone());
        let request = ApiRequest::SessionRun {
            sandbox,
            session,
            req,
        };
        self.call(&request).await
    }

    /// `DELETE /v1/sandboxes/{id}/sessions/{session}`.
    pub async fn session_stop(
        &self,
        sandbox: &str,
        session: &str,
    ) -> Result<SessionInfo, ClientError> {
        let (sandbox, session) = (sandbox.to_owned(), session.to_owned());
        self.call(&ApiRequest::SessionStop { sandbox, session })
            .await
    }

    /// `POST /v1/sandboxes/{id}/checkpoint`.
    pub async fn checkpoint(
        &self,
        sandbox: &str,
        req: &CheckpointRequest,
    ) -> Result<NodeInfo, ClientError> {
        let (sandbox, req) = (sandbox.to_owned(), req.clone());
        self.call(&ApiRequest::Checkpoint { sandbox, req }).await
    }

    /// `POST /v1/sandboxes/{id}/rollback`.
    pub async fn rollback(
        &self,
        sandbox: &str,
        req: &RollbackRequest,
    ) -> Result<RollbackResult, ClientError> {
        let (sandbox, req) = (sandbox.to_owned(), req.clone());
        self.call(&ApiRequest::Rollback { sandbox, req }).await
    }

    /// `POST /v1/nodes/{node}/branch`.
    pub async fn branch(
        &self,
        node: &str,
        req: &BranchRequest,
    ) -> Result<BranchResult, ClientError> {
        let (node, req) = (node.to_owned(), req.clone());
        self.call(&ApiRequest::Branch { node, req }).await
    }

    /// `GET /v1/sandboxes/{id}/tree`.
    pub async fn sandbox_tree(&self, sandbox: &str) -> Result<TreeView, ClientError> {
        let sandbox = sandbox.to_owned();
        self.call(&ApiRequest::SandboxTree { sandbox }).await
    }

    /// `GET /v1/nodes/{node}/tree`.
    pub async fn node_tree(&self, node: &str) -> Result<TreeView, ClientError> {
        let node = node.to_owned();
        self.call(&ApiRequest::NodeTree { node }).await
    }

    /// `GET /v1/diff?from=NODE&to=NODE`.
    pub async fn diff(&self, from: &str, to: &str) -> Result<DiffResult, ClientError> {
        let (from, to) = (from.to_owned(), to.to_owned());
        self.call(&ApiRequest::Diff { from, to }).await
    }

    /// `DELETE /v1/nodes/{node}`.
    pub async fn remove_node(&self, node: &str) -> Result<Removed, ClientError> {
        let node = node.to_owned();
        self.call(&ApiRequest::RemoveNode { node }).await
    }

    /// `POST /v1/gc`.
    pub async fn gc(&self) -> Result<GcResult, ClientError> {
        self.call(&ApiRequest::Gc).await
    }

    /// Sends `request` and decodes the answer.
    pub async fn call<T: DeserializeOwned>(&self, request: &ApiRequest) -> Result<T, ClientError> {
        let (status, body) = self.send(request).await?;
        serde_json::from_slice(&body).map_err(|err| ClientError::BadResponse {
            status,
            detail: format!("cannot decode the JSON: {err}"),
        })
    }

    /// Sends `request`; returns the HTTP status and the success body as the daemon sent
    /// it (what `--json` prints). An error answer becomes [`ClientError::Api`].
    pub async fn send(&self, request: &ApiRequest) -> Result<(u16, Bytes), ClientError> {
        let Some(limit) = request.timeout() else {
            return self.exchange(request).await;
        };
        tokio::time::timeout(limit, self.exchange(request))
            .await
            .map_err(|_| ClientError::Timeout {
                socket: self.socket.clone(),
                timeout: limit,
            })?
    }

    async fn exchange(&self, request: &ApiRequest) -> Result<(u16, Bytes), ClientError> {
        let (response, connection) = self.open(request, None).await?;
        let status = response.status();
        let bytes = self.whole_body(response, connection).await?;
        if status.is_success() {
            return Ok((status.as_u16(), bytes));
        }
        Err(api_error(status.as_u16(), &bytes))
    }

    /// Connects, sends `request` (with `Accept: accept` if given) and returns the
    /// response, its body unread, and the connection's task (to abort once the body
    /// has been read).
    async fn open(
        &self,
        request: &ApiRequest,
        accept: Option<&'static str>,
    ) -> Result<(hyper::Response<hyper::body::Incoming>, JoinHandle<()>), ClientError> {
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|err| self.connect_error(err))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|source| self.http_error(source))?;
        // The connection task ends when the exchange is over (or failed; the error
        // surfaces through `send_request` or the body).
        let connection = tokio::spawn(async move {
            let _ = connection.await;
        });

        let body = request.body();
        let mut builder = Request::builder()
            .method(request.method())
            .uri(request.path_and_query())
            .header(HOST, "localhost");
        if body.is_some() {
            builder = builder.header(CONTENT_TYPE, "application/json");
        }
        if let Some(accept) = accept {
            builder = builder.header(ACCEPT, accept);
        }
        let req = builder
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|err| ClientError::BadResponse {
                status: 0,
                detail: format!("cannot build the request: {err}"),
            })?;
        let response = sender
            .send_request(req)
            .await
            .map_err(|source| self.http_error(source))?;
        Ok((response, connection))
    }

    /// Reads the whole body of `response`, then ends its `connection`.
    async fn whole_body(
        &self,
        response: hyper::Response<hyper::body::Incoming>,
        connection: JoinHandle<()>,
    ) -> Result<Bytes, ClientError> {
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|source| self.http_error(source))?
            .to_bytes();
        connection.abort();
        Ok(bytes)
    }

    fn http_error(&self, source: hyper::Error) -> ClientError {
        ClientError::Http {
            socket: self.socket.clone(),
            source,
        }
    }

    fn connect_error(&self, err: io::Error) -> ClientError {
        let socket = self.socket.clone();
        match err.kind() {
            io::ErrorKind::NotFound => ClientError::NotRunning { socket },
            io::ErrorKind::ConnectionRefused => ClientError::StaleSocket { socket },
            io::ErrorKind::PermissionDenied => ClientError::PermissionDenied { socket },
            _ => ClientError::Connect {
                socket,
                source: err,
            },
        }
    }
}

/// The error of a failed answer: the API's error body, or what was wrong with it.
fn api_error(status: u16, bytes: &[u8]) -> ClientError {
    match serde_json::from_slice::<ErrorBody>(bytes) {
        Ok(err) => ClientError::Api {
            status,
            kind: err.kind,
            message: err.error,
        },
        Err(_) => ClientError::BadResponse {
            status,
            detail: String::from_utf8_lossy(bytes).chars().take(200).collect(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_errors_have_distinct_exit_codes() {
        let client = Client::new("/run/x.sock");
        let code = |kind: io::ErrorKind| client.connect_error(io::Error::from(kind)).exit_code();
        assert_eq!(code(io::ErrorKind::NotFound), 3);
        assert_eq!(code(io::ErrorKind::ConnectionRefused), 3);
        assert_eq!(code(io::ErrorKind::PermissionDenied), 4);
        assert_eq!(code(io::ErrorKind::TimedOut), 6);
        let err = client.connect_error(io::Error::from(io::ErrorKind::PermissionDenied));
        assert_eq!(
            err.to_string(),
            "permission denied on /run/x.sock: run as root"
        );
        let api = |status| ClientError::Api {
            status,
            kind: String::new(),
            message: String::new(),
        };
        assert_eq!(api(404).exit_code(), 5);
        assert_eq!(api(409).exit_code(), 5);
        assert_eq!(api(500).exit_code(), 6);
    }
}
