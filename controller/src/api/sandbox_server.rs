//! The sandbox endpoints: one handler per route over the service's
//! [`SandboxOps`], run on tokio's blocking pool (an `exec` can take minutes).
//!
//! Without sandbox operations every handler answers 503 `sandboxes_disabled`, before
//! looking at the body. A sandbox error is answered with its own `kind` and status.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use serde::de::DeserializeOwned;

use super::sandbox_types::{
    BranchRequest, BranchResult, CheckpointRequest, CreateSandbox, DiffQuery, DiffResult,
    ExecRequest, ExecResult, GcResult, NodeInfo, Removed, RollbackRequest, RollbackResult,
    SandboxInfo, SandboxList, SessionInfo, SessionRun, SessionRunResult, SessionStart, TreeView,
};
use super::server::{RouteTable, blocking};
use super::service::ApiService;
use super::{ApiError, exec_stream, routes};
use crate::sandbox::{SandboxError, SandboxOps};

type Svc = Arc<ApiService>;
type Answer<T> = Result<Json<T>, ApiError>;
type Created<T> = Result<(StatusCode, Json<T>), ApiError>;
type Id = Result<Path<String>, PathRejection>;
type Ids = Result<Path<(String, String)>, PathRejection>;
type Body<T> = Result<Json<T>, JsonRejection>;

/// Adds the sandbox routes to the table.
pub(super) fn add_routes(table: RouteTable) -> RouteTable {
    table
        .add(Method::POST, routes::SANDBOXES, post(create))
        .add(Method::GET, routes::SANDBOXES, get(list))
        .add(Method::GET, routes::SANDBOX, get(show))
        .add(Method::DELETE, routes::SANDBOX, delete(remove))
        .add(Method::POST, routes::SANDBOX_EXEC, post(exec))
        .add(Method::POST, routes::SANDBOX_SESSIONS, post(session_start))
        .add(Method::POST, routes::SANDBOX_SESSION_RUN, post(session_run))
        .add(
            Method::DELETE,
            routes::SANDBOX_SESSION,
            delete(session_stop),
        )
        .add(Method::POST, routes::SANDBOX_CHECKPOINT, post(checkpoint))
        .add(Method::POST, routes::SANDBOX_ROLLBACK, post(rollback))
        .add(Method::GET, routes::SANDBOX_TREE, get(sandbox_tree))
        .add(Method::POST, routes::NODE_BRANCH, post(branch))
        .add(Method::GET, routes::NODE_TREE, get(node_tree))
        .add(Method::DELETE, routes::NODE, delete(remove_node))
        .add(Method::GET, routes::DIFF, get(diff))
        .add(Method::POST, routes::GC, post(gc))
}

/// Runs a sandbox operation on the blocking pool.
async fn call<T, F>(svc: Svc, op: F) -> Answer<T>
where
    T: Send + 'static,
    F: FnOnce(&dyn SandboxOps) -> Result<T, SandboxError> + Send + 'static,
{
    blocking(svc, move |s| Ok(op(s.sandboxes()?)?)).await
}

/// 201 with the body.
fn created<T>(answer: Answer<T>) -> Created<T> {
    answer.map(|body| (StatusCode::CREATED, body))
}

async fn create(State(svc): State<Svc>, body: Body<CreateSandbox>) -> Created<SandboxInfo> {
    svc.sandboxes()?;
    let Json(req) = body?;
    created(call(svc, move |ops| ops.create(&req)).await)
}

async fn list(State(svc): State<Svc>) -> Answer<SandboxList> {
    call(svc, |ops| {
        ops.list().map(|sandboxes| SandboxList { sandboxes })
    })
    .await
}

async fn show(State(svc): State<Svc>, id: Id) -> Answer<SandboxInfo> {
    svc.sandboxes()?;
    let Path(id) = id?;
    call(svc, move |ops| ops.get(&id)).await
}

async fn remove(State(svc): State<Svc>, id: Id) -> Answer<Removed> {
    svc.sandboxes()?;
    let Path(id) = id?;
    call(svc, move |ops| ops.remove(&id)).await
}

/// The collected result, or with `Accept: application/x-ndjson` the events as they
/// come ([`exec_stream`]).
async fn exec(
    State(svc): State<Svc>,
    id: Id,
    headers: HeaderMap,
    body: Body<ExecRequest>,
) -> Result<Response, ApiError> {
    svc.sandboxes()?;
    let (Path(id), Json(req)) = (id?, body?);
    if exec_stream::wants_stream(&headers) {
        return Ok(exec_stream::serve(svc, id, req).await);
    }
    let answer: Answer<ExecResult> = call(svc, move |ops| ops.exec(&id, &req)).await;
    answer.map(IntoResponse::into_response)
}

