//! Rollback: the sandbox's processes killed, its files switched to the node's, the
//! node's processes forked from their templates (or rebuilt from dumps).
//!
//! The sessions' templates are forked while the killed processes are still exiting
//! ([`SandboxManager::prefork_sessions`]); the switch of the files and every restored
//! process's fix-up wait until they are gone, so that nothing a dying process flushes
//! on its way out (the dirty pages of a shared file mapping, written back when its
//! files close) lands in the restored state.

use std::time::Instant;

use super::{SandboxManager, ms, snapshot_of};
use crate::api::sandbox_types::{RollbackMode, RollbackResult, RollbackTimings};
use crate::cr::{Forked, RestoreOptions, RestoreTimings};
use crate::sandbox::error::SandboxError;
use crate::sandbox::manager::{Live, LiveSession, NodeTemplates, db_err, store_err};
use crate::sandbox::runtime::TreeRuntime;
use crate::sandbox::session::SessionKind;
use crate::tree::ids::{NodeId, SessionId};
use crate::tree::records::NodeRecord;

/// A session's template forked ahead of the rest of its restore.
pub(super) type Preforked<'a> = (SessionId, SessionKind, Forked<'a>);

impl SandboxManager {
    /// Rolls `live` (its lock held) back to `node`.
    pub(in crate::sandbox::manager) fn rollback_locked(
        &self,
        live: &mut Live,
        node: NodeId,
        mode: RollbackMode,
    ) -> Result<RollbackResult, SandboxError> {
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
        let mut preforked = Vec::new();
        let mut prefork_ms = 0.0;
        if restore_processes {
            let t = Instant::now();
            let runtime = &live.tree.runtime;
            // Frozen and killed before the sessions' handles go (dropping one kills its
            // process group, whose exit a freeze would then wait for).
            let killed = runtime
                .kill_work_start(&name)
                .map_err(|e| SandboxError::internal(format!("sandbox {name}: killing"), e))?;
            live.sessions.clear();
            timings.kill_ms = ms(t);
            // While the killed processes exit (milliseconds for a big one, on another
            // CPU), the sessions' templates are forked; the children wait in their
            // attach stop, and nothing that needs the old processes gone (the files'
            // switch, the children's fix-up) happens before `wait`.
            let t = Instant::now();
            preforked = self.prefork_sessions(runtime, &name, &record, templates.as_deref());
            prefork_ms = ms(t);
            let t = Instant::now();
            killed
                .wait()
                .map_err(|e| SandboxError::internal(format!("sandbox {name}: killing"), e))?;
            timings.kill_ms += ms(t);
        }
        if restore_files {
            let t = Instant::now();
            let Some(view) = live.view.as_ref() else {
                return Err(SandboxError::internal(
                    format!("sandbox {name}"),
                    "no root view",
                ));
            };
            view.switch(snapshot_of(&record)?)
                .map_err(|e| store_err(format!("sandbox {name}: switching files"), e))?;
            timings.files_ms = ms(t);
        }
        if restore_processes {
            let t = Instant::now();
            let mut phases = RestoreTimings::default();
            let restored = self.restore_sessions_preforked(
                &live.tree,
                &name,
                &record,
                templates.as_deref(),
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
            self.retemplate_if_dumped(live, &record, templates.as_deref());
        }
        live.record.head = Some(node);
        live.record.sessions = live.session_records();
        self.db.put_sandbox(&live.record).map_err(db_err)?;
        timings.total_ms = ms(start);
        Ok(RollbackResult {
            sandbox: name,
            node: node.to_string(),
            mode,
            sessions: live.sessions.values().map(LiveSession::info).collect(),
            timings,
            // The warm-up, if any, is started by the caller (metrics::cow).
            warm_up: false,
        })
    }

    /// Forks each session of `node` whose own template is live, into sandbox `name`'s
    /// `work/` cgroup: the first half of its restore ([`Forked::finish`] is the rest).
    /// A fork that fails is left to the full restore (after the killed processes are
    /// gone: a fork refused for the pids limit they still hold then succeeds).
    fn prefork_sessions<'a>(
        &self,
        runtime: &TreeRuntime,
        name: &str,
        node: &NodeRecord,
        templates: Option<&'a NodeTemplates>,
    ) -> Vec<Preforked<'a>> {
        let Some(templates) = templates else {
            return Vec::new();
        };
        let opts = RestoreOptions {
            cgroup: Some(runtime.work_cgroup(name)),
            cgroup_seen: runtime.work_cgroup_in_ns(name),
            ..RestoreOptions::default()
        };
        let mut forked = Vec::new();
        for session in &node.sessions {
            let Some((sid, kind, template)) = templates.live_session(session.session) else {
                continue;
            };
            match template.fork_child(&opts) {
                Ok(child) => {
                    self.pool.hit();
                    forked.push((*sid, *kind, child));
                }
                Err(e) => {
                    tracing::debug!(session = %sid, "fork ahead of the rollback failed: {e}");
                }
            }
        }
        if !forked.is_empty() {
            self.pool.touch(node.id);
        }
        forked
    }
}
