//! Taking over what an earlier daemon left, after it was killed or stopped.
//!
//! Trees outlive the daemon: their init keeps running, and the templates of their nodes
//! stay frozen. The sandboxes' roots do not: their DeltaFS views were served by the dead
//! daemon, so each sandbox's writes since its last checkpoint are gone with them. So a
//! restarted daemon re-adopts each tree (reconnects to its init, takes over the
//! templates it can verify) and revives each sandbox at its head node: a fresh view of
//! the head's snapshot, a fresh anchor, and its sessions forked again from the head's
//! templates, each first rebound off the dead views (`rebind.rs`), or restored from the
//! head's dumps when its templates are gone. A tree whose init is gone (and with it
//! every template: killed, or lost with a reboot) is re-created: cleaned up, a new
//! init, each sandbox revived from its head's dumps into fresh processes (`cr::husk`).
//! Only when that fails too are its processes removed and its nodes keep their files.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use nix::mount::{MntFlags, umount2};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use super::{Live, NodeTemplates, SandboxManager, Tree, db_err, leftovers, lock};
use crate::cr::{ProcessState, Template};
use crate::sandbox::error::SandboxError;
use crate::sandbox::runtime::{Limits, TreeConfig, TreeRuntime};
use crate::sandbox::session::SessionKind;
use crate::tree::db::Op;
use crate::tree::records::{NodeRecord, SandboxRecord, SandboxState, TemplateRecord, TreeRecord};

/// What a node keeps about a template besides its pid and cgroup (the `state` of a
/// [`TemplateRecord`]): enough for [`Template::adopt`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct TemplateState {
    /// DeltaCR's recorded state.
    pub process: ProcessState,
    /// The template's scratch page.
    pub scratch: u64,
    /// [`Template::generation`] (absent from records of older daemons: 0).
    #[serde(default)]
    pub generation: u32,
}

/// What a node records of `template`.
pub(super) fn template_record(template: &Template) -> TemplateRecord {
    TemplateRecord {
        host_pid: template.pid().as_raw(),
        cgroup: template.cgroup_path().to_path_buf(),
        state: serde_json::to_value(TemplateState {
            process: template.state().clone(),
            scratch: template.scratch(),
            generation: template.generation(),
        })
        .unwrap_or_default(),
    }
}

fn adopt_template(record: &TemplateRecord) -> Result<Template, String> {
    let state: TemplateState =
        serde_json::from_value(record.state.clone()).map_err(|e| format!("its state: {e}"))?;
    Template::adopt(
        Pid::from_raw(record.host_pid),
        record.cgroup.clone(),
        state.process,
        state.scratch,
        state.generation,
    )
    .map_err(|e| e.to_string())
}

impl SandboxManager {
    fn tree_config(&self, id: &str) -> TreeConfig {
        TreeConfig {
            id: id.to_owned(),
            run_dir: self.cfg.run_dir.join("trees").join(id),
            cgroup: self.cfg.cgroup.join(id),
            init_binary: self.cfg.init_binary.clone(),
        }
    }

    /// Re-adopts every tree of the database, or cleans it up when it cannot be.
    pub(super) fn recover(&self) -> Result<(), SandboxError> {
        // The dumps an earlier daemon wrote are found (a tree listing says `dumped`)
        // before this one writes any.
        crate::cr::dump::DumpWorker::for_root(&self.dumps_root());
        let trees = self.db.trees().map_err(db_err)?;
        for tree in &trees {
            if let Err(e) = self.adopt_tree(tree) {
                tracing::warn!(tree = %tree.id, "cannot take the tree over, re-creating it: {e}");
                if let Err(e) = self.rebuild_tree(tree) {
                    tracing::warn!(tree = %tree.id, "cannot re-create the tree, removing its processes: {e}");
                    self.forget_tree(tree)?;
                }
            }
        }
        // Sandboxes whose tree has no record: nothing to revive them in.
        let known: Vec<_> = trees.iter().map(|t| t.id).collect();
        let orphans: Vec<Op> = self
            .db
            .sandboxes()
            .map_err(db_err)?
            .into_iter()
            .filter(|s| !known.contains(&s.tree))
            .map(|s| Op::DeleteSandbox(s.id))
            .collect();
        if !orphans.is_empty() {
            self.db.commit(&orphans).map_err(db_err)?;
        }
        Ok(())
    }

