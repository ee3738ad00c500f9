//! Rollback: the sandbox's processes killed, its files switched to the node's, the
//! node's processes forked from their templates (or rebuilt from dumps).
//!
//! The sessions' templates are forked while the killed processes are still exiting
//! ([`SandboxManager::prefork_sessions`]); the switch of the files and every restored
//! process's fix-up wait until they are gone, so that nothing a dying process flushes
//! on its way out (the dirty pages of a shared file mapping, written back when its
//! files close) lands in the restored state. With several sessions, each is forked and
//! finished on a thread of its own (ptrace binds the child to the thread that forked
//! it), so that a big session's fork and fix-up do not wait for another's.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc;
use std::thread::Scope;
use std::time::Instant;

use nix::unistd::Pid;

use super::{SandboxManager, ms, snapshot_of};
use crate::api::sandbox_types::{RollbackMode, RollbackResult, RollbackTimings};
use crate::cr::{CrError, Forked, RestoreOptions, RestoreTimings, Restored, Template};
use crate::sandbox::error::SandboxError;
use crate::sandbox::manager::{Live, LiveSession, NodeTemplates, db_err, store_err};
use crate::sandbox::runtime::TreeRuntime;
use crate::sandbox::session::SessionKind;
use crate::tree::ids::{NodeId, SessionId};
use crate::tree::records::NodeRecord;

/// A session's template forked ahead of the rest of its restore: here, or on the
/// thread that forked it, which then finishes it.
pub(in crate::sandbox::manager) enum Preforked<'a> {
    Here(SessionId, SessionKind, Forked<'a>),
    Worker(SessionId, SessionKind, Finisher),
}

/// The way to a worker thread holding a forked child: the options of its fix-up go
/// in, the restored process comes out.
pub(in crate::sandbox::manager) struct Finisher {
    go: Option<mpsc::Sender<RestoreOptions>>,
    done: mpsc::Receiver<Report>,
    /// The child, once the thread said it forked.
    child: Option<Pid>,
}

impl Finisher {
    /// The handle of a thread running [`worker`] with the other ends.
    pub(in crate::sandbox::manager) fn new(
        go: mpsc::Sender<RestoreOptions>,
        done: mpsc::Receiver<Report>,
    ) -> Self {
        Self {
            go: Some(go),
            done,
            child: None,
        }
    }

    /// Waits until the thread has forked: the child, or why there is none.
    pub(in crate::sandbox::manager) fn forked(&mut self) -> Result<Pid, String> {
        if let Some(pid) = self.child {
            return Ok(pid);
        }
        match self.done.recv() {
            Ok(Report::Forked(Ok(pid))) => {
                self.child = Some(pid);
                Ok(pid)
            }
            Ok(Report::Forked(Err(e))) => Err(e),
            _ => Err("the thread forking the session is gone".to_owned()),
        }
    }
}

impl Drop for Finisher {
    /// A worker started but never finished (the rollback failed on another session):
    /// the process it restored is no session of the sandbox, so it is killed. One never
    /// started kills its forked child itself when `go` goes.
    fn drop(&mut self) {
        if self.go.is_none()
            && let Ok(Report::Finished(Ok(restored))) = self.done.recv()
        {
            let _ = restored.kill();
        }
    }
}

/// What a worker thread says: its fork (the child), then its fix-up.
pub(in crate::sandbox::manager) enum Report {
    Forked(Result<Pid, String>),
    Finished(Result<Restored, CrError>),
}

