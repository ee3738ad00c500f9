//! Rebuilding the fd table in a restored process, as one batch of injected calls.
//!
//! The child's table is emptied first (`close_range`), and nothing else in it runs
//! while the batch does (its other threads are stopped), so every fd the batch's
//! `openat` and `pipe2` calls get is the lowest free one (POSIX): [`plan`] works each
//! out ahead, with the `dup3` that moves it to its recorded number, and the batch runs
//! for one stop ([`Injection::run_calls`]). The controller's ends of fresh stdio pipes
//! are parked on numbers the table does not use until `pidfd_getfd` takes them; a
//! second, short batch closes them. Each fd the kernel gave is checked against the
//! plan before the controller takes anything.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use super::{FdEntry, FdError, FdKind, reopen_flags};
use crate::cr::inject::{Batch, BatchError, InjectError, Injection, SCRATCH_LEN};
use crate::cr::pidfd::Pidfd;

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

/// Fd numbers in use, as the kernel hands them out: the lowest free one first.
#[derive(Debug, Default)]
struct Numbers {
    used: BTreeSet<i32>,
}

impl Numbers {
    /// The lowest number neither in use nor in `avoid`.
    fn lowest_free(&self, avoid: &BTreeSet<i32>) -> i32 {
        (0..i32::MAX)
            .find(|fd| !self.used.contains(fd) && !avoid.contains(fd))
            .unwrap_or(i32::MAX)
    }

    /// What the next `openat` (or end of a `pipe2`) gets.
    fn open(&mut self) -> i32 {
        let fd = self.lowest_free(&BTreeSet::new());
        self.used.insert(fd);
        fd
    }
}

/// The batch that rebuilds a table, and what its calls must give.
#[derive(Debug)]
struct Plan {
    batch: Batch,
    /// Per call, the index of the table entry it serves, if one.
    serves: Vec<Option<usize>>,
    /// The calls that open one fd (`openat`), and the fd each must give.
    opens: Vec<(usize, i32)>,
    /// Per `pipe2`: where it writes its two fds, and the two it must write.
    pipes: Vec<(u64, i32, i32)>,
    /// The controller's end of each stdio pipe: (the stdio fd, where it is parked).
    ours: Vec<(i32, i32)>,
    fds: Numbers,
}

impl Plan {
    /// Adds a call serving table entry `serves`; returns its index in the batch.
    fn call(&mut self, serves: Option<usize>, name: &'static str, nr: i64, args: &[u64]) -> usize {
        self.call_tolerating(serves, name, nr, args, 0)
    }

    /// [`Self::call`] of a call that may fail with `errno` ([`Batch::call_tolerating`]).
    fn call_tolerating(
        &mut self,
        serves: Option<usize>,
        name: &'static str,
        nr: i64,
        args: &[u64],
        errno: i32,
    ) -> usize {
        self.serves.push(serves);
        self.batch.call_tolerating(name, nr, args, errno)
    }

    /// Moves fd `from` to `to` (closing `from`), `O_CLOEXEC` on `to` if `cloexec`;
    /// nothing when they are equal (the fd was made with its flag).
    fn move_fd(&mut self, serves: usize, from: i32, to: i32, cloexec: bool) {
        if from == to {
            return;
        }
        let flag = if cloexec { libc::O_CLOEXEC as u64 } else { 0 };
        let (f, t) = (u(from.into()), u(to.into()));
        self.call(Some(serves), "dup3", libc::SYS_dup3, &[f, t, flag]);
        self.call(Some(serves), "close", libc::SYS_close, &[f]);
        self.fds.used.remove(&from);
        self.fds.used.insert(to);
    }
}

