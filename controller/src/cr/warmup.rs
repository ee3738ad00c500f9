//! The warm-up: pre-faulting, in a restored process, the pages it is expected to write.
//!
//! A restored process shares its memory copy-on-write with its template, so each page
//! it first writes costs a fault and a 4 KiB copy (3–5 µs here). [`prefault`] takes
//! those faults up front, off the command's critical path: it seizes the process,
//! injects `madvise(start, len, MADV_POPULATE_WRITE)` (Linux 5.14+) over each range of
//! the given pages that lies in a private writable mapping, and lets it go. The kernel
//! breaks copy-on-write exactly as a write would, without writing anything: the
//! process's memory is byte-identical afterwards, and nothing is written into it from
//! outside (a read-then-write through ptrace would race the process's own threads).
//!
//! Shared mappings are never touched (populating them would dirty the file), nor are
//! read-only or inaccessible ones (the kernel would refuse). A range the kernel refuses
//! anyway (`EFAULT` past the end of a file, `ENOMEM` when unmapped meanwhile) is
//! counted in [`WarmUpReport::failed_ranges`], not an error.

use std::time::{Duration, Instant};

use nix::unistd::Pid;

use super::CrError;
use super::inject::{InjectError, Injection, SyscallSite, requeue_signals};
use super::procfs::{self, Mapping};
use super::ptrace::{Tracee, cr_options};

/// `MADV_POPULATE_WRITE` (`<linux/mman.h>`, 5.14).
const MADV_POPULATE_WRITE: u64 = 23;
/// Pages of 4 KiB.
pub const PAGE_SIZE: u64 = 4096;
/// Ranges of one mapping this many pages apart or less are populated as one, gap
/// included: an injected call costs ~0.1 ms of ptrace stops here, a page copy 3–5 µs.
pub const MERGE_GAP_PAGES: u64 = 8;

/// What one [`prefault`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WarmUpReport {
    /// Pages populated: those asked for that lay in private writable mappings, and the
    /// short gaps between them ([`MERGE_GAP_PAGES`]).
    pub pages: u64,
    /// `madvise` calls injected (one per contiguous range).
    pub ranges: u64,
    /// Ranges the kernel refused (their pages are left to fault as usual).
    pub failed_ranges: u64,
    /// Pages asked for outside any private writable mapping (skipped).
    pub skipped: u64,
    /// The whole call, the pause of the process included.
    pub duration: Duration,
}

/// `[start, end)` ranges covering the sorted, 4 KiB-aligned `pages` that lie in a
/// private writable mapping of `maps` (two ranges of one mapping at most
/// [`MERGE_GAP_PAGES`] apart are one); and how many pages were left out.
pub fn writable_ranges(maps: &[Mapping], pages: &[u64]) -> (Vec<(u64, u64)>, u64) {
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let mut skipped = 0;
    let mut maps = maps
        .iter()
        .filter(|m| m.perms[1] == b'w' && m.perms[3] == b'p')
        .peekable();
    for &page in pages {
        while maps.peek().is_some_and(|m| m.end <= page) {
            maps.next();
        }
        match maps.peek() {
            Some(m) if m.start <= page && page + PAGE_SIZE <= m.end => match ranges.last_mut() {
                // Close enough, in the same mapping: one call.
                Some(last) if page <= last.1 + MERGE_GAP_PAGES * PAGE_SIZE && m.start <= last.0 => {
                    last.1 = page + PAGE_SIZE
                }
                _ => ranges.push((page, page + PAGE_SIZE)),
            },
            _ => skipped += 1,
        }
    }
    (ranges, skipped)
}

/// Pre-faults `pages` (sorted, 4 KiB-aligned addresses) for writing in process `pid`,
/// which keeps running meanwhile except for the pause of its main thread: see the
/// module's documentation.
pub fn prefault(pid: Pid, pages: &[u64]) -> Result<WarmUpReport, CrError> {
    let start = Instant::now();
    let raw = pid.as_raw();
    let maps = procfs::maps(raw)?;
    let (ranges, skipped) = writable_ranges(&maps, pages);
    let mut report = WarmUpReport {
        skipped,
        ..WarmUpReport::default()
    };
    if ranges.is_empty() {
        report.duration = start.elapsed();
        return Ok(report);
    }
    let (mut tracee, _) = Tracee::seize_stopped(pid, cr_options())?;
    let site = SyscallSite::find(&tracee, procfs::vdso(&maps))?;
    let injected = inject_populate(&mut tracee, site, &ranges, &mut report);
    // Its registers are its own again (the injection gave them back, or its drop did),
    // but PTRACE_O_EXITKILL stays until the detach: it sits in the last injected
    // step's SIGTRAP stop, which a controller crash would deliver.
    requeue_signals(&mut tracee);
    let detached = tracee.detach(0);
    injected?;
    detached?;
    report.duration = start.elapsed();
    Ok(report)
}

fn inject_populate(
    tracee: &mut Tracee,
    site: SyscallSite,
    ranges: &[(u64, u64)],
    report: &mut WarmUpReport,
) -> Result<(), CrError> {
    let mut inj = Injection::begin(tracee, site)?;
    for &(from, to) in ranges {
        report.ranges += 1;
        match inj.syscall(
            "madvise",
            libc::SYS_madvise,
            &[from, to - from, MADV_POPULATE_WRITE],
        ) {
            Ok(_) => report.pages += (to - from) / PAGE_SIZE,
            Err(InjectError::Syscall { .. }) => report.failed_ranges += 1,
            Err(e) => return Err(e.into()),
        }
    }
    let signals_follow = inj.tracee().has_deferred_signals();
    inj.finish(signals_follow)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapping(start: u64, end: u64, perms: &[u8; 4]) -> Mapping {
        Mapping {
            start,
            end,
            perms: *perms,
            offset: 0,
            inode: 0,
            name: String::new(),
        }
    }

    #[test]
    fn ranges_keep_to_private_writable_mappings_and_coalesce() {
        let maps = [
            mapping(0x1000, 0x4000, b"rw-p"),
            mapping(0x4000, 0x6000, b"rw-p"),
            mapping(0x6000, 0x8000, b"rw-s"),
            mapping(0x8000, 0x9000, b"r--p"),
            mapping(0x9000, 0xb000, b"rw-p"),
        ];
        let pages = [
            0x1000, 0x3000, 0x4000, 0x6000, 0x8000, 0x9000, 0xa000, 0xc000,
        ];
        let (ranges, skipped) = writable_ranges(&maps, &pages);
        // 0x1000 and 0x3000 are one range (a gap of one page); 0x3000 and 0x4000 are
        // contiguous but in two mappings: two calls.
        assert_eq!(
            ranges,
            vec![(0x1000, 0x4000), (0x4000, 0x5000), (0x9000, 0xb000)]
        );
        // The shared, the read-only and the unmapped page.
        assert_eq!(skipped, 3);
        assert_eq!(writable_ranges(&maps, &[]), (vec![], 0));
        // Farther apart than the gap: two ranges.
        let far = 0x1000 + (MERGE_GAP_PAGES + 2) * PAGE_SIZE;
        let big = [mapping(0x1000, 0x100000, b"rw-p")];
        assert_eq!(
            writable_ranges(&big, &[0x1000, far]).0,
            vec![(0x1000, 0x2000), (far, far + PAGE_SIZE)]
        );
    }
}
