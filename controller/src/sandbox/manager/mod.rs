//! The sandbox manager: the real [`SandboxOps`]. It owns the DeltaFS store, the tree
//! database and the live trees (a [`TreeRuntime`] each, with the DeltaCR templates of
//! their nodes), and ties them together: one atomic checkpoint over files and
//! processes, rollback, branch.
//!
//! - this module: configuration, lookups, create / remove / list;
//! - [`adopt`]: taking over an earlier daemon's trees after a restart;
//! - [`commands`]: `exec` and sessions;
//! - [`service`]: the [`SandboxOps`] implementation: ids resolved, the sandbox locked;
//! - [`tree_ops`]: checkpoint, rollback, branch; [`queries`]: tree, diff, node removal, gc;
//! - [`output`]: collecting a command's output;
//! - [`pool`]: the bounded template pool (eviction to dumps).
//!
//! Locking: one mutex per sandbox, held for a whole operation (so operations on one
//! sandbox are serialised and on different sandboxes run in parallel); the maps of
//! sandboxes and trees are locked only to look up or insert.

mod adopt;
pub mod busy;
mod commands;
mod config;
mod dump_files;
pub mod leftovers;
pub mod output;
pub mod pool;
mod queries;
mod rebind;
mod service;
mod squash;
mod standby;
mod tree_ops;

pub use config::ManagerConfig;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};

use deltafs::{Store, View};
use nix::unistd::Pid;

use super::error::SandboxError;
use super::rootfs;
use super::runtime::{Limits, TreeConfig, TreeRuntime};
use super::session::{SessionIo, SessionKind};
use crate::api::sandbox_types::{LimitsSpec, SandboxInfo, SessionInfo};
use crate::cr::Template;
use crate::cr::pidfd::Pidfd;
use crate::tree::TreeDbError;
use crate::tree::db::TreeDb;
use crate::tree::ids::{NodeId, SandboxId, SessionId, TreeId};
use crate::tree::records::{SandboxRecord, SandboxState, SessionRecord, TreeRecord, unix_ms_now};

/// A live tree: its namespaces and init, and the templates of its nodes.
pub(crate) struct Tree {
    id: TreeId,
    runtime: TreeRuntime,
    /// The base every sandbox of the tree is layered over.
    base: PathBuf,
    /// Per node, one template per session (in the node's session order).
    templates: Mutex<HashMap<NodeId, Arc<NodeTemplates>>>,
    /// The tree's root as its processes name it (asked of init once).
    root: std::sync::OnceLock<PathBuf>,
    /// Sessions forked ahead of rollbacks, per sandbox.
    standbys: standby::Standbys,
}

impl Tree {
    /// Every node's templates, copied out of the map under its lock: checking them
    /// (pidfds, generations) then holds up no checkpoint or rollback of the tree.
    fn all_templates(&self) -> Vec<(NodeId, Arc<NodeTemplates>)> {
        lock(&self.templates)
            .iter()
            .map(|(id, t)| (*id, Arc::clone(t)))
            .collect()
    }

    /// `/proc/<tree anchor>/root`, where DeltaCR puts templates.
    fn root_in_ns(&self) -> Result<PathBuf, SandboxError> {
        if let Some(root) = self.root.get() {
            return Ok(root.clone());
        }
        let root = self
            .runtime
            .tree_root_in_ns()
            .map_err(|e| SandboxError::internal(format!("tree {}", self.id), e))?;
        Ok(self.root.get_or_init(|| root).clone())
    }
}

/// The DeltaCR templates of one node.
pub(crate) struct NodeTemplates {
    sessions: Vec<(SessionId, SessionKind, Template)>,
    /// The live templates of the sandbox's other processes (in the node's `processes`
    /// order, but some may be missing: each is found by its recorded pid, see
    /// `tree_ops/process_dumps.rs`). Shared, so that a node whose sessions are re-made
    /// from their dumps keeps them.
    processes: Vec<Arc<Template>>,
}

impl NodeTemplates {
    /// Session `session`'s template at this node, if it is alive.
    fn live_session(&self, session: SessionId) -> Option<&(SessionId, SessionKind, Template)> {
        self.sessions
            .iter()
            .find(|(sid, _, tpl)| *sid == session && tpl.is_alive())
    }
}

