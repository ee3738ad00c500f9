//! Templates as a cache: each node's sessions are dumped after the checkpoint, in the
//! background (`cr::dump`), and a session whose template is gone is rebuilt from its
//! dump by forking another live template of the tree — the nearest ancestor node's of
//! the same session first, then any of the same kind (which works when it is of the
//! same program run: same vdso) — or, when none is left or none works, by restoring
//! the dump into a fresh process that the tree's init starts in the sandbox
//! (`cr::husk`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use crate::cr::dump::{
    Dump, DumpOptions, DumpPolicy, DumpWorker, dump_name, dump_template_against,
};
use crate::cr::pidfd::Pidfd;
use crate::cr::{self, CheckpointOptions, CrError, RestoreOptions, Restored};
use crate::sandbox::error::SandboxError;
use crate::sandbox::manager::adopt::template_record;
use crate::sandbox::manager::{Live, NodeTemplates, SandboxManager, Tree, db_err, lock};
use crate::sandbox::runtime::TreeRuntime;
use crate::sandbox::session::SessionKind;
use crate::tree::db::Op;
use crate::tree::ids::{NodeId, SessionId};
use crate::tree::records::{NodeRecord, NodeSession};

/// Which template of a node's [`NodeTemplates`].
#[derive(Clone, Copy, Debug)]
pub(super) enum TemplateAt {
    /// The `i`th session's.
    Session(usize),
    /// The `i`th other process's.
    Process(usize),
}

impl TemplateAt {
    fn of(self, templates: &NodeTemplates) -> &cr::Template {
        match self {
            Self::Session(i) => &templates.sessions[i].2,
            Self::Process(i) => &templates.processes[i],
        }
    }
}

/// Where a restore takes a node's sessions from.
#[derive(Clone, Copy)]
pub(in crate::sandbox::manager) enum Source<'a> {
    /// Its templates (the node's, if any) if alive, else its dumps through the nearest
    /// live template.
    Nearest(Option<&'a NodeTemplates>),
    /// Its dump, through the live template of the same kind with the lowest generation
    /// below `below` (the same session's first), else into a husk: a process whose
    /// lineage is shorter than its node's template's (`super::reroot`).
    Shallow {
        /// Templates of this generation or more are not forked.
        below: u32,
    },
}

impl<'a> Source<'a> {
    /// The node's templates, if they are to be forked.
    pub(in crate::sandbox::manager) fn templates(self) -> Option<&'a NodeTemplates> {
        match self {
            Self::Nearest(templates) => templates,
            Self::Shallow { .. } => None,
        }
    }
}

/// The dump of `session` at `node`.
fn name_of(node: NodeId, session: SessionId) -> String {
    dump_name(&node.to_string(), &session.to_string())
}

impl SandboxManager {
    /// `<data dir>/dumps`.
    pub(in crate::sandbox::manager) fn dumps_root(&self) -> PathBuf {
        self.cfg.data_dir.join("dumps")
    }

    /// Queues the dumps of a new node's templates (policy `eager`): each session's
    /// incremental against the parent node's dump of the same session, each other
    /// process's against the same process's (`process_dumps.rs`). `parent` is the
    /// parent node's templates, if any: the dumps are compared with them frame by frame
    /// (a page still shared with the parent's template is not read). Then puts the
    /// templates in the pool (which does not evict them before their dumps are written).
    pub(super) fn dump_node(
        &self,
        node: &NodeRecord,
        templates: &Arc<NodeTemplates>,
        parent: Option<Arc<NodeTemplates>>,
        root_prefix: PathBuf,
    ) {
        if self.pool.config().dump_policy == DumpPolicy::Eager {
            let worker = DumpWorker::for_root(&self.dumps_root());
            for (i, (session, _, _)) in templates.sessions.iter().enumerate() {
                let opts = DumpOptions {
                    root: worker.root().to_path_buf(),
                    name: name_of(node.id, *session),
                    parent: node.parent.map(|p| name_of(p, *session)),
                    root_prefix: Some(root_prefix.clone()),
                };
                let base = parent.as_ref().and_then(|p| {
                    let at = p
                        .sessions
                        .iter()
                        .position(|(sid, _, t)| sid == session && t.is_alive())?;
                    Some((Arc::clone(p), TemplateAt::Session(at)))
                });
                self.submit_dump(
                    &worker,
                    opts,
                    Arc::clone(templates),
                    TemplateAt::Session(i),
                    base,
                );
            }
            self.queue_process_dumps(&worker, node, templates, parent.as_ref(), &root_prefix);
        }
        self.pool.admit(node.tree, node.id);
    }

