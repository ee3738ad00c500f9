//! DeltaFS's own counters (`deltafs::Store::stats`) as Prometheus metrics, read at
//! scrape time: requests by kind, their latency, copy-ups, freezes, switches, chain
//! length. DeltaFS counts with atomics and keeps its latency buckets itself, so the
//! request histogram is a [`Collector`] that hands out DeltaFS's buckets as they are
//! (a `prometheus::Histogram` can only be observed into, not set).

use std::sync::{Arc, Mutex, PoisonError};

use deltafs::stats::{LATENCY_BOUNDS_NS, OpKind, OpStats};
use prometheus::core::{Collector, Desc};
use prometheus::proto::{Bucket, Histogram, LabelPair, Metric, MetricFamily, MetricType};
use serde::{Deserialize, Serialize};

use super::{gauge_value, sync_counter};

const OP_SECONDS: &str = "deltabox_deltafs_op_seconds";
const OP_SECONDS_HELP: &str =
    "Time the DeltaFS daemon took to answer a FUSE request, by kind (a sample of requests)";

/// `deltabox_deltafs_op_seconds{op}`: DeltaFS's latency histogram per request kind,
/// as last read from the store. Cheap to clone (shared).
#[derive(Clone)]
pub struct OpHistogram {
    desc: Arc<Desc>,
    ops: Arc<Mutex<Vec<OpStats>>>,
}

impl OpHistogram {
    /// A histogram with no series until [`OpHistogram::set`] is first called.
    pub fn new() -> Result<Self, prometheus::Error> {
        let desc = Desc::new(
            OP_SECONDS.to_owned(),
            OP_SECONDS_HELP.to_owned(),
            vec!["op".to_owned()],
            Default::default(),
        )?;
        Ok(Self {
            desc: Arc::new(desc),
            ops: Arc::new(Mutex::new(Vec::new())),
        })
    }

    /// Replaces the figures with DeltaFS's current ones.
    pub fn set(&self, ops: &[OpStats]) {
        *self.ops.lock().unwrap_or_else(PoisonError::into_inner) = ops.to_vec();
    }

    /// Timed requests of `kind` as last set.
    pub fn sample_count(&self, kind: OpKind) -> u64 {
        let ops = self.ops.lock().unwrap_or_else(PoisonError::into_inner);
        ops.iter().find(|o| o.kind == kind).map_or(0, |o| o.timed)
    }
}

impl Collector for OpHistogram {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let ops = self.ops.lock().unwrap_or_else(PoisonError::into_inner);
        if ops.is_empty() {
            return Vec::new();
        }
        let mut family = MetricFamily::default();
        family.set_name(OP_SECONDS.to_owned());
        family.set_help(OP_SECONDS_HELP.to_owned());
        family.set_field_type(MetricType::HISTOGRAM);
        for op in ops.iter() {
            let mut histogram = Histogram::default();
            histogram.set_sample_count(op.timed);
            histogram.set_sample_sum(op.sum_ns as f64 / 1e9);
            let mut cumulative = 0;
            let buckets = LATENCY_BOUNDS_NS
                .iter()
                .zip(&op.buckets)
                .map(|(bound, n)| {
                    cumulative += n;
                    let mut b = Bucket::default();
                    b.set_cumulative_count(cumulative);
                    b.set_upper_bound(*bound as f64 / 1e9);
                    b
                })
                .collect();
            histogram.set_bucket(buckets);
            let mut label = LabelPair::default();
            label.set_name("op".to_owned());
            label.set_value(op.kind.as_str().to_owned());
            let mut metric = Metric::from_label(vec![label]);
            metric.set_histogram(histogram);
            family.mut_metric().push(metric);
        }
        vec![family]
    }
}

impl super::Metrics {
    /// Brings the `deltabox_deltafs_*` metrics to DeltaFS's counters (which only grow
    /// while the daemon's store is open).
    pub fn set_deltafs(&self, s: &deltafs::StatsSnapshot) {
        for op in &s.ops {
            sync_counter(
                &self
                    .deltafs_ops_total
                    .with_label_values(&[op.kind.as_str()]),
                op.count,
            );
        }
        self.deltafs_op_seconds.set(&s.ops);
        for (method, n) in super::COPY_UP_METHODS.iter().zip([
            s.copy_ups_reflink,
            s.copy_ups_copy,
            s.copy_ups_empty,
        ]) {
            sync_counter(&self.deltafs_copy_ups_total.with_label_values(&[method]), n);
        }
        sync_counter(&self.deltafs_copy_up_bytes_total, s.copy_up_bytes);
        sync_counter(&self.deltafs_copy_ups_chunked_total, s.copy_ups_chunked);
        sync_counter(&self.deltafs_chunk_copy_bytes_total, s.chunk_copy_bytes);
        sync_counter(
            &self.deltafs_partial_completions_total,
            s.partial_completions,
        );
        sync_counter(&self.deltafs_freezes_total, s.freezes);
        sync_counter(&self.deltafs_switches_total, s.switches);
        self.deltafs_layers.set(gauge_value(
            s.view_layers.iter().copied().max().unwrap_or(0),
        ));
    }
}

