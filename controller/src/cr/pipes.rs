//! Pipes between the processes of a sandbox: what is unread in them at a checkpoint,
//! and a fresh pipe for each of them on every restore.
//!
//! A restored process is a fork of its template, whose fd table is empty: a pipe the
//! process had is gone with the checkpoint's processes. So a checkpoint records, per
//! pipe (by inode), its capacity and the bytes still unread in it ([`record`]), copied
//! with `tee(2)`, which duplicates a pipe's buffers without consuming them: the
//! checkpointed processes find their pipes untouched. The processes must not run
//! meanwhile (a sandbox records while its cgroup is frozen). A restore makes one fresh
//! pipe per recorded one ([`Fresh::make`]), of the same capacity, with those bytes
//! written back, and every restored process opens the ends it had through a path to
//! that pipe (`/proc/<holder>/fd/<n>`; see [`super::RestoreOptions::pipes`]): opening a
//! pipe through `/proc` gives a new open file description on the same pipe, read or
//! write as asked.
//!
//! What is carried is at most the pipe's capacity (64 KiB by default; at most
//! `/proc/sys/fs/pipe-max-size`, 1 MiB, unless a privileged process raised it): a pipe
//! cannot hold more.

use std::fs::File;
use std::io::{self, Read as _, Write as _};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::PathBuf;

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, tee};
use serde::{Deserialize, Serialize};

/// Errors of recording or re-making pipes.
#[derive(Debug, thiserror::Error)]
pub enum PipeError {
    /// Opening a pipe through `/proc` failed.
    #[error("opening pipe:[{inode}] through {}: {source}", path.display())]
    Open {
        /// The pipe.
        inode: u64,
        /// The `/proc` path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A pipe operation failed.
    #[error("pipe:[{inode}]: {op}: {source}")]
    Io {
        /// The pipe (the recorded inode, for a fresh pipe).
        inode: u64,
        /// What was done.
        op: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// One pipe at a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipeState {
    /// Its inode (`pipe:[N]` in `/proc/<pid>/fd`), which the recorded fds refer to
    /// ([`super::fdtable::FdEntry::pipe`]).
    pub inode: u64,
    /// Its capacity in bytes (`F_GETPIPE_SZ`).
    pub capacity: u32,
    /// The bytes in it that no process had read yet.
    pub unread: Vec<u8>,
}

/// Where to reach a pipe at a checkpoint: a process that has it open, and the fd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PipeFd {
    /// The pipe's inode.
    pub inode: u64,
    /// A process (host pid) that has it open.
    pub pid: i32,
    /// The fd in that process.
    pub fd: i32,
}

fn io_err(inode: u64, op: &'static str) -> impl FnOnce(Errno) -> PipeError {
    move |e| PipeError::Io {
        inode,
        op,
        source: e.into(),
    }
}

/// Records each pipe of `fds` (one entry per pipe is enough; duplicates are skipped):
/// capacity and unread bytes. The processes holding them must be stopped or frozen.
pub fn record(fds: &[PipeFd]) -> Result<Vec<PipeState>, PipeError> {
    let mut out: Vec<PipeState> = Vec::new();
    for fd in fds {
        if out.iter().any(|p| p.inode == fd.inode) {
            continue;
        }
        out.push(record_one(fd)?);
    }
    Ok(out)
}

fn record_one(at: &PipeFd) -> Result<PipeState, PipeError> {
    let inode = at.inode;
    // A reader of our own on the same pipe (whichever end the process's fd is):
    // non-blocking, so it neither waits for a writer nor blocks on an empty pipe.
    let path = PathBuf::from(format!("/proc/{}/fd/{}", at.pid, at.fd));
    let reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(&path)
        .map_err(|source| PipeError::Open {
            inode,
            path: path.clone(),
            source,
        })?;
    let capacity =
        fcntl(reader.as_fd(), FcntlArg::F_GETPIPE_SZ).map_err(io_err(inode, "F_GETPIPE_SZ"))?;
    let (copy_r, copy_w) =
        nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).map_err(io_err(inode, "pipe2"))?;
    set_capacity(&copy_w, capacity, inode)?;
    // One tee copies every buffer of the pipe (up to `capacity`, what it can hold)
    // without consuming them.
    let copied = match tee(
        &reader,
        &copy_w,
        capacity as usize,
        SpliceFFlags::SPLICE_F_NONBLOCK,
    ) {
        Ok(n) => n,
        // Empty (with writers left), or no data at all.
        Err(Errno::EAGAIN) => 0,
        Err(e) => return Err(io_err(inode, "tee")(e)),
    };
    drop(copy_w);
    let mut unread = Vec::with_capacity(copied);
    File::from(copy_r)
        .read_to_end(&mut unread)
        .map_err(|source| PipeError::Io {
            inode,
            op: "reading the copy",
            source,
        })?;
    Ok(PipeState {
        inode,
        capacity: u32::try_from(capacity).unwrap_or(u32::MAX),
        unread,
    })
}

