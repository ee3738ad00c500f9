//! File leases (`fcntl(F_SETLEASE)`), used as a probe: the kernel refuses a write lease
//! while another open file of the inode exists with write access (on this kernel, read
//! access too). A `MAP_SHARED` writable mapping keeps its open file after the fd is
//! closed, so "a write lease is refused" is how a freeze tells, in microseconds, whether a
//! closed backing file may still be written through a mapping. A false "in use" (a
//! read-only or private mapping, another reader) only costs an unneeded clone.
//!
//! An open of the file by anyone while the probe holds its lease breaks the lease, and
//! the kernel signals the lease holder: with `SIGIO` by default, whose default action
//! kills the process (seen in CI: a DeltaFS test process died of signal 29 with a
//! request in flight on its own mount). The probe sets the signal to `SIGURG`, which is
//! ignored unless a handler is installed, before taking the lease.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// `F_SETSIG` from `<fcntl.h>` (Linux, every architecture): the `libc` crate does not
/// export it.
const F_SETSIG: libc::c_int = 10;

/// Whether any other open file of `path`'s inode exists (see the module doc). Errors
/// (leases disabled by `fs.leases-enable = 0`, …) are for the caller to treat as "in use".
pub fn in_use(path: &Path) -> io::Result<bool> {
    let file = File::open(path)?;
    // SAFETY: F_SETSIG takes an int argument and touches no memory of ours; `file` is
    // open for the whole call.
    if unsafe { libc::fcntl(file.as_raw_fd(), F_SETSIG, libc::SIGURG) } != 0 {
        return Err(io::Error::last_os_error());
    }
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

    /// Opens racing the probe break its lease; the process must survive the signal
    /// (with the default `SIGIO` it was killed).
    #[test]
    fn opens_racing_the_probe_do_not_kill_the_process() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"x").unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let opener = {
            let (path, stop) = (path.clone(), std::sync::Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut opens = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    drop(File::open(&path).unwrap());
                    opens += 1;
                }
                opens
            })
        };
        for _ in 0..2000 {
            // Either answer is right while another thread opens the file.
            in_use(&path).unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(opener.join().unwrap() > 0);
    }
}