/// DeltaFS's figures as `GET /v1/stats` reports them (counts since the daemon opened its
/// store).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DeltaFsFigures {
    /// FUSE requests the daemon answered, by kind (`lookup`, `getattr`, ...); reads and
    /// writes through passthrough never reach it.
    pub ops: Vec<OpCount>,
    /// Copy-ups by reflink (no data written).
    pub copy_ups_reflink: u64,
    /// Copy-ups by copying the data (chunk-granular ones included).
    pub copy_ups_copy: u64,
    /// Of `copy_ups_copy`, those made chunk by chunk (stores without reflink): writes
    /// copy the chunks they touch.
    #[serde(default)]
    pub copy_ups_chunked: u64,
    /// Copy-ups of files opened with `O_TRUNC` (nothing copied).
    pub copy_ups_empty: u64,
    /// Bytes copy-ups wrote (chunks copied into chunk-granular copies included).
    pub copy_up_bytes: u64,
    /// Of `copy_up_bytes`, the chunks writes into chunk-granular copies copied from
    /// below, and their completions.
    #[serde(default)]
    pub chunk_copy_bytes: u64,
    /// Chunk-granular copies completed (then served passthrough).
    #[serde(default)]
    pub partial_completions: u64,
    /// Freezes (checkpoints' file halves).
    pub freezes: u64,
    /// Switches (rollbacks' file halves).
    pub switches: u64,
    /// Layers in the longest chain of a mounted view (its writable layer and the frozen
    /// ones below it).
    pub max_layers: u64,
}

/// One kind of request: how many, and their mean time in the daemon.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OpCount {
    /// The kind.
    pub op: String,
    /// Requests answered.
    pub count: u64,
    /// Mean time to answer (of the timed ones), µs; absent before the first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_us: Option<f64>,
}

impl DeltaFsFigures {
    /// The figures of a DeltaFS stats snapshot.
    pub fn of(s: &deltafs::StatsSnapshot) -> Self {
        Self {
            ops: s
                .ops
                .iter()
                .map(|o| OpCount {
                    op: o.kind.as_str().to_owned(),
                    count: o.count,
                    mean_us: (o.timed > 0).then(|| o.sum_ns as f64 / o.timed as f64 / 1e3),
                })
                .collect(),
            copy_ups_reflink: s.copy_ups_reflink,
            copy_ups_copy: s.copy_ups_copy,
            copy_ups_chunked: s.copy_ups_chunked,
            copy_ups_empty: s.copy_ups_empty,
            copy_up_bytes: s.copy_up_bytes,
            chunk_copy_bytes: s.chunk_copy_bytes,
            partial_completions: s.partial_completions,
            freezes: s.freezes,
            switches: s.switches,
            max_layers: s.view_layers.iter().copied().max().unwrap_or(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(kind: OpKind, timed: u64) -> OpStats {
        let mut buckets = vec![0; LATENCY_BOUNDS_NS.len() + 1];
        buckets[1] = timed;
        OpStats {
            kind,
            count: timed * 2,
            timed,
            sum_ns: timed * 4_000,
            buckets,
        }
    }

    #[test]
    fn buckets_are_cumulative_and_in_seconds() {
        let h = OpHistogram::new().unwrap();
        assert!(h.collect().is_empty(), "no series before the first figures");
        h.set(&[op(OpKind::Lookup, 3), op(OpKind::Write, 0)]);
        let families = h.collect();
        let lookup = &families[0].get_metric()[0];
        assert_eq!(lookup.get_label()[0].value(), "lookup");
        let hist = lookup.get_histogram();
        assert_eq!(hist.get_sample_count(), 3);
        assert!((hist.get_sample_sum() - 12e-6).abs() < 1e-12);
        let buckets = hist.get_bucket();
        assert_eq!(buckets[0].cumulative_count(), 0);
        assert_eq!(buckets[1].cumulative_count(), 3);
        assert_eq!(buckets.last().unwrap().cumulative_count(), 3);
        assert!((buckets[0].upper_bound() - 2.5e-6).abs() < 1e-15);
        assert_eq!(h.sample_count(OpKind::Lookup), 3);
    }

    #[test]
    fn figures_give_mean_and_longest_chain() {
        let s = deltafs::StatsSnapshot {
            ops: vec![op(OpKind::Lookup, 2), op(OpKind::Getattr, 0)],
            view_layers: vec![3, 7, 1],
            ..Default::default()
        };
        let f = DeltaFsFigures::of(&s);
        assert_eq!(f.max_layers, 7);
        assert_eq!(f.ops[0].count, 4);
        assert_eq!(f.ops[0].mean_us, Some(4.0));
        assert_eq!(f.ops[1].mean_us, None);
    }
}
