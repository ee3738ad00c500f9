//! The checkpoint tree's operations: checkpoint (files and processes at one instant),
//! rollback, branch.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use deltafs::{FreezeOpts, SnapshotId};
use nix::unistd::Pid;

use super::{Live, LiveSession, NodeTemplates, SandboxManager, Tree, db_err, lock, store_err};
use crate::api::sandbox_types::{BranchResult, CheckpointTimings, NodeInfo, NodeSessionInfo};
use crate::cr::pidfd::Pidfd;
use crate::cr::{self, CheckpointOptions, RestoreOptions, RestoreTimings, Template};
use crate::sandbox::error::SandboxError;
use crate::sandbox::runtime::{Limits, TreeRuntime};
use crate::sandbox::session::{SessionIo, SessionKind};
use crate::tree::db::Op;
use crate::tree::ids::{NodeId, SandboxId, SessionId};
use crate::tree::records::{NodeRecord, NodeSession, SandboxRecord, SandboxState, unix_ms_now};

mod fallback;
pub(super) mod process_dumps;
mod proctree;
mod reroot;
pub(super) mod rollback;

use fallback::Source;

/// The most sandboxes one branch call makes.
const MAX_BRANCHES: u32 = 64;

/// The DeltaFS snapshot of a node.
pub(super) fn snapshot_of(node: &NodeRecord) -> Result<SnapshotId, SandboxError> {
    node.snapshot
        .parse()
        .map_err(|e| SandboxError::internal(format!("node {}: its snapshot id", node.id), e))
}

/// Checkpoints each session, in parallel when there are several: each is paused only
/// for its own fork, and a session's checkpoint is mostly waiting on the kernel (ptrace
/// stops, injected syscalls), so two sessions take about the time of the slower one.
/// Each thread seizes, injects and detaches its own process (ptrace allows no hand-over
/// between threads mid-way).
fn checkpoint_all(
    sessions: &[(SessionId, SessionKind, Pid, u32)],
    opts: &CheckpointOptions,
) -> Vec<(SessionId, SessionKind, Result<Template, String>)> {
    let one = |&(id, kind, pid, generation): &(SessionId, SessionKind, Pid, u32)| {
        let opts = CheckpointOptions {
            generation,
            ..opts.clone()
        };
        (
            id,
            kind,
            cr::checkpoint(pid, &opts).map_err(|e| e.to_string()),
        )
    };
    if sessions.len() < 2 {
        return sessions.iter().map(one).collect();
    }
    std::thread::scope(|scope| {
        let running: Vec<_> = sessions
            .iter()
            .map(|session| (session, scope.spawn(move || one(session))))
            .collect();
        running
            .into_iter()
            .map(|(&(id, kind, _, _), handle)| {
                handle.join().unwrap_or_else(|_| {
                    (id, kind, Err("its checkpoint thread panicked".to_owned()))
                })
            })
            .collect()
    })
}

/// Where `live`'s templates go and how its processes name things (generation 0: each
/// session's is set apart).
pub(super) fn checkpoint_options(live: &Live) -> Result<CheckpointOptions, SandboxError> {
    let name = live.name();
    let runtime = &live.tree.runtime;
    Ok(CheckpointOptions {
        template_cgroups: runtime.templates_cgroup(),
        template_cgroups_seen: runtime.templates_cgroup_in_ns(&name),
        root_prefix: Some(runtime.root_in_ns(&name)),
        template_root: Some(live.tree.root_in_ns()?),
        inherited_stdio: false,
        generation: 0,
    })
}

/// Moves `pid` into the sandbox's cgroup v1 limit directories (this host keeps memory,
/// cpu and pids on cgroup v1) unless it is in them already: a process restored from a
/// template taken in the same sandbox is (fork keeps cgroups), a branch is not. A v1
/// migration waits for an RCU grace period, so it is skipped when it can be.
fn join_limit_cgroups(
    runtime: &crate::sandbox::runtime::TreeRuntime,
    name: &str,
    pid: nix::unistd::Pid,
) -> Result<(), SandboxError> {
    let pid = pid.as_raw();
    for dir in runtime.limit_cgroups(name) {
        let procs = dir.join("cgroup.procs");
        let listed = std::fs::read_to_string(&procs).unwrap_or_default();
        if listed.lines().any(|l| l.trim().parse() == Ok(pid)) {
            continue;
        }
        std::fs::write(&procs, pid.to_string()).map_err(|e| {
            SandboxError::internal(
                format!("sandbox {name}: moving pid {pid} to {}", procs.display()),
                e,
            )
        })?;
    }
    Ok(())
}