/// A worker thread's work: forks `template` into the cgroup of `opts`, says so (in
/// `child` too, if given, until the child is finished or dropped), waits for the
/// options of the child's fix-up and finishes it. With `go` closed first, the child is
/// dropped (killed). A standby's fork (`child` given) is not counted in the timings of
/// the restore it later serves, and the part of its fix-up that needs neither the
/// files nor the killed processes is done at once, for the root and session `opts`
/// names ([`Forked::prepare`]). A standby forks only while no state operation runs
/// ([`crate::foreground`]); lowering its priority (nice 19) did not make the SWE
/// bench's rollbacks faster.
pub(in crate::sandbox::manager) fn worker(
    template: &Template,
    opts: &RestoreOptions,
    (go, done): (&mpsc::Receiver<RestoreOptions>, &mpsc::Sender<Report>),
    child: Option<&AtomicI32>,
) {
    let standby = child.is_some();
    let forked = template.fork_child(opts).and_then(|mut forked| {
        if standby {
            forked.prepare(opts.chroot.as_deref(), opts.setsid)?;
        }
        Ok(forked)
    });
    let mut forked = match forked {
        Ok(f) => f,
        Err(e) => {
            let _ = done.send(Report::Forked(Err(e.to_string())));
            return;
        }
    };
    let _forgotten = child.map(|c| {
        c.store(forked.pid().as_raw(), Ordering::Relaxed);
        Cleared(c)
    });
    if done.send(Report::Forked(Ok(forked.pid()))).is_err() {
        return;
    }
    if let Ok(opts) = go.recv() {
        if standby {
            forked.made_ahead();
        }
        let _ = done.send(Report::Finished(forked.finish(&opts)));
    }
}

impl Preforked<'_> {
    /// The session it restores.
    pub(super) fn session(&self) -> SessionId {
        match self {
            Self::Here(sid, _, _) | Self::Worker(sid, _, _) => *sid,
        }
    }

    /// The session's kind.
    pub(super) fn kind(&self) -> SessionKind {
        match self {
            Self::Here(_, kind, _) | Self::Worker(_, kind, _) => *kind,
        }
    }

    /// Starts the rest of the restore on its worker thread (nothing for one forked
    /// here), so that several sessions' fix-ups run at once; [`Self::finish`] then
    /// waits for it.
    pub(super) fn start(&mut self, opts: &RestoreOptions) {
        if let Self::Worker(_, _, w) = self
            && let Some(go) = w.go.take()
        {
            // A worker gone is reported by `finish`.
            let _ = go.send(opts.clone());
        }
    }

    /// The rest of the restore ([`Forked::finish`]), where the fork was made (started
    /// with `opts` unless [`Self::start`]ed already). `Err` if its worker thread is
    /// gone (it panicked).
    pub(super) fn finish(
        mut self,
        opts: &RestoreOptions,
    ) -> Result<Result<Restored, CrError>, String> {
        self.start(opts);
        match self {
            Self::Here(_, _, forked) => Ok(forked.finish(opts)),
            Self::Worker(sid, _, w) => match w.done.recv() {
                Ok(Report::Finished(r)) => Ok(r),
                _ => Err(format!("the thread restoring session {sid} is gone")),
            },
        }
    }
}

/// Sets its pid back to 0 when dropped: the child is no longer held.
struct Cleared<'a>(&'a AtomicI32);

impl Drop for Cleared<'_> {
    fn drop(&mut self) {
        self.0.store(0, Ordering::Relaxed);
    }
}

/// Forks `template` on a new thread of `scope`, which then waits for the options of
/// the child's fix-up and finishes it there ([`worker`]). Dropping the [`Finisher`]
/// unused drops the child (killed) on that thread.
fn fork_on_worker<'scope>(
    scope: &'scope Scope<'scope, '_>,
    template: &'scope Template,
    opts: RestoreOptions,
) -> Finisher {
    let (go_tx, go_rx) = mpsc::channel::<RestoreOptions>();
    let (done_tx, done_rx) = mpsc::channel();
    scope.spawn(move || worker(template, &opts, (&go_rx, &done_tx), None));
    Finisher::new(go_tx, done_rx)
}