    /// Queues the dump `opts` of the template at `at` among `templates`, which the pool
    /// does not evict until it is written; `base` is the template the parent dump was
    /// made from, if live (see [`dump_template_against`]), held until the dump is done.
    pub(super) fn submit_dump(
        &self,
        worker: &DumpWorker,
        opts: DumpOptions,
        templates: Arc<NodeTemplates>,
        at: TemplateAt,
        base: Option<(Arc<NodeTemplates>, TemplateAt)>,
    ) {
        self.pool
            .dump_queued(&opts.name, base.as_ref().map(|(t, _)| t));
        let pool = self.pool.handle();
        worker.submit(move || {
            let base_template = base.as_ref().map(|(t, at)| at.of(t));
            match dump_template_against(at.of(&templates), &opts, base_template) {
                Ok(stats) => tracing::info!(
                    dump = %opts.name, pages = stats.pages, written = stats.written,
                    unchanged = stats.unchanged, ms = stats.ms, "dumped"
                ),
                Err(e) => tracing::warn!(dump = %opts.name, "not dumped: {e}"),
            }
            // The job's hold on the templates goes before the pool may evict.
            drop(templates);
            drop(base);
            pool.dump_done(&opts.name);
        });
    }

    /// Whether `session` has a live template in `templates`.
    pub(super) fn has_live_template(session: SessionId, templates: Option<&NodeTemplates>) -> bool {
        templates.is_some_and(|t| t.live_session(session).is_some())
    }

    /// Whether every session of `node` has to come from its dump (none has a live
    /// template): then the restored sessions should become its templates again.
    pub(super) fn all_from_dumps(node: &NodeRecord, templates: Option<&NodeTemplates>) -> bool {
        !node.sessions.is_empty()
            && node
                .sessions
                .iter()
                .all(|s| !Self::has_live_template(s.session, templates))
    }

    /// [`Self::retemplate`] if every session of `node` came from its dump; a failure
    /// is logged (the node keeps restoring from its dumps).
    pub(in crate::sandbox::manager) fn retemplate_if_dumped(
        &self,
        live: &Live,
        node: &NodeRecord,
        templates: Option<&NodeTemplates>,
    ) {
        if Self::all_from_dumps(node, templates)
            && let Err(e) = self.retemplate(live, node, templates)
        {
            tracing::warn!(node = %node.id, "the node keeps restoring from its dumps: {e}");
        }
    }

    /// Makes the sessions of `live`, just restored from `node`'s dumps, the node's
    /// templates again (a checkpoint of each; its files are the node's already), so
    /// that the next restore of the node is a fork. The sessions are idle (each was
    /// waiting for its next command at the checkpoint, and resumes that wait). The
    /// node's other processes' live templates (`templates`) stay its templates; those
    /// restored from their dumps ran on at once, so they keep restoring from them.
    pub(super) fn retemplate(
        &self,
        live: &Live,
        node: &NodeRecord,
        templates: Option<&NodeTemplates>,
    ) -> Result<(), SandboxError> {
        let made = template_sessions(live)?;
        self.db
            .commit(&[Op::PutNode(with_templates(node, &made))])
            .map_err(db_err)?;
        lock(&live.tree.templates).insert(
            node.id,
            Arc::new(NodeTemplates {
                sessions: made,
                processes: live_processes(templates),
            }),
        );
        // Its dumps are on disk already (it was restored from them).
        self.pool.admit(node.tree, node.id);
        tracing::info!(node = %node.id, "its templates were re-made from the sessions restored from its dumps");
        Ok(())
    }

    /// Whether `session` of `node` can be restored: its template is alive or its dump
    /// exists.
    pub(super) fn restorable(
        &self,
        node: NodeId,
        session: SessionId,
        templates: Option<&NodeTemplates>,
    ) -> bool {
        Self::has_live_template(session, templates)
            || Dump::exists(&self.dumps_root(), &name_of(node, session))
    }

