//! What each sandbox dirtied since its last checkpoint, from the eBPF write tracker, and
//! what each checkpoint made the store write.
//!
//! [`DirtyTracking`] wraps the sandbox operations the API serves: it has the tracker
//! watch each sandbox's `work/` cgroup (cgroup v2: what `bpf_get_current_cgroup_id`
//! sees for its commands and sessions) from its creation or branch, advances that
//! cgroup's epoch after each checkpoint (explicit or automatic) and each rollback of its
//! files, so the tracker's current epoch is "since the last checkpoint", and stops
//! watching it when the sandbox is removed. Sandboxes it has not seen created (taken
//! over from an earlier daemon) are watched when first reported.
//!
//! The epoch advances right after the operation returns, not at its freeze instant (the
//! manager does not know the tracker): a process left running in the background of the
//! sandbox that writes in between has those writes counted in neither epoch.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError, mpsc};

use super::cow::CowTracking;
use super::state::{StateFigures, StateSource};
use super::{Metrics, gauge_value};
use crate::api::sandbox_types::{
    BranchRequest, BranchResult, CheckpointRequest, CreateSandbox, DiffResult, ExecRequest,
    ExecResult, GcResult, NodeInfo, Removed, RollbackMode, RollbackRequest, RollbackResult,
    SandboxInfo, SessionInfo, SessionRun, SessionRunResult, SessionStart, TreeView,
};
use crate::api::service::ServedSandboxes;
use crate::bpf::WriteTracker;
use crate::cgroup::{Cgroup, CgroupFs};
use crate::sandbox::ops::ExecSink;
use crate::sandbox::{SandboxError, SandboxOps};

/// Page size the dirtied-bytes figures count in (the tracker counts folios as they turn
/// dirty; one per 4 KiB page for writes of a page or less).
pub const PAGE_SIZE: u64 = 4096;

pub use deltabox_client::sandbox_types::SandboxDirty;

/// The sandbox operations, with their cgroups watched and their epochs advanced (see the
/// module's documentation).
pub struct DirtyTracking {
    inner: Arc<dyn ServedSandboxes>,
    tracker: Arc<dyn WriteTracker>,
    cgroups: CgroupFs,
    metrics: Metrics,
    /// Sandbox id to its watched `work/` cgroup.
    watched: Mutex<HashMap<String, Cgroup>>,
    /// Copy-on-write faults and the warm-up, when the daemon counts them.
    cow: Option<Arc<CowTracking>>,
    /// Work done after the answer on one long-lived thread (`None` if it could not
    /// start: then it is done inline).
    later: Option<LaterThread>,
}

/// The thread of [`Later`] jobs. It holds the sandbox operations (the manager), so it
/// is joined when its [`DirtyTracking`] is dropped: the manager's own drop (the clean
/// stop that ends every tree) then runs on the dropping thread, never on this one
/// while the daemon's main thread returns and the process exits under it.
struct LaterThread {
    jobs: Option<mpsc::Sender<Later>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for DirtyTracking {
    fn drop(&mut self) {
        if let Some(later) = &mut self.later {
            // Closing the channel ends the thread's loop.
            drop(later.jobs.take());
            if let Some(thread) = later.thread.take()
                && thread.join().is_err()
            {
                tracing::warn!("the thread of after-answer work panicked");
            }
        }
    }
}

/// What [`DirtyTracking`] leaves to its thread, off the answer's path.
enum Later {
    /// Drop the counters of earlier epochs of this cgroup.
    DropStale(u64),
    /// Observe what the checkpoint that made this node wrote to the store (a read of
    /// the tree database and a walk of the new layer: 0.2-0.8 ms, timed in
    /// `checkpointed`, release build).
    CheckpointWrites(String),
}

impl DirtyTracking {
    /// Wraps `inner`.
    pub fn new(
        inner: Arc<dyn ServedSandboxes>,
        tracker: Arc<dyn WriteTracker>,
        cgroups: CgroupFs,
        metrics: Metrics,
    ) -> Self {
        let later = start_later(Arc::clone(&inner), Arc::clone(&tracker), metrics.clone());
        Self {
            inner,
            tracker,
            cgroups,
            metrics,
            watched: Mutex::new(HashMap::new()),
            cow: None,
            later,
        }
    }

    /// Also counts each sandbox's copy-on-write faults and warms rollbacks up with
    /// `cow`; every operation on a sandbox then waits for its pending warm-up first.
    #[must_use]
    pub fn with_cow(mut self, cow: Arc<CowTracking>) -> Self {
        self.cow = Some(cow);
        self
    }

