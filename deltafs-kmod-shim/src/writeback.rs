//! `sync_file_range(2)`: writing back a file's dirty pages without a journal commit
//! (`nix` 0.30 does not wrap it).

use std::io;
use std::os::fd::{AsFd, AsRawFd};

/// Writes back the dirty pages of `file` and waits until they are written (what
/// `FICLONE` does first). Writing a page back write-protects it in every shared mapping,
/// so the next write through one faults and updates the file's times.
pub fn write_back(file: &impl AsFd) -> io::Result<()> {
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // SAFETY: plain syscall on a borrowed, open descriptor; offset 0 and length 0 mean
    // the whole file; no memory is passed.
    let rc = unsafe { libc::sync_file_range(file.as_fd().as_raw_fd(), 0, 0, flags) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