    /// Restores `session` of `node` into sandbox `name` with `opts`: a fork of its
    /// template if alive, else the fallback from its dump (a fork of another template,
    /// else a fresh process). The outer error refuses (nothing was started); the inner
    /// one is DeltaCR's.
    pub(super) fn restore_session(
        &self,
        tree: &Tree,
        name: &str,
        node: &NodeRecord,
        session: &NodeSession,
        source: Source<'_>,
        opts: &RestoreOptions,
    ) -> Result<(SessionKind, Result<Restored, CrError>), SandboxError> {
        let own = source
            .templates()
            .and_then(|t| t.live_session(session.session));
        if let Some((_, kind, template)) = own {
            self.pool.hit();
            self.pool.touch(node.id);
            return Ok((*kind, template.restore(opts)));
        }
        // A re-root's restore is no request for the node: not a miss of the pool.
        if let Source::Nearest(_) = source {
            self.pool.miss();
        }
        let refuse = |why: String| SandboxError::NodeNotRestorable {
            node: node.id.to_string(),
            session: session.session.to_string(),
            why,
        };
        let kind: SessionKind = session
            .kind
            .parse()
            .map_err(|e| refuse(format!("its kind {:?}: {e}", session.kind)))?;
        let root = self.dumps_root();
        let dumped = name_of(node.id, session.session);
        if !Dump::exists(&root, &dumped) {
            return Err(refuse(
                "its template is gone and it has no dump (dumps are written in the background \
                 after each checkpoint, or at eviction: the template died first, or the \
                 daemon runs with --dump-policy off); `--files-only` still restores the files"
                    .to_owned(),
            ));
        }
        let dump = Dump::open(&root, &dumped).map_err(|e| refuse(e.to_string()))?;
        let mut tried = Vec::new();
        let bases = match source {
            Source::Nearest(_) => self.bases(tree, node, session, kind)?,
            Source::Shallow { below } => shallow_bases(tree, session, kind, below),
        };
        for (base_node, templates, index) in bases {
            let (sid, _, template) = &templates.sessions[index];
            // A base dump describes the template only if both are of the same
            // checkpoint (a template re-made from a restored process is not its dump).
            let base = Dump::open(&root, &name_of(base_node, *sid))
                .ok()
                .filter(|b| b.state().same_checkpoint(template.state()));
            let t = Instant::now();
            match template.restore_from_dump(&dump, base.as_ref(), opts) {
                Ok(restored) => {
                    tracing::info!(
                        node = %node.id, session = %session.session, base = %base_node,
                        ms = t.elapsed().as_secs_f64() * 1e3,
                        memory_ms = restored.timings.memory.as_secs_f64() * 1e3,
                        "restored from its dump"
                    );
                    return Ok((kind, Ok(restored)));
                }
                Err(e) => {
                    tracing::warn!(node = %node.id, base = %base_node, "fallback restore failed: {e}");
                    tried.push(format!("from node {base_node}'s template: {e}"));
                }
            }
        }
        // No template of the same program run: a fresh process of the sandbox becomes it.
        let t = Instant::now();
        match restore_in_husk(&tree.runtime, name, &dump, opts) {
            Ok(restored) => {
                tracing::info!(
                    node = %node.id, session = %session.session,
                    ms = t.elapsed().as_secs_f64() * 1e3,
                    memory_ms = restored.timings.memory.as_secs_f64() * 1e3,
                    "restored from its dump into a fresh process"
                );
                return Ok((kind, Ok(restored)));
            }
            Err(e) => {
                tracing::warn!(node = %node.id, "restore into a fresh process failed: {e}");
                tried.push(format!("into a fresh process: {e}"));
            }
        }
        Err(refuse(format!(
            "its template is gone; rebuilding it from its dump failed: {}",
            tried.join("; ")
        )))
    }

