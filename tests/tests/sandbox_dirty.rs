//! What a sandbox dirtied since its last checkpoint, and what a checkpoint made the store
//! write, against a real `deltaboxd` with its eBPF programs: N pages written inside a
//! sandbox are N dirtied pages for that sandbox (in `GET /v1/stats` and summed on
//! `/metrics`), a checkpoint and a rollback reset the figure, another sandbox's writes
//! are not counted for it, and each checkpoint adds one observation to
//! `deltabox_checkpoint_written_bytes`.

use deltabox_tests::daemon::TestDaemon;
use deltabox_tests::require_root;
use deltabox_tests::sandbox::{Http, id_of};
use serde_json::{Value, json};

/// The `dirty` entry of `sandbox` in `GET /v1/stats`.
fn dirty(http: &Http, sandbox: &str) -> Value {
    let stats = http.get("/v1/stats").expect(200, "stats");
    stats["dirty"]
        .as_array()
        .and_then(|all| all.iter().find(|d| d["sandbox"] == sandbox).cloned())
        .unwrap_or_else(|| panic!("no dirty figures for {sandbox} in {stats}"))
}

fn pages(d: &Value) -> u64 {
    d["pages_dirtied"].as_u64().expect("pages_dirtied")
}

/// Writes `n` pages, one `write` each, to a new file of the sandbox.
fn write_pages(http: &Http, sandbox: &str, file: &str, n: u32) {
    http.sh(
        sandbox,
        &format!("dd if=/dev/zero of=/workspace/{file} bs=4096 count={n} status=none"),
    );
}

/// Slack for pages the command's own start-up may dirty (none expected: the shell and
/// `dd` write no regular file but the one asked).
const SLACK: u64 = 2;

#[test]
fn written_pages_are_dirty_until_the_next_checkpoint_or_rollback() {
    require_root();
    let daemon = TestDaemon::start("dirty", &[]);
    let http = Http::new(daemon.socket());
    let sandbox = id_of(&http.create(&json!({})));
    let other = id_of(&http.create(&json!({})));

    const N: u32 = 48;
    write_pages(&http, &sandbox, "a", N);
    let d = dirty(&http, &sandbox);
    assert!(
        (u64::from(N)..=u64::from(N) + SLACK).contains(&pages(&d)),
        "{N} pages written: {d}"
    );
    // The sandbox's own status shows the same figures.
    let info = http.sandbox(&sandbox);
    assert_eq!(info["dirty"]["cgroup"], d["cgroup"], "{info}");
    assert!(pages(&info["dirty"]) >= pages(&d), "{info}");
    assert_eq!(d["bytes_dirtied"].as_u64(), Some(pages(&d) * 4096), "{d}");
    assert!(d["writes"].as_u64().unwrap() >= u64::from(N), "{d}");
    assert!(
        d["bytes_written"].as_u64().unwrap() >= u64::from(N) * 4096,
        "{d}"
    );
    assert!(
        d["cgroup"].as_str().unwrap().ends_with("/work"),
        "the sandbox's work cgroup: {d}"
    );
    // The other sandbox wrote nothing.
    assert_eq!(pages(&dirty(&http, &other)), 0);
    // `/metrics` has the sum over sandboxes, not a series per sandbox.
    let summed = daemon.metric("deltabox_sandbox_dirtied_pages");
    assert!(summed >= f64::from(N), "{summed}");
    assert!(
        !daemon.scrape().contains(&sandbox),
        "a sandbox id is a label on /metrics"
    );

    let written_before = daemon.metric("deltabox_checkpoint_written_bytes_count");
    let epoch = d["epoch"].as_u64().unwrap();
    let node = http.checkpoint(&sandbox, "after a");
    let d = dirty(&http, &sandbox);
    assert_eq!(pages(&d), 0, "a checkpoint resets the figure: {d}");
    assert_eq!(d["epoch"].as_u64(), Some(epoch + 1), "{d}");
    // Observed after the answer, off its path: waited for.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while daemon.metric("deltabox_checkpoint_written_bytes_count") < written_before + 1.0
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(
        daemon.metric("deltabox_checkpoint_written_bytes_count"),
        written_before + 1.0
    );
    let written = daemon.metric("deltabox_checkpoint_written_bytes_sum");
    assert!(
        written > 0.0,
        "a checkpoint writes at least its metadata: {written}"
    );

    const M: u32 = 8;
    write_pages(&http, &sandbox, "b", M);
    let d = dirty(&http, &sandbox);
    assert!(
        (u64::from(M)..=u64::from(M) + SLACK).contains(&pages(&d)),
        "{M} pages after the checkpoint: {d}"
    );
    http.rollback(&sandbox, &node);
    assert_eq!(
        pages(&dirty(&http, &sandbox)),
        0,
        "the files are the node's again"
    );

    // DeltaFS saw the sandbox's requests, one freeze and one switch at least.
    assert!(daemon.metric("deltabox_deltafs_ops_total{op=\"create\"}") >= 2.0);
    assert!(daemon.metric("deltabox_deltafs_freezes_total") >= 1.0);
    assert!(daemon.metric("deltabox_deltafs_switches_total") >= 1.0);
    assert!(daemon.metric("deltabox_deltafs_layers") >= 2.0);
    let stats = http.get("/v1/stats").expect(200, "stats");
    assert!(
        stats["deltafs"]["freezes"].as_u64().unwrap() >= 1,
        "{stats}"
    );

    // A removed sandbox is no longer reported.
    http.delete(&format!("/v1/sandboxes/{other}"))
        .expect(200, "remove");
    let stats = http.get("/v1/stats").expect(200, "stats");
    assert!(
        !stats["dirty"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["sandbox"] == other.as_str()),
        "{stats}"
    );
}
