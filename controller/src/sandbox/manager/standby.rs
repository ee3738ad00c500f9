//! Standby forks: a node's sessions forked from their templates ahead of a rollback to
//! it, so that the rollback finishes children that exist already instead of forking.
//!
//! The fork of a template copies the page tables of its memory: the biggest part of a
//! rollback of a big session (docs/deltacr.md, "Standby forks"). After a checkpoint,
//! and after a rollback, each of the node's live session templates is forked on a thread
//! of its own (`deltabox-standby`: ptrace binds the child to the thread that forked
//! it) into the sandbox's `standby/` cgroup, beside `work/`, so that the rollback's
//! kill of `work/` spares it — once the node's dumps are written ([`on_disk`]);
//! the child waits in its attach stop, where it has run nothing. A rollback to the node takes the node's standbys, moves each child into
//! `work/` once the killed processes are listed, and has its thread finish it as a
//! fork made during the rollback would be finished.
//!
//! Each sandbox keeps standbys for its `standby_nodes` most recent nodes (checkpointed
//! or rolled back to); older ones are dropped, which kills their children. A standby
//! holds its node's templates, so the pool's eviction and a node's removal drop the
//! node's standbys ([`Standbys::forget_node`]), and a sandbox's removal its own.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use nix::unistd::Pid;

use super::tree_ops::rollback::{Finisher, Preforked, worker};
use super::tree_ops::session_options;
use super::{Live, NodeTemplates, SandboxManager, lock};
use crate::cr::RestoreOptions;
use crate::cr::dump::{Dump, DumpPolicy, DumpWorker, dump_name};
use crate::sandbox::runtime::TreeRuntime;
use crate::sandbox::session::SessionKind;
use crate::tree::ids::{NodeId, SessionId};

/// One session's standby: the thread holding its forked child.
pub(super) struct Standby {
    pub session: SessionId,
    pub kind: SessionKind,
    pub finisher: Finisher,
    /// The child's pid once forked, while its thread holds it (0 otherwise).
    child: Arc<AtomicI32>,
    /// [`WAITING`], [`FORKING`], [`ABANDONED`] or [`ENDED`]: who goes first, the
    /// thread's fork or a rollback that finds it not forked yet; and whether the thread
    /// is still there.
    fork: Arc<AtomicU8>,
}

/// The thread has not started its fork (it waits for the node's dumps, or for a state
/// operation to end).
const WAITING: u8 = 0;
/// The thread is forking (and holds the template's lock until the fork is done).
const FORKING: u8 = 1;
/// A rollback came first: the thread forks nothing.
const ABANDONED: u8 = 2;
/// The thread is gone: it forked nothing (dropped, a dump failed, the fork failed) or
/// its child was used or killed.
const ENDED: u8 = 3;

impl Standby {
    /// The child's pid, or why there is none (waits for the thread's report: called
    /// once the fork is done or under way).
    pub fn forked(&mut self) -> Result<Pid, String> {
        self.finisher.forked()
    }

    /// For a rollback: whether the child is forked or being forked (then
    /// [`Self::forked`] waits for it: a fork of its own would wait for the template's
    /// lock, which the thread holds, and fork again), rather than not started (then
    /// the thread is told to fork nothing).
    pub fn claim(&self) -> bool {
        if self.child.load(Ordering::SeqCst) != 0 {
            return true;
        }
        match self
            .fork
            .compare_exchange(WAITING, ABANDONED, Ordering::SeqCst, Ordering::SeqCst)
        {
            Ok(_) => false,
            Err(state) => state == FORKING,
        }
    }

    /// Whether its fork is still to come: the thread waits (for the node's dumps, or
    /// for state operations to end) or forks now.
    fn pending(&self) -> bool {
        match self.fork.load(Ordering::SeqCst) {
            WAITING => true,
            FORKING => self.child.load(Ordering::SeqCst) == 0,
            _ => false,
        }
    }
}

/// What `GET /v1/stats` says of the standbys: forked and held, and still to fork.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct StandbyCounts {
    pub ready: u64,
    pub pending: u64,
}

/// Marks its standby's thread [`ENDED`] when the thread leaves, however it leaves.
struct Ends(Arc<AtomicU8>);

impl Drop for Ends {
    fn drop(&mut self) {
        self.0.store(ENDED, Ordering::SeqCst);
    }
}

/// For a standby's thread, past its waits: whether it may fork (no rollback claimed the
/// standby first); from then on a rollback waits for the fork.
fn start_fork(fork: &AtomicU8) -> bool {
    fork.compare_exchange(WAITING, FORKING, Ordering::SeqCst, Ordering::SeqCst)
        .is_ok()
}

