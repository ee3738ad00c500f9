//! A shared writable mapping of a file, for tests of writes that bypass `write(2)`. The
//! only `unsafe` of the tests, wrapping `mmap(2)` / `munmap(2)`.

use std::fs::File;
use std::os::fd::AsRawFd;

/// `MAP_SHARED`, read-write mapping of the first `len` bytes of a file. Unmapped on drop;
/// it outlives the fd it was made from (the point of the tests).
pub struct SharedMap {
    ptr: *mut u8,
    len: usize,
}

impl SharedMap {
    pub fn new(file: &File, len: usize) -> Self {
        // SAFETY: a fresh mapping chosen by the kernel (null hint) of an open file; the
        // result is checked before use and owned by the returned value.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(
            ptr,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        Self {
            ptr: ptr.cast(),
            len,
        }
    }

    /// Stores `data` at `offset` through the mapping.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        assert!(offset + data.len() <= self.len);
        // SAFETY: the range is inside the mapping (checked above), which this value owns
        // exclusively; `data` cannot overlap it (it is a Rust slice, the mapping is not).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(offset), data.len()) };
    }

    /// `msync(MS_SYNC)`: writes the dirty pages back.
    pub fn sync(&self) {
        // SAFETY: `ptr`/`len` are exactly the mapping this value owns.
        let rc = unsafe { libc::msync(self.ptr.cast(), self.len, libc::MS_SYNC) };
        assert_eq!(rc, 0, "msync: {}", std::io::Error::last_os_error());
    }
}

impl Drop for SharedMap {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly the mapping this value owns, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}