/// A session running in a sandbox.
pub(crate) struct LiveSession {
    id: SessionId,
    kind: SessionKind,
    /// The interpreter (host pid; also its process group: it is a session leader).
    pid: Pid,
    /// A pidfd of the interpreter, through which its process group is killed: by then
    /// the interpreter may have exited and been reaped by init, and its pid reused by
    /// an unrelated host process, which `killpg(pid)` would hit.
    group: Option<Pidfd>,
    io: SessionIo,
    started_ms: u64,
    /// Forks since a fresh process ([`crate::cr::Template::generation`]): 0 for a
    /// session started or restored into a husk, the template's plus one for a fork.
    generation: u32,
}

/// A live sandbox, behind its own mutex.
pub(crate) struct Live {
    record: SandboxRecord,
    tree: Arc<Tree>,
    view: Option<View>,
    sessions: BTreeMap<SessionId, LiveSession>,
    limits: Limits,
}

/// The sandbox manager.
pub struct SandboxManager {
    cfg: ManagerConfig,
    store: Store,
    db: Arc<TreeDb>,
    default_base: Mutex<Option<PathBuf>>,
    /// Shared with the template pool's thread.
    trees: pool::Trees,
    pool: pool::Pool,
    sandboxes: Mutex<HashMap<SandboxId, Arc<Mutex<Live>>>>,
    /// The operation holding each sandbox ([`busy`]).
    busy: busy::BusyTable,
    /// Re-root requests (`tree_ops/reroot.rs`), once that thread is started.
    reroots: std::sync::OnceLock<std::sync::mpsc::Sender<(TreeId, NodeId)>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn db_err(e: TreeDbError) -> SandboxError {
    match e {
        TreeDbError::UnknownId { kind, prefix } => match kind {
            "node" => SandboxError::UnknownNode { id: prefix },
            _ => SandboxError::UnknownSandbox { id: prefix },
        },
        TreeDbError::BadPrefix { kind, prefix } => match kind {
            "node" => SandboxError::UnknownNode { id: prefix },
            _ => SandboxError::UnknownSandbox { id: prefix },
        },
        TreeDbError::Ambiguous {
            kind,
            prefix,
            candidates,
        } => SandboxError::Ambiguous {
            what: if kind == "node" { "node" } else { "sandbox" },
            prefix,
            candidates,
        },
        other => SandboxError::internal("tree database", other),
    }
}

impl From<&Limits> for LimitsSpec {
    fn from(l: &Limits) -> Self {
        Self {
            memory_bytes: l.memory_bytes,
            cpus: l.cpus,
            pids: l.pids,
        }
    }
}

fn limits_of(spec: &LimitsSpec) -> Result<Limits, SandboxError> {
    let invalid = |message: String| SandboxError::Invalid { message };
    if let Some(m) = spec.memory_bytes
        && m < 16 << 20
    {
        return Err(invalid(format!(
            "memory limit {m} bytes is below the minimum of 16 MiB"
        )));
    }
    if let Some(c) = spec.cpus
        && !(c.is_finite() && (0.01..=1024.0).contains(&c))
    {
        return Err(invalid(format!("cpus {c} must be between 0.01 and 1024")));
    }
    if let Some(p) = spec.pids
        && p < 8
    {
        return Err(invalid(format!("pids limit {p} is below the minimum of 8")));
    }
    Ok(Limits {
        memory_bytes: spec.memory_bytes,
        cpus: spec.cpus,
        pids: spec.pids,
    })
}

impl SandboxManager {
    /// Opens the store and the database, and takes over the trees an earlier daemon
    /// left ([`adopt`]): each sandbox comes back at its head node, with its sessions
    /// forked again from the head's templates; what cannot be taken over is cleaned up.
    pub fn open(cfg: ManagerConfig) -> Result<Self, SandboxError> {
        // Each tree's init listens on `<run_dir>/trees/<uuid>/init.sock`, and a Unix
        // socket path has at most 107 bytes.
        let longest = cfg
            .run_dir
            .join("trees")
            .join(TreeId::new().to_string())
            .join("init.sock");
        if longest.as_os_str().len() > 107 {
            return Err(SandboxError::Invalid {
                message: format!(
                    "run directory {} is too long: a tree's socket {} would exceed the 107 \
                     bytes of a Unix socket path",
                    cfg.run_dir.display(),
                    longest.display()
                ),
            });
        }
        if cfg.favor_dynmods {
            match crate::cgroup::favor_dynamic_moves() {
                Ok(true) => tracing::info!("cgroup2 reconfigured with favordynmods"),
                Ok(false) => {}
                // Slower moves (branches, standbys), nothing incorrect.
                Err(e) => tracing::warn!("cgroup moves will wait for RCU grace periods: {e}"),
            }
        }
        std::fs::create_dir_all(&cfg.data_dir)
            .map_err(|e| SandboxError::internal(cfg.data_dir.display(), e))?;
        let store = Store::open(cfg.data_dir.join("store"))
            .map_err(|e| SandboxError::internal("DeltaFS store", e))?;
        let db = Arc::new(TreeDb::open(&cfg.data_dir.join("tree.redb")).map_err(db_err)?);
        let cfg_busy_wait = cfg.busy_wait;
        let trees: pool::Trees = Arc::default();
        let pool = pool::Pool::start(
            cfg.pool.clone(),
            Arc::clone(&trees),
            Arc::clone(&db),
            cfg.data_dir.join("dumps"),
        );
        let manager = Self {
            cfg,
            store,
            db,
            default_base: Mutex::new(None),
            trees,
            pool,
            sandboxes: Mutex::new(HashMap::new()),
            busy: busy::BusyTable::new(cfg_busy_wait),
            reroots: std::sync::OnceLock::new(),
        };
        manager.recover()?;
        Ok(manager)
    }

