//! The template pool: the live templates of every tree, bounded by count and by the
//! bytes they alone own ([`crate::cr::owned`]).
//!
//! Templates are a cache of their nodes (each node is also a dump on disk, see
//! `tree_ops/fallback.rs`), so when a bound is exceeded the least recently used
//! template is evicted: its node's templates are destroyed and the node is restored
//! from its dump from then on (the fallback; the first such restore re-makes them).
//! "Used" is the checkpoint that made a node's templates, or a restore (rollback,
//! branch) that forked them. Never evicted:
//!
//! - a node whose dump is queued (policy `eager`: the pool waits until it is written,
//!   and evicts no more recently used node meanwhile) or cannot be written: a node's
//!   dump must be complete on disk before its templates go, so an acknowledged node
//!   never loses its only copy; under `on-evict` the pool writes the dump itself, then
//!   evicts; under `off` nothing is ever evicted;
//! - likewise a node whose templates are the base of a queued dump (a child node's,
//!   compared with them frame by frame): the job holds them, so evicted they would
//!   live on, uncounted, until it is done;
//! - the last live template of a session: the fallback rebuilds a session from its
//!   dump by forking *a live template of the same program run* (same vdso), so each
//!   session keeps one;
//! - likewise, a node holding the last live template of a program run (same syscall
//!   site in the same vdso) among its other processes' (a sandbox's background jobs and
//!   pipelines, dumped as sessions are: `tree_ops/process_dumps.rs`): another node
//!   must keep a live template of that run to rebuild them from.
//!
//! The bounds can then be exceeded by up to one template per session and per program
//! run of the other processes.
//!
//! All of it runs on the pool's own thread, off the answer path: woken after each
//! checkpoint and each dump, and every [`TICK`] (what a template owns grows as its
//! session writes pages the template still shares), it measures the templates (see
//! [`Measures`] for how often all of them), then evicts while a bound is exceeded.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::tree_ops::process_dumps::{name_of as process_dump_name, parent_dump};
use super::{NodeTemplates, Tree, lock};
use crate::cr::dump::{Dump, DumpOptions, DumpPolicy, DumpWorker, dump_name, dump_template};
use crate::metrics::pool::PoolFigures;
use crate::tree::db::{Op, TreeDb};
use crate::tree::ids::{NodeId, SessionId, TreeId};
use measure::{Measures, measure};

/// How often the pool measures its templates when nothing wakes it.
pub const TICK: Duration = Duration::from_secs(2);

/// Default `--pool-max-templates`.
pub const DEFAULT_MAX_TEMPLATES: u64 = 1024;

/// The pool's bounds and the dump policy (`deltaboxd --pool-max-templates`,
/// `--pool-max-bytes`, `--dump-policy`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    /// The most live templates (one per session of a node), over all trees.
    pub max_templates: u64,
    /// The most bytes the live templates may own, summed.
    pub max_bytes: u64,
    /// When dumps are written.
    pub dump_policy: DumpPolicy,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            max_templates: DEFAULT_MAX_TEMPLATES,
            max_bytes: default_max_bytes(),
            dump_policy: DumpPolicy::Eager,
        }
    }
}

/// Default `--pool-max-bytes`: a quarter of the machine's memory (`MemTotal`), or
/// 4 GiB if it cannot be read.
pub fn default_max_bytes() -> u64 {
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kib = line.split_whitespace().nth(1)?.parse::<u64>().ok()?;
            Some(kib * 1024)
        });
    total.map_or(4 << 30, |bytes| bytes / 4)
}

mod measure;

/// The trees, shared with the manager.
pub(super) type Trees = Arc<Mutex<HashMap<TreeId, Arc<Tree>>>>;

