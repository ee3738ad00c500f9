//! Every process of a sandbox, not only its sessions: background jobs, children of a
//! session, servers the agent started (docs/deltacr.md, "Process trees").
//!
//! A checkpoint seizes each process of the sandbox's `work/` cgroup other than the
//! sessions while the cgroup is still frozen — so all of them are taken at the freeze,
//! the instant of the files' snapshot — records the pipes to and between them with the
//! bytes unread in them, and, once the sessions are checkpointed, forks each into a
//! template. A restore (rollback, branch, revival) makes a fresh pipe per recorded one,
//! held by a holder process of the tree while the sandbox's processes are restored and
//! open their ends through it; a pipe that was a session's stdio is opened through the
//! restored session's own fd. The tree's init and DeltaBox's helpers (anchors, holders)
//! are in other cgroups, and never taken.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use nix::unistd::Pid;

use super::process_dumps::ProcessSource;
use crate::cr::fdtable::{self, FdEntry};
use crate::cr::pipes::{Fresh, PipeFd, PipeState};
use crate::cr::{self, CheckpointOptions, ProcessState, RestoreOptions, Seizing, Template};
use crate::sandbox::error::SandboxError;
use crate::sandbox::manager::adopt::TemplateState;
use crate::sandbox::manager::{LiveSession, NodeTemplates};
use crate::sandbox::runtime::TreeRuntime;
use crate::tree::records::{NodeProcess, NodeRecord};

/// How many threads restore a node's other processes.
const RESTORE_THREADS: usize = 4;
/// How many threads seize and fork a sandbox's other processes at a checkpoint.
const FORK_THREADS: usize = 4;

/// A thread that seized some of the sandbox's other processes (ptrace binds a tracee
/// to the thread that seized it) and, once told, forks each into its template (`true`)
/// or lets them go (`false`).
#[derive(Debug)]
struct Worker {
    go: mpsc::Sender<bool>,
    done: std::thread::JoinHandle<Result<Vec<Template>, String>>,
}

/// The sandbox's other processes, seized at the freeze by worker threads, and its
/// pipes. Dropping it lets the processes go.
#[derive(Debug, Default)]
pub(super) struct Extras {
    workers: Vec<Worker>,
    /// The pipes beyond the sessions' stdio, recorded while everything was frozen.
    pub pipes: Vec<PipeState>,
}

impl Drop for Extras {
    fn drop(&mut self) {
        let _ = self.finish(false);
    }
}

/// Seizes each of `pids` on this thread, reports, then forks or lets them go as told.
fn seize_and_fork(
    pids: Vec<i32>,
    opts: CheckpointOptions,
    seized_tx: mpsc::Sender<Result<(), String>>,
    go: mpsc::Receiver<bool>,
) -> Result<Vec<Template>, String> {
    let mut seized: Vec<Seizing> = Vec::with_capacity(pids.len());
    let mut result = Ok(());
    for pid in pids {
        match cr::seize(Pid::from_raw(pid), &opts) {
            Ok(s) => seized.push(s),
            // Exited since the listing.
            Err(_) if !Path::new(&format!("/proc/{pid}")).exists() => {}
            Err(e) => {
                result = Err(format!("process {pid}: {e}"));
                break;
            }
        }
    }
    let failed = result.is_err();
    let _ = seized_tx.send(result);
    if failed || !go.recv().unwrap_or(false) {
        return Ok(Vec::new());
    }
    // A failure drops the rest (let go) and the templates made (killed).
    seized
        .into_iter()
        .map(|s| {
            let pid = s.pid();
            s.fork(&opts).map_err(|e| format!("process {pid}: {e}"))
        })
        .collect()
}

/// The processes (host pids) listed in the cgroup `dir`.
fn procs_of(dir: &Path) -> Result<Vec<i32>, std::io::Error> {
    let listed = std::fs::read_to_string(dir.join("cgroup.procs"))?;
    Ok(listed
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect())
}