    /// Templates to fork for a fallback restore, best first: the nearest ancestor's of
    /// the same session, then the other live ones of the same kind.
    fn bases(
        &self,
        tree: &Tree,
        node: &NodeRecord,
        session: &NodeSession,
        kind: SessionKind,
    ) -> Result<Vec<(NodeId, Arc<NodeTemplates>, usize)>, SandboxError> {
        let all = tree.all_templates();
        let mut out: Vec<(NodeId, Arc<NodeTemplates>, usize)> = Vec::new();
        let mut parent = node.parent;
        let mut hops = 0;
        while let Some(id) = parent {
            if let Some((_, t)) = all.iter().find(|(n, _)| *n == id)
                && let Some(i) = t
                    .sessions
                    .iter()
                    .position(|(sid, _, tpl)| *sid == session.session && tpl.is_alive())
            {
                out.push((id, Arc::clone(t), i));
                break;
            }
            parent = self.db.node(&id).map_err(db_err)?.and_then(|n| n.parent);
            hops += 1;
            if hops > 100_000 {
                break;
            }
        }
        for (id, t) in &all {
            for (i, (sid, k, tpl)) in t.sessions.iter().enumerate() {
                let already = out.iter().any(|(n, _, j)| n == id && *j == i);
                if *k == kind && !already && tpl.is_alive() {
                    // The same session's templates first.
                    let same = *sid == session.session;
                    let entry = (*id, Arc::clone(t), i);
                    if same {
                        out.insert(out.len().min(1), entry);
                    } else {
                        out.push(entry);
                    }
                }
            }
        }
        Ok(out)
    }
}

/// The live templates of `tree` of `kind` whose generation is below `below`, `session`'s
/// first, then by generation: bases of a restore that shortens a lineage.
fn shallow_bases(
    tree: &Tree,
    session: &NodeSession,
    kind: SessionKind,
    below: u32,
) -> Vec<(NodeId, Arc<NodeTemplates>, usize)> {
    let all = tree.all_templates();
    let mut out: Vec<(bool, u32, NodeId, Arc<NodeTemplates>, usize)> = Vec::new();
    for (id, t) in &all {
        for (i, (sid, k, tpl)) in t.sessions.iter().enumerate() {
            if *k == kind && tpl.generation() < below && tpl.is_alive() {
                let other = *sid != session.session;
                out.push((other, tpl.generation(), *id, Arc::clone(t), i));
            }
        }
    }
    out.sort_by_key(|(other, generation, id, _, _)| (*other, *generation, *id));
    out.into_iter().map(|(_, _, id, t, i)| (id, t, i)).collect()
}

/// Restores `dump` into a husk that the tree's init (`runtime`) starts in sandbox `name`
/// (in its cgroups and root already: `opts.chroot` is not needed). A husk that could
/// not be made the dumped process is killed.
pub(super) fn restore_in_husk(
    runtime: &TreeRuntime,
    name: &str,
    dump: &Dump,
    opts: &RestoreOptions,
) -> Result<Restored, String> {
    let (pid, pidfd) = runtime.husk(name).map_err(|e| e.to_string())?;
    let opts = RestoreOptions {
        chroot: None,
        ..opts.clone()
    };
    cr::husk::restore_into_husk(pid, dump, &opts).map_err(|e| {
        // Killed already once seized; not if refused before.
        let _ = Pidfd::from_fd(pid, pidfd).kill_and_wait(std::time::Duration::from_secs(5));
        e.to_string()
    })
}

/// Checkpoints every session of `live`, each idle (back in the wait for its next
/// command it was in at its node's checkpoint), into a new template.
pub(super) fn template_sessions(
    live: &Live,
) -> Result<Vec<(SessionId, SessionKind, cr::Template)>, SandboxError> {
    let name = live.name();
    let opts = super::checkpoint_options(live)?;
    let mut made = Vec::with_capacity(live.sessions.len());
    for session in live.sessions.values() {
        let opts = CheckpointOptions {
            generation: session.generation,
            ..opts.clone()
        };
        let template = cr::checkpoint(session.pid, &opts).map_err(|e| SandboxError::Process {
            sandbox: name.clone(),
            message: format!("re-making session {}'s template: {e}", session.id),
        })?;
        made.push((session.id, session.kind, template));
    }
    Ok(made)
}

/// `node` with `made` as its sessions' templates.
pub(super) fn with_templates(
    node: &NodeRecord,
    made: &[(SessionId, SessionKind, cr::Template)],
) -> NodeRecord {
    let mut updated = node.clone();
    for s in &mut updated.sessions {
        s.template = made
            .iter()
            .find(|(sid, _, _)| *sid == s.session)
            .map(|(_, _, template)| template_record(template));
    }
    updated
}

/// The live templates of the other processes among `templates`.
pub(super) fn live_processes(templates: Option<&NodeTemplates>) -> Vec<Arc<cr::Template>> {
    templates.map_or_else(Vec::new, |t| {
        t.processes
            .iter()
            .filter(|p| p.is_alive())
            .cloned()
            .collect()
    })
}
