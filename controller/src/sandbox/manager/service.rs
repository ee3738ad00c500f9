//! [`SandboxOps`] for the manager: each call resolves its ids, takes the sandbox's lock
//! for the whole operation, and hands over to the module that does the work.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::Duration;

use super::output::Buffers;
use super::{Live, SandboxManager, commands, db_err, limits_of, lock};
use crate::api::sandbox_types::{SandboxInfo, SessionInfo};
use crate::sandbox::error::SandboxError;
use crate::sandbox::ops::{ExecSink, SandboxOps};
use crate::sandbox::session::SessionKind;
use crate::tree::TreeDbError;
use crate::tree::records::SandboxState;

/// Locks a sandbox that is being removed: a command running there would hold the lock
/// as long as it may run, so while the lock is taken, whatever command holds it (or
/// starts next) is stopped.
fn lock_stopping_commands<'a>(live: &'a Mutex<Live>, name: &str) -> MutexGuard<'a, Live> {
    loop {
        match live.try_lock() {
            Ok(guard) => return guard,
            Err(TryLockError::Poisoned(poisoned)) => return poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => {
                commands::stop_for_removal(name);
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

impl SandboxOps for SandboxManager {
    fn create(
        &self,
        req: &crate::api::sandbox_types::CreateSandbox,
    ) -> Result<SandboxInfo, SandboxError> {
        let limits = limits_of(&req.limits)?;
        let rootfs = req.rootfs.as_ref().map(PathBuf::from);
        if let Some(dir) = &rootfs
            && !dir.is_absolute()
        {
            return Err(SandboxError::Invalid {
                message: format!("rootfs {} is not an absolute path", dir.display()),
            });
        }
        self.create_inner(rootfs, limits, req.auto_checkpoint)
    }

    fn list(&self) -> Result<Vec<SandboxInfo>, SandboxError> {
        let all: Vec<_> = lock(&self.sandboxes)
            .iter()
            .map(|(id, l)| (*id, Arc::clone(l)))
            .collect();
        let mut infos: Vec<SandboxInfo> =
            all.iter().map(|(id, l)| self.busy.info(*id, l)).collect();
        infos.sort_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)));
        Ok(infos)
    }

    fn get(&self, sandbox: &str) -> Result<SandboxInfo, SandboxError> {
        let (id, live) = self.resolve_sandbox(sandbox)?;
        Ok(self.busy.info(id, &live))
    }

    fn remove(&self, sandbox: &str) -> Result<crate::api::sandbox_types::Removed, SandboxError> {
        let (id, live) = self.resolve_sandbox(sandbox)?;
        let tree = {
            let mut live = lock_stopping_commands(&live, &id.to_string());
            live.record.state = SandboxState::Removing;
            self.db.put_sandbox(&live.record).map_err(db_err)?;
            let torn = self.tear_down(&mut live);
            self.db.delete_sandbox(&id).map_err(db_err)?;
            lock(&self.sandboxes).remove(&id);
            torn?;
            Arc::clone(&live.tree)
        };
        self.drop_tree_if_empty(&tree);
        Ok(crate::api::sandbox_types::Removed {
            nodes: Vec::new(),
            sandboxes: vec![id.to_string()],
        })
    }

    fn exec(
        &self,
        sandbox: &str,
        req: &crate::api::sandbox_types::ExecRequest,
    ) -> Result<crate::api::sandbox_types::ExecResult, SandboxError> {
        let mut buffers = Buffers::default();
        let mut result = self.exec_streamed(sandbox, req, &mut buffers)?;
        result.stdout = String::from_utf8_lossy(&buffers.stdout).into_owned();
        result.stderr = String::from_utf8_lossy(&buffers.stderr).into_owned();
        Ok(result)
    }

    fn exec_streamed(
        &self,
        sandbox: &str,
        req: &crate::api::sandbox_types::ExecRequest,
        sink: &mut dyn ExecSink,
    ) -> Result<crate::api::sandbox_types::ExecResult, SandboxError> {
        let (id, live) = self.resolve_sandbox(sandbox)?;
        let mut live = self.busy.acquire(id, &live, "exec")?;
        if live.record.state == SandboxState::Removing {
            // Removed while this call waited for the lock.
            return Err(SandboxError::UnknownSandbox {
                id: sandbox.to_owned(),
            });
        }
        let mut result = commands::exec(&live, req, sink)?;
        if live.record.auto_checkpoint {
            let label = format!("exec {}", req.argv.join(" "));
            result.node = Some(self.checkpoint_locked(&mut live, Some(label))?);
        }
        Ok(result)
    }

    fn session_start(
        &self,
        sandbox: &str,
        req: &crate::api::sandbox_types::SessionStart,
    ) -> Result<SessionInfo, SandboxError> {
        let (id, live) = self.resolve_sandbox(sandbox)?;
        let mut live = self.busy.acquire(id, &live, "session start")?;
        let kind: SessionKind = req.kind.parse().map_err(|e| SandboxError::Invalid {
            message: format!("{e}"),
        })?;
        let session = commands::start_session(&live, kind)?;
        let info = session.info();
        live.sessions.insert(session.id, session);
        live.record.sessions = live.session_records();
        self.db.put_sandbox(&live.record).map_err(db_err)?;
        Ok(info)
    }

    fn session_run(
        &self,
        sandbox: &str,
        session: &str,
        req: &crate::api::sandbox_types::SessionRun,
    ) -> Result<crate::api::sandbox_types::SessionRunResult, SandboxError> {
        let (id, live) = self.resolve_sandbox(sandbox)?;
        let mut live = self.busy.acquire(id, &live, "session run")?;
        let sid = commands::resolve_session(&live, session)?;
        let ooms = live.tree.runtime.oom_kills(&live.name());
        let mut result = match commands::run(&mut live, sid, req) {
            Ok(result) => result,
            Err(e) => {
                let e = match e {
                    SandboxError::Session { message, .. }
                        if live.tree.runtime.oom_kills(&live.name()) > ooms =>
                    {
                        SandboxError::LimitsExceeded {
                            sandbox: live.name(),
                            limit: "memory",
                            message: format!(
                                "the OOM killer killed session {sid} (the session is gone): \
                                 {message}"
                            ),
                        }
                    }
                    other => other,
                };
                // The session died or hung: it is gone, and the record says so.
                if let SandboxError::Session { .. } | SandboxError::LimitsExceeded { .. } = e {
                    live.sessions.remove(&sid);
                    live.record.sessions = live.session_records();
                    let _ = self.db.put_sandbox(&live.record);
                }
                return Err(e);
            }
        };
        if live.record.auto_checkpoint {
            let first = req
                .code
                .lines()
                .next()
                .unwrap_or("")
                .chars()
                .take(60)
                .collect::<String>();
            result.node = Some(self.checkpoint_locked(&mut live, Some(format!("run {first}")))?);
        }
        Ok(result)
    }

    fn session_stop(&self, sandbox: &str, session: &str) -> Result<SessionInfo, SandboxError> {
        let (id, live) = self.resolve_sandbox(sandbox)?;
        let mut live = self.busy.acquire(id, &live, "session stop")?;
        let sid = commands::resolve_session(&live, session)?;
        let stopped = live.sessions.remove(&sid).map(|s| s.info());
        live.record.sessions = live.session_records();
        self.db.put_sandbox(&live.record).map_err(db_err)?;
        stopped.ok_or_else(|| SandboxError::UnknownSession {
            sandbox: live.name(),
            id: session.to_owned(),
        })
    }

    fn checkpoint(
        &self,
        sandbox: &str,
        req: &crate::api::sandbox_types::CheckpointRequest,
    ) -> Result<crate::api::sandbox_types::NodeInfo, SandboxError> {
        let (id, live) = self.resolve_sandbox(sandbox)?;
        let mut live = self.busy.acquire(id, &live, "checkpoint")?;
        self.checkpoint_locked(&mut live, req.label.clone())
    }

    fn rollback(
        &self,
        sandbox: &str,
        req: &crate::api::sandbox_types::RollbackRequest,
    ) -> Result<crate::api::sandbox_types::RollbackResult, SandboxError> {
        let (id, live) = self.resolve_sandbox(sandbox)?;
        let node = self.db.resolve_node(&req.node).map_err(db_err)?;
        let mut live = self.busy.acquire(id, &live, "rollback")?;
        self.rollback_locked(&mut live, node, req.mode)
    }

    fn branch(
        &self,
        node: &str,
        req: &crate::api::sandbox_types::BranchRequest,
    ) -> Result<crate::api::sandbox_types::BranchResult, SandboxError> {
        let node = self.db.resolve_node(node).map_err(db_err)?;
        self.branch_node(node, req.count)
    }

    fn tree(
        &self,
        sandbox_or_node: &str,
    ) -> Result<crate::api::sandbox_types::TreeView, SandboxError> {
        let tree = match self.db.resolve_sandbox(sandbox_or_node) {
            Ok(id) => self.db.sandbox(&id).map_err(db_err)?.map(|s| s.tree),
            Err(TreeDbError::UnknownId { .. } | TreeDbError::BadPrefix { .. }) => {
                // Unknown as either: the routes name the kind they were asked for.
                let node = self.db.resolve_node(sandbox_or_node).map_err(|e| match e {
                    TreeDbError::UnknownId { .. } | TreeDbError::BadPrefix { .. } => {
                        SandboxError::UnknownSandbox {
                            id: sandbox_or_node.to_owned(),
                        }
                    }
                    other => db_err(other),
                })?;
                self.db.node(&node).map_err(db_err)?.map(|n| n.tree)
            }
            Err(e) => return Err(db_err(e)),
        };
        let tree = tree.ok_or_else(|| SandboxError::UnknownSandbox {
            id: sandbox_or_node.to_owned(),
        })?;
        self.tree_view(tree)
    }

    fn diff(
        &self,
        from: &str,
        to: &str,
    ) -> Result<crate::api::sandbox_types::DiffResult, SandboxError> {
        let from = self.db.resolve_node(from).map_err(db_err)?;
        let to = self.db.resolve_node(to).map_err(db_err)?;
        self.diff_nodes(from, to)
    }

    fn remove_node(&self, node: &str) -> Result<crate::api::sandbox_types::Removed, SandboxError> {
        let node = self.db.resolve_node(node).map_err(db_err)?;
        self.remove_subtree(node)
    }

    fn gc(&self) -> Result<crate::api::sandbox_types::GcResult, SandboxError> {
        self.collect_garbage()
    }
}
