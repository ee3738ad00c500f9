//! A tree's runtime: one set of namespaces (mount, pid, uts, ipc, net) and one init
//! per tree of sandboxes; per sandbox a DeltaFS root its processes are chrooted into,
//! cgroups with limits, and an *anchor* process through which DeltaCR reaches the
//! sandbox's root and cgroups from inside the tree. See `docs/sandbox-runtime.md`.
//!
//! - [`TreeRuntime`]: the daemon's handle (start, add sandboxes, spawn, freeze, kill);
//! - `init`: the tree's pid 1 (`deltabox-init`);
//! - `child`: what init's forked children do before they run (cgroups, chroot, caps);
//! - `lifecycle`: start, adopt, detach, shutdown of a tree;
//! - `mounts`: init's `/dev` and `/sys`, and each sandbox's `proc`, `dev`, `sys`;
//! - `cgroups`: the cgroup layout and the limits; `proto`: the control messages;
//!   `channel`: the daemon's end of the control socket; `sys`: the raw kernel calls.

mod cgroups;
mod channel;
mod child;
mod freezer;
mod init;
mod lifecycle;
mod mounts;
mod proto;
mod sys;
mod types;

use std::{
    collections::HashMap,
    fs::{self, File},
    io,
    os::fd::{AsRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    process::Child,
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use nix::{fcntl::OFlag, sys::stat::Mode, unistd::Pid};

pub use cgroups::{CgroupSetupError, remove_leftover_tree};
use channel::{Channel, Mailbox, lock};
pub use child::SANDBOX_CAPS;
pub use init::main as init_main;
pub use proto::ProtoError;
use proto::{ReplyData, Request, RequestMsg};
pub use types::{ExitStatus, Limits, RuntimeError, SpawnRequest, Spawned, TreeConfig};

/// How long a request to init may take before it counts as hung.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long init may take to set up.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A sandbox the runtime knows.
#[derive(Debug, Default)]
struct SandboxState {
    /// The anchor's ns pid, once `add_sandbox` succeeded.
    anchor: Option<i32>,
}

/// The daemon's handle on one tree of sandboxes. `Send + Sync`: its methods may be
/// called from several threads at once.
pub struct TreeRuntime {
    cfg: TreeConfig,
    cgroups: cgroups::TreeCgroups,
    channel: Arc<Channel>,
    init_pid: Pid,
    shim: Mutex<Option<Child>>,
    reader: Mutex<Option<thread::JoinHandle<()>>>,
    sandboxes: Mutex<HashMap<String, SandboxState>>,
    shut_down: bool,
}

/// The most files one [`TreeRuntime::hold_files`] takes (`SCM_MAX_FD` is 253).
pub const MAX_HELD: usize = 200;

/// Files a holder process keeps open for the processes of a tree; released on drop.
pub struct HeldFiles<'a> {
    runtime: &'a TreeRuntime,
    pid: i32,
}

impl HeldFiles<'_> {
    /// The `i`th file as any process of the tree names it: `/proc/<holder>/fd/<3 + i>`.
    pub fn path(&self, i: usize) -> PathBuf {
        PathBuf::from(format!("/proc/{}/fd/{}", self.pid, 3 + i))
    }
}

impl Drop for HeldFiles<'_> {
    fn drop(&mut self) {
        if let Err(e) = self
            .runtime
            .request(Request::Release { pid: self.pid }, &[])
        {
            tracing::warn!(holder = self.pid, "cannot release held files: {e}");
        }
    }
}

impl TreeRuntime {
    /// The tree's id.
    pub fn id(&self) -> &str {
        &self.cfg.id
    }

    /// Host pid of the tree's pid 1.
    pub fn init_pid(&self) -> Pid {
        self.init_pid
    }

    /// Host path where the daemon mounts the sandbox's view (the directory is created).
    pub fn view_mountpoint(&self, sandbox: &str) -> PathBuf {
        let dir = self.cfg.run_dir.join("root/sb").join(sandbox);
        let _ = fs::create_dir_all(&dir);
        dir
    }

    /// Creates the sandbox's cgroups (with `limits`) and its mount point; returns it.
    pub fn prepare_sandbox(&self, sandbox: &str, limits: &Limits) -> Result<PathBuf, RuntimeError> {
        check_name(sandbox)?;
        self.cgroups
            .create_sandbox(sandbox, limits)
            .map_err(|source| self.cg_err(source))?;
        let dir = self.cfg.run_dir.join("root/sb").join(sandbox);
        fs::create_dir_all(&dir).map_err(|source| self.io_err("mkdir", &dir, source))?;
        lock(&self.sandboxes).entry(sandbox.to_owned()).or_default();
        Ok(dir)
    }