/// How a session of sandbox `name` is restored into `cgroup` (the host's path, and the
/// template's): in the sandbox's root, a session of its own. A standby's fix-up is done
/// ahead for exactly these ([`cr::Forked::prepare`]).
pub(super) fn session_options(
    runtime: &TreeRuntime,
    name: &str,
    (cgroup, cgroup_seen): (PathBuf, Option<PathBuf>),
) -> RestoreOptions {
    RestoreOptions {
        cgroup: Some(cgroup),
        cgroup_seen,
        chroot: runtime.chroot_path(name),
        setsid: true,
        ..RestoreOptions::default()
    }
}

/// The name serde gives a unit variant (`"added"`, `"file"`).
pub(super) fn serde_name<T: serde::Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        other => format!("{other:?}"),
    }
}

pub(super) fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// `node` for the API; `live(session)` is the generation of the session's template if
/// it is alive.
pub(super) fn node_info(
    node: &NodeRecord,
    live: &dyn Fn(SessionId) -> Option<u32>,
    timings: CheckpointTimings,
) -> NodeInfo {
    NodeInfo {
        id: node.id.to_string(),
        tree: node.tree.to_string(),
        sandbox: node.sandbox.to_string(),
        parent: node.parent.map(|p| p.to_string()),
        label: node.label.clone(),
        created_ms: node.created_ms,
        bytes: node.bytes,
        sessions: node
            .sessions
            .iter()
            .map(|s| NodeSessionInfo {
                session: s.session.to_string(),
                kind: s.kind.clone(),
                template: if s.template.is_some() && live(s.session).is_some() {
                    "live"
                } else if crate::cr::dump::worker::dumped(&crate::cr::dump::dump_name(
                    &node.id.to_string(),
                    &s.session.to_string(),
                )) {
                    // Its template is gone, its dump is there: restorable, slower.
                    "dumped"
                } else {
                    "none"
                }
                .to_owned(),
                generation: s.template.as_ref().and(live(s.session)),
            })
            .collect(),
        processes: proctree::infos(node),
        timings,
    }
}