    /// Kills what is left of `tree` and records that its nodes keep their files only.
    fn forget_tree(&self, tree: &TreeRecord) -> Result<(), SandboxError> {
        let mut ops = Vec::new();
        for sandbox in self.db.sandboxes().map_err(db_err)? {
            if sandbox.tree == tree.id {
                ops.push(Op::DeleteSandbox(sandbox.id));
            }
        }
        for mut node in self.db.nodes(&tree.id).map_err(db_err)? {
            if node.sessions.iter().any(|s| s.template.is_some()) {
                for s in &mut node.sessions {
                    s.template = None;
                }
                ops.push(Op::PutNode(node));
            }
        }
        let cfg = self.tree_config(&tree.id.to_string());
        if let Err(e) = leftovers::clean(&cfg.run_dir, &cfg.cgroup) {
            tracing::warn!(tree = %tree.id, "cleaning it up: {e}");
        }
        if !ops.is_empty() {
            self.db.commit(&ops).map_err(db_err)?;
        }
        Ok(())
    }

    /// Re-creates tree `record`, whose init is gone (killed, or lost with a reboot) and
    /// with it every template: what is left of it is cleaned up, its nodes forget their
    /// dead templates, a new init starts, and each sandbox is revived at its head node
    /// (its view mounted again, its sessions restored from the head's dumps into fresh
    /// processes, `cr::husk`, which then become the head's templates again).
    fn rebuild_tree(&self, record: &TreeRecord) -> Result<(), SandboxError> {
        let cfg = self.tree_config(&record.id.to_string());
        leftovers::clean(&cfg.run_dir, &cfg.cgroup).map_err(|e| {
            SandboxError::internal(format!("cleaning up what is left of tree {}", record.id), e)
        })?;
        let mut ops = Vec::new();
        for mut node in self.db.nodes(&record.id).map_err(db_err)? {
            let had = node.sessions.iter().any(|s| s.template.is_some())
                || node.processes.iter().any(|p| p.template.is_some());
            if had {
                node.sessions.iter_mut().for_each(|s| s.template = None);
                node.processes.iter_mut().for_each(|p| p.template = None);
                ops.push(Op::PutNode(node));
            }
        }
        if !ops.is_empty() {
            self.db.commit(&ops).map_err(db_err)?;
        }
        let base = match &record.rootfs {
            Some(dir) => dir.clone(),
            None => self.default_base()?,
        };
        let runtime = TreeRuntime::start(cfg)
            .map_err(|e| SandboxError::internal(format!("re-creating tree {}", record.id), e))?;
        let tree = Arc::new(Tree {
            id: record.id,
            runtime,
            base,
            templates: Mutex::new(HashMap::new()),
            root: std::sync::OnceLock::new(),
            standbys: super::standby::Standbys::default(),
        });
        lock(&self.trees).insert(record.id, Arc::clone(&tree));
        self.revive_all(&tree)?;
        tracing::info!(tree = %record.id, "re-created with a new init");
        Ok(())
    }

    fn adopt_tree(&self, record: &TreeRecord) -> Result<(), SandboxError> {
        let cfg = self.tree_config(&record.id.to_string());
        if !cfg.run_dir.join("init.sock").exists() {
            return Err(SandboxError::internal(
                format!("tree {}", record.id),
                "its init is gone (no init.sock)",
            ));
        }
        let runtime = TreeRuntime::adopt(cfg)
            .map_err(|e| SandboxError::internal(format!("adopting tree {}", record.id), e))?;
        let base = match &record.rootfs {
            Some(dir) => dir.clone(),
            None => self.default_base()?,
        };
        let nodes = self.db.nodes(&record.id).map_err(db_err)?;
        let (mut templates, mut ops) = self.adopt_templates(&nodes);
        // Before anything is forked from them, and while the dead views are still
        // mounted (their paths name the files).
        ops.extend(self.rebind_templates(&runtime, &nodes, &mut templates));
        if !ops.is_empty() {
            self.db.commit(&ops).map_err(db_err)?;
        }
        // Into the pool oldest first (the least recently used then goes first).
        let mut adopted: Vec<&NodeRecord> = nodes
            .iter()
            .filter(|n| templates.contains_key(&n.id))
            .collect();
        adopted.sort_by_key(|n| n.created_ms);
        let adopted: Vec<_> = adopted.into_iter().map(|n| n.id).collect();
        let tree = Arc::new(Tree {
            id: record.id,
            runtime,
            base,
            templates: Mutex::new(templates),
            root: std::sync::OnceLock::new(),
            standbys: super::standby::Standbys::default(),
        });
        lock(&self.trees).insert(record.id, Arc::clone(&tree));
        for node in adopted {
            self.pool.admit(record.id, node);
        }
        self.revive_all(&tree)?;
        Ok(())
    }

