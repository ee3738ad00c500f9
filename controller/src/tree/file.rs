//! The database file: redb's storage backend, with commits durable against the death of
//! the daemon rather than of the machine.
//!
//! redb's own file backend calls `fdatasync` on every commit, even an `Eventual` one;
//! on this machine's store (xfs on a loop device) that is 1 to 3 ms of every checkpoint.
//! A commit's pages and header are written with `pwrite` before `commit` returns, so once
//! it returns they are in the kernel and survive a SIGKILL of the daemon, which is what
//! an acknowledged node must survive. So this backend honours `sync_data` only when redb
//! asks for an immediate sync, and the tree database commits with
//! [`redb::Durability::Eventual`]. A power cut may lose the last commits (redb then opens
//! at an earlier, checksummed commit), as it may the snapshots' metadata.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt as _;
use std::path::Path;

use nix::fcntl::{Flock, FlockArg};
use redb::StorageBackend;

/// The database file, exclusively `flock`ed while open (released when the process dies,
/// even by SIGKILL).
#[derive(Debug)]
pub(crate) struct DbFile {
    file: Flock<File>,
}

/// Why the file could not be opened.
#[derive(Debug)]
pub(crate) enum OpenError {
    /// Another handle holds the lock.
    Locked,
    /// Opening or creating it failed.
    Io(io::Error),
}

impl DbFile {
    /// Opens (creating) `path` and takes its lock.
    pub(crate) fn open(path: &Path) -> Result<Self, OpenError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(OpenError::Io)?;
        let file = Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
            if errno == nix::errno::Errno::EWOULDBLOCK {
                OpenError::Locked
            } else {
                OpenError::Io(errno.into())
            }
        })?;
        Ok(Self { file })
    }
}

impl StorageBackend for DbFile {
    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn read(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0; len];
        self.file.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn sync_data(&self, eventual: bool) -> io::Result<()> {
        // An eventual sync is a write barrier; writes reach the kernel in order already.
        if eventual {
            Ok(())
        } else {
            self.file.sync_data()
        }
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.file.write_all_at(data, offset)
    }
}
