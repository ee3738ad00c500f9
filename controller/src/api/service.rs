//! What each endpoint does, synchronous and free of HTTP: the server runs these on
//! tokio's blocking pool (map reads are syscalls, the id-to-path walk reads the cgroup
//! tree), and tests call them directly.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::bpf::{BpfError, CowFaultCounter, Origin, WriteTracker};
use crate::cgroup::{Cgroup, CgroupFs, unknown_cgroup};
use crate::metrics::cow::CowTracking;
use crate::metrics::dirty::DirtyTracking;
use crate::metrics::fs_stats::DeltaFsFigures;
use crate::metrics::latency::WINDOW;
use crate::metrics::state::{StateFigures, StateSource};
use crate::metrics::stats::StatsResponse;
use crate::metrics::{CgroupFigures, Metrics};
use crate::sandbox::SandboxOps;

use super::ApiError;
use super::types::{
    BpfStatus, CgroupRequest, CgroupsResponse, InodeStat, InodeStatsQuery, InodeStatsResponse,
    StatusResponse, WatchedCgroup,
};

/// How long an id whose directory was not found is not searched for again: a removed
/// but still watched cgroup would otherwise cost a tree walk on every request.
const UNKNOWN_PATH_TTL: Duration = Duration::from_secs(30);

/// Facts about the running daemon that `GET /v1/status` reports.
#[derive(Clone, Debug)]
pub struct DaemonInfo {
    /// The API's Unix socket.
    pub socket: PathBuf,
    /// The bound metrics address.
    pub metrics_addr: String,
    /// Where the eBPF objects are pinned.
    pub pin_dir: PathBuf,
    /// Whether the programs were loaded or adopted.
    pub origin: Origin,
    /// When the daemon started.
    pub started: Instant,
}

/// What the service needs of sandboxes: their operations, and their costs for the
/// metrics and `GET /v1/stats` (the sandbox manager is both).
pub trait ServedSandboxes: SandboxOps + StateSource {}

impl<T: SandboxOps + StateSource> ServedSandboxes for T {}

/// A cached id-to-path lookup.
#[derive(Clone, Debug)]
enum KnownPath {
    Found(PathBuf),
    Missing { since: Instant },
}

/// The API's state and operations.
pub struct ApiService {
    tracker: Arc<dyn WriteTracker>,
    cgroups: CgroupFs,
    metrics: Metrics,
    info: DaemonInfo,
    /// cgroup id to directory, for ids this daemon resolved or found by a walk.
    paths: Mutex<HashMap<u64, KnownPath>>,
    /// The sandbox endpoints' implementation, watching each sandbox's cgroup; without
    /// it they answer 503.
    sandboxes: Option<Arc<DirtyTracking>>,
    /// Copy-on-write fault counting and the warm-up, given to the sandbox endpoints.
    cow: Option<Arc<CowTracking>>,
}

impl ApiService {
    /// A service over `tracker`, resolving paths on `cgroups`, counting into `metrics`.
    pub fn new(
        tracker: Arc<dyn WriteTracker>,
        cgroups: CgroupFs,
        metrics: Metrics,
        info: DaemonInfo,
    ) -> Self {
        Self {
            tracker,
            cgroups,
            metrics,
            info,
            paths: Mutex::new(HashMap::new()),
            sandboxes: None,
            cow: None,
        }
    }

    /// This service counting the sandboxes' copy-on-write faults with `faults` and
    /// warming rollbacks up (by default if `warm_up`); call it before
    /// [`Self::with_sandboxes`], which hands it to the sandbox endpoints.
    #[must_use]
    pub fn with_cow_faults(mut self, faults: Arc<dyn CowFaultCounter>, warm_up: bool) -> Self {
        self.cow = Some(Arc::new(CowTracking::new(
            faults,
            self.metrics.clone(),
            warm_up,
        )));
        self
    }

    /// This service with the sandbox endpoints served by `ops` (without it they answer
    /// 503 `sandboxes_disabled`).
    #[must_use]
    pub fn with_sandboxes(mut self, ops: Arc<dyn ServedSandboxes>) -> Self {
        let mut tracking = DirtyTracking::new(
            ops,
            Arc::clone(&self.tracker),
            self.cgroups.clone(),
            self.metrics.clone(),
        );
        if let Some(cow) = &self.cow {
            tracking = tracking.with_cow(Arc::clone(cow));
        }
        self.sandboxes = Some(Arc::new(tracking));
        self
    }

