//! Copy-on-write faults taken by each sandbox after its checkpoints and rollbacks (from
//! the eBPF fault counter), and the warm-up pass that pre-faults them after a rollback.
//!
//! A sandbox's life is cut into *periods* at each checkpoint and each rollback that
//! restores its processes; each period is one fault epoch of the sandbox's `work/`
//! cgroup and starts from a node (the one checkpointed or rolled back to). When a
//! period ends, a background worker reads which pages each session process faulted on
//! and keeps them as "what this session wrote after that node last time". After a
//! rollback to a node with `warm_up`, the same worker pre-faults those pages in the
//! restored session processes ([`crate::cr::warmup::prefault`]).
//!
//! **Off the critical path**, exactly: the rollback answers as soon as the processes
//! are restored; the warm-up runs after, on the worker; the next operation on that
//! sandbox (a command, a session, a checkpoint, a rollback, its removal) waits until
//! the warm-up is done ([`CowTracking::wait_warm_up`]). An agent that thinks between a
//! rollback and its next command hides the warm-up entirely; one that sends its next
//! command at once pays it there instead of in page faults spread over the command.
//!
//! A period that was warmed up cannot tell which of the pre-faulted pages it wrote (they
//! no longer fault): what it learns is the pages it warmed plus those it faulted on.
//! `deltabox_cow_faults_total{warm_up}` counts the faults of periods started by a
//! rollback, labelled by whether that rollback warmed up; it is brought up to date at
//! each scrape and when the period ends.

mod worker;

use std::collections::HashMap;
use std::panic::{self, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, PoisonError, mpsc};

use serde::{Deserialize, Serialize};

use self::worker::{Job, Shared, State};
use super::Metrics;
use crate::api::sandbox_types::{RollbackMode, RollbackResult, SessionInfo};
use crate::bpf::CowFaultCounter;

/// A sandbox's copy-on-write figures (`GET /v1/stats`, `GET /v1/sandboxes/{id}`, in its
/// `dirty` figures).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CowFigures {
    /// Copy-on-write faults its processes took since its last checkpoint or rollback.
    pub cow_faults: u64,
    /// Pages the warm-up after its last rollback pre-faulted (0 without a warm-up).
    pub warmed_up_pages: u64,
}

/// What started a period.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Start {
    /// The sandbox's creation, a branch, or a daemon restart: no node to learn for.
    Unknown,
    /// A checkpoint made this node.
    Checkpoint(String),
    /// A rollback to this node, warmed up or not.
    Rollback { node: String, warm_up: bool },
}

impl Start {
    fn node(&self) -> Option<&str> {
        match self {
            Start::Unknown => None,
            Start::Checkpoint(node) | Start::Rollback { node, .. } => Some(node),
        }
    }
}

/// One fault epoch of a sandbox.
#[derive(Clone, Debug)]
struct Period {
    cgroup: u64,
    epoch: u64,
    start: Start,
    /// Session processes (tgid) to their session ids.
    pids: HashMap<u32, String>,
    /// Faults already added to `deltabox_cow_faults_total`.
    counted: u64,
    /// Per session, the pages the warm-up pre-faulted at its start.
    warmed: HashMap<String, Vec<u64>>,
    warmed_pages: u64,
}

/// The fault periods of the sandboxes, their learned pages, and the warm-up worker.
pub struct CowTracking {
    shared: Arc<Shared>,
    default_warm_up: bool,
    jobs: Mutex<mpsc::Sender<Job>>,
}

impl CowTracking {
    /// Counts with `faults`, into `metrics`; `default_warm_up` is what a rollback that
    /// does not say does (`deltaboxd serve --warm-up`).
    pub fn new(faults: Arc<dyn CowFaultCounter>, metrics: Metrics, default_warm_up: bool) -> Self {
        let shared = Arc::new(Shared {
            faults,
            metrics,
            state: Mutex::new(State::default()),
            warmed: Condvar::new(),
        });
        let (tx, rx) = mpsc::channel();
        let worker = Arc::clone(&shared);
        let spawned = std::thread::Builder::new()
            .name("cow-warm-up".into())
            .spawn(move || {
                for job in rx {
                    // A panic must not end the worker: the sandboxes waiting for a
                    // warm-up would wait for ever. `run` marks its warm-up done itself.
                    let ran = panic::catch_unwind(AssertUnwindSafe(|| worker.run(job)));
                    if ran.is_err() {
                        tracing::error!("the warm-up worker's job panicked");
                    }
                }
            });
        if let Err(e) = spawned {
            // Jobs then fail to send and are dropped: no warm-up, no learning.
            tracing::warn!("cannot start the warm-up worker: {e}");
        }
        Self {
            shared,
            default_warm_up,
            jobs: Mutex::new(tx),
        }
    }

    /// Whether rollbacks warm up unless they say otherwise.
    pub fn default_warm_up(&self) -> bool {
        self.default_warm_up
    }

    fn send(&self, job: Job) -> bool {
        let jobs = self.jobs.lock().unwrap_or_else(PoisonError::into_inner);
        jobs.send(job).is_ok()
    }

    /// Starts counting sandbox `sandbox`'s faults in its cgroup `cgroup` (nothing if it
    /// is counted already), with `sessions` as its processes.
    pub fn track(&self, sandbox: &str, cgroup: u64, sessions: &[SessionInfo]) {
        if self.shared.lock().periods.contains_key(sandbox) {
            return;
        }
        let Some(epoch) = self
            .shared
            .bpf("watch a cgroup", self.shared.faults.watch(cgroup))
        else {
            return;
        };
        let period = Period {
            cgroup,
            epoch,
            start: Start::Unknown,
            pids: pids_of(sessions),
            counted: 0,
            warmed: HashMap::new(),
            warmed_pages: 0,
        };
        self.shared
            .lock()
            .periods
            .insert(sandbox.to_owned(), period);
    }

