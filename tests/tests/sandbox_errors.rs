//! Bad ids and wrong states against a real `deltaboxd`, on every sandbox endpoint:
//! unknown and ambiguous ids, a node of another tree, a node in use, sessions in wrong
//! states, unrestorable processes. Each answer has the documented status and `kind` and a
//! message naming the problem; afterwards nothing is lost (the sandbox, its session and
//! its nodes still work: [`World::assert_intact`]) and the daemon still serves.
//! Malformed requests: `sandbox_requests.rs`; concurrency and `busy`:
//! `sandbox_concurrency.rs`.

use deltabox_tests::daemon::TestDaemon;
use deltabox_tests::require_root;
use deltabox_tests::sandbox::{Http, Reply, World, common_prefix, id_of};
use serde_json::{Value, json};

/// A full, well-formed id no object has (UUIDv7 timestamps start with `01`).
const NO_ID: &str = "ffffffff-ffff-7fff-bfff-ffffffffffff";
/// A hex prefix longer than a short id, matching no full id.
const NO_PREFIX: &str = "fffffffff";
/// Not hex at all.
const NOT_AN_ID: &str = "not-an-id";

/// Every request naming a sandbox, with `id` in place of the sandbox (and the given
/// node and session where one is needed), as (method, path, body).
fn sandbox_routes(id: &str, node: &str, session: &str) -> Vec<(&'static str, String, Value)> {
    vec![
        ("GET", format!("/v1/sandboxes/{id}"), Value::Null),
        (
            "POST",
            format!("/v1/sandboxes/{id}/exec"),
            json!({"argv": ["true"]}),
        ),
        (
            "POST",
            format!("/v1/sandboxes/{id}/sessions"),
            json!({"kind": "bash"}),
        ),
        (
            "POST",
            format!("/v1/sandboxes/{id}/sessions/{session}/run"),
            json!({"code": "print(1)"}),
        ),
        (
            "POST",
            format!("/v1/sandboxes/{id}/checkpoint"),
            json!({"label": "x"}),
        ),
        (
            "POST",
            format!("/v1/sandboxes/{id}/rollback"),
            json!({"node": node, "mode": "all"}),
        ),
        (
            "DELETE",
            format!("/v1/sandboxes/{id}/sessions/{session}"),
            Value::Null,
        ),
        ("DELETE", format!("/v1/sandboxes/{id}"), Value::Null),
    ]
}

/// Every request naming a node, with `id` in place of the node.
fn node_routes(id: &str, other: &str) -> Vec<(&'static str, String, Value)> {
    vec![
        (
            "POST",
            format!("/v1/nodes/{id}/branch"),
            json!({"count": 1}),
        ),
        ("GET", format!("/v1/diff?from={id}&to={other}"), Value::Null),
        ("GET", format!("/v1/diff?from={other}&to={id}"), Value::Null),
        ("DELETE", format!("/v1/nodes/{id}"), Value::Null),
    ]
}

fn send(http: &Http, method: &str, path: &str, body: &Value) -> Reply {
    match method {
        "GET" => http.get(path),
        "DELETE" => http.delete(path),
        _ => http.post(path, body),
    }
}

#[test]
fn unknown_sandboxes_nodes_and_sessions_are_404_naming_the_id() {
    require_root();
    let daemon = TestDaemon::start("e-unk", &[]);
    let w = World::new(&daemon);
    let http = &w.http;
    for bad in [NO_ID, NO_PREFIX, NOT_AN_ID] {
        for (method, path, body) in sandbox_routes(bad, &w.node, &w.session) {
            send(http, method, &path, &body).expect_error(
                404,
                "unknown_sandbox",
                &[bad],
                &format!("{method} {path}"),
            );
        }
        for (method, path, body) in node_routes(bad, &w.node) {
            send(http, method, &path, &body).expect_error(
                404,
                "unknown_node",
                &[bad],
                &format!("{method} {path}"),
            );
        }
        let path = format!("/v1/sandboxes/{}/rollback", w.sandbox);
        http.post(&path, &json!({"node": bad})).expect_error(
            404,
            "unknown_node",
            &[bad],
            &format!("rollback to {bad}"),
        );
        for (method, path, body) in [
            (
                "POST",
                format!("/v1/sandboxes/{}/sessions/{bad}/run", w.sandbox),
                json!({"code": "print(1)"}),
            ),
            (
                "DELETE",
                format!("/v1/sandboxes/{}/sessions/{bad}", w.sandbox),
                Value::Null,
            ),
        ] {
            send(http, method, &path, &body).expect_error(
                404,
                "unknown_session",
                &[bad, &w.sandbox],
                &format!("{method} {path}"),
            );
        }
        w.assert_intact(&format!("requests naming {bad}"));
    }
    // Unknown routes and methods under the sandbox paths.
    http.get(&format!("/v1/sandboxes/{}/nope", w.sandbox))
        .expect_error(404, "route_not_found", &["nope"], "unknown route");
    http.raw("PUT", &format!("/v1/sandboxes/{}", w.sandbox), None, b"")
        .expect_error(405, "method_not_allowed", &["PUT"], "PUT on a sandbox");
    w.assert_intact("unknown routes");
}