    /// The configuration.
    pub fn config(&self) -> &ManagerConfig {
        &self.cfg
    }

    fn default_base(&self) -> Result<PathBuf, SandboxError> {
        let mut base = lock(&self.default_base);
        if let Some(b) = &*base {
            return Ok(b.clone());
        }
        let dir = rootfs::ensure_default_base(&self.cfg.run_dir.join("base"))
            .map_err(|e| SandboxError::internal("embedded default base", e))?;
        *base = Some(dir.clone());
        Ok(dir)
    }

    fn resolve_sandbox(&self, prefix: &str) -> Result<(SandboxId, Arc<Mutex<Live>>), SandboxError> {
        let id = self.db.resolve_sandbox(prefix).map_err(db_err)?;
        let live = lock(&self.sandboxes).get(&id).cloned();
        live.map(|l| (id, l))
            .ok_or_else(|| SandboxError::UnknownSandbox {
                id: prefix.to_owned(),
            })
    }

    fn live_tree(&self, id: &TreeId) -> Option<Arc<Tree>> {
        lock(&self.trees).get(id).cloned()
    }

    /// Starts a tree: its runtime (namespaces, init) over `base`.
    fn start_tree(
        &self,
        base: PathBuf,
        rootfs: Option<PathBuf>,
    ) -> Result<Arc<Tree>, SandboxError> {
        let id = TreeId::new();
        let runtime = TreeRuntime::start(TreeConfig {
            id: id.to_string(),
            run_dir: self.cfg.run_dir.join("trees").join(id.to_string()),
            cgroup: self.cfg.cgroup.join(id.to_string()),
            init_binary: self.cfg.init_binary.clone(),
        })
        .map_err(|e| SandboxError::internal(format!("starting tree {id}"), e))?;
        self.db
            .put_tree(&TreeRecord {
                id,
                created_ms: unix_ms_now(),
                rootfs,
            })
            .map_err(db_err)?;
        let tree = Arc::new(Tree {
            id,
            runtime,
            base,
            templates: Mutex::new(HashMap::new()),
            root: std::sync::OnceLock::new(),
            standbys: standby::Standbys::default(),
        });
        lock(&self.trees).insert(id, Arc::clone(&tree));
        Ok(tree)
    }