/// While `work` (the sandbox's frozen cgroup) is frozen: seizes every process in it
/// but `sessions`, and records every pipe any of its processes has beyond the
/// sessions' fds 0–2 (which are the controller's pipes). Errors name the process.
pub(super) fn seize_extras(
    work: &Path,
    sessions: &[Pid],
    opts: &CheckpointOptions,
) -> Result<Extras, String> {
    let all = procs_of(work).map_err(|e| format!("listing {}: {e}", work.display()))?;
    let session_pids: Vec<i32> = sessions.iter().map(|p| p.as_raw()).collect();
    let mut stdio = Vec::new();
    let mut pipe_fds = Vec::new();
    for &pid in &all {
        // A process that exits meanwhile has no fds left to list: skipped, as it is by
        // the seize below.
        let Ok(fds) = cr::procfs::fds(pid) else {
            continue;
        };
        for (fd, target) in fds {
            let Some(inode) = fdtable::pipe_inode(&target) else {
                continue;
            };
            if session_pids.contains(&pid) && (0..=2).contains(&fd) {
                stdio.push(inode);
            } else {
                pipe_fds.push(PipeFd { inode, pid, fd });
            }
        }
    }
    // A session's own restore reopens its pipes before any session's stdio pipes
    // exist: one it holds beyond fd 2 on a session's stdio pipe cannot be placed.
    if let Some(p) = pipe_fds
        .iter()
        .find(|p| session_pids.contains(&p.pid) && stdio.contains(&p.inode))
    {
        return Err(format!(
            "session pid {}: fd {} is a session's stdio pipe (pipe:[{}]), which DeltaBox \
             restores at fds 0-2 only",
            p.pid, p.fd, p.inode
        ));
    }
    pipe_fds.retain(|p| !stdio.contains(&p.inode));
    let pipes = cr::pipes::record(&pipe_fds).map_err(|e| e.to_string())?;
    // A restore hands them to one holder process, in one SCM_RIGHTS message.
    if pipes.len() > crate::sandbox::runtime::MAX_HELD {
        return Err(format!(
            "its processes have {} pipes between them, and DeltaBox restores at most {}",
            pipes.len(),
            crate::sandbox::runtime::MAX_HELD
        ));
    }
    let others: Vec<i32> = all
        .into_iter()
        .filter(|p| !session_pids.contains(p))
        .collect();
    let mut extras = Extras {
        workers: Vec::new(),
        pipes,
    };
    if others.is_empty() {
        return Ok(extras);
    }
    let (seized_tx, seized_rx) = mpsc::channel();
    for chunk in others.chunks(others.len().div_ceil(FORK_THREADS)) {
        let (go, go_rx) = mpsc::channel();
        let (pids, opts, tx) = (chunk.to_vec(), opts.clone(), seized_tx.clone());
        let done = std::thread::Builder::new()
            .name("dbx-proctree".to_owned())
            .spawn(move || seize_and_fork(pids, opts, tx, go_rx))
            .map_err(|e| format!("starting a checkpoint thread: {e}"))?;
        extras.workers.push(Worker { go, done });
    }
    drop(seized_tx);
    // Every worker reports once, whatever happened (a dead one closes the channel).
    for _ in 0..extras.workers.len() {
        match seized_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err("a checkpoint thread died".to_owned()),
        }
    }
    Ok(extras)
}

impl Extras {
    /// Unless the checkpoint has `failed` already, forks each seized process into its
    /// template (the cgroup thawed by now), in order; an error goes to `failed`. The
    /// processes not forked are let go.
    pub(super) fn fork_all_unless(&mut self, failed: &mut Option<String>) -> Vec<Template> {
        match self.finish(failed.is_none()) {
            Ok(templates) => templates,
            Err(e) => {
                failed.get_or_insert(e);
                Vec::new()
            }
        }
    }

    /// Tells every worker to fork (`true`) or to let its processes go, and collects
    /// the templates.
    fn finish(&mut self, fork: bool) -> Result<Vec<Template>, String> {
        let workers = std::mem::take(&mut self.workers);
        for w in &workers {
            let _ = w.go.send(fork);
        }
        let mut templates = Vec::new();
        let mut failed = None;
        for w in workers {
            match w.done.join() {
                Ok(Ok(made)) => templates.extend(made),
                Ok(Err(e)) => {
                    failed.get_or_insert(e);
                }
                Err(_) => {
                    failed.get_or_insert("a checkpoint thread panicked".to_owned());
                }
            }
        }
        match failed {
            // The templates made are dropped: killed.
            Some(e) => Err(e),
            None => Ok(templates),
        }
    }