/// The standbys of one node for one sandbox.
struct NodeStandby {
    node: NodeId,
    sessions: Vec<Standby>,
}

/// Every standby of a tree, per sandbox, most recent node first.
#[derive(Default)]
pub(crate) struct Standbys {
    per_sandbox: Mutex<HashMap<String, VecDeque<NodeStandby>>>,
}

impl Standbys {
    /// Forks standbys of `node`'s live session templates for `sandbox` (nothing if it
    /// has them already: they become its most recent), into the cgroup of `opts`, and
    /// drops the sandbox's standbys beyond the `keep` most recent nodes. `keep` 0: none.
    pub fn prepare(
        &self,
        sandbox: &str,
        node: NodeId,
        templates: &Arc<NodeTemplates>,
        (opts, dumps): (&RestoreOptions, &Dumps),
        keep: usize,
    ) {
        if keep == 0 {
            return;
        }
        let mut map = lock(&self.per_sandbox);
        let queue = map.entry(sandbox.to_owned()).or_default();
        let entry = remove(queue, node).unwrap_or_else(|| NodeStandby {
            node,
            sessions: spawn_all(templates, opts, dumps),
        });
        queue.push_front(entry);
        // Dropped outside the lock (each drop only closes a channel; the thread then
        // kills its child): the map is the rollbacks' way in.
        let old: Vec<_> = queue.drain(keep.min(queue.len())..).collect();
        drop(map);
        drop(old);
    }

    /// Replaces every standby of `node` with forks of `templates` (the node's new ones,
    /// after a re-root), each into the cgroup `opts_of` its sandbox gives, keeping the
    /// sandboxes' orders.
    pub fn refork(
        &self,
        node: NodeId,
        templates: &Arc<NodeTemplates>,
        opts_of: impl Fn(&str) -> RestoreOptions,
    ) {
        let mut gone = Vec::new();
        let mut map = lock(&self.per_sandbox);
        for (sandbox, queue) in map.iter_mut() {
            for entry in queue.iter_mut().filter(|s| s.node == node) {
                // A re-root starts from the node's dumps: they are written.
                let fresh = spawn_all(templates, &opts_of(sandbox), &None);
                gone.push(std::mem::replace(&mut entry.sessions, fresh));
            }
        }
        drop(map);
        drop(gone);
    }

    /// Takes `sandbox`'s standbys of `node`, if any.
    pub fn take(&self, sandbox: &str, node: NodeId) -> Vec<Standby> {
        let mut map = lock(&self.per_sandbox);
        map.get_mut(sandbox)
            .and_then(|queue| remove(queue, node))
            .map(|s| s.sessions)
            .unwrap_or_default()
    }

    /// Drops every standby of `node` (its templates are evicted or removed).
    pub fn forget_node(&self, node: NodeId) {
        let mut gone = Vec::new();
        let mut map = lock(&self.per_sandbox);
        for queue in map.values_mut() {
            while let Some(entry) = remove(queue, node) {
                gone.push(entry);
            }
        }
        drop(map);
        drop(gone);
    }

    /// Drops every standby of `sandbox` (removed, or its processes are no longer its
    /// nodes').
    pub fn forget_sandbox(&self, sandbox: &str) {
        let gone = lock(&self.per_sandbox).remove(sandbox);
        drop(gone);
    }

    /// How many standby children of `node`'s template of `session` are forked and held:
    /// each shares every page of the template (they never ran).
    pub fn forks_of(&self, node: NodeId, session: SessionId) -> usize {
        lock(&self.per_sandbox)
            .values()
            .flatten()
            .filter(|s| s.node == node)
            .flat_map(|s| &s.sessions)
            .filter(|s| s.session == session && s.child.load(Ordering::Relaxed) != 0)
            .count()
    }

    /// How many standby children are held, and how many standbys are still to fork.
    pub fn counts(&self) -> StandbyCounts {
        let map = lock(&self.per_sandbox);
        let mut counts = StandbyCounts::default();
        for s in map.values().flatten().flat_map(|s| &s.sessions) {
            if s.child.load(Ordering::SeqCst) != 0 {
                counts.ready += 1;
            } else if s.pending() {
                counts.pending += 1;
            }
        }
        counts
    }

    /// Drops every standby (the daemon stops).
    pub fn forget_all(&self) {
        let gone = std::mem::take(&mut *lock(&self.per_sandbox));
        drop(gone);
    }
}