    /// Sets up sandbox `id` in `tree`: cgroups, a DeltaFS view (of `from`, or the bare
    /// base), its anchor. The record is the caller's to write.
    fn set_up(
        &self,
        tree: &Arc<Tree>,
        id: SandboxId,
        limits: &Limits,
        from: Option<deltafs::SnapshotId>,
    ) -> Result<View, SandboxError> {
        let name = id.to_string();
        let mountpoint = tree
            .runtime
            .prepare_sandbox(&name, limits)
            .map_err(|e| SandboxError::internal(format!("sandbox {id}: cgroups"), e))?;
        let view = match self.store.mount(&tree.base, &mountpoint, from) {
            Ok(view) => view,
            Err(e) => {
                let _ = tree.runtime.remove_sandbox(&name);
                return Err(store_err(format!("sandbox {id}: mounting its root"), e));
            }
        };
        if let Err(e) = tree.runtime.add_sandbox(&name) {
            let _ = tree.runtime.remove_sandbox(&name);
            drop(view);
            return Err(SandboxError::internal(
                format!("sandbox {id}: starting it"),
                e,
            ));
        }
        Ok(view)
    }

    fn create_inner(
        &self,
        rootfs: Option<PathBuf>,
        limits: Limits,
        auto_checkpoint: bool,
    ) -> Result<SandboxInfo, SandboxError> {
        let base = match &rootfs {
            Some(dir) => {
                rootfs::check_rootfs(dir).map_err(|e| SandboxError::Invalid {
                    message: e.to_string(),
                })?;
                dir.clone()
            }
            None => self.default_base()?,
        };
        let tree = self.start_tree(base, rootfs.clone())?;
        let id = SandboxId::new();
        let record = SandboxRecord {
            id,
            tree: tree.id,
            created_ms: unix_ms_now(),
            rootfs,
            limits: serde_json::to_value(&limits).unwrap_or_default(),
            auto_checkpoint,
            head: None,
            branched_from: None,
            sessions: Vec::new(),
            state: SandboxState::Creating,
        };
        self.db.put_sandbox(&record).map_err(db_err)?;
        let view = match self.set_up(&tree, id, &limits, None) {
            Ok(view) => view,
            Err(e) => {
                let _ = self.db.delete_sandbox(&id);
                self.drop_tree_if_empty(&tree);
                return Err(e);
            }
        };
        let mut live = Live {
            record,
            tree,
            view: Some(view),
            sessions: BTreeMap::new(),
            limits,
        };
        live.record.state = SandboxState::Running;
        self.db.put_sandbox(&live.record).map_err(db_err)?;
        let info = live.info();
        lock(&self.sandboxes).insert(id, Arc::new(Mutex::new(live)));
        Ok(info)
    }

    /// Tears a sandbox down: its processes, anchor, mounts, cgroups and view.
    fn tear_down(&self, live: &mut Live) -> Result<(), SandboxError> {
        let name = live.record.id.to_string();
        live.sessions.clear();
        live.tree.standbys.forget_sandbox(&name);
        let removed = live.tree.runtime.remove_sandbox(&name);
        // Detached, not unmounted and waited for: templates of its nodes still map
        // files of the view and must keep being served until they go.
        if let Some(view) = live.view.take()
            && let Err(e) = view.detach()
        {
            tracing::warn!(sandbox = %name, "unmounting its root: {e}");
        }
        removed.map_err(|e| SandboxError::internal(format!("removing sandbox {name}"), e))
    }

