//! Standby forks: after a checkpoint, and after a rollback, the daemon forks the node's
//! session templates ahead of time into the sandbox's `standby/` cgroup; a rollback to
//! one of the sandbox's `--standby-nodes` most recent nodes moves those children into
//! `work/` and finishes them instead of forking. The restored state must be the node's
//! exactly, each standby used once, and standbys must go with their node, their
//! sandbox and the bound.

use std::fs;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use deltabox_tests::memory::{PySandbox, random_buffer};
use deltabox_tests::nodestate::{checkpointed_steps, state, step};

/// A thread of the python session that counts, so that a restore must bring back a
/// second thread that runs (a standby recreates its threads ahead of the rollback).
const TICKER: &str = "import threading, time
ticks = [0]
def tick():
    while True:
        ticks[0] += 1
        time.sleep(0.002)
threading.Thread(target=tick, daemon=True).start()";

/// A sandbox with a python session (8 MiB of random bytes, a counting thread) and a
/// bash session, of a daemon started with `flags`.
fn start(test: &str, flags: &[&str]) -> (PySandbox, String) {
    let setup = format!("{}\nx = 0\n{TICKER}", random_buffer(8));
    let sb = PySandbox::start(test, flags, &setup);
    let sh = sb.api.session(&sb.sandbox, "bash");
    step(&sb.api, &sb.sandbox, &sb.session, &sh, 0);
    (sb, sh)
}

/// The sandbox's `standby/` cgroup.
fn standby_cgroup(sb: &PySandbox) -> PathBuf {
    sb.daemon
        .sandbox_cgroup()
        .join(&sb.tree)
        .join(format!("sb-{}", sb.sandbox))
        .join("standby")
}

