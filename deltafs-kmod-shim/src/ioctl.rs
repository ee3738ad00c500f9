//! `FICLONE`: one of the two raw kernel interfaces DeltaFS calls itself (the other is
//! `sync_file_range`, [`crate::writeback`]; everything else goes through `std`, `nix` or
//! `fuser`).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// Makes `dest` share all of `src`'s extents (a reflink copy). The kernel writes back
/// `src`'s dirty page-cache pages first, so the clone holds what was written to `src`
/// through any path (write, passthrough, a shared mapping). Fails with `EOPNOTSUPP`,
/// `EXDEV` or `EINVAL` where the filesystem cannot clone.
pub fn ficlone(dest: &File, src: &File) -> io::Result<()> {
    ficlone_raw(dest, src)
}

/// [`ficlone`] where a filesystem that cannot clone is an answer, not an error:
/// `Ok(false)` for `EOPNOTSUPP`, `EXDEV` or `EINVAL` (the caller copies instead).
pub fn try_ficlone(dest: &File, src: &File) -> io::Result<bool> {
    match ficlone_raw(dest, src) {
        Ok(()) => Ok(true),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP | libc::EXDEV | libc::EINVAL)
            ) =>
        {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

fn ficlone_raw(dest: &File, src: &File) -> io::Result<()> {
    // SAFETY: FICLONE takes the source fd as its integer argument and reads nothing from
    // our memory; both fds are open for the whole call because `dest` and `src` are
    // borrowed.
    let rc = unsafe { libc::ioctl(dest.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
