//! `GET /v1/stats`, the error counter by code and the state gauges, over the fake
//! sandbox operations (the real manager's figures are tested in `tests/tests/stats.rs`).

use std::collections::BTreeSet;

use axum::http::{Method, StatusCode};
use serde_json::Value;

use super::Harness;
use super::fake_sandboxes::FakeSandboxes;
use crate::api::routes;
use crate::metrics::state::{StateFigures, StateSource};
use crate::sandbox::{SandboxError, SandboxOps};

/// The fake's figures, from what its operations show: trees of its sandboxes, their
/// nodes, node sessions with a live template. It has no processes and no store: by its
/// own convention a live template owns 1 MiB and a node 4 KiB of disk.
impl StateSource for FakeSandboxes {
    fn state_figures(&self) -> Result<StateFigures, SandboxError> {
        let sandboxes = self.list()?;
        let mut trees = BTreeSet::new();
        let mut figures = StateFigures {
            sandboxes: sandboxes.len() as u64,
            ..StateFigures::default()
        };
        for sandbox in &sandboxes {
            if !trees.insert(sandbox.tree.clone()) {
                continue;
            }
            for node in self.tree(&sandbox.id)?.nodes {
                figures.nodes += 1;
                for session in &node.sessions {
                    if session.template == "live" {
                        figures.templates_live += 1;
                    } else {
                        figures.templates_gone += 1;
                    }
                }
            }
        }
        figures.trees = trees.len() as u64;
        figures.template_memory_bytes = figures.templates_live << 20;
        figures.store_bytes = figures.nodes * 4096;
        Ok(figures)
    }

    /// Every fake sandbox runs in the harness's `deltabox/other` cgroup.
    fn work_cgroup(&self, _sandbox: &str) -> Option<std::path::PathBuf> {
        Some("deltabox/other".into())
    }

    /// By the fake's convention, each node was one freeze, one switch, one `O_TRUNC`
    /// copy-up and one timed 3 µs lookup, over a view 1 + nodes layers deep.
    fn deltafs_stats(&self) -> Option<deltafs::StatsSnapshot> {
        let nodes = self.state_figures().ok()?.nodes;
        let ops = deltafs::OpKind::ALL
            .iter()
            .map(|&kind| {
                let n = if kind == deltafs::OpKind::Lookup {
                    nodes
                } else {
                    0
                };
                let mut buckets = vec![0; deltafs::stats::LATENCY_BOUNDS_NS.len() + 1];
                buckets[1] = n;
                deltafs::OpStats {
                    kind,
                    count: n,
                    timed: n,
                    sum_ns: n * 3_000,
                    buckets,
                }
            })
            .collect();
        Some(deltafs::StatsSnapshot {
            ops,
            copy_ups_empty: nodes,
            copy_ups_copy: nodes,
            copy_ups_chunked: nodes,
            copy_up_bytes: nodes * 4096,
            chunk_copy_bytes: nodes * 4096,
            partial_completions: nodes,
            freezes: nodes,
            switches: nodes,
            view_layers: vec![1 + nodes],
            ..Default::default()
        })
    }

    /// By the fake's convention its pool holds the live templates (1 MiB each) under
    /// bounds of 64 templates and 1 GiB; each node was one hit, and once there is a node
    /// there was one miss, one eviction, and one dump is queued.
    fn pool_figures(&self) -> Option<crate::metrics::pool::PoolFigures> {
        let s = self.state_figures().ok()?;
        let any = u64::from(s.nodes > 0);
        Some(crate::metrics::pool::PoolFigures {
            templates_live: s.templates_live,
            templates_dumped: s.templates_dumped,
            bytes_owned: s.template_memory_bytes,
            max_templates: 64,
            max_bytes: 1 << 30,
            hits: s.nodes,
            misses: any,
            evictions: any,
            dump_backlog: any,
            dump_policy: "eager".to_owned(),
            standbys_ready: any,
            standbys_pending: any,
        })
    }

    /// Each checkpoint wrote 300 bytes of metadata.
    fn checkpoint_writes(&self, _node: &str) -> Option<deltafs::SnapshotWrites> {
        Some(deltafs::SnapshotWrites {
            metadata_bytes: 300,
            ..Default::default()
        })
    }
}

fn metric(h: &Harness, series: &str) -> f64 {
    h.service.refresh_metrics();
    let text = h.service.metrics().encode().unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in {text}"))
}

