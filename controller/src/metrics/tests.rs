//! Unit tests of [`Metrics`]: series created at start, gauges and counters taking the
//! figures they are given.

use super::state::StateFigures;
use super::*;
use crate::api::ErrorKind;
use crate::api::sandbox_types::CheckpointTimings;
use crate::bpf::GlobalCounters;

#[test]
fn tracker_error_series_exist_from_the_start() {
    let metrics = Metrics::new().unwrap();
    let text = metrics.encode().unwrap();
    for op in TRACKER_OPS {
        assert!(
            text.contains(&format!("deltabox_tracker_errors_total{{op=\"{op}\"}} 0")),
            "{op}: {text}"
        );
    }
}

#[test]
fn every_tracker_op_the_service_names_is_listed() {
    // The service names its operations as string literals in `bpf("…")` and
    // `bpf_error("…")`; each must have its series created at start.
    let source = include_str!("../api/service.rs");
    for call in ["self.bpf(\"", "self.bpf_error(\""] {
        for rest in source.split(call).skip(1) {
            let op = &rest[..rest.find('"').unwrap()];
            assert!(TRACKER_OPS.contains(&op), "{op:?} is not in TRACKER_OPS");
        }
    }
}

#[test]
fn every_error_code_has_a_series_from_the_start() {
    let m = Metrics::new().unwrap();
    let text = m.encode().unwrap();
    for code in ErrorKind::all_names() {
        assert!(
            text.contains(&format!("deltabox_api_errors_total{{code=\"{code}\"}} 0")),
            "{code}: {text}"
        );
    }
    m.api_error("unknown_sandbox");
    m.api_error("unknown_sandbox");
    let text = m.encode().unwrap();
    assert!(text.contains("deltabox_api_errors_total{code=\"unknown_sandbox\"} 2"));
}

#[test]
fn state_gauges_take_the_figures() {
    let m = Metrics::new().unwrap();
    m.set_state(&StateFigures {
        sandboxes: 2,
        trees: 1,
        nodes: 5,
        templates_live: 3,
        templates_dumped: 2,
        templates_gone: 1,
        template_memory_bytes: 4096,
        store_bytes: u64::MAX,
    });
    let text = m.encode().unwrap();
    for line in [
        "deltabox_sandboxes 2",
        "deltabox_trees 1",
        "deltabox_nodes 5",
        "deltabox_templates{state=\"live\"} 3",
        "deltabox_templates{state=\"dumped\"} 2",
        "deltabox_templates{state=\"gone\"} 1",
        "deltabox_template_memory_bytes 4096",
    ] {
        assert!(text.lines().any(|l| l == line), "{line}: {text}");
    }
    // Saturated, not wrapped negative.
    assert_eq!(m.store_bytes.get(), i64::MAX);
}

#[test]
fn checkpoints_rollbacks_and_branches_reach_the_stats() {
    let m = Metrics::new().unwrap();
    m.observe_checkpoint(&CheckpointTimings {
        total_ms: 4.0,
        ..CheckpointTimings::default()
    });
    m.observe_branch(&[1.0, 2.0]);
    let stats = m.latency().summary();
    assert_eq!(stats[0].count, 1);
    assert_eq!(stats[0].max_ms, Some(4.0));
    assert_eq!(stats[2].count, 2);
    assert_eq!(
        m.checkpoint_seconds
            .with_label_values(&["total"])
            .get_sample_count(),
        1
    );
}

#[test]
fn counters_follow_kernel_totals_and_resets() {
    let m = Metrics::new().unwrap();
    let mut c = GlobalCounters {
        write_syscalls: 10,
        dirtied_folios: 3,
        stats_full: 0,
        fd_unresolved: 1,
    };
    m.set_bpf_counters(&c);
    assert_eq!(m.bpf_write_syscalls_total.get(), 10);
    c.write_syscalls = 15;
    m.set_bpf_counters(&c);
    assert_eq!(m.bpf_write_syscalls_total.get(), 15);
    // Programs reloaded: the kernel's totals restart.
    c.write_syscalls = 2;
    m.set_bpf_counters(&c);
    assert_eq!(m.bpf_write_syscalls_total.get(), 2);
    assert_eq!(m.bpf_fd_unresolved_total.get(), 1);
}

#[test]
fn unwatched_cgroups_disappear() {
    let m = Metrics::new().unwrap();
    let a = CgroupFigures {
        path: "/a".into(),
        bytes: 5,
        ..Default::default()
    };
    m.set_cgroups(&[
        a.clone(),
        CgroupFigures {
            path: "/b".into(),
            ..a
        },
    ]);
    assert_eq!(m.watched_cgroups.get(), 2);
    m.set_cgroups(&[]);
    assert_eq!(m.watched_cgroups.get(), 0);
    assert!(!m.encode().unwrap().contains("cgroup=\"/a\""));
}

#[test]
fn deltafs_counters_follow_the_store_and_every_kind_has_a_series() {
    let m = Metrics::new().unwrap();
    let text = m.encode().unwrap();
    for op in deltafs::OpKind::ALL {
        let series = format!("deltabox_deltafs_ops_total{{op=\"{}\"}} 0", op.as_str());
        assert!(text.contains(&series), "{series}: {text}");
    }
    let mut s = deltafs::StatsSnapshot {
        ops: deltafs::OpKind::ALL
            .iter()
            .map(|&kind| deltafs::OpStats {
                kind,
                count: 5,
                timed: 5,
                sum_ns: 5_000,
                buckets: vec![5; 1]
                    .into_iter()
                    .chain(std::iter::repeat_n(
                        0,
                        deltafs::stats::LATENCY_BOUNDS_NS.len(),
                    ))
                    .collect(),
            })
            .collect(),
        copy_ups_reflink: 2,
        copy_ups_copy: 3,
        copy_ups_chunked: 2,
        copy_up_bytes: 4096,
        chunk_copy_bytes: 1024,
        partial_completions: 1,
        freezes: 3,
        view_layers: vec![2, 4],
        ..Default::default()
    };
    m.set_deltafs(&s);
    s.freezes = 7;
    m.set_deltafs(&s);
    let text = m.encode().unwrap();
    for line in [
        "deltabox_deltafs_ops_total{op=\"write\"} 5",
        "deltabox_deltafs_copy_ups_total{method=\"reflink\"} 2",
        "deltabox_deltafs_copy_ups_total{method=\"copy\"} 3",
        "deltabox_deltafs_copy_up_bytes_total 4096",
        "deltabox_deltafs_copy_ups_chunked_total 2",
        "deltabox_deltafs_chunk_copy_bytes_total 1024",
        "deltabox_deltafs_partial_completions_total 1",
        "deltabox_deltafs_freezes_total 7",
        "deltabox_deltafs_layers 4",
        "deltabox_deltafs_op_seconds_bucket{op=\"lookup\",le=\"0.0000025\"} 5",
        "deltabox_deltafs_op_seconds_count{op=\"lookup\"} 5",
    ] {
        assert!(text.lines().any(|l| l == line), "{line}: {text}");
    }
    m.set_sandbox_dirty(&[
        dirty::SandboxDirty {
            pages_dirtied: 3,
            ..Default::default()
        },
        dirty::SandboxDirty {
            pages_dirtied: 4,
            ..Default::default()
        },
    ]);
    assert_eq!(m.sandbox_dirtied_pages.get(), 7);
    assert_eq!(m.sandbox_dirtied_bytes.get(), 7 * 4096);
}