async fn session_start(
    State(svc): State<Svc>,
    id: Id,
    body: Body<SessionStart>,
) -> Created<SessionInfo> {
    svc.sandboxes()?;
    let (Path(id), Json(req)) = (id?, body?);
    created(call(svc, move |ops| ops.session_start(&id, &req)).await)
}

async fn session_run(
    State(svc): State<Svc>,
    ids: Ids,
    body: Body<SessionRun>,
) -> Answer<SessionRunResult> {
    svc.sandboxes()?;
    let (Path((id, session)), Json(req)) = (ids?, body?);
    call(svc, move |ops| ops.session_run(&id, &session, &req)).await
}

async fn session_stop(State(svc): State<Svc>, ids: Ids) -> Answer<SessionInfo> {
    svc.sandboxes()?;
    let Path((id, session)) = ids?;
    call(svc, move |ops| ops.session_stop(&id, &session)).await
}

async fn checkpoint(
    State(svc): State<Svc>,
    id: Id,
    body: Result<OptionalJson<CheckpointRequest>, ApiError>,
) -> Created<NodeInfo> {
    svc.sandboxes()?;
    let (Path(id), OptionalJson(req)) = (id?, body?);
    let metrics = svc.metrics().clone();
    created(
        call(svc, move |ops| {
            let node = ops.checkpoint(&id, &req)?;
            metrics.observe_checkpoint(&node.timings);
            Ok(node)
        })
        .await,
    )
}

async fn rollback(
    State(svc): State<Svc>,
    id: Id,
    body: Body<RollbackRequest>,
) -> Answer<RollbackResult> {
    svc.sandboxes()?;
    let (Path(id), Json(req)) = (id?, body?);
    let metrics = svc.metrics().clone();
    call(svc, move |ops| {
        let rolled = ops.rollback(&id, &req)?;
        metrics.observe_rollback(&rolled);
        Ok(rolled)
    })
    .await
}

async fn sandbox_tree(State(svc): State<Svc>, id: Id) -> Answer<TreeView> {
    svc.sandboxes()?;
    let Path(id) = id?;
    call(svc, move |ops| ops.tree(&id)).await
}

async fn branch(
    State(svc): State<Svc>,
    node: Id,
    body: Body<BranchRequest>,
) -> Created<BranchResult> {
    svc.sandboxes()?;
    let (Path(node), Json(req)) = (node?, body?);
    let metrics = svc.metrics().clone();
    created(
        call(svc, move |ops| {
            let branched = ops.branch(&node, &req)?;
            metrics.observe_branch(&branched.branch_ms);
            Ok(branched)
        })
        .await,
    )
}

async fn node_tree(State(svc): State<Svc>, node: Id) -> Answer<TreeView> {
    svc.sandboxes()?;
    let Path(node) = node?;
    call(svc, move |ops| {
        // `tree` looks the id up as a sandbox, then as a node: here it was a node.
        ops.tree(&node).map_err(|e| match e {
            SandboxError::UnknownSandbox { id } => SandboxError::UnknownNode { id },
            other => other,
        })
    })
    .await
}

async fn remove_node(State(svc): State<Svc>, node: Id) -> Answer<Removed> {
    svc.sandboxes()?;
    let Path(node) = node?;
    call(svc, move |ops| ops.remove_node(&node)).await
}

async fn diff(
    State(svc): State<Svc>,
    query: Result<Query<DiffQuery>, QueryRejection>,
) -> Answer<DiffResult> {
    svc.sandboxes()?;
    let Query(q) = query?;
    call(svc, move |ops| ops.diff(&q.from, &q.to)).await
}

async fn gc(State(svc): State<Svc>) -> Answer<GcResult> {
    let metrics = svc.metrics().clone();
    call(svc, move |ops| {
        let gc = ops.gc()?;
        metrics.observe_gc(&gc);
        Ok(gc)
    })
    .await
}

/// A JSON body that may be left out: an empty (or all-blank) body is `T::default()`;
/// anything else must be JSON with `Content-Type: application/json`, as for [`Json`].
struct OptionalJson<T>(T);

impl<S, T> FromRequest<S> for OptionalJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Default,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| {
                let essence = ct.split(';').next().unwrap_or_default().trim();
                essence.eq_ignore_ascii_case("application/json")
                    || essence.to_ascii_lowercase().ends_with("+json")
            });
        let bytes = Bytes::from_request(req, state).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self(T::default()));
        }
        if !is_json {
            return Err(ApiError::InvalidBody {
                message: "expected `Content-Type: application/json`".to_owned(),
            });
        }
        let Json(value) = Json::<T>::from_bytes(&bytes)?;
        Ok(Self(value))
    }
}
