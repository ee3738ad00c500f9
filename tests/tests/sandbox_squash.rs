//! gc squashes the snapshots of removed nodes that a live chain still stacks on
//! (DeltaFS squash, docs/deltafs.md "Squash"): the chain gets shorter, and every
//! remaining node, live sandbox and branch sees exactly the files it saw, also after a
//! daemon restart.
//!
//! Removing a node takes its subtree, so a removed node's snapshot is in the middle of
//! a live chain only when the node tree and the file chain differ: a rollback with
//! `processes_only` keeps the files, so each node taken after one is a child of the node
//! rolled back to while its snapshot stacks on the previous checkpoint's. Here every
//! node n2..n8 is a child of n1 (leaves, removable one by one) and their snapshots are
//! the chain S1 <- S2 <- ... <- S8 the sandbox's view stacks on.

use deltabox_tests::daemon::TestDaemon;
use deltabox_tests::require_root;
use deltabox_tests::sandbox::{Http, id_of};
use serde_json::{Value, json};

/// Bytes of the file every step rewrites.
const DATA_BYTES: u32 = 65_536;

/// Step `k`'s files: `/workspace/data` rewritten whole (`step k` repeated), and
/// `/workspace/marks/k` added.
fn write_step(http: &Http, sb: &str, k: u32) {
    http.sh(
        sb,
        &format!(
            "mkdir -p /workspace/marks && yes 'step {k}' | head -c {DATA_BYTES} \
             > /workspace/data && echo {k} > /workspace/marks/{k}"
        ),
    );
}

/// Asserts that `sb` shows exactly step `k`'s files: the data byte for byte (compared
/// with a copy made afresh in the sandbox) and the marks 1..=k.
fn assert_step(http: &Http, sb: &str, k: u32, what: &str) {
    let out = http.exec(
        sb,
        &[
            "sh",
            "-c",
            &format!(
                "yes 'step {k}' | head -c {DATA_BYTES} | cmp - /workspace/data && \
                 ls /workspace/marks | sort -n | tr '\\n' ' ' && cat /workspace/marks/*"
            ),
        ],
        Some(60_000),
    );
    assert_eq!(
        out["exit_code"], 0,
        "{what}: /workspace/data is not step {k}'s: {out}"
    );
    let marks: String = (1..=k).map(|i| format!("{i} ")).collect();
    let contents: String = {
        let mut sorted: Vec<String> = (1..=k).map(|i| i.to_string()).collect();
        sorted.sort(); // `cat marks/*` reads them in name order
        sorted.iter().map(|i| format!("{i}\n")).collect()
    };
    assert_eq!(
        out["stdout"].as_str().unwrap_or_default(),
        format!("{marks}{contents}"),
        "{what}: marks"
    );
}

fn rollback(http: &Http, sb: &str, node: &str, mode: &str) {
    http.post(
        &format!("/v1/sandboxes/{sb}/rollback"),
        &json!({ "node": node, "mode": mode }),
    )
    .expect(200, &format!("rollback {sb} to {node} ({mode})"));
}

/// The longest chain of a mounted view (`GET /v1/stats`, `deltafs.max_layers`).
fn max_layers(http: &Http) -> u64 {
    let stats = http.get("/v1/stats").expect(200, "stats");
    stats["deltafs"]["max_layers"]
        .as_u64()
        .unwrap_or_else(|| panic!("no deltafs.max_layers in {stats}"))
}

