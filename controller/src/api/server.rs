//! The axum routers: the API (served on the Unix socket) and `/metrics` (served on
//! loopback TCP), both over one [`ApiService`].

use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::rejection::{BytesRejection, JsonRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, MatchedPath, Query, Request, State};
use axum::http::{Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use http_body_util::BodyExt as _;
use tokio::runtime::RuntimeFlavor;

use super::service::ApiService;
use super::types::{CgroupRequest, ErrorBody, InodeStatsQuery};
use super::{ApiError, MAX_BODY_BYTES, routes};
use crate::metrics::latency::Operation;
use crate::metrics::{Metrics, TEXT_CONTENT_TYPE};

type Svc = Arc<ApiService>;

/// Route label of requests that matched no route (keeps the label set bounded).
const UNMATCHED_ROUTE: &str = "unmatched";

/// The API router: every route of [`served_routes`], JSON errors for unknown routes,
/// wrong methods and rejected bodies, bodies up to [`MAX_BODY_BYTES`], a request
/// counter per route and status, an error counter per code, and the latency of
/// `exec` and session `run` for `GET /v1/stats`.
pub fn api_router(service: Svc) -> Router {
    let metrics = service.metrics().clone();
    route_table()
        .router
        .fallback(route_not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(move |req: Request, next: Next| {
            let metrics = metrics.clone();
            async move {
                let route = req
                    .extensions()
                    .get::<MatchedPath>()
                    .map_or(UNMATCHED_ROUTE.to_owned(), |p| p.as_str().to_owned());
                let started = Instant::now();
                let response = next.run(req).await;
                let seconds = started.elapsed().as_secs_f64();
                metrics.observe_request(&route, response.status().as_u16(), seconds);
                if let Some(ErrorCode(code)) = response.extensions().get::<ErrorCode>() {
                    metrics.api_error(code);
                }
                time_to_end(&route, response, started, metrics)
            }
        }))
        .with_state(service)
}

/// The stable code of an error answer, left on the response for the error counter.
#[derive(Clone, Copy, Debug)]
struct ErrorCode(&'static str);

/// For a successful `exec` or session `run`, records the operation's latency when the
/// answer's body is done with (sent, or dropped by a client that went away), so a
/// streamed answer counts until its end, not until its headers.
fn time_to_end(route: &str, response: Response, started: Instant, metrics: Metrics) -> Response {
    let op = match route {
        routes::SANDBOX_EXEC => Operation::Exec,
        routes::SANDBOX_SESSION_RUN => Operation::SessionRun,
        _ => return response,
    };
    if !response.status().is_success() {
        return response;
    }
    let done = OnDrop(Some(move || {
        metrics.observe_operation(op, started.elapsed().as_secs_f64() * 1e3);
    }));
    response.map(|body| {
        Body::new(body.map_frame(move |frame| {
            // The closure owns `done`: it runs when the body is dropped.
            done.keep();
            frame
        }))
    })
}

/// Runs its closure once, when dropped.
struct OnDrop<F: FnOnce()>(Option<F>);

impl<F: FnOnce()> OnDrop<F> {
    /// Nothing: makes a closure that calls it own the guard.
    fn keep(&self) {}
}

impl<F: FnOnce()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

/// Every (method, path) the API router serves, as registered.
pub fn served_routes() -> Vec<(Method, &'static str)> {
    route_table().served
}

/// The metrics router: `GET /metrics` refreshes the scrape-time metrics from the
/// tracker and answers the Prometheus text exposition.
pub fn metrics_router(service: Svc) -> Router {
    Router::new()
        .route(routes::METRICS, get(metrics))
        .with_state(service)
}

/// The routes with their methods, recorded as they are added so that the contract
/// test compares what is really served with `openapi.yaml`.
pub(super) struct RouteTable {
    router: Router<Svc>,
    served: Vec<(Method, &'static str)>,
}

impl RouteTable {
    /// Serves `route` at `path` (several methods of one path merge).
    pub(super) fn add(
        mut self,
        method: Method,
        path: &'static str,
        route: MethodRouter<Svc>,
    ) -> Self {
        self.served.push((method, path));
        self.router = self.router.route(path, route);
        self
    }
}

fn route_table() -> RouteTable {
    let table = RouteTable {
        router: Router::new(),
        served: Vec::new(),
    }
    .add(Method::GET, routes::STATUS, get(status))
    .add(Method::GET, routes::CGROUPS, get(cgroups))
    .add(Method::POST, routes::WATCH, post(watch))
    .add(Method::POST, routes::UNWATCH, post(unwatch))
    .add(Method::POST, routes::EPOCH, post(epoch))
    .add(Method::GET, routes::INODE_STATS, get(inode_stats))
    .add(Method::GET, routes::STATS, get(stats));
    super::sandbox_server::add_routes(table)
}

/// Runs a blocking service call. On the daemon's multi-threaded runtime it runs right
/// here (`block_in_place`: the worker's other tasks move to another thread), so the
/// request reaches the operation and its answer the socket without two thread
/// hand-offs, each a wake-up that a loaded 2-CPU machine can delay by milliseconds;
/// elsewhere (a single-threaded test runtime) on the blocking pool.
pub(super) async fn blocking<T, F>(service: Svc, call: F) -> Result<Json<T>, ApiError>
where
    T: Send + 'static,
    F: FnOnce(&ApiService) -> Result<T, ApiError> + Send + 'static,
{
    if tokio::runtime::Handle::current().runtime_flavor() == RuntimeFlavor::MultiThread {
        return tokio::task::block_in_place(move || call(&service)).map(Json);
    }
    tokio::task::spawn_blocking(move || call(&service))
        .await
        .map_err(|err| ApiError::Internal {
            message: format!("request task failed: {err}"),
        })?
        .map(Json)
}

async fn status(State(svc): State<Svc>) -> impl IntoResponse {
    blocking(svc, ApiService::status).await
}

async fn cgroups(State(svc): State<Svc>) -> impl IntoResponse {
    blocking(svc, ApiService::cgroups).await
}

async fn watch(
    State(svc): State<Svc>,
    body: Result<Json<CgroupRequest>, JsonRejection>,
) -> impl IntoResponse {
    let Json(req) = body?;
    blocking(svc, move |s| s.watch(&req)).await
}

async fn unwatch(
    State(svc): State<Svc>,
    body: Result<Json<CgroupRequest>, JsonRejection>,
) -> impl IntoResponse {
    let Json(req) = body?;
    blocking(svc, move |s| s.unwatch(&req)).await
}

async fn epoch(
    State(svc): State<Svc>,
    body: Result<Json<CgroupRequest>, JsonRejection>,
) -> impl IntoResponse {
    let Json(req) = body?;
    blocking(svc, move |s| s.advance_epoch(&req)).await
}

async fn inode_stats(
    State(svc): State<Svc>,
    query: Result<Query<InodeStatsQuery>, QueryRejection>,
) -> impl IntoResponse {
    let Query(query) = query?;
    blocking(svc, move |s| s.inode_stats(&query)).await
}

async fn stats(State(svc): State<Svc>) -> impl IntoResponse {
    blocking(svc, ApiService::stats).await
}

async fn metrics(State(svc): State<Svc>) -> Response {
    let encoded = tokio::task::spawn_blocking(move || {
        svc.refresh_metrics();
        svc.metrics().encode()
    })
    .await;
    match encoded {
        Ok(Ok(text)) => ([(header::CONTENT_TYPE, TEXT_CONTENT_TYPE)], text).into_response(),
        Ok(Err(err)) => {
            tracing::error!(error = %err, "cannot encode metrics");
            (StatusCode::INTERNAL_SERVER_ERROR, err.to_string()).into_response()
        }
        Err(err) => {
            tracing::error!(error = %err, "metrics task failed");
            (StatusCode::INTERNAL_SERVER_ERROR, err.to_string()).into_response()
        }
    }
}

async fn route_not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::RouteNotFound {
        method: method.to_string(),
        path: uri.path().to_owned(),
    }
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed {
        method: method.to_string(),
        path: uri.path().to_owned(),
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (kind, status) = self.kind_and_status();
        let body = ErrorBody {
            error: self.message(),
            kind: kind.as_str().to_owned(),
        };
        if status.is_server_error() {
            tracing::error!(kind = body.kind, "{}", body.error);
        } else {
            tracing::debug!(kind = body.kind, "{}", body.error);
        }
        let mut response = (status, Json(body)).into_response();
        response.extensions_mut().insert(ErrorCode(kind.as_str()));
        response
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            return Self::BodyTooLarge {
                limit: MAX_BODY_BYTES,
            };
        }
        let cause = std::error::Error::source(&rejection)
            .map(ToString::to_string)
            .unwrap_or_default();
        let message = match rejection {
            JsonRejection::JsonSyntaxError(_) => format!("malformed JSON: {cause}"),
            JsonRejection::JsonDataError(_) => cause,
            JsonRejection::MissingJsonContentType(_) => {
                "expected `Content-Type: application/json`".to_owned()
            }
            other => lower_first(&other.body_text()),
        };
        Self::InvalidBody { message }
    }
}

impl From<BytesRejection> for ApiError {
    fn from(rejection: BytesRejection) -> Self {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            return Self::BodyTooLarge {
                limit: MAX_BODY_BYTES,
            };
        }
        Self::InvalidBody {
            message: lower_first(&rejection.body_text()),
        }
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        Self::InvalidPath {
            message: lower_first(&rejection.body_text()),
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        let message = std::error::Error::source(&rejection)
            .map(ToString::to_string)
            .unwrap_or_else(|| lower_first(&rejection.body_text()));
        Self::InvalidQuery { message }
    }
}

/// axum's rejection texts start upper-case; ours do not.
fn lower_first(text: &str) -> String {
    let mut chars = text.chars();
    chars.next().map_or_else(String::new, |c| {
        c.to_lowercase().chain(chars).collect::<String>()
    })
}
