//! A dump's `pages` file mapped read-only (`mmap`), the one kernel interface of this
//! module: the fallback restore hands the mapped pages straight to
//! `process_vm_writev`, without reading them into a buffer first (one copy less, and
//! no page faults on a buffer of the delta's size).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd as _;
use std::ptr::NonNull;

/// A whole file mapped `PROT_READ`, `MAP_PRIVATE`. Not `MAP_POPULATE`d: a base dump's
/// file holds the whole process, and only the pages written are touched (the kernel maps
/// the page cache around each fault, 64 KiB at once).
///
/// Dumps are never written after they are complete (written in a temporary directory
/// and renamed into place), and removing one unlinks its files, which keeps a mapping
/// valid: the bytes cannot change or vanish under the mapping (a truncation would make
/// a read `SIGBUS`, and nothing truncates a dump).
#[derive(Debug)]
pub(crate) struct MappedFile {
    /// `None` for an empty file (`mmap` of 0 bytes is refused).
    ptr: Option<NonNull<u8>>,
    len: usize,
}

impl MappedFile {
    /// Maps all of `file`.
    pub(crate) fn map(file: &File) -> io::Result<Self> {
        let len = usize::try_from(file.metadata()?.len())
            .map_err(|_| io::Error::from(io::ErrorKind::FileTooLarge))?;
        if len == 0 {
            return Ok(Self { ptr: None, len });
        }
        // SAFETY: a new mapping chosen by the kernel (no fixed address), so no memory
        // of ours is replaced; the fd is open for reading for the duration of the call;
        // the result is checked against MAP_FAILED before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            ptr: NonNull::new(ptr.cast()),
            len,
        })
    }

    /// The file's bytes.
    pub(crate) fn bytes(&self) -> &[u8] {
        match self.ptr {
            // SAFETY: `ptr` is a live mapping of `len` readable bytes (unmapped only on
            // drop, which the borrow of `self` excludes), never written through: see the
            // type's comment for why its bytes do not change.
            Some(ptr) => unsafe { std::slice::from_raw_parts(ptr.as_ptr(), self.len) },
            None => &[],
        }
    }
}

impl Drop for MappedFile {
    fn drop(&mut self) {
        if let Some(ptr) = self.ptr {
            // SAFETY: the mapping made in `map`, of `len` bytes, unmapped once; no slice of
            // it outlives `self`.
            unsafe { libc::munmap(ptr.as_ptr().cast(), self.len) };
        }
    }
}

// SAFETY: the mapping is read-only and owned by the value; sharing or moving it between
// threads is like sharing or moving a `Box<[u8]>`.
unsafe impl Send for MappedFile {}
// SAFETY: as above: only shared reads.
unsafe impl Sync for MappedFile {}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    #[test]
    fn a_file_is_mapped_whole() {
        let dir = std::env::temp_dir().join(format!("mapped-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pages");
        let mut f = File::create(&path).unwrap();
        f.write_all(&[7u8; 8192]).unwrap();
        drop(f);
        let m = MappedFile::map(&File::open(&path).unwrap()).unwrap();
        assert_eq!(m.bytes().len(), 8192);
        assert!(m.bytes().iter().all(|&b| b == 7));
        File::create(dir.join("empty")).unwrap();
        let e = MappedFile::map(&File::open(dir.join("empty")).unwrap()).unwrap();
        assert!(e.bytes().is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