    /// After the caller mounted the sandbox's view at [`Self::view_mountpoint`]: init
    /// sets up /proc and /dev in it and starts the sandbox's anchor.
    pub fn add_sandbox(&self, sandbox: &str) -> Result<(), RuntimeError> {
        self.known(sandbox)?;
        let open_dir = |path: &Path| {
            nix::fcntl::open(
                path,
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| self.io_err("open", path, e.into()))
        };
        let mut fds = vec![
            open_dir(&self.sandbox_cgroup(sandbox))?,
            open_dir(&self.templates_cgroup())?,
        ];
        let v1 = self.cgroups.sandbox_v1(sandbox);
        for dir in &v1 {
            fds.push(open_dir(dir)?);
        }
        let req = Request::AddSandbox {
            sandbox: sandbox.to_owned(),
            limit_dirs: v1.len(),
        };
        let (data, _, _) = self.request(req, &fds)?;
        let ReplyData::Anchor(pid) = data else {
            return Err(self.init_err(format!("unexpected reply to add sandbox: {data:?}")));
        };
        lock(&self.sandboxes)
            .entry(sandbox.to_owned())
            .or_default()
            .anchor = Some(pid);
        Ok(())
    }

    /// `/proc/<tree anchor>/root`: the tree's root as any process of the tree can name
    /// it (the tree anchor is started on the first call; see [`Request::TreeAnchor`]).
    pub fn tree_root_in_ns(&self) -> Result<PathBuf, RuntimeError> {
        let (data, _, _) = self.request(Request::TreeAnchor, &[])?;
        let ReplyData::Anchor(pid) = data else {
            return Err(self.init_err(format!("unexpected reply to tree anchor: {data:?}")));
        };
        Ok(PathBuf::from(format!("/proc/{pid}/root")))
    }

