//! The sandbox endpoints through the router, over the in-memory fake of the sandbox
//! operations: every route's happy path, rejected requests on every route, the answer
//! without sandbox support, metrics by route template. Sandbox errors are in
//! `sandbox_errors`.

use std::collections::BTreeSet;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

use super::{Harness, assert_error, assert_error_kind};
use crate::api::server::{api_router, metrics_router, served_routes};
use crate::api::{ErrorKind, MAX_BODY_BYTES, routes};

/// One router for a whole test, so that a test also shows it keeps serving after
/// errors.
pub(super) struct Api {
    router: Router,
}

impl Api {
    pub(super) fn new(h: &Harness) -> Self {
        Self {
            router: api_router(h.service.clone()),
        }
    }

    pub(super) async fn raw(
        &self,
        method: Method,
        uri: &str,
        body: Option<String>,
    ) -> (StatusCode, Value) {
        let mut req = Request::builder().method(method).uri(uri);
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let req = req.body(Body::from(body.unwrap_or_default())).unwrap();
        let response = self.router.clone().oneshot(req).await.unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let value = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            panic!("{uri}: not JSON ({e}): {}", String::from_utf8_lossy(&bytes))
        });
        (status, value)
    }

    pub(super) async fn get(&self, uri: &str) -> (StatusCode, Value) {
        self.raw(Method::GET, uri, None).await
    }

    pub(super) async fn post(&self, uri: &str, body: Value) -> (StatusCode, Value) {
        self.raw(Method::POST, uri, Some(body.to_string())).await
    }

    pub(super) async fn delete(&self, uri: &str) -> (StatusCode, Value) {
        self.raw(Method::DELETE, uri, None).await
    }

    /// Answers `status`; returns the body.
    pub(super) async fn ok(&self, status: StatusCode, got: (StatusCode, Value)) -> Value {
        assert_eq!(got.0, status, "{}", got.1);
        got.1
    }
}

pub(super) fn at(template: &str, values: &[&str]) -> String {
    routes::fill(template, values)
}

