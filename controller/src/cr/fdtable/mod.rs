//! The fd table: recorded at a checkpoint, rebuilt in every restored process.
//!
//! A fork shares every open file description with its parent, so a restored process
//! that kept the template's fds would share file offsets (and pipes) with the template
//! and with every other branch (DESIGN.md, invariant 2). DeltaCR therefore empties the
//! template's table at the checkpoint and gives each restored process its own open
//! file descriptions: each file or directory is reopened by path at the recorded offset
//! and flags, and fds 0–2 of a session are connected to fresh pipes held by the
//! controller. Pipes between the processes of a sandbox (a pipe beyond a session's
//! stdio, or any pipe of a process that is not a session) are recorded by inode
//! ([`FdKind::Pipe`]): each restore is given, per inode, a path to open for a fresh pipe
//! that stands for it ([`super::pipes`]). Other kinds (sockets, eventfds, deleted
//! files, …) make the checkpoint fail with an error naming the fd; nothing is silently
//! dropped.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::inject::InjectError;
use super::pidfd::PidfdError;
use super::procfs::{self, ProcError};

mod install;

pub use install::{StdioPipes, install};

/// Open flags a reopen keeps: access mode and the status flags of an open file.
/// `O_CREAT`, `O_EXCL`, `O_TRUNC` (never truncate on restore) and kernel-internal bits
/// are dropped.
const KEPT_FLAGS: u32 = (libc::O_ACCMODE
    | libc::O_APPEND
    | libc::O_NONBLOCK
    | libc::O_DSYNC
    | libc::O_SYNC
    | libc::O_DIRECT
    | libc::O_LARGEFILE
    | libc::O_DIRECTORY
    | libc::O_NOFOLLOW
    | libc::O_NOATIME
    | libc::O_CLOEXEC
    | libc::O_PATH) as u32;

/// Errors of recording or rebuilding an fd table.
#[derive(Debug, thiserror::Error)]
pub enum FdError {
    /// An fd of a kind DeltaCR cannot restore yet.
    #[error(
        "pid {pid} ({comm}): fd {fd} is {target:?}, which DeltaCR cannot restore yet \
         (it restores files and directories by path, pipes, and a session's fds 0-2)"
    )]
    Unsupported {
        /// The process.
        pid: i32,
        /// Its name.
        comm: String,
        /// The fd.
        fd: i32,
        /// What `/proc/<pid>/fd/<fd>` points to.
        target: OsString,
    },
    /// An fd on a deleted file, which cannot be reopened by path.
    #[error("pid {pid} ({comm}): fd {fd} is the deleted file {target:?}, which cannot be reopened")]
    Deleted {
        /// The process.
        pid: i32,
        /// Its name.
        comm: String,
        /// The fd.
        fd: i32,
        /// What `/proc/<pid>/fd/<fd>` points to.
        target: OsString,
    },
    /// Reading `/proc` failed.
    #[error(transparent)]
    Proc(#[from] ProcError),
    /// An injected syscall failed.
    #[error(transparent)]
    Inject(#[from] InjectError),
    /// Taking the controller's end of a stdio pipe failed.
    #[error(transparent)]
    Pidfd(#[from] PidfdError),
    /// A pipe fd whose inode the restore was given no path for.
    #[error(
        "restored pid {pid}: fd {fd} is pipe:[{inode}] at the checkpoint, and the restore \
         was given no fresh pipe for it"
    )]
    PipeUnplaced {
        /// The restored process.
        pid: i32,
        /// The fd.
        fd: i32,
        /// The pipe's inode at the checkpoint.
        inode: u64,
    },
    /// The kernel gave an fd another number than the lowest free one, which the
    /// rebuild's plan relies on (a bug, or a process that opened fds meanwhile).
    #[error("restored pid {pid}: {call} gave fd {got}, where fd {expected} was expected")]
    Unpredicted {
        /// The restored process.
        pid: i32,
        /// The call (`openat` or `pipe2`).
        call: &'static str,
        /// The fd planned.
        expected: i32,
        /// The fd it gave.
        got: i64,
    },
    /// A file could not be reopened in the restored process.
    #[error("cannot reopen fd {fd} ({}) in restored pid {pid}", path.display())]
    Reopen {
        /// The restored process.
        pid: i32,
        /// The fd.
        fd: i32,
        /// The path.
        path: PathBuf,
        /// The failed syscall.
        #[source]
        source: InjectError,
    },
}