/// Plans the rebuild of `table` (each entry's path to reopen, if any, in `reopened`)
/// and the working directory `cwd` into `batch`, empty.
fn plan(table: &[FdEntry], reopened: &[Option<(PathBuf, u64)>], cwd: &Path, batch: Batch) -> Plan {
    let targets: BTreeSet<i32> = table.iter().map(|e| e.fd).collect();
    let mut p = Plan {
        batch,
        serves: Vec::new(),
        opens: Vec::new(),
        pipes: Vec::new(),
        ours: Vec::new(),
        fds: Numbers::default(),
    };
    let all = u64::from(u32::MAX);
    p.call(None, "close_range", libc::SYS_close_range, &[0, all, 0]);
    for (i, (entry, reopen)) in table.iter().zip(reopened).enumerate() {
        let cloexec = entry.flags & libc::O_CLOEXEC as u32 != 0;
        match (&entry.kind, reopen) {
            (FdKind::Stdio, _) => {
                let ends = p.batch.space(8);
                let flags = if cloexec { libc::O_CLOEXEC as u64 } else { 0 };
                p.call(Some(i), "pipe2", libc::SYS_pipe2, &[ends, flags]);
                let (read, write) = (p.fds.open(), p.fds.open());
                p.pipes.push((ends, read, write));
                let (theirs, ours) = if entry.fd == 0 {
                    (read, write)
                } else {
                    (write, read)
                };
                // Ours first, off any number the table uses (theirs may go there).
                let ours = if targets.contains(&ours) {
                    let park = p.fds.lowest_free(&targets);
                    p.move_fd(i, ours, park, true);
                    park
                } else {
                    ours
                };
                p.ours.push((entry.fd, ours));
                p.move_fd(i, theirs, entry.fd, cloexec);
                if entry.flags & libc::O_NONBLOCK as u32 != 0 {
                    let setfl = u(libc::F_SETFL.into());
                    let fd = u(entry.fd.into());
                    let nonblock = libc::O_NONBLOCK as u64;
                    p.call(Some(i), "fcntl", libc::SYS_fcntl, &[fd, setfl, nonblock]);
                }
            }
            (_, Some((path, offset))) => {
                let at = p.batch.path(path);
                let flags = u64::from(reopen_flags(entry.flags));
                let at_fdcwd = u(libc::AT_FDCWD.into());
                let args = [at_fdcwd, at, flags, 0];
                let call = p.call(Some(i), "openat", libc::SYS_openat, &args);
                let fd = p.fds.open();
                p.opens.push((call, fd));
                let is_path_only = entry.flags & libc::O_PATH as u32 != 0;
                if *offset != 0 && !is_path_only {
                    let args = [u(fd.into()), *offset, libc::SEEK_SET as u64];
                    // A device without offsets (a tty) keeps none: not an error.
                    let espipe = libc::ESPIPE;
                    p.call_tolerating(Some(i), "lseek", libc::SYS_lseek, &args, espipe);
                }
                p.move_fd(i, fd, entry.fd, cloexec);
            }
            // Refused by the caller.
            (_, None) => {}
        }
    }
    let at = p.batch.path(cwd);
    p.call(None, "chdir", libc::SYS_chdir, &[at]);
    p
}

/// Rebuilds `table` and the working directory `cwd` in the stopped tracee of `inj`, a
/// fork of a template: its fd table is emptied (it holds at most the cgroup fd of the
/// template's `clone3`), each path reopened at its offset, fds 0–2 put on fresh pipes
/// whose other ends are returned, each pipe fd opened through the path `pipes` gives
/// for its inode. `scratch` is the template's scratch page ([`SCRATCH_LEN`] bytes),
/// inherited, executable if `batched` (else the calls run one at a time): used, then
/// unmapped.
pub fn install(
    inj: &mut Injection<'_>,
    pidfd: &Pidfd,
    table: &[FdEntry],
    cwd: &Path,
    (scratch, batched): (u64, bool),
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
    let mut plan = plan(table, &reopened, cwd, Batch::new(scratch));
    // Long paths: a larger (executable) scratch area of its own, for this rebuild.
    let room = plan.batch.room();
    let (extra, batched) = if room <= SCRATCH_LEN {
        (None, batched)
    } else {
        let len = room.next_multiple_of(4096);
        let at = inj.mmap_scratch_exec(len)?;
        plan = self::plan(table, &reopened, cwd, Batch::sized(at, len));
        (Some((at, len)), true)
    };
    let (results, data) = inj.run_calls(&plan.batch, batched).map_err(|e| {
        let BatchError { index, error } = e;
        let serves = index.and_then(|i| plan.serves.get(i).copied().flatten());
        match serves.and_then(|i| Some((table[i].fd, reopened[i].as_ref()?))) {
            Some((fd, (path, _))) => FdError::Reopen {
                pid,
                fd,
                path: path.clone(),
                source: error,
            },
            None => error.into(),
        }
    })?;
    check(pid, &plan, &results, &data)?;

    let mut stdio = StdioPipes::default();
    let mut closes = Batch::sized(plan.batch.scratch(), plan.batch.area());
    for &(fd, parked) in &plan.ours {
        let file = pidfd.get_fd(parked)?;
        match fd {
            0 => stdio.stdin = Some(file),
            1 => stdio.stdout = Some(file),
            _ => stdio.stderr = Some(file),
        }
        closes.call("close", libc::SYS_close, &[u(parked.into())]);
    }
    if !closes.is_empty() {
        inj.run_calls(&closes, batched).map_err(InjectError::from)?;
    }
    if let Some((at, len)) = extra {
        inj.syscall("munmap", libc::SYS_munmap, &[at, len])?;
    }
    inj.syscall("munmap", libc::SYS_munmap, &[scratch, SCRATCH_LEN])?;
    Ok(stdio)
}

/// Fails unless every fd the batch of `plan` opened is the one planned.
fn check(pid: i32, plan: &Plan, results: &[u64], data: &[u8]) -> Result<(), FdError> {
    let unpredicted = |call, expected, got| FdError::Unpredicted {
        pid,
        call,
        expected,
        got,
    };
    for &(call, fd) in &plan.opens {
        let got = results.get(call).map_or(-1, |&r| r as i64);
        if got != i64::from(fd) {
            return Err(unpredicted("openat", fd, got));
        }
    }
    for &(ends, read, write) in &plan.pipes {
        let at = plan.batch.offset(ends);
        let end = |i: usize| {
            let b = data.get(at + 4 * i..at + 4 * i + 4).unwrap_or(&[0xff; 4]);
            i64::from(i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        };
        for (i, fd) in [read, write].into_iter().enumerate() {
            if end(i) != i64::from(fd) {
                return Err(unpredicted("pipe2", fd, end(i)));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
