//! The tree's init (`deltabox-init`): a host-side shim that forks pid 1 of the new pid
//! namespace, and pid 1 itself, which sets up the tree's root, reaps every child,
//! reports exits, and serves the daemon's requests (see `docs/sandbox-runtime.md`).

use std::{
    collections::{HashMap, HashSet, VecDeque},
    ffi::CString,
    fs::{self, File},
    io::Read as _,
    os::{
        fd::{AsRawFd as _, OwnedFd, RawFd},
        unix::fs::PermissionsExt as _,
    },
    path::{Path, PathBuf},
};

use nix::{
    mount::{MntFlags, MsFlags, mount, umount2},
    sys::{
        signal::{SigSet, Signal},
        signalfd::{SfdFlags, SignalFd},
        socket::{AddressFamily, Backlog, SockFlag, SockType, UnixAddr, bind, listen, socket},
        wait::{WaitPidFlag, WaitStatus, waitpid},
    },
    unistd::Pid,
};

use super::{
    ExitStatus,
    child::{self, SandboxFds},
    mounts::{THP_SYSFS, err, make_dev, make_sys, setup_sandbox_root, unmount_sandbox_root},
    proto::{self, FromInit, ReplyData, Request, RequestMsg},
    sys,
};

/// Exit reports kept while no daemon is connected.
const MAX_PENDING_EXITS: usize = 4096;

/// Runs `deltabox-init <run_dir>`: the control socket is fd 3. Returns the exit code.
pub fn main(run_dir: &Path) -> i32 {
    let control = sys::take_control_fd();
    match sys::fork() {
        Err(e) => {
            log_line(&format!("fork: {e}"));
            1
        }
        Ok(sys::Forked::Parent(pid)) => {
            // Host-side shim: tell the daemon pid 1's host pid, drop the socket (only
            // pid 1 may hold it), and wait.
            let _ = proto::send(
                control.as_raw_fd(),
                &FromInit::Hello { init_host_pid: pid },
                &[],
            );
            drop(control);
            loop {
                match waitpid(Pid::from_raw(pid), None) {
                    Ok(WaitStatus::Exited(_, code)) => return code,
                    Ok(WaitStatus::Signaled(_, sig, _)) => return 128 + sig as i32,
                    Ok(_) => continue,
                    Err(nix::Error::EINTR) => continue,
                    Err(_) => return 1,
                }
            }
        }
        Ok(sys::Forked::Child) => match Init::setup(run_dir, control) {
            Ok(mut init) => init.run(),
            Err((control, error)) => {
                let _ = proto::send(control.as_raw_fd(), &FromInit::SetupFailed { error }, &[]);
                1
            }
        },
    }
}

/// Pid 1's state.
struct Init {
    control: Option<OwnedFd>,
    listener: OwnedFd,
    sigchld: SignalFd,
    sandboxes: HashMap<String, SandboxFds>,
    tree_anchor: Option<libc::pid_t>,
    /// Holders started by `Hold` and not released yet.
    holders: HashSet<libc::pid_t>,
    pending_exits: VecDeque<FromInit>,
    buf: Vec<u8>,
}

impl Init {
    /// Mount namespace, root, /proc, /dev, hostname, lo, the re-connect socket, the
    /// SIGCHLD signalfd. On failure returns the control socket to report on.
    fn setup(run_dir: &Path, control: OwnedFd) -> Result<Self, (OwnedFd, String)> {
        match Self::setup_inner(run_dir) {
            Ok((listener, sigchld)) => Ok(Self {
                control: Some(control),
                listener,
                sigchld,
                sandboxes: HashMap::new(),
                tree_anchor: None,
                holders: HashSet::new(),
                pending_exits: VecDeque::new(),
                buf: vec![0; proto::MAX_MSG],
            }),
            Err(e) => Err((control, e)),
        }
    }