    /// Waits for sandbox `sandbox`'s pending warm-up, if any.
    fn settle(&self, sandbox: &str) {
        if let Some(cow) = &self.cow {
            cow.wait_warm_up(sandbox);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Cgroup>> {
        // A cache of what is watched: a panic mid-insert leaves nothing inconsistent.
        self.watched.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Watches sandbox `id`'s cgroup unless it is already; its cgroup, if it has one.
    fn track(&self, id: &str) -> Option<Cgroup> {
        if let Some(cgroup) = self.lock().get(id) {
            return Some(cgroup.clone());
        }
        let path = self.inner.work_cgroup(id)?;
        let cgroup = match self.cgroups.resolve(&path) {
            Ok(cgroup) => cgroup,
            Err(e) => {
                tracing::warn!(sandbox = id, "its cgroup {}: {e}", path.display());
                return None;
            }
        };
        // Apart from the write tracker: one failing leaves the other counting.
        if let Some(cow) = &self.cow {
            cow.track(id, cgroup.id, &[]);
        }
        if let Err(e) = self.tracker.watch(cgroup.id) {
            self.metrics.tracker_error("watch a cgroup");
            tracing::warn!(sandbox = id, "watching its cgroup: {e}");
            return None;
        }
        self.lock().insert(id.to_owned(), cgroup.clone());
        Some(cgroup)
    }

    /// Starts a new epoch for sandbox `id` (its dirty figures restart from zero).
    /// Advances sandbox `id`'s epoch now, then has the old epoch's counters dropped on
    /// the long-lived thread of [`start_later`] (after the operation is answered):
    /// that walks the whole stats map, about 2.5 ms of every checkpoint's round trip
    /// when it was done inline (`cargo xtask bench sandbox`), and spawning a thread for
    /// it each time cost 0.1–3 ms of the answer (timed in `checkpointed`, release
    /// build, idle machine).
    fn new_epoch(&self, id: &str) {
        let Some(cgroup) = self.track(id) else {
            return;
        };
        if let Err(e) = self.tracker.advance_epoch(cgroup.id) {
            self.metrics.tracker_error("advance an epoch");
            tracing::warn!(sandbox = id, "advancing its epoch: {e}");
        }
        self.later(Later::DropStale(cgroup.id));
    }

    /// Has `job` done on the thread, or now if it is not running.
    fn later(&self, job: Later) {
        let job = match self.later.as_ref().and_then(|l| l.jobs.as_ref()) {
            Some(tx) => match tx.send(job) {
                Ok(()) => return,
                Err(mpsc::SendError(job)) => job,
            },
            None => job,
        };
        run_later(
            self.inner.as_ref(),
            self.tracker.as_ref(),
            &self.metrics,
            job,
        );
    }

    /// After a checkpoint made `node`: a new epoch, and what it made the store write.
    fn checkpointed(&self, node: &NodeInfo) {
        self.new_epoch(&node.sandbox);
        if let Some(cow) = &self.cow {
            cow.checkpointed(&node.sandbox, &node.id);
        }
        self.later(Later::CheckpointWrites(node.id.clone()));
    }

    fn untrack(&self, id: &str) {
        if let Some(cow) = &self.cow {
            cow.untrack(id);
        }
        let Some(cgroup) = self.lock().remove(id) else {
            return;
        };
        if let Err(e) = self.tracker.unwatch(cgroup.id) {
            self.metrics.tracker_error("unwatch a cgroup");
            tracing::warn!(sandbox = id, "unwatching its cgroup: {e}");
        }
    }

    /// What sandbox `id` (a full id) dirtied since its last checkpoint, for a sandbox's
    /// own answer; `None` if it is not watched or the tracker cannot be read.
    pub fn dirty_of(&self, id: &str) -> Option<SandboxDirty> {
        self.dirty().ok()?.into_iter().find(|d| d.sandbox == id)
    }

    /// The `work/` cgroup ids of the sandboxes watched (their figures are reported per
    /// sandbox, not as labelled cgroup series).
    pub fn cgroup_ids(&self) -> HashSet<u64> {
        self.lock().values().map(|c| c.id).collect()
    }

    /// What each live sandbox dirtied since its last checkpoint, sorted by sandbox id.
    /// Waits for no sandbox (a scrape must not wait for a long `exec`): one that an
    /// operation holds and that is not watched yet is left out this time.
    pub fn dirty(&self) -> Result<Vec<SandboxDirty>, SandboxError> {
        let mut ids: Vec<String> = self.lock().keys().cloned().collect();
        ids.extend(self.inner.sandbox_ids());
        ids.sort_unstable();
        ids.dedup();
        let mut by_cgroup: BTreeMap<u64, SandboxDirty> = BTreeMap::new();
        for id in ids {
            if let Some(cgroup) = self.track(&id) {
                by_cgroup.insert(
                    cgroup.id,
                    SandboxDirty {
                        sandbox: id,
                        cgroup: cgroup.path.display().to_string(),
                        ..SandboxDirty::default()
                    },
                );
            }
        }
        let epochs = self.tracker.watched().map_err(|e| {
            self.metrics.tracker_error("list watched cgroups");
            SandboxError::internal("the write tracker", e)
        })?;
        for (id, epoch) in epochs {
            if let Some(d) = by_cgroup.get_mut(&id) {
                d.epoch = epoch;
            }
        }
        let records = self.tracker.inode_stats(None).map_err(|e| {
            self.metrics.tracker_error("read inode stats");
            SandboxError::internal("the write tracker", e)
        })?;
        for r in records {
            if let Some(d) = by_cgroup.get_mut(&r.cgroup_id) {
                d.pages_dirtied += r.pages_dirtied;
                d.bytes_dirtied += r.pages_dirtied * PAGE_SIZE;
                d.writes += r.writes;
                d.bytes_written += r.bytes;
                d.inodes += 1;
            }
        }
        let mut out: Vec<SandboxDirty> = by_cgroup.into_values().collect();
        if let Some(cow) = &self.cow {
            for d in &mut out {
                let figures = cow.figures(&d.sandbox).unwrap_or_default();
                d.cow_faults = figures.cow_faults;
                d.warmed_up_pages = figures.warmed_up_pages;
            }
        }
        out.sort_by(|a, b| a.sandbox.cmp(&b.sandbox));
        Ok(out)
    }
}

impl Metrics {
    /// Sets the sandbox totals of what was dirtied since each one's last checkpoint.
    pub fn set_sandbox_dirty(&self, dirty: &[SandboxDirty]) {
        let pages: u64 = dirty.iter().map(|d| d.pages_dirtied).sum();
        self.sandbox_dirtied_pages.set(gauge_value(pages));
        self.sandbox_dirtied_bytes
            .set(gauge_value(pages.saturating_mul(PAGE_SIZE)));
    }
}

impl StateSource for DirtyTracking {
    fn state_figures(&self) -> Result<StateFigures, SandboxError> {
        self.inner.state_figures()
    }

    fn work_cgroup(&self, sandbox: &str) -> Option<PathBuf> {
        self.inner.work_cgroup(sandbox)
    }

    fn sandbox_ids(&self) -> Vec<String> {
        self.inner.sandbox_ids()
    }

    fn deltafs_stats(&self) -> Option<deltafs::StatsSnapshot> {
        self.inner.deltafs_stats()
    }

    fn pool_figures(&self) -> Option<super::pool::PoolFigures> {
        self.inner.pool_figures()
    }

    fn checkpoint_writes(&self, node: &str) -> Option<deltafs::SnapshotWrites> {
        self.inner.checkpoint_writes(node)
    }
}

/// Starts the thread that does [`Later`] jobs in order; it ends when its
/// [`DirtyTracking`] is dropped.
fn start_later(
    inner: Arc<dyn ServedSandboxes>,
    tracker: Arc<dyn WriteTracker>,
    metrics: Metrics,
) -> Option<LaterThread> {
    let (tx, rx) = mpsc::channel::<Later>();
    let spawned = std::thread::Builder::new()
        .name("dirty-later".into())
        .spawn(move || {
            for job in rx {
                // After the operation's answer (and the client's next request): a
                // stale-counter drop walks the whole stats map in the kernel (~0.8 ms).
                crate::foreground::yield_to_operations(crate::foreground::BACKGROUND_WAIT);
                run_later(inner.as_ref(), tracker.as_ref(), &metrics, job);
            }
        });
    match spawned {
        Ok(thread) => Some(LaterThread {
            jobs: Some(tx),
            thread: Some(thread),
        }),
        Err(e) => {
            tracing::warn!("cannot start the thread of after-answer work: {e}");
            None
        }
    }
}

fn run_later(
    inner: &dyn ServedSandboxes,
    tracker: &dyn WriteTracker,
    metrics: &Metrics,
    job: Later,
) {
    match job {
        Later::DropStale(cgroup) => drop_stale(tracker, metrics, cgroup),
        Later::CheckpointWrites(node) => {
            if let Some(written) = inner.checkpoint_writes(&node) {
                metrics
                    .checkpoint_written_bytes
                    .observe(written.total_bytes() as f64);
            }
        }
    }
}

/// Drops cgroup `cgroup`'s counters of earlier epochs.
fn drop_stale(tracker: &dyn WriteTracker, metrics: &Metrics, cgroup: u64) {
    if let Err(e) = tracker.drop_stale_stats(cgroup) {
        metrics.tracker_error("drop an old epoch's counters");
        tracing::warn!(cgroup, "dropping its old counters: {e}");
    }
}

impl SandboxOps for DirtyTracking {
    fn create(&self, req: &CreateSandbox) -> Result<SandboxInfo, SandboxError> {
        let info = self.inner.create(req)?;
        self.track(&info.id);
        Ok(info)
    }

    fn list(&self) -> Result<Vec<SandboxInfo>, SandboxError> {
        self.inner.list()
    }

    fn get(&self, sandbox: &str) -> Result<SandboxInfo, SandboxError> {
        let mut info = self.inner.get(sandbox)?;
        info.dirty = self.dirty_of(&info.id);
        Ok(info)
    }

    fn remove(&self, sandbox: &str) -> Result<Removed, SandboxError> {
        self.settle(sandbox);
        let removed = self.inner.remove(sandbox)?;
        for id in &removed.sandboxes {
            self.untrack(id);
        }
        Ok(removed)
    }

    fn exec(&self, sandbox: &str, req: &ExecRequest) -> Result<ExecResult, SandboxError> {
        self.settle(sandbox);
        let result = self.inner.exec(sandbox, req)?;
        if let Some(node) = &result.node {
            self.checkpointed(node);
        }
        Ok(result)
    }

    fn exec_streamed(
        &self,
        sandbox: &str,
        req: &ExecRequest,
        sink: &mut dyn ExecSink,
    ) -> Result<ExecResult, SandboxError> {
        self.settle(sandbox);
        let result = self.inner.exec_streamed(sandbox, req, sink)?;
        if let Some(node) = &result.node {
            self.checkpointed(node);
        }
        Ok(result)
    }

    fn session_start(
        &self,
        sandbox: &str,
        req: &SessionStart,
    ) -> Result<SessionInfo, SandboxError> {
        self.settle(sandbox);
        let info = self.inner.session_start(sandbox, req)?;
        if let Some(cow) = &self.cow {
            cow.session_started(sandbox, &info);
        }
        Ok(info)
    }

    fn session_run(
        &self,
        sandbox: &str,
        session: &str,
        req: &SessionRun,
    ) -> Result<SessionRunResult, SandboxError> {
        self.settle(sandbox);
        let result = self.inner.session_run(sandbox, session, req)?;
        if let Some(node) = &result.node {
            self.checkpointed(node);
        }
        Ok(result)
    }

    fn session_stop(&self, sandbox: &str, session: &str) -> Result<SessionInfo, SandboxError> {
        self.settle(sandbox);
        self.inner.session_stop(sandbox, session)
    }

    fn checkpoint(&self, sandbox: &str, req: &CheckpointRequest) -> Result<NodeInfo, SandboxError> {
        self.settle(sandbox);
        let node = self.inner.checkpoint(sandbox, req)?;
        self.checkpointed(&node);
        Ok(node)
    }

    fn rollback(
        &self,
        sandbox: &str,
        req: &RollbackRequest,
    ) -> Result<RollbackResult, SandboxError> {
        self.settle(sandbox);
        let mut rolled = self.inner.rollback(sandbox, req)?;
        // The files are the node's again: nothing is dirty relative to it.
        if rolled.mode != RollbackMode::ProcessesOnly {
            self.new_epoch(&rolled.sandbox);
        }
        if let Some(cow) = &self.cow {
            rolled.warm_up = cow.rolled_back(&rolled, req.warm_up);
        }
        Ok(rolled)
    }

    fn branch(&self, node: &str, req: &BranchRequest) -> Result<BranchResult, SandboxError> {
        let branched = self.inner.branch(node, req)?;
        for sandbox in &branched.sandboxes {
            self.track(&sandbox.id);
            if let Some(cow) = &self.cow {
                for session in &sandbox.sessions {
                    cow.session_started(&sandbox.id, session);
                }
            }
        }
        Ok(branched)
    }

    fn tree(&self, sandbox_or_node: &str) -> Result<TreeView, SandboxError> {
        self.inner.tree(sandbox_or_node)
    }

    fn diff(&self, from: &str, to: &str) -> Result<DiffResult, SandboxError> {
        self.inner.diff(from, to)
    }

    fn remove_node(&self, node: &str) -> Result<Removed, SandboxError> {
        self.inner.remove_node(node)
    }

    fn gc(&self) -> Result<GcResult, SandboxError> {
        self.inner.gc()
    }
}
