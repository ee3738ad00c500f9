//! How the daemon's operations update [`Metrics`]: one method per kind of event.

use prometheus::{Encoder as _, Registry, TextEncoder};

use super::latency::{LatencyRecorder, Operation};
use super::state::StateFigures;
use super::{
    COPY_UP_METHODS, CgroupFigures, Metrics, MetricsError, TRACKER_OPS, gauge_value, sync_counter,
};
use crate::api::ErrorKind;
use crate::api::sandbox_types::{CheckpointTimings, GcResult, RollbackMode, RollbackResult};
use crate::bpf::GlobalCounters;

impl Metrics {
    /// Counts one answered API request.
    pub fn observe_request(&self, route: &str, status: u16, seconds: f64) {
        self.api_requests_total
            .with_label_values(&[route, &status.to_string()])
            .inc();
        self.api_request_duration_seconds
            .with_label_values(&[route])
            .observe(seconds);
    }

    /// Counts one failed tracker operation (one of [`TRACKER_OPS`]).
    pub fn tracker_error(&self, op: &str) {
        debug_assert!(
            TRACKER_OPS.contains(&op),
            "tracker op {op:?} missing from TRACKER_OPS"
        );
        self.tracker_errors_total.with_label_values(&[op]).inc();
    }

    /// Creates the labelled series whose label values are known in advance, at zero,
    /// so that dashboards and alerts see them before the first event.
    pub(super) fn init_series(&self) {
        for op in TRACKER_OPS {
            self.tracker_errors_total.with_label_values(&[op]);
        }
        for code in ErrorKind::all_names() {
            self.api_errors_total.with_label_values(&[code]);
        }
        for warm_up in ["true", "false"] {
            self.cow_faults_total.with_label_values(&[warm_up]);
        }
        for state in ["live", "dumped", "gone"] {
            self.templates.with_label_values(&[state]);
        }
        for op in deltafs::OpKind::ALL {
            self.deltafs_ops_total.with_label_values(&[op.as_str()]);
        }
        for method in COPY_UP_METHODS {
            self.deltafs_copy_ups_total.with_label_values(&[method]);
        }
    }

    /// Counts one error answer of the API, by its code (the JSON error's `kind`).
    pub fn api_error(&self, code: &str) {
        self.api_errors_total.with_label_values(&[code]).inc();
    }

    /// Sets the gauges of what the sandboxes and trees cost.
    pub fn set_state(&self, s: &StateFigures) {
        self.sandboxes.set(gauge_value(s.sandboxes));
        self.trees.set(gauge_value(s.trees));
        self.nodes.set(gauge_value(s.nodes));
        self.templates
            .with_label_values(&["live"])
            .set(gauge_value(s.templates_live));
        self.templates
            .with_label_values(&["dumped"])
            .set(gauge_value(s.templates_dumped));
        self.templates
            .with_label_values(&["gone"])
            .set(gauge_value(s.templates_gone));
        self.template_memory_bytes
            .set(gauge_value(s.template_memory_bytes));
        self.store_bytes.set(gauge_value(s.store_bytes));
    }

    /// Records one operation's latency for `GET /v1/stats` (checkpoint, rollback and
    /// branch are recorded by their `observe_*` methods).
    pub fn observe_operation(&self, op: Operation, ms: f64) {
        self.latency.observe(op, ms);
    }

    /// The latency observations behind `GET /v1/stats`.
    pub fn latency(&self) -> &LatencyRecorder {
        &self.latency
    }

    /// Records a checkpoint's phases.
    pub fn observe_checkpoint(&self, t: &CheckpointTimings) {
        self.latency.observe(Operation::Checkpoint, t.total_ms);
        for (phase, ms) in [
            ("total", t.total_ms),
            ("quiesce", t.quiesce_ms),
            ("files", t.files_ms),
            ("processes", t.processes_ms),
            ("record", t.record_ms),
        ] {
            self.checkpoint_seconds
                .with_label_values(&[phase])
                .observe(ms / 1e3);
        }
    }

    /// Records a rollback's phases (a phase a mode skips is not recorded; `fallback`
    /// only when a session was restored from its dump).
    pub fn observe_rollback(&self, r: &RollbackResult) {
        let mode = match r.mode {
            RollbackMode::All => "all",
            RollbackMode::FilesOnly => "files_only",
            RollbackMode::ProcessesOnly => "processes_only",
        };
        let t = &r.timings;
        self.latency.observe(Operation::Rollback, t.total_ms);
        let files = r.mode != RollbackMode::ProcessesOnly;
        let processes = r.mode != RollbackMode::FilesOnly;
        for (phase, ms, done) in [
            ("total", t.total_ms, true),
            ("kill", t.kill_ms, processes),
            ("files", t.files_ms, files),
            ("processes", t.processes_ms, processes),
            ("fork", t.fork_ms, processes),
            ("fixup", t.fixup_ms, processes),
            ("resume", t.resume_ms, processes),
            ("fallback", t.fallback_ms, processes && t.fallback_ms > 0.0),
        ] {
            if done {
                self.rollback_seconds
                    .with_label_values(&[mode, phase])
                    .observe(ms / 1e3);
            }
        }
    }

    /// Counts what a gc squashed.
    pub fn observe_gc(&self, gc: &GcResult) {
        self.deltafs_layers_squashed_total
            .inc_by(gc.layers_squashed as u64);
    }

    /// Records the time each sandbox of a branch call took.
    pub fn observe_branch(&self, branch_ms: &[f64]) {
        for ms in branch_ms {
            self.latency.observe(Operation::Branch, *ms);
            self.branch_seconds.observe(ms / 1e3);
        }
    }

    /// Brings the `deltabox_bpf_*_total` counters to the tracker's totals. The kernel's
    /// totals are the source of truth; a total below the exported value means the
    /// programs were reloaded, which Prometheus reads as a counter reset.
    pub fn set_bpf_counters(&self, counters: &GlobalCounters) {
        sync_counter(&self.bpf_write_syscalls_total, counters.write_syscalls);
        sync_counter(&self.bpf_dirtied_folios_total, counters.dirtied_folios);
        sync_counter(&self.bpf_stats_full_total, counters.stats_full);
        sync_counter(&self.bpf_fd_unresolved_total, counters.fd_unresolved);
    }

    /// Replaces the per-cgroup gauges (cgroups no longer watched disappear).
    pub fn set_cgroups(&self, cgroups: &[CgroupFigures]) {
        self.watched_cgroups.set(gauge_value(cgroups.len() as u64));
        let vecs = [
            &self.cgroup_epoch,
            &self.inode_bytes_written,
            &self.inode_writes,
            &self.inode_pages_dirtied,
            &self.inodes_written,
        ];
        for vec in vecs {
            vec.reset();
        }
        for c in cgroups {
            let label = [c.path.as_str()];
            self.cgroup_epoch
                .with_label_values(&label)
                .set(gauge_value(c.epoch));
            self.inode_bytes_written
                .with_label_values(&label)
                .set(gauge_value(c.bytes));
            self.inode_writes
                .with_label_values(&label)
                .set(gauge_value(c.writes));
            self.inode_pages_dirtied
                .with_label_values(&label)
                .set(gauge_value(c.pages_dirtied));
            self.inodes_written
                .with_label_values(&label)
                .set(gauge_value(c.inodes));
        }
    }

    /// The registry, for tests that inspect what is exported.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> Result<String, MetricsError> {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .map_err(MetricsError::Encode)?;
        // The text encoder writes only UTF-8 (names, labels and numbers).
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}
