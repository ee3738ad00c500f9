//! A tree's life: start (new namespaces, init), adopt after a daemon restart,
//! detach (as a crash would), shutdown.

use std::{
    collections::HashMap,
    fs, io,
    os::fd::{AsRawFd as _, OwnedFd},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{Arc, Condvar, Mutex},
    thread,
    time::Instant,
};

use nix::{
    fcntl::OFlag,
    mount::{MntFlags, MsFlags, mount, umount2},
    sys::{
        socket::{
            AddressFamily, Shutdown, SockFlag, SockType, UnixAddr, connect, setsockopt, shutdown,
            socket, socketpair, sockopt,
        },
        stat::Mode,
    },
    unistd::Pid,
};

use super::{
    Channel, Mailbox, RuntimeError, START_TIMEOUT, SandboxState, TreeConfig, TreeRuntime, cgroups,
    lock,
    proto::{ReplyData, Request},
    sys,
};

impl TreeRuntime {
    /// Creates the tree's root mount and cgroups and starts its init in new namespaces.
    pub fn start(cfg: TreeConfig) -> Result<Self, RuntimeError> {
        let tree = cfg.id.clone();
        let io = |op: &'static str, path: &Path| io_err(&tree, op, path);
        let root = cfg.run_dir.join("root");
        for dir in [
            root.clone(),
            root.join("sb"),
            root.join("proc"),
            root.join("dev"),
            root.join("sys"),
        ] {
            fs::create_dir_all(&dir).map_err(io("mkdir", &dir))?;
        }
        let cgroups = tree_cgroups(&cfg)?;
        // From here on a failure must undo: build a half runtime whose Drop cleans up.
        mount(
            Some(&root),
            &root,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| io("bind-mount", &root)(e.into()))?;
        let undo_mount = |e| {
            let _ = umount2(&root, MntFlags::MNT_DETACH);
            e
        };
        mount(
            None::<&str>,
            &root,
            None::<&str>,
            MsFlags::MS_SHARED,
            None::<&str>,
        )
        .map_err(|e| undo_mount(io("make shared", &root)(e.into())))?;
        let procs = cfg.cgroup.join("init/cgroup.procs");
        let procs_fd = nix::fcntl::open(&procs, OFlag::O_WRONLY | OFlag::O_CLOEXEC, Mode::empty())
            .map_err(|e| undo_mount(io("open", &procs)(e.into())))?;
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| undo_mount(io("socketpair", &cfg.run_dir)(e.into())))?;
        // Credentials on every message: spawned children announce themselves and the
        // kernel tells us their host pid.
        nix::sys::socket::setsockopt(&ours, nix::sys::socket::sockopt::PassCred, &true)
            .map_err(|e| undo_mount(io("SO_PASSCRED on", &cfg.run_dir)(e.into())))?;
        let mut cmd = Command::new(&cfg.init_binary);
        cmd.arg(&cfg.run_dir).stdin(Stdio::null());
        sys::set_init_pre_exec(&mut cmd, procs_fd.as_raw_fd(), theirs.as_raw_fd());
        let child = cmd
            .spawn()
            .map_err(|e| undo_mount(io("start", &cfg.init_binary)(e)))?;
        drop((theirs, procs_fd));
        // From here, Drop of `rt` shuts everything down if init does not come up.
        let mut rt = Self::with_channel(cfg, cgroups, ours, Some(child))?;
        let pid = rt.wait_ready(true)?;
        rt.init_pid = Pid::from_raw(pid);
        Ok(rt)
    }

    /// Re-adopts a running tree after a daemon restart: connects to its init's
    /// `<run_dir>/init.sock`, learns its sandboxes and anchors, and finds pid 1 in
    /// the tree's `init/` cgroup. Exits init reaped while no daemon was connected are
    /// delivered (up to 4096). The caller re-mounts nothing: views are its own.
    pub fn adopt(cfg: TreeConfig) -> Result<Self, RuntimeError> {
        let tree = cfg.id.clone();
        let sock_path = cfg.run_dir.join("init.sock");
        let io = |op: &'static str, path: &Path| io_err(&tree, op, path);
        let init_pid =
            find_init(&cfg.cgroup.join("init")).ok_or_else(|| RuntimeError::InitGone {
                tree: tree.clone(),
                pid: 0,
            })?;
        let cgroups = tree_cgroups(&cfg)?;
        let sock = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| io("socket for", &sock_path)(e.into()))?;
        let addr = UnixAddr::new(&sock_path).map_err(|e| io("address", &sock_path)(e.into()))?;
        connect(sock.as_raw_fd(), &addr).map_err(|e| io("connect", &sock_path)(e.into()))?;
        setsockopt(&sock, sockopt::PassCred, &true)
            .map_err(|e| io("SO_PASSCRED on", &sock_path)(e.into()))?;
        let mut rt = Self::with_channel(cfg, cgroups, sock, None)?;
        rt.init_pid = init_pid;
        // The runtime is not ours to tear down until adopted completely.
        rt.shut_down = true;
        rt.wait_ready(false)?;
        let (data, _, _) = rt.request(Request::ListSandboxes, &[])?;
        let ReplyData::Sandboxes(list) = data else {
            return Err(rt.init_err(format!("unexpected reply to list sandboxes: {data:?}")));
        };
        {
            let mut sandboxes = lock(&rt.sandboxes);
            for (name, anchor) in list {
                sandboxes.insert(
                    name,
                    SandboxState {
                        anchor: Some(anchor),
                    },
                );
            }
        }
        rt.shut_down = false;
        Ok(rt)
    }

    /// Lets go of the tree without stopping it (what a daemon crash does): the
    /// control connection closes, init keeps running and waits on `init.sock` for
    /// [`Self::adopt`].
    pub fn detach(mut self) {
        self.shut_down = true;
        let _ = shutdown(self.channel.sock.as_raw_fd(), Shutdown::Both);
        if let Some(reader) = lock(&self.reader).take() {
            let _ = reader.join();
        }
        // The shim is the host's to reap from now on, as after a crash.
        if let Some(shim) = lock(&self.shim).take() {
            std::mem::forget(shim);
        }
    }

    /// A runtime around a connected control socket, with its reader thread.
    fn with_channel(
        cfg: TreeConfig,
        cgroups: cgroups::TreeCgroups,
        sock: OwnedFd,
        shim: Option<Child>,
    ) -> Result<Self, RuntimeError> {
        let channel = Arc::new(Channel {
            sock,
            send_lock: Mutex::new(0),
            mailbox: Mutex::new(Mailbox::default()),
            cond: Condvar::new(),
        });
        let reader = {
            let channel = Arc::clone(&channel);
            thread::Builder::new()
                .name(format!("tree-{}", cfg.id))
                .spawn(move || channel.read_loop())
                .map_err(|source| RuntimeError::Io {
                    tree: cfg.id.clone(),
                    op: "start reader thread for",
                    path: cfg.run_dir.clone(),
                    source,
                })?
        };
        Ok(Self {
            cfg,
            cgroups,
            channel,
            init_pid: Pid::from_raw(0),
            shim: Mutex::new(shim),
            reader: Mutex::new(Some(reader)),
            sandboxes: Mutex::new(HashMap::new()),
            shut_down: false,
        })
    }

    /// Waits for init's `Ready` (and, when `hello`, the shim's `Hello`: returns
    /// pid 1's host pid from it).
    fn wait_ready(&self, hello: bool) -> Result<i32, RuntimeError> {
        let tree = self.cfg.id.clone();
        let deadline = Instant::now() + START_TIMEOUT;
        let mut mb = lock(&self.channel.mailbox);
        while ((hello && mb.hello.is_none()) || mb.ready.is_none()) && !mb.gone {
            let now = Instant::now();
            if now > deadline {
                break;
            }
            mb = self
                .channel
                .cond
                .wait_timeout(mb, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        match (mb.ready.clone(), mb.hello) {
            (Some(Ok(())), Some(pid)) => Ok(pid),
            (Some(Ok(())), None) if !hello => Ok(0),
            (Some(Err(error)), _) => Err(RuntimeError::InitSetup { tree, error }),
            _ => Err(RuntimeError::InitSetup {
                tree,
                error: format!("no ready message within {START_TIMEOUT:?}"),
            }),
        }
    }

    /// Kills everything of the tree, removes its cgroups, its root mount and run_dir.
    pub fn shutdown(mut self) -> Result<(), RuntimeError> {
        self.shut_down = true;
        self.teardown()
    }

    pub(super) fn teardown(&mut self) -> Result<(), RuntimeError> {
        // Killing pid 1 kills every process of its pid namespace; the shim reaps it and
        // exits (killing the shim first would leave pid 1 a zombie of the host's init).
        if self.init_pid.as_raw() > 0 {
            let _ = nix::sys::signal::kill(self.init_pid, nix::sys::signal::Signal::SIGKILL);
        }
        if let Some(mut shim) = lock(&self.shim).take() {
            if self.init_pid.as_raw() <= 0 {
                let _ = shim.kill();
            }
            let _ = shim.wait();
        }
        // (An adopted tree's shim is not our child: the cgroup kill below waits for it.)
        // Then whatever is left in the tree's cgroups (nothing, normally).
        let killed = self.cgroups.remove_all().map_err(|e| self.cg_err(e));
        let _ = shutdown(self.channel.sock.as_raw_fd(), Shutdown::Both);
        if let Some(reader) = lock(&self.reader).take() {
            let _ = reader.join();
        }
        let root = self.cfg.run_dir.join("root");
        // Detach (recursively) whatever is still mounted under the tree's root; then
        // rmdir only, never a recursive delete, so no view's data can be touched.
        let _ = umount2(&root, MntFlags::MNT_DETACH);
        if let Ok(entries) = fs::read_dir(root.join("sb")) {
            for e in entries.flatten() {
                let _ = fs::remove_dir(e.path());
            }
        }
        for dir in ["sb", "proc", "dev", "sys"] {
            let _ = fs::remove_dir(root.join(dir));
        }
        let _ = fs::remove_file(self.cfg.run_dir.join("init.sock"));
        let _ = fs::remove_dir(&root);
        let removed = fs::remove_dir(&self.cfg.run_dir)
            .or_else(|e| {
                if e.kind() == io::ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(e)
                }
            })
            .map_err(|e| self.io_err("rmdir", &self.cfg.run_dir, e));
        killed?;
        removed
    }
}