impl SandboxManager {
    /// Checkpoints `live` (its lock held): freeze its cgroup, freeze its DeltaFS view
    /// (the instant of the checkpoint), seize its other processes and record their pipes
    /// ([`proctree`]), thaw, fork each session and each other process into a template,
    /// then write the node and the sandbox's new head in one database transaction.
    ///
    /// Between the thaw and each template fork a session is idle — blocked reading its
    /// stdin, since calls on a sandbox are serialised — so the template is its state at
    /// the freeze (DeltaCR stops it by ptrace for the fork; an injected syscall cannot
    /// run in a frozen cgroup).
    pub(super) fn checkpoint_locked(
        &self,
        live: &mut Live,
        label: Option<String>,
    ) -> Result<NodeInfo, SandboxError> {
        let _first = crate::foreground::begin();
        let start = Instant::now();
        let name = live.name();
        let runtime = &live.tree.runtime;
        let Some(view) = live.view.as_ref() else {
            return Err(SandboxError::internal(
                format!("sandbox {name}"),
                "it has no root view",
            ));
        };

        let opts = checkpoint_options(live)?;
        let extra_opts = CheckpointOptions {
            inherited_stdio: true,
            ..opts.clone()
        };
        let sessions: Vec<_> = live
            .sessions
            .values()
            .map(|s| (s.id, s.kind, s.pid, s.generation))
            .collect();
        let session_pids: Vec<Pid> = sessions.iter().map(|s| s.2).collect();

        let t = Instant::now();
        runtime
            .freeze_work(&name)
            .map_err(|e| SandboxError::internal(format!("sandbox {name}: freezing"), e))?;
        let mut quiesce_ms = ms(t);
        let t = Instant::now();
        let frozen = view.freeze(&FreezeOpts::default());
        let files_ms = ms(t);
        let t = Instant::now();
        // The other processes are taken at the freeze too: seized (a seize works in a
        // frozen cgroup; the fork waits for the thaw), their pipes read.
        let extras =
            proctree::seize_extras(&runtime.work_cgroup(&name), &session_pids, &extra_opts);
        let thawed = runtime.thaw_work(&name);
        quiesce_ms += ms(t);
        let report = frozen.map_err(|e| store_err(format!("sandbox {name}: freezing files"), e))?;
        thawed.map_err(|e| SandboxError::internal(format!("sandbox {name}: thawing"), e))?;

        let t = Instant::now();
        let mut templates = Vec::with_capacity(sessions.len());
        let (mut extras, mut failed) = match extras {
            Ok(extras) => (extras, None),
            Err(e) => (proctree::Extras::default(), Some(e)),
        };
        for (id, kind, result) in
            checkpoint_all(if failed.is_none() { &sessions } else { &[] }, &opts)
        {
            match result {
                Ok(template) => templates.push((id, kind, template)),
                Err(e) => {
                    failed.get_or_insert(format!("session {id} ({kind}): {e}"));
                }
            }
        }
        // After a failure, the processes still seized are let go.
        let processes = extras.fork_all_unless(&mut failed);
        if let Some(message) = failed {
            // The templates made are killed; the snapshot is kept for the files' sake
            // only if a node refers to it, and this one will not.
            drop(templates);
            drop(processes);
            let _ = self.store.drop_snapshot(report.id);
            return Err(SandboxError::Process {
                sandbox: name,
                message,
            });
        }
        let processes_ms = ms(t);

        let t = Instant::now();
        let node = NodeRecord {
            id: NodeId::new(),
            tree: live.record.tree,
            sandbox: live.record.id,
            parent: live.record.head,
            label,
            created_ms: unix_ms_now(),
            snapshot: report.id.to_string(),
            sessions: templates
                .iter()
                .map(|(sid, kind, template)| NodeSession {
                    session: *sid,
                    kind: kind.to_string(),
                    template: Some(super::adopt::template_record(template)),
                })
                .collect(),
            bytes: self.store.snapshot_bytes(report.id).unwrap_or(0),
            checkpoint_ms: ms(start),
            limits: serde_json::to_value(&live.limits).unwrap_or_default(),
            processes: proctree::records_of(&processes),
            pipes: extras.pipes_value(),
        };
        // The snapshot's metadata is on disk before the node is acknowledged (a daemon
        // killed right after must find it).
        if let Err(e) = self.store.flush() {
            drop(templates);
            return Err(store_err(
                format!("sandbox {name}: writing the snapshot"),
                e,
            ));
        }
        let mut record = live.record.clone();
        record.head = Some(node.id);
        if let Err(e) = self
            .db
            .commit(&[Op::PutNode(node.clone()), Op::PutSandbox(record.clone())])
        {
            drop(templates);
            let _ = self.store.drop_snapshot(report.id);
            return Err(db_err(e));
        }
        live.record = record;
        let templates = Arc::new(NodeTemplates {
            sessions: templates,
            processes: processes.into_iter().map(Arc::new).collect(),
        });
        let parent = {
            let mut map = lock(&live.tree.templates);
            map.insert(node.id, Arc::clone(&templates));
            node.parent.and_then(|p| map.get(&p).cloned())
        };
        let record_ms = ms(t);
        // Off the critical path: the dump thread reads the frozen templates.
        self.dump_node(
            &node,
            &templates,
            parent,
            live.tree.runtime.root_in_ns(&name),
        );
        self.queue_reroot(&node, &templates);
        // The likeliest rollback target is the node just taken.
        self.prepare_standbys(live, node.id);
        Ok(node_info(
            &node,
            &|session| {
                templates
                    .sessions
                    .iter()
                    .find(|(sid, _, _)| *sid == session)
                    .map(|(_, _, t)| t.generation())
            },
            CheckpointTimings {
                total_ms: ms(start),
                quiesce_ms,
                files_ms,
                processes_ms,
                record_ms,
            },
        ))
    }

