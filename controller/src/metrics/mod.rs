//! The daemon's Prometheus metrics, in one typed struct on its own [`Registry`].
//!
//! Every metric is a field of [`Metrics`], documented where it is defined; the
//! `metrics!` macro registers each field, so a metric cannot be defined without being
//! exported. A test (`api::tests::every_metric_is_updated`) drives the daemon's code
//! paths and fails when a defined metric is never updated, so dashboards cannot drift
//! from the code (Firecracker's rule).
//!
//! - [`fs_stats`]: DeltaFS's own counters, read at scrape time;
//! - [`cow`]: copy-on-write faults after checkpoints and rollbacks, and the warm-up;
//! - [`dirty`]: what each sandbox dirtied since its last checkpoint (eBPF), and what
//!   each checkpoint made the store write;
//! - [`latency`]: per-operation latency percentiles since start (`GET /v1/stats`);
//! - [`state`]: what the sandboxes and trees cost, measured at scrape time;
//! - [`pool`]: the template pool's figures;
//! - [`stats`]: the `GET /v1/stats` answer and its text;
//! - `observe`: how the daemon's operations update [`Metrics`].

pub mod cow;
pub mod dirty;
pub mod fs_stats;
pub mod latency;
mod observe;
pub mod pool;
pub mod state;
pub mod stats;

use std::sync::Arc;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

use self::latency::LatencyRecorder;

/// Errors of the metrics module.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// Two metrics have the same name (a programming error caught by tests).
    #[error("cannot register metric {name}")]
    Register {
        /// The metric's name.
        name: &'static str,
        /// Why.
        #[source]
        source: prometheus::Error,
    },
    /// The text exposition could not be encoded.
    #[error("cannot encode metrics")]
    Encode(#[source] prometheus::Error),
}