    fn setup_inner(run_dir: &Path) -> Result<(OwnedFd, SignalFd), String> {
        let root = run_dir.join("root");
        // Slave: mounts the daemon makes under <run_dir>/root on the host (the sandbox
        // views) propagate in; nothing made here propagates out.
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_SLAVE,
            None::<&str>,
        )
        .map_err(err("make / rslave"))?;
        // The re-connect socket lives on the host side of run_dir: bind before pivoting.
        let sock_path = run_dir.join("init.sock");
        let _ = fs::remove_file(&sock_path);
        let listener = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .map_err(err("socket"))?;
        let addr = UnixAddr::new(&sock_path).map_err(err(sock_path.display()))?;
        bind(listener.as_raw_fd(), &addr).map_err(err(format!("bind {}", sock_path.display())))?;
        listen(&listener, Backlog::new(4).expect("valid backlog"))
            .map_err(err(format!("listen {}", sock_path.display())))?;
        fs::set_permissions(&sock_path, fs::Permissions::from_mode(0o600))
            .map_err(err(sock_path.display()))?;
        // /dev: a small tmpfs with the host's device nodes bound in (before the pivot,
        // while the host's /dev is still reachable).
        make_dev(&root.join("dev"), Path::new("/dev"))?;
        make_sys(&root.join("sys"), Path::new(THP_SYSFS))?;
        nix::unistd::chdir(&root).map_err(err(format!("chdir {}", root.display())))?;
        nix::unistd::pivot_root(".", ".").map_err(err(format!("pivot_root {}", root.display())))?;
        umount2(".", MntFlags::MNT_DETACH).map_err(err("detach the old root"))?;
        nix::unistd::chdir("/").map_err(err("chdir /"))?;
        mount(
            Some("proc"),
            "/proc",
            Some("proc"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None::<&str>,
        )
        .map_err(err("mount /proc"))?;
        sys::set_hostname("deltabox").map_err(err("sethostname"))?;
        sys::loopback_up().map_err(err("bring lo up"))?;
        let mut mask = SigSet::empty();
        mask.add(Signal::SIGCHLD);
        mask.thread_block().map_err(err("block SIGCHLD"))?;
        let sigchld = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
            .map_err(err("signalfd"))?;
        Ok((listener, sigchld))
    }

    /// The event loop; never returns while the tree lives (init is killed with it).
    fn run(&mut self) -> i32 {
        self.send(&FromInit::Ready, &[]);
        loop {
            let mut fds = vec![self.sigchld.as_raw_fd(), self.listener.as_raw_fd()];
            if let Some(c) = &self.control {
                fds.push(c.as_raw_fd());
            }
            let ready = match sys::poll_readable(&fds) {
                Ok(r) => r,
                Err(e) => {
                    log_line(&format!("poll: {e}"));
                    continue;
                }
            };
            let (sig_ready, lst_ready) = (ready[0], ready[1]);
            let ctl_ready = ready.get(2).copied().unwrap_or(false);
            if sig_ready {
                while let Ok(Some(_)) = self.sigchld.read_signal() {}
                self.reap();
            }
            if lst_ready {
                self.accept();
            }
            if ctl_ready {
                self.serve_one();
            }
        }
    }

    /// A restarted daemon connects to `init.sock`: it becomes the control socket.
    fn accept(&mut self) {
        if let Ok(fd) = sys::accept(self.listener.as_raw_fd()) {
            self.control = Some(fd);
            self.send(&FromInit::Ready, &[]);
            while let Some(exit) = self.pending_exits.pop_front() {
                self.send(&exit, &[]);
            }
        }
    }