#[test]
fn unknown_ids_on_the_tree_endpoints_are_404() {
    require_root();
    let daemon = TestDaemon::start("e-untr", &[]);
    let w = World::new(&daemon);
    for bad in [NO_ID, NO_PREFIX, NOT_AN_ID] {
        let path = format!("/v1/sandboxes/{bad}/tree");
        w.http
            .get(&path)
            .expect_error(404, "unknown_sandbox", &[bad], &path);
        let path = format!("/v1/nodes/{bad}/tree");
        w.http
            .get(&path)
            .expect_error(404, "unknown_node", &[bad], &path);
    }
    w.assert_intact("tree requests naming unknown ids");
}

#[test]
fn ambiguous_prefixes_are_400_listing_the_candidates() {
    require_root();
    let daemon = TestDaemon::start("e-amb", &[]);
    let w = World::new(&daemon);
    let http = &w.http;

    // Sandboxes made in the same second share the timestamp digits of their UUIDv7.
    let branches: Vec<String> = http.branch(&w.node, 2).iter().map(id_of).collect();
    let prefix = common_prefix(&branches[0], &branches[1]);
    assert!(
        prefix.len() >= 4,
        "branches {branches:?} made at once share no prefix"
    );
    let before = http.sandbox_ids();
    for (method, path, body) in sandbox_routes(&prefix, &w.node, &w.session) {
        send(http, method, &path, &body).expect_error(
            400,
            "ambiguous_id",
            &[&prefix, &branches[0], &branches[1]],
            &format!("{method} {path}"),
        );
    }
    assert_eq!(
        http.sandbox_ids(),
        before,
        "an ambiguous request changed the list"
    );

    // Two nodes taken one after the other.
    let n1 = http.checkpoint(&w.sandbox, "a");
    let n2 = http.checkpoint(&w.sandbox, "b");
    let prefix = common_prefix(&n1, &n2);
    assert!(prefix.len() >= 4, "nodes {n1} {n2} share no prefix");
    let nodes_before = http.node_ids(&w.sandbox);
    for (method, path, body) in node_routes(&prefix, &w.node) {
        send(http, method, &path, &body).expect_error(
            400,
            "ambiguous_id",
            &[&prefix, &n1, &n2],
            &format!("{method} {path}"),
        );
    }
    http.post(
        &format!("/v1/sandboxes/{}/rollback", w.sandbox),
        &json!({"node": prefix}),
    )
    .expect_error(400, "ambiguous_id", &[&n1, &n2], "rollback to a prefix");
    assert_eq!(http.node_ids(&w.sandbox), nodes_before);

    // Two sessions of one sandbox.
    let s2 = http.session(&w.sandbox, "bash");
    let prefix = common_prefix(&w.session, &s2);
    assert!(
        prefix.len() >= 4,
        "sessions {} {s2} share no prefix",
        w.session
    );
    http.run_reply(&w.sandbox, &prefix, "print(1)")
        .expect_error(
            400,
            "ambiguous_id",
            &[&w.session, &s2],
            "run in a session prefix",
        );
    http.delete(&format!("/v1/sandboxes/{}/sessions/{prefix}", w.sandbox))
        .expect_error(400, "ambiguous_id", &[&w.session, &s2], "stop a prefix");
    assert_eq!(http.run(&w.sandbox, &s2, "echo $((6*7))"), "42\n");
    w.assert_intact("ambiguous prefixes");
    // A prefix that names one id works.
    let one = &branches[0][..prefix_len_for(&branches[0], &http.sandbox_ids())];
    assert_eq!(id_of(&http.sandbox(one)), branches[0]);
}

/// The shortest prefix length of `id` that no other of `all` shares.
fn prefix_len_for(id: &str, all: &[String]) -> usize {
    all.iter()
        .filter(|o| *o != id)
        .map(|o| common_prefix(id, o).len() + 1)
        .max()
        .unwrap_or(1)
}

