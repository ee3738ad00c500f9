//! The warm-up worker: one thread that, in order, harvests ended periods (counts their
//! faults, learns their pages) and runs warm-up passes; and the bounded store of what
//! it learned.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, mpsc};
use std::time::Instant;

use nix::unistd::Pid;

use super::{Period, Start};
use crate::bpf::{BpfError, CowFaultCounter};
use crate::cr::warmup;
use crate::metrics::Metrics;

/// Upper bound of the page addresses kept for warm-ups, over every (node, session):
/// 4 Mi pages (16 GiB of memory described, 32 MiB of addresses); the oldest go first.
pub(super) const MAX_LEARNED_PAGES: usize = 4 << 20;
/// Upper bound of the (node, session) page sets kept.
pub(super) const MAX_LEARNED_SETS: usize = 4096;

/// The page sets kept for warm-ups, bounded, oldest first out.
#[derive(Default)]
pub(super) struct Learned {
    pub(super) sets: HashMap<(String, String), Vec<u64>>,
    pub(super) order: VecDeque<(String, String)>,
    pub(super) pages: usize,
}

impl Learned {
    pub(super) fn insert(&mut self, key: (String, String), pages: Vec<u64>) {
        if let Some(old) = self.sets.remove(&key) {
            self.pages -= old.len();
            self.order.retain(|k| *k != key);
        }
        self.pages += pages.len();
        self.order.push_back(key.clone());
        self.sets.insert(key, pages);
        while self.pages > MAX_LEARNED_PAGES || self.sets.len() > MAX_LEARNED_SETS {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            if let Some(old) = self.sets.remove(&oldest) {
                self.pages -= old.len();
            }
        }
    }
}

#[derive(Default)]
pub(super) struct State {
    pub(super) periods: HashMap<String, Period>,
    pub(super) learned: Learned,
    /// Sandboxes with a warm-up queued or running, and how many.
    pub(super) warming: HashMap<String, usize>,
}

pub(super) struct Shared {
    pub(super) faults: Arc<dyn CowFaultCounter>,
    pub(super) metrics: Metrics,
    pub(super) state: Mutex<State>,
    pub(super) warmed: Condvar,
}

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        // Plain bookkeeping: a panic mid-update leaves nothing a later call trips on.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn bpf<T>(&self, op: &'static str, result: Result<T, BpfError>) -> Option<T> {
        result
            .map_err(|e| {
                self.metrics.tracker_error(op);
                tracing::warn!("copy-on-write faults: {op}: {e}");
            })
            .ok()
    }

    /// Adds the period's faults not counted yet to `deltabox_cow_faults_total`.
    pub(super) fn count(&self, period: &mut Period, faults: u64) {
        if let Start::Rollback { warm_up, .. } = period.start {
            let label = if warm_up { "true" } else { "false" };
            self.metrics
                .cow_faults_total
                .with_label_values(&[label])
                .inc_by(faults.saturating_sub(period.counted));
        }
        period.counted = period.counted.max(faults);
    }
}

/// Work done after the answer, in order, by one worker thread.
pub(super) enum Job {
    /// A period ended: count its faults, learn its pages, drop its records.
    Harvest { period: Period, next_epoch: u64 },
    /// Answer when every job sent before is done.
    Barrier(mpsc::Sender<()>),
    /// Pre-fault the pages learned for `node` in the restored `sessions`, at the start
    /// of the sandbox's period `epoch`.
    WarmUp {
        sandbox: String,
        epoch: u64,
        node: String,
        sessions: Vec<(String, i32)>,
    },
}

impl Shared {
    pub(super) fn done_warming(&self, sandbox: &str) {
        let mut state = self.lock();
        if let Some(n) = state.warming.get_mut(sandbox) {
            *n -= 1;
            if *n == 0 {
                state.warming.remove(sandbox);
            }
        }
        drop(state);
        self.warmed.notify_all();
    }

    pub(super) fn run(&self, job: Job) {
        match job {
            Job::Barrier(done) => {
                let _ = done.send(());
            }
            Job::Harvest { period, next_epoch } => {
                crate::foreground::yield_to_operations(crate::foreground::BACKGROUND_WAIT);
                self.harvest(period, next_epoch)
            }
            Job::WarmUp {
                sandbox,
                epoch,
                node,
                sessions,
            } => {
                // Done even if the pass panics: the sandbox's next operation waits for it.
                struct Done<'a>(&'a Shared, &'a str);
                impl Drop for Done<'_> {
                    fn drop(&mut self) {
                        self.0.done_warming(self.1);
                    }
                }
                let _done = Done(self, &sandbox);
                self.warm_up(&sandbox, epoch, &node, &sessions);
            }
        }
    }

    fn harvest(&self, mut period: Period, next_epoch: u64) {
        let start = Instant::now();
        let (cgroup, epoch) = (period.cgroup, period.epoch);
        if let Some(faults) = self.bpf(
            "read copy-on-write faults",
            self.faults.faults(cgroup, epoch),
        ) {
            self.count(&mut period, faults);
        }
        if let Some(node) = period.start.node()
            && let Some(pages) = self.bpf(
                "read copy-on-write faults",
                self.faults.pages(cgroup, epoch),
            )
        {
            let mut learned: HashMap<String, Vec<u64>> = period.warmed.clone();
            for p in pages {
                let Some(session) = period.pids.get(&p.tgid) else {
                    continue;
                };
                let set = learned.entry(session.clone()).or_default();
                set.extend(p.pages);
                set.sort_unstable();
                set.dedup();
            }
            let mut state = self.lock();
            for (session, pages) in learned {
                state.learned.insert((node.to_owned(), session), pages);
            }
        }
        let read = start.elapsed();
        self.bpf(
            "drop an old epoch's counters",
            self.faults.drop_before(cgroup, next_epoch),
        );
        tracing::debug!(
            cgroup,
            epoch,
            read_ms = read.as_secs_f64() * 1e3,
            total_ms = start.elapsed().as_secs_f64() * 1e3,
            "copy-on-write period harvested"
        );
    }

    fn warm_up(&self, sandbox: &str, epoch: u64, node: &str, sessions: &[(String, i32)]) {
        let start = Instant::now();
        let mut pages = 0;
        let mut warmed = HashMap::new();
        for (session, pid) in sessions {
            let set = self
                .lock()
                .learned
                .sets
                .get(&(node.to_owned(), session.clone()))
                .cloned();
            let Some(set) = set else {
                continue;
            };
            match warmup::prefault(Pid::from_raw(*pid), &set) {
                Ok(report) => {
                    tracing::debug!(
                        sandbox,
                        session = session.as_str(),
                        pages = report.pages,
                        ranges = report.ranges,
                        ms = report.duration.as_secs_f64() * 1e3,
                        "warm-up: pre-faulted"
                    );
                    pages += report.pages;
                    if report.failed_ranges > 0 {
                        tracing::debug!(
                            sandbox,
                            session = session.as_str(),
                            failed = report.failed_ranges,
                            "warm-up: ranges the kernel refused"
                        );
                    }
                    warmed.insert(session.clone(), set);
                }
                Err(e) => tracing::warn!(
                    sandbox,
                    session = session.as_str(),
                    pid,
                    "warm-up failed: {e}"
                ),
            }
        }
        self.metrics
            .warm_up_seconds
            .observe(start.elapsed().as_secs_f64());
        self.metrics.warm_up_pages.observe(pages as f64);
        if let Some(period) = self.lock().periods.get_mut(sandbox)
            && period.epoch == epoch
        {
            period.warmed_pages = pages;
            period.warmed = warmed;
        }
    }
}
