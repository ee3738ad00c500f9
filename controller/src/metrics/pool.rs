//! The template pool's figures (`GET /v1/stats` `pool`, and the
//! `deltabox_template_pool_*` and `deltabox_dump_backlog` metrics), as the sandbox
//! manager's pool last measured them (its own thread measures, off the answer path).

use serde::{Deserialize, Serialize};

use super::{Metrics, gauge_value, sync_counter};

/// The template pool now.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolFigures {
    /// Live templates in the pool (one per session and per other process of a node),
    /// as last measured.
    pub templates_live: u64,
    /// Node sessions and other processes whose template is not live and whose dump is
    /// on disk (evicted,
    /// or lost): restored through the fallback.
    pub templates_dumped: u64,
    /// Bytes the live templates own (anonymous pages no other process maps), as last
    /// measured.
    pub bytes_owned: u64,
    /// The count bound (`deltaboxd --pool-max-templates`).
    pub max_templates: u64,
    /// The byte bound (`deltaboxd --pool-max-bytes`).
    pub max_bytes: u64,
    /// Sessions restored by forking their node's own template since the daemon
    /// started.
    pub hits: u64,
    /// Sessions restored from their dump (their template was gone) since the daemon
    /// started.
    pub misses: u64,
    /// Templates evicted since the daemon started.
    pub evictions: u64,
    /// Dumps queued or being written.
    pub dump_backlog: u64,
    /// When dumps are written: `eager`, `on-evict` or `off`.
    pub dump_policy: String,
    /// Standby forks held ready for a rollback (docs/deltacr.md, "Standby forks").
    #[serde(default)]
    pub standbys_ready: u64,
    /// Standby forks still to come: waiting for their node's dumps or for state
    /// operations to end, or forking.
    #[serde(default)]
    pub standbys_pending: u64,
}

impl Metrics {
    /// Sets the pool's gauges and brings its counters to the pool's totals.
    pub fn set_pool(&self, p: &PoolFigures) {
        self.template_pool_bytes.set(gauge_value(p.bytes_owned));
        self.template_pool_limit_bytes.set(gauge_value(p.max_bytes));
        self.template_pool_templates
            .set(gauge_value(p.templates_live));
        self.template_pool_limit_templates
            .set(gauge_value(p.max_templates));
        sync_counter(&self.template_pool_hits_total, p.hits);
        sync_counter(&self.template_pool_misses_total, p.misses);
        sync_counter(&self.template_pool_evictions_total, p.evictions);
        self.dump_backlog.set(gauge_value(p.dump_backlog));
        self.standbys_ready.set(gauge_value(p.standbys_ready));
        self.standbys_pending.set(gauge_value(p.standbys_pending));
    }
}

/// The pool's figures as text lines for `deltabox stats`.
pub fn pool_text(p: &PoolFigures) -> String {
    use crate::api::sandbox_render::size;
    format!(
        "template pool: {} live of {} max, {} of {} max owned, {} dumped; \
         hits {}  misses {}  evictions {}  dump backlog {} (policy {}); \
         standby forks: {} ready, {} to come\n",
        p.templates_live,
        p.max_templates,
        size(p.bytes_owned),
        size(p.max_bytes),
        p.templates_dumped,
        p.hits,
        p.misses,
        p.evictions,
        p.dump_backlog,
        p.dump_policy,
        p.standbys_ready,
        p.standbys_pending
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_metrics_take_the_figures() {
        let m = Metrics::new().unwrap();
        let mut p = PoolFigures {
            templates_live: 3,
            bytes_owned: 4096,
            max_templates: 8,
            max_bytes: 1 << 20,
            hits: 5,
            misses: 2,
            evictions: 1,
            dump_backlog: 4,
            standbys_ready: 6,
            standbys_pending: 1,
            ..PoolFigures::default()
        };
        m.set_pool(&p);
        p.hits = 7;
        m.set_pool(&p);
        let text = m.encode().unwrap();
        for line in [
            "deltabox_template_pool_bytes 4096",
            "deltabox_template_pool_limit_bytes 1048576",
            "deltabox_template_pool_templates 3",
            "deltabox_template_pool_limit_templates 8",
            "deltabox_template_pool_hits_total 7",
            "deltabox_template_pool_misses_total 2",
            "deltabox_template_pool_evictions_total 1",
            "deltabox_dump_backlog 4",
            "deltabox_standbys_ready 6",
            "deltabox_standbys_pending 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line}: {text}");
        }
        let text = pool_text(&p);
        assert!(text.contains("hits 7  misses 2  evictions 1"), "{text}");
        assert!(text.contains("standby forks: 6 ready, 1 to come"), "{text}");
    }
}
