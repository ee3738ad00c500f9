//! File leases (`fcntl(F_SETLEASE)`), used as a probe: the kernel refuses a write lease
//! while another open file of the inode exists with write access (on this kernel, read
//! access too). A `MAP_SHARED` writable mapping keeps its open file after the fd is
//! closed, so "a write lease is refused" is how a freeze tells, in microseconds, whether a
//! closed backing file may still be written through a mapping. A false "in use" (a
//! read-only or private mapping, another reader) only costs an unneeded clone.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// Whether any other open file of `path`'s inode exists (see the module doc). Errors
/// (leases disabled by `fs.leases-enable = 0`, …) are for the caller to treat as "in use".
pub fn in_use(path: &Path) -> io::Result<bool> {
    let file = File::open(path)?;
    // SAFETY: F_SETLEASE takes an int argument and touches no memory of ours; `file` is
    // open for the whole call.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLEASE, libc::F_WRLCK) };
    if rc == 0 {
        // SAFETY: as above; this removes the lease just taken.
        unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLEASE, libc::F_UNLCK) };
        return Ok(false);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) => Ok(true),
        _ => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use std::fs::OpenOptions;

    use super::*;

    #[test]
    fn another_writer_makes_the_file_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"x").unwrap();
        assert!(!in_use(&path).unwrap());
        let writer = OpenOptions::new().write(true).open(&path).unwrap();
        assert!(in_use(&path).unwrap());
        drop(writer);
        assert!(!in_use(&path).unwrap());
    }
}