/// Takes `node`'s entry out of a sandbox's queue.
fn remove(queue: &mut VecDeque<NodeStandby>, node: NodeId) -> Option<NodeStandby> {
    let i = queue.iter().position(|s| s.node == node)?;
    queue.remove(i)
}

/// The dumps a standby waits for before it forks: the dumps directory and the names.
pub(super) type Dumps = Option<(PathBuf, Vec<String>)>;

/// Whether every dump of `dumps` is on disk.
///
/// An injection into a template is killed with the daemon (`PTRACE_O_EXITKILL`: a
/// template left thawed with injected registers could run sandbox code), so a daemon
/// killed during a fork loses the template. Until the node's dumps are written the
/// template is its only copy: standbys fork only then (a rollback's own fork cannot
/// wait).
fn on_disk(dumps: &Dumps) -> bool {
    dumps
        .as_ref()
        .is_none_or(|(root, names)| names.iter().all(|name| Dump::exists(root, name)))
}

/// A standby for each live session template of `templates`, each forked on a thread of
/// its own once `dumps` are written ([`on_disk`]). Dumps not written yet are waited for
/// as `queue_reroot` waits for them: a job queued behind them on the dump thread, which
/// runs jobs in order, says when (and, dropped unrun, lets the threads go). A thread
/// that cannot be started leaves its session to the rollback's fork.
fn spawn_all(templates: &Arc<NodeTemplates>, opts: &RestoreOptions, dumps: &Dumps) -> Vec<Standby> {
    let pending = dumps.as_ref().filter(|_| !on_disk(dumps));
    let mut written = Vec::new();
    let mut standbys = Vec::new();
    for (index, (session, kind, template)) in templates.sessions.iter().enumerate() {
        if !template.is_alive() {
            continue;
        }
        let (go_tx, go_rx) = mpsc::channel::<RestoreOptions>();
        let (done_tx, done_rx) = mpsc::channel();
        let held = Arc::clone(templates);
        let opts = opts.clone();
        let child = Arc::new(AtomicI32::new(0));
        let seen = Arc::clone(&child);
        let fork = Arc::new(AtomicU8::new(WAITING));
        let starting = Arc::clone(&fork);
        let dumps = dumps.clone();
        let ready = pending.map(|_| {
            let (tx, rx) = mpsc::channel::<()>();
            written.push(tx);
            rx
        });
        let spawned = std::thread::Builder::new()
            .name("deltabox-standby".to_owned())
            .spawn(move || {
                let _ends = Ends(Arc::clone(&starting));
                if let Some(ready) = ready {
                    let _ = ready.recv();
                }
                // Dropped meanwhile, or a dump failed: no fork.
                let dropped = matches!(go_rx.try_recv(), Err(mpsc::TryRecvError::Disconnected));
                if dropped || !on_disk(&dumps) {
                    return;
                }
                crate::foreground::yield_to_running(crate::foreground::BACKGROUND_WAIT);
                if !start_fork(&starting) {
                    // A rollback to the node came first and forked for itself.
                    return;
                }
                let template = &held.sessions[index].2;
                worker(template, &opts, (&go_rx, &done_tx), Some(&seen));
            });
        match spawned {
            Ok(_) => standbys.push(Standby {
                session: *session,
                kind: *kind,
                finisher: Finisher::new(go_tx, done_rx),
                child,
                fork,
            }),
            Err(e) => tracing::debug!(session = %session, "no standby fork: {e}"),
        }
    }
    if let Some((root, _)) = pending {
        DumpWorker::for_root(root).submit(move || {
            for tx in written {
                let _ = tx.send(());
            }
        });
    }
    standbys
}

/// Where standby forks of sandbox `sandbox` are born (its `standby/` cgroup), and the
/// root and session their fix-up is prepared for.
pub(super) fn standby_options(runtime: &TreeRuntime, sandbox: &str) -> RestoreOptions {
    let standby = (
        runtime.standby_cgroup(sandbox),
        runtime.standby_cgroup_in_ns(sandbox),
    );
    session_options(runtime, sandbox, standby)
}

impl SandboxManager {
    /// Standby forks of `node`'s sessions for `live` (after its checkpoint of the node,
    /// or its rollback to it), unless standbys are off.
    pub(super) fn prepare_standbys(&self, live: &Live, node: NodeId) {
        if self.cfg.standby_nodes == 0 {
            return;
        }
        let Some(templates) = lock(&live.tree.templates).get(&node).cloned() else {
            return;
        };
        let name = live.name();
        let opts = standby_options(&live.tree.runtime, &name);
        let dumps = (self.cfg.pool.dump_policy == DumpPolicy::Eager).then(|| {
            let names = templates
                .sessions
                .iter()
                .map(|(sid, _, _)| dump_name(&node.to_string(), &sid.to_string()))
                .collect();
            (self.dumps_root(), names)
        });
        live.tree.standbys.prepare(
            &name,
            node,
            &templates,
            (&opts, &dumps),
            self.cfg.standby_nodes,
        );
    }