#[test]
fn rollback_to_a_node_of_another_tree_is_409_and_changes_nothing() {
    require_root();
    let daemon = TestDaemon::start("e-tree", &[]);
    let w = World::new(&daemon);
    let http = &w.http;
    let other = id_of(&http.create(&json!({})));
    http.sh(&other, "echo other > /workspace/f.txt");
    let other_node = http.checkpoint(&other, "other");
    let head = http.sandbox(&w.sandbox)["head"].clone();
    let trees = (
        http.sandbox(&w.sandbox)["tree"]
            .as_str()
            .unwrap()
            .to_owned(),
        http.sandbox(&other)["tree"].as_str().unwrap().to_owned(),
    );
    assert_ne!(trees.0, trees.1, "two creates made one tree");
    for mode in ["all", "files_only", "processes_only"] {
        http.post(
            &format!("/v1/sandboxes/{}/rollback", w.sandbox),
            &json!({"node": other_node, "mode": mode}),
        )
        .expect_error(
            409,
            "node_of_another_tree",
            &[&other_node, &trees.0, &trees.1],
            &format!("rollback ({mode}) to a node of another tree"),
        );
    }
    assert_eq!(http.sandbox(&w.sandbox)["head"], head);
    assert_eq!(http.run(&w.sandbox, &w.session, "print(x)"), "2\n");
    assert_eq!(http.sh(&w.sandbox, "cat /workspace/f.txt"), "two");
    w.assert_intact("rollback to a node of another tree");
    // The other sandbox is untouched too; branching from its node is the way.
    assert_eq!(http.sh(&other, "cat /workspace/f.txt"), "other\n");
    let b = id_of(&http.branch(&other_node, 1)[0]);
    assert_eq!(http.sh(&b, "cat /workspace/f.txt"), "other\n");
}

#[test]
fn removing_a_node_in_use_is_409_and_removes_nothing() {
    require_root();
    let daemon = TestDaemon::start("e-inuse", &[]);
    let w = World::new(&daemon);
    let http = &w.http;
    let child = http.checkpoint(&w.sandbox, "child");
    // The head itself, and its parent (the head is in its subtree).
    for node in [&child, &w.node] {
        http.delete(&format!("/v1/nodes/{node}")).expect_error(
            409,
            "node_in_use",
            &[node, &w.sandbox],
            &format!("remove node {node}"),
        );
    }
    let nodes = http.node_ids(&w.sandbox);
    assert!(
        nodes.contains(&child) && nodes.contains(&w.node),
        "{nodes:?}"
    );
    w.assert_intact("removing nodes in use");
    // Once the sandbox is elsewhere, the child goes (and only it).
    let removed = http
        .delete(&format!("/v1/nodes/{child}"))
        .expect(200, "remove the child");
    assert_eq!(removed["nodes"], json!([child]));
    w.assert_intact("removing the child");
}

#[test]
fn sessions_in_wrong_states_are_refused_and_lose_nothing() {
    require_root();
    let daemon = TestDaemon::start("e-sess", &[]);
    let w = World::new(&daemon);
    let http = &w.http;

    // A stopped session is gone: run and stop are 404.
    let bash = http.session(&w.sandbox, "bash");
    http.run(&w.sandbox, &bash, "V=1");
    http.delete(&format!("/v1/sandboxes/{}/sessions/{bash}", w.sandbox))
        .expect(200, "stop the bash session");
    http.run_reply(&w.sandbox, &bash, "echo $V").expect_error(
        404,
        "unknown_session",
        &[&bash],
        "run in a stopped session",
    );
    http.delete(&format!("/v1/sandboxes/{}/sessions/{bash}", w.sandbox))
        .expect_error(404, "unknown_session", &[&bash], "stop it twice");
    w.assert_intact("a stopped session");

    // An interpreter that exits: 422 session_failed, then the session is gone.
    let doomed = http.session(&w.sandbox, "python");
    http.run_reply(&w.sandbox, &doomed, "import os\nos._exit(3)")
        .expect_error(422, "session_failed", &[&doomed], "a session that exits");
    http.run_reply(&w.sandbox, &doomed, "print(1)")
        .expect_error(
            404,
            "unknown_session",
            &[&doomed],
            "run in a session that exited",
        );
    w.assert_intact("a session that exited");

    // An unknown kind.
    http.post(
        &format!("/v1/sandboxes/{}/sessions", w.sandbox),
        &json!({"kind": "ruby"}),
    )
    .expect_error(400, "invalid_request", &["ruby"], "a ruby session");
    w.assert_intact("an unknown session kind");
}