fn gc_json(daemon: &TestDaemon) -> Value {
    let out = daemon.cli(&["gc", "--json"]);
    assert!(
        out.status.success(),
        "deltabox gc --json: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("gc --json prints JSON")
}

#[test]
fn gc_squashes_removed_nodes_under_a_live_chain() {
    require_root();
    let mut daemon = TestDaemon::start("squash", &[]);
    let http = Http::new(daemon.socket());
    let sb = id_of(&http.create(&json!({})));

    // n1..n8: files of step k; n2..n8 children of n1, snapshots one chain.
    let mut nodes = Vec::new();
    write_step(&http, &sb, 1);
    nodes.push(http.checkpoint(&sb, "step 1"));
    for k in 2..=8 {
        rollback(&http, &sb, &nodes[0], "processes_only");
        write_step(&http, &sb, k);
        nodes.push(http.checkpoint(&sb, &format!("step {k}")));
    }
    let node = |k: u32| nodes[k as usize - 1].clone();
    let tree = http
        .get(&format!("/v1/sandboxes/{sb}/tree"))
        .expect(200, "tree");
    for n in tree["nodes"].as_array().unwrap().iter().skip(1) {
        assert_eq!(n["parent"], node(1).as_str(), "a child of n1: {n}");
    }
    // The writable layer and S1..S8.
    assert_eq!(max_layers(&http), 9, "the chain before");

    // Nothing removed yet: nothing to squash.
    let gc = gc_json(&daemon);
    assert_eq!(gc["layers_squashed"], 0, "{gc}");

    for k in 3..=6 {
        let removed = http
            .delete(&format!("/v1/nodes/{}", node(k)))
            .expect(200, &format!("remove n{k}"));
        assert_eq!(removed["nodes"], json!([node(k)]), "only n{k}: {removed}");
    }
    assert_eq!(
        max_layers(&http),
        9,
        "removing nodes does not shorten chains"
    );

    // While the sandbox is busy (a long exec holds it), its chain is left alone.
    let socket = daemon.socket().to_owned();
    let busy_sb = sb.clone();
    let long = std::thread::spawn(move || {
        Http::new(&socket).sh(&busy_sb, "sleep 4");
    });
    let started = std::time::Instant::now();
    while http.sandbox(&sb)["busy"].is_null() {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "the exec never held the sandbox"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let gc = gc_json(&daemon);
    assert!(
        !http.sandbox(&sb)["busy"].is_null(),
        "gc waited for the busy sandbox"
    );
    assert_eq!(
        gc["layers_squashed"], 0,
        "nothing squashed under a busy sandbox: {gc}"
    );
    assert_eq!(gc["squash_deferred"], 1, "{gc}");
    long.join().expect("the long exec");
    assert_eq!(max_layers(&http), 9, "deferred");

    let gc = gc_json(&daemon);
    assert_eq!(gc["layers_squashed"], 4, "S3..S6 merged into S7: {gc}");
    assert!(
        gc["squash_bytes_freed"].as_u64().unwrap() >= 3 * u64::from(DATA_BYTES),
        "the superseded copies of /workspace/data are freed: {gc}"
    );
    assert_eq!(gc["squash_deferred"], 0, "{gc}");
    assert_eq!(
        max_layers(&http),
        5,
        "the chain after: writable, S8, S7, S2, S1"
    );
    let text = daemon.cli(&["gc"]);
    assert!(text.status.success());
    assert!(
        String::from_utf8_lossy(&text.stdout).contains("squashed 0 layers"),
        "a second gc finds nothing: {}",
        String::from_utf8_lossy(&text.stdout)
    );

    // What everything sees is unchanged.
    assert_step(&http, &sb, 8, "the live sandbox after gc");
    for k in [7, 2, 1, 8] {
        rollback(&http, &sb, &node(k), "all");
        assert_step(&http, &sb, k, &format!("rolled back to n{k}"));
    }
    let branch = id_of(&http.branch(&node(7), 1)[0]);
    assert_step(&http, &branch, 7, "a branch of n7");
    write_step(&http, &branch, 9);
    assert_step(&http, &sb, 8, "the sandbox, after the branch wrote");

    // A restarted daemon mounts the squashed chain from disk.
    daemon.kill();
    daemon.restart(&[]);
    let http = Http::new(daemon.socket());
    // The sandbox at n8 (writable, S8, S7, S2, S1); without the squash on disk, 9.
    assert_eq!(max_layers(&http), 5, "the chain after a restart");
    assert_step(&http, &sb, 8, "the sandbox after a restart");
    assert_step(
        &http,
        &branch,
        7,
        "the branch after a restart (its head is n7)",
    );
    for k in [7, 2, 1] {
        rollback(&http, &sb, &node(k), "all");
        assert_step(
            &http,
            &sb,
            k,
            &format!("rolled back to n{k} after a restart"),
        );
    }
    let again = id_of(&http.branch(&node(2), 1)[0]);
    assert_step(&http, &again, 2, "a branch of n2 after a restart");
    let gc = gc_json(&daemon);
    assert_eq!(gc["layers_squashed"], 0, "{gc}");
}
