//! The dashboards against a real Prometheus: it scrapes a running deltaboxd with the
//! project's scrape configuration while a watched cgroup writes and its epoch
//! advances, a sandbox does file I/O and is checkpointed, rolled back (with and without
//! warm-up) and branched (its session's templates evicted from a pool of one), and
//! requests fail, and every
//! PromQL expression of every Grafana panel returns data.

use std::{
    process::Command,
    thread,
    time::{Duration, Instant},
};

use deltabox_tests::{
    cgroup::TestCgroup, daemon::TestDaemon, prometheus::TestPrometheus, require_root, scratch_dir,
    unique,
};

const DASHBOARD: &str = include_str!("../../dashboards/grafana/deltabox.json");

fn panel_queries() -> Vec<(String, String)> {
    let dashboard: serde_json::Value = serde_json::from_str(DASHBOARD).expect("dashboard JSON");
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or_default().to_string();
            out.push((title, target["expr"].as_str().expect("expr").to_string()));
        }
    }
    out
}

#[test]
fn every_dashboard_query_returns_data_from_a_real_prometheus() {
    require_root();
    // A pool of one template: each checkpoint evicts the one before (once its dump is
    // written), so the pool's panels have evictions to show.
    let daemon = TestDaemon::start("prom", &["--pool-max-templates", "1"]);
    let cg = TestCgroup::new(&unique("prom"));
    let path = cg.path().to_str().unwrap().to_string();
    assert!(daemon.cli(&["watch", &path]).status.success());
    let prometheus = TestPrometheus::start(
        "prom",
        &format!("127.0.0.1:{}", daemon.metrics_port()),
        "1s",
    );
    let dir = scratch_dir("prom");

    // A sandbox for the checkpoint, rollback and branch latency panels.
    let created = daemon.cli(&["create", "--json"]);
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let sandbox = json_id(&created.stdout);
    // A session, so that checkpoints make templates and rollbacks fork them (pool hits).
    let session = daemon.cli(&["session", "start", &sandbox, "--kind", "bash"]);
    assert!(
        session.status.success(),
        "{}",
        String::from_utf8_lossy(&session.stderr)
    );

    // Activity over several scrapes: writes, epochs, API calls, state operations.
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut round = 0;
    while Instant::now() < deadline {
        let file = dir.join(format!("f{round}"));
        cg.run(Command::new("dd").args([
            "if=/dev/zero",
            &format!("of={}", file.display()),
            "bs=4096",
            "count=4",
            "status=none",
        ]));
        assert!(daemon.cli(&["inode-stats", "--json"]).status.success());
        if round % 3 == 2 {
            assert!(daemon.cli(&["epoch", &path]).status.success());
        }
        // File I/O in the sandbox for the DeltaFS and dirtied-pages panels: creates,
        // writes, a rename, a listing, an unlink, a copy-up of a frozen file.
        let script = format!(
            "cd /workspace && dd if=/dev/zero of=w{round} bs=4096 count=8 conv=fsync \
             status=none && mv w{round} m{round} && ls -l >/dev/null && chmod 600 m{round} \
             && echo more >> keep && rm -f m{round}"
        );
        let io = daemon.cli(&["exec", &sandbox, "--", "sh", "-c", &script]);
        assert!(
            io.status.success(),
            "{}",
            String::from_utf8_lossy(&io.stderr)
        );
        let node = daemon.cli(&["checkpoint", &sandbox, "--json"]);
        assert!(
            node.status.success(),
            "{}",
            String::from_utf8_lossy(&node.stderr)
        );
        let node = json_id(&node.stdout);
        // Every other rollback warms up, for the copy-on-write panels.
        let warm = if round % 2 == 1 {
            "--warm-up"
        } else {
            "--no-warm-up"
        };
        let rolled = daemon.cli(&["rollback", &sandbox, &node, warm]);
        assert!(
            rolled.status.success(),
            "{}",
            String::from_utf8_lossy(&rolled.stderr)
        );
        // Pages dirtied after the rollback, seen by the next scrapes.
        let dirtied = daemon.cli(&[
            "exec",
            &sandbox,
            "--",
            "dd",
            "if=/dev/zero",
            "of=/workspace/d",
            "bs=4096",
            "count=4",
            "status=none",
        ]);
        assert!(dirtied.status.success());
        if round == 1 {
            assert!(daemon.cli(&["branch", &node]).status.success());
        }
        // An error answer (unknown sandbox) for the errors-by-code panel.
        assert!(!daemon.cli(&["status", "0000nope"]).status.success());
        round += 1;
        thread::sleep(Duration::from_millis(500));
    }

    // The pool evicted (a pool of one) and forked templates at the rollbacks.
    assert!(daemon.metric("deltabox_template_pool_evictions_total") > 0.0);
    assert!(daemon.metric("deltabox_template_pool_hits_total") > 0.0);
    assert!(daemon.metric("deltabox_warm_up_seconds_count") > 0.0);
    let up = prometheus.query("up{job=\"deltaboxd\"}");
    assert_eq!(up[0]["value"][1], "1", "deltaboxd not scraped: {up}");
    let mut empty = Vec::new();
    for (title, expr) in panel_queries() {
        if prometheus
            .query(&expr)
            .as_array()
            .is_none_or(|r| r.is_empty())
        {
            empty.push(format!("{title}: {expr}"));
        }
    }
    assert!(
        empty.is_empty(),
        "panels with no data:\n{}",
        empty.join("\n")
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The `id` field of a `--json` answer.
fn json_id(stdout: &[u8]) -> String {
    let value: serde_json::Value = serde_json::from_slice(stdout).expect("JSON");
    value["id"].as_str().expect("an id").to_owned()
}