    /// The `standbys` whose fork succeeded, each moved into sandbox `name`'s `work/`
    /// cgroup (after the rollback's kill listed the processes there: they are not
    /// killed), counted as pool hits of `node`. One that failed is dropped and its
    /// session left to the rollback's own fork, and so is one whose template is no
    /// longer the node's live one (`templates`, as the rollback found them): killed
    /// or evicted, the node is restored as without standbys, from its dump, and gets
    /// its templates back.
    pub(super) fn standbys_in_work<'a>(
        &self,
        runtime: &TreeRuntime,
        name: &str,
        (node, templates): (NodeId, Option<&NodeTemplates>),
        standbys: Vec<Standby>,
    ) -> Vec<Preforked<'a>> {
        let procs = runtime.work_cgroup(name).join("cgroup.procs");
        let mut ready = Vec::new();
        for mut standby in standbys {
            if templates
                .and_then(|t| t.live_session(standby.session))
                .is_none()
            {
                tracing::debug!(session = %standby.session, "standby fork of a dead template dropped");
                continue;
            }
            if !standby.claim() {
                // Not forking yet (its node's dumps are being written, say): the
                // rollback forks, rather than wait.
                continue;
            }
            let moved = standby.forked().and_then(|pid| {
                std::fs::write(&procs, pid.as_raw().to_string())
                    .map_err(|e| format!("moving pid {pid} to {}: {e}", procs.display()))
            });
            match moved {
                Ok(()) => {
                    self.pool.hit();
                    ready.push(Preforked::Worker(
                        standby.session,
                        standby.kind,
                        standby.finisher,
                    ));
                }
                Err(e) => {
                    tracing::debug!(session = %standby.session, "standby fork not used: {e}");
                }
            }
        }
        if !ready.is_empty() {
            self.pool.touch(node);
        }
        ready
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn standby(child: i32, fork: u8) -> Standby {
        let (go, _) = mpsc::channel();
        let (_, done) = mpsc::channel();
        Standby {
            session: SessionId::new(),
            kind: SessionKind::Python,
            finisher: Finisher::new(go, done),
            child: Arc::new(AtomicI32::new(child)),
            fork: Arc::new(AtomicU8::new(fork)),
        }
    }

    #[test]
    fn a_rollback_takes_a_standby_forked_or_forking_and_stops_one_not_started() {
        assert!(standby(42, FORKING).claim(), "forked");
        let forking = standby(0, FORKING);
        assert!(forking.claim(), "being forked: waited for");
        assert_eq!(forking.fork.load(Ordering::SeqCst), FORKING);

        let waiting = standby(0, WAITING);
        assert!(!waiting.claim(), "not started: the rollback forks");
        // The thread, past its waits, then finds it abandoned and forks nothing.
        assert!(!start_fork(&waiting.fork));
        assert!(!waiting.claim(), "claimed once only");

        let fresh = standby(0, WAITING);
        assert!(
            start_fork(&fresh.fork),
            "nothing claimed it: the thread forks"
        );
        assert!(fresh.claim(), "then a rollback waits for that fork");
    }

    #[test]
    fn a_standby_is_pending_until_forked_or_its_thread_ends() {
        assert!(standby(0, WAITING).pending(), "waiting for the dumps");
        assert!(standby(0, FORKING).pending(), "forking");
        assert!(!standby(42, FORKING).pending(), "forked");
        assert!(
            !standby(0, ABANDONED).pending(),
            "a rollback forked instead"
        );
        let failed = standby(0, FORKING);
        drop(Ends(Arc::clone(&failed.fork)));
        assert!(!failed.pending(), "the thread left without a child");
        assert!(!failed.claim(), "its rollback forks for itself");

        let standbys = Standbys::default();
        let node = NodeId::new();
        lock(&standbys.per_sandbox)
            .entry("sb".to_owned())
            .or_default()
            .push_back(NodeStandby {
                node,
                sessions: vec![standby(42, FORKING), standby(0, WAITING), standby(0, ENDED)],
            });
        assert_eq!(
            standbys.counts(),
            StandbyCounts {
                ready: 1,
                pending: 1
            }
        );
    }
}