    /// Reaps every exited child (never stopped ones: templates are stopped children).
    fn reap(&mut self) {
        loop {
            let status = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, ExitStatus::Code(code)),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, ExitStatus::Signal(sig as i32)),
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(_) => continue,
            };
            let msg = FromInit::Exit {
                ns_pid: status.0.as_raw(),
                status: status.1,
            };
            if self.control.is_some() {
                self.send(&msg, &[]);
            } else {
                if self.pending_exits.len() >= MAX_PENDING_EXITS {
                    self.pending_exits.pop_front();
                }
                self.pending_exits.push_back(msg);
            }
        }
    }

    fn send(&mut self, msg: &FromInit, fds: &[RawFd]) {
        if let Some(c) = &self.control
            && proto::send(c.as_raw_fd(), msg, fds).is_err()
        {
            // The daemon is gone: keep running, wait for a reconnect on init.sock.
            self.control = None;
        }
    }

    fn serve_one(&mut self) {
        let Some(c) = &self.control else { return };
        let (msg, fds, _) = match proto::recv::<RequestMsg>(c.as_raw_fd(), &mut self.buf) {
            Ok(m) => m,
            Err(proto::ProtoError::Decode(e)) => {
                log_line(&format!("bad request: {e}"));
                return;
            }
            Err(_) => {
                self.control = None;
                return;
            }
        };
        let mut reply_fds = Vec::new();
        let result = match msg.req {
            Request::Ping => Ok(ReplyData::Done),
            Request::ListSandboxes => Ok(ReplyData::Sandboxes(
                self.sandboxes
                    .iter()
                    .map(|(name, fds)| (name.clone(), fds.anchor))
                    .collect(),
            )),
            Request::AddSandbox {
                sandbox,
                limit_dirs,
            } => self.add_sandbox(sandbox, limit_dirs, fds),
            Request::RemoveSandbox { sandbox } => self.remove_sandbox(&sandbox),
            Request::TreeAnchor => self.tree_anchor(),
            Request::Hold => self.hold(fds),
            Request::Husk { sandbox } => self.husk(&sandbox).map(|(pid, pidfd)| {
                reply_fds.push(pidfd);
                ReplyData::Spawned(pid)
            }),
            Request::Release { pid } => self.release(pid),
            Request::Spawn {
                sandbox,
                argv,
                env,
                cwd,
                stdin,
            } => self
                .spawn(msg.id, sandbox, argv, env, cwd, stdin, fds)
                .map(|(pid, pidfd)| {
                    reply_fds.push(pidfd);
                    ReplyData::Spawned(pid)
                }),
        };
        let raw: Vec<RawFd> = reply_fds.iter().map(|f| f.as_raw_fd()).collect();
        self.send(&FromInit::Reply { id: msg.id, result }, &raw);
    }

    fn add_sandbox(
        &mut self,
        sandbox: String,
        limit_dirs: usize,
        fds: Vec<OwnedFd>,
    ) -> Result<ReplyData, String> {
        if fds.len() != 2 + limit_dirs {
            return Err(format!(
                "add sandbox {sandbox}: expected {} fds, got {}",
                2 + limit_dirs,
                fds.len()
            ));
        }
        if self.sandboxes.contains_key(&sandbox) {
            return Err(format!("sandbox {sandbox} is already added"));
        }
        let root = sandbox_root(&sandbox)?;
        setup_sandbox_root(&root).inspect_err(|_| unmount_sandbox_root(&root))?;
        let mut it = fds.into_iter();
        let sfds = SandboxFds {
            cgroup: it.next().expect("counted"),
            templates: it.next().expect("counted"),
            limits: it.collect(),
            anchor: 0,
        };
        let (status_r, status_w) = status_pipe()?;
        let pid = match sys::fork().map_err(err("fork the anchor"))? {
            sys::Forked::Child => {
                drop(status_r);
                child::anchor(&root, &sfds, status_w)
            }
            sys::Forked::Parent(pid) => pid,
        };
        drop(status_w);
        if let Err(e) = self.check_child(pid, status_r) {
            unmount_sandbox_root(&root);
            return Err(format!("anchor of sandbox {sandbox}: {e}"));
        }
        let mut sfds = sfds;
        sfds.anchor = pid;
        self.sandboxes.insert(sandbox, sfds);
        Ok(ReplyData::Anchor(pid))
    }

    /// Reads the child's status pipe: EOF = fine; text = its error (then reaps it).
    fn check_child(&mut self, pid: libc::pid_t, status: OwnedFd) -> Result<(), String> {
        let mut text = String::new();
        let _ = File::from(status).read_to_string(&mut text);
        if text.is_empty() {
            return Ok(());
        }
        // Reap it here: its exit is not a command's exit the daemon waits for.
        let _ = waitpid(Pid::from_raw(pid), None);
        Err(text)
    }

    fn tree_anchor(&mut self) -> Result<ReplyData, String> {
        if let Some(pid) = self.tree_anchor
            && nix::sys::signal::kill(Pid::from_raw(pid), None).is_ok()
        {
            return Ok(ReplyData::Anchor(pid));
        }
        let (status_r, status_w) = status_pipe()?;
        let pid = match sys::fork().map_err(err("fork the tree anchor"))? {
            sys::Forked::Child => {
                drop(status_r);
                child::tree_anchor(status_w)
            }
            sys::Forked::Parent(pid) => pid,
        };
        drop(status_w);
        self.check_child(pid, status_r)
            .map_err(|e| format!("tree anchor: {e}"))?;
        self.tree_anchor = Some(pid);
        Ok(ReplyData::Anchor(pid))
    }

    fn hold(&mut self, fds: Vec<OwnedFd>) -> Result<ReplyData, String> {
        let (status_r, status_w) = status_pipe()?;
        let pid = match sys::fork().map_err(err("fork a holder"))? {
            sys::Forked::Child => {
                drop(status_r);
                child::holder(&fds, status_w)
            }
            sys::Forked::Parent(pid) => pid,
        };
        drop(status_w);
        self.check_child(pid, status_r)
            .map_err(|e| format!("holder: {e}"))?;
        self.holders.insert(pid);
        Ok(ReplyData::Anchor(pid))
    }

    fn husk(&mut self, sandbox: &str) -> Result<(i32, OwnedFd), String> {
        let Some(sfds) = self.sandboxes.get(sandbox) else {
            return Err(format!("unknown sandbox {sandbox}"));
        };
        let root = sandbox_root(sandbox)?;
        let (status_r, status_w) = status_pipe()?;
        let pid = match sys::fork().map_err(err("fork a husk"))? {
            sys::Forked::Child => {
                drop(status_r);
                child::husk(&root, sfds, status_w)
            }
            sys::Forked::Parent(pid) => pid,
        };
        drop(status_w);
        let pidfd = sys::pidfd_open(pid).map_err(err(format!("pidfd_open {pid}")));
        self.check_child(pid, status_r)
            .map_err(|e| format!("husk in sandbox {sandbox}: {e}"))?;
        Ok((pid, pidfd?))
    }

    fn release(&mut self, pid: libc::pid_t) -> Result<ReplyData, String> {
        if !self.holders.remove(&pid) {
            return Err(format!("{pid} is not a holder"));
        }
        // Reaped by `reap` like any child.
        nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL)
            .map_err(|e| format!("kill holder {pid}: {e}"))?;
        Ok(ReplyData::Done)
    }

    fn remove_sandbox(&mut self, sandbox: &str) -> Result<ReplyData, String> {
        if self.sandboxes.remove(sandbox).is_none() {
            return Err(format!("unknown sandbox {sandbox}"));
        }
        unmount_sandbox_root(&sandbox_root(sandbox)?);
        Ok(ReplyData::Done)
    }

    #[allow(clippy::too_many_arguments)] // the fields of one request
    fn spawn(
        &mut self,
        id: u64,
        sandbox: String,
        argv: Vec<String>,
        env: Vec<(String, String)>,
        cwd: PathBuf,
        stdin: bool,
        fds: Vec<OwnedFd>,
    ) -> Result<(i32, OwnedFd), String> {
        if fds.len() != 2 + usize::from(stdin) {
            return Err(format!(
                "spawn in sandbox {sandbox}: expected {} fds, got {}",
                2 + usize::from(stdin),
                fds.len()
            ));
        }
        let Some(sfds) = self.sandboxes.get(&sandbox) else {
            return Err(format!("unknown sandbox {sandbox}"));
        };
        let cstr = |s: &str| CString::new(s).map_err(|_| format!("NUL byte in {s:?}"));
        let cmd = child::Command {
            root: sandbox_root(&sandbox)?,
            cwd,
            argv: argv.iter().map(|a| cstr(a)).collect::<Result<_, _>>()?,
            env: env
                .iter()
                .map(|(k, v)| cstr(&format!("{k}={v}")))
                .collect::<Result<_, _>>()?,
            path: env
                .iter()
                .find(|(k, _)| k == "PATH")
                .map(|(_, v)| v.clone()),
            sandbox,
            started: self.control.as_ref().map(|c| (c.as_raw_fd(), id)),
        };
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let stdio = if stdin {
            [Some(raw[0]), Some(raw[1]), Some(raw[2])]
        } else {
            [None, Some(raw[0]), Some(raw[1])]
        };
        let (status_r, status_w) = status_pipe()?;
        let pid = match sys::fork().map_err(err("fork"))? {
            sys::Forked::Child => {
                drop(status_r);
                child::spawn(&cmd, sfds, stdio, status_w)
            }
            sys::Forked::Parent(pid) => pid,
        };
        drop(status_w);
        drop(fds);
        // The pidfd before the status: once the status pipe shows EOF the command may
        // already have exited, and a pidfd of a zombie is still valid.
        let pidfd = sys::pidfd_open(pid).map_err(err(format!("pidfd_open {pid}")));
        self.check_child(pid, status_r).map_err(|e| {
            if e.contains("in sandbox") {
                e
            } else {
                format!(
                    "spawn {} in sandbox {}: {e}",
                    argv.first().map(String::as_str).unwrap_or(""),
                    cmd.sandbox
                )
            }
        })?;
        Ok((pid, pidfd?))
    }
}

/// A line on init's stderr (the daemon's log); never panics, unlike `eprintln!`, when
/// that stream is gone: pid 1 must not die of a closed log.
fn log_line(msg: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "deltabox-init: {msg}");
}

fn status_pipe() -> Result<(OwnedFd, File), String> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(err("pipe"))?;
    Ok((r, File::from(w)))
}

/// `/sb/<sandbox>`, refusing names that would leave `/sb`.
fn sandbox_root(sandbox: &str) -> Result<PathBuf, String> {
    if sandbox.is_empty() || sandbox.contains('/') || sandbox == "." || sandbox == ".." {
        return Err(format!("bad sandbox name {sandbox:?}"));
    }
    Ok(Path::new("/sb").join(sandbox))
}