    /// Takes over the nodes' templates that are still there; returns them and the
    /// records to update for those that are gone.
    fn adopt_templates(
        &self,
        nodes: &[NodeRecord],
    ) -> (HashMap<crate::tree::NodeId, Arc<NodeTemplates>>, Vec<Op>) {
        let mut templates = HashMap::new();
        let mut ops = Vec::new();
        for node in nodes {
            let mut adopted = Vec::new();
            let mut updated = node.clone();
            for session in &mut updated.sessions {
                let Some(record) = &session.template else {
                    continue;
                };
                let kind: Option<SessionKind> = session.kind.parse().ok();
                match (kind, adopt_template(record)) {
                    (Some(kind), Ok(template)) => {
                        adopted.push((session.session, kind, template));
                    }
                    (_, Err(why)) => {
                        tracing::warn!(node = %node.id, session = %session.session, "template lost: {why}");
                        session.template = None;
                    }
                    (None, Ok(_)) => session.template = None,
                }
            }
            // The other processes' templates too (a node is restorable only with all).
            let mut processes = Vec::new();
            for process in &mut updated.processes {
                let Some(record) = &process.template else {
                    continue;
                };
                match adopt_template(record) {
                    Ok(template) => processes.push(Arc::new(template)),
                    Err(why) => {
                        tracing::warn!(node = %node.id, pid = process.pid, "template lost: {why}");
                        process.template = None;
                    }
                }
            }
            if updated != *node {
                ops.push(Op::PutNode(updated.clone()));
            }
            if adopted.len() == updated.sessions.len() {
                templates.insert(
                    node.id,
                    Arc::new(NodeTemplates {
                        sessions: adopted,
                        processes,
                    }),
                );
            }
        }
        (templates, ops)
    }

    /// Revives every stored sandbox of `tree`; one that cannot be is removed (logged).
    fn revive_all(&self, tree: &Arc<Tree>) -> Result<(), SandboxError> {
        for sandbox in self.db.sandboxes().map_err(db_err)? {
            if sandbox.tree != tree.id {
                continue;
            }
            let id = sandbox.id;
            if let Err(e) = self.revive(tree, sandbox) {
                tracing::warn!(sandbox = %id, "cannot revive it, removing it: {e}");
                let _ = self.db.delete_sandbox(&id);
            }
        }
        Ok(())
    }

    /// Brings sandbox `record` back at its head node (see the module's comment).
    fn revive(&self, tree: &Arc<Tree>, mut record: SandboxRecord) -> Result<(), SandboxError> {
        let name = record.id.to_string();
        // Its processes ran on the dead daemon's view: killed, their mounts removed.
        if let Err(e) = tree.runtime.remove_sandbox(&name) {
            tracing::warn!(sandbox = %name, "removing what is left of it: {e}");
        }
        let mountpoint = tree.runtime.view_mountpoint(&name);
        let _ = umount2(&mountpoint, MntFlags::MNT_DETACH);
        if record.state != SandboxState::Running {
            return Err(SandboxError::internal(
                format!("sandbox {name}"),
                "it was half made or half removed",
            ));
        }
        let limits: Limits = serde_json::from_value(record.limits.clone()).unwrap_or_default();
        let head = match record.head {
            Some(id) => Some(
                self.db
                    .node(&id)
                    .map_err(db_err)?
                    .ok_or_else(|| SandboxError::UnknownNode { id: id.to_string() })?,
            ),
            None => None,
        };
        let snapshot = head
            .as_ref()
            .map(super::tree_ops::snapshot_of)
            .transpose()?;
        let view = self.set_up(tree, record.id, &limits, snapshot)?;
        let mut live = Live {
            record: record.clone(),
            tree: Arc::clone(tree),
            view: Some(view),
            sessions: Default::default(),
            limits,
        };
        if let Some(head) = &head {
            let templates = lock(&tree.templates).get(&head.id).cloned();
            match self.restore_sessions(
                tree,
                &name,
                head,
                templates.as_deref(),
                &mut crate::cr::RestoreTimings::default(),
            ) {
                Ok(sessions) => {
                    live.sessions = sessions.into_iter().map(|s| (s.id, s)).collect();
                    self.retemplate_if_dumped(&live, head, templates.as_deref());
                }
                Err(e) => {
                    // The files are back; the sessions could not be: the sandbox lives on
                    // without them.
                    tracing::warn!(sandbox = %name, "its sessions cannot be restored: {e}");
                }
            }
        }
        record.sessions = live.session_records();
        live.record = record;
        self.db.put_sandbox(&live.record).map_err(db_err)?;
        tracing::info!(sandbox = %name, sessions = live.sessions.len(), "revived at its head node");
        lock(&self.sandboxes).insert(live.record.id, Arc::new(Mutex::new(live)));
        Ok(())
    }
}
