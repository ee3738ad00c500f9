//! An in-memory [`SandboxOps`] for the API's tests: sandboxes, sessions and nodes in
//! maps, a set of file paths per sandbox (so that `diff` has something to compare),
//! and real [`SandboxError`]s. `fail_next` makes the next call fail with a given
//! error, for the kinds no request can provoke here (disk full, a dead template).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, MutexGuard};

use crate::api::sandbox_types::{
    BranchRequest, BranchResult, CheckpointRequest, CheckpointTimings, CreateSandbox, DiffEntry,
    DiffResult, ExecRequest, ExecResult, GcResult, NodeInfo, NodeSessionInfo, Removed,
    RollbackMode, RollbackRequest, RollbackResult, RollbackTimings, SandboxHead, SandboxInfo,
    SessionInfo, SessionRun, SessionRunResult, SessionStart, TreeView,
};
use crate::sandbox::{SandboxError, SandboxOps};

#[derive(Default)]
pub(crate) struct FakeSandboxes {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    next: u64,
    sandboxes: BTreeMap<String, Sandbox>,
    nodes: BTreeMap<String, Node>,
    /// Nodes removed since the last `gc` (their layers are what it drops).
    dropped_layers: usize,
    fail_next: Option<SandboxError>,
}

struct Sandbox {
    info: SandboxInfo,
    files: BTreeSet<String>,
}

struct Node {
    info: NodeInfo,
    files: BTreeSet<String>,
    session_infos: Vec<SessionInfo>,
}

impl FakeSandboxes {
    /// The next call fails with `err`.
    pub(crate) fn fail_next(&self, err: SandboxError) {
        self.lock().fail_next = Some(err);
    }

    /// The state, or the error queued by `fail_next`.
    fn enter(&self) -> Result<MutexGuard<'_, State>, SandboxError> {
        let mut s = self.lock();
        match s.fail_next.take() {
            Some(err) => Err(err),
            None => Ok(s),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The one key `prefix` names among `keys`.
fn resolve<'a>(
    what: &'static str,
    prefix: &str,
    keys: impl Iterator<Item = &'a String>,
) -> Result<String, SandboxError> {
    let matches: Vec<String> = keys.filter(|k| k.starts_with(prefix)).cloned().collect();
    match matches.as_slice() {
        [one] if !prefix.is_empty() => Ok(one.clone()),
        [] | [_] => Err(match what {
            "sandbox" => SandboxError::UnknownSandbox {
                id: prefix.to_owned(),
            },
            _ => SandboxError::UnknownNode {
                id: prefix.to_owned(),
            },
        }),
        _ => Err(SandboxError::Ambiguous {
            what,
            prefix: prefix.to_owned(),
            candidates: matches,
        }),
    }
}

impl State {
    fn id(&mut self, tag: &str) -> String {
        self.next += 1;
        format!("{tag}-{:06}", self.next)
    }

    fn sandbox(&mut self, prefix: &str) -> Result<&mut Sandbox, SandboxError> {
        let id = resolve("sandbox", prefix, self.sandboxes.keys())?;
        Ok(self.sandboxes.get_mut(&id).expect("resolved"))
    }

    fn node_id(&self, prefix: &str) -> Result<String, SandboxError> {
        resolve("node", prefix, self.nodes.keys())
    }

    fn checkpoint_node(&mut self, sandbox: &str, label: Option<String>) -> NodeInfo {
        let id = self.id("nd");
        let s = self.sandboxes.get_mut(sandbox).expect("resolved");
        let info = NodeInfo {
            id: id.clone(),
            tree: s.info.tree.clone(),
            sandbox: s.info.id.clone(),
            parent: s.info.head.replace(id.clone()),
            label,
            created_ms: 1_700_000_000_000,
            bytes: 4096 * s.files.len() as u64,
            sessions: s
                .info
                .sessions
                .iter()
                .map(|x| NodeSessionInfo {
                    session: x.id.clone(),
                    kind: x.kind.clone(),
                    template: "live".into(),
                    generation: Some(1),
                })
                .collect(),
            processes: Vec::new(),
            timings: CheckpointTimings {
                total_ms: 1.5,
                quiesce_ms: 0.25,
                files_ms: 0.5,
                processes_ms: 0.5,
                record_ms: 0.25,
            },
        };
        let node = Node {
            info: info.clone(),
            files: s.files.clone(),
            session_infos: s.info.sessions.clone(),
        };
        self.nodes.insert(id, node);
        info
    }

