//! poll(2) over a few file descriptors: the one kernel interface a session's
//! I/O loop needs to read stdout and stderr concurrently, and to write the
//! request, without threads. (nix's `poll` feature is not enabled in this
//! crate; this is the whole binding.)

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

/// What to wait for on a descriptor.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Interest {
    /// Data or end of file to read.
    Read,
    /// Room to write.
    Write,
    /// Only errors: for a pipe's write end, that no reader is left.
    Errors,
}

/// What to wait for on one descriptor, and what happened to it.
pub(super) struct PollFd<'fd> {
    /// The descriptor, borrowed for the duration of the call.
    pub fd: BorrowedFd<'fd>,
    /// What to wait for.
    pub interest: Interest,
    /// Set by [`poll`]: the descriptor is ready (or at end of file, or in
    /// error: a read or write then tells which without blocking).
    pub ready: bool,
    /// Set by [`poll`]: `POLLERR` (a pipe's write end with no reader left).
    pub error: bool,
}

impl<'fd> PollFd<'fd> {
    /// Waits for `interest` on `fd`.
    pub fn new(fd: BorrowedFd<'fd>, interest: Interest) -> Self {
        Self {
            fd,
            interest,
            ready: false,
            error: false,
        }
    }
}

/// Waits up to `timeout` for one of `fds` to be ready; returns how many are.
/// An interrupted call (EINTR) counts as zero ready: the caller loops on its
/// own deadline anyway.
pub(super) fn poll(fds: &mut [PollFd<'_>], timeout: Duration) -> io::Result<usize> {
    let mut raw: Vec<libc::pollfd> = fds
        .iter()
        .map(|p| libc::pollfd {
            fd: p.fd.as_raw_fd(),
            events: match p.interest {
                Interest::Read => libc::POLLIN,
                Interest::Write => libc::POLLOUT,
                // POLLERR and POLLHUP are reported whatever is asked.
                Interest::Errors => 0,
            },
            revents: 0,
        })
        .collect();
    // Rounded up so that a deadline 0.4 ms away does not spin with timeout 0.
    let millis = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int;
    // SAFETY: `raw` is a valid, exclusively borrowed array of `raw.len()`
    // pollfd structs that outlives the call; every fd in it is borrowed from
    // `fds`, so it stays open for the duration of the call.
    let n = unsafe { libc::poll(raw.as_mut_ptr(), raw.len() as libc::nfds_t, millis) };
    if n < 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            return Ok(0);
        }
        return Err(err);
    }
    for (p, r) in fds.iter_mut().zip(&raw) {
        p.ready = r.revents != 0;
        p.error = r.revents & libc::POLLERR != 0;
    }
    Ok(n as usize)
}
