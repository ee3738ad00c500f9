//! What a forked child of the tree's init does before it becomes a sandbox process:
//! join the sandbox's cgroups, take its fds, chroot into the sandbox's root, drop
//! capabilities, and either exec the command or (the anchor) sleep forever.
//!
//! Init is single-threaded, so the child may allocate. Errors before exec go back to
//! init as text over a close-on-exec status pipe: EOF there means the exec worked.

use std::{
    ffi::CString,
    fs::File,
    io::{self, Write as _},
    os::{
        fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd, RawFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

use caps::{CapSet, Capability, CapsHashSet};
use nix::{fcntl::OFlag, sys::stat::Mode};

use super::{proto, sys};

/// Docker's default capability set: what every sandbox process keeps. `SYS_CHROOT` is
/// needed by DeltaCR (a restored process is re-chrooted from inside the sandbox).
pub const SANDBOX_CAPS: [Capability; 14] = [
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_FSETID,
    Capability::CAP_FOWNER,
    Capability::CAP_MKNOD,
    Capability::CAP_NET_RAW,
    Capability::CAP_SETGID,
    Capability::CAP_SETUID,
    Capability::CAP_SETFCAP,
    Capability::CAP_SETPCAP,
    Capability::CAP_NET_BIND_SERVICE,
    Capability::CAP_SYS_CHROOT,
    Capability::CAP_KILL,
    Capability::CAP_AUDIT_WRITE,
];

/// The fds of a sandbox, kept by init from `AddSandbox`.
pub(crate) struct SandboxFds {
    /// `sb-<sandbox>/` (cgroup v2).
    pub cgroup: OwnedFd,
    /// The tree's `templates/` cgroup.
    pub templates: OwnedFd,
    /// The sandbox's directories in cgroup v1 limit hierarchies.
    pub limits: Vec<OwnedFd>,
    /// The anchor's ns pid (0 until it runs).
    pub anchor: i32,
}

/// Reduces every capability set to [`SANDBOX_CAPS`].
pub(crate) fn drop_caps() -> Result<(), String> {
    let keep: CapsHashSet = SANDBOX_CAPS.into_iter().collect();
    let err = |what: &str, e: caps::errors::CapsError| format!("drop capabilities ({what}): {e}");
    for cap in caps::all() {
        if !keep.contains(&cap) {
            caps::drop(None, CapSet::Bounding, cap).map_err(|e| err("bounding", e))?;
        }
    }
    caps::set(None, CapSet::Effective, &keep).map_err(|e| err("effective", e))?;
    caps::set(None, CapSet::Inheritable, &keep).map_err(|e| err("inheritable", e))?;
    caps::set(None, CapSet::Permitted, &keep).map_err(|e| err("permitted", e))?;
    caps::set(None, CapSet::Ambient, &keep).map_err(|e| err("ambient", e))?;
    Ok(())
}

/// Moves this process into the cgroup v2 directory `sub` of `dir_fd` (`"."`: the
/// directory itself) by writing "0" to its `cgroup.procs`.
fn join(dir_fd: BorrowedFd<'_>, sub: &str) -> Result<(), String> {
    let procs = format!("{sub}/cgroup.procs");
    let fd = nix::fcntl::openat(
        dir_fd,
        procs.as_str(),
        OFlag::O_WRONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| format!("open cgroup {procs}: {e}"))?;
    File::from(fd)
        .write_all(b"0")
        .map_err(|e| format!("join cgroup {procs}: {e}"))
}

/// Joins `sub` of the sandbox cgroup and the sandbox's v1 limit cgroups.
fn join_all(fds: &SandboxFds, sub: &str) -> Result<(), String> {
    join(fds.cgroup.as_fd(), sub)?;
    for fd in &fds.limits {
        join(fd.as_fd(), ".")?;
    }
    Ok(())
}

fn chroot(root: &Path, cwd: &Path) -> Result<(), String> {
    nix::unistd::chroot(root).map_err(|e| format!("chroot {}: {e}", root.display()))?;
    nix::unistd::chdir(cwd).map_err(|e| format!("cwd {}: {e}", cwd.display()))
}

/// The anchor of a sandbox: joins `anchor/`, chroots into `root`, keeps the sandbox
/// cgroup dir at fd 3, the templates dir at fd 4 and the v1 limit dirs from fd 5 on,
/// closes everything else, drops capabilities, then sleeps until killed.
pub(crate) fn anchor(root: &Path, fds: &SandboxFds, status: File) -> ! {
    sys::reset_signals();
    let status = rehome(status);
    let result = (|| {
        join_all(fds, "anchor")?;
        nix::unistd::setsid().map_err(|e| format!("setsid: {e}"))?;
        let mut srcs = vec![fds.cgroup.as_raw_fd(), fds.templates.as_raw_fd()];
        srcs.extend(fds.limits.iter().map(|f| f.as_raw_fd()));
        place_fds(&srcs, 3)?;
        chroot(root, Path::new("/"))?;
        drop_caps()
    })();
    report(status, result);
    // The status pipe is gone now: the anchor holds exactly fds 0-2 and 3.. onwards.
    let _ = sys::close_from((3 + 2 + fds.limits.len()) as u32);
    sys::pause_forever()
}

/// A husk: joins `work/`, own session, stdio on `/dev/null`, chroot into `root`, drops
/// capabilities, closes every other fd, then sleeps until DeltaCR makes it a restored
/// process (or it is killed). It runs no code of the sandbox.
pub(crate) fn husk(root: &Path, fds: &SandboxFds, status: File) -> ! {
    sys::reset_signals();
    let status = rehome(status);
    let result = (|| {
        join_all(fds, "work")?;
        nix::unistd::setsid().map_err(|e| format!("setsid: {e}"))?;
        let null = nix::fcntl::open("/dev/null", OFlag::O_RDWR, Mode::empty())
            .map_err(|e| format!("open /dev/null: {e}"))?;
        for i in 0..3 {
            sys::dup2(null.as_raw_fd(), i).map_err(|e| format!("dup2 to fd {i}: {e}"))?;
        }
        drop(null);
        chroot(root, Path::new("/"))?;
        drop_caps()
    })();
    report(status, result);
    let _ = sys::close_from(3);
    sys::pause_forever()
}

/// The tree's anchor: no cgroup move (it stays in init's), its own session, no fd but
/// 0-2, its root left at the tree's root, a sandbox's capabilities; then it sleeps.
pub(crate) fn tree_anchor(status: File) -> ! {
    sys::reset_signals();
    let status = rehome(status);
    let result = (|| {
        nix::unistd::setsid().map_err(|e| format!("setsid: {e}"))?;
        nix::unistd::chdir("/").map_err(|e| format!("chdir /: {e}"))?;
        drop_caps()
    })();
    report(status, result);
    let _ = sys::close_from(3);
    sys::pause_forever()
}

/// A holder: like the tree's anchor (own session, tree root, a sandbox's capabilities)
/// but holding `fds` at 3, 4, …; it sleeps until killed.
pub(crate) fn holder(fds: &[OwnedFd], status: File) -> ! {
    sys::reset_signals();
    let status = rehome(status);
    let result = (|| {
        nix::unistd::setsid().map_err(|e| format!("setsid: {e}"))?;
        nix::unistd::chdir("/").map_err(|e| format!("chdir /: {e}"))?;
        let srcs: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        place_fds(&srcs, 3)?;
        drop_caps()
    })();
    report(status, result);
    let _ = sys::close_from((3 + fds.len()) as u32);
    sys::pause_forever()
}

/// Puts `srcs` at `first`, `first + 1`, … (through fds above them so that an
/// overlap cannot clobber a source) and marks every higher fd close-on-exec.
fn place_fds(srcs: &[RawFd], first: RawFd) -> Result<(), String> {
    let high: Vec<OwnedFd> = srcs
        .iter()
        .map(|&fd| sys::dup_above(fd, 1000))
        .collect::<io::Result<_>>()
        .map_err(|e| format!("dup fd: {e}"))?;
    for (i, fd) in high.iter().enumerate() {
        sys::dup2(fd.as_raw_fd(), first + i as RawFd).map_err(|e| format!("dup2: {e}"))?;
    }
    sys::cloexec_from((first as usize + srcs.len()) as u32).map_err(|e| format!("close_range: {e}"))
}

/// Moves the status pipe to a high fd, out of the way of the fds placed at 0-2 / 3….
fn rehome(status: File) -> File {
    match sys::dup_above(status.as_raw_fd(), 2000) {
        Ok(fd) => File::from(fd),
        Err(_) => sys::exit_now(126),
    }
}

/// Writes the result to the status pipe (nothing on success) and closes it.
fn report(mut status: File, result: Result<(), String>) {
    if let Err(msg) = result {
        let _ = status.write_all(msg.as_bytes());
        drop(status);
        sys::exit_now(127);
    }
}

/// A spawned command, prepared by init before the fork.
pub(crate) struct Command {
    /// The sandbox's name (for error messages).
    pub sandbox: String,
    /// `/sb/<sandbox>` in init's namespace.
    pub root: std::path::PathBuf,
    /// Working directory inside the sandbox.
    pub cwd: std::path::PathBuf,
    /// argv.
    pub argv: Vec<CString>,
    /// The whole environment as `K=V`.
    pub env: Vec<CString>,
    /// `PATH` from env, for a search when argv\[0\] has no slash.
    pub path: Option<String>,
    /// The control socket and the request id: the child announces itself there so the
    /// daemon learns its host pid from the message's credentials.
    pub started: Option<(RawFd, u64)>,
}

/// A spawned child: joins `work/`, own session, stdio from `stdio` (stdin None =
/// /dev/null), chroot, caps, then exec. Never returns.
pub(crate) fn spawn(cmd: &Command, fds: &SandboxFds, stdio: [Option<RawFd>; 3], status: File) -> ! {
    sys::reset_signals();
    let status = rehome(status);
    let result = (|| {
        if let Some((sock, id)) = cmd.started {
            proto::send(sock, &proto::FromInit::Started { id }, &[])
                .map_err(|e| format!("announce the child: {e}"))?;
        }
        join_all(fds, "work")?;
        nix::unistd::setsid().map_err(|e| format!("setsid: {e}"))?;
        let null = nix::fcntl::open("/dev/null", OFlag::O_RDWR, Mode::empty())
            .map_err(|e| format!("open /dev/null: {e}"))?;
        for (i, fd) in stdio.iter().enumerate() {
            let src = fd.unwrap_or(null.as_raw_fd());
            sys::dup2(src, i as RawFd).map_err(|e| format!("dup2 to fd {i}: {e}"))?;
        }
        chroot(&cmd.root, &cmd.cwd)?;
        drop_caps()?;
        sys::cloexec_from(3).map_err(|e| format!("close_range: {e}"))?;
        Err(exec(cmd))
    })();
    report(status, result);
    sys::exit_now(127)
}

/// Execs argv\[0\] (searching `PATH` when it has no slash); returns the error.
fn exec(cmd: &Command) -> String {
    let Some(arg0) = cmd.argv.first() else {
        return "empty argv".to_owned();
    };
    let name = Path::new(std::ffi::OsStr::from_bytes(arg0.as_bytes()));
    let candidates: Vec<std::path::PathBuf> = if arg0.as_bytes().contains(&b'/') {
        vec![name.to_owned()]
    } else {
        cmd.path
            .as_deref()
            .unwrap_or("/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin")
            .split(':')
            .filter(|d| !d.is_empty())
            .map(|d| Path::new(d).join(name))
            .collect()
    };
    let mut last = None;
    for path in &candidates {
        let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
            continue;
        };
        let e = sys::execve(&c, &cmd.argv, &cmd.env);
        match e.raw_os_error() {
            Some(libc::ENOENT) | Some(libc::ENOTDIR) if last.is_some() => {}
            _ => last = Some((path.clone(), e)),
        }
    }
    match last {
        Some((path, e)) if e.raw_os_error() == Some(libc::ENOENT) => {
            if candidates.len() == 1 {
                format!(
                    "no such file: {} in sandbox {}",
                    path.display(),
                    cmd.sandbox
                )
            } else {
                format!(
                    "no such file: {} in sandbox {} (not found in PATH)",
                    name.display(),
                    cmd.sandbox
                )
            }
        }
        Some((path, e)) => format!("exec {} in sandbox {}: {e}", path.display(), cmd.sandbox),
        None => format!("exec {}: bad path", name.display()),
    }
}