    /// Shuts a tree down once it has no sandbox and no node left.
    fn drop_tree_if_empty(&self, tree: &Arc<Tree>) {
        // Never waits for a sandbox (a gc during a long exec would stall, and hold the
        // map against every lookup meanwhile), nor holds the map while looking: a
        // removal holds its sandbox and then takes the map.
        let lives: Vec<(SandboxId, Arc<Mutex<Live>>)> = lock(&self.sandboxes)
            .iter()
            .map(|(id, l)| (*id, Arc::clone(l)))
            .collect();
        let has_sandbox = lives.iter().any(|(id, l)| match l.try_lock() {
            Ok(live) => Arc::ptr_eq(&live.tree, tree),
            Err(TryLockError::Poisoned(p)) => Arc::ptr_eq(&p.into_inner().tree, tree),
            // Held by an operation: its tree as that operation found it (a sandbox never
            // changes tree); held otherwise (a removal, briefly): counted, to be safe.
            Err(TryLockError::WouldBlock) => self
                .busy
                .tree_of(*id)
                .is_none_or(|t| t == tree.id.to_string()),
        });
        let has_nodes = self
            .db
            .nodes(&tree.id)
            .map(|n| !n.is_empty())
            .unwrap_or(true);
        if has_sandbox || has_nodes {
            return;
        }
        if let Some(tree) = lock(&self.trees).remove(&tree.id) {
            let _ = self.db.delete_tree(&tree.id);
            lock(&tree.templates).clear();
            // If someone still holds it (an operation in flight), its drop shuts it down.
            if let Ok(tree) = Arc::try_unwrap(tree)
                && let Err(e) = tree.runtime.shutdown()
            {
                tracing::warn!("shutting a tree down: {e}");
            }
        }
    }
}

/// A DeltaFS error, as disk full when it is one.
fn store_err(context: impl std::fmt::Display, e: impl std::error::Error + 'static) -> SandboxError {
    let mut source: Option<&dyn std::error::Error> = Some(&e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && io.raw_os_error() == Some(libc::ENOSPC)
        {
            return SandboxError::DiskFull {
                message: format!("{context}: {}", crate::api::join_causes(chain(&e))),
            };
        }
        source = err.source();
    }
    SandboxError::Internal {
        message: format!("{context}: {}", crate::api::join_causes(chain(&e))),
    }
}

fn chain(e: &dyn std::error::Error) -> Vec<String> {
    let mut out = vec![e.to_string()];
    let mut source = e.source();
    while let Some(err) = source {
        out.push(err.to_string());
        source = err.source();
    }
    out
}

impl Live {
    fn info(&self) -> SandboxInfo {
        SandboxInfo {
            id: self.record.id.to_string(),
            tree: self.record.tree.to_string(),
            created_ms: self.record.created_ms,
            rootfs: self.record.rootfs.as_ref().map(|p| p.display().to_string()),
            limits: LimitsSpec::from(&self.limits),
            auto_checkpoint: self.record.auto_checkpoint,
            head: self.record.head.map(|n| n.to_string()),
            branched_from: self.record.branched_from.map(|n| n.to_string()),
            sessions: self.sessions.values().map(LiveSession::info).collect(),
            state: match self.record.state {
                SandboxState::Creating => "creating",
                SandboxState::Running => "running",
                SandboxState::Removing => "removing",
            }
            .to_owned(),
            busy: None,
            dirty: None,
        }
    }

    /// The session records of the live sessions (what the database keeps).
    fn session_records(&self) -> Vec<SessionRecord> {
        self.sessions
            .values()
            .map(|s| SessionRecord {
                id: s.id,
                kind: s.kind.to_string(),
                started_ms: s.started_ms,
            })
            .collect()
    }

    fn name(&self) -> String {
        self.record.id.to_string()
    }
}

impl LiveSession {
    fn info(&self) -> SessionInfo {
        SessionInfo {
            id: self.id.to_string(),
            kind: self.kind.to_string(),
            pid: self.pid.as_raw(),
            started_ms: self.started_ms,
        }
    }
}

impl Drop for LiveSession {
    fn drop(&mut self) {
        // A session leaves with its handle: its process group is killed.
        if let Some(group) = &self.group {
            let _ = group.signal_process_group(libc::SIGKILL);
        }
    }
}

impl Drop for SandboxManager {
    fn drop(&mut self) {
        // The pool's thread first: it holds trees and evicts templates.
        self.pool.stop();
        // Templates first: they hold the views' files (and their trees die below anyway).
        for tree in lock(&self.trees).values() {
            tree.standbys.forget_all();
            lock(&tree.templates).clear();
        }
        let all: Vec<_> = lock(&self.sandboxes).drain().map(|(_, l)| l).collect();
        for live in all {
            let mut live = lock(&live);
            if let Err(e) = self.tear_down(&mut live) {
                tracing::warn!("{e}");
            }
        }
        let trees: Vec<_> = lock(&self.trees).drain().map(|(_, t)| t).collect();
        for tree in trees {
            lock(&tree.templates).clear();
            if let Ok(tree) = Arc::try_unwrap(tree)
                && let Err(e) = tree.runtime.shutdown()
            {
                tracing::warn!("{e}");
            }
        }
        if lock(&self.default_base).take().is_some()
            && let Err(e) = rootfs::release_default_base(&self.cfg.run_dir.join("base"))
        {
            tracing::warn!("releasing the default base: {e}");
        }
    }
}
