//! Copy-on-write faults after a rollback and the warm-up, against a real `deltaboxd`
//! with its eBPF programs: a python session that writes N pages after a rollback takes
//! at least N copy-on-write faults (another sandbox none of them); after a rollback
//! with `warm_up`, the same writes take almost none, the warm-up pre-faulted at least
//! N pages, and the session's memory is byte-identical to the checkpoint's; the
//! metrics move.

use deltabox_tests::daemon::TestDaemon;
use deltabox_tests::memory::PySandbox;
use deltabox_tests::require_root;
use deltabox_tests::sandbox::{Http, id_of};
use serde_json::{Value, json};

/// Pages the session writes (8 MiB).
const N: u64 = 2048;

/// The `dirty` entry of `sandbox` in `GET /v1/stats`.
fn figures(http: &Http, sandbox: &str) -> Value {
    let stats = http.get("/v1/stats").expect(200, "stats");
    stats["dirty"]
        .as_array()
        .and_then(|all| all.iter().find(|d| d["sandbox"] == sandbox).cloned())
        .unwrap_or_else(|| panic!("no figures for {sandbox} in {stats}"))
}

fn cow_faults(http: &Http, sandbox: &str) -> u64 {
    let d = figures(http, sandbox);
    d["cow_faults"]
        .as_u64()
        .unwrap_or_else(|| panic!("no cow_faults in {d}"))
}

fn rollback(http: &Http, sandbox: &str, node: &str, warm_up: bool) -> Value {
    let rolled = http
        .post(
            &format!("/v1/sandboxes/{sandbox}/rollback"),
            &json!({ "node": node, "warm_up": warm_up }),
        )
        .expect(200, &format!("rollback {sandbox} to {node}"));
    assert_eq!(rolled["warm_up"], warm_up, "{rolled}");
    rolled
}

/// Writes one byte in each of the N pages of `buf`.
const WRITE: &str = "for i in range(0, len(buf), 4096): buf[i] = (buf[i] + 1) % 256";
/// The hash of `buf`.
const HASH: &str = "import hashlib; print(hashlib.sha256(buf).hexdigest())";

#[test]
fn warm_up_takes_the_copy_on_write_faults_of_the_next_run_and_changes_no_byte() {
    require_root();
    let daemon = TestDaemon::start("warmup", &[]);
    let http = Http::new(daemon.socket());
    let sandbox = id_of(&http.create(&json!({})));
    let other = id_of(&http.create(&json!({})));
    let other_session = http.session(&other, "python");
    http.run(&other, &other_session, "x = 1");
    let session = http.session(&sandbox, "python");
    // Present, written pages: after the checkpoint's fork each is shared with the
    // template, and the first write to it is a copy-on-write fault.
    http.run(
        &sandbox,
        &session,
        &format!("buf = bytearray(b'\\x01') * ({N} * 4096)"),
    );
    let hash = http.run(&sandbox, &session, HASH);
    let node = http.checkpoint(&sandbox, "buffer");

    // Written after the checkpoint: learned for the node.
    http.run(&sandbox, &session, WRITE);
    assert!(
        cow_faults(&http, &sandbox) >= N,
        "{}",
        figures(&http, &sandbox)
    );

    // Written after a plain rollback: at least N faults, none of them the other's.
    rollback(&http, &sandbox, &node, false);
    let others = cow_faults(&http, &other);
    http.run(&sandbox, &session, WRITE);
    let cold = cow_faults(&http, &sandbox);
    assert!(
        cold >= N,
        "{N} pages written after a rollback: {cold} faults"
    );
    let others = cow_faults(&http, &other) - others;
    assert!(
        others < 16,
        "the idle other sandbox took {others} faults meanwhile"
    );

    // A rollback that warms up: the memory is the checkpoint's, byte for byte.
    rollback(&http, &sandbox, &node, true);
    assert_eq!(http.run(&sandbox, &session, HASH), hash);
    let d = figures(&http, &sandbox);
    assert!(
        d["warmed_up_pages"].as_u64().unwrap() >= N,
        "warm-up of {N} pages: {d}"
    );

    // And the same writes after a warm rollback take (nearly) no fault.
    rollback(&http, &sandbox, &node, true);
    http.run(&sandbox, &session, WRITE);
    let warm = cow_faults(&http, &sandbox);
    eprintln!("{N} pages written after a rollback: {cold} faults cold, {warm} warmed up");
    assert!(
        warm < cold / 4,
        "{warm} faults after a warm-up against {cold} without"
    );
    // Written once more: the checkpoint's bytes, plus one, as without a warm-up.
    rollback(&http, &sandbox, &node, false);
    http.run(&sandbox, &session, WRITE);
    let cold_hash = http.run(&sandbox, &session, HASH);
    rollback(&http, &sandbox, &node, true);
    http.run(&sandbox, &session, WRITE);
    assert_eq!(http.run(&sandbox, &session, HASH), cold_hash);

    // `deltabox stats` shows both columns (docs/cli.md has this table).
    let stats = String::from_utf8_lossy(&daemon.cli(&["stats"]).stdout).into_owned();
    assert!(
        stats.contains("COW FAULTS") && stats.contains("WARMED UP"),
        "{stats}"
    );
    let scraped = |series: &str| daemon.metric(series);
    assert!(
        scraped("deltabox_cow_faults_total{warm_up=\"false\"}") >= (2 * N) as f64,
        "{}",
        daemon.scrape()
    );
    assert!(scraped("deltabox_cow_faults_total{warm_up=\"true\"}") >= 1.0);
    assert_eq!(scraped("deltabox_warm_up_seconds_count"), 3.0);
    assert!(scraped("deltabox_warm_up_pages_sum") >= (3 * N) as f64);
}