    /// Hands `files` to the processes of the tree: a holder process (see
    /// [`Request::Hold`]) keeps them open until the returned [`HeldFiles`] is dropped.
    /// At most [`MAX_HELD`] files at once (what one `SCM_RIGHTS` message carries).
    pub fn hold_files(&self, files: &[OwnedFd]) -> Result<HeldFiles<'_>, RuntimeError> {
        if files.len() > MAX_HELD {
            return Err(self.init_err(format!(
                "{} files to hold, at most {MAX_HELD} at once",
                files.len()
            )));
        }
        let (data, _, _) = self.request(Request::Hold, files)?;
        let ReplyData::Anchor(pid) = data else {
            return Err(self.init_err(format!("unexpected reply to hold: {data:?}")));
        };
        Ok(HeldFiles { runtime: self, pid })
    }

    /// Starts a husk in the sandbox (see [`Request::Husk`]): a sleeping process, in the
    /// sandbox's cgroups and root, for DeltaCR to restore a dump into. Returns its host
    /// pid and a pidfd.
    pub fn husk(&self, sandbox: &str) -> Result<(Pid, OwnedFd), RuntimeError> {
        if self.anchor_ns_pid(sandbox).is_none() {
            return Err(self.unknown(sandbox));
        }
        let msg = Request::Husk {
            sandbox: sandbox.to_owned(),
        };
        let (data, mut reply_fds, _) = self.request(msg, &[])?;
        let ReplyData::Spawned(ns_pid) = data else {
            return Err(self.init_err(format!("unexpected reply to husk: {data:?}")));
        };
        let Some(pidfd) = reply_fds.pop() else {
            return Err(self.init_err(format!("husk {ns_pid}: no pidfd in the reply")));
        };
        let host_pid = pid_of_pidfd(&pidfd)
            .ok_or_else(|| self.init_err(format!("no host pid for husk {ns_pid}")))?;
        Ok((host_pid, pidfd))
    }

    /// Runs a command in the sandbox; errors before its exec (no such binary, bad cwd)
    /// come back as [`RuntimeError::Init`] naming the file and the sandbox.
    pub fn spawn(&self, sandbox: &str, req: &SpawnRequest) -> Result<Spawned, RuntimeError> {
        if self.anchor_ns_pid(sandbox).is_none() {
            return Err(self.unknown(sandbox));
        }
        let pipe = || {
            nix::unistd::pipe2(OFlag::O_CLOEXEC)
                .map_err(|e| self.io_err("pipe", &self.cfg.run_dir, e.into()))
        };
        let stdin = if req.stdin { Some(pipe()?) } else { None };
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        let mut fds = Vec::new();
        if let Some((r, _)) = &stdin {
            fds.push(
                r.try_clone()
                    .map_err(|e| self.io_err("dup", &self.cfg.run_dir, e))?,
            );
        }
        fds.push(out_w);
        fds.push(err_w);
        let msg = Request::Spawn {
            sandbox: sandbox.to_owned(),
            argv: req.argv.clone(),
            env: req.env.clone(),
            cwd: req.cwd.clone(),
            stdin: req.stdin,
        };
        let (data, mut reply_fds, started) = self.request(msg, &fds)?;
        drop(fds);
        let ReplyData::Spawned(ns_pid) = data else {
            return Err(self.init_err(format!("unexpected reply to spawn: {data:?}")));
        };
        let Some(pidfd) = reply_fds.pop() else {
            return Err(self.init_err(format!("spawn of pid {ns_pid}: no pidfd in the reply")));
        };
        // The child's own announcement is race-free; the pidfd's fdinfo works only while
        // the child has not been reaped yet.
        let host_pid = started
            .filter(|p| *p > 0)
            .map(Pid::from_raw)
            .or_else(|| pid_of_pidfd(&pidfd))
            .ok_or_else(|| self.init_err(format!("no host pid for ns pid {ns_pid}")))?;
        Ok(Spawned {
            ns_pid,
            host_pid,
            pidfd,
            stdin: stdin.map(|(_, w)| File::from(w)),
            stdout: File::from(out_r),
            stderr: File::from(err_r),
        })
    }

    /// Waits until init reports the exit of `ns_pid` (also if it was reported before
    /// this call). `None` on timeout.
    pub fn wait_exit(
        &self,
        ns_pid: i32,
        timeout: Option<Duration>,
    ) -> Result<Option<ExitStatus>, RuntimeError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut mb = lock(&self.channel.mailbox);
        loop {
            if let Some(status) = mb.exits.get(&ns_pid) {
                return Ok(Some(*status));
            }
            if mb.gone {
                return Err(self.gone());
            }
            mb = match deadline {
                None => self
                    .channel
                    .cond
                    .wait(mb)
                    .unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Ok(None);
                    }
                    self.channel
                        .cond
                        .wait_timeout(mb, d - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    }

    /// The pid of `host_pid` in its innermost pid namespace (`NSpid`, last field).
    pub fn ns_pid_of(host_pid: Pid) -> Option<i32> {
        let status = fs::read_to_string(format!("/proc/{host_pid}/status")).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("NSpid:"))?
            .split_whitespace()
            .last()?
            .parse()
            .ok()
    }

    /// Host path of `sb-<sandbox>`.
    pub fn sandbox_cgroup(&self, sandbox: &str) -> PathBuf {
        self.cgroups.sandbox(sandbox)
    }

    /// How many processes of the sandbox the OOM killer killed so far.
    pub fn oom_kills(&self, sandbox: &str) -> u64 {
        self.cgroups.oom_kills(sandbox)
    }

    /// Host path of the sandbox's `work/` cgroup (its commands and sessions).
    pub fn work_cgroup(&self, sandbox: &str) -> PathBuf {
        self.sandbox_cgroup(sandbox).join("work")
    }

    /// Host path of the sandbox's `standby/` cgroup, where standby forks wait
    /// (`sandbox/manager/standby.rs`): beside `work/`, so a kill of `work/` spares them.
    pub fn standby_cgroup(&self, sandbox: &str) -> PathBuf {
        self.sandbox_cgroup(sandbox).join("standby")
    }

    /// Host path of the tree's `templates/` cgroup.
    pub fn templates_cgroup(&self) -> PathBuf {
        self.cgroups.tree.join("templates")
    }

    /// Host paths of the sandbox's cgroups in v1 limit hierarchies (empty when
    /// cgroup2 has the limit controllers). A process moved into the sandbox joins these
    /// too, or its limits stay those of where it came from.
    pub fn limit_cgroups(&self, sandbox: &str) -> Vec<PathBuf> {
        self.cgroups.sandbox_v1(sandbox)
    }

    /// Freezes `work/` and waits until the kernel says it is frozen.
    pub fn freeze_work(&self, sandbox: &str) -> Result<(), RuntimeError> {
        self.known(sandbox)?;
        freezer::set_frozen(&self.work_cgroup(sandbox), true).map_err(|e| self.cg_err(e))
    }

    /// Thaws `work/`.
    pub fn thaw_work(&self, sandbox: &str) -> Result<(), RuntimeError> {
        self.known(sandbox)?;
        freezer::set_frozen(&self.work_cgroup(sandbox), false).map_err(|e| self.cg_err(e))
    }

    /// Kills every process in `work/` and waits until it is empty.
    ///
    /// Not with `cgroup.kill`: on this kernel a `clone3(CLONE_INTO_CGROUP)` into a cgroup
    /// that was ever `cgroup.kill`ed gets a SIGKILL at birth (the fork compares the
    /// parent cgroup's kill sequence with the destination's), and DeltaCR restores
    /// sessions into `work/` exactly that way. So: freeze (nothing forks any more),
    /// SIGKILL each listed process, thaw, wait until empty.
    pub fn kill_work(&self, sandbox: &str) -> Result<(), RuntimeError> {
        self.known(sandbox)?;
        freezer::kill_frozen(&self.work_cgroup(sandbox)).map_err(|e| self.cg_err(e))
    }

    /// Kills every process in `work/` as [`Self::kill_work`] does, without waiting for
    /// them to exit: a rollback forks the node's templates meanwhile (the exit of a big
    /// process takes milliseconds) and waits with [`freezer::Killed::wait`] before anything
    /// that needs them gone (the switch of the files).
    pub(crate) fn kill_work_start(&self, sandbox: &str) -> Result<freezer::Killed, RuntimeError> {
        self.known(sandbox)?;
        freezer::kill_frozen_start(&self.work_cgroup(sandbox)).map_err(|e| self.cg_err(e))
    }

    /// `/sb/<sandbox>`: the sandbox root as seen by init (the prefix of
    /// `/proc/<pid>/{cwd,fd/*}` links of the sandbox's processes read from the host).
    pub fn root_in_ns(&self, sandbox: &str) -> PathBuf {
        Path::new("/sb").join(sandbox)
    }

    /// The ns pid of the sandbox's anchor.
    pub fn anchor_ns_pid(&self, sandbox: &str) -> Option<i32> {
        lock(&self.sandboxes).get(sandbox)?.anchor
    }

    /// The sandbox's root for any process of the tree: `/proc/<anchor>/root`.
    pub fn chroot_path(&self, sandbox: &str) -> Option<PathBuf> {
        Some(format!("/proc/{}/root", self.anchor_ns_pid(sandbox)?).into())
    }

    /// The sandbox's work cgroup for any process of the tree: `/proc/<anchor>/fd/3/work`.
    pub fn work_cgroup_in_ns(&self, sandbox: &str) -> Option<PathBuf> {
        Some(format!("/proc/{}/fd/3/work", self.anchor_ns_pid(sandbox)?).into())
    }

    /// The sandbox's standby cgroup for any process of the tree:
    /// `/proc/<anchor>/fd/3/standby`.
    pub fn standby_cgroup_in_ns(&self, sandbox: &str) -> Option<PathBuf> {
        Some(format!("/proc/{}/fd/3/standby", self.anchor_ns_pid(sandbox)?).into())
    }

    /// The tree's templates cgroup for any process of the tree: `/proc/<anchor>/fd/4`.
    pub fn templates_cgroup_in_ns(&self, sandbox: &str) -> Option<PathBuf> {
        Some(format!("/proc/{}/fd/4", self.anchor_ns_pid(sandbox)?).into())
    }

    /// The sandbox's v1 limit cgroups for any process of the tree:
    /// `/proc/<anchor>/fd/5`, `fd/6`, … (see [`Self::limit_cgroups`]).
    pub fn limit_cgroups_in_ns(&self, sandbox: &str) -> Option<Vec<PathBuf>> {
        let anchor = self.anchor_ns_pid(sandbox)?;
        Some(
            (0..self.cgroups.sandbox_v1(sandbox).len())
                .map(|i| format!("/proc/{anchor}/fd/{}", 5 + i).into())
                .collect(),
        )
    }

    /// Kills every process of the sandbox (anchor included), undoes its setup in init
    /// and removes its cgroups. The caller unmounts the view afterwards.
    pub fn remove_sandbox(&self, sandbox: &str) -> Result<(), RuntimeError> {
        let Some(state) = lock(&self.sandboxes).remove(sandbox) else {
            return Err(self.unknown(sandbox));
        };
        let killed = freezer::kill(&self.sandbox_cgroup(sandbox)).map_err(|e| self.cg_err(e));
        let undone = match state.anchor {
            Some(_) => self
                .request(
                    Request::RemoveSandbox {
                        sandbox: sandbox.to_owned(),
                    },
                    &[],
                )
                .map(drop),
            None => Ok(()),
        };
        // The cgroups go even when init is gone; the first error is reported.
        let removed = self
            .cgroups
            .remove_sandbox(sandbox)
            .map_err(|e| self.cg_err(e));
        killed.and(undone).and(removed)
    }

    /// Sends a request and waits for its reply.
    fn request(
        &self,
        req: Request,
        fds: &[OwnedFd],
    ) -> Result<(ReplyData, Vec<OwnedFd>, Option<i32>), RuntimeError> {
        let what = format!("{req:?}");
        let what = what.chars().take(200).collect::<String>();
        let id = {
            let mut next = lock(&self.channel.send_lock);
            *next += 1;
            let raw: Vec<_> = fds.iter().map(|f| f.as_raw_fd()).collect();
            let msg = RequestMsg { id: *next, req };
            proto::send(self.channel.sock.as_raw_fd(), &msg, &raw).map_err(|e| match e {
                ProtoError::Socket(nix::Error::EPIPE | nix::Error::ECONNRESET) => self.gone(),
                source => RuntimeError::Proto {
                    tree: self.cfg.id.clone(),
                    source,
                },
            })?;
            *next
        };
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        let mut mb = lock(&self.channel.mailbox);
        loop {
            if let Some((result, fds)) = mb.replies.remove(&id) {
                let started = mb.started.remove(&id);
                return result
                    .map(|d| (d, fds, started))
                    .map_err(|e| self.init_err(e));
            }
            if mb.gone {
                return Err(self.gone());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(RuntimeError::Timeout {
                    tree: self.cfg.id.clone(),
                    pid: self.init_pid.as_raw(),
                    what,
                    timeout: REQUEST_TIMEOUT,
                });
            }
            mb = self
                .channel
                .cond
                .wait_timeout(mb, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn known(&self, sandbox: &str) -> Result<(), RuntimeError> {
        if lock(&self.sandboxes).contains_key(sandbox) {
            Ok(())
        } else {
            Err(self.unknown(sandbox))
        }
    }

    fn unknown(&self, sandbox: &str) -> RuntimeError {
        RuntimeError::UnknownSandbox {
            tree: self.cfg.id.clone(),
            sandbox: sandbox.to_owned(),
        }
    }

    fn gone(&self) -> RuntimeError {
        RuntimeError::InitGone {
            tree: self.cfg.id.clone(),
            pid: self.init_pid.as_raw(),
        }
    }

    fn init_err(&self, error: String) -> RuntimeError {
        RuntimeError::Init {
            tree: self.cfg.id.clone(),
            error,
        }
    }

    fn cg_err(&self, source: CgroupSetupError) -> RuntimeError {
        RuntimeError::Cgroup {
            tree: self.cfg.id.clone(),
            source,
        }
    }

    fn io_err(&self, op: &'static str, path: &Path, source: io::Error) -> RuntimeError {
        RuntimeError::Io {
            tree: self.cfg.id.clone(),
            op,
            path: path.to_owned(),
            source,
        }
    }
}

// The daemon calls a tree's runtime from several blocking threads at once.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<TreeRuntime>();
};

impl Drop for TreeRuntime {
    fn drop(&mut self) {
        if !self.shut_down
            && let Err(e) = self.teardown()
        {
            log::warn!("shutting down tree {}: {e}", self.cfg.id);
        }
    }
}

/// Sandbox names become paths and cgroup names: keep them plain.
fn check_name(sandbox: &str) -> Result<(), RuntimeError> {
    let ok = !sandbox.is_empty()
        && sandbox.len() <= 128
        && !sandbox.starts_with('.')
        && sandbox
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(RuntimeError::BadName(sandbox.to_owned()))
    }
}

/// The host pid of a pidfd, from `/proc/self/fdinfo/<fd>` (`Pid:`).
fn pid_of_pidfd(pidfd: &OwnedFd) -> Option<Pid> {
    let info = fs::read_to_string(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd())).ok()?;
    let pid: i32 = info
        .lines()
        .find_map(|l| l.strip_prefix("Pid:"))?
        .trim()
        .parse()
        .ok()?;
    (pid > 0).then(|| Pid::from_raw(pid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_names_stay_plain_path_components() {
        for ok in ["a", "sb-1", "0191a2b3-c4d5", "x.y_z"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", ".hidden", "a/b", "a b", "x\0"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_name(&"a".repeat(129)).is_err());
    }
}