/// The pool: its bookkeeping and its thread. Stopped (the thread joined) on drop.
pub(crate) struct Pool {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

struct Shared {
    cfg: PoolConfig,
    trees: Trees,
    db: Arc<TreeDb>,
    dumps_root: PathBuf,
    state: Mutex<State>,
    wake: Condvar,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
    /// Dumps the pool is writing itself (at most one: one thread).
    dumping: AtomicU64,
    /// The last measure: live templates and the bytes they own.
    measured: Mutex<(u64, u64)>,
}

#[derive(Default)]
struct State {
    /// The nodes whose templates are in the pool, with when they were last used.
    used: HashMap<NodeId, (TreeId, u64)>,
    clock: u64,
    /// Dumps queued on the dump worker (`<node>-<session>`), not yet on disk, each with
    /// the address of the node templates it is compared with (its base), if any.
    pending: HashMap<String, Option<usize>>,
    woken: bool,
    stop: bool,
}

/// A node's templates, as one pass of the pool sees them.
struct Candidate {
    node: NodeId,
    tree: Arc<Tree>,
    templates: Arc<NodeTemplates>,
    used: u64,
}

impl Candidate {
    /// The live session templates.
    fn live(&self) -> impl Iterator<Item = (SessionId, &crate::cr::Template)> {
        self.templates
            .sessions
            .iter()
            .filter(|(_, _, t)| t.is_alive())
            .map(|(sid, _, t)| (*sid, t))
    }

    /// The live templates of the sandbox's other processes (they count in the bounds).
    fn live_processes(&self) -> impl Iterator<Item = &crate::cr::Template> {
        self.templates
            .processes
            .iter()
            .filter(|t| t.is_alive())
            .map(|t| &**t)
    }

    /// Every live template: the sessions', then the other processes'.
    fn live_all(&self) -> impl Iterator<Item = &crate::cr::Template> {
        self.live().map(|(_, t)| t).chain(self.live_processes())
    }
}

impl Pool {
    /// Starts the pool's thread over `trees`.
    pub(super) fn start(
        cfg: PoolConfig,
        trees: Trees,
        db: Arc<TreeDb>,
        dumps_root: PathBuf,
    ) -> Self {
        let shared = Arc::new(Shared {
            cfg,
            trees,
            db,
            dumps_root,
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            dumping: AtomicU64::new(0),
            measured: Mutex::new((0, 0)),
        });
        let runner = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("deltabox-pool".to_owned())
            .spawn(move || runner.run())
            .map_err(|e| tracing::warn!("cannot start the template pool's thread: {e}"))
            .ok();
        Self {
            shared,
            thread: Mutex::new(thread),
        }
    }

    /// The bounds and the dump policy.
    pub(super) fn config(&self) -> &PoolConfig {
        &self.shared.cfg
    }

    /// Puts `node`'s templates (just made, adopted or re-made) in the pool, as the most
    /// recently used.
    pub(super) fn admit(&self, tree: TreeId, node: NodeId) {
        let mut st = lock(&self.shared.state);
        st.clock += 1;
        let now = st.clock;
        st.used.insert(node, (tree, now));
        st.woken = true;
        self.shared.wake.notify_all();
    }

    /// `node`'s templates were just forked: the most recently used.
    pub(super) fn touch(&self, node: NodeId) {
        let mut st = lock(&self.shared.state);
        st.clock += 1;
        let now = st.clock;
        if let Some((_, used)) = st.used.get_mut(&node) {
            *used = now;
        }
    }