    /// The node's `pipes` field: `null` when there are none.
    pub(super) fn pipes_value(&self) -> serde_json::Value {
        if self.pipes.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::to_value(&self.pipes).unwrap_or_default()
        }
    }
}

/// Whether `pid` has exited (gone, or a zombie).
fn exited(pid: Pid) -> bool {
    cr::procfs::stat(pid.as_raw()).map_or(true, |s| matches!(s.state, 'Z' | 'X' | 'x'))
}

/// The node's record of each extra process's template.
pub(super) fn records_of(templates: &[Template]) -> Vec<NodeProcess> {
    templates
        .iter()
        .map(|t| NodeProcess {
            pid: t.state().pid,
            comm: t.state().comm.clone(),
            template: Some(crate::sandbox::manager::adopt::template_record(t)),
        })
        .collect()
}

/// `node`'s other processes for the API: a template is `live` while its process is in
/// its own cgroup (removed with it), else `dumped` when the process's dump is on disk.
pub(super) fn infos(node: &NodeRecord) -> Vec<crate::api::sandbox_types::NodeProcessInfo> {
    node.processes
        .iter()
        .map(|p| {
            let live = p.template.as_ref().is_some_and(|t| {
                std::fs::read_to_string(t.cgroup.join("cgroup.procs"))
                    .is_ok_and(|l| l.lines().any(|l| l.trim() == t.host_pid.to_string()))
            });
            crate::api::sandbox_types::NodeProcessInfo {
                pid: p.pid,
                comm: p.comm.clone(),
                template: if live {
                    "live"
                } else if cr::dump::worker::dumped(&super::process_dumps::name_of(node.id, p.pid)) {
                    "dumped"
                } else {
                    "none"
                }
                .to_owned(),
            }
        })
        .collect()
}

/// The recorded pipes of `node`.
pub(super) fn pipes_of(node: &NodeRecord) -> Result<Vec<PipeState>, SandboxError> {
    if node.pipes.is_null() {
        return Ok(Vec::new());
    }
    serde_json::from_value(node.pipes.clone())
        .map_err(|e| SandboxError::internal(format!("node {}: its pipes", node.id), e))
}

/// The fd table a session had at `node`: from its live template, else from the record,
/// else (its template evicted) from its dump under `dumps`.
fn session_fds(
    node: &NodeRecord,
    index: usize,
    templates: Option<&NodeTemplates>,
    dumps: &Path,
) -> Vec<FdEntry> {
    let session = &node.sessions[index];
    if let Some((_, _, template)) = templates.and_then(|t| {
        t.sessions
            .iter()
            .find(|(sid, _, _)| *sid == session.session)
    }) {
        return template.state().fds.clone();
    }
    session
        .template
        .as_ref()
        .and_then(|r| serde_json::from_value::<TemplateState>(r.state.clone()).ok())
        .map(|s: TemplateState| {
            let ProcessState { fds, .. } = s.process;
            fds
        })
        .or_else(|| dump_fds(node, index, dumps))
        .unwrap_or_default()
}

/// The fd table a session had at `node` as its dump recorded it.
fn dump_fds(node: &NodeRecord, index: usize, dumps: &Path) -> Option<Vec<FdEntry>> {
    let session = &node.sessions[index];
    let name = cr::dump::dump_name(&node.id.to_string(), &session.session.to_string());
    cr::dump::Dump::open(dumps, &name)
        .ok()
        .map(|d| d.state().fds.clone())
}

/// Fresh pipes for a restore of a node, handed to a holder process of the tree.
pub(super) struct RestorePipes<'a> {
    /// Per recorded inode, the path a restored process opens.
    pub paths: HashMap<u64, PathBuf>,
    _held: Option<crate::sandbox::runtime::HeldFiles<'a>>,
    _fresh: Fresh,
}

