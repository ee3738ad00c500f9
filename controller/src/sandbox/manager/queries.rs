//! The checkpoint tree's queries and clean-up: tree, diff, node removal, gc; and what
//! it all costs ([`StateSource`], for the metrics and `GET /v1/stats`).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use super::tree_ops::process_dumps::name_of as process_dump_name;
use super::tree_ops::{node_info, serde_name, snapshot_of};
use super::{SandboxManager, Tree, db_err, lock, store_err};
use crate::api::sandbox_types::{
    CheckpointTimings, DiffEntry, DiffResult, GcResult, Removed, SandboxHead, TreeView,
};
use crate::cr::dump::{Dump, dump_name};
use crate::metrics::pool::PoolFigures;
use crate::metrics::state::{StateFigures, StateSource, private_bytes};
use crate::sandbox::error::SandboxError;
use crate::tree::ids::{NodeId, SandboxId, SessionId, TreeId};
use crate::tree::records::{SandboxRecord, SandboxState, unix_ms_now};
use crate::tree::render::{RenderNode, render_tree};

impl SandboxManager {
    /// The nodes and sandboxes of `tree`, drawn.
    pub(super) fn tree_view(&self, tree: TreeId) -> Result<TreeView, SandboxError> {
        let nodes = self.db.nodes(&tree).map_err(db_err)?;
        let sandboxes: Vec<SandboxRecord> = self
            .db
            .sandboxes()
            .map_err(db_err)?
            .into_iter()
            // Not the scratch sandboxes of re-roots (`tree_ops/reroot.rs`), nor sandboxes
            // not made yet.
            .filter(|s| s.tree == tree && s.state != SandboxState::Creating)
            .collect();
        // Alive by their process (a template can be killed behind the manager's back),
        // not by their presence in the map.
        // With each one's generation.
        let live_templates: HashMap<(NodeId, SessionId), u32> = self
            .live_tree(&tree)
            .map(|t| {
                let map = t.all_templates();
                map.iter()
                    .flat_map(|(id, t)| {
                        t.sessions
                            .iter()
                            .filter(|(_, _, tpl)| tpl.is_alive())
                            .map(move |(sid, _, tpl)| ((*id, *sid), tpl.generation()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let render: Vec<RenderNode<'_>> = nodes
            .iter()
            .map(|n| RenderNode {
                node: n,
                template_live: !n.sessions.is_empty()
                    && n.sessions
                        .iter()
                        .all(|s| live_templates.contains_key(&(n.id, s.session))),
                here: sandboxes
                    .iter()
                    .filter(|s| s.head == Some(n.id))
                    .map(|s| s.id)
                    .collect(),
            })
            .collect();
        let text = render_tree(&render, unix_ms_now());
        Ok(TreeView {
            tree: tree.to_string(),
            nodes: nodes
                .iter()
                .map(|n| {
                    node_info(
                        n,
                        &|session| live_templates.get(&(n.id, session)).copied(),
                        CheckpointTimings {
                            total_ms: n.checkpoint_ms,
                            ..CheckpointTimings::default()
                        },
                    )
                })
                .collect(),
            sandboxes: sandboxes
                .iter()
                .map(|s| SandboxHead {
                    sandbox: s.id.to_string(),
                    head: s.head.map(|h| h.to_string()),
                })
                .collect(),
            text,
        })
    }

    /// Files added, removed and changed from `from` to `to`.
    pub(super) fn diff_nodes(&self, from: NodeId, to: NodeId) -> Result<DiffResult, SandboxError> {
        let get = |id: NodeId| {
            self.db
                .node(&id)
                .map_err(db_err)?
                .ok_or_else(|| SandboxError::UnknownNode { id: id.to_string() })
        };
        let (a, b) = (get(from)?, get(to)?);
        if a.tree != b.tree {
            return Err(SandboxError::Invalid {
                message: format!(
                    "nodes {from} and {to} are in different trees ({} and {}): no common base",
                    a.tree, b.tree
                ),
            });
        }
        let changes = self
            .store
            .diff(Some(snapshot_of(&a)?), snapshot_of(&b)?)
            .map_err(|e| store_err(format!("diff {from} {to}"), e))?;
        Ok(DiffResult {
            from: from.to_string(),
            to: to.to_string(),
            changes: changes
                .into_iter()
                .map(|c| DiffEntry {
                    path: c.path.display().to_string(),
                    change: serde_name(&c.kind),
                    file_type: serde_name(&c.file_type),
                })
                .collect(),
        })
    }

    /// Removes `node` and its descendants: their templates, snapshots and records.
    pub(super) fn remove_subtree(&self, node: NodeId) -> Result<Removed, SandboxError> {
        let subtree = self.db.subtree(&node).map_err(db_err)?;
        if subtree.is_empty() {
            return Err(SandboxError::UnknownNode {
                id: node.to_string(),
            });
        }
        let ids: HashSet<NodeId> = subtree.iter().map(|n| n.id).collect();
        let users: Vec<String> = self
            .db
            .sandboxes()
            .map_err(db_err)?
            .into_iter()
            .filter(|s| s.head.is_some_and(|h| ids.contains(&h)))
            .map(|s| s.id.to_string())
            .collect();
        if !users.is_empty() {
            return Err(SandboxError::NodeInUse {
                node: node.to_string(),
                sandboxes: users,
            });
        }
        let list: Vec<NodeId> = subtree.iter().map(|n| n.id).collect();
        self.db.delete_nodes(&list).map_err(db_err)?;
        let tree = subtree[0].tree;
        if let Some(live) = self.live_tree(&tree) {
            let mut templates = lock(&live.templates);
            for id in &list {
                templates.remove(id);
                live.standbys.forget_node(*id);
            }
        }
        for n in &subtree {
            if let Err(e) = snapshot_of(n)
                .and_then(|id| self.store.drop_snapshot(id).map_err(|e| store_err("", e)))
            {
                tracing::warn!(node = %n.id, "dropping its snapshot: {e}");
            }
        }
        self.delete_dumps(&list);
        Ok(Removed {
            nodes: list.iter().map(ToString::to_string).collect(),
            sandboxes: Vec::new(),
        })
    }

    /// Shuts down trees with nothing left, removes unreferenced layers and squashes the
    /// runs of removed nodes' snapshots that live chains still stack on ([`super::squash`]).
    pub(super) fn collect_garbage(&self) -> Result<GcResult, SandboxError> {
        let trees: Vec<Arc<Tree>> = lock(&self.trees).values().cloned().collect();
        let before = trees.len();
        for tree in trees {
            self.drop_tree_if_empty(&tree);
        }
        let trees_removed = before - lock(&self.trees).len();
        // Trees whose daemon is gone and that have no node left.
        for t in self.db.trees().map_err(db_err)? {
            if self.live_tree(&t.id).is_none() && self.db.nodes(&t.id).map_err(db_err)?.is_empty() {
                self.db.delete_tree(&t.id).map_err(db_err)?;
            }
        }
        let report = self
            .store
            .gc()
            .map_err(|e| store_err("garbage-collecting layers", e))?;
        // After the store's gc: a dead branch would count as a child.
        let squashed = self.squash_chains()?;
        Ok(GcResult {
            layers_removed: report.removed.len(),
            trees_removed,
            dumps_removed: self.sweep_dumps()?,
            layers_squashed: squashed.layers,
            squash_bytes_freed: squashed.bytes,
            squash_deferred: squashed.deferred,
        })
    }
}

impl StateSource for SandboxManager {
    /// Counts sandboxes, live trees and nodes; reads each live template's
    /// `smaps_rollup` (sessions' and other processes'), or, for a session template with
    /// standby forks, which share its pages, the anonymous pages it and they alone map
    /// ([`crate::cr::owned`]); walks the store's layers. A template in a tree's map
    /// whose process is gone (killed from inside its sandbox) counts as dumped or gone.
    fn state_figures(&self) -> Result<StateFigures, SandboxError> {
        let sandboxes = lock(&self.sandboxes).len() as u64;
        let trees: Vec<Arc<Tree>> = lock(&self.trees).values().cloned().collect();
        // Template pids per node and session, copied out so no tree lock is held while
        // reading /proc.
        let mut pids: HashMap<(NodeId, SessionId), (i32, usize)> = HashMap::new();
        // The other processes' by node and the pid the node records.
        let mut process_pids: HashMap<(NodeId, i32), i32> = HashMap::new();
        // With each session template's standby forks (its tree's).
        for tree in &trees {
            for (node, templates) in tree.all_templates() {
                for (sid, _, t) in &templates.sessions {
                    let forks = tree.standbys.forks_of(node, *sid);
                    pids.insert((node, *sid), (t.pid().as_raw(), forks));
                }
                for t in &templates.processes {
                    process_pids.insert((node, t.state().pid), t.pid().as_raw());
                }
            }
        }
        let dumps = self.dumps_root();
        let mut figures = StateFigures {
            sandboxes,
            trees: trees.len() as u64,
            ..StateFigures::default()
        };
        // One template (or its dump, or neither) of a node.
        let mut count = |node: NodeId, pid: Option<(i32, usize)>, dump: String| {
            let measured = pid.map(|(pid, forks)| {
                let bytes = if forks == 0 {
                    private_bytes(pid).map_err(|e| e.to_string())
                } else {
                    crate::cr::owned::owned_bytes(pid, forks).map_err(|e| e.to_string())
                };
                bytes.inspect_err(|e| {
                    tracing::debug!(node = %node, pid, "template not live: {e}");
                })
            });
            if let Some(Ok(bytes)) = measured {
                figures.templates_live += 1;
                figures.template_memory_bytes += bytes;
            } else if Dump::exists(&dumps, &dump) {
                figures.templates_dumped += 1;
            } else {
                figures.templates_gone += 1;
            }
        };
        let mut nodes = 0;
        for tree in self.db.trees().map_err(db_err)? {
            for node in self.db.nodes(&tree.id).map_err(db_err)? {
                nodes += 1;
                for s in &node.sessions {
                    let dump = dump_name(&node.id.to_string(), &s.session.to_string());
                    count(node.id, pids.get(&(node.id, s.session)).copied(), dump);
                }
                for p in &node.processes {
                    let dump = process_dump_name(node.id, p.pid);
                    count(
                        node.id,
                        process_pids.get(&(node.id, p.pid)).map(|&pid| (pid, 0)),
                        dump,
                    );
                }
            }
        }
        figures.nodes = nodes;
        figures.store_bytes = self.store.disk_usage();
        Ok(figures)
    }

    /// The sandbox's `work/` cgroup. Not waited for: `None` while an operation holds the
    /// sandbox (a long `exec`), so a scrape never blocks on one; asked again later.
    fn work_cgroup(&self, sandbox: &str) -> Option<PathBuf> {
        let id: SandboxId = sandbox.parse().ok()?;
        let live = lock(&self.sandboxes).get(&id).cloned()?;
        let live = live.try_lock().ok()?;
        Some(live.tree.runtime.work_cgroup(&live.name()))
    }

    fn sandbox_ids(&self) -> Vec<String> {
        lock(&self.sandboxes)
            .keys()
            .map(ToString::to_string)
            .collect()
    }

    fn deltafs_stats(&self) -> Option<deltafs::StatsSnapshot> {
        Some(self.store.stats())
    }

    /// The pool's last measure and counters, the node sessions and other processes
    /// restorable only from their dumps (a walk of the tree database, one `stat` per
    /// such session or process), and the trees' standby forks.
    fn pool_figures(&self) -> Option<PoolFigures> {
        let mut figures = self.pool.figures();
        let trees: Vec<Arc<Tree>> = lock(&self.trees).values().cloned().collect();
        let mut live: HashSet<(NodeId, SessionId)> = HashSet::new();
        let mut live_processes: HashSet<(NodeId, i32)> = HashSet::new();
        for tree in &trees {
            let standbys = tree.standbys.counts();
            figures.standbys_ready += standbys.ready;
            figures.standbys_pending += standbys.pending;
            let map = tree.all_templates();
            for (node, templates) in map {
                for (sid, _, t) in &templates.sessions {
                    if t.is_alive() {
                        live.insert((node, *sid));
                    }
                }
                for t in &templates.processes {
                    if t.is_alive() {
                        live_processes.insert((node, t.state().pid));
                    }
                }
            }
        }
        let dumps = self.dumps_root();
        for tree in self.db.trees().ok()? {
            for node in self.db.nodes(&tree.id).ok()? {
                for s in &node.sessions {
                    if !live.contains(&(node.id, s.session))
                        && Dump::exists(
                            &dumps,
                            &dump_name(&node.id.to_string(), &s.session.to_string()),
                        )
                    {
                        figures.templates_dumped += 1;
                    }
                }
                for p in &node.processes {
                    if !live_processes.contains(&(node.id, p.pid))
                        && Dump::exists(&dumps, &process_dump_name(node.id, p.pid))
                    {
                        figures.templates_dumped += 1;
                    }
                }
            }
        }
        Some(figures)
    }

    fn checkpoint_writes(&self, node: &str) -> Option<deltafs::SnapshotWrites> {
        let id: NodeId = node.parse().ok()?;
        let record = self.db.node(&id).ok()??;
        let snapshot = snapshot_of(&record).ok()?;
        match self.store.written_by_snapshot(snapshot) {
            Ok(written) => written,
            Err(e) => {
                tracing::warn!(node, "what its checkpoint wrote: {e}");
                None
            }
        }
    }
}