    /// The node `id` of `tree`, with its templates.
    fn node_of_tree(
        &self,
        id: NodeId,
        live_tree: &Tree,
    ) -> Result<(NodeRecord, Option<Arc<NodeTemplates>>), SandboxError> {
        let node = self
            .db
            .node(&id)
            .map_err(db_err)?
            .ok_or_else(|| SandboxError::UnknownNode { id: id.to_string() })?;
        let templates = lock(&live_tree.templates).get(&id).cloned();
        Ok((node, templates))
    }

    /// Restores every session and other process of `node` into sandbox `name` of
    /// `tree`: forked from its template, or rebuilt from its dump when the template is
    /// gone.
    pub(super) fn restore_sessions(
        &self,
        tree: &Tree,
        name: &str,
        node: &NodeRecord,
        templates: Option<&NodeTemplates>,
        phases: &mut RestoreTimings,
    ) -> Result<Vec<LiveSession>, SandboxError> {
        self.restore_sessions_preforked(
            tree,
            name,
            node,
            Source::Nearest(templates),
            Vec::new(),
            phases,
        )
    }

    /// [`Self::restore_sessions`], the sessions of `preforked` finished from their
    /// children forked ahead instead of forked again.
    fn restore_sessions_preforked(
        &self,
        tree: &Tree,
        name: &str,
        node: &NodeRecord,
        source: Source<'_>,
        mut preforked: Vec<rollback::Preforked<'_>>,
        phases: &mut RestoreTimings,
    ) -> Result<Vec<LiveSession>, SandboxError> {
        let runtime = &tree.runtime;
        // Refuses (nothing started yet) what has neither a live template nor a dump.
        let templates = source.templates();
        let others = self.process_sources(tree, node, templates)?;
        // Held until every process has opened its ends.
        let mut pipes = proctree::RestorePipes::make(runtime, node)?;
        let work = (runtime.work_cgroup(name), runtime.work_cgroup_in_ns(name));
        let mut opts = RestoreOptions {
            pipes: pipes.paths.clone(),
            ..session_options(runtime, name, work)
        };
        // The sessions forked on threads of their own are fixed up at once.
        for p in &mut preforked {
            p.start(&opts);
        }
        let mut restored = Vec::new();
        for session in &node.sessions {
            let ahead = preforked
                .iter()
                .position(|p| p.session() == session.session)
                .map(|i| preforked.swap_remove(i));
            let (kind, child) = match ahead {
                Some(p) => {
                    let kind = p.kind();
                    let child = p.finish(&opts).map_err(|message| SandboxError::Process {
                        sandbox: name.to_owned(),
                        message,
                    })?;
                    (kind, child)
                }
                None => self.restore_session(tree, name, node, session, source, &opts)?,
            };
            let child = child.map_err(|e| {
                let message = format!("restoring session {}: {e}", session.session);
                if SandboxError::caused_by_errno(&e, libc::EAGAIN) {
                    // The fork of the template was refused: the pids limit (the
                    // sandbox's, or its tree's) is full.
                    SandboxError::LimitsExceeded {
                        sandbox: name.to_owned(),
                        limit: "pids",
                        message,
                    }
                } else {
                    SandboxError::Process {
                        sandbox: name.to_owned(),
                        message,
                    }
                }
            })?;
            phases.add(&child.timings);
            let pid = child.pid();
            let generation = child.generation;
            join_limit_cgroups(runtime, name, pid)?;
            let stdio = child.stdio;
            let (Some(stdin), Some(stdout), Some(stderr)) =
                (stdio.stdin, stdio.stdout, stdio.stderr)
            else {
                return Err(SandboxError::Process {
                    sandbox: name.to_owned(),
                    message: format!(
                        "restoring session {}: its fds 0-2 were not all pipes",
                        session.session
                    ),
                });
            };
            restored.push(LiveSession {
                id: session.session,
                kind,
                pid,
                group: Pidfd::open(pid).ok(),
                io: SessionIo {
                    stdin,
                    stdout,
                    stderr,
                },
                started_ms: unix_ms_now(),
                generation,
            });
        }
        if !node.processes.is_empty() {
            pipes.add_sessions(node, templates, &restored, &self.dumps_root());
            opts.pipes = pipes.paths.clone();
            proctree::restore_others(runtime, name, &others, &opts)?;
        }
        drop(pipes);
        Ok(restored)
    }

