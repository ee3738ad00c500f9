//! The bounded template pool: with tiny bounds (daemon flags), checkpoints of a python
//! session holding known data evict the least recently used templates to their dumps,
//! a rollback to an evicted node takes the fallback and gets the memory back exactly
//! (a sha256 of the data computed in python), hits and misses are counted, the
//! `on-evict` policy writes a dump only when it evicts, and a template owning more
//! than the byte bound is evicted. Stats and metrics move with each.

use std::thread;
use std::time::{Duration, Instant};

use deltabox_tests::daemon::TestDaemon;
use deltabox_tests::memory::{PySandbox, random_buffer};
use deltabox_tests::sandbox::{Http, id_of};
use deltabox_tests::templates::{dump_dir, session_template_state, templates};
use serde_json::Value;

/// `GET /v1/stats`'s `pool`.
fn pool(api: &Http) -> Value {
    let stats = api.get("/v1/stats").expect(200, "stats");
    stats["pool"].clone()
}

fn count(pool: &Value, field: &str) -> u64 {
    pool[field]
        .as_u64()
        .unwrap_or_else(|| panic!("no {field} in {pool}"))
}

/// Polls the pool until `done` holds (the pool works on its own thread), up to 120 s.
fn wait_pool(api: &Http, daemon: &TestDaemon, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let p = pool(api);
        if done(&p) {
            return p;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not after 120 s: {p}\n{}",
            daemon.log()
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// Changes 1 MiB of `b` and checkpoints: returns the node and the hash at it.
fn step(api: &Http, sb: &str, py: &str, label: &str) -> (String, String) {
    api.run(sb, py, "b[0:1 << 20] = os.urandom(1 << 20)");
    let hash = api.run(sb, py, "print(h())");
    (api.checkpoint(sb, label), hash)
}

#[test]
fn the_least_recently_used_templates_are_evicted_and_restored_from_their_dumps() {
    let PySandbox {
        daemon,
        api,
        sandbox: sb,
        tree,
        session: py,
    } = PySandbox::start("pool-n", &["--pool-max-templates", "2"], &random_buffer(8));
    let start = pool(&api);
    assert_eq!(count(&start, "max_templates"), 2, "{start}");
    assert_eq!(start["dump_policy"], "eager", "{start}");

    let mut nodes = Vec::new();
    for i in 0..4 {
        nodes.push(step(&api, &sb, &py, &format!("n{i}")));
    }
    // Four templates over a bound of two: the two oldest go, once their dumps are
    // written.
    let p = wait_pool(&api, &daemon, "two evictions", |p| {
        count(p, "evictions") >= 2 && count(p, "templates_live") <= 2
    });
    assert_eq!(count(&p, "evictions"), 2, "{p}");
    assert_eq!(count(&p, "templates_live"), 2, "{p}");
    assert_eq!(count(&p, "templates_dumped"), 2, "{p}");
    assert!(count(&p, "bytes_owned") > 0, "{p}");
    let states: Vec<String> = nodes
        .iter()
        .map(|(n, _)| session_template_state(&api, &sb, n))
        .collect();
    assert_eq!(states, ["dumped", "dumped", "live", "live"]);
    for (n, _) in &nodes[..2] {
        assert!(dump_dir(&daemon, n, &py).join("manifest.json").is_file());
    }
    // Eviction destroyed the two templates: their processes and cgroups are gone.
    assert_eq!(templates(&daemon, &tree).len(), 2);
    assert_eq!(daemon.metric("deltabox_template_pool_evictions_total"), 2.0);
    assert_eq!(daemon.metric("deltabox_template_pool_templates"), 2.0);
    assert_eq!(daemon.metric("deltabox_template_pool_limit_templates"), 2.0);
    assert_eq!(daemon.metric("deltabox_templates{state=\"dumped\"}"), 2.0);
    assert!(daemon.metric("deltabox_template_pool_bytes") > 0.0);
    assert!(daemon.metric("deltabox_template_pool_limit_bytes") > 0.0);

    // A rollback to a live template's node: a hit.
    api.run(&sb, &py, "b = None");
    api.rollback(&sb, &nodes[3].0);
    assert_eq!(api.run(&sb, &py, "print(h())"), nodes[3].1);
    let p = pool(&api);
    assert_eq!((count(&p, "hits"), count(&p, "misses")), (1, 0), "{p}");

    // A rollback to an evicted node: a miss, the fallback, the same memory.
    api.rollback(&sb, &nodes[0].0);
    assert_eq!(api.run(&sb, &py, "print(h())"), nodes[0].1);
    let p = pool(&api);
    assert_eq!((count(&p, "hits"), count(&p, "misses")), (1, 1), "{p}");
    assert_eq!(daemon.metric("deltabox_template_pool_misses_total"), 1.0);
    assert_eq!(daemon.metric("deltabox_template_pool_hits_total"), 1.0);
    // Its templates were re-made from the restored session: the pool is over its
    // bound again and evicts the least recently used (n2: n3 was rolled back to).
    wait_pool(&api, &daemon, "a third eviction", |p| {
        count(p, "evictions") >= 3 && count(p, "templates_live") <= 2
    });
    assert_eq!(session_template_state(&api, &sb, &nodes[0].0), "live");
    assert_eq!(session_template_state(&api, &sb, &nodes[2].0), "dumped");

    // Another evicted node, and a branch of one: misses, each with its own memory.
    api.rollback(&sb, &nodes[1].0);
    assert_eq!(api.run(&sb, &py, "print(h())"), nodes[1].1);
    let branch = id_of(&api.branch(&nodes[2].0, 1)[0]);
    assert_eq!(api.run(&branch, &py, "print(h())"), nodes[2].1);
    assert_eq!(api.run(&sb, &py, "print(h())"), nodes[1].1);
    let p = pool(&api);
    assert_eq!(count(&p, "misses"), 3, "{p}");
    let json = daemon.cli(&["stats", "--json"]);
    let json: Value = serde_json::from_slice(&json.stdout).expect("stats --json");
    assert_eq!(json["pool"]["misses"], 3, "{json}");
    let stats = daemon.cli(&["stats"]);
    let text = String::from_utf8_lossy(&stats.stdout);
    assert!(text.contains("template pool: "), "{text}");
    assert!(text.contains("misses 3"), "{text}");
    eprintln!("{text}");
}

#[test]
fn on_evict_writes_a_dump_only_when_it_evicts() {
    let PySandbox {
        daemon,
        api,
        sandbox: sb,
        session: py,
        ..
    } = PySandbox::start(
        "pool-oe",
        &["--dump-policy", "on-evict", "--pool-max-templates", "1"],
        &random_buffer(8),
    );
    assert_eq!(pool(&api)["dump_policy"], "on-evict");
    let (n1, h1) = step(&api, &sb, &py, "one");
    // One template, the session's only one: kept, and no dump is written.
    wait_pool(&api, &daemon, "n1 measured", |p| {
        count(p, "templates_live") == 1
    });
    thread::sleep(Duration::from_millis(500));
    assert!(
        !dump_dir(&daemon, &n1, &py).exists(),
        "on-evict dumped a node at its checkpoint"
    );
    assert_eq!(count(&pool(&api), "evictions"), 0);

    let (n2, h2) = step(&api, &sb, &py, "two");
    let p = wait_pool(&api, &daemon, "n1 evicted", |p| count(p, "evictions") >= 1);
    assert_eq!(count(&p, "evictions"), 1, "{p}");
    assert!(
        dump_dir(&daemon, &n1, &py).join("manifest.json").is_file(),
        "n1 evicted without its dump"
    );
    assert!(
        !dump_dir(&daemon, &n2, &py).exists(),
        "n2, not evicted, was dumped"
    );
    assert_eq!(session_template_state(&api, &sb, &n1), "dumped");
    assert_eq!(session_template_state(&api, &sb, &n2), "live");

    // Back to n1 through the fallback (n2's template and n1's dump).
    api.run(&sb, &py, "b = bytearray(3)");
    api.rollback(&sb, &n1);
    assert_eq!(api.run(&sb, &py, "print(h())"), h1);
    assert_eq!(count(&pool(&api), "misses"), 1);
    // n1 is live again, so n2 goes now, dumped first.
    wait_pool(&api, &daemon, "n2 evicted", |p| count(p, "evictions") >= 2);
    assert!(dump_dir(&daemon, &n2, &py).join("manifest.json").is_file());
    api.rollback(&sb, &n2);
    assert_eq!(api.run(&sb, &py, "print(h())"), h2);
}

#[test]
fn a_template_owning_more_than_the_byte_bound_is_evicted() {
    let PySandbox {
        daemon,
        api,
        sandbox: sb,
        session: py,
        ..
    } = PySandbox::start("pool-b", &["--pool-max-bytes", "48M"], &random_buffer(64));
    let h1 = api.run(&sb, &py, "print(h())");
    let n1 = api.checkpoint(&sb, "one");
    // The eager dump of 64 MiB is queued (it takes well over the time of this call).
    assert!(
        count(&pool(&api), "dump_backlog") >= 1 || daemon.metric("deltabox_dump_backlog") >= 1.0,
        "no dump in the backlog right after a checkpoint"
    );
    assert_eq!(pool(&api)["max_bytes"], 48 << 20);
    // The session drops its data: the template alone keeps the 64 MiB it shared.
    api.run(&sb, &py, "b = bytearray(os.urandom(1 << 20))");
    let n2 = api.checkpoint(&sb, "two");
    let p = wait_pool(&api, &daemon, "n1 evicted over the byte bound", |p| {
        count(p, "evictions") >= 1
    });
    assert_eq!(count(&p, "evictions"), 1, "{p}");
    assert_eq!(session_template_state(&api, &sb, &n1), "dumped");
    assert_eq!(session_template_state(&api, &sb, &n2), "live");
    let p = wait_pool(&api, &daemon, "a measure after the eviction", |p| {
        count(p, "bytes_owned") <= 48 << 20 && count(p, "templates_live") == 1
    });
    assert!(count(&p, "bytes_owned") < 48 << 20, "{p}");
    api.rollback(&sb, &n1);
    assert_eq!(api.run(&sb, &py, "print(h())"), h1);
    // What the pool measured and did (its measures are logged at debug level:
    // RUST_LOG=info,deltabox_controller::sandbox::manager::pool=debug).
    for line in daemon.log().lines().filter(|l| {
        l.contains("template pool measured") || l.contains("evicted") || l.contains("dumped")
    }) {
        eprintln!("{line}");
    }
}