#[tokio::test]
async fn every_sandbox_route_works() {
    let h = Harness::new();
    let api = Api::new(&h);
    let (ok, created) = (StatusCode::OK, StatusCode::CREATED);

    let body = json!({"limits": {"memory_bytes": 1 << 30, "cpus": 1.5}, "auto_checkpoint": false});
    let sb = api
        .ok(created, api.post(routes::SANDBOXES, body).await)
        .await;
    let id = sb["id"].as_str().unwrap().to_owned();
    assert_eq!(sb["limits"], json!({"memory_bytes": 1 << 30, "cpus": 1.5}));
    assert_eq!(sb["state"], "running");
    let list = api.ok(ok, api.get(routes::SANDBOXES).await).await;
    assert_eq!(list, json!({"sandboxes": [sb]}));
    // A unique prefix names it.
    let got = api
        .ok(ok, api.get(&at(routes::SANDBOX, &[&id[..5]])).await)
        .await;
    assert_eq!(got["id"], id.as_str());

    let exec = |argv: Value| json!({ "argv": argv, "env": {"A": "1"}, "cwd": "/workspace" });
    let out = api
        .ok(
            ok,
            api.post(
                &at(routes::SANDBOX_EXEC, &[&id]),
                exec(json!(["echo", "hi"])),
            )
            .await,
        )
        .await;
    assert_eq!(
        (out["stdout"].as_str(), out["exit_code"].as_i64()),
        (Some("hi\n"), Some(0))
    );
    api.ok(
        ok,
        api.post(
            &at(routes::SANDBOX_EXEC, &[&id]),
            exec(json!(["touch", "/a"])),
        )
        .await,
    )
    .await;

    let uri = at(routes::SANDBOX_SESSIONS, &[&id]);
    let session = api
        .ok(created, api.post(&uri, json!({"kind": "python"})).await)
        .await;
    let sid = session["id"].as_str().unwrap().to_owned();
    let uri = at(routes::SANDBOX_SESSION_RUN, &[&id, &sid]);
    let run = api
        .ok(
            ok,
            api.post(&uri, json!({"code": "x = 1", "timeout_ms": 5000}))
                .await,
        )
        .await;
    assert_eq!(
        (run["stdout"].as_str(), run["status"].as_i64()),
        (Some("x = 1\n"), Some(0))
    );

    // The checkpoint body may be left out, or be empty.
    let uri = at(routes::SANDBOX_CHECKPOINT, &[&id]);
    let first = api
        .ok(created, api.raw(Method::POST, &uri, None).await)
        .await;
    assert_eq!(first["sessions"][0]["session"], sid.as_str());
    let first_id = first["id"].as_str().unwrap().to_owned();
    api.ok(
        ok,
        api.post(
            &at(routes::SANDBOX_EXEC, &[&id]),
            exec(json!(["touch", "/b"])),
        )
        .await,
    )
    .await;
    let second = api
        .ok(created, api.post(&uri, json!({"label": "after b"})).await)
        .await;
    assert_eq!(second["label"], "after b");
    assert_eq!(second["parent"], first_id.as_str());
    let second_id = second["id"].as_str().unwrap().to_owned();

    let diff = format!("{}?from={first_id}&to={second_id}", routes::DIFF);
    let diff = api.ok(ok, api.get(&diff).await).await;
    assert_eq!(
        diff["changes"],
        json!([{"path": "/b", "change": "added", "file_type": "file"}])
    );

    let uri = at(routes::SANDBOX_ROLLBACK, &[&id]);
    let back = api
        .ok(
            ok,
            api.post(&uri, json!({"node": first_id, "mode": "files_only"}))
                .await,
        )
        .await;
    assert_eq!(
        (back["node"].as_str(), back["mode"].as_str()),
        (Some(&*first_id), Some("files_only"))
    );

    let uri = at(routes::NODE_BRANCH, &[&second_id]);
    let branch = api
        .ok(created, api.post(&uri, json!({"count": 2})).await)
        .await;
    assert_eq!(branch["sandboxes"].as_array().unwrap().len(), 2);
    assert_eq!(branch["sandboxes"][0]["branched_from"], second_id.as_str());
    let default_count = api.ok(created, api.post(&uri, json!({})).await).await;
    assert_eq!(default_count["sandboxes"].as_array().unwrap().len(), 1);

    let tree = api
        .ok(ok, api.get(&at(routes::SANDBOX_TREE, &[&id])).await)
        .await;
    assert_eq!(tree["nodes"].as_array().unwrap().len(), 2);
    assert_eq!(tree["sandboxes"].as_array().unwrap().len(), 4);
    let same = api
        .ok(ok, api.get(&at(routes::NODE_TREE, &[&first_id])).await)
        .await;
    assert_eq!(same, tree);

    let uri = at(routes::SANDBOX_SESSION, &[&id, &sid]);
    let stopped = api.ok(ok, api.delete(&uri).await).await;
    assert_eq!(stopped, session);

    // Branches have the second node as head: it cannot go yet.
    let got = api.delete(&at(routes::NODE, &[&second_id])).await;
    assert_error_kind(&got, StatusCode::CONFLICT, "node_in_use", &second_id);
    for s in api.ok(ok, api.get(routes::SANDBOXES).await).await["sandboxes"]
        .as_array()
        .unwrap()
    {
        let sid = s["id"].as_str().unwrap();
        let removed = api
            .ok(ok, api.delete(&at(routes::SANDBOX, &[sid])).await)
            .await;
        assert_eq!(removed, json!({"nodes": [], "sandboxes": [sid]}));
    }
    let removed = api
        .ok(ok, api.delete(&at(routes::NODE, &[&first_id])).await)
        .await;
    assert_eq!(
        removed,
        json!({"nodes": [first_id, second_id], "sandboxes": []})
    );
    let gc = api.ok(ok, api.post(routes::GC, json!({})).await).await;
    assert_eq!(
        gc,
        json!({"layers_removed": 2, "trees_removed": 0, "dumps_removed": 0,
               "layers_squashed": 2, "squash_bytes_freed": 0, "squash_deferred": 0})
    );
    let gc = api
        .ok(ok, api.raw(Method::POST, routes::GC, None).await)
        .await;
    assert_eq!(gc["layers_removed"], 0);
}