/// What an fd is and how it is restored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FdKind {
    /// fd 0, 1 or 2: connected to a fresh controller pipe.
    Stdio,
    /// A file or directory, reopened by path at `offset`.
    Path {
        /// The path, as the controller sees it.
        path: PathBuf,
        /// The file offset at the checkpoint.
        offset: u64,
    },
    /// A pipe to or between the sandbox's processes ([`FdEntry::pipe`] is its inode),
    /// reopened through the path the restore gives for that inode
    /// ([`super::RestoreOptions::pipes`]), with the recorded access mode.
    Pipe,
}

/// One recorded fd.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FdEntry {
    /// The fd number.
    pub fd: i32,
    /// Open flags from `fdinfo`, `O_CLOEXEC` included.
    pub flags: u32,
    /// What it is.
    pub kind: FdKind,
    /// The inode of the pipe it is on (`pipe:[N]`), if it is one: what ties it to the
    /// other ends of that pipe, in this process or others.
    #[serde(default)]
    pub pipe: Option<u64>,
}

/// How an fd would be restored, judged from its `/proc/<pid>/fd` link alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Class {
    /// fds 0–2.
    Stdio,
    /// Reopenable by this path.
    Path(PathBuf),
    /// A deleted file (including memfds and `O_TMPFILE` files).
    Deleted,
    /// A pipe (not a session's stdio), by inode.
    Pipe(u64),
    /// A pipe, socket, anonymous inode, … beyond stdio.
    Unsupported,
}

/// Classifies fd `fd` of a session (fds 0–2 are the controller's pipes) whose `/proc`
/// link reads `target`.
pub fn classify(fd: i32, target: &OsStr) -> Class {
    classify_fd(fd, target, true)
}

/// The inode of a pipe from its `/proc/<pid>/fd` link (`pipe:[N]`).
pub fn pipe_inode(target: &OsStr) -> Option<u64> {
    let bytes = target.as_bytes();
    let inner = bytes.strip_prefix(b"pipe:[")?.strip_suffix(b"]")?;
    std::str::from_utf8(inner).ok()?.parse().ok()
}

/// Classifies fd `fd` whose `/proc` link reads `target`: with `session_stdio`, fds 0–2
/// are a session's stdio (fresh controller pipes on restore); without, they are
/// classified like any other fd (a process that inherited them).
pub fn classify_fd(fd: i32, target: &OsStr, session_stdio: bool) -> Class {
    if session_stdio && (0..=2).contains(&fd) {
        return Class::Stdio;
    }
    let bytes = target.as_bytes();
    if let Some(inode) = pipe_inode(target) {
        Class::Pipe(inode)
    } else if bytes.ends_with(b" (deleted)") {
        Class::Deleted
    } else if bytes.starts_with(b"/") {
        Class::Path(PathBuf::from(target))
    } else {
        Class::Unsupported
    }
}

/// The flags to reopen a file with, from its `fdinfo` flags.
pub fn reopen_flags(flags: u32) -> u32 {
    (flags & KEPT_FLAGS) | libc::O_NOCTTY as u32
}

/// Fails with the first fd of `pid` that DeltaCR cannot restore (`session_stdio` as
/// in [`classify_fd`]).
pub fn check_supported(pid: i32, session_stdio: bool) -> Result<(), FdError> {
    check_all(pid, &procfs::fds(pid)?, session_stdio)
}