    /// The copy-on-write fault counting and warm-up, if the service has them.
    pub fn cow(&self) -> Option<&Arc<CowTracking>> {
        self.cow.as_ref()
    }

    /// The sandbox operations, or the error the sandbox endpoints answer without them.
    pub fn sandboxes(&self) -> Result<&dyn SandboxOps, ApiError> {
        match self.sandboxes.as_deref() {
            Some(ops) => Ok(ops),
            None => Err(ApiError::SandboxesDisabled),
        }
    }

    /// `GET /v1/stats`: latency since start and, with sandboxes, what they cost now
    /// (measured for this answer, which also refreshes the state gauges).
    pub fn stats(&self) -> Result<StatsResponse, ApiError> {
        let (state, pool, deltafs, dirty) = match &self.sandboxes {
            Some(source) => {
                let state = self.measure_state(source.as_ref())?;
                let pool = source.pool_figures();
                if let Some(p) = &pool {
                    self.metrics.set_pool(p);
                }
                let deltafs = source.deltafs_stats().map(|s| {
                    self.metrics.set_deltafs(&s);
                    DeltaFsFigures::of(&s)
                });
                // Without the tracker the rest of the stats still answer.
                let dirty = source.dirty().unwrap_or_else(|err| {
                    tracing::warn!("cannot read the sandboxes' dirty pages: {err}");
                    Vec::new()
                });
                self.metrics.set_sandbox_dirty(&dirty);
                (Some(state), pool, deltafs, dirty)
            }
            None => (None, None, None, Vec::new()),
        };
        Ok(StatsResponse {
            uptime_secs: self.info.started.elapsed().as_secs(),
            window: WINDOW,
            operations: self.metrics.latency().summary(),
            state,
            pool,
            deltafs,
            dirty,
        })
    }

    /// Measures the sandboxes' costs and sets their gauges.
    fn measure_state(&self, source: &DirtyTracking) -> Result<StateFigures, ApiError> {
        let figures = source.state_figures()?;
        self.metrics.set_state(&figures);
        Ok(figures)
    }

    /// The metrics this service updates.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// `GET /v1/status`.
    pub fn status(&self) -> Result<StatusResponse, ApiError> {
        let programs = self.bpf("list attached programs", self.tracker.attached())?;
        let counters = self.bpf("read counters", self.tracker.counters())?;
        Ok(StatusResponse {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
            uptime_secs: self.info.started.elapsed().as_secs(),
            socket: self.info.socket.clone(),
            metrics_addr: self.info.metrics_addr.clone(),
            bpf: BpfStatus {
                pin_dir: self.info.pin_dir.clone(),
                origin: self.info.origin,
                programs,
            },
            watched: self.watched()?,
            counters,
        })
    }

    /// `GET /v1/cgroups`.
    pub fn cgroups(&self) -> Result<CgroupsResponse, ApiError> {
        Ok(CgroupsResponse {
            watched: self.watched()?,
        })
    }

    /// `POST /v1/cgroups/watch`.
    pub fn watch(&self, req: &CgroupRequest) -> Result<WatchedCgroup, ApiError> {
        let cgroup = self.cgroups.resolve(&req.path)?;
        let epoch = self.bpf("watch a cgroup", self.tracker.watch(cgroup.id))?;
        self.remember(&cgroup);
        tracing::info!(cgroup = %cgroup.path.display(), id = cgroup.id, epoch, "watching");
        Ok(watched_cgroup(&cgroup, epoch))
    }

    /// `POST /v1/cgroups/unwatch`.
    pub fn unwatch(&self, req: &CgroupRequest) -> Result<WatchedCgroup, ApiError> {
        let cgroup = self.cgroups.resolve(&req.path)?;
        let epoch = self.epoch_of(&cgroup)?;
        if !self.bpf("unwatch a cgroup", self.tracker.unwatch(cgroup.id))? {
            // Unwatched by someone else between the two calls.
            return Err(not_watched(&cgroup));
        }
        self.forget(cgroup.id);
        tracing::info!(cgroup = %cgroup.path.display(), id = cgroup.id, "unwatched");
        Ok(watched_cgroup(&cgroup, epoch))
    }