impl SandboxManager {
    /// Rolls `live` (its lock held) back to `node`.
    pub(in crate::sandbox::manager) fn rollback_locked(
        &self,
        live: &mut Live,
        node: NodeId,
        mode: RollbackMode,
    ) -> Result<RollbackResult, SandboxError> {
        let _first = crate::foreground::begin();
        let start = Instant::now();
        let name = live.name();
        let (record, templates) = self.node_of_tree(node, &live.tree)?;
        if record.tree != live.record.tree {
            return Err(SandboxError::NodeOfAnotherTree {
                node: node.to_string(),
                node_tree: record.tree.to_string(),
                sandbox: name,
                sandbox_tree: live.record.tree.to_string(),
            });
        }
        let restore_processes = mode != RollbackMode::FilesOnly;
        let restore_files = mode != RollbackMode::ProcessesOnly;
        // Refuse before anything is killed: the node must be restorable.
        if restore_processes {
            self.refuse_unrestorable(&live.tree, &record, templates.as_deref())?;
            for s in &record.sessions {
                if !self.restorable(node, s.session, templates.as_deref()) {
                    return Err(SandboxError::NodeNotRestorable {
                        node: node.to_string(),
                        session: s.session.to_string(),
                        why: "its template is gone and it has no dump; `--files-only` still \
                              restores the files"
                            .to_owned(),
                    });
                }
            }
        }
        let mut timings = RollbackTimings::default();
        let standby_sessions = std::thread::scope(|scope| {
            self.rollback_in(
                scope,
                live,
                (&record, templates.as_deref()),
                (restore_processes, restore_files),
                &mut timings,
            )
        })?;
        live.record.head = Some(node);
        live.record.sessions = live.session_records();
        self.db.put_sandbox(&live.record).map_err(db_err)?;
        if restore_processes {
            // The next rollback here finds its sessions forked already.
            self.prepare_standbys(live, node);
        }
        timings.total_ms = ms(start);
        Ok(RollbackResult {
            sandbox: name,
            node: node.to_string(),
            mode,
            sessions: live.sessions.values().map(LiveSession::info).collect(),
            timings,
            standby_sessions,
            // The warm-up, if any, is started by the caller (metrics::cow).
            warm_up: false,
        })
    }

    /// The kill, the files' switch and the processes' restore of [`Self::rollback_locked`],
    /// in `scope` (the threads that fork and finish the sessions, if several). How many
    /// sessions were standby forks.
    fn rollback_in<'scope>(
        &self,
        scope: &'scope Scope<'scope, '_>,
        live: &mut Live,
        (record, templates): (&NodeRecord, Option<&'scope NodeTemplates>),
        (restore_processes, restore_files): (bool, bool),
        timings: &mut RollbackTimings,
    ) -> Result<u32, SandboxError> {
        let name = live.name();
        let mut preforked = Vec::new();
        let mut prefork_ms = 0.0;
        let mut from_standby = 0;
        if restore_processes {
            let t = Instant::now();
            let runtime = &live.tree.runtime;
            let standbys = live.tree.standbys.take(&name, record.id);
            // Frozen and killed before the sessions' handles go (dropping one kills its
            // process group, whose exit a freeze would then wait for).
            let killed = runtime
                .kill_work_start(&name)
                .map_err(|e| SandboxError::internal(format!("sandbox {name}: killing"), e))?;
            live.sessions.clear();
            timings.kill_ms = ms(t);
            // While the killed processes exit (milliseconds for a big one, on another
            // CPU), the sessions without a standby fork are forked from their templates;
            // the children wait in their attach stop, and nothing that needs the old
            // processes gone (the files' switch, the children's fix-up) happens before
            // `wait`. The standbys join `work/` now: the kill has listed its processes.
            let t = Instant::now();
            let ready = self.standbys_in_work(runtime, &name, (record.id, templates), standbys);
            from_standby = ready.len() as u32;
            let skip: Vec<SessionId> = ready.iter().map(Preforked::session).collect();
            let forking = self.prefork_sessions(scope, runtime, &name, record, templates, &skip);
            prefork_ms = ms(t);
            let t = Instant::now();
            killed
                .wait()
                .map_err(|e| SandboxError::internal(format!("sandbox {name}: killing"), e))?;
            timings.kill_ms += ms(t);
            // The forks on worker threads ran meanwhile: what is left of them counts.
            let t = Instant::now();
            preforked = self.forked(forking, record.id);
            preforked.extend(ready);
            prefork_ms += ms(t);
        }
        if restore_files {
            let t = Instant::now();
            let Some(view) = live.view.as_ref() else {
                return Err(SandboxError::internal(
                    format!("sandbox {name}"),
                    "no root view",
                ));
            };
            view.switch(snapshot_of(record)?)
                .map_err(|e| store_err(format!("sandbox {name}: switching files"), e))?;
            timings.files_ms = ms(t);
        }
        if restore_processes {
            let t = Instant::now();
            let mut phases = RestoreTimings::default();
            let restored = self.restore_sessions_preforked(
                &live.tree,
                &name,
                record,
                super::Source::Nearest(templates),
                preforked,
                &mut phases,
            );
            timings.processes_ms = prefork_ms + ms(t);
            let in_ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
            timings.fork_ms = in_ms(phases.fork);
            timings.fallback_ms = in_ms(phases.memory);
            timings.fixup_ms = in_ms(phases.fixup);
            timings.resume_ms = in_ms(phases.resume);
            let restored = match restored {
                Ok(r) => r,
                Err(e) => {
                    live.record.sessions = live.session_records();
                    let _ = self.db.put_sandbox(&live.record);
                    return Err(e);
                }
            };
            live.sessions = restored.into_iter().map(|s| (s.id, s)).collect();
            // Restored from dumps alone: the sessions become the node's templates
            // again, so that the next restore of the node is a fork.
            self.retemplate_if_dumped(live, record, templates);
        }
        Ok(from_standby)
    }

