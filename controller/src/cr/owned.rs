//! What a template alone owns: the memory its death would free, for the template
//! pool's byte bound.
//!
//! Counted from `/proc/<pid>/pagemap`: anonymous pages (present, not a file's page,
//! which includes private copies of file pages) that the kernel reports *exclusively
//! mapped* (bit 56: no other process maps the page). Why not `smaps_rollup`'s
//! `Private_Clean + Private_Dirty`: those also count page-cache pages of files that
//! only the template maps (a library's text once the session is gone), which its death
//! does not free. The cost is the same order (both walk the page tables: `smaps_rollup`
//! in the kernel, `pagemap` 8 bytes a page to userspace), and it is paid off the answer
//! path, by the pool's own thread. Mappings with no permission at all (`---p`, the
//! reservations of allocators and runtimes, often gigabytes) are skipped: nothing of
//! them is read or written. Swapped pages are not counted (their sharing is not
//! reported).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt as _;
use std::path::PathBuf;

use super::dump::{PAGE, PM_FILE, PM_PRESENT, is_special};
use super::procfs::{self, ProcError};

/// `/proc/<pid>/pagemap`: the page is mapped by this process only.
const PM_MMAP_EXCLUSIVE: u64 = 1 << 56;

/// Page-map entries read at once (256 KiB).
const CHUNK: u64 = 32 * 1024;

/// Errors of measuring what a process owns.
#[derive(Debug, thiserror::Error)]
pub enum OwnedError {
    /// Its mappings could not be read (the process is gone).
    #[error(transparent)]
    Maps(#[from] ProcError),
    /// Its page map could not be opened or read.
    #[error("pid {pid}: cannot read {}", path.display())]
    Pagemap {
        /// The process.
        pid: i32,
        /// `/proc/<pid>/pagemap`.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Bytes of anonymous memory only process `pid` maps (see the module's comment).
pub fn owned_bytes(pid: i32) -> Result<u64, OwnedError> {
    let maps = procfs::maps(pid)?;
    let path = PathBuf::from(format!("/proc/{pid}/pagemap"));
    let pagemap_err = |source| OwnedError::Pagemap {
        pid,
        path: path.clone(),
        source,
    };
    let pagemap = File::open(&path).map_err(pagemap_err)?;
    let mut pages = 0u64;
    let mut raw = Vec::new();
    for m in &maps {
        let private = m.perms[3] == b'p';
        let accessible = m.perms[..3] != *b"---";
        if !private || !accessible || is_special(&m.name) {
            continue;
        }
        let count = (m.end - m.start) / PAGE;
        let mut first = 0;
        while first < count {
            let n = CHUNK.min(count - first);
            raw.resize((n * 8) as usize, 0);
            match pagemap.read_exact_at(&mut raw, (m.start / PAGE + first) * 8) {
                Ok(()) => {}
                // The mapping went away meanwhile (it cannot in a frozen template, but
                // the caller may measure any process).
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(pagemap_err(e)),
            }
            pages += raw
                .chunks_exact(8)
                .filter(|entry| {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(entry);
                    is_owned(u64::from_ne_bytes(b))
                })
                .count() as u64;
            first += n;
        }
    }
    Ok(pages * PAGE)
}

/// Whether a page-map entry is an anonymous page mapped by this process alone.
fn is_owned(entry: u64) -> bool {
    entry & (PM_PRESENT | PM_FILE | PM_MMAP_EXCLUSIVE) == PM_PRESENT | PM_MMAP_EXCLUSIVE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_present_exclusive_anonymous_pages_count() {
        assert!(is_owned(PM_PRESENT | PM_MMAP_EXCLUSIVE | 42));
        assert!(!is_owned(PM_PRESENT | PM_MMAP_EXCLUSIVE | PM_FILE));
        assert!(!is_owned(PM_PRESENT));
        assert!(!is_owned(PM_MMAP_EXCLUSIVE));
    }

    #[test]
    fn this_process_owns_what_it_wrote() {
        // This process's own heap: 8 MiB written, then measured.
        let block = vec![7u8; 8 << 20];
        let me = i32::try_from(std::process::id()).unwrap();
        let mine = owned_bytes(me).unwrap();
        assert!(mine >= 8 << 20, "owned {mine} bytes");
        drop(block);
        let err = owned_bytes(i32::MAX).unwrap_err();
        assert!(err.to_string().contains(&i32::MAX.to_string()), "{err}");
    }
}