    fn new_sandbox(
        &mut self,
        tree: Option<String>,
        from: Option<&Node>,
        req: &CreateSandbox,
    ) -> SandboxInfo {
        let id = self.id("sb");
        let tree = tree.unwrap_or_else(|| self.id("tr"));
        let info = SandboxInfo {
            id: id.clone(),
            tree,
            created_ms: 1_700_000_000_000 + self.next,
            rootfs: req.rootfs.clone(),
            limits: req.limits.clone(),
            auto_checkpoint: req.auto_checkpoint,
            head: from.map(|n| n.info.id.clone()),
            branched_from: from.map(|n| n.info.id.clone()),
            sessions: from.map(|n| n.session_infos.clone()).unwrap_or_default(),
            state: "running".into(),
            busy: None,
            dirty: None,
        };
        let files = from.map(|n| n.files.clone()).unwrap_or_default();
        self.sandboxes.insert(
            id,
            Sandbox {
                info: info.clone(),
                files,
            },
        );
        info
    }

    /// A node and every node under it.
    fn subtree(&self, root: &str) -> Vec<String> {
        let mut out = vec![root.to_owned()];
        let mut i = 0;
        while i < out.len() {
            let parent = out[i].clone();
            out.extend(
                self.nodes
                    .values()
                    .filter(|n| n.info.parent.as_deref() == Some(parent.as_str()))
                    .map(|n| n.info.id.clone()),
            );
            i += 1;
        }
        out
    }
}

fn invalid(message: &str) -> SandboxError {
    SandboxError::Invalid {
        message: message.to_owned(),
    }
}

impl SandboxOps for FakeSandboxes {
    fn create(&self, req: &CreateSandbox) -> Result<SandboxInfo, SandboxError> {
        let mut s = self.enter()?;
        if req.limits.cpus.is_some_and(|c| c <= 0.0) {
            return Err(invalid("cpus must be more than 0"));
        }
        if req.rootfs.as_ref().is_some_and(|r| !r.starts_with('/')) {
            return Err(invalid("rootfs must be an absolute path"));
        }
        Ok(s.new_sandbox(None, None, req))
    }

    fn list(&self) -> Result<Vec<SandboxInfo>, SandboxError> {
        let s = self.enter()?;
        Ok(s.sandboxes.values().map(|x| x.info.clone()).collect())
    }

    fn get(&self, sandbox: &str) -> Result<SandboxInfo, SandboxError> {
        Ok(self.enter()?.sandbox(sandbox)?.info.clone())
    }

    fn remove(&self, sandbox: &str) -> Result<Removed, SandboxError> {
        let mut s = self.enter()?;
        let id = s.sandbox(sandbox)?.info.id.clone();
        s.sandboxes.remove(&id);
        Ok(Removed {
            nodes: Vec::new(),
            sandboxes: vec![id],
        })
    }

    fn exec(&self, sandbox: &str, req: &ExecRequest) -> Result<ExecResult, SandboxError> {
        let mut s = self.enter()?;
        let sb = s.sandbox(sandbox)?;
        let Some((cmd, args)) = req.argv.split_first() else {
            return Err(invalid("argv is empty"));
        };
        let mut result = ExecResult {
            exit_code: Some(0),
            signal: None,
            stdout: String::new(),
            stderr: String::new(),
            timed_out: false,
            truncated: false,
            duration_ms: 0.5,
            node: None,
        };
        match cmd.as_str() {
            "echo" => result.stdout = format!("{}\n", args.join(" ")),
            "touch" => sb.files.extend(args.iter().cloned()),
            "rm" => sb.files.retain(|f| !args.contains(f)),
            "false" => result.exit_code = Some(1),
            "sleep" => {
                result.exit_code = None;
                result.signal = Some(9);
                result.timed_out = true;
            }
            other => {
                result.exit_code = Some(127);
                result.stderr = format!("{other}: command not found\n");
            }
        }
        if sb.info.auto_checkpoint {
            let id = sb.info.id.clone();
            result.node = Some(s.checkpoint_node(&id, None));
        }
        Ok(result)
    }