#[tokio::test]
async fn stats_count_each_operation_with_ordered_percentiles() {
    let h = Harness::new();
    let (_, sb) = h.request(Method::POST, routes::SANDBOXES, Some("{}")).await;
    let id = sb["id"].as_str().unwrap().to_owned();
    let (_, session) = h
        .request(
            Method::POST,
            &routes::fill(routes::SANDBOX_SESSIONS, &[&id]),
            Some(r#"{"kind": "bash"}"#),
        )
        .await;
    let sid = session["id"].as_str().unwrap().to_owned();
    let checkpoint = routes::fill(routes::SANDBOX_CHECKPOINT, &[&id]);
    for _ in 0..3 {
        let (status, _) = h.request(Method::POST, &checkpoint, None).await;
        assert_eq!(status, StatusCode::CREATED);
    }
    let exec = routes::fill(routes::SANDBOX_EXEC, &[&id]);
    let (status, _) = h
        .request(Method::POST, &exec, Some(r#"{"argv": ["echo", "hi"]}"#))
        .await;
    assert_eq!(status, StatusCode::OK);
    let run = routes::fill(routes::SANDBOX_SESSION_RUN, &[&id, &sid]);
    for _ in 0..2 {
        let (status, _) = h
            .request(Method::POST, &run, Some(r#"{"code": "true"}"#))
            .await;
        assert_eq!(status, StatusCode::OK);
    }
    // A failed exec is an error answer, not an exec.
    let (status, _) = h
        .request(Method::POST, &exec, Some(r#"{"argv": []}"#))
        .await;
    assert!(status.is_client_error());

    let (status, stats) = h.request(Method::GET, routes::STATS, None).await;
    assert_eq!(status, StatusCode::OK, "{stats}");
    let op = |name: &str| -> Value {
        stats["operations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["operation"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no {name} in {stats}"))
    };
    let cp = op("checkpoint");
    assert_eq!(cp["count"], 3, "{stats}");
    // The fake's checkpoints all take 1.5 ms.
    for p in ["p50_ms", "p90_ms", "p99_ms", "max_ms"] {
        assert_eq!(cp[p], 1.5, "{p}: {stats}");
    }
    assert_eq!(op("exec")["count"], 1, "{stats}");
    let run = op("session_run");
    assert_eq!(run["count"], 2, "{stats}");
    let ms: Vec<f64> = ["p50_ms", "p90_ms", "p99_ms", "max_ms"]
        .iter()
        .map(|p| run[p].as_f64().unwrap())
        .collect();
    assert!(ms.windows(2).all(|w| w[0] <= w[1]), "{ms:?}");
    assert_eq!(op("rollback")["count"], 0);
    assert!(op("rollback").get("p50_ms").is_none());
    assert_eq!(stats["window"], 4096);
    let state = &stats["state"];
    assert_eq!(state["sandboxes"], 1, "{stats}");
    assert_eq!(state["nodes"], 3, "{stats}");
    assert_eq!(state["templates_live"], 3, "{stats}");
    assert_eq!(state["template_memory_bytes"], 3 << 20, "{stats}");
}

#[tokio::test]
async fn state_gauges_follow_the_sandboxes() {
    let h = Harness::new();
    assert_eq!(metric(&h, "deltabox_sandboxes"), 0.0);
    let (_, sb) = h.request(Method::POST, routes::SANDBOXES, Some("{}")).await;
    let id = sb["id"].as_str().unwrap().to_owned();
    assert_eq!(metric(&h, "deltabox_sandboxes"), 1.0);
    assert_eq!(metric(&h, "deltabox_trees"), 1.0);
    h.request(
        Method::POST,
        &routes::fill(routes::SANDBOX_SESSIONS, &[&id]),
        Some(r#"{"kind": "bash"}"#),
    )
    .await;
    let checkpoint = routes::fill(routes::SANDBOX_CHECKPOINT, &[&id]);
    h.request(Method::POST, &checkpoint, None).await;
    assert_eq!(metric(&h, "deltabox_nodes"), 1.0);
    assert_eq!(metric(&h, "deltabox_templates{state=\"live\"}"), 1.0);
    assert_eq!(metric(&h, "deltabox_templates{state=\"gone\"}"), 0.0);
    assert_eq!(metric(&h, "deltabox_template_memory_bytes"), 1048576.0);
    assert_eq!(metric(&h, "deltabox_store_bytes"), 4096.0);
    h.request(Method::DELETE, &routes::fill(routes::SANDBOX, &[&id]), None)
        .await;
    assert_eq!(metric(&h, "deltabox_sandboxes"), 0.0);
}

#[tokio::test]
async fn errors_are_counted_by_code() {
    let h = Harness::new();
    let unknown = "deltabox_api_errors_total{code=\"unknown_sandbox\"}";
    let no_route = "deltabox_api_errors_total{code=\"route_not_found\"}";
    // Every code has a series from the start.
    assert_eq!(metric(&h, unknown), 0.0);
    assert_eq!(
        metric(&h, "deltabox_api_errors_total{code=\"disk_full\"}"),
        0.0
    );
    for _ in 0..2 {
        let (status, body) = h
            .request(Method::GET, &routes::fill(routes::SANDBOX, &["nope"]), None)
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body["kind"], "unknown_sandbox");
    }
    h.request(Method::GET, "/v1/nowhere", None).await;
    // A body rejected before the handler: counted by its code too.
    h.request(Method::POST, routes::SANDBOXES, Some("{")).await;
    assert_eq!(metric(&h, unknown), 2.0);
    assert_eq!(metric(&h, no_route), 1.0);
    assert_eq!(
        metric(&h, "deltabox_api_errors_total{code=\"invalid_body\"}"),
        1.0
    );
    // Successes are not errors.
    h.request(Method::GET, routes::SANDBOXES, None).await;
    assert_eq!(metric(&h, unknown), 2.0);
}

#[tokio::test]
async fn stats_without_sandboxes_have_no_state() {
    let h = Harness::without_sandboxes();
    let (status, stats) = h.request(Method::GET, routes::STATS, None).await;
    assert_eq!(status, StatusCode::OK, "{stats}");
    assert!(stats.get("state").is_none(), "{stats}");
    assert_eq!(stats["operations"].as_array().unwrap().len(), 5);
}
