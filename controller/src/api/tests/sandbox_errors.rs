//! Sandbox errors through the router: every kind with its status and message, and
//! the failures the fake really runs into.

use std::collections::BTreeSet;

use axum::http::{Method, StatusCode};
use serde_json::json;

use super::sandboxes::{Api, at};
use super::{Harness, assert_error_kind};
use crate::api::routes;
use crate::sandbox::SandboxError;

/// One error of each variant.
fn one_of_each() -> Vec<SandboxError> {
    let s = |x: &str| x.to_owned();
    vec![
        SandboxError::UnknownSandbox { id: s("zz") },
        SandboxError::UnknownNode { id: s("zz") },
        SandboxError::UnknownSession {
            sandbox: s("sb-1"),
            id: s("zz"),
        },
        SandboxError::Ambiguous {
            what: "node",
            prefix: s("nd"),
            candidates: vec![s("nd-1"), s("nd-2")],
        },
        SandboxError::NodeOfAnotherTree {
            node: s("nd-1"),
            node_tree: s("t1"),
            sandbox: s("sb-2"),
            sandbox_tree: s("t2"),
        },
        SandboxError::NodeNotRestorable {
            node: s("nd-1"),
            session: s("ss-1"),
            why: s("template exited"),
        },
        SandboxError::Invalid {
            message: s("count 0 is not within 1 to 64"),
        },
        SandboxError::NodeInUse {
            node: s("nd-1"),
            sandboxes: vec![s("sb-1")],
        },
        SandboxError::Busy {
            sandbox: s("sb-1"),
            operation: s("exec"),
            for_ms: 31_000,
            waited_ms: 30_000,
        },
        SandboxError::LimitsExceeded {
            sandbox: s("sb-1"),
            limit: "memory",
            message: s("the OOM killer killed session se-1"),
        },
        SandboxError::DiskFull {
            message: s("no space left on /var/lib/deltabox/store"),
        },
        SandboxError::Session {
            sandbox: s("sb-1"),
            session: s("ss-1"),
            message: s("python exited"),
        },
        SandboxError::Process {
            sandbox: s("sb-1"),
            message: s("pid 42 holds a socket"),
        },
        SandboxError::Internal {
            message: s("database is locked"),
        },
    ]
}

#[tokio::test]
async fn every_sandbox_error_kind_has_its_status_and_message() {
    let h = Harness::new();
    let api = Api::new(&h);
    let errors = one_of_each();
    let kinds: BTreeSet<&str> = errors.iter().map(SandboxError::kind).collect();
    assert_eq!(
        kinds,
        SandboxError::KINDS.into_iter().collect(),
        "one_of_each misses a kind"
    );
    for err in errors {
        let (kind, status, message) = (err.kind(), err.http_status(), err.to_string());
        h.sandboxes.fail_next(err);
        let got = api.get(routes::SANDBOXES).await;
        let status = StatusCode::from_u16(status).unwrap();
        assert_error_kind(&got, status, kind, &message);
        assert_eq!(
            got.1["error"],
            message.as_str(),
            "the message is the error's own"
        );
    }
    // And the router still answers.
    assert_eq!(api.get(routes::SANDBOXES).await.0, StatusCode::OK);
}

#[tokio::test]
async fn real_failures_reach_the_client_as_sandbox_errors() {
    let h = Harness::new();
    let api = Api::new(&h);
    let (nf, bad, conflict) = (
        StatusCode::NOT_FOUND,
        StatusCode::BAD_REQUEST,
        StatusCode::CONFLICT,
    );
    let got = api.get(&at(routes::SANDBOX, &["nope"])).await;
    assert_error_kind(&got, nf, "unknown_sandbox", "unknown sandbox \"nope\"");
    let got = api
        .post(&at(routes::NODE_BRANCH, &["nope"]), json!({}))
        .await;
    assert_error_kind(&got, nf, "unknown_node", "unknown node \"nope\"");

    let a = api.post(routes::SANDBOXES, json!({})).await.1["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let b = api.post(routes::SANDBOXES, json!({})).await.1["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let got = api.get(&at(routes::SANDBOX, &["sb-"])).await;
    assert_error_kind(&got, bad, "ambiguous_id", &format!("matches {a}, {b}"));
    let got = api
        .delete(&at(routes::SANDBOX_SESSION, &[&a, "ss-9"]))
        .await;
    assert_error_kind(
        &got,
        nf,
        "unknown_session",
        &format!("sandbox {a} has no session \"ss-9\""),
    );
    let got = api
        .post(
            &at(routes::SANDBOX_SESSIONS, &[&a]),
            json!({"kind": "ruby"}),
        )
        .await;
    assert_error_kind(
        &got,
        bad,
        "invalid_request",
        "\"ruby\" is neither bash nor python",
    );
    let got = api
        .post(&at(routes::SANDBOX_EXEC, &[&a]), json!({"argv": []}))
        .await;
    assert_error_kind(&got, bad, "invalid_request", "argv is empty");

    let node = api
        .raw(Method::POST, &at(routes::SANDBOX_CHECKPOINT, &[&a]), None)
        .await
        .1;
    let node = node["id"].as_str().unwrap().to_owned();
    let got = api
        .post(&at(routes::SANDBOX_ROLLBACK, &[&b]), json!({"node": node}))
        .await;
    assert_error_kind(
        &got,
        conflict,
        "node_of_another_tree",
        &format!("node {node} belongs to tree"),
    );
    let got = api
        .post(&at(routes::NODE_BRANCH, &[&node]), json!({"count": 65}))
        .await;
    assert_error_kind(
        &got,
        bad,
        "invalid_request",
        "count 65 is not within 1 to 64",
    );
    let got = api.delete(&at(routes::NODE, &[&node])).await;
    assert_error_kind(&got, conflict, "node_in_use", &a);

    let session = api
        .post(
            &at(routes::SANDBOX_SESSIONS, &[&a]),
            json!({"kind": "bash"}),
        )
        .await
        .1;
    let sid = session["id"].as_str().unwrap();
    let uri = at(routes::SANDBOX_SESSION_RUN, &[&a, sid]);
    let got = api.post(&uri, json!({"code": "exit"})).await;
    let status = StatusCode::UNPROCESSABLE_ENTITY;
    assert_error_kind(&got, status, "session_failed", "the interpreter exited");
    let uri = format!("{}?from={node}&to=zz", routes::DIFF);
    assert_error_kind(&api.get(&uri).await, nf, "unknown_node", "\"zz\"");
}
