//! Re-rooting deep lineages (docs/deltacr.md, "Re-rooting deep lineages").
//!
//! A rollback makes a session a fork of a template, itself a fork of the session before:
//! while their templates live, the kernel links each memory area of a fork to the
//! `anon_vma` of every ancestor, so each fork and each exit of a lineage costs more the
//! longer it is ([`crate::cr::Template::generation`]). Once a checkpoint's template is
//! [`super::super::ManagerConfig::reroot_generations`] forks deep, and its dumps are
//! written, a thread of its own makes the node's templates again from a shorter lineage,
//! off every request's path: in a scratch sandbox of the node (its files; never listed),
//! each session is restored from its dump through the shallowest live template of its
//! kind (only the pages that differ are written; the rest stays shared with that
//! template), or into a husk when none is shallow enough (all pages written), then
//! checkpointed; the new templates replace the node's, unless the node was removed,
//! evicted or re-made meanwhile, and the scratch sandbox goes.

use std::collections::BTreeMap;
use std::sync::{Arc, mpsc};
use std::time::Instant;

use super::fallback::{Source, template_sessions, with_templates};
use super::{ms, snapshot_of};
use crate::cr::dump::{Dump, DumpPolicy, DumpWorker, dump_name};
use crate::cr::{RestoreTimings, Template};
use crate::sandbox::error::SandboxError;
use crate::sandbox::manager::standby::standby_options;
use crate::sandbox::manager::{Live, NodeTemplates, SandboxManager, Tree, db_err, lock};
use crate::sandbox::runtime::Limits;
use crate::sandbox::session::SessionKind;
use crate::tree::db::Op;
use crate::tree::ids::{NodeId, SandboxId, SessionId, TreeId};
use crate::tree::records::{NodeRecord, SandboxRecord, SandboxState, unix_ms_now};

/// The most re-root requests kept waiting: beyond, the oldest are dropped (their nodes
/// stay deep: slower to fork, not wrong), so that a sandbox checkpointing faster than
/// its nodes are re-rooted does not pile up background work.
const BACKLOG: usize = 8;

