//! Concurrency against a real `deltaboxd`: calls on two sandboxes run in parallel,
//! calls on one are serialised, and a sandbox busy for longer than `--busy-wait-ms`
//! answers `busy` while its status never waits.

use std::thread;
use std::time::{Duration, Instant};

use deltabox_tests::daemon::TestDaemon;
use deltabox_tests::require_root;
use deltabox_tests::sandbox::{Http, World, id_of};
use serde_json::json;

/// Each sandbox's command prints when it started and ended (the host's clock, which
/// the sandboxes share); run in parallel, the two intervals overlap. Serialised, the
/// second would start after the first ended, however loaded the machine.
#[test]
fn calls_on_two_sandboxes_run_in_parallel() {
    require_root();
    let daemon = TestDaemon::start("e-par", &[]);
    let http = Http::new(daemon.socket());
    let a = id_of(&http.create(&json!({})));
    let b = id_of(&http.create(&json!({})));
    let runs: Vec<_> = [a, b]
        .into_iter()
        .map(|sb| {
            let http = http.clone();
            thread::spawn(move || {
                let out = http.exec(
                    &sb,
                    &["sh", "-c", "date +%s%N; sleep 3; date +%s%N"],
                    Some(60_000),
                );
                assert_eq!(out["exit_code"], 0, "exec in {sb}: {out}");
                let stamps: Vec<u128> = out["stdout"]
                    .as_str()
                    .unwrap_or_default()
                    .lines()
                    .map(|l| l.parse().expect("a date +%s%N stamp"))
                    .collect();
                assert_eq!(stamps.len(), 2, "{out}");
                (stamps[0], stamps[1])
            })
        })
        .collect();
    let spans: Vec<(u128, u128)> = runs
        .into_iter()
        .map(|r| r.join().expect("exec thread"))
        .collect();
    let ((a_start, a_end), (b_start, b_end)) = (spans[0], spans[1]);
    assert!(
        a_start < b_end && b_start < a_end,
        "the commands of two sandboxes ran one after the other, not in parallel: {spans:?}"
    );
}

#[test]
fn calls_on_one_sandbox_are_serialised() {
    require_root();
    let daemon = TestDaemon::start("e-ser", &[]);
    let w = World::new(&daemon);
    w.http.run(&w.sandbox, &w.session, "import time\nlog = []");
    let start = Instant::now();
    let runs: Vec<_> = ["a", "b"]
        .into_iter()
        .map(|tag| {
            let (http, sb, session) = (w.http.clone(), w.sandbox.clone(), w.session.clone());
            thread::spawn(move || {
                let code = format!(
                    "log.append('{tag}+')\ntime.sleep(0.6)\nlog.append('{tag}-')\nprint('{tag}')"
                );
                http.run(&sb, &session, &code)
            })
        })
        .collect();
    let outs: Vec<String> = runs
        .into_iter()
        .map(|r| r.join().expect("run thread"))
        .collect();
    let took = start.elapsed();
    assert_eq!(
        outs,
        ["a\n", "b\n"],
        "each run answered with its own output"
    );
    let log = w.http.run(&w.sandbox, &w.session, "print(' '.join(log))");
    assert!(
        log == "a+ a- b+ b-\n" || log == "b+ b- a+ a-\n",
        "the two runs interleaved (or one is missing): {log:?}"
    );
    assert!(
        took >= Duration::from_millis(1200),
        "two 0.6 s runs in one session took {took:?}"
    );
    w.assert_intact("concurrent runs");
}

/// A request on a sandbox busy with a long operation waits for it (here 1 s, with
/// `--busy-wait-ms 1000`), then fails with `busy` naming the operation; meanwhile the
/// sandbox's status answers at once and says what runs; the long operation is not
/// disturbed, and afterwards everything works and nothing is lost.
#[test]
fn a_busy_sandbox_answers_busy_after_the_wait_and_status_never_waits() {
    require_root();
    let daemon = TestDaemon::start("e-busy", &["--busy-wait-ms", "1000"]);
    let w = World::new(&daemon);
    let http = w.http.clone();
    let sandbox = w.sandbox.clone();
    let long = std::thread::spawn(move || http.exec(&sandbox, &["sleep", "4"], None));
    // Until the exec holds the sandbox.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let busy = loop {
        let info = w.http.sandbox(&w.sandbox);
        if !info["busy"].is_null() {
            break info["busy"].clone();
        }
        assert!(std::time::Instant::now() < deadline, "never busy: {info}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert_eq!(busy["operation"], "exec", "{busy}");

    // Waiting would take the whole 1 s busy wait at least.
    let started = std::time::Instant::now();
    let info = w.http.sandbox(&w.sandbox);
    assert!(
        started.elapsed() < std::time::Duration::from_millis(900),
        "status waited {:?} for the exec",
        started.elapsed()
    );
    assert_eq!(info["busy"]["operation"], "exec", "{info}");
    assert!(
        info["sessions"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["id"] == w.session.as_str())),
        "a busy sandbox's status still lists its sessions: {info}"
    );

    let started = std::time::Instant::now();
    w.http
        .post(
            &format!("/v1/sandboxes/{}/checkpoint", w.sandbox),
            &json!({"label": "while busy"}),
        )
        .expect_error(
            409,
            "busy",
            &[&w.sandbox, "exec"],
            "checkpoint of a busy sandbox",
        );
    let waited = started.elapsed();
    assert!(
        waited >= std::time::Duration::from_millis(900),
        "answered busy after {waited:?}, not after the 1 s wait"
    );
    let sessions = w.http.get("/v1/sandboxes").expect(200, "list while busy");
    assert!(
        sessions.to_string().contains("\"busy\""),
        "the list shows the busy sandbox: {sessions}"
    );

    let result = long.join().expect("the exec thread");
    assert_eq!(
        result["exit_code"], 0,
        "the long exec was disturbed: {result}"
    );
    assert!(
        w.http.sandbox(&w.sandbox)["busy"].is_null(),
        "still busy after the exec"
    );
    w.assert_intact("a busy answer");
}
