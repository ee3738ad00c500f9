//! The state-cost gauges, the error counter and `deltabox stats` against a real
//! `deltaboxd`: each figure moves as it should after real operations (sandboxes,
//! sessions, checkpoints, removals, errors), template memory is what the templates
//! really own, and the latency percentiles count every checkpoint.

use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use deltabox_tests::daemon::TestDaemon;
use deltabox_tests::require_root;
use deltabox_tests::sandbox::{Http, id_of};
use serde_json::{Value, json};

const LIVE: &str = "deltabox_templates{state=\"live\"}";

#[test]
fn state_gauges_follow_sandboxes_nodes_and_templates() {
    require_root();
    let daemon = TestDaemon::start("stgauge", &[]);
    let http = Http::new(daemon.socket());
    assert_eq!(daemon.metric("deltabox_sandboxes"), 0.0);
    assert_eq!(daemon.metric("deltabox_nodes"), 0.0);
    assert_eq!(daemon.metric(LIVE), 0.0);
    assert_eq!(daemon.metric("deltabox_template_memory_bytes"), 0.0);

    let sandbox = id_of(&http.create(&json!({})));
    assert_eq!(daemon.metric("deltabox_sandboxes"), 1.0);
    assert_eq!(daemon.metric("deltabox_trees"), 1.0);

    // Files written in the sandbox land in its DeltaFS layer.
    let store_before = daemon.metric("deltabox_store_bytes");
    http.sh(
        &sandbox,
        "head -c 4194304 /dev/urandom > /workspace/blob && sync",
    );
    let store_after = daemon.metric("deltabox_store_bytes");
    assert!(
        store_after >= store_before + 4_000_000.0,
        "store {store_before} -> {store_after} after writing 4 MiB"
    );

    // A session holding 32 MiB of its own memory, then a checkpoint: one node, one
    // template.
    let session = http.session(&sandbox, "python");
    http.run(
        &sandbox,
        &session,
        "x = bytearray(32 << 20)\nx[:] = b'a' * len(x)",
    );
    let node = http.checkpoint(&sandbox, "one");
    assert_eq!(daemon.metric("deltabox_nodes"), 1.0);
    assert_eq!(daemon.metric(LIVE), 1.0);
    assert_eq!(daemon.metric("deltabox_templates{state=\"gone\"}"), 0.0);
    let shared = daemon.metric("deltabox_template_memory_bytes");
    assert!(shared > 0.0, "a live template owns some memory: {shared}");
    // Right after the fork the session and its template share the 32 MiB; once the
    // session rewrites it, the template alone holds the old copies.
    http.run(&sandbox, &session, "x[:] = b'b' * len(x)");
    let owned = daemon.metric("deltabox_template_memory_bytes");
    assert!(
        owned >= shared + 30.0 * 1048576.0,
        "template memory {shared} -> {owned} after the session rewrote 32 MiB"
    );

    // A checkpoint without sessions adds a node and no template.
    http.delete(&format!("/v1/sandboxes/{sandbox}/sessions/{session}"))
        .expect(200, "stop the session");
    let bare = http.checkpoint(&sandbox, "bare");
    assert_eq!(daemon.metric("deltabox_nodes"), 2.0);
    assert_eq!(daemon.metric(LIVE), 1.0);

    // Removing the sandbox keeps its nodes (and their templates).
    http.delete(&format!("/v1/sandboxes/{sandbox}"))
        .expect(200, "remove the sandbox");
    assert_eq!(daemon.metric("deltabox_sandboxes"), 0.0);
    assert_eq!(daemon.metric("deltabox_nodes"), 2.0);
    assert_eq!(daemon.metric(LIVE), 1.0);
    // Removing the first node removes its subtree (both nodes) and the template.
    let removed = http
        .delete(&format!("/v1/nodes/{node}"))
        .expect(200, "remove the nodes");
    let mut gone: Vec<&str> = removed["nodes"]
        .as_array()
        .map(|n| n.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    gone.sort_unstable();
    let mut expected = [node.as_str(), bare.as_str()];
    expected.sort_unstable();
    assert_eq!(gone, expected, "{removed}");
    assert_eq!(daemon.metric("deltabox_nodes"), 0.0);
    assert_eq!(daemon.metric(LIVE), 0.0);
    assert_eq!(daemon.metric("deltabox_template_memory_bytes"), 0.0);
}

#[test]
fn every_error_answer_counts_under_its_code() {
    require_root();
    let daemon = TestDaemon::start("sterr", &[]);
    let http = Http::new(daemon.socket());
    let unknown = "deltabox_api_errors_total{code=\"unknown_sandbox\"}";
    let invalid = "deltabox_api_errors_total{code=\"invalid_body\"}";
    assert_eq!(daemon.metric(unknown), 0.0);
    http.get("/v1/sandboxes/0000nope").expect_error(
        404,
        "unknown_sandbox",
        &["0000nope"],
        "unknown sandbox",
    );
    assert_eq!(daemon.metric(unknown), 1.0);
    // Through the CLI too: the same answer, counted again.
    let out = daemon.cli(&["status", "0000nope"]);
    assert!(!out.status.success());
    assert_eq!(daemon.metric(unknown), 2.0);
    http.post_text("/v1/sandboxes", "{not json").expect_error(
        400,
        "invalid_body",
        &["malformed JSON"],
        "bad body",
    );
    assert_eq!(daemon.metric(invalid), 1.0);
    assert_eq!(daemon.metric(unknown), 2.0);
    // Successes count nowhere.
    http.get("/v1/sandboxes").expect(200, "list");
    assert_eq!(daemon.metric(unknown), 2.0);
}

#[test]
fn stats_report_every_checkpoint_with_ordered_percentiles() {
    require_root();
    let daemon = TestDaemon::start("ststats", &[]);
    let http = Http::new(daemon.socket());
    let sandbox = id_of(&http.create(&json!({})));
    let session = http.session(&sandbox, "bash");
    http.run(&sandbox, &session, "cd /tmp");
    const N: u64 = 6;
    let mut first = String::new();
    for i in 0..N {
        let node = http.checkpoint(&sandbox, &format!("n{i}"));
        if i == 0 {
            first = node;
        }
    }
    let rolled = http.rollback(&sandbox, &first);
    // The rollback's phases: each restored session's fork, fix-up and resume took time
    // within the restores' wall time (one session: no parallelism to exceed it).
    let t = &rolled["timings"];
    let phase = |k: &str| t[k].as_f64().unwrap_or_else(|| panic!("no {k}: {rolled}"));
    for k in ["fork_ms", "fixup_ms", "resume_ms"] {
        assert!(phase(k) > 0.0, "{k}: {rolled}");
    }
    assert_eq!(phase("fallback_ms"), 0.0, "a live template: {rolled}");
    assert!(
        phase("fork_ms") + phase("fixup_ms") + phase("resume_ms") <= phase("processes_ms"),
        "{rolled}"
    );
    http.sh(&sandbox, "true");
    http.sh(&sandbox, "true");

    let out = daemon.cli(&["stats", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stats: Value = serde_json::from_slice(&out.stdout).expect("stats --json is JSON");
    let op = |name: &str| -> Value {
        stats["operations"]
            .as_array()
            .and_then(|ops| ops.iter().find(|o| o["operation"] == name))
            .cloned()
            .unwrap_or_else(|| panic!("no {name} in {stats}"))
    };
    let cp = op("checkpoint");
    assert_eq!(cp["count"], N, "{stats}");
    assert_eq!(cp["samples"], N, "{stats}");
    let ms: Vec<f64> = ["p50_ms", "p90_ms", "p99_ms", "max_ms"]
        .iter()
        .map(|p| cp[p].as_f64().unwrap_or_else(|| panic!("no {p}: {stats}")))
        .collect();
    assert!(ms[0] > 0.0, "{stats}");
    assert!(ms.windows(2).all(|w| w[0] <= w[1]), "unordered: {ms:?}");
    // The same observations as the Prometheus histogram's.
    let histogram = daemon.metric("deltabox_checkpoint_seconds_count{phase=\"total\"}");
    assert_eq!(histogram, N as f64);
    // Each checkpoint is one observation of each of its phases, the rollback one of each
    // of its own (no `fallback`: the template was live).
    for phase in ["quiesce", "files", "processes", "record"] {
        let count = format!("deltabox_checkpoint_seconds_count{{phase=\"{phase}\"}}");
        assert_eq!(daemon.metric(&count), N as f64, "{count}");
    }
    for phase in [
        "total",
        "kill",
        "files",
        "processes",
        "fork",
        "fixup",
        "resume",
    ] {
        let count = format!("deltabox_rollback_seconds_count{{mode=\"all\",phase=\"{phase}\"}}");
        assert_eq!(daemon.metric(&count), 1.0, "{count}");
    }
    let fallback = daemon
        .scrape()
        .contains("deltabox_rollback_seconds_count{mode=\"all\",phase=\"fallback\"}");
    assert!(!fallback, "a fallback phase observed without a fallback");
    assert_eq!(op("rollback")["count"], 1, "{stats}");
    assert_eq!(op("exec")["count"], 2, "{stats}");
    assert_eq!(op("session_run")["count"], 1, "{stats}");
    assert_eq!(op("branch")["count"], 0, "{stats}");
    assert!(op("branch").get("p50_ms").is_none(), "{stats}");
    let state = &stats["state"];
    assert_eq!(state["sandboxes"], 1, "{stats}");
    assert_eq!(state["nodes"], N, "{stats}");
    assert_eq!(state["templates_live"], N, "{stats}");
    assert!(
        state["template_memory_bytes"].as_u64().unwrap() > 0,
        "{stats}"
    );
    assert!(state["store_bytes"].as_u64().is_some(), "{stats}");

    // The table: a row per operation, the state below.
    let table = daemon.cli(&["stats"]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(table.status.success(), "{text}");
    let row: Vec<&str> = text
        .lines()
        .find(|l| l.starts_with("checkpoint"))
        .unwrap_or_else(|| panic!("no checkpoint row:\n{text}"))
        .split_whitespace()
        .collect();
    assert_eq!(row[1], N.to_string(), "{text}");
    assert!(text.contains(&format!("nodes {N}")), "{text}");

    // DeltaFS: one freeze per checkpoint, one switch for the rollback.
    assert_eq!(stats["deltafs"]["freezes"], N, "{stats}");
    assert_eq!(stats["deltafs"]["switches"], 1, "{stats}");
    assert!(text.contains(&format!("freezes {N}  switches 1")), "{text}");
    // The sandbox's row: nothing dirtied since the rollback (the two `true`s write no
    // file).
    assert_eq!(stats["dirty"][0]["sandbox"], sandbox.as_str(), "{stats}");
    assert_eq!(stats["dirty"][0]["pages_dirtied"], 0, "{stats}");
    let dirty_row: Vec<&str> = text
        .lines()
        .find(|l| l.starts_with(&sandbox))
        .unwrap_or_else(|| panic!("no row for {sandbox}:\n{text}"))
        .split_whitespace()
        .collect();
    assert_eq!(dirty_row[1], "0", "{text}");
}

#[test]
fn a_streamed_exec_counts_until_its_last_event() {
    require_root();
    let daemon = TestDaemon::start("ststream", &[]);
    let http = Http::new(daemon.socket());
    let sandbox = id_of(&http.create(&json!({})));
    // The answer's headers (200) leave at once; the exit event a second later.
    let body = json!({"argv": ["sh", "-c", "echo a; sleep 1; echo b"]}).to_string();
    let mut conn = UnixStream::connect(daemon.socket()).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("read timeout");
    let started = Instant::now();
    write!(
        conn,
        "POST /v1/sandboxes/{sandbox}/exec HTTP/1.1\r\nHost: localhost\r\n\
         Connection: close\r\nContent-Type: application/json\r\n\
         Accept: application/x-ndjson\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    let mut answer = String::new();
    conn.read_to_string(&mut answer).expect("read the stream");
    let took = started.elapsed();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains(r#""type":"exit""#), "{answer}");

    let stats: Value = serde_json::from_slice(&daemon.cli(&["stats", "--json"]).stdout)
        .expect("stats --json is JSON");
    let exec = &stats["operations"][3];
    assert_eq!(exec["operation"], "exec", "{stats}");
    assert_eq!(exec["count"], 1, "{stats}");
    let ms = exec["max_ms"].as_f64().unwrap_or_default();
    assert!(
        ms >= 1000.0 && ms <= took.as_secs_f64() * 1e3 + 50.0,
        "exec timed {ms} ms; the stream took {took:?}"
    );
}