#[test]
fn the_daemon_default_warms_up_rollbacks_that_do_not_say() {
    let PySandbox {
        daemon,
        api: http,
        sandbox,
        session,
        ..
    } = PySandbox::start(
        "warmdef",
        &["--warm-up"],
        "buf = bytearray(b'\\x01') * (256 * 4096)",
    );
    let node = http.checkpoint(&sandbox, "buffer");
    http.run(&sandbox, &session, WRITE);
    // No `warm_up` in the request: the daemon's default.
    let rolled = http.rollback(&sandbox, &node);
    assert_eq!(rolled["warm_up"], true, "{rolled}");
    http.run(&sandbox, &session, WRITE);
    assert!(
        figures(&http, &sandbox)["warmed_up_pages"]
            .as_u64()
            .unwrap()
            >= 256
    );
    // The request still decides, through the CLI too.
    let out = daemon.cli(&["rollback", &sandbox, &node, "--no-warm-up", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rolled: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rolled["warm_up"], false, "{rolled}");
}

/// Median of `v` (sorted in place).
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Times one `session run` of [`WRITE`]: (client round trip ms, the daemon's
/// `duration_ms`, copy-on-write faults of the period so far).
fn timed_write(http: &Http, sandbox: &str, session: &str) -> (f64, f64, u64) {
    let start = std::time::Instant::now();
    let out = http
        .run_reply(sandbox, session, WRITE)
        .expect(200, "run the writes");
    let round_trip = start.elapsed().as_secs_f64() * 1e3;
    assert_eq!(out["status"], 0, "{out}");
    let ran = out["duration_ms"].as_f64().expect("duration_ms");
    (round_trip, ran, cow_faults(http, sandbox))
}

/// The bench of docs/deltacr.md "Warm-up": a python session holding `MIB` MiB rolls
/// back to its checkpoint and writes one byte per page of it, without a warm-up, with
/// one and the command sent at once (it waits for the warm-up), and with one given time
/// to finish (an agent thinking between the rollback and its next command). Prints the
/// medians of the next run's time and of its copy-on-write faults.
///
/// `cargo test -p deltabox-tests --test sandbox_warmup -- --ignored --nocapture`
/// (a debug `deltaboxd` unless the tests are built with `--release`).
#[test]
#[ignore = "a benchmark: run it with --ignored --nocapture"]
fn bench_next_run_after_a_rollback_with_and_without_warm_up() {
    require_root();
    const ROUNDS: usize = 9;
    let daemon = TestDaemon::start("warmbench", &[]);
    let http = Http::new(daemon.socket());
    println!("| MiB written | warm-up | next run (client) | run (daemon) | CoW faults |");
    println!("|---|---|---|---|---|");
    for mib in [16u64, 64] {
        let sandbox = id_of(&http.create(&json!({})));
        let session = http.session(&sandbox, "python");
        http.run(
            &sandbox,
            &session,
            &format!("buf = bytearray(b'\\x01') * ({mib} << 20)"),
        );
        let node = http.checkpoint(&sandbox, "buffer");
        http.run(&sandbox, &session, WRITE);
        // Per case: client round trips, the daemon's run times, faults.
        type Samples = (Vec<f64>, Vec<f64>, Vec<f64>);
        let mut rows: Vec<(&str, Samples)> = ["off", "on, command at once", "on, command after it"]
            .into_iter()
            .map(|what| (what, Samples::default()))
            .collect();
        for _ in 0..ROUNDS {
            for (i, row) in rows.iter_mut().enumerate() {
                let before = daemon.metric("deltabox_warm_up_seconds_count");
                rollback(&http, &sandbox, &node, i > 0);
                if i == 2 {
                    // Until the warm-up pass is done (it is counted when it ends).
                    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
                    while daemon.metric("deltabox_warm_up_seconds_count") <= before {
                        assert!(std::time::Instant::now() < deadline, "warm-up never ended");
                        std::thread::sleep(std::time::Duration::from_millis(5));
                    }
                }
                let (round_trip, ran, faults) = timed_write(&http, &sandbox, &session);
                row.1.0.push(round_trip);
                row.1.1.push(ran);
                row.1.2.push(faults as f64);
            }
        }
        for (what, (mut client, mut ran, mut faults)) in rows {
            println!(
                "| {mib} | {what} | {:.1} ms | {:.1} ms | {:.0} |",
                median(&mut client),
                median(&mut ran),
                median(&mut faults)
            );
        }
        http.delete(&format!("/v1/sandboxes/{sandbox}"));
    }
    let count = daemon.metric("deltabox_warm_up_seconds_count");
    let sum = daemon.metric("deltabox_warm_up_seconds_sum");
    let pages = daemon.metric("deltabox_warm_up_pages_sum");
    println!(
        "warm-up passes: {count}, mean {:.1} ms, mean {:.0} pages",
        sum / count * 1e3,
        pages / count
    );
}
