//! What the pool knows of the bytes its templates own, and when it measures them again.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::{Candidate, TICK};
use crate::tree::ids::NodeId;

/// What the pool's thread knows of the bytes its templates own between full measures.
#[derive(Default)]
pub(super) struct Measures {
    /// Per node, what its live templates owned when last measured.
    pub(super) bytes: HashMap<NodeId, u64>,
    /// When every template was last measured, and how long that took.
    pub(super) last_full: Option<(Instant, Duration)>,
}

impl Measures {
    /// A full measure is due every [`TICK`], or every ten times its own last cost when
    /// that is longer: walking every template's page map stays under a tenth of a CPU
    /// however many templates there are. In between, passes (after each checkpoint and
    /// dump) measure only the nodes new to the pool, which own next to nothing yet.
    pub(super) fn full_due(&self) -> bool {
        self.last_full
            .is_none_or(|(at, cost)| at.elapsed() >= TICK.max(cost * 10))
    }
}

/// Live templates of `candidates` and the bytes they own: from `known` for the nodes
/// measured already, measured (and recorded there) for the others. A template that
/// cannot be measured (it died meanwhile) owns nothing.
pub(super) fn measure(candidates: &[Candidate], known: &mut HashMap<NodeId, u64>) -> (u64, u64) {
    let mut count = 0;
    let mut bytes = 0;
    for c in candidates {
        count += c.live_all().count() as u64;
        bytes += *known.entry(c.node).or_insert_with(|| {
            crate::foreground::yield_to_operations(crate::foreground::BACKGROUND_WAIT);
            // A session template's standby forks share all its pages.
            let standbys = &c.tree.standbys;
            let sessions = c.live().map(|(sid, t)| (t, standbys.forks_of(c.node, sid)));
            sessions
                .chain(c.live_processes().map(|t| (t, 0)))
                .map(|(t, forks)| {
                    t.owned_bytes(forks).unwrap_or_else(|e| {
                        tracing::debug!(node = %c.node, "template not measured: {e}");
                        0
                    })
                })
                .sum()
        });
    }
    (count, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_measures_back_off_with_their_cost() {
        let mut m = Measures::default();
        assert!(m.full_due(), "the first pass measures everything");
        m.last_full = Some((Instant::now(), Duration::from_millis(3)));
        assert!(!m.full_due());
        let long_ago = Instant::now() - TICK - Duration::from_millis(10);
        m.last_full = Some((long_ago, Duration::from_millis(3)));
        assert!(m.full_due(), "due every TICK when cheap");
        // A measure that took 0.5 s waits ten times that, not TICK.
        m.last_full = Some((long_ago, Duration::from_millis(500)));
        assert!(!m.full_due());
    }
}
