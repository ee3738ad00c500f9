//! Latency of the sandbox operations since the daemon started, for `GET /v1/stats`
//! and `deltabox stats`: per operation a count and the maximum of every observation,
//! and percentiles over a bounded reservoir of the most recent ones.
//!
//! Prometheus histograms give percentiles only through a Prometheus server, and only
//! to the precision of their buckets; a user without one still wants "how fast are my
//! checkpoints", so the daemon keeps the observations themselves (the last
//! [`WINDOW`] per operation: 32 KiB each) and sorts them when asked.

use std::sync::{Mutex, PoisonError};

use serde::{Deserialize, Serialize};

/// Observations kept per operation for the percentiles.
pub const WINDOW: usize = 4096;

/// The operations whose latency is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    /// A sandbox checkpoint, as the daemon timed it (`total` of its timings).
    Checkpoint,
    /// A rollback, as the daemon timed it (`total` of its timings).
    Rollback,
    /// One sandbox of a branch call, as the daemon timed it.
    Branch,
    /// A one-shot command: the request, from its arrival to the end of its answer.
    Exec,
    /// Code run in a session: the request, from its arrival to the end of its answer.
    SessionRun,
}

impl Operation {
    /// Every operation, in the order reports list them.
    pub const ALL: [Self; 5] = [
        Self::Checkpoint,
        Self::Rollback,
        Self::Branch,
        Self::Exec,
        Self::SessionRun,
    ];

    /// The snake_case name (as in JSON).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Checkpoint => "checkpoint",
            Self::Rollback => "rollback",
            Self::Branch => "branch",
            Self::Exec => "exec",
            Self::SessionRun => "session_run",
        }
    }

    fn index(self) -> usize {
        match self {
            Self::Checkpoint => 0,
            Self::Rollback => 1,
            Self::Branch => 2,
            Self::Exec => 3,
            Self::SessionRun => 4,
        }
    }
}

/// One operation's latency since the daemon started. The percentiles are over the
/// last `samples` observations (at most [`WINDOW`]); `count` and `max_ms` over all.
/// Without any observation only `operation`, `count` and `samples` are present.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OperationLatency {
    /// The operation.
    pub operation: Operation,
    /// Observations since the daemon started.
    pub count: u64,
    /// Observations the percentiles are computed over.
    pub samples: usize,
    /// Median, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p50_ms: Option<f64>,
    /// 90th percentile, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p90_ms: Option<f64>,
    /// 99th percentile, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_ms: Option<f64>,
    /// Slowest since the daemon started, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ms: Option<f64>,
}

/// The nearest-rank percentile `p` (0 < p ≤ 100) of `sorted` (ascending): the
/// smallest value with at least p % of the values at or below it. Always one of the
/// observations, never an interpolation; `None` for no values.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let n = sorted.len() as f64;
    // Rank in 1..=n; the float product is exact enough for n ≤ WINDOW.
    let rank = (p / 100.0 * n).ceil().clamp(1.0, n) as usize;
    sorted.get(rank - 1).copied()
}

/// The last `capacity` observations of one operation, with the all-time count and max.
#[derive(Debug)]
struct Reservoir {
    capacity: usize,
    count: u64,
    max: f64,
    ring: Vec<f64>,
    /// Where the next observation goes once the ring is full.
    next: usize,
}

impl Reservoir {
    fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            count: 0,
            max: 0.0,
            ring: Vec::new(),
            next: 0,
        }
    }

    fn observe(&mut self, ms: f64) {
        self.count += 1;
        self.max = self.max.max(ms);
        if self.ring.len() < self.capacity {
            self.ring.push(ms);
        } else {
            self.ring[self.next] = ms;
            self.next = (self.next + 1) % self.capacity;
        }
    }

    fn summary(&self, operation: Operation) -> OperationLatency {
        let mut sorted = self.ring.clone();
        sorted.sort_by(f64::total_cmp);
        OperationLatency {
            operation,
            count: self.count,
            samples: sorted.len(),
            p50_ms: percentile(&sorted, 50.0),
            p90_ms: percentile(&sorted, 90.0),
            p99_ms: percentile(&sorted, 99.0),
            max_ms: (self.count > 0).then_some(self.max),
        }
    }
}

/// The reservoirs of every [`Operation`]. Shared by the daemon's request handlers.
#[derive(Debug)]
pub struct LatencyRecorder {
    reservoirs: Mutex<Vec<Reservoir>>,
}

impl Default for LatencyRecorder {
    fn default() -> Self {
        Self::with_window(WINDOW)
    }
}