/// The error of `op` on `path` for tree `tree`, before a runtime exists to give it.
fn io_err(
    tree: &str,
    op: &'static str,
    path: &Path,
) -> impl FnOnce(io::Error) -> RuntimeError + use<> {
    let (tree, path) = (tree.to_owned(), path.to_owned());
    move |source| RuntimeError::Io {
        tree,
        op,
        path,
        source,
    }
}

/// The tree's cgroups under the host's cgroup2 mount ([`cgroups::TreeCgroups::create`]),
/// for a start and an adoption alike.
fn tree_cgroups(cfg: &TreeConfig) -> Result<cgroups::TreeCgroups, RuntimeError> {
    let cg2 = crate::cgroup::CgroupFs::from_mountinfo().map_err(|e| RuntimeError::Io {
        tree: cfg.id.clone(),
        op: "find cgroup2",
        path: cfg.cgroup.clone(),
        source: io::Error::other(e.to_string()),
    })?;
    cgroups::TreeCgroups::create(cg2.root(), &cfg.cgroup).map_err(|source| RuntimeError::Cgroup {
        tree: cfg.id.clone(),
        source,
    })
}

/// Pid 1 of the tree among the processes of its `init/` cgroup: the one whose
/// innermost pid is 1.
fn find_init(init_cgroup: &Path) -> Option<Pid> {
    let procs = fs::read_to_string(init_cgroup.join("cgroup.procs")).ok()?;
    procs
        .lines()
        .filter_map(|l| l.trim().parse::<i32>().ok())
        .map(Pid::from_raw)
        .find(|pid| TreeRuntime::ns_pid_of(*pid) == Some(1))
}