    /// Stops counting a removed sandbox.
    pub fn untrack(&self, sandbox: &str) {
        let Some(period) = self.shared.lock().periods.remove(sandbox) else {
            return;
        };
        self.shared.bpf(
            "unwatch a cgroup",
            self.shared.faults.unwatch(period.cgroup),
        );
    }

    /// A session started in `sandbox` (a full id or the prefix of one only): its
    /// faults are learned from now on.
    pub fn session_started(&self, sandbox: &str, session: &SessionInfo) {
        let mut state = self.shared.lock();
        let mut matching = state
            .periods
            .iter_mut()
            .filter(|(id, _)| id.starts_with(sandbox));
        if let (Some((_, period)), None) = (matching.next(), matching.next())
            && let Ok(pid) = u32::try_from(session.pid)
        {
            period.pids.insert(pid, session.id.clone());
        }
    }

    /// Ends the sandbox's period and starts one from `start` with the processes `pids`
    /// (the current ones when `None`); the old period is harvested on the worker.
    /// Returns the new period's epoch, `None` if the sandbox is not counted.
    fn boundary(
        &self,
        sandbox: &str,
        start: Start,
        pids: Option<HashMap<u32, String>>,
    ) -> Option<u64> {
        let mut state = self.shared.lock();
        let period = state.periods.get_mut(sandbox)?;
        let next_epoch = self.shared.bpf(
            "advance an epoch",
            self.shared.faults.advance_epoch(period.cgroup),
        )?;
        let pids = pids.unwrap_or_else(|| period.pids.clone());
        let ended = std::mem::replace(
            period,
            Period {
                cgroup: period.cgroup,
                epoch: next_epoch,
                start,
                pids,
                counted: 0,
                warmed: HashMap::new(),
                warmed_pages: 0,
            },
        );
        drop(state);
        self.send(Job::Harvest {
            period: ended,
            next_epoch,
        });
        Some(next_epoch)
    }

    /// A checkpoint of `sandbox` made `node`.
    pub fn checkpointed(&self, sandbox: &str, node: &str) {
        let _ = self.boundary(sandbox, Start::Checkpoint(node.to_owned()), None);
    }

    /// A rollback happened; with `warm_up` (`None`: the daemon's default) the warm-up
    /// of its restored sessions is queued. Returns whether it was.
    pub fn rolled_back(&self, rolled: &RollbackResult, warm_up: Option<bool>) -> bool {
        if rolled.mode == RollbackMode::FilesOnly {
            // The processes run on: the period goes on.
            return false;
        }
        let warm_up = warm_up.unwrap_or(self.default_warm_up);
        let start = Start::Rollback {
            node: rolled.node.clone(),
            warm_up,
        };
        let epoch = self.boundary(&rolled.sandbox, start, Some(pids_of(&rolled.sessions)));
        let Some(epoch) = epoch.filter(|_| warm_up) else {
            return false;
        };
        *self
            .shared
            .lock()
            .warming
            .entry(rolled.sandbox.clone())
            .or_default() += 1;
        let sessions = rolled
            .sessions
            .iter()
            .map(|s| (s.id.clone(), s.pid))
            .collect();
        let queued = self.send(Job::WarmUp {
            sandbox: rolled.sandbox.clone(),
            epoch,
            node: rolled.node.clone(),
            sessions,
        });
        if !queued {
            self.shared.done_warming(&rolled.sandbox);
        }
        queued
    }

    /// Waits until no warm-up is queued or running for `sandbox` (a full id or a
    /// prefix of one; every sandbox it may name is waited for).
    pub fn wait_warm_up(&self, sandbox: &str) {
        let state = self.shared.lock();
        let _done = self
            .shared
            .warmed
            .wait_while(state, |s| s.warming.keys().any(|k| k.starts_with(sandbox)))
            .unwrap_or_else(PoisonError::into_inner);
    }

    /// Waits until the worker has done every job queued so far (warm-ups, and the
    /// counting and learning of ended periods).
    pub fn wait_idle(&self) {
        let (tx, rx) = mpsc::channel();
        if self.send(Job::Barrier(tx)) {
            let _ = rx.recv();
        }
    }

    /// The sandbox's figures now (one map read), bringing `deltabox_cow_faults_total`
    /// up to date; `None` if its faults are not counted.
    pub fn figures(&self, sandbox: &str) -> Option<CowFigures> {
        let (cgroup, epoch) = {
            let state = self.shared.lock();
            let p = state.periods.get(sandbox)?;
            (p.cgroup, p.epoch)
        };
        let faults = self.shared.bpf(
            "read copy-on-write faults",
            self.shared.faults.faults(cgroup, epoch),
        )?;
        let mut state = self.shared.lock();
        let period = state.periods.get_mut(sandbox)?;
        if period.epoch != epoch {
            // A boundary came in between: the harvest counts the old period.
            return None;
        }
        self.shared.count(period, faults);
        Some(CowFigures {
            cow_faults: faults,
            warmed_up_pages: period.warmed_pages,
        })
    }
}

fn pids_of(sessions: &[SessionInfo]) -> HashMap<u32, String> {
    sessions
        .iter()
        .filter_map(|s| Some((u32::try_from(s.pid).ok()?, s.id.clone())))
        .collect()
}

#[cfg(test)]
mod tests;