    /// `POST /v1/cgroups/epoch`.
    pub fn advance_epoch(&self, req: &CgroupRequest) -> Result<WatchedCgroup, ApiError> {
        let cgroup = self.cgroups.resolve(&req.path)?;
        let epoch = match self.tracker.advance_epoch(cgroup.id) {
            Ok(epoch) => epoch,
            Err(BpfError::NotWatched { .. }) => return Err(not_watched(&cgroup)),
            Err(source) => return Err(self.bpf_error("advance an epoch", source)),
        };
        // Not on a latency path here: the old epoch's counters go at once.
        if let Err(source) = self.tracker.drop_stale_stats(cgroup.id) {
            return Err(self.bpf_error("drop an old epoch's counters", source));
        }
        self.remember(&cgroup);
        tracing::debug!(cgroup = %cgroup.path.display(), epoch, "epoch advanced");
        Ok(watched_cgroup(&cgroup, epoch))
    }

    /// `GET /v1/inode-stats`.
    pub fn inode_stats(&self, query: &InodeStatsQuery) -> Result<InodeStatsResponse, ApiError> {
        let only = match &query.cgroup {
            Some(path) => {
                let cgroup = self.cgroups.resolve(path)?;
                // Checked first so an unwatched cgroup is a 404, not an empty list.
                self.epoch_of(&cgroup)?;
                self.remember(&cgroup);
                Some(cgroup.id)
            }
            None => None,
        };
        let records = self.bpf("read inode stats", self.tracker.inode_stats(only))?;
        let mut names: BTreeMap<u64, String> = BTreeMap::new();
        let mut stats: Vec<InodeStat> = records
            .into_iter()
            .map(|r| {
                let cgroup_path = names
                    .entry(r.cgroup_id)
                    .or_insert_with(|| self.path_of(r.cgroup_id))
                    .clone();
                InodeStat {
                    cgroup_path,
                    record: r,
                }
            })
            .collect();
        stats.sort_by_key(|s| (s.record.cgroup_id, s.record.ino));
        Ok(InodeStatsResponse { stats })
    }

    /// Brings the scrape-time metrics up to date with the sandboxes' state and the
    /// tracker. A failed tracker read is counted in `deltabox_tracker_errors_total`, a
    /// failed state measure logged, and the rest still refreshed, so a scrape always
    /// answers.
    pub fn refresh_metrics(&self) {
        let mut sandbox_cgroups = HashSet::new();
        if let Some(source) = &self.sandboxes {
            if let Err(err) = self.measure_state(source.as_ref()) {
                // The gauges keep their last values; the log says why they are stale.
                tracing::warn!("cannot measure the sandboxes' state: {}", err.message());
            }
            if let Some(p) = source.pool_figures() {
                self.metrics.set_pool(&p);
            }
            if let Some(s) = source.deltafs_stats() {
                self.metrics.set_deltafs(&s);
            }
            match source.dirty() {
                Ok(dirty) => self.metrics.set_sandbox_dirty(&dirty),
                Err(err) => tracing::warn!("cannot read the sandboxes' dirty pages: {err}"),
            }
            sandbox_cgroups = source.cgroup_ids();
        }
        if let Ok(counters) = self.bpf("read counters", self.tracker.counters()) {
            self.metrics.set_bpf_counters(&counters);
        }
        if let Ok(programs) = self.bpf("list attached programs", self.tracker.attached()) {
            self.metrics
                .bpf_programs_attached
                .set(i64::try_from(programs.len()).unwrap_or(i64::MAX));
        }
        let Ok(watched) = self.watched() else {
            return;
        };
        let Ok(records) = self.bpf("read inode stats", self.tracker.inode_stats(None)) else {
            return;
        };
        let all_watched = watched.len() as u64;
        // Sandboxes' cgroups are reported per sandbox (`GET /v1/stats`) and summed
        // (`deltabox_sandbox_dirtied_*`), never as a series per sandbox.
        let mut figures: BTreeMap<u64, CgroupFigures> = watched
            .into_iter()
            .filter(|w| !sandbox_cgroups.contains(&w.id))
            .map(|w| {
                let figures = CgroupFigures {
                    path: w.path,
                    epoch: w.epoch,
                    ..CgroupFigures::default()
                };
                (w.id, figures)
            })
            .collect();
        for r in records {
            if let Some(f) = figures.get_mut(&r.cgroup_id) {
                f.bytes += r.bytes;
                f.writes += r.writes;
                f.pages_dirtied += r.pages_dirtied;
                f.inodes += 1;
            }
        }
        self.metrics
            .set_cgroups(&figures.into_values().collect::<Vec<_>>());
        self.metrics
            .watched_cgroups
            .set(i64::try_from(all_watched).unwrap_or(i64::MAX));
    }

