//! Dumps of a node's other processes (background jobs, sessions' children, pipelines),
//! written and used as the sessions' are (`fallback.rs`): each process template of a
//! node is dumped in the background after the checkpoint (policy `eager`) or by the
//! pool before its eviction (`on-evict`), as `<node>-pid<pid>` (the pid the node
//! records for the process), incremental against the same process's dump at the
//! nearest ancestor node. A process whose template is gone is rebuilt from its dump by
//! forking a live template of the same program run (same vdso: the nearest ancestor
//! node's template of the process first, then any other of the tree, sessions' included
//! — a bash subshell is a fork of its session) and applying the dump's memory.
//!
//! What identifies a process across nodes: its recorded pid and name (the same process
//! while no rollback came between), or its name and the address of its syscall site in
//! its vdso (a process restored from a template has a new pid, the same vdso). A wrong
//! match costs dump size only: a dump shares a parent's page only where the hashes are
//! equal.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use super::fallback::TemplateAt;
use crate::cr::dump::{Dump, DumpOptions, DumpWorker, dump_name, process_dump_name};
use crate::cr::{ProcessState, RestoreOptions, Restored, Template};
use crate::sandbox::error::SandboxError;
use crate::sandbox::manager::{NodeTemplates, SandboxManager, Tree, db_err};
use crate::sandbox::runtime::TreeRuntime;
use crate::tree::db::TreeDb;
use crate::tree::ids::NodeId;
use crate::tree::records::{NodeProcess, NodeRecord};

/// The dump of process `pid` (as the node records it) of `node`.
pub(in crate::sandbox::manager) fn name_of(node: NodeId, pid: i32) -> String {
    process_dump_name(&node.to_string(), pid)
}

/// The live template of `process` among `templates`.
pub(in crate::sandbox::manager) fn live_template<'a>(
    process: &NodeProcess,
    templates: Option<&'a NodeTemplates>,
) -> Option<&'a Arc<Template>> {
    templates?
        .processes
        .iter()
        .find(|t| t.state().pid == process.pid && t.is_alive())
}

/// The syscall site the node's record of `process` keeps (none once its template is
/// gone from the record).
fn recorded_site(process: &NodeProcess) -> Option<u64> {
    process
        .template
        .as_ref()?
        .state
        .pointer("/process/syscall_site")
        .and_then(serde_json::Value::as_u64)
}

/// Whether `candidate` (a process of another node) is the process `me` was.
fn same_process(candidate: &NodeProcess, me: &ProcessState) -> bool {
    candidate.comm == me.comm
        && (candidate.pid == me.pid || recorded_site(candidate) == Some(me.syscall_site.0))
}

/// The dump a new dump of `me` (a process of a node whose parent is `parent`) is
/// incremental against: the same process's at the parent node, or, with `existing`, at
/// the nearest ancestor where it is on disk. `None`: a full dump.
pub(in crate::sandbox::manager) fn parent_dump(
    db: &TreeDb,
    root: &Path,
    mut parent: Option<NodeId>,
    me: &ProcessState,
    existing: bool,
) -> Option<String> {
    let mut hops = 0;
    while let Some(id) = parent {
        let node = db.node(&id).ok().flatten()?;
        // Not at this ancestor: started after it, so at none further up.
        let process = node.processes.iter().find(|p| same_process(p, me))?;
        let name = name_of(id, process.pid);
        if !existing || Dump::exists(root, &name) {
            return Some(name);
        }
        parent = node.parent;
        hops += 1;
        if hops > 10_000 {
            break;
        }
    }
    None
}

/// A live template a dumped process can be rebuilt from.
pub(super) struct Base {
    node: NodeId,
    templates: Arc<NodeTemplates>,
    /// A session's template (its index in `sessions`) or another process's.
    session: Option<usize>,
    index: usize,
    /// The template's own dump, if it has one.
    dump: String,
}

impl Base {
    fn template(&self) -> &Template {
        match self.session {
            Some(i) => &self.templates.sessions[i].2,
            None => &self.templates.processes[self.index],
        }
    }
}

/// Where each of a node's other processes is restored from.
pub(super) enum ProcessSource {
    /// Its own live template: a fork.
    Template(Arc<Template>),
    /// Its dump, applied to a fork of the first base that takes it.
    Dump {
        /// The process as the node records it.
        process: NodeProcess,
        /// Its dump (boxed: a manifest is large beside an `Arc`).
        dump: Box<Dump>,
        /// The templates to try, best first.
        bases: Vec<Base>,
    },
}