    /// Counts a session restored by forking its node's own template.
    pub(super) fn hit(&self) {
        self.shared.hits.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a session restored from its dump (its template was gone).
    pub(super) fn miss(&self) {
        self.shared.misses.fetch_add(1, Ordering::Relaxed);
    }

    /// Dump `name` is queued: its node is not evicted until [`Pool::dump_done`], nor the
    /// node whose templates are its `base` (the job holds them: evicted, they would
    /// live on uncounted until it is done).
    pub(super) fn dump_queued(&self, name: &str, base: Option<&Arc<NodeTemplates>>) {
        let base = base.map(|t| Arc::as_ptr(t) as usize);
        lock(&self.shared.state)
            .pending
            .insert(name.to_owned(), base);
    }

    /// A handle for the dump jobs, which outlive the call that queued them.
    pub(super) fn handle(&self) -> PoolHandle {
        PoolHandle(Arc::clone(&self.shared))
    }

    /// The pool's figures; `templates_dumped` (a walk of the tree database) and the
    /// standbys (the trees') are the caller's to fill.
    pub(super) fn figures(&self) -> PoolFigures {
        let s = &self.shared;
        let (templates, bytes) = *lock(&s.measured);
        let worker = DumpWorker::for_root(&s.dumps_root).backlog() as u64;
        PoolFigures {
            templates_live: templates,
            templates_dumped: 0,
            bytes_owned: bytes,
            max_templates: s.cfg.max_templates,
            max_bytes: s.cfg.max_bytes,
            hits: s.hits.load(Ordering::Relaxed),
            misses: s.misses.load(Ordering::Relaxed),
            evictions: s.evictions.load(Ordering::Relaxed),
            dump_backlog: worker + s.dumping.load(Ordering::Relaxed),
            dump_policy: s.cfg.dump_policy.to_string(),
            standbys_ready: 0,
            standbys_pending: 0,
        }
    }

    /// Stops the thread and waits for it (an eviction in progress finishes first).
    pub(super) fn stop(&self) {
        {
            let mut st = lock(&self.shared.state);
            st.stop = true;
            self.shared.wake.notify_all();
        }
        if let Some(thread) = lock(&self.thread).take() {
            let _ = thread.join();
        }
    }
}

/// What a queued dump job tells the pool.
pub(crate) struct PoolHandle(Arc<Shared>);

impl PoolHandle {
    /// Dump `name` was written (or failed: then the pool writes it at eviction).
    pub(super) fn dump_done(&self, name: &str) {
        let mut st = lock(&self.0.state);
        st.pending.remove(name);
        st.woken = true;
        self.0.wake.notify_all();
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Shared {
    fn run(&self) {
        let mut measures = Measures::default();
        loop {
            {
                let mut st = lock(&self.state);
                let deadline = Instant::now() + TICK;
                while !st.woken && !st.stop {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    st = self
                        .wake
                        .wait_timeout(st, left)
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .0;
                }
                if st.stop {
                    return;
                }
                st.woken = false;
            }
            self.pass(&mut measures);
        }
    }

    /// The pool's nodes whose templates are still in their tree's map, least recently
    /// used first; forgets the others (removed with their node or tree).
    fn candidates(&self) -> Vec<Candidate> {
        let entries: Vec<(NodeId, TreeId, u64)> = lock(&self.state)
            .used
            .iter()
            .map(|(node, (tree, used))| (*node, *tree, *used))
            .collect();
        let trees: HashMap<TreeId, Arc<Tree>> = lock(&self.trees)
            .iter()
            .map(|(id, t)| (*id, Arc::clone(t)))
            .collect();
        let mut out = Vec::new();
        let mut gone = Vec::new();
        for (node, tree_id, used) in entries {
            let found = trees.get(&tree_id).and_then(|tree| {
                let templates = lock(&tree.templates).get(&node).cloned()?;
                Some((Arc::clone(tree), templates))
            });
            match found {
                Some((tree, templates)) => out.push(Candidate {
                    node,
                    tree,
                    templates,
                    used,
                }),
                None => gone.push(node),
            }
        }
        if !gone.is_empty() {
            let mut st = lock(&self.state);
            for node in gone {
                st.used.remove(&node);
            }
        }
        out.sort_by_key(|c| c.used);
        out
    }

    /// Measures (every template when a full measure is due, else the nodes not
    /// measured yet), then evicts while a bound is exceeded.
    fn pass(&self, measures: &mut Measures) {
        let mut candidates = self.candidates();
        let mut skipped: HashSet<NodeId> = HashSet::new();
        let mut full = measures.full_due();
        loop {
            let t = Instant::now();
            if full {
                measures.bytes.clear();
            }
            let (count, bytes) = measure(&candidates, &mut measures.bytes);
            if full {
                measures.last_full = Some((t, t.elapsed()));
                full = false;
            }
            measures
                .bytes
                .retain(|node, _| candidates.iter().any(|c| c.node == *node));
            *lock(&self.measured) = (count, bytes);
            tracing::debug!(
                templates = count,
                bytes,
                ms = t.elapsed().as_secs_f64() * 1e3,
                "template pool measured"
            );
            let over = count > self.cfg.max_templates || bytes > self.cfg.max_bytes;
            if !over || self.cfg.dump_policy == DumpPolicy::Off {
                return;
            }
            let Some(i) = self.victim(&candidates, &skipped) else {
                tracing::debug!(
                    count,
                    bytes,
                    "template pool over its bounds, nothing evictable"
                );
                return;
            };
            let victim = candidates.remove(i);
            let node = victim.node;
            if let Err(e) = self.evict(victim) {
                tracing::warn!(node = %node, "not evicting its templates: {e}");
                skipped.insert(node);
                // Back in the list for the measures, never picked again in this pass.
                candidates = self.candidates();
            }
        }
    }

    /// The least recently used node whose templates may go: not skipped, none of its
    /// live session templates the last of its session, and none of its other processes'
    /// live templates the last of their program run (the other nodes with a live
    /// template of the same run, sessions' included). `None` while that node's dumps, or
    /// dumps compared with its templates, are still queued: the pool waits for them ([`PoolHandle::dump_done`] wakes it) rather
    /// than evict a more recently used node, which would break the LRU order for as long
    /// as the dump backlog lasts (a node just restored by the fallback, whose dump is
    /// already on disk, would go at once).
    fn victim(&self, candidates: &[Candidate], skipped: &HashSet<NodeId>) -> Option<usize> {
        let mut per_session: HashMap<SessionId, usize> = HashMap::new();
        let mut per_run: HashMap<(TreeId, u64), HashSet<NodeId>> = HashMap::new();
        for c in candidates {
            for (sid, _) in c.live() {
                *per_session.entry(sid).or_default() += 1;
            }
            for t in c.live_all() {
                per_run
                    .entry((c.tree.id, t.state().syscall_site.0))
                    .or_default()
                    .insert(c.node);
            }
        }
        let i = candidates.iter().position(|c| {
            c.live_all().next().is_some()
                && !skipped.contains(&c.node)
                && c.live()
                    .all(|(sid, _)| per_session.get(&sid).copied().unwrap_or(0) > 1)
                && c.live_processes().all(|t| {
                    let run = (c.tree.id, t.state().syscall_site.0);
                    per_run.get(&run).is_some_and(|nodes| nodes.len() > 1)
                })
        })?;
        let c = &candidates[i];
        let pending = lock(&self.state).pending.clone();
        let queued = c.live().any(|(sid, _)| {
            pending.contains_key(&dump_name(&c.node.to_string(), &sid.to_string()))
        }) || c
            .live_processes()
            .any(|t| pending.contains_key(&process_dump_name(c.node, t.state().pid)))
            || pending
                .values()
                .any(|base| *base == Some(Arc::as_ptr(&c.templates) as usize));
        if queued {
            tracing::debug!(node = %c.node, "least recently used node waits for its dumps");
            return None;
        }
        Some(i)
    }

    /// Makes sure every live template of `victim` has its dump on disk (writing it
    /// when missing), then takes its templates out of their tree, records that the
    /// node has none, and destroys them.
    fn evict(&self, victim: Candidate) -> Result<(), String> {
        let record = self
            .db
            .node(&victim.node)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "its node is gone".to_owned())?;
        let root_prefix = victim.tree.runtime.root_in_ns(&record.sandbox.to_string());
        let sessions = victim.live().map(|(sid, template)| {
            let name = dump_name(&victim.node.to_string(), &sid.to_string());
            (name, self.nearest_dump(record.parent, sid), template)
        });
        let processes = victim.live_processes().map(|template| {
            let state = template.state();
            let parent = parent_dump(&self.db, &self.dumps_root, record.parent, state, true);
            (process_dump_name(victim.node, state.pid), parent, template)
        });
        for (name, parent, template) in sessions.chain(processes) {
            if Dump::exists(&self.dumps_root, &name) {
                continue;
            }
            let opts = DumpOptions {
                root: self.dumps_root.clone(),
                name: name.clone(),
                parent,
                root_prefix: Some(root_prefix.clone()),
            };
            self.dumping.fetch_add(1, Ordering::Relaxed);
            let written = dump_template(template, &opts);
            self.dumping.fetch_sub(1, Ordering::Relaxed);
            let stats =
                written.map_err(|e| format!("its dump {name} could not be written: {e}"))?;
            tracing::info!(dump = %name, pages = stats.pages, written = stats.written, ms = stats.ms, "dumped before eviction");
        }
        {
            let mut map = lock(&victim.tree.templates);
            let ours = map
                .get(&victim.node)
                .is_some_and(|t| Arc::ptr_eq(t, &victim.templates));
            if !ours {
                // Removed with its node, or re-made while its dump was written.
                return Err("its templates changed meanwhile".to_owned());
            }
            map.remove(&victim.node);
        }
        victim.tree.standbys.forget_node(victim.node);
        lock(&self.state).used.remove(&victim.node);
        // Read again: the record may have changed while the dumps were written.
        let recorded = match self.db.node(&victim.node) {
            Ok(Some(mut updated)) => {
                for s in &mut updated.sessions {
                    s.template = None;
                }
                for p in &mut updated.processes {
                    p.template = None;
                }
                self.db
                    .commit(&[Op::PutNode(updated)])
                    .map_err(|e| e.to_string())
            }
            Ok(None) => Ok(()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = recorded {
            // A restarted daemon then finds the pids gone (or not templates) itself.
            tracing::warn!(node = %victim.node, "recording its eviction: {e}");
        }
        let count = victim.live_all().count() as u64;
        self.evictions.fetch_add(count, Ordering::Relaxed);
        tracing::info!(node = %victim.node, templates = count, "evicted from the template pool");
        match Arc::try_unwrap(victim.templates) {
            Ok(templates) => {
                for (sid, _, template) in templates.sessions {
                    if let Err(e) = template.destroy() {
                        tracing::warn!(node = %victim.node, session = %sid, "destroying its template: {e}");
                    }
                }
                for template in templates.processes {
                    match Arc::try_unwrap(template) {
                        Ok(template) => {
                            let pid = template.state().pid;
                            if let Err(e) = template.destroy() {
                                tracing::warn!(node = %victim.node, pid, "destroying its template: {e}");
                            }
                        }
                        // Held by a restore (a base): it dies when that lets go.
                        Err(held) => drop(held),
                    }
                }
            }
            // A restore holds them: they die when it lets go.
            Err(held) => drop(held),
        }
        Ok(())
    }

    /// The dump of `session` at the nearest of `parent` and its ancestors that has
    /// one: what a new dump is incremental against (any ancestor's works: pages are
    /// compared at the same address).
    fn nearest_dump(&self, mut parent: Option<NodeId>, session: SessionId) -> Option<String> {
        let mut hops = 0;
        while let Some(id) = parent {
            let name = dump_name(&id.to_string(), &session.to_string());
            if Dump::exists(&self.dumps_root, &name) {
                return Some(name);
            }
            parent = self.db.node(&id).ok().flatten().and_then(|n| n.parent);
            hops += 1;
            if hops > 10_000 {
                break;
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_byte_bound_is_a_quarter_of_the_memory() {
        let bytes = default_max_bytes();
        assert!(bytes >= 64 << 20, "{bytes}");
        assert_eq!(PoolConfig::default().max_bytes, bytes);
        assert_eq!(PoolConfig::default().dump_policy, DumpPolicy::Eager);
    }
}