    /// Forks each session of `node` whose own template is live, into sandbox `name`'s
    /// `work/` cgroup: the first half of its restore ([`Preforked::finish`] is the rest).
    /// One session is forked here; several each on a thread of `scope`, whose forks
    /// [`Self::forked`] collects. A fork that fails is left to the full restore (after
    /// the killed processes are gone: a fork refused for the pids limit they still hold
    /// then succeeds).
    fn prefork_sessions<'scope>(
        &self,
        scope: &'scope Scope<'scope, '_>,
        runtime: &TreeRuntime,
        name: &str,
        node: &NodeRecord,
        templates: Option<&'scope NodeTemplates>,
        skip: &[SessionId],
    ) -> Vec<Preforked<'scope>> {
        let Some(templates) = templates else {
            return Vec::new();
        };
        let opts = RestoreOptions {
            cgroup: Some(runtime.work_cgroup(name)),
            cgroup_seen: runtime.work_cgroup_in_ns(name),
            ..RestoreOptions::default()
        };
        let live: Vec<_> = node
            .sessions
            .iter()
            .filter(|s| !skip.contains(&s.session))
            .filter_map(|s| templates.live_session(s.session))
            .collect();
        if live.len() > 1 {
            return live
                .into_iter()
                .map(|(sid, kind, template)| {
                    Preforked::Worker(*sid, *kind, fork_on_worker(scope, template, opts.clone()))
                })
                .collect();
        }
        let mut forked = Vec::new();
        for (sid, kind, template) in live {
            match template.fork_child(&opts) {
                Ok(child) => forked.push(Preforked::Here(*sid, *kind, child)),
                Err(e) => {
                    tracing::debug!(session = %sid, "fork ahead of the rollback failed: {e}");
                }
            }
        }
        forked
    }

    /// The sessions [`Self::prefork_sessions`] forked, once each worker thread has
    /// forked (or failed to: that session is left to the full restore); counts the
    /// pool's hits and the node's use.
    fn forked<'a>(&self, forking: Vec<Preforked<'a>>, node: NodeId) -> Vec<Preforked<'a>> {
        let mut forked = Vec::with_capacity(forking.len());
        for mut p in forking {
            let ok = match &mut p {
                Preforked::Here(..) => true,
                Preforked::Worker(sid, _, w) => match w.forked() {
                    Ok(_) => true,
                    Err(e) => {
                        tracing::debug!(session = %sid, "fork ahead of the rollback failed: {e}");
                        false
                    }
                },
            };
            if ok {
                self.pool.hit();
                forked.push(p);
            }
        }
        if !forked.is_empty() {
            self.pool.touch(node);
        }
        forked
    }
}