impl LatencyRecorder {
    /// Keeps the last `window` observations per operation (at least one).
    pub fn with_window(window: usize) -> Self {
        Self {
            reservoirs: Mutex::new(
                Operation::ALL
                    .iter()
                    .map(|_| Reservoir::new(window))
                    .collect(),
            ),
        }
    }

    /// Records one observation of `op`, in ms. A value that is not a finite,
    /// non-negative number (a clock gone wrong) is dropped rather than poisoning the
    /// percentiles.
    pub fn observe(&self, op: Operation, ms: f64) {
        if !(ms.is_finite() && ms >= 0.0) {
            tracing::warn!(operation = op.as_str(), ms, "latency not recorded");
            return;
        }
        self.lock()[op.index()].observe(ms);
    }

    /// Every operation's figures, in [`Operation::ALL`]'s order.
    pub fn summary(&self) -> Vec<OperationLatency> {
        let reservoirs = self.lock();
        Operation::ALL
            .iter()
            .map(|op| reservoirs[op.index()].summary(*op))
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Reservoir>> {
        // Each observation is one push or store: a panic cannot leave a ring half made.
        self.reservoirs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let sorted: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&sorted, 50.0), Some(50.0));
        assert_eq!(percentile(&sorted, 90.0), Some(90.0));
        assert_eq!(percentile(&sorted, 99.0), Some(99.0));
        assert_eq!(percentile(&sorted, 100.0), Some(100.0));
        assert_eq!(percentile(&[7.0], 50.0), Some(7.0));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        // Two values: the median is the lower (rank ceil(1.0) = 1), p90 the upper.
        assert_eq!(percentile(&[1.0, 3.0], 50.0), Some(1.0));
        assert_eq!(percentile(&[1.0, 3.0], 90.0), Some(3.0));
        assert_eq!(percentile(&[], 50.0), None);
        // Ten values: p99 is the largest, p90 the ninth.
        let ten: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(percentile(&ten, 90.0), Some(9.0));
        assert_eq!(percentile(&ten, 99.0), Some(10.0));
    }

    #[test]
    fn summary_is_ordered_and_from_the_observations() {
        let rec = LatencyRecorder::default();
        // Out of order on purpose: the reservoir sorts.
        for ms in [5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0, 4.0, 6.0, 10.0] {
            rec.observe(Operation::Checkpoint, ms);
        }
        let all = rec.summary();
        assert_eq!(
            all.iter().map(|o| o.operation).collect::<Vec<_>>(),
            Operation::ALL
        );
        let cp = &all[0];
        assert_eq!((cp.count, cp.samples), (10, 10));
        assert_eq!(cp.p50_ms, Some(5.0));
        assert_eq!(cp.p90_ms, Some(9.0));
        assert_eq!(cp.p99_ms, Some(10.0));
        assert_eq!(cp.max_ms, Some(10.0));
        let rb = &all[1];
        assert_eq!(
            (rb.count, rb.samples, rb.p50_ms, rb.max_ms),
            (0, 0, None, None)
        );
    }

    #[test]
    fn the_window_keeps_the_latest_and_the_max_is_all_time() {
        let rec = LatencyRecorder::with_window(4);
        rec.observe(Operation::Exec, 1000.0);
        for ms in 1..=8 {
            rec.observe(Operation::Exec, f64::from(ms));
        }
        let exec = &rec.summary()[3];
        assert_eq!(exec.operation, Operation::Exec);
        assert_eq!((exec.count, exec.samples), (9, 4));
        // The window holds 5, 6, 7, 8.
        assert_eq!(exec.p50_ms, Some(6.0));
        assert_eq!(exec.p99_ms, Some(8.0));
        assert_eq!(exec.max_ms, Some(1000.0));
    }

    #[test]
    fn bad_values_are_dropped() {
        let rec = LatencyRecorder::default();
        rec.observe(Operation::Branch, f64::NAN);
        rec.observe(Operation::Branch, -1.0);
        rec.observe(Operation::Branch, f64::INFINITY);
        assert_eq!(rec.summary()[2].count, 0);
    }

    #[test]
    fn json_leaves_out_absent_percentiles() {
        let rec = LatencyRecorder::default();
        rec.observe(Operation::SessionRun, 2.5);
        let json = serde_json::to_value(rec.summary()).unwrap();
        assert_eq!(json[4]["operation"], "session_run");
        assert_eq!(json[4]["p90_ms"], 2.5);
        assert!(json[0].get("p50_ms").is_none(), "{json}");
    }
}