/// Fails with the first of `fds` (`pid`'s fds and their `/proc` links) that DeltaCR
/// cannot restore.
fn check_all(pid: i32, fds: &[(i32, OsString)], session_stdio: bool) -> Result<(), FdError> {
    for (fd, target) in fds {
        let fd = *fd;
        let err = |deleted: bool| {
            let comm = procfs::comm_or_unknown(pid);
            let target = target.clone();
            if deleted {
                FdError::Deleted {
                    pid,
                    comm,
                    fd,
                    target,
                }
            } else {
                FdError::Unsupported {
                    pid,
                    comm,
                    fd,
                    target,
                }
            }
        };
        match classify_fd(fd, target, session_stdio) {
            Class::Stdio | Class::Path(_) | Class::Pipe(_) => {}
            Class::Deleted => return Err(err(true)),
            Class::Unsupported => return Err(err(false)),
        }
    }
    Ok(())
}

/// Records the fd table of `pid`, which must be stopped (offsets move while it runs);
/// `session_stdio` as in [`classify_fd`].
pub fn record(pid: i32, session_stdio: bool) -> Result<Vec<FdEntry>, FdError> {
    let fds = procfs::fds(pid)?;
    check_all(pid, &fds, session_stdio)?;
    let mut table = Vec::with_capacity(fds.len());
    for (fd, target) in fds {
        let info = procfs::fdinfo(pid, fd)?;
        let kind = match classify_fd(fd, &target, session_stdio) {
            Class::Path(path) => FdKind::Path {
                path,
                offset: info.pos,
            },
            Class::Pipe(_) => FdKind::Pipe,
            // Checked above; anything else is stdio.
            _ => FdKind::Stdio,
        };
        table.push(FdEntry {
            fd,
            flags: info.flags,
            kind,
            pipe: pipe_inode(&target),
        });
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_fds() {
        assert_eq!(classify(0, OsStr::new("pipe:[123]")), Class::Stdio);
        assert_eq!(classify(2, OsStr::new("/dev/pts/0")), Class::Stdio);
        assert_eq!(
            classify(3, OsStr::new("/tmp/a b")),
            Class::Path(PathBuf::from("/tmp/a b"))
        );
        assert_eq!(classify(3, OsStr::new("/tmp/x (deleted)")), Class::Deleted);
        assert_eq!(
            classify(4, OsStr::new("/memfd:jit (deleted)")),
            Class::Deleted
        );
        assert_eq!(classify(5, OsStr::new("pipe:[99]")), Class::Pipe(99));
        assert_eq!(classify(1, OsStr::new("pipe:[99]")), Class::Stdio);
        assert_eq!(
            classify_fd(1, OsStr::new("pipe:[99]"), false),
            Class::Pipe(99)
        );
        assert_eq!(
            classify_fd(0, OsStr::new("/dev/null"), false),
            Class::Path(PathBuf::from("/dev/null"))
        );
        assert_eq!(pipe_inode(OsStr::new("pipe:[12x]")), None);
        assert_eq!(classify(6, OsStr::new("socket:[7]")), Class::Unsupported);
        assert_eq!(
            classify(7, OsStr::new("anon_inode:[eventpoll]")),
            Class::Unsupported
        );
    }

    #[test]
    fn reopen_never_creates_or_truncates() {
        let flags =
            (libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC | libc::O_EXCL | libc::O_APPEND) as u32;
        let out = reopen_flags(flags);
        assert_eq!(out & libc::O_ACCMODE as u32, libc::O_RDWR as u32);
        assert_ne!(out & libc::O_APPEND as u32, 0);
        assert_eq!(
            out & (libc::O_CREAT | libc::O_TRUNC | libc::O_EXCL) as u32,
            0
        );
        assert_ne!(out & libc::O_NOCTTY as u32, 0);
        // fdinfo's O_CLOEXEC survives (its O_LARGEFILE, 0o100000, is the kernel's
        // default on 64-bit and libc's constant is 0 there).
        let out = reopen_flags(0o2100000);
        assert_eq!(out & 0o2000000, 0o2000000);
    }
}
