//! Malformed requests against a real `deltaboxd`: bodies that are not the endpoint's
//! JSON, an oversized body, invalid values. Each answer has the documented status and
//! `kind` and a message naming the problem; afterwards nothing is lost
//! ([`World::assert_intact`]) and the daemon still serves.

use deltabox_tests::daemon::TestDaemon;
use deltabox_tests::require_root;
use deltabox_tests::sandbox::World;
use serde_json::json;

#[test]
fn malformed_bodies_are_400_invalid_body() {
    require_root();
    let daemon = TestDaemon::start("e-body", &[]);
    let w = World::new(&daemon);
    let http = &w.http;
    let sb = &w.sandbox;
    let session = &w.session;
    let posts = [
        (
            "/v1/sandboxes".to_owned(),
            r#"{"limits": {"memory_bytes": "lots"}}"#,
            "memory_bytes",
        ),
        (
            format!("/v1/sandboxes/{sb}/exec"),
            r#"{"argv": "true"}"#,
            "argv",
        ),
        (
            format!("/v1/sandboxes/{sb}/sessions"),
            r#"{"kind": 7}"#,
            "kind",
        ),
        (
            format!("/v1/sandboxes/{sb}/sessions/{session}/run"),
            r#"{"code": ["x"]}"#,
            "code",
        ),
        (
            format!("/v1/sandboxes/{sb}/checkpoint"),
            r#"{"label": 1}"#,
            "label",
        ),
        (
            format!("/v1/sandboxes/{sb}/rollback"),
            r#"{"node": 1}"#,
            "node",
        ),
        (
            format!("/v1/nodes/{}/branch", w.node),
            r#"{"count": "two"}"#,
            "count",
        ),
    ];
    let sandboxes_before = http.sandbox_ids();
    for (path, wrong_type, field) in &posts {
        // Not JSON.
        http.post_text(path, "{,}").expect_error(
            400,
            "invalid_body",
            &["JSON"],
            &format!("{path}: malformed JSON"),
        );
        // A field of the wrong type, named.
        http.post_text(path, wrong_type).expect_error(
            400,
            "invalid_body",
            &[field],
            &format!("{path}: {wrong_type}"),
        );
        // An unknown field, named.
        http.post_text(path, r#"{"bogus_field": 1}"#).expect_error(
            400,
            "invalid_body",
            &["bogus_field"],
            &format!("{path}: unknown field"),
        );
        // JSON, but not said to be.
        http.raw("POST", path, Some("text/plain"), br#"{"label": "x"}"#)
            .expect_error(
                400,
                "invalid_body",
                &["Content-Type"],
                &format!("{path}: text/plain"),
            );
    }
    // Missing required fields, named.
    for (path, field) in [
        (format!("/v1/sandboxes/{sb}/exec"), "argv"),
        (format!("/v1/sandboxes/{sb}/sessions"), "kind"),
        (format!("/v1/sandboxes/{sb}/sessions/{session}/run"), "code"),
        (format!("/v1/sandboxes/{sb}/rollback"), "node"),
    ] {
        http.post_text(&path, "{}").expect_error(
            400,
            "invalid_body",
            &[field],
            &format!("{path}: no {field}"),
        );
    }
    // A negative memory limit and an unknown rollback mode are wrong types too.
    http.post("/v1/sandboxes", &json!({"limits": {"memory_bytes": -1}}))
        .expect_error(400, "invalid_body", &["-1"], "negative memory");
    http.post(
        &format!("/v1/sandboxes/{sb}/rollback"),
        &json!({"node": w.node, "mode": "sideways"}),
    )
    .expect_error(400, "invalid_body", &["sideways"], "unknown rollback mode");
    // Queries of diff: missing or unknown parameters.
    for query in [
        format!("from={}", w.node),
        format!("from={0}&to={0}&colour=red", w.node),
        String::new(),
    ] {
        http.get(&format!("/v1/diff?{query}")).expect_error(
            400,
            "invalid_query",
            &[],
            &format!("diff?{query}"),
        );
    }
    assert_eq!(
        http.sandbox_ids(),
        sandboxes_before,
        "a refused create made a sandbox"
    );
    w.assert_intact("malformed bodies");
}

#[test]
fn an_oversized_body_is_413_and_a_large_one_is_fine() {
    require_root();
    let daemon = TestDaemon::start("e-413", &[]);
    let w = World::new(&daemon);
    let http = &w.http;
    let stdin = "a".repeat(17 << 20);
    let body = json!({"argv": ["wc", "-c"], "stdin": stdin}).to_string();
    let limit = (16u64 << 20).to_string();
    for path in [
        format!("/v1/sandboxes/{}/exec", w.sandbox),
        "/v1/sandboxes".to_owned(),
        format!("/v1/sandboxes/{}/checkpoint", w.sandbox),
    ] {
        http.post_text(&path, &body).expect_error(
            413,
            "body_too_large",
            &[&limit],
            &format!("17 MiB to {path}"),
        );
    }
    w.assert_intact("oversized bodies");
    // Just under the limit is served, stdin and all.
    let n = (16 << 20) - 4096;
    let out = http
        .post(
            &format!("/v1/sandboxes/{}/exec", w.sandbox),
            &json!({"argv": ["wc", "-c"], "stdin": "b".repeat(n)}),
        )
        .expect(200, "exec with 16 MiB of stdin");
    assert_eq!(
        out["stdout"].as_str().map(str::trim),
        Some(n.to_string().as_str())
    );
}

#[test]
fn invalid_values_are_400_invalid_request_naming_the_value() {
    require_root();
    let daemon = TestDaemon::start("e-val", &[]);
    let w = World::new(&daemon);
    let http = &w.http;
    let sandboxes_before = http.sandbox_ids();
    let bad_creates = [
        (json!({"limits": {"memory_bytes": 4096}}), "4096"),
        (json!({"limits": {"memory_bytes": 0}}), "memory"),
        (json!({"limits": {"cpus": 0.0}}), "cpus"),
        (json!({"limits": {"cpus": -1.5}}), "-1.5"),
        (json!({"limits": {"pids": 2}}), "pids"),
        (json!({"rootfs": "relative/dir"}), "relative/dir"),
        (
            json!({"rootfs": "/nonexistent/deltabox-rootfs"}),
            "/nonexistent/deltabox-rootfs",
        ),
        (json!({"rootfs": "/proc/version"}), "/proc/version"),
    ];
    for (req, needle) in &bad_creates {
        http.post("/v1/sandboxes", req).expect_error(
            400,
            "invalid_request",
            &[needle],
            &format!("create {req}"),
        );
    }
    assert_eq!(
        http.sandbox_ids(),
        sandboxes_before,
        "a refused create made a sandbox"
    );
    for count in [0, 65] {
        http.post(
            &format!("/v1/nodes/{}/branch", w.node),
            &json!({"count": count}),
        )
        .expect_error(
            400,
            "invalid_request",
            &[&count.to_string()],
            &format!("branch ×{count}"),
        );
    }
    assert_eq!(
        http.sandbox_ids(),
        sandboxes_before,
        "a refused branch made a sandbox"
    );
    let exec = format!("/v1/sandboxes/{}/exec", w.sandbox);
    http.post(&exec, &json!({"argv": []})).expect_error(
        400,
        "invalid_request",
        &["argv"],
        "empty argv",
    );
    http.post(&exec, &json!({"argv": [""]})).expect_error(
        400,
        "invalid_request",
        &["argv"],
        "argv [\"\"]",
    );
    http.post(&exec, &json!({"argv": ["true"], "timeout_ms": 0}))
        .expect_error(400, "invalid_request", &["timeout_ms"], "exec timeout 0");
    http.post(
        &format!("/v1/sandboxes/{}/sessions/{}/run", w.sandbox, w.session),
        &json!({"code": "x = 3", "timeout_ms": 0}),
    )
    .expect_error(400, "invalid_request", &["timeout_ms"], "run timeout 0");
    // The refused run did not run.
    assert_eq!(http.run(&w.sandbox, &w.session, "print(x)"), "2\n");
    w.assert_intact("invalid values");
}