/// Every sandbox route with a concrete path, the method it serves and a valid body.
fn concrete_routes() -> Vec<(Method, &'static str, String)> {
    served_routes()
        .into_iter()
        .filter(|(_, p)| {
            p.starts_with("/v1/sandboxes")
                || p.starts_with("/v1/nodes")
                || *p == routes::DIFF
                || *p == routes::GC
        })
        .map(|(m, p)| (m, p, at(p, &["sb-1", "ss-1"])))
        .collect()
}

#[tokio::test]
async fn rejected_requests_on_every_sandbox_route() {
    let h = Harness::new();
    let api = Api::new(&h);
    let posts_with_body = [
        routes::SANDBOXES,
        routes::SANDBOX_EXEC,
        routes::SANDBOX_SESSIONS,
        routes::SANDBOX_SESSION_RUN,
        routes::SANDBOX_CHECKPOINT,
        routes::SANDBOX_ROLLBACK,
        routes::NODE_BRANCH,
    ];
    let bad = StatusCode::BAD_REQUEST;
    for template in posts_with_body {
        let uri = at(template, &["sb-1", "ss-1"]);
        let got = api.raw(Method::POST, &uri, Some("{not json".into())).await;
        assert_error(&got, bad, ErrorKind::InvalidBody, "malformed JSON");
        let got = api.post(&uri, json!({"no_such_field": 1})).await;
        assert_error(
            &got,
            bad,
            ErrorKind::InvalidBody,
            "unknown field `no_such_field`",
        );
        let got = api.post(&uri, json!(7)).await;
        assert_error(
            &got,
            bad,
            ErrorKind::InvalidBody,
            "invalid type: integer `7`, expected struct",
        );
        let big = format!("{{\"code\": \"{}\"}}", "x".repeat(MAX_BODY_BYTES));
        let got = api.raw(Method::POST, &uri, Some(big)).await;
        let limit = format!("larger than the limit of {MAX_BODY_BYTES} bytes");
        assert_error(
            &got,
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::BodyTooLarge,
            &limit,
        );
    }
    // Wrong types, field by field.
    let a = api.post(routes::SANDBOXES, json!({})).await.1["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let cases = [
        (
            routes::SANDBOXES,
            json!({"limits": {"cpus": "two"}}),
            "invalid type: string \"two\"",
        ),
        (
            routes::SANDBOXES,
            json!({"auto_checkpoint": 1}),
            "invalid type: integer `1`",
        ),
        (
            routes::SANDBOX_EXEC,
            json!({"argv": "ls"}),
            "invalid type: string \"ls\"",
        ),
        (
            routes::SANDBOX_EXEC,
            json!({"argv": ["ls"], "timeout_ms": -1}),
            "invalid value: integer `-1`",
        ),
        (
            routes::SANDBOX_ROLLBACK,
            json!({"node": "n", "mode": "some"}),
            "unknown variant `some`",
        ),
        (
            routes::NODE_BRANCH,
            json!({"count": "3"}),
            "invalid type: string \"3\"",
        ),
        (routes::SANDBOX_SESSIONS, json!({}), "missing field `kind`"),
    ];
    for (template, body, needle) in cases {
        let got = api.post(&at(template, &[&a]), body).await;
        assert_error(&got, bad, ErrorKind::InvalidBody, needle);
    }
    // A body above axum's default limit (2 MiB) but below ours is read.
    let stdin = "y".repeat(3 << 20);
    let got = api
        .post(
            &at(routes::SANDBOX_EXEC, &[&a]),
            json!({"argv": ["echo", "big"], "stdin": stdin}),
        )
        .await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    // A checkpoint body that is not blank is JSON like any other.
    let uri = at(routes::SANDBOX_CHECKPOINT, &[&a]);
    let got = api.post(&uri, json!({"label": 3})).await;
    assert_error(
        &got,
        bad,
        ErrorKind::InvalidBody,
        "invalid type: integer `3`",
    );
    let got = api.post(&uri, json!({"lable": "x"})).await;
    assert_error(&got, bad, ErrorKind::InvalidBody, "unknown field `lable`");

    for query in ["", "?from=a", "?from=a&to=b&x=c"] {
        let got = api.get(&format!("{}{query}", routes::DIFF)).await;
        assert_error(&got, bad, ErrorKind::InvalidQuery, "field");
    }
    let got = api.get("/v1/sandboxes/sb-1/nope").await;
    assert_error(
        &got,
        StatusCode::NOT_FOUND,
        ErrorKind::RouteNotFound,
        "no route for GET /v1/sandboxes/sb-1/nope",
    );
    let got = api.get("/v1/sandboxes/%FF").await;
    assert_error(&got, bad, ErrorKind::InvalidPath, "invalid path parameter");

    // Every method a sandbox path does not serve is a 405 naming the path.
    let routes = concrete_routes();
    for (_, template, uri) in &routes {
        let served: BTreeSet<Method> = routes
            .iter()
            .filter(|r| r.1 == *template)
            .map(|r| r.0.clone())
            .collect();
        for method in [
            Method::GET,
            Method::POST,
            Method::DELETE,
            Method::PUT,
            Method::PATCH,
        ] {
            if served.contains(&method) {
                continue;
            }
            let got = api.raw(method.clone(), uri, None).await;
            let needle = format!(
                "{} does not accept {method}",
                uri.split('?').next().unwrap()
            );
            assert_error(
                &got,
                StatusCode::METHOD_NOT_ALLOWED,
                ErrorKind::MethodNotAllowed,
                &needle,
            );
        }
    }
    // After all that, the same router still serves.
    let list = api.get(routes::SANDBOXES).await;
    assert_eq!(list.0, StatusCode::OK);
    assert_eq!(list.1["sandboxes"][0]["id"], a.as_str());
}

