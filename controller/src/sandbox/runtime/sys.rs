//! The raw kernel calls of the sandbox runtime that nix does not wrap safely: the
//! `pre_exec` step that puts the tree's init into new namespaces, `fork` in the
//! single-threaded init, `pidfd_open`, `close_range`, bringing `lo` up, and exec.
//!
//! Every function here is either async-signal-safe (used between fork and exec in the
//! multi-threaded daemon) or used only by the single-threaded init.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
};

/// The namespaces a tree gets: one of each per tree, shared by all its sandboxes.
pub(crate) const TREE_NAMESPACES: libc::c_int = libc::CLONE_NEWNS
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWNET;

/// Between fork and exec of the tree's init: joins the cgroup whose `cgroup.procs` is
/// open as `procs_fd`, unshares the tree's namespaces and puts `sock` at fd 3 without
/// `FD_CLOEXEC`. Async-signal-safe: raw syscalls on fds opened before the fork.
pub(crate) fn init_pre_exec(procs_fd: RawFd, sock: RawFd) -> io::Result<()> {
    // SAFETY: write(2) on an fd the parent opened; the buffer is a static byte string.
    let n = unsafe { libc::write(procs_fd, b"0".as_ptr().cast(), 1) };
    if n != 1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: unshare(2) with namespace flags only; no memory is passed.
    if unsafe { libc::unshare(TREE_NAMESPACES) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if sock == 3 {
        // SAFETY: fcntl(2) clearing FD_CLOEXEC on an fd we own.
        if unsafe { libc::fcntl(3, libc::F_SETFD, 0) } != 0 {
            return Err(io::Error::last_os_error());
        }
    } else {
        // SAFETY: dup2(2) onto fd 3; a dup2 result never has FD_CLOEXEC.
        if unsafe { libc::dup2(sock, 3) } != 3 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Which side of a [`fork`] this process is on.
pub(crate) enum Forked {
    /// The parent, with the child's pid.
    Parent(libc::pid_t),
    /// The child.
    Child,
}

/// fork(2). Only the single-threaded init calls it, so the child may allocate.
pub(crate) fn fork() -> io::Result<Forked> {
    // SAFETY: the caller (init) is single-threaded, so no lock is held by another
    // thread in the child and the child may run ordinary Rust code.
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(Forked::Child),
        pid => Ok(Forked::Parent(pid)),
    }
}

/// pidfd_open(2): a pidfd of `pid` (in this process's pid namespace).
pub(crate) fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Marks every fd from `first` up close-on-exec (close_range(2) with
/// `CLOSE_RANGE_CLOEXEC`): they stay usable until exec, then vanish.
pub(crate) fn cloexec_from(first: u32) -> io::Result<()> {
    // SAFETY: close_range only changes flags of this process's fds.
    let r = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Closes every fd from `first` up.
pub(crate) fn close_from(first: u32) -> io::Result<()> {
    // SAFETY: close_range only closes this process's fds; callers own all of them.
    let r = unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, 0) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// dup2(2) of `from` onto `to` (the result is not close-on-exec).
pub(crate) fn dup2(from: RawFd, to: RawFd) -> io::Result<()> {
    // SAFETY: dup2 on fds of this process; the caller owns `to` (it is replaced).
    if unsafe { libc::dup2(from, to) } != to {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Duplicates `fd` to a number at or above `min` (close-on-exec).
pub(crate) fn dup_above(fd: RawFd, min: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) creates a new fd or fails.
    let r = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, min) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the fd was just created by the kernel for us; it is owned only here.
    Ok(unsafe { OwnedFd::from_raw_fd(r) })
}

/// Resets what a forked child of init inherits and an exec keeps: the signal mask
/// (init blocks SIGCHLD for its signalfd) and the ignored SIGPIPE of Rust's runtime.
pub(crate) fn reset_signals() {
    // SAFETY: sigemptyset fills a local set; sigprocmask and signal change only this
    // process's signal state.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        for sig in 1..32 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
    }
}

/// execve(2); returns only on failure.
pub(crate) fn execve(path: &CString, argv: &[CString], env: &[CString]) -> io::Error {
    let mut argv_p: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_p.push(std::ptr::null());
    let mut env_p: Vec<*const libc::c_char> = env.iter().map(|a| a.as_ptr()).collect();
    env_p.push(std::ptr::null());
    // SAFETY: both arrays are NULL-terminated and point into CStrings that outlive the
    // call (they are borrowed for its whole duration).
    unsafe { libc::execve(path.as_ptr(), argv_p.as_ptr(), env_p.as_ptr()) };
    io::Error::last_os_error()
}

/// Sleeps until killed: the sandbox anchor's whole life.
pub(crate) fn pause_forever() -> ! {
    loop {
        // SAFETY: pause(2) takes no arguments and only waits for a signal.
        unsafe { libc::pause() };
    }
}

/// Exits at once without running destructors or atexit handlers (a forked child of
/// init must not flush or free init's state).
pub(crate) fn exit_now(code: i32) -> ! {
    // SAFETY: _exit(2) never returns and touches no user memory.
    unsafe { libc::_exit(code) }
}

/// Brings the loopback interface up (SIOCGIFFLAGS / SIOCSIFFLAGS on an inet socket):
/// a new network namespace starts with `lo` down.
pub(crate) fn loopback_up() -> io::Result<()> {
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io::Error::from)?;
    // SAFETY: ifreq is plain data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the flags of the interface named in `req` into it;
    // `req` is a valid, writable ifreq for the whole call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: after SIOCGIFFLAGS the union holds the flags member.
    unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    // SAFETY: SIOCSIFFLAGS reads `req` (name + flags); it stays valid for the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Takes ownership of fd 3, where the daemon put init's control socket.
pub(crate) fn take_control_fd() -> OwnedFd {
    // SAFETY: the daemon's pre_exec placed the control socket at fd 3 for this
    // process; nothing else in the process refers to it.
    unsafe { OwnedFd::from_raw_fd(3) }
}

/// accept4(2) with `SOCK_CLOEXEC`.
pub(crate) fn accept(listener: RawFd) -> io::Result<OwnedFd> {
    let fd = nix::sys::socket::accept4(listener, nix::sys::socket::SockFlag::SOCK_CLOEXEC)
        .map_err(io::Error::from)?;
    // SAFETY: accept4 just returned this new fd; it is owned only here.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Makes `cmd` enter the tree's namespaces and cgroup before it execs (see
/// [`init_pre_exec`]). `procs_fd` and `sock` must stay open until `cmd` is spawned.
pub(crate) fn set_init_pre_exec(cmd: &mut std::process::Command, procs_fd: RawFd, sock: RawFd) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: the closure runs between fork and exec of a multi-threaded process and
    // only makes async-signal-safe raw syscalls on fds opened before the fork.
    unsafe {
        cmd.pre_exec(move || init_pre_exec(procs_fd, sock));
    }
}

/// sethostname(2) (in the tree's own uts namespace).
pub(crate) fn set_hostname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe `name`'s bytes, valid for the call.
    if unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// poll(2) for readability of `fds`, waiting without limit; returns which are ready
/// (readable, hung up or in error). EINTR returns nothing ready.
pub(crate) fn poll_readable(fds: &[RawFd]) -> io::Result<Vec<bool>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: `pfds` is a valid array of `pfds.len()` pollfd structs for the call.
    let r = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, -1) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(vec![false; fds.len()]);
        }
        return Err(e);
    }
    Ok(pfds.iter().map(|p| p.revents != 0).collect())
}