impl ProcessSource {
    /// The process's name for messages: `<pid> (<comm>)`.
    pub(super) fn label(&self) -> String {
        match self {
            Self::Template(t) => format!("{} ({})", t.state().pid, t.state().comm),
            Self::Dump { process, .. } => format!("{} ({})", process.pid, process.comm),
        }
    }

    /// Restores the process into sandbox `name` of `runtime` with `opts`: a fork of its
    /// template, else its dump applied to a fork of a base, else its dump restored into
    /// a fresh process (`cr::husk`); the error names what was tried.
    pub(super) fn restore(
        &self,
        runtime: &TreeRuntime,
        name: &str,
        opts: &RestoreOptions,
    ) -> Result<Restored, String> {
        let (process, dump, bases) = match self {
            Self::Template(t) => return t.restore(opts).map_err(|e| e.to_string()),
            Self::Dump {
                process,
                dump,
                bases,
            } => (process, dump, bases),
        };
        let root = dump
            .dir()
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let mut tried = Vec::new();
        for base in bases {
            let template = base.template();
            // A base dump describes the template only if both are of one checkpoint.
            let base_dump = Dump::open(&root, &base.dump)
                .ok()
                .filter(|b| b.state().same_checkpoint(template.state()));
            let t = Instant::now();
            match template.restore_from_dump(dump, base_dump.as_ref(), opts) {
                Ok(restored) => {
                    tracing::info!(
                        pid = process.pid, comm = %process.comm, base = %base.node,
                        ms = t.elapsed().as_secs_f64() * 1e3,
                        memory_ms = restored.timings.memory.as_secs_f64() * 1e3,
                        "process restored from its dump"
                    );
                    return Ok(restored);
                }
                Err(e) => {
                    tracing::warn!(pid = process.pid, base = %base.node, "fallback restore failed: {e}");
                    tried.push(format!("from node {}'s template: {e}", base.node));
                }
            }
        }
        let t = Instant::now();
        match super::fallback::restore_in_husk(runtime, name, dump, opts) {
            Ok(restored) => {
                tracing::info!(
                    pid = process.pid, comm = %process.comm,
                    ms = t.elapsed().as_secs_f64() * 1e3,
                    memory_ms = restored.timings.memory.as_secs_f64() * 1e3,
                    "process restored from its dump into a fresh process"
                );
                return Ok(restored);
            }
            Err(e) => {
                tracing::warn!(
                    pid = process.pid,
                    "restore into a fresh process failed: {e}"
                );
                tried.push(format!("into a fresh process: {e}"));
            }
        }
        Err(format!(
            "its template is gone; rebuilding it from its dump failed: {}",
            tried.join("; ")
        ))
    }
}

impl SandboxManager {
    /// Queues the dumps of `templates`' other processes (a node just checkpointed in
    /// sandbox `root_prefix`), each incremental against the same process's dump at the
    /// parent node.
    pub(super) fn queue_process_dumps(
        &self,
        worker: &DumpWorker,
        node: &NodeRecord,
        templates: &Arc<NodeTemplates>,
        parent: Option<&Arc<NodeTemplates>>,
        root_prefix: &Path,
    ) {
        for (i, template) in templates.processes.iter().enumerate() {
            let state = template.state();
            let opts = DumpOptions {
                root: worker.root().to_path_buf(),
                name: name_of(node.id, state.pid),
                parent: parent_dump(&self.db, worker.root(), node.parent, state, false),
                root_prefix: Some(root_prefix.to_path_buf()),
            };
            // The parent node's live template the parent dump was made from, if the
            // parent dump is the parent node's (not a further ancestor's).
            let base = node.parent.zip(parent).and_then(|(id, p)| {
                let at = p.processes.iter().position(|t| {
                    opts.parent.as_deref() == Some(name_of(id, t.state().pid).as_str())
                        && t.is_alive()
                })?;
                Some((Arc::clone(p), TemplateAt::Process(at)))
            });
            self.submit_dump(
                worker,
                opts,
                Arc::clone(templates),
                TemplateAt::Process(i),
                base,
            );
        }
    }

    /// Refuses `node` (`node_not_restorable`, before anything is killed) if one of its
    /// other processes has neither a live template nor a dump it can be rebuilt from;
    /// the message names each such process by pid and name.
    pub(super) fn refuse_unrestorable(
        &self,
        tree: &Tree,
        node: &NodeRecord,
        templates: Option<&NodeTemplates>,
    ) -> Result<(), SandboxError> {
        self.process_sources(tree, node, templates).map(|_| ())
    }

