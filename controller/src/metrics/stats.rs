//! `GET /v1/stats`: the figures of `/metrics` a user wants without Prometheus —
//! latency percentiles since the daemon started and what the tree costs — and their
//! text for `deltabox stats`.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::dirty::SandboxDirty;
use super::fs_stats::DeltaFsFigures;
use super::latency::OperationLatency;
use super::pool::{PoolFigures, pool_text};
use super::state::StateFigures;
use crate::api::render::{Align, Table};
use crate::api::sandbox_render::size;

/// The answer of `GET /v1/stats`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatsResponse {
    /// Seconds since the daemon started (the period the counts cover).
    pub uptime_secs: u64,
    /// Most recent observations per operation the percentiles are computed over.
    pub window: usize,
    /// Each operation's latency, in a fixed order: checkpoint, rollback, branch, exec,
    /// session_run.
    pub operations: Vec<OperationLatency>,
    /// What the sandboxes and their trees cost now; absent when the daemon runs
    /// without sandboxes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<StateFigures>,
    /// The template pool; absent without sandboxes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<PoolFigures>,
    /// DeltaFS's counters since the daemon opened its store; absent without sandboxes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deltafs: Option<DeltaFsFigures>,
    /// Per live sandbox, what it dirtied since its last checkpoint (from the eBPF write
    /// tracker), sorted by sandbox id.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dirty: Vec<SandboxDirty>,
}

