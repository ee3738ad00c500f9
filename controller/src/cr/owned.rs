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

use super::dump::frames::frame;
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

/// Bytes of anonymous memory only process `pid` maps (see the module's comment), or
/// only it and `forks` processes forked from it that never ran: a template's standby
/// forks (`sandbox/manager/standby.rs`) map every page it does, so a page mapped
/// `1 + forks` times is one the template and its standbys alone hold, which dropping
/// them frees. Those counts come from `/proc/kpagecount` (read by frame, which needs
/// `CAP_SYS_ADMIN`: a frame of 0 counts as shared).
pub fn owned_bytes(pid: i32, forks: usize) -> Result<u64, OwnedError> {
    let maps = procfs::maps(pid)?;
    let path = PathBuf::from(format!("/proc/{pid}/pagemap"));
    let pagemap_err = |source| OwnedError::Pagemap {
        pid,
        path: path.clone(),
        source,
    };
    let pagemap = File::open(&path).map_err(pagemap_err)?;
    let mut pages = 0u64;
    // The frames of the pages shared with someone: maybe only with the forks.
    let mut shared = Vec::new();
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
                // The mapping shrank meanwhile.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(pagemap_err(e)),
            }
            for entry in raw.chunks_exact(8) {
                let entry = u64::from_ne_bytes(entry.try_into().expect("8 bytes"));
                if is_owned(entry) {
                    pages += 1;
                } else if forks > 0
                    && let Some(frame) = frame(entry)
                {
                    shared.push(frame);
                }
            }
            first += n;
        }
    }
    if !shared.is_empty() {
        let kpagecount = PathBuf::from("/proc/kpagecount");
        pages += mapped_at_most(&mut shared, 1 + forks as u64).map_err(|source| {
            OwnedError::Pagemap {
                pid,
                path: kpagecount,
                source,
            }
        })?;
    }
    Ok(pages * PAGE)
}

/// How many of `frames` (known, non-zero; sorted here) `/proc/kpagecount` says are
/// mapped at most `max` times. Read in windows of 512 frames: a process's pages sit in
/// runs of nearby frames.
fn mapped_at_most(frames: &mut [u64], max: u64) -> io::Result<u64> {
    const WINDOW: u64 = 512;
    frames.sort_unstable();
    let counts = File::open("/proc/kpagecount")?;
    let mut buf = vec![0u8; (WINDOW * 8) as usize];
    let mut owned = 0;
    let mut i = 0;
    while i < frames.len() {
        let start = frames[i];
        let read = counts.read_at(&mut buf, start * 8)?;
        let end = start + (read / 8) as u64;
        if end == start {
            break;
        }
        while i < frames.len() && frames[i] < end {
            let at = ((frames[i] - start) * 8) as usize;
            let count = u64::from_ne_bytes(buf[at..at + 8].try_into().expect("8 bytes"));
            if count <= max {
                owned += 1;
            }
            i += 1;
        }
    }
    Ok(owned)
}

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
        let mine = owned_bytes(me, 0).unwrap();
        assert!(mine >= 8 << 20, "owned {mine} bytes");
        drop(block);
        let err = owned_bytes(i32::MAX, 0).unwrap_err();
        assert!(err.to_string().contains(&i32::MAX.to_string()), "{err}");
    }
}