impl<'a> RestorePipes<'a> {
    /// Makes a fresh pipe per recorded one of `node` (with its unread bytes) and has a
    /// holder of `runtime`'s tree keep them open.
    pub(super) fn make(runtime: &'a TreeRuntime, node: &NodeRecord) -> Result<Self, SandboxError> {
        let states = pipes_of(node)?;
        let err = |e: cr::pipes::PipeError| SandboxError::internal(format!("node {}", node.id), e);
        let fresh = Fresh::make(&states).map_err(err)?;
        let mut paths = HashMap::new();
        let held = if fresh.pipes.is_empty() {
            None
        } else {
            let held = runtime
                .hold_files(&fresh.read_ends().map_err(err)?)
                .map_err(|e| {
                    SandboxError::internal(format!("node {}: holding its pipes", node.id), e)
                })?;
            for (i, (inode, _, _)) in fresh.pipes.iter().enumerate() {
                paths.insert(*inode, held.path(i));
            }
            Some(held)
        };
        Ok(Self {
            paths,
            _held: held,
            _fresh: fresh,
        })
    }

    /// Adds the stdio pipes of the restored `sessions` of `node`: a pipe that was a
    /// session's fd 0–2 is opened through that fd of the restored session. `dumps`: the
    /// dumps root (a session whose template is gone has its fd table in its dump).
    pub(super) fn add_sessions(
        &mut self,
        node: &NodeRecord,
        templates: Option<&NodeTemplates>,
        sessions: &[LiveSession],
        dumps: &Path,
    ) {
        for (i, s) in node.sessions.iter().enumerate() {
            let Some(live) = sessions.iter().find(|l| l.id == s.session) else {
                continue;
            };
            let Some(ns_pid) = TreeRuntime::ns_pid_of(live.pid) else {
                continue;
            };
            // A template re-made from a session restored from its dump has the restored
            // session's pipes; the node's other processes were dumped with the first
            // ones, which the dump names.
            let fds = session_fds(node, i, templates, dumps)
                .into_iter()
                .chain(dump_fds(node, i, dumps).unwrap_or_default());
            for entry in fds {
                if let (0..=2, Some(inode)) = (entry.fd, entry.pipe) {
                    self.paths.entry(inode).or_insert_with(|| {
                        PathBuf::from(format!("/proc/{ns_pid}/fd/{}", entry.fd))
                    });
                }
            }
        }
    }
}

/// Restores the other processes of a node, each from its `sources` entry (its
/// template, or its dump: see `process_dumps.rs`), into sandbox `name` with `opts`,
/// each a session and process-group leader of its own, and moves each to the
/// sandbox's v1 limit cgroups.
pub(super) fn restore_others(
    runtime: &TreeRuntime,
    name: &str,
    sources: &[ProcessSource],
    opts: &RestoreOptions,
) -> Result<(), SandboxError> {
    let failed = |message: String| SandboxError::Process {
        sandbox: name.to_owned(),
        message: format!("restoring its other processes: {message}"),
    };
    // A few at a time: a restore mostly waits on the kernel (ptrace stops, the
    // template cgroup's freeze), like the sessions' checkpoints.
    let restore_one = |source: &ProcessSource| -> Result<(), SandboxError> {
        let restored = source
            .restore(runtime, name, opts)
            .map_err(|e| failed(format!("process {}: {e}", source.label())))?;
        let pid = restored.pid();
        // It runs at once (a session waits for its next command): it may have exited
        // already (a `sleep 0.05` restored at its end).
        match super::join_limit_cgroups(runtime, name, pid) {
            Err(e) if !exited(pid) => Err(e),
            _ => Ok(()),
        }
    };
    let all = sources;
    if all.len() < 2 {
        return all.iter().try_for_each(restore_one);
    }
    let per_thread = all.len().div_ceil(RESTORE_THREADS);
    std::thread::scope(|scope| {
        let running: Vec<_> = all
            .chunks(per_thread)
            .map(|chunk| scope.spawn(move || chunk.iter().try_for_each(restore_one)))
            .collect();
        running.into_iter().try_for_each(|handle| {
            handle
                .join()
                .unwrap_or_else(|_| Err(failed("a restore thread panicked".to_owned())))
        })
    })?;
    Ok(())
}
