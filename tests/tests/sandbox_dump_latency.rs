//! Eager dumps are written in the background, off the checkpoint's answer path: with
//! `--dump-policy off` a daemon writes no dump, with `eager` one per checkpointed
//! session, while the checkpoints keep answering. The latency of the two, side by side,
//! is a measurement (`--ignored --nocapture`), not a check: tests check behaviour, and
//! wall-clock figures on a shared CI machine say more about the machine.

use std::time::Duration;

use deltabox_tests::daemon::TestDaemon;
use deltabox_tests::require_root;
use deltabox_tests::sandbox::{Http, id_of};
use serde_json::json;

const SETUP: &str = "import os
g = [{'i': i, 'b': os.urandom(1000)} for i in range(64 * 1024)]";

const ROUNDS: usize = 12;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Checkpoint latencies (the daemon's `total_ms`) under `--dump-policy policy`, and the
/// dumps on disk once the background writer has had time to finish.
fn checkpoints(policy: &str) -> (Vec<f64>, usize) {
    let daemon = TestDaemon::start(&format!("dlat-{policy}"), &["--dump-policy", policy]);
    let api = Http::new(daemon.socket());
    let sb = id_of(&api.create(&json!({})));
    let py = api.session(&sb, "python");
    api.run(&sb, &py, SETUP);
    let mut ms = Vec::new();
    for round in 0..ROUNDS {
        // A page or so changed per round, like an agent's step.
        api.run(&sb, &py, &format!("g[{round}]['b'] = os.urandom(1000)"));
        let node = api
            .post(
                &format!("/v1/sandboxes/{sb}/checkpoint"),
                &json!({ "label": format!("r{round}") }),
            )
            .expect(201, "checkpoint");
        ms.push(node["timings"]["total_ms"].as_f64().expect("total_ms"));
    }
    // The writer works in the background: wait for it (bounded), not a fixed time.
    let count = || {
        std::fs::read_dir(daemon.data_dir().join("dumps"))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while policy != "off" && count() < ROUNDS && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(100));
    (ms, count())
}

#[test]
fn eager_dumps_are_written_in_the_background_and_off_writes_none() {
    require_root();
    let (_, off_dumps) = checkpoints("off");
    let (_, eager_dumps) = checkpoints("eager");
    assert_eq!(off_dumps, 0, "policy off wrote dumps");
    assert_eq!(
        eager_dumps, ROUNDS,
        "policy eager: one dump per checkpoint of the one session"
    );
}

/// `cargo test -p deltabox-tests --test sandbox_dump_latency -- --ignored --nocapture`
#[test]
#[ignore = "a measurement: prints the checkpoint latency with dumps off and eager"]
fn checkpoint_latency_with_and_without_eager_dumps() {
    require_root();
    let (off, _) = checkpoints("off");
    let (eager, _) = checkpoints("eager");
    let (m_off, m_eager) = (median(off.clone()), median(eager.clone()));
    eprintln!("checkpoint total_ms, dumps off:   median {m_off:.2} ms  {off:.2?}");
    eprintln!("checkpoint total_ms, dumps eager: median {m_eager:.2} ms  {eager:.2?}");
}
