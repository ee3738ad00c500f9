//! Eager dumps stay off the checkpoint's critical path: the checkpoint latency of a
//! sandbox whose python session holds 64 MiB, with dumps off and with eager dumps
//! (each written in the background while the next checkpoints are taken), printed
//! side by side. Its own test binary: it sets `DELTABOX_DUMP_POLICY` for the daemons
//! it starts, and no other test runs in this process meanwhile.

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

/// Checkpoint latencies (the daemon's `total_ms`) with `DELTABOX_DUMP_POLICY=policy`.
fn checkpoints(policy: &str) -> (Vec<f64>, usize) {
    // SAFETY: this test binary has this one test; no other thread reads the
    // environment while it is set (the daemon inherits it at spawn).
    unsafe { std::env::set_var("DELTABOX_DUMP_POLICY", policy) };
    let daemon = TestDaemon::start(&format!("dlat-{policy}"), &[]);
    // SAFETY: as above.
    unsafe { std::env::remove_var("DELTABOX_DUMP_POLICY") };
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
    std::thread::sleep(Duration::from_millis(100));
    let dumps = std::fs::read_dir(daemon.data_dir().join("dumps"))
        .map(|d| d.count())
        .unwrap_or(0);
    (ms, dumps)
}

#[test]
fn eager_dumps_do_not_slow_checkpoints_down() {
    require_root();
    let (off, off_dumps) = checkpoints("off");
    let (eager, eager_dumps) = checkpoints("eager");
    assert_eq!(off_dumps, 0, "policy off wrote dumps");
    assert!(eager_dumps > 0, "policy eager wrote no dump");
    let (m_off, m_eager) = (median(off.clone()), median(eager.clone()));
    eprintln!("checkpoint total_ms, dumps off:   median {m_off:.2} ms  {off:.2?}");
    eprintln!("checkpoint total_ms, dumps eager: median {m_eager:.2} ms  {eager:.2?}");
    assert!(
        m_eager <= m_off * 1.5 + 3.0,
        "eager dumps slowed checkpoints: median {m_eager:.2} ms against {m_off:.2} ms"
    );
}