    /// Watched cgroups with their paths, sorted by path.
    fn watched(&self) -> Result<Vec<WatchedCgroup>, ApiError> {
        let ids = self.bpf("list watched cgroups", self.tracker.watched())?;
        let mut watched: Vec<WatchedCgroup> = ids
            .into_iter()
            .map(|(id, epoch)| WatchedCgroup {
                path: self.path_of(id),
                id,
                epoch,
            })
            .collect();
        watched.sort_by(|a, b| a.path.cmp(&b.path).then(a.id.cmp(&b.id)));
        self.metrics
            .watched_cgroups
            .set(i64::try_from(watched.len()).unwrap_or(i64::MAX));
        Ok(watched)
    }

    /// The cgroup's current epoch, or a not-watched error naming it.
    fn epoch_of(&self, cgroup: &Cgroup) -> Result<u64, ApiError> {
        let ids = self.bpf("list watched cgroups", self.tracker.watched())?;
        ids.into_iter()
            .find_map(|(id, epoch)| (id == cgroup.id).then_some(epoch))
            .ok_or_else(|| not_watched(cgroup))
    }

    /// The directory of a cgroup id: cached if it still has that id, else found by a
    /// bounded walk of the tree (ids adopted from the maps after a restart).
    fn path_of(&self, id: u64) -> String {
        let cached = self.lock_paths().get(&id).cloned();
        match cached {
            Some(KnownPath::Found(path)) if fs::metadata(&path).is_ok_and(|m| m.ino() == id) => {
                return path.display().to_string();
            }
            Some(KnownPath::Missing { since }) if since.elapsed() < UNKNOWN_PATH_TTL => {
                return unknown_cgroup(id);
            }
            _ => {}
        }
        let found = self.cgroups.path_of(id);
        let display = found
            .as_ref()
            .map_or_else(|| unknown_cgroup(id), |p| p.display().to_string());
        let entry = match found {
            Some(path) => KnownPath::Found(path),
            None => KnownPath::Missing {
                since: Instant::now(),
            },
        };
        self.lock_paths().insert(id, entry);
        display
    }

    fn remember(&self, cgroup: &Cgroup) {
        self.lock_paths()
            .insert(cgroup.id, KnownPath::Found(cgroup.path.clone()));
    }

    fn forget(&self, id: u64) {
        self.lock_paths().remove(&id);
    }

    fn lock_paths(&self) -> std::sync::MutexGuard<'_, HashMap<u64, KnownPath>> {
        // The map is a cache: a panic mid-insert leaves nothing inconsistent in it.
        self.paths.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Maps a tracker result, counting failures by operation.
    fn bpf<T>(&self, op: &'static str, result: Result<T, BpfError>) -> Result<T, ApiError> {
        result.map_err(|source| self.bpf_error(op, source))
    }

    fn bpf_error(&self, op: &'static str, source: BpfError) -> ApiError {
        self.metrics.tracker_error(op);
        ApiError::Bpf {
            op,
            source: Box::new(source),
        }
    }
}

fn watched_cgroup(cgroup: &Cgroup, epoch: u64) -> WatchedCgroup {
    WatchedCgroup {
        path: cgroup.path.display().to_string(),
        id: cgroup.id,
        epoch,
    }
}

fn not_watched(cgroup: &Cgroup) -> ApiError {
    ApiError::NotWatched {
        path: cgroup.path.display().to_string(),
        id: cgroup.id,
    }
}