/// What a re-root request came to.
#[derive(Debug)]
enum Outcome {
    /// The node's templates were replaced: the deepest generation before and after.
    Rerooted { from: u32, to: u32 },
    /// Nothing done, and why.
    Skipped(&'static str),
}

impl SandboxManager {
    /// Starts the thread that re-roots deep nodes; nothing when
    /// `reroot_generations` is 0. Call once, with the manager shared.
    pub fn start_rerooting(self: &Arc<Self>) -> std::io::Result<()> {
        if self.cfg.reroot_generations == 0 {
            return Ok(());
        }
        let (tx, rx) = mpsc::channel::<(TreeId, NodeId)>();
        if self.reroots.set(tx).is_err() {
            return Ok(());
        }
        // Weak: the manager's own sender ends the loop when the manager goes.
        let manager = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("deltabox-reroot".to_owned())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut waiting = vec![first];
                    waiting.extend(rx.try_iter());
                    let dropped = waiting.len().saturating_sub(BACKLOG);
                    if dropped > 0 {
                        tracing::info!(dropped, "re-roots dropped: checkpoints come faster than they are re-rooted");
                    }
                    // The newest first: the likeliest to be restored again.
                    for (tree, node) in waiting.into_iter().rev().take(BACKLOG) {
                        crate::foreground::yield_to_operations(crate::foreground::BACKGROUND_WAIT);
                        let Some(manager) = manager.upgrade() else {
                            return;
                        };
                        let t = Instant::now();
                        match manager.reroot(tree, node) {
                            Ok(Outcome::Rerooted { from, to }) => {
                                tracing::info!(%node, from, to, ms = ms(t), "re-rooted its lineage");
                            }
                            Ok(Outcome::Skipped(why)) => {
                                tracing::debug!(%node, "not re-rooted: {why}");
                            }
                            Err(e) => tracing::warn!(%node, "not re-rooted: {e}"),
                        }
                    }
                }
            })?;
        Ok(())
    }

    /// After `node`'s checkpoint: if one of its session templates is deep enough, asks
    /// for its re-root once its dumps are written (the dump thread runs jobs in order).
    pub(super) fn queue_reroot(&self, node: &NodeRecord, templates: &NodeTemplates) {
        let Some(tx) = self.reroots.get() else {
            return;
        };
        let deep = deepest(templates) >= self.cfg.reroot_generations;
        // A node's other processes are restored with pipes to its sessions: not done.
        let simple = node.processes.is_empty() && templates.processes.is_empty();
        if !deep || !simple || self.pool.config().dump_policy != DumpPolicy::Eager {
            return;
        }
        let (tx, tree, id) = (tx.clone(), node.tree, node.id);
        DumpWorker::for_root(&self.dumps_root()).submit(move || {
            // The manager gone: nothing to do.
            let _ = tx.send((tree, id));
        });
    }

    /// Re-makes `node`'s session templates from a shorter lineage (module comment).
    fn reroot(&self, tree_id: TreeId, node: NodeId) -> Result<Outcome, SandboxError> {
        let Some(record) = self.db.node(&node).map_err(db_err)? else {
            return Ok(Outcome::Skipped("it was removed"));
        };
        let Some(tree) = self.live_tree(&tree_id) else {
            return Ok(Outcome::Skipped("its tree is gone"));
        };
        let Some(old) = lock(&tree.templates).get(&node).cloned() else {
            return Ok(Outcome::Skipped("its templates were evicted"));
        };
        let from = deepest(&old);
        if from < self.cfg.reroot_generations {
            return Ok(Outcome::Skipped("its lineage is short"));
        }
        let whole = record.sessions.iter().all(|s| {
            old.live_session(s.session).is_some()
                && Dump::exists(
                    &self.dumps_root(),
                    &dump_name(&node.to_string(), &s.session.to_string()),
                )
        });
        if !whole || !record.processes.is_empty() {
            return Ok(Outcome::Skipped(
                "a template died, a dump is missing, or it has other processes",
            ));
        }
        // Bases at most half as deep: the restored session is one more, its template two.
        let made = self.remake_in_scratch(&tree, &record, Source::Shallow { below: from / 2 })?;
        let new = Arc::new(NodeTemplates {
            sessions: made,
            processes: Vec::new(),
        });
        let to = deepest(&new);
        {
            let mut map = lock(&tree.templates);
            if !map.get(&node).is_some_and(|t| Arc::ptr_eq(t, &old)) {
                // The new templates die with `new`.
                return Ok(Outcome::Skipped("its templates changed meanwhile"));
            }
            // Read again: a removal commits before it takes the templates away.
            let Some(current) = self.db.node(&node).map_err(db_err)? else {
                return Ok(Outcome::Skipped("it was removed"));
            };
            self.db
                .commit(&[Op::PutNode(with_templates(&current, &new.sessions))])
                .map_err(db_err)?;
            map.insert(node, Arc::clone(&new));
        }
        // Standbys forked from the deep templates would restore deep processes (and
        // hold the old templates): forked again from the new ones.
        let runtime = &tree.runtime;
        tree.standbys
            .refork(node, &new, |sandbox| standby_options(runtime, sandbox));
        // The old templates die with the last hold on them (a restore or a dump may
        // still have one).
        drop(old);
        Ok(Outcome::Rerooted { from, to })
    }

    /// Restores `node`'s sessions from `source` into a scratch sandbox of its tree (a
    /// view of its snapshot; recorded as being created, so that a daemon killed
    /// meanwhile cleans it up, and never listed), checkpoints them, and removes it.
    fn remake_in_scratch(
        &self,
        tree: &Arc<Tree>,
        node: &NodeRecord,
        source: Source<'_>,
    ) -> Result<Vec<(SessionId, SessionKind, Template)>, SandboxError> {
        let id = SandboxId::new();
        let limits: Limits = serde_json::from_value(node.limits.clone()).unwrap_or_default();
        let record = SandboxRecord {
            id,
            tree: tree.id,
            created_ms: unix_ms_now(),
            rootfs: None,
            limits: serde_json::to_value(&limits).unwrap_or_default(),
            auto_checkpoint: false,
            // No head: a removal of the node is not refused for it.
            head: None,
            branched_from: None,
            sessions: Vec::new(),
            state: SandboxState::Creating,
        };
        self.db.put_sandbox(&record).map_err(db_err)?;
        let made = self
            .set_up(tree, id, &limits, Some(snapshot_of(node)?))
            .and_then(|view| {
                let mut live = Live {
                    record,
                    tree: Arc::clone(tree),
                    view: Some(view),
                    sessions: BTreeMap::new(),
                    limits,
                };
                let name = id.to_string();
                let made = self
                    .restore_sessions_preforked(
                        tree,
                        &name,
                        node,
                        source,
                        Vec::new(),
                        &mut RestoreTimings::default(),
                    )
                    .and_then(|sessions| {
                        live.sessions = sessions.into_iter().map(|s| (s.id, s)).collect();
                        template_sessions(&live)
                    });
                if let Err(e) = self.tear_down(&mut live) {
                    tracing::warn!(sandbox = %id, "removing a scratch sandbox: {e}");
                }
                made
            });
        if let Err(e) = self.db.delete_sandbox(&id) {
            tracing::warn!(sandbox = %id, "forgetting a scratch sandbox: {}", db_err(e));
        }
        made
    }
}

/// The highest generation among `templates`' sessions.
fn deepest(templates: &NodeTemplates) -> u32 {
    templates
        .sessions
        .iter()
        .map(|(_, _, t)| t.generation())
        .max()
        .unwrap_or(0)
}