fn set_capacity(fd: &OwnedFd, capacity: i32, inode: u64) -> Result<(), PipeError> {
    let now = fcntl(fd.as_fd(), FcntlArg::F_GETPIPE_SZ).map_err(io_err(inode, "F_GETPIPE_SZ"))?;
    if now < capacity {
        fcntl(fd.as_fd(), FcntlArg::F_SETPIPE_SZ(capacity))
            .map_err(io_err(inode, "F_SETPIPE_SZ"))?;
    }
    Ok(())
}

/// The fresh pipes of one restore, held by the controller until every restored process
/// has opened its ends (so that opening a read end never waits for a writer).
#[derive(Debug, Default)]
pub struct Fresh {
    /// Per recorded pipe: its inode, and the fresh pipe's read and write ends.
    pub pipes: Vec<(u64, OwnedFd, OwnedFd)>,
}

impl Fresh {
    /// Makes one fresh pipe per recorded one, of the same capacity, holding the bytes
    /// that were unread at the checkpoint.
    pub fn make(states: &[PipeState]) -> Result<Self, PipeError> {
        let mut pipes = Vec::with_capacity(states.len());
        for state in states {
            let inode = state.inode;
            let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(io_err(inode, "pipe2"))?;
            let capacity = i32::try_from(state.capacity).unwrap_or(i32::MAX);
            set_capacity(&w, capacity.max(state.unread.len() as i32), inode)?;
            let mut writer = File::from(w);
            writer
                .write_all(&state.unread)
                .map_err(|source| PipeError::Io {
                    inode,
                    op: "writing the unread bytes back",
                    source,
                })?;
            pipes.push((inode, r, OwnedFd::from(writer)));
        }
        Ok(Self { pipes })
    }

    /// One end of each fresh pipe (the read end), to hand to a holder process whose
    /// `/proc/<pid>/fd/<n>` the restored processes open.
    pub fn read_ends(&self) -> Result<Vec<OwnedFd>, PipeError> {
        self.pipes
            .iter()
            .map(|(inode, r, _)| {
                r.try_clone().map_err(|source| PipeError::Io {
                    inode: *inode,
                    op: "dup",
                    source,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unread bytes are copied without being consumed, and come back in a fresh pipe.
    #[test]
    fn records_unread_bytes_without_consuming_them() {
        let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap();
        let mut writer = File::from(w);
        writer.write_all(b"hello pipe").unwrap();
        let pid = std::process::id() as i32;
        let fd = std::os::fd::AsRawFd::as_raw_fd(&r);
        let inode = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap();
        let inode = super::super::fdtable::pipe_inode(inode.as_os_str()).unwrap();
        let at = PipeFd { inode, pid, fd };
        let states = record(&[at, at]).unwrap();
        assert_eq!(states.len(), 1);
        assert_eq!(states[0].unread, b"hello pipe");
        assert!(states[0].capacity >= 4096);
        // Still there for the process.
        drop(writer);
        let mut left = Vec::new();
        File::from(r).read_to_end(&mut left).unwrap();
        assert_eq!(left, b"hello pipe");

        let fresh = Fresh::make(&states).unwrap();
        let (_, r, w) = fresh.pipes.into_iter().next().unwrap();
        drop(w);
        let mut got = Vec::new();
        File::from(r).read_to_end(&mut got).unwrap();
        assert_eq!(got, b"hello pipe");
    }
}