    fn session_start(
        &self,
        sandbox: &str,
        req: &SessionStart,
    ) -> Result<SessionInfo, SandboxError> {
        let mut s = self.enter()?;
        if !matches!(req.kind.as_str(), "bash" | "python") {
            return Err(invalid(&format!(
                "session kind {:?} is neither bash nor python",
                req.kind
            )));
        }
        let id = s.sandbox(sandbox)?.info.id.clone();
        let session = SessionInfo {
            id: s.id("ss"),
            kind: req.kind.clone(),
            pid: 4000 + i32::try_from(s.next).unwrap_or(0),
            started_ms: 1_700_000_000_000,
        };
        s.sandboxes
            .get_mut(&id)
            .expect("resolved")
            .info
            .sessions
            .push(session.clone());
        Ok(session)
    }

    fn session_run(
        &self,
        sandbox: &str,
        session: &str,
        req: &SessionRun,
    ) -> Result<SessionRunResult, SandboxError> {
        let mut s = self.enter()?;
        let sb = s.sandbox(sandbox)?;
        let id = resolve_session(sb, session)?;
        if req.code == "exit" {
            return Err(SandboxError::Session {
                sandbox: sb.info.id.clone(),
                session: id,
                message: "the interpreter exited".into(),
            });
        }
        Ok(SessionRunResult {
            stdout: format!("{}\n", req.code),
            stderr: String::new(),
            status: i32::from(req.code.contains("fail")),
            timed_out: false,
            truncated: false,
            duration_ms: 0.25,
            node: None,
        })
    }

    fn session_stop(&self, sandbox: &str, session: &str) -> Result<SessionInfo, SandboxError> {
        let mut s = self.enter()?;
        let sb = s.sandbox(sandbox)?;
        let id = resolve_session(sb, session)?;
        let i = sb
            .info
            .sessions
            .iter()
            .position(|x| x.id == id)
            .expect("resolved");
        Ok(sb.info.sessions.remove(i))
    }

    fn checkpoint(&self, sandbox: &str, req: &CheckpointRequest) -> Result<NodeInfo, SandboxError> {
        let mut s = self.enter()?;
        let id = s.sandbox(sandbox)?.info.id.clone();
        Ok(s.checkpoint_node(&id, req.label.clone()))
    }

    fn rollback(
        &self,
        sandbox: &str,
        req: &RollbackRequest,
    ) -> Result<RollbackResult, SandboxError> {
        let mut s = self.enter()?;
        let node_id = s.node_id(&req.node)?;
        let (files, sessions, node_tree) = {
            let n = &s.nodes[&node_id];
            (
                n.files.clone(),
                n.session_infos.clone(),
                n.info.tree.clone(),
            )
        };
        let sb = s.sandbox(sandbox)?;
        if sb.info.tree != node_tree {
            return Err(SandboxError::NodeOfAnotherTree {
                node: node_id,
                node_tree,
                sandbox: sb.info.id.clone(),
                sandbox_tree: sb.info.tree.clone(),
            });
        }
        if req.mode != RollbackMode::ProcessesOnly {
            sb.files = files;
        }
        if req.mode != RollbackMode::FilesOnly {
            sb.info.sessions = sessions;
        }
        sb.info.head = Some(node_id.clone());
        Ok(RollbackResult {
            sandbox: sb.info.id.clone(),
            node: node_id,
            mode: req.mode,
            sessions: sb.info.sessions.clone(),
            timings: RollbackTimings {
                total_ms: 2.0,
                kill_ms: 0.5,
                files_ms: 0.5,
                processes_ms: 1.0,
                fork_ms: 0.4,
                fallback_ms: 0.2,
                fixup_ms: 0.3,
                resume_ms: 0.1,
            },
            standby_sessions: 0,
            warm_up: false,
        })
    }