    /// Makes `count` new sandboxes at `node`: its files (a view of its snapshot) and its
    /// sessions (forked from its templates), in the node's tree.
    pub(super) fn branch_node(
        &self,
        node: NodeId,
        count: u32,
    ) -> Result<BranchResult, SandboxError> {
        let _first = crate::foreground::begin();
        if count == 0 || count > MAX_BRANCHES {
            return Err(SandboxError::Invalid {
                message: format!("count {count} must be between 1 and {MAX_BRANCHES}"),
            });
        }
        let record =
            self.db
                .node(&node)
                .map_err(db_err)?
                .ok_or_else(|| SandboxError::UnknownNode {
                    id: node.to_string(),
                })?;
        let tree = self
            .live_tree(&record.tree)
            .ok_or_else(|| SandboxError::NodeNotRestorable {
                node: node.to_string(),
                session: "-".to_owned(),
                why: "its tree is no longer running (the daemon restarted)".to_owned(),
            })?;
        // The branches get the limits of the sandbox the node was taken in.
        let limits: Limits = serde_json::from_value(record.limits.clone()).unwrap_or_default();
        let auto_checkpoint = self
            .db
            .sandbox(&record.sandbox)
            .ok()
            .flatten()
            .is_some_and(|s| s.auto_checkpoint);
        let mut sandboxes = Vec::new();
        let mut branch_ms = Vec::new();
        for _ in 0..count {
            let t = Instant::now();
            // Again for each branch: the first one from dumps re-makes the templates.
            let templates = lock(&tree.templates).get(&node).cloned();
            let info = self.branch_one(
                &tree,
                &record,
                templates.as_deref(),
                &limits,
                auto_checkpoint,
            )?;
            branch_ms.push(ms(t));
            sandboxes.push(info);
        }
        Ok(BranchResult {
            node: node.to_string(),
            sandboxes,
            branch_ms,
        })
    }

    fn branch_one(
        &self,
        tree: &Arc<Tree>,
        node: &NodeRecord,
        templates: Option<&NodeTemplates>,
        limits: &Limits,
        auto_checkpoint: bool,
    ) -> Result<crate::api::sandbox_types::SandboxInfo, SandboxError> {
        let id = SandboxId::new();
        let mut record = SandboxRecord {
            id,
            tree: tree.id,
            created_ms: unix_ms_now(),
            rootfs: self
                .db
                .trees()
                .ok()
                .and_then(|t| t.into_iter().find(|t| t.id == tree.id))
                .and_then(|t| t.rootfs),
            limits: serde_json::to_value(limits).unwrap_or_default(),
            auto_checkpoint,
            head: Some(node.id),
            branched_from: Some(node.id),
            sessions: Vec::new(),
            state: SandboxState::Creating,
        };
        self.db.put_sandbox(&record).map_err(db_err)?;
        let view = self
            .set_up(tree, id, limits, Some(snapshot_of(node)?))
            .inspect_err(|_| {
                let _ = self.db.delete_sandbox(&id);
            })?;
        let name = id.to_string();
        let mut live = Live {
            record: record.clone(),
            tree: Arc::clone(tree),
            view: Some(view),
            sessions: BTreeMap::new(),
            limits: limits.clone(),
        };
        match self.restore_sessions(tree, &name, node, templates, &mut RestoreTimings::default()) {
            Ok(sessions) => live.sessions = sessions.into_iter().map(|s| (s.id, s)).collect(),
            Err(e) => {
                let _ = self.tear_down(&mut live);
                let _ = self.db.delete_sandbox(&id);
                return Err(e);
            }
        }
        self.retemplate_if_dumped(&live, node, templates);
        record.sessions = live.session_records();
        record.state = SandboxState::Running;
        live.record = record;
        self.db.put_sandbox(&live.record).map_err(db_err)?;
        let info = live.info();
        lock(&self.sandboxes).insert(id, Arc::new(Mutex::new(live)));
        Ok(info)
    }
}
