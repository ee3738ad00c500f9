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

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::inject::{InjectError, Injection, SCRATCH_LEN};
use super::pidfd::{Pidfd, PidfdError};
use super::procfs::{self, ProcError};

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
    for (fd, target) in procfs::fds(pid)? {
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
        match classify_fd(fd, &target, session_stdio) {
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
    check_supported(pid, session_stdio)?;
    let mut table = Vec::new();
    for (fd, target) in procfs::fds(pid)? {
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

/// The controller's ends of a restored process's stdio pipes: write to `stdin`, read
/// `stdout` and `stderr`. `None` where the process had no such fd at the checkpoint.
#[derive(Debug, Default)]
pub struct StdioPipes {
    /// The write end of the process's fd 0.
    pub stdin: Option<File>,
    /// The read end of the process's fd 1.
    pub stdout: Option<File>,
    /// The read end of the process's fd 2.
    pub stderr: Option<File>,
}

fn u(v: i64) -> u64 {
    v as u64
}

/// Moves fd `from` to `to` in the tracee (closing `from`), with `O_CLOEXEC` as
/// `flags` says; nothing to move when they are equal except the close-on-exec flag.
fn move_fd(inj: &mut Injection<'_>, from: u64, to: i32, flags: u32) -> Result<(), InjectError> {
    let to = u(i64::from(to));
    let cloexec = flags & libc::O_CLOEXEC as u32;
    if from == to {
        if cloexec != 0 {
            let setfd = u(libc::F_SETFD.into());
            inj.syscall(
                "fcntl",
                libc::SYS_fcntl,
                &[to, setfd, libc::FD_CLOEXEC as u64],
            )?;
        }
        return Ok(());
    }
    inj.syscall("dup3", libc::SYS_dup3, &[from, to, u64::from(cloexec)])?;
    inj.syscall("close", libc::SYS_close, &[from])?;
    Ok(())
}

/// Rebuilds `table` and the working directory `cwd` in the stopped tracee of `inj`, a
/// fork of a template: its fd table is emptied (it holds at most the cgroup fd of the
/// template's `clone3`), each path reopened at its offset, fds 0–2 put on fresh pipes
/// whose other ends are returned, each pipe fd opened through the path `pipes` gives
/// for its inode. `scratch` is the template's scratch page ([`SCRATCH_LEN`] bytes),
/// inherited: used, then unmapped.
pub fn install(
    inj: &mut Injection<'_>,
    pidfd: &Pidfd,
    table: &[FdEntry],
    cwd: &Path,
    scratch: u64,
    pipes: &HashMap<u64, PathBuf>,
) -> Result<StdioPipes, FdError> {
    let pid = inj.tracee().pid().as_raw();
    // Every fd reopened by path: files at their offset, pipes through `pipes`.
    let mut reopened = Vec::with_capacity(table.len());
    for entry in table {
        reopened.push(match (&entry.kind, entry.pipe) {
            (FdKind::Path { path, offset }, _) => Some((path.clone(), *offset)),
            (FdKind::Pipe, Some(inode)) => match pipes.get(&inode) {
                Some(path) => Some((path.clone(), 0)),
                None => {
                    return Err(FdError::PipeUnplaced {
                        pid,
                        fd: entry.fd,
                        inode,
                    });
                }
            },
            (FdKind::Pipe, None) | (FdKind::Stdio, _) => None,
        });
    }
    let all = u64::from(u32::MAX);
    inj.syscall("close_range", libc::SYS_close_range, &[0, all, 0])?;
    // Scratch memory: 8 bytes for pipe2's result, then the NUL-terminated paths.
    let mut blob = vec![0u8; 8];
    let mut path_at = Vec::with_capacity(table.len());
    for reopen in &reopened {
        path_at.push(blob.len() as u64);
        if let Some((path, _)) = reopen {
            blob.extend_from_slice(path.as_os_str().as_bytes());
            blob.push(0);
        }
    }
    let cwd_at = blob.len() as u64;
    blob.extend_from_slice(cwd.as_os_str().as_bytes());
    blob.push(0);
    let inherited = scratch;
    let len = (blob.len() as u64).next_multiple_of(4096);
    let scratch = if len <= SCRATCH_LEN {
        inherited
    } else {
        inj.mmap_scratch(len)?
    };
    inj.tracee()
        .write_memory(scratch, &blob)
        .map_err(InjectError::from)?;

    let mut pipes = StdioPipes::default();
    for ((entry, at), reopen) in table.iter().zip(path_at).zip(&reopened) {
        match (&entry.kind, reopen) {
            (FdKind::Stdio, _) => {
                inj.syscall("pipe2", libc::SYS_pipe2, &[scratch, 0])?;
                let mut ends = [0u8; 8];
                inj.tracee()
                    .read_memory(scratch, &mut ends)
                    .map_err(InjectError::from)?;
                let read_end = i32::from_ne_bytes([ends[0], ends[1], ends[2], ends[3]]);
                let write_end = i32::from_ne_bytes([ends[4], ends[5], ends[6], ends[7]]);
                let (theirs, ours) = if entry.fd == 0 {
                    (read_end, write_end)
                } else {
                    (write_end, read_end)
                };
                let file = pidfd.get_fd(ours)?;
                match entry.fd {
                    0 => pipes.stdin = Some(file),
                    1 => pipes.stdout = Some(file),
                    _ => pipes.stderr = Some(file),
                }
                move_fd(inj, u(theirs.into()), entry.fd, entry.flags)?;
                // A dup3 onto `ours` already closed it.
                if ours != entry.fd {
                    inj.syscall("close", libc::SYS_close, &[u(ours.into())])?;
                }
                if entry.flags & libc::O_NONBLOCK as u32 != 0 {
                    let setfl = u(libc::F_SETFL.into());
                    let nonblock = libc::O_NONBLOCK as u64;
                    inj.syscall(
                        "fcntl",
                        libc::SYS_fcntl,
                        &[u(entry.fd.into()), setfl, nonblock],
                    )?;
                }
            }
            (_, Some((path, offset))) => {
                let reopen = |source| FdError::Reopen {
                    pid,
                    fd: entry.fd,
                    path: path.clone(),
                    source,
                };
                let flags = u64::from(reopen_flags(entry.flags));
                let at_fdcwd = u(libc::AT_FDCWD.into());
                let fd = inj
                    .syscall(
                        "openat",
                        libc::SYS_openat,
                        &[at_fdcwd, scratch + at, flags, 0],
                    )
                    .map_err(reopen)?;
                let is_path_only = entry.flags & libc::O_PATH as u32 != 0;
                if *offset != 0 && !is_path_only {
                    let seek_set = libc::SEEK_SET as u64;
                    match inj.syscall("lseek", libc::SYS_lseek, &[fd, *offset, seek_set]) {
                        Ok(_) => {}
                        // A device without offsets (a tty, /dev/null's cousins).
                        Err(InjectError::Syscall { source, .. })
                            if source.raw_os_error() == Some(libc::ESPIPE) => {}
                        Err(e) => return Err(reopen(e)),
                    }
                }
                move_fd(inj, fd, entry.fd, entry.flags).map_err(reopen)?;
            }
            // Refused above.
            (_, None) => {}
        }
    }
    inj.syscall("chdir", libc::SYS_chdir, &[scratch + cwd_at])?;
    if scratch != inherited {
        inj.syscall("munmap", libc::SYS_munmap, &[scratch, len])?;
    }
    inj.syscall("munmap", libc::SYS_munmap, &[inherited, SCRATCH_LEN])?;
    Ok(pipes)
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