    fn branch(&self, node: &str, req: &BranchRequest) -> Result<BranchResult, SandboxError> {
        let mut s = self.enter()?;
        if !(1..=64).contains(&req.count) {
            return Err(invalid(&format!(
                "count {} is not within 1 to 64",
                req.count
            )));
        }
        let node_id = s.node_id(node)?;
        let from = s.nodes.remove(&node_id).expect("resolved");
        let tree = from.info.tree.clone();
        let sandboxes: Vec<SandboxInfo> = (0..req.count)
            .map(|_| s.new_sandbox(Some(tree.clone()), Some(&from), &CreateSandbox::default()))
            .collect();
        s.nodes.insert(node_id.clone(), from);
        Ok(BranchResult {
            node: node_id,
            branch_ms: sandboxes.iter().map(|_| 3.0).collect(),
            sandboxes,
        })
    }

    fn tree(&self, sandbox_or_node: &str) -> Result<TreeView, SandboxError> {
        let mut s = self.enter()?;
        let tree = match s.sandbox(sandbox_or_node) {
            Ok(sb) => sb.info.tree.clone(),
            Err(SandboxError::UnknownSandbox { .. }) => {
                let id = s.node_id(sandbox_or_node)?;
                s.nodes[&id].info.tree.clone()
            }
            Err(err) => return Err(err),
        };
        let nodes: Vec<NodeInfo> = s
            .nodes
            .values()
            .filter(|n| n.info.tree == tree)
            .map(|n| n.info.clone())
            .collect();
        let sandboxes: Vec<SandboxHead> = s
            .sandboxes
            .values()
            .filter(|x| x.info.tree == tree)
            .map(|x| SandboxHead {
                sandbox: x.info.id.clone(),
                head: x.info.head.clone(),
            })
            .collect();
        let text = nodes
            .iter()
            .map(|n| format!("{} <- {}\n", n.id, n.parent.as_deref().unwrap_or("root")))
            .collect();
        Ok(TreeView {
            tree,
            nodes,
            sandboxes,
            text,
        })
    }

    fn diff(&self, from: &str, to: &str) -> Result<DiffResult, SandboxError> {
        let s = self.enter()?;
        let (from, to) = (s.node_id(from)?, s.node_id(to)?);
        let (a, b) = (&s.nodes[&from].files, &s.nodes[&to].files);
        let entry = |path: &String, change: &str| DiffEntry {
            path: path.clone(),
            change: change.into(),
            file_type: "file".into(),
        };
        let mut changes: Vec<DiffEntry> = b
            .difference(a)
            .map(|p| entry(p, "added"))
            .chain(a.difference(b).map(|p| entry(p, "removed")))
            .collect();
        changes.sort_by(|x, y| x.path.cmp(&y.path));
        Ok(DiffResult { from, to, changes })
    }

    fn remove_node(&self, node: &str) -> Result<Removed, SandboxError> {
        let mut s = self.enter()?;
        let id = s.node_id(node)?;
        let subtree = s.subtree(&id);
        let users: Vec<String> = s
            .sandboxes
            .values()
            .filter(|x| x.info.head.as_ref().is_some_and(|h| subtree.contains(h)))
            .map(|x| x.info.id.clone())
            .collect();
        if !users.is_empty() {
            return Err(SandboxError::NodeInUse {
                node: id,
                sandboxes: users,
            });
        }
        for n in &subtree {
            s.nodes.remove(n);
        }
        s.dropped_layers += subtree.len();
        Ok(Removed {
            nodes: subtree,
            sandboxes: Vec::new(),
        })
    }

    fn gc(&self) -> Result<GcResult, SandboxError> {
        let mut s = self.enter()?;
        let layers_removed = std::mem::take(&mut s.dropped_layers);
        Ok(GcResult {
            layers_removed,
            trees_removed: 0,
            dumps_removed: 0,
            // The fake keeps no file chains: it reports its removed nodes' layers as
            // squashed too, so the squash counter has a path through the API.
            layers_squashed: layers_removed,
            ..GcResult::default()
        })
    }
}

fn resolve_session(sb: &Sandbox, prefix: &str) -> Result<String, SandboxError> {
    let ids: Vec<String> = sb.info.sessions.iter().map(|x| x.id.clone()).collect();
    resolve("session", prefix, ids.iter()).map_err(|err| match err {
        SandboxError::Ambiguous { .. } => err,
        _ => SandboxError::UnknownSession {
            sandbox: sb.info.id.clone(),
            id: prefix.to_owned(),
        },
    })
}