/// The stats as text: a latency table, then the state figures.
pub fn stats_text(stats: &StatsResponse) -> String {
    let ms = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"));
    let mut table = Table::new(&[
        ("OPERATION", Align::Left),
        ("COUNT", Align::Right),
        ("P50 MS", Align::Right),
        ("P90 MS", Align::Right),
        ("P99 MS", Align::Right),
        ("MAX MS", Align::Right),
    ]);
    for op in &stats.operations {
        table.row(vec![
            op.operation.as_str().to_owned(),
            op.count.to_string(),
            ms(op.p50_ms),
            ms(op.p90_ms),
            ms(op.p99_ms),
            ms(op.max_ms),
        ]);
    }
    let mut out = table.render();
    let _ = writeln!(
        out,
        "\nsince the daemon started {} s ago; percentiles over the last {} of each",
        stats.uptime_secs, stats.window
    );
    match &stats.state {
        Some(s) => {
            let _ = writeln!(
                out,
                "sandboxes {}  trees {}  nodes {}  templates {} live, {} dumped, {} gone",
                s.sandboxes,
                s.trees,
                s.nodes,
                s.templates_live,
                s.templates_dumped,
                s.templates_gone
            );
            let _ = writeln!(
                out,
                "template memory {}  store {}",
                size(s.template_memory_bytes),
                size(s.store_bytes)
            );
        }
        None => out.push_str("sandboxes are disabled in this daemon\n"),
    }
    if let Some(pool) = &stats.pool {
        out.push_str(&pool_text(pool));
    }
    if let Some(fs) = &stats.deltafs {
        let ops: Vec<String> = fs
            .ops
            .iter()
            .filter(|o| o.count > 0)
            .map(|o| format!("{} {}", o.op, o.count))
            .collect();
        let _ = writeln!(
            out,
            "deltafs requests: {}",
            if ops.is_empty() {
                "none".to_owned()
            } else {
                ops.join(", ")
            }
        );
        let _ = writeln!(
            out,
            "deltafs copy-ups {} reflink, {} copied ({}; {} by chunks, {} of chunks, {} \
             completed), {} empty  freezes {}  switches {}  longest chain {} layers",
            fs.copy_ups_reflink,
            fs.copy_ups_copy,
            size(fs.copy_up_bytes),
            fs.copy_ups_chunked,
            size(fs.chunk_copy_bytes),
            fs.partial_completions,
            fs.copy_ups_empty,
            fs.freezes,
            fs.switches,
            fs.max_layers
        );
    }
    if !stats.dirty.is_empty() {
        let mut table = Table::new(&[
            ("SANDBOX", Align::Left),
            ("DIRTIED PAGES", Align::Right),
            ("DIRTIED", Align::Right),
            ("WRITES", Align::Right),
            ("WRITTEN", Align::Right),
            ("FILES", Align::Right),
            ("COW FAULTS", Align::Right),
            ("WARMED UP", Align::Right),
        ]);
        for d in &stats.dirty {
            table.row(vec![
                d.sandbox.clone(),
                d.pages_dirtied.to_string(),
                size(d.bytes_dirtied),
                d.writes.to_string(),
                size(d.bytes_written),
                d.inodes.to_string(),
                d.cow_faults.to_string(),
                size(d.warmed_up_pages * 4096),
            ]);
        }
        out.push_str("\nsince each sandbox's last checkpoint or rollback:\n");
        out.push_str(&table.render());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::latency::{LatencyRecorder, Operation, WINDOW};

    #[test]
    fn text_has_a_row_per_operation_and_the_state() {
        let rec = LatencyRecorder::default();
        rec.observe(Operation::Checkpoint, 1.5);
        rec.observe(Operation::Checkpoint, 3.0);
        let stats = StatsResponse {
            uptime_secs: 7,
            window: WINDOW,
            operations: rec.summary(),
            state: Some(StateFigures {
                sandboxes: 2,
                trees: 1,
                nodes: 3,
                templates_live: 2,
                templates_dumped: 4,
                templates_gone: 1,
                template_memory_bytes: 3 << 20,
                store_bytes: 1536,
            }),
            pool: Some(PoolFigures {
                templates_live: 2,
                max_templates: 8,
                evictions: 3,
                dump_policy: "eager".into(),
                ..PoolFigures::default()
            }),
            deltafs: Some(DeltaFsFigures {
                copy_ups_reflink: 2,
                copy_up_bytes: 0,
                freezes: 3,
                max_layers: 4,
                ops: vec![crate::metrics::fs_stats::OpCount {
                    op: "lookup".into(),
                    count: 9,
                    mean_us: Some(3.0),
                }],
                ..DeltaFsFigures::default()
            }),
            dirty: vec![SandboxDirty {
                sandbox: "0193-sb".into(),
                pages_dirtied: 3,
                bytes_dirtied: 3 * 4096,
                writes: 3,
                bytes_written: 3 * 4096,
                inodes: 1,
                cow_faults: 7,
                warmed_up_pages: 2,
                ..SandboxDirty::default()
            }],
        };
        let text = stats_text(&stats);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("OPERATION"), "{text}");
        assert_eq!(
            lines[1].split_whitespace().collect::<Vec<_>>(),
            ["checkpoint", "2", "1.5", "3.0", "3.0", "3.0"],
            "{text}"
        );
        assert_eq!(
            lines[2].split_whitespace().collect::<Vec<_>>(),
            ["rollback", "0", "-", "-", "-", "-"]
        );
        assert!(
            text.contains("nodes 3  templates 2 live, 4 dumped, 1 gone"),
            "{text}"
        );
        assert!(text.contains("template pool: 2 live of 8 max"), "{text}");
        assert!(text.contains("evictions 3"), "{text}");
        assert!(
            text.contains("template memory 3MiB  store 1.5KiB"),
            "{text}"
        );
        assert!(text.contains("deltafs requests: lookup 9"), "{text}");
        assert!(text.contains("freezes 3"), "{text}");
        assert!(text.contains("longest chain 4 layers"), "{text}");
        let row = text.lines().find(|l| l.starts_with("0193-sb")).unwrap();
        assert_eq!(
            row.split_whitespace().collect::<Vec<_>>(),
            ["0193-sb", "3", "12KiB", "3", "12KiB", "1", "7", "8KiB"],
            "{text}"
        );
        let without = StatsResponse {
            state: None,
            pool: None,
            deltafs: None,
            dirty: Vec::new(),
            ..stats
        };
        assert!(!stats_text(&without).contains("deltafs"));
        assert!(stats_text(&without).contains("disabled"));
    }
}