/// The processes in the sandbox's `standby/` cgroup.
fn standby_procs(sb: &PySandbox) -> Vec<i32> {
    fs::read_to_string(standby_cgroup(sb).join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// `GET /v1/stats`'s standby figures: forks held ready, and forks still to come.
fn standby_stats(sb: &PySandbox) -> (u64, u64) {
    let stats = sb.api.get("/v1/stats").expect(200, "stats");
    let pool = &stats["pool"];
    let figure = |key: &str| {
        pool[key]
            .as_u64()
            .unwrap_or_else(|| panic!("no pool.{key} in {stats}"))
    };
    (figure("standbys_ready"), figure("standbys_pending"))
}

/// Waits until the standby cgroup holds `want` processes and the daemon's stats say as
/// much (`want` ready, none to come); returns them.
fn wait_standbys(sb: &PySandbox, want: usize) -> Vec<i32> {
    let start = Instant::now();
    loop {
        let procs = standby_procs(sb);
        let stats = standby_stats(sb);
        if procs.len() == want && stats == (want as u64, 0) {
            return procs;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{} standby processes, not {want}: {procs:?}; stats (ready, to come): {stats:?}\n{}",
            procs.len(),
            sb.daemon.log()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// How many sessions a rollback's answer says came from standby forks.
fn from_standby(reply: &serde_json::Value) -> u64 {
    reply["standby_sessions"]
        .as_u64()
        .unwrap_or_else(|| panic!("no standby_sessions in {reply}"))
}

/// Checkpoints three steps, then rolls back to the first, the third and the first
/// again: every rollback finishes standby forks of both sessions (which never ran
/// sandbox code before: the state is the node's exactly), and each node used gets a
/// fresh standby for the next rollback.
#[test]
fn rollbacks_finish_standby_forks_into_the_nodes_exact_state() {
    let (sb, sh) = start("standby", &[]);
    let (api, id, py) = (&sb.api, sb.sandbox.as_str(), sb.session.as_str());
    let (nodes, states) = checkpointed_steps(api, id, py, &sh, 3);
    // Three nodes, two sessions each (the default keeps three nodes).
    wait_standbys(&sb, 6);
    step(api, id, py, &sh, 9);
    for &i in &[0usize, 2, 0] {
        let reply = api.rollback(id, &nodes[i]);
        assert_eq!(from_standby(&reply), 2, "rollback to n{}: {reply}", i + 1);
        assert_eq!(
            state(api, id, py, &sh),
            states[i],
            "after the rollback to n{}",
            i + 1
        );
        let ticking = api.run(
            id,
            py,
            "a = ticks[0]\ntime.sleep(0.05)\nprint(threading.active_count(), ticks[0] > a)",
        );
        assert_eq!(
            ticking.trim(),
            "2 True",
            "the thread after the rollback to n{}",
            i + 1
        );
        // The standbys are not the sandbox's processes: the kill of `work/` spared
        // the other nodes', and the node used gets new ones.
        wait_standbys(&sb, 6);
        step(api, id, py, &sh, 10 + i as u32);
    }
    // The daemon made moves between cgroups cheap (it turned favordynmods on).
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let cgroup2 = mountinfo
        .lines()
        .find(|l| l.contains(" - cgroup2 "))
        .expect("a cgroup2 mount");
    assert!(cgroup2.contains("favordynmods"), "{cgroup2}");
}

/// `--standby-nodes 2`: only the two most recent nodes have standbys; a rollback to an
/// older one forks as before (and is right); removing a node drops its standbys, and
/// removing the sandbox every one of them (their processes and the cgroup).
#[test]
fn standbys_are_bounded_and_go_with_their_node_and_sandbox() {
    let (sb, sh) = start("standbyb", &["--standby-nodes", "2"]);
    let (api, id, py) = (&sb.api, sb.sandbox.as_str(), sb.session.as_str());
    let (nodes, states) = checkpointed_steps(api, id, py, &sh, 3);
    wait_standbys(&sb, 4);
    // n1 is the third most recent: no standby.
    let reply = api.rollback(id, &nodes[0]);
    assert_eq!(from_standby(&reply), 0, "{reply}");
    assert_eq!(state(api, id, py, &sh), states[0]);
    // Now n1 and n3 have standbys, n2's were dropped.
    wait_standbys(&sb, 4);
    let reply = api.rollback(id, &nodes[2]);
    assert_eq!(from_standby(&reply), 2, "{reply}");
    assert_eq!(state(api, id, py, &sh), states[2]);
    wait_standbys(&sb, 4);
    let reply = api.rollback(id, &nodes[0]);
    assert_eq!(from_standby(&reply), 2, "{reply}");
    assert_eq!(state(api, id, py, &sh), states[0]);
    // n3 is a leaf and not the head: removing it takes its standbys.
    wait_standbys(&sb, 4);
    api.delete(&format!("/v1/nodes/{}", nodes[2]))
        .expect(200, "removing n3");
    wait_standbys(&sb, 2);
    step(api, id, py, &sh, 7);
    let reply = api.rollback(id, &nodes[0]);
    assert_eq!(from_standby(&reply), 2, "{reply}");
    assert_eq!(state(api, id, py, &sh), states[0]);
    let standbys = wait_standbys(&sb, 2);
    api.delete(&format!("/v1/sandboxes/{id}"))
        .expect(200, "removing the sandbox");
    for pid in standbys {
        let gone = Instant::now();
        while PathBuf::from(format!("/proc/{pid}")).exists()
            && fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
        {
            assert!(
                gone.elapsed() < Duration::from_secs(10),
                "standby {pid} outlived its sandbox"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
    assert!(!standby_cgroup(&sb).exists(), "the standby cgroup is left");
}

/// `--standby-nodes 0`: no standby is ever forked, and rollbacks fork as before.
#[test]
fn no_standbys_when_turned_off() {
    let (sb, sh) = start("standby0", &["--standby-nodes", "0"]);
    let (api, id, py) = (&sb.api, sb.sandbox.as_str(), sb.session.as_str());
    step(api, id, py, &sh, 1);
    let before = state(api, id, py, &sh);
    let n1 = api.checkpoint(id, "n1");
    step(api, id, py, &sh, 2);
    thread::sleep(Duration::from_millis(300));
    assert!(standby_procs(&sb).is_empty(), "{:?}", standby_procs(&sb));
    assert_eq!(standby_stats(&sb), (0, 0));
    let reply = api.rollback(id, &n1);
    assert_eq!(from_standby(&reply), 0, "{reply}");
    assert_eq!(state(api, id, py, &sh), before);
}