/// A session holding what DeltaCR cannot restore (a socket; pipes are restored since
/// `sandbox_proctree`) makes the checkpoint fail with `process_not_restorable`, naming
/// the sandbox, the session and its pid; no node is left, the session lives on, and
/// once the socket is closed
/// checkpoints work again. (Threads are restored since DeltaCR recreates them:
/// `cr_threads.rs`.)
#[test]
fn a_session_holding_a_socket_cannot_be_checkpointed_and_nothing_is_lost() {
    require_root();
    let daemon = TestDaemon::start("e-pipe", &[]);
    let w = World::new(&daemon);
    let http = &w.http;
    let nodes_before = http.node_ids(&w.sandbox);
    http.run(
        &w.sandbox,
        &w.session,
        "import socket
r, w = socket.socketpair()",
    );
    let pid = http.sandbox(&w.sandbox)["sessions"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["id"] == w.session.as_str()))
        .map(|s| s["pid"].to_string())
        .expect("the python session is listed");
    http.post(
        &format!("/v1/sandboxes/{}/checkpoint", w.sandbox),
        &json!({"label": "socket"}),
    )
    .expect_error(
        422,
        "process_not_restorable",
        &[&w.sandbox, &w.session, &pid],
        "checkpoint of a session holding a socket",
    );
    assert_eq!(http.node_ids(&w.sandbox), nodes_before, "a node was left");
    // The session lives on; once the socket is closed, checkpoints work again.
    http.run(&w.sandbox, &w.session, "r.close()\nw.close()");
    w.assert_intact("a refused checkpoint");
    let node = http.checkpoint(&w.sandbox, "after");
    http.run(&w.sandbox, &w.session, "x = 99");
    http.rollback(&w.sandbox, &node);
    assert_eq!(http.run(&w.sandbox, &w.session, "print(x)"), "2\n");
}

/// The sessions of a node whose sandbox was removed cannot be restored today
/// (docs/sandboxes.md, "Tree, diff, rm, gc"). A rollback to such a node must then be
/// refused before anything is killed, as `rollback_locked` does for a node whose
/// templates are gone, and a branch from it must leave no half-made sandbox.
#[test]
fn rollback_to_a_node_whose_sessions_cannot_be_restored_loses_nothing() {
    require_root();
    let daemon = TestDaemon::start("e-gone", &[]);
    let w = World::new(&daemon);
    let http = &w.http;
    let sibling = id_of(&http.branch(&w.node, 1)[0]);
    let session = id_of(&http.sandbox(&sibling)["sessions"][0]);
    http.run(
        &sibling,
        &session,
        "x = 5\nopen('/workspace/f.txt', 'w').write('five')",
    );
    http.delete(&format!("/v1/sandboxes/{}", w.sandbox))
        .expect(200, "remove the node's sandbox");
    let before = http.sandbox_ids();

    let reply = http.post(
        &format!("/v1/nodes/{}/branch", w.node),
        &json!({"count": 1}),
    );
    if reply.status != 201 {
        assert_unrestorable(&reply, &w.node, "branch");
        assert_eq!(http.sandbox_ids(), before, "a failed branch left a sandbox");
    }
    let reply = http.post(
        &format!("/v1/sandboxes/{sibling}/rollback"),
        &json!({"node": w.node, "mode": "all"}),
    );
    if reply.status == 200 {
        assert_eq!(http.run(&sibling, &session, "print(x)"), "1\n");
    } else {
        assert_unrestorable(&reply, &w.node, "rollback");
        let info = http.sandbox(&sibling);
        assert!(
            info["sessions"][0]["id"] == session.as_str(),
            "a refused rollback lost the sessions of {sibling}: {info}"
        );
        assert_eq!(http.run(&sibling, &session, "print(x)"), "5\n");
        assert_eq!(http.sh(&sibling, "cat /workspace/f.txt"), "five");
    }
    // The files alone can always go back.
    http.post(
        &format!("/v1/sandboxes/{sibling}/rollback"),
        &json!({"node": w.node, "mode": "files_only"}),
    )
    .expect(200, "files-only rollback");
    assert_eq!(http.sh(&sibling, "cat /workspace/f.txt"), "one");
}

/// A 422 refusal to restore `node`'s processes.
fn assert_unrestorable(reply: &Reply, node: &str, what: &str) {
    let kind = reply.body["kind"].as_str().unwrap_or_default();
    assert!(
        reply.status == 422 && ["node_not_restorable", "process_not_restorable"].contains(&kind),
        "{what} to {node}: {}",
        reply.text
    );
}