/// Defines [`Metrics`]: each field with its doc, type and constructor, all registered.
macro_rules! metrics {
    ($( $(#[doc = $doc:literal])+ $field:ident: $ty:ty = $make:expr; )+) => {
        /// The daemon's metrics. Cheap to clone (every metric is a shared handle).
        #[derive(Clone)]
        pub struct Metrics {
            registry: Registry,
            /// The observations behind `GET /v1/stats` (not exported to Prometheus,
            /// whose histograms cover the same operations).
            latency: Arc<LatencyRecorder>,
            $( $(#[doc = $doc])+ pub $field: $ty, )+
        }

        impl Metrics {
            /// Creates every metric and registers it on a new registry.
            pub fn new() -> Result<Self, MetricsError> {
                let registry = Registry::new();
                $(
                    let $field: $ty = $make.map_err(|source| MetricsError::Register {
                        name: stringify!($field),
                        source,
                    })?;
                    registry
                        .register(Box::new($field.clone()))
                        .map_err(|source| MetricsError::Register {
                            name: stringify!($field),
                            source,
                        })?;
                )+
                let latency = Arc::new(LatencyRecorder::default());
                let metrics = Self { registry, latency, $($field),+ };
                metrics.init_series();
                Ok(metrics)
            }

            /// The name of every defined metric, including labelled ones that have no
            /// series yet (which `Registry::gather` leaves out).
            pub fn names(&self) -> Vec<String> {
                let mut names = Vec::new();
                $(
                    for desc in prometheus::core::Collector::desc(&self.$field) {
                        names.push(desc.fq_name.clone());
                    }
                )+
                names
            }
        }
    };
}

metrics! {
    /// `deltabox_api_requests_total{route,status}`: API requests answered, by route
    /// template (`/v1/cgroups/watch`, or `unmatched`) and HTTP status code.
    api_requests_total: IntCounterVec = IntCounterVec::new(
        Opts::new("deltabox_api_requests_total", "API requests answered, by route and HTTP status"),
        &["route", "status"],
    );
    /// `deltabox_api_request_duration_seconds{route}`: time to answer an API request.
    api_request_duration_seconds: HistogramVec = HistogramVec::new(
        HistogramOpts::new("deltabox_api_request_duration_seconds", "Time to answer an API request, by route")
            .buckets(vec![0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5]),
        &["route"],
    );
    /// `deltabox_watched_cgroups`: cgroups the eBPF programs count writes for.
    watched_cgroups: IntGauge = IntGauge::new(
        "deltabox_watched_cgroups", "cgroups the eBPF programs count writes for",
    );
    /// `deltabox_bpf_programs_attached`: eBPF programs attached to their tracepoints.
    bpf_programs_attached: IntGauge = IntGauge::new(
        "deltabox_bpf_programs_attached", "eBPF programs attached to their tracepoints",
    );
    /// `deltabox_bpf_write_syscalls_total`: write syscalls counted in watched cgroups
    /// since the programs were loaded.
    bpf_write_syscalls_total: IntCounter = IntCounter::new(
        "deltabox_bpf_write_syscalls_total", "Write syscalls counted in watched cgroups since load",
    );
    /// `deltabox_bpf_dirtied_folios_total`: page-cache folios dirtied in watched cgroups
    /// since load.
    bpf_dirtied_folios_total: IntCounter = IntCounter::new(
        "deltabox_bpf_dirtied_folios_total", "Page-cache folios dirtied in watched cgroups since load",
    );
    /// `deltabox_bpf_stats_full_total`: new inodes left uncounted because the stats map
    /// was full (non-zero means the per-inode figures are incomplete).
    bpf_stats_full_total: IntCounter = IntCounter::new(
        "deltabox_bpf_stats_full_total", "New inodes not counted because the stats map was full",
    );
    /// `deltabox_bpf_fd_unresolved_total`: write syscalls whose fd could not be followed
    /// to an inode.
    bpf_fd_unresolved_total: IntCounter = IntCounter::new(
        "deltabox_bpf_fd_unresolved_total", "Write syscalls whose fd could not be followed to an inode",
    );
    /// `deltabox_tracker_errors_total{op}`: failed reads or updates of the eBPF maps,
    /// by operation (`watch a cgroup`, `read counters`, ...).
    tracker_errors_total: IntCounterVec = IntCounterVec::new(
        Opts::new("deltabox_tracker_errors_total", "Failed operations on the eBPF maps, by operation"),
        &["op"],
    );
    /// `deltabox_cgroup_epoch{cgroup}`: current epoch of each watched cgroup.
    cgroup_epoch: IntGaugeVec = IntGaugeVec::new(
        Opts::new("deltabox_cgroup_epoch", "Current epoch of a watched cgroup"),
        &["cgroup"],
    );
    /// `deltabox_inode_bytes_written{cgroup}`: bytes the cgroup's write syscalls wrote
    /// in its current epoch, summed over inodes (drops to zero when the epoch advances).
    inode_bytes_written: IntGaugeVec = IntGaugeVec::new(
        Opts::new("deltabox_inode_bytes_written", "Bytes written in the cgroup's current epoch"),
        &["cgroup"],
    );
    /// `deltabox_inode_writes{cgroup}`: write syscalls of the cgroup in its current epoch.
    inode_writes: IntGaugeVec = IntGaugeVec::new(
        Opts::new("deltabox_inode_writes", "Write syscalls in the cgroup's current epoch"),
        &["cgroup"],
    );
    /// `deltabox_inode_pages_dirtied{cgroup}`: page-cache folios the cgroup dirtied in its
    /// current epoch.
    inode_pages_dirtied: IntGaugeVec = IntGaugeVec::new(
        Opts::new("deltabox_inode_pages_dirtied", "Folios dirtied in the cgroup's current epoch"),
        &["cgroup"],
    );
    /// `deltabox_inodes_written{cgroup}`: distinct inodes the cgroup wrote or dirtied in
    /// its current epoch (what a checkpoint has to consider).
    inodes_written: IntGaugeVec = IntGaugeVec::new(
        Opts::new("deltabox_inodes_written", "Distinct inodes written in the cgroup's current epoch"),
        &["cgroup"],
    );
    /// `deltabox_checkpoint_seconds{phase}`: sandbox checkpoints as the daemon timed
    /// them, by phase: `total`, `quiesce` (cgroup freeze and thaw), `files` (DeltaFS
    /// freeze), `processes` (DeltaCR templates), `record` (metadata flush and database).
    checkpoint_seconds: HistogramVec = HistogramVec::new(
        HistogramOpts::new("deltabox_checkpoint_seconds", "Sandbox checkpoint latency, by phase")
            .buckets(STATE_BUCKETS.to_vec()),
        &["phase"],
    );
    /// `deltabox_rollback_seconds{mode,phase}`: sandbox rollbacks as the daemon timed
    /// them, by mode (`all`, `files_only`, `processes_only`) and phase: `total`, `kill`,
    /// `files` (DeltaFS switch), `processes` (restores from templates, wall time); and,
    /// summed over the restored sessions, `fork` (the injected fork of each template),
    /// `fixup` (fd table, stdio, threads, registers), `resume` (signals, detach) and
    /// `fallback` (memory made a dump's, only for a restore from a dump).
    rollback_seconds: HistogramVec = HistogramVec::new(
        HistogramOpts::new("deltabox_rollback_seconds", "Sandbox rollback latency, by mode and phase")
            .buckets(STATE_BUCKETS.to_vec()),
        &["mode", "phase"],
    );
    /// `deltabox_branch_seconds`: time to make one sandbox of a branch call.
    branch_seconds: Histogram = Histogram::with_opts(
        HistogramOpts::new("deltabox_branch_seconds", "Time to make one branched sandbox")
            .buckets(STATE_BUCKETS.to_vec()),
    );
    /// `deltabox_api_errors_total{code}`: error answers of the API, by their stable
    /// code (the `kind` field of the JSON error; every code has a series from the start).
    api_errors_total: IntCounterVec = IntCounterVec::new(
        Opts::new("deltabox_api_errors_total", "API error answers, by error code"),
        &["code"],
    );
    /// `deltabox_sandboxes`: sandboxes alive (scrape time).
    sandboxes: IntGauge = IntGauge::new("deltabox_sandboxes", "Sandboxes alive");
    /// `deltabox_trees`: checkpoint trees alive, each with its namespaces and init
    /// process (scrape time).
    trees: IntGauge = IntGauge::new("deltabox_trees", "Checkpoint trees alive");
    /// `deltabox_nodes`: checkpoint nodes in the tree database, of every tree (scrape
    /// time).
    nodes: IntGauge = IntGauge::new("deltabox_nodes", "Checkpoint nodes in the tree database");
    /// `deltabox_templates{state}`: node templates (sessions' and other processes'),
    /// `live` (a frozen process),
    /// `dumped` (not live, its dump on disk: restored through the fallback) or `gone`
    /// (neither) (scrape time).
    templates: IntGaugeVec = IntGaugeVec::new(
        Opts::new(
            "deltabox_templates",
            "Node templates (sessions and other processes), live, dumped or gone",
        ),
        &["state"],
    );
    /// `deltabox_template_pool_bytes`: bytes the pool's live templates own (anonymous
    /// pages no other process maps), as the pool last measured them.
    template_pool_bytes: IntGauge = IntGauge::new(
        "deltabox_template_pool_bytes", "Bytes the template pool's live templates own",
    );
    /// `deltabox_template_pool_limit_bytes`: the pool's byte bound.
    template_pool_limit_bytes: IntGauge = IntGauge::new(
        "deltabox_template_pool_limit_bytes", "The template pool's byte bound",
    );
    /// `deltabox_template_pool_templates`: live templates in the pool.
    template_pool_templates: IntGauge = IntGauge::new(
        "deltabox_template_pool_templates", "Live templates in the template pool",
    );
    /// `deltabox_template_pool_limit_templates`: the pool's count bound.
    template_pool_limit_templates: IntGauge = IntGauge::new(
        "deltabox_template_pool_limit_templates", "The template pool's count bound",
    );
    /// `deltabox_template_pool_hits_total`: sessions restored by forking their node's
    /// own template.
    template_pool_hits_total: IntCounter = IntCounter::new(
        "deltabox_template_pool_hits_total", "Sessions restored from their own template",
    );
    /// `deltabox_template_pool_misses_total`: sessions restored from their dump (their
    /// template was gone).
    template_pool_misses_total: IntCounter = IntCounter::new(
        "deltabox_template_pool_misses_total", "Sessions restored from their dump",
    );
    /// `deltabox_template_pool_evictions_total`: templates the pool evicted.
    template_pool_evictions_total: IntCounter = IntCounter::new(
        "deltabox_template_pool_evictions_total", "Templates evicted from the template pool",
    );
    /// `deltabox_dump_backlog`: dumps queued or being written.
    dump_backlog: IntGauge = IntGauge::new("deltabox_dump_backlog", "Dumps queued or being written");
    /// `deltabox_standbys_ready`: standby forks held ready for a rollback.
    standbys_ready: IntGauge = IntGauge::new(
        "deltabox_standbys_ready", "Standby forks held ready for a rollback",
    );
    /// `deltabox_standbys_pending`: standby forks still to come.
    standbys_pending: IntGauge = IntGauge::new(
        "deltabox_standbys_pending", "Standby forks waiting for their node's dumps or forking",
    );
    /// `deltabox_template_memory_bytes`: memory the live templates own, the sum of
    /// `Private_Clean + Private_Dirty` of their `/proc/<pid>/smaps_rollup` (scrape time).
    template_memory_bytes: IntGauge = IntGauge::new(
        "deltabox_template_memory_bytes", "Memory the live templates own (private pages)",
    );
    /// `deltabox_store_bytes`: disk allocated to DeltaFS layers (scrape time).
    store_bytes: IntGauge = IntGauge::new(
        "deltabox_store_bytes", "Disk allocated to DeltaFS layers",
    );
    /// `deltabox_deltafs_ops_total{op}`: FUSE requests DeltaFS answered, by kind
    /// (`lookup`, `getattr`, `open`, `read`, `write`, `create`, `unlink`, `rename`,
    /// `readdir`, `setattr`, `fsync`, `other`); passthrough reads and writes never
    /// reach DeltaFS (scrape time, from its counters).
    deltafs_ops_total: IntCounterVec = IntCounterVec::new(
        Opts::new("deltabox_deltafs_ops_total", "FUSE requests DeltaFS answered, by kind"),
        &["op"],
    );
    /// `deltabox_deltafs_op_seconds{op}`: time DeltaFS took to answer a request, by
    /// kind, from its own buckets (2.5 µs to 100 ms; see [`::deltafs::stats::TIME_EVERY`]
    /// for which requests are timed).
    deltafs_op_seconds: fs_stats::OpHistogram = fs_stats::OpHistogram::new();
    /// `deltabox_deltafs_copy_ups_total{method}`: files copied up from a frozen layer or
    /// the base into a writable layer, by `reflink` (no data written), `copy`, or
    /// `empty` (opened with `O_TRUNC`: nothing copied).
    deltafs_copy_ups_total: IntCounterVec = IntCounterVec::new(
        Opts::new("deltabox_deltafs_copy_ups_total", "DeltaFS copy-ups, by method"),
        &["method"],
    );
    /// `deltabox_deltafs_copy_up_bytes_total`: bytes DeltaFS copy-ups wrote (reflinks
    /// write none).
    deltafs_copy_up_bytes_total: IntCounter = IntCounter::new(
        "deltabox_deltafs_copy_up_bytes_total", "Bytes DeltaFS copy-ups wrote",
    );
    /// `deltabox_deltafs_copy_ups_chunked_total`: of the `copy` copy-ups, those made
    /// chunk by chunk (nothing copied at the copy-up; writes copy the chunks they touch).
    deltafs_copy_ups_chunked_total: IntCounter = IntCounter::new(
        "deltabox_deltafs_copy_ups_chunked_total",
        "DeltaFS copy-ups made chunk by chunk (stores without reflink)",
    );
    /// `deltabox_deltafs_chunk_copy_bytes_total`: of the copy-up bytes, those writes into
    /// chunk-granular copies copied from below (and their completions).
    deltafs_chunk_copy_bytes_total: IntCounter = IntCounter::new(
        "deltabox_deltafs_chunk_copy_bytes_total",
        "Bytes DeltaFS copied into chunk-granular copies",
    );
    /// `deltabox_deltafs_partial_completions_total`: chunk-granular copies completed (the
    /// rest copied; passthrough from their next first open).
    deltafs_partial_completions_total: IntCounter = IntCounter::new(
        "deltabox_deltafs_partial_completions_total",
        "DeltaFS chunk-granular copies completed",
    );
    /// `deltabox_deltafs_freezes_total`: DeltaFS freezes (the file half of checkpoints).
    deltafs_freezes_total: IntCounter = IntCounter::new(
        "deltabox_deltafs_freezes_total", "DeltaFS freezes",
    );
    /// `deltabox_deltafs_switches_total`: DeltaFS switches (the file half of rollbacks).
    deltafs_switches_total: IntCounter = IntCounter::new(
        "deltabox_deltafs_switches_total", "DeltaFS switches",
    );
    /// `deltabox_deltafs_layers_squashed_total`: snapshots of removed nodes that gc
    /// merged into the snapshot above them (DeltaFS squash).
    deltafs_layers_squashed_total: IntCounter = IntCounter::new(
        "deltabox_deltafs_layers_squashed_total",
        "Snapshots of removed nodes gc merged into the snapshot above them (DeltaFS squash)",
    );
    /// `deltabox_deltafs_layers`: layers in the longest chain of a mounted view, its
    /// writable layer and the frozen ones below it (lookups do not walk them; disk and
    /// a restart's replay do).
    deltafs_layers: IntGauge = IntGauge::new(
        "deltabox_deltafs_layers", "Layers in the longest chain of a mounted DeltaFS view",
    );
    /// `deltabox_checkpoint_written_bytes`: bytes a checkpoint made the store write: the
    /// copy-ups of the epoch it closed, the copies of files kept live, and its metadata
    /// (write amplification; reflinks write no data).
    checkpoint_written_bytes: Histogram = Histogram::with_opts(
        HistogramOpts::new("deltabox_checkpoint_written_bytes", "Bytes a checkpoint made the store write")
            .buckets(WRITTEN_BUCKETS.to_vec()),
    );
    /// `deltabox_sandbox_dirtied_pages`: page-cache pages the sandboxes dirtied since
    /// their last checkpoint, summed over sandboxes (per sandbox: `GET /v1/stats`).
    sandbox_dirtied_pages: IntGauge = IntGauge::new(
        "deltabox_sandbox_dirtied_pages", "Pages the sandboxes dirtied since their last checkpoint",
    );
    /// `deltabox_sandbox_dirtied_bytes`: the same in bytes (4 KiB pages).
    sandbox_dirtied_bytes: IntGauge = IntGauge::new(
        "deltabox_sandbox_dirtied_bytes", "Bytes of pages the sandboxes dirtied since their last checkpoint",
    );
    /// `deltabox_cow_faults_total{warm_up}`: copy-on-write faults the sandboxes took
    /// after a rollback (eBPF, `exceptions:page_fault_user`), summed, by whether that
    /// rollback warmed up (`true`, `false`); brought up to date at each scrape.
    cow_faults_total: IntCounterVec = IntCounterVec::new(
        Opts::new("deltabox_cow_faults_total", "Copy-on-write faults taken by sandboxes after a rollback, by warm-up"),
        &["warm_up"],
    );
    /// `deltabox_warm_up_seconds`: time of one warm-up pass (every session of a
    /// rolled-back sandbox), run after the rollback answered.
    warm_up_seconds: Histogram = Histogram::with_opts(
        HistogramOpts::new("deltabox_warm_up_seconds", "Time of one warm-up pass after a rollback")
            .buckets(STATE_BUCKETS.to_vec()),
    );
    /// `deltabox_warm_up_pages`: pages one warm-up pass pre-faulted.
    warm_up_pages: Histogram = Histogram::with_opts(
        HistogramOpts::new("deltabox_warm_up_pages", "Pages one warm-up pass pre-faulted")
            .buckets(vec![0.0, 16.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262_144.0]),
    );
}

/// Buckets of `deltabox_checkpoint_written_bytes`: 512 B to 1 GiB, fine around the
/// paper's ~4 KB per checkpoint.
const WRITTEN_BUCKETS: [f64; 14] = [
    512.0,
    1024.0,
    2048.0,
    4096.0,
    8192.0,
    16384.0,
    65536.0,
    262_144.0,
    1_048_576.0,
    4_194_304.0,
    16_777_216.0,
    67_108_864.0,
    268_435_456.0,
    1_073_741_824.0,
];

/// Latency buckets of state operations: 0.5 ms to 1 s.
const STATE_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// Per-cgroup figures of the current epoch, for [`Metrics::set_cgroups`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CgroupFigures {
    /// The cgroup's path (the label).
    pub path: String,
    /// Its current epoch.
    pub epoch: u64,
    /// Bytes written.
    pub bytes: u64,
    /// Write syscalls.
    pub writes: u64,
    /// Folios dirtied.
    pub pages_dirtied: u64,
    /// Distinct inodes.
    pub inodes: u64,
}

/// The operations `deltabox_tracker_errors_total{op}` counts failures of.
pub const TRACKER_OPS: &[&str] = &[
    "list attached programs",
    "list watched cgroups",
    "read counters",
    "read inode stats",
    "watch a cgroup",
    "unwatch a cgroup",
    "advance an epoch",
    "drop an old epoch's counters",
    "read copy-on-write faults",
];

/// The methods `deltabox_deltafs_copy_ups_total{method}` counts.
pub const COPY_UP_METHODS: [&str; 3] = ["reflink", "copy", "empty"];

/// Content type of [`Metrics::encode`]'s output.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

fn sync_counter(counter: &IntCounter, total: u64) {
    let current = counter.get();
    if total < current {
        counter.reset();
        counter.inc_by(total);
    } else {
        counter.inc_by(total - current);
    }
}

/// Gauges are `i64`; kernel counts past `i64::MAX` saturate rather than wrap negative.
fn gauge_value(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests;
