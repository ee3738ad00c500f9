//! Latency samples and their percentiles.

/// Latencies of one kind of operation, in milliseconds.
#[derive(Debug, Default, Clone)]
pub struct Samples(Vec<f64>);

/// Median, P95, P99 (nearest rank), mean and count of a set of samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    /// How many samples.
    pub count: usize,
    /// The middle one (the mean of the two middle ones for an even count).
    pub median: f64,
    /// Nearest-rank percentiles.
    pub p95: f64,
    pub p99: f64,
    /// The arithmetic mean.
    pub mean: f64,
}

impl Samples {
    /// Adds one sample.
    pub fn push(&mut self, ms: f64) {
        self.0.push(ms);
    }

    /// How many samples.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The samples in `range` (in the order they were taken), e.g. the first third.
    pub fn slice(&self, range: std::ops::Range<usize>) -> Samples {
        Samples(self.0.get(range).unwrap_or_default().to_vec())
    }

    /// Their total.
    pub fn sum(&self) -> f64 {
        self.0.iter().sum()
    }

    /// `None` when there are no samples.
    pub fn summary(&self) -> Option<Summary> {
        if self.0.is_empty() {
            return None;
        }
        let mut sorted = self.0.clone();
        sorted.sort_by(f64::total_cmp);
        Some(Summary {
            count: sorted.len(),
            median: percentile(&sorted, 50.0),
            p95: percentile(&sorted, 95.0),
            p99: percentile(&sorted, 99.0),
            mean: self.sum() / sorted.len() as f64,
        })
    }
}

/// The nearest-rank percentile of sorted, non-empty samples; the median of an even count
/// is the mean of the two middle ones.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let n = sorted.len();
    if p == 50.0 {
        return if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
    }
    let rank = ((p / 100.0) * n as f64).ceil() as usize;
    sorted[rank.clamp(1, n) - 1]
}

/// `0.84 ms`, `12.3 ms`, `1.42 s`.
pub fn ms(value: f64) -> String {
    if value >= 1000.0 {
        format!("{:.2} s", value / 1000.0)
    } else if value >= 10.0 {
        format!("{value:.1} ms")
    } else {
        format!("{value:.2} ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let mut s = Samples::default();
        assert!(s.summary().is_none());
        for v in (1..=100).rev() {
            s.push(f64::from(v));
        }
        let sum = s.summary().unwrap();
        assert_eq!(sum.count, 100);
        assert_eq!(sum.median, 50.5);
        assert_eq!(sum.p95, 95.0);
        assert_eq!(sum.p99, 99.0);
        assert_eq!(sum.mean, 50.5);
        let mut small = Samples::default();
        for v in [3.0, 1.0, 2.0] {
            small.push(v);
        }
        let sum = small.summary().unwrap();
        assert_eq!((sum.median, sum.p95, sum.p99), (2.0, 3.0, 3.0));
        assert_eq!(small.slice(1..3).sum(), 3.0);
        assert_eq!(small.slice(2..9).len(), 0);
    }

    #[test]
    fn milliseconds_read_well() {
        assert_eq!(ms(0.842), "0.84 ms");
        assert_eq!(ms(12.34), "12.3 ms");
        assert_eq!(ms(1420.0), "1.42 s");
    }
}