#[tokio::test]
async fn without_sandbox_support_every_sandbox_route_is_503() {
    let h = Harness::without_sandboxes();
    let api = Api::new(&h);
    for (method, _, uri) in concrete_routes() {
        let uri = if uri == routes::DIFF {
            format!("{uri}?from=a&to=b")
        } else {
            uri
        };
        // The body is not even read: a malformed one gets the same answer.
        let body = (method == Method::POST).then(|| "{not json".to_owned());
        let got = api.raw(method.clone(), &uri, body).await;
        assert_error(
            &got,
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::SandboxesDisabled,
            "sandboxes are disabled in this daemon",
        );
    }
    // The cgroup routes are unaffected.
    assert_eq!(api.get(routes::CGROUPS).await.0, StatusCode::OK);
}

#[tokio::test]
async fn sandbox_requests_are_counted_by_route_template() {
    let h = Harness::new();
    let api = Api::new(&h);
    let id = api.post(routes::SANDBOXES, json!({})).await.1["id"]
        .as_str()
        .unwrap()
        .to_owned();
    api.get(&at(routes::SANDBOX, &[&id])).await;
    api.get(&at(routes::SANDBOX, &["nope"])).await;
    let req = Request::get(routes::METRICS).body(Body::empty()).unwrap();
    let response = metrics_router(h.service.clone())
        .oneshot(req)
        .await
        .unwrap();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    let line = |status: u16| {
        format!(
            "deltabox_api_requests_total{{route=\"/v1/sandboxes/{{id}}\",status=\"{status}\"}} 1"
        )
    };
    assert!(text.contains(&line(200)), "{text}");
    assert!(text.contains(&line(404)), "{text}");
    assert!(
        !text.contains(&id),
        "ids must not become label values: {text}"
    );
}