    /// Where each of `node`'s other processes comes from (in the node's order), or the
    /// refusal of [`Self::refuse_unrestorable`].
    pub(super) fn process_sources(
        &self,
        tree: &Tree,
        node: &NodeRecord,
        templates: Option<&NodeTemplates>,
    ) -> Result<Vec<ProcessSource>, SandboxError> {
        let root = self.dumps_root();
        let mut out = Vec::with_capacity(node.processes.len());
        let mut lost = Vec::new();
        for p in &node.processes {
            if let Some(t) = live_template(p, templates) {
                out.push(ProcessSource::Template(Arc::clone(t)));
                continue;
            }
            let name = name_of(node.id, p.pid);
            if !Dump::exists(&root, &name) {
                lost.push(format!(
                    "{} ({}): its template is gone and it has no dump (dumps are written \
                     in the background after each checkpoint, or at eviction: the \
                     template died first, or the daemon runs with --dump-policy off)",
                    p.pid, p.comm
                ));
                continue;
            }
            let dump = match Dump::open(&root, &name) {
                Ok(dump) => dump,
                Err(e) => {
                    lost.push(format!("{} ({}): {e}", p.pid, p.comm));
                    continue;
                }
            };
            // With no base, or none that works, a fresh process becomes it.
            let bases = self.process_bases(tree, node, dump.state())?;
            out.push(ProcessSource::Dump {
                process: p.clone(),
                dump: Box::new(dump),
                bases,
            });
        }
        if lost.is_empty() {
            return Ok(out);
        }
        Err(SandboxError::NodeNotRestorable {
            node: node.id.to_string(),
            session: "-".to_owned(),
            why: format!(
                "of its processes other than sessions, {}; `--files-only` still restores \
                 the files",
                lost.join("; ")
            ),
        })
    }

    /// Live templates of `tree` of the same program run as the dumped process `dumped`
    /// (same syscall site, so same vdso), best first: the nearest ancestor node's of
    /// `node` that has one, then the others, those of the same name first.
    fn process_bases(
        &self,
        tree: &Tree,
        node: &NodeRecord,
        dumped: &ProcessState,
    ) -> Result<Vec<Base>, SandboxError> {
        let all = tree.all_templates();
        let of_run = |id: NodeId, t: &Arc<NodeTemplates>| -> Vec<Base> {
            let sessions = t
                .sessions
                .iter()
                .enumerate()
                .filter(|(_, (_, _, tpl))| same_run(tpl, dumped))
                .map(|(i, (sid, _, _))| Base {
                    node: id,
                    templates: Arc::clone(t),
                    session: Some(i),
                    index: 0,
                    dump: dump_name(&id.to_string(), &sid.to_string()),
                });
            let processes = t
                .processes
                .iter()
                .enumerate()
                .filter(|(_, tpl)| same_run(tpl, dumped))
                .map(|(i, tpl)| Base {
                    node: id,
                    templates: Arc::clone(t),
                    session: None,
                    index: i,
                    dump: name_of(id, tpl.state().pid),
                });
            let mut bases: Vec<Base> = processes.chain(sessions).collect();
            // Stable: the same name (the same process, likely) first.
            bases.sort_by_key(|b| b.template().state().comm != dumped.comm);
            bases
        };
        let mut out: Vec<Base> = Vec::new();
        let mut parent = node.parent;
        let mut hops = 0;
        while let Some(id) = parent {
            if let Some((_, t)) = all.iter().find(|(n, _)| *n == id)
                && let Some(first) = of_run(id, t).into_iter().next()
            {
                out.push(first);
                break;
            }
            parent = self.db.node(&id).map_err(db_err)?.and_then(|n| n.parent);
            hops += 1;
            if hops > 100_000 {
                break;
            }
        }
        let mut rest: Vec<Base> = all
            .iter()
            .flat_map(|(id, t)| of_run(*id, t))
            .filter(|b| {
                !out.iter()
                    .any(|o| o.node == b.node && o.session == b.session && o.index == b.index)
            })
            .collect();
        rest.sort_by_key(|b| b.template().state().comm != dumped.comm);
        out.extend(rest);
        Ok(out)
    }
}

/// Whether `template` is alive and of the same program run as the dumped process (its
/// injected syscalls run in the same vdso: a restore cannot move one).
fn same_run(template: &Template, dumped: &ProcessState) -> bool {
    template.state().syscall_site == dumped.syscall_site && template.is_alive()
}
