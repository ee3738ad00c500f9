//! The fallback restore: a fork of another template made equal to a dump.
//!
//! When a node's template is gone, a live template of an ancestor node (or of another
//! run of the same program: same vdso) is forked as a normal restore does, and before
//! the child gets its registers, threads and fds its address space is made the dump's
//! by injected syscalls and writes to `/proc/<pid>/mem`:
//!
//! 1. a scratch page at an address free in both address spaces (the template's own
//!    scratch page may be where the dumped process had memory);
//! 2. `munmap` of every mapping the dump does not have identically (same range,
//!    permissions, file, offset, inode); `brk` to the dump's heap end;
//! 3. `mmap` (`MAP_FIXED`) of every mapping the dump has and the child does not:
//!    anonymous, or its file reopened in the restored process's root (the destination
//!    sandbox's view, which shows the node's files);
//! 4. in the mappings kept, `madvise(MADV_DONTNEED)` of the private pages the dump does
//!    not have (they read as zero, or as the file, again), and a write of every dumped
//!    page whose content differs; in the new mappings, a write of every dumped page
//!    except the zero pages of anonymous memory. With the base template's own dump,
//!    the child's private pages and their hashes are that dump's: the plan is one walk
//!    of two sorted page lists, no page map read, no page of the child hashed. Without
//!    one, the page map says which pages the child has and those the dump has too are
//!    read and hashed. The pages go in with `process_vm_writev`, many runs a call
//!    ([`super::pages`]).
//!
//! Pages written are the child's own copies; pages not written stay shared
//! copy-on-write with the base template.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::FileExt as _;

use super::pages::write_pages;
use super::write::{dump_vmas, spans};
use super::{Dump, DumpError, DumpVma, PAGE, PageRef, page_hash, private_pages};
use crate::cr::CrError;
use crate::cr::inject::{Injection, SCRATCH_LEN};
use crate::cr::procfs::{self, Mapping};

/// Bytes read from the process at once to compare.
const READ_CHUNK: u64 = 1 << 20;

/// What a fallback restore did to the address space.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    /// Mappings removed.
    pub unmapped: usize,
    /// Mappings created.
    pub mapped: usize,
    /// Pages dropped (`MADV_DONTNEED`).
    pub dropped: u64,
    /// Pages written.
    pub written: u64,
}

fn mem_err(pid: i32, what: String, source: io::Error) -> CrError {
    DumpError::Memory { pid, what, source }.into()
}

/// Makes the address space of the stopped child of `inj` (a fork of another template)
/// equal to `dump`'s; `base` is the dump of the template it was forked from, if any
/// (its page hashes spare reading the child's pages). Returns the address of a
/// scratch page of [`SCRATCH_LEN`] bytes for the rest of the restore, which is not part
/// of the dumped process (the restore unmaps it), and what was done.
pub fn apply_memory(
    inj: &mut Injection<'_>,
    dump: &Dump,
    base: Option<&Dump>,
) -> Result<(u64, ApplyStats), CrError> {
    let pid = inj.tracee().pid().as_raw();
    let m = dump.manifest();
    let maps = procfs::maps(pid)?;
    if let (Some(found), Some(dumped)) = (procfs::vdso(&maps), m.vdso)
        && found.0 != dumped.0
    {
        return Err(DumpError::VdsoMoved {
            pid,
            dir: dump.dir().to_path_buf(),
            found: found.0,
            dumped: dumped.0,
        }
        .into());
    }
    let mut stats = ApplyStats::default();
    let scratch = free_range(&maps, &m.vmas).ok_or(DumpError::NoScratchRoom { pid })?;
    inj.mmap_scratch_at(scratch, SCRATCH_LEN)?;

    // 2. What the dump lacks goes; the heap is moved with brk (mm->brk must follow).
    // Plain anonymous memory is compared by range, not by mapping: mappings merge and
    // grow, and the part both have is kept (only its changed pages are written).
    let child = dump_vmas(&maps, None, None);
    for c in child.iter().filter(|c| c.name != "[heap]") {
        if m.vmas.iter().any(|d| d.same_mapping(c)) {
            continue;
        }
        let gone = if plain_anon(c) {
            subtract((c.start, c.end), &same_anon(&m.vmas, c))
        } else {
            vec![(c.start, c.end)]
        };
        for (start, end) in gone {
            inj.syscall("munmap", libc::SYS_munmap, &[start, end - start])?;
            stats.unmapped += 1;
        }
    }
    // The heap may be several mappings (an mprotect splits it): its whole extent.
    let heap_c = heap_extent(&child);
    let heap_d = heap_extent(&m.vmas);
    match (heap_c, heap_d) {
        (Some(c), Some(d)) if c == d => {}
        (_, Some(d)) => {
            let got = inj.syscall("brk", libc::SYS_brk, &[d.1])?;
            if got != d.1
                && let Some(c) = heap_c
            {
                // The break cannot move there: the heap is mapped anonymously below.
                inj.syscall("munmap", libc::SYS_munmap, &[c.0, c.1 - c.0])?;
            }
        }
        (Some(c), None) => {
            inj.syscall("brk", libc::SYS_brk, &[c.0])?;
        }
        (None, None) => {}
    }

    // 3. What the child lacks is mapped.
    let now = dump_vmas(
        &procfs::maps(pid)?,
        Some((scratch, scratch + SCRATCH_LEN)),
        None,
    );
    let mut kept: Vec<Region> = Vec::new();
    let mut fresh: Vec<Region> = Vec::new();
    for d in &m.vmas {
        let region = |(start, end)| Region {
            start,
            end,
            anonymous: d.is_anonymous(),
            shared: d.is_shared(),
        };
        if now.iter().any(|c| c.same_mapping(d)) {
            kept.push(region((d.start, d.end)));
        } else if plain_anon(d) {
            let have = same_anon(&now, d);
            kept.extend(intersect((d.start, d.end), &have).into_iter().map(region));
            for (start, end) in subtract((d.start, d.end), &have) {
                let piece = DumpVma {
                    start,
                    end,
                    ..d.clone()
                };
                map_vma(inj, scratch, &piece)?;
                stats.mapped += 1;
                fresh.push(region((start, end)));
            }
        } else {
            map_vma(inj, scratch, d)?;
            stats.mapped += 1;
            fresh.push(region((d.start, d.end)));
        }
    }

    // 4. Pages.
    let mem = OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/{pid}/mem"))
        .map_err(|e| mem_err(pid, "open /proc/<pid>/mem".into(), e))?;
    let pagemap = File::open(format!("/proc/{pid}/pagemap"))
        .map_err(|e| mem_err(pid, "open /proc/<pid>/pagemap".into(), e))?;
    let pages = dump.sorted_pages();
    // With the base template's own dump, the child's private pages are that dump's
    // pages (the child is a fork of the frozen template, whose memory the dump
    // recorded) and their hashes are known: no page map to read, no page to hash.
    let base_pages = base.map(Dump::sorted_pages);
    let mut writes: Vec<(u64, PageRef)> = Vec::new();
    let mut drop_pages = Vec::new();
    for r in kept.iter().filter(|r| !r.shared) {
        let dumped = in_range(&pages, r.start, r.end);
        match &base_pages {
            Some(b) => {
                let child: Vec<(u64, Option<u64>)> = in_range(b, r.start, r.end)
                    .iter()
                    .map(|(a, p)| (*a, Some(p.hash)))
                    .collect();
                plan_kept(r, dumped, &child, &mut writes, &mut drop_pages, |_, _| {});
            }
            None => {
                let private = private_pages(&pagemap, r.start, r.end)
                    .map_err(|e| mem_err(pid, format!("read the page map at {:#x}", r.start), e))?;
                // Pages both have, without a base dump to say what the child's hold: read.
                let unknown: Vec<(u64, Option<u64>)> = private.iter().map(|&a| (a, None)).collect();
                let mut compare = Vec::new();
                plan_kept(r, dumped, &unknown, &mut writes, &mut drop_pages, |a, p| {
                    compare.push((a, p));
                });
                writes.extend(differing(pid, &mem, &compare)?);
            }
        }
    }
    for r in fresh.iter().filter(|r| !r.shared) {
        writes.extend(
            in_range(&pages, r.start, r.end)
                .iter()
                .filter(|(_, p)| !(p.at.is_none() && r.anonymous)),
        );
    }
    for (first, count) in spans(&drop_pages) {
        inj.syscall(
            "madvise",
            libc::SYS_madvise,
            &[first, count * PAGE, libc::MADV_DONTNEED as u64],
        )?;
        stats.dropped += count;
    }
    writes.sort_unstable_by_key(|(a, _)| *a);
    stats.written = writes.len() as u64;
    write_pages(pid, &mem, dump, &writes)?;
    Ok((scratch, stats))
}

/// A range of the restored address space and what backs it.
#[derive(Clone, Copy, Debug)]
struct Region {
    start: u64,
    end: u64,
    anonymous: bool,
    shared: bool,
}

/// Plans the pages of the kept region `r` by one walk of two sorted lists: `dumped`,
/// the dump's pages in it, and `child`, the child's private pages in it (with their
/// hashes when known). A child page the dump lacks is dropped; a dumped page the child
/// lacks is written (unless zero in anonymous memory, which reads zero after the drop
/// or never had a page); a page both have is written if its hash differs, or handed to
/// `compare` when the child's hash is unknown.
fn plan_kept(
    r: &Region,
    dumped: &[(u64, PageRef)],
    child: &[(u64, Option<u64>)],
    writes: &mut Vec<(u64, PageRef)>,
    drop_pages: &mut Vec<u64>,
    mut compare: impl FnMut(u64, PageRef),
) {
    let (mut i, mut j) = (0, 0);
    loop {
        match (dumped.get(i), child.get(j)) {
            (None, None) => break,
            (Some(&(a, p)), c) if c.is_none_or(|c| a < c.0) => {
                if !(p.at.is_none() && r.anonymous) {
                    writes.push((a, p));
                }
                i += 1;
            }
            (d, Some(&(a, _))) if d.is_none_or(|d| a < d.0) => {
                drop_pages.push(a);
                j += 1;
            }
            (Some(&(a, p)), Some(&(_, hash))) => {
                match hash {
                    None => compare(a, p),
                    Some(h) if h != p.hash => writes.push((a, p)),
                    Some(_) => {}
                }
                i += 1;
                j += 1;
            }
            _ => unreachable!("one of the lists is not empty"),
        }
    }
}

/// Private anonymous memory without a name, or the heap (not the stack, a file): what
/// is compared by range.
pub(crate) fn plain_anon(v: &DumpVma) -> bool {
    v.is_anonymous() && !v.is_shared() && (v.name.is_empty() || v.name == "[heap]")
}

/// From the first address of the `[heap]` mappings to the end of the last.
pub(crate) fn heap_extent(vmas: &[DumpVma]) -> Option<(u64, u64)> {
    let heap = vmas.iter().filter(|v| v.name == "[heap]");
    let start = heap.clone().map(|v| v.start).min()?;
    let end = heap.map(|v| v.end).max()?;
    Some((start, end))
}

/// The ranges of `vmas` that are plain anonymous memory with `like`'s permissions.
fn same_anon(vmas: &[DumpVma], like: &DumpVma) -> Vec<(u64, u64)> {
    vmas.iter()
        .filter(|v| plain_anon(v) && v.perms == like.perms)
        .map(|v| (v.start, v.end))
        .collect()
}

/// The parts of `range` inside some of `others` (disjoint ranges).
fn intersect(range: (u64, u64), others: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = others
        .iter()
        .map(|&(s, e)| (s.max(range.0), e.min(range.1)))
        .filter(|(s, e)| s < e)
        .collect();
    out.sort_unstable();
    out
}

/// The parts of `range` outside all of `others` (disjoint ranges).
fn subtract(range: (u64, u64), others: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut at = range.0;
    for (s, e) in intersect(range, others) {
        if s > at {
            out.push((at, s));
        }
        at = at.max(e);
    }
    if at < range.1 {
        out.push((at, range.1));
    }
    out
}

/// The dumped pages in `[start, end)` (`pages` sorted by address).
pub(crate) fn in_range(pages: &[(u64, PageRef)], start: u64, end: u64) -> &[(u64, PageRef)] {
    let lo = pages.partition_point(|(a, _)| *a < start);
    let hi = pages.partition_point(|(a, _)| *a < end);
    &pages[lo..hi]
}

/// Of `pages` (sorted), those whose content in the process differs from the dump's:
/// read in runs of contiguous pages and hashed.
fn differing(
    pid: i32,
    mem: &File,
    pages: &[(u64, PageRef)],
) -> Result<Vec<(u64, PageRef)>, CrError> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; READ_CHUNK as usize];
    let mut i = 0;
    while i < pages.len() {
        let start = pages[i].0;
        let mut j = i + 1;
        while j < pages.len()
            && pages[j].0 == start + (j - i) as u64 * PAGE
            && ((j - i + 1) as u64) * PAGE <= READ_CHUNK
        {
            j += 1;
        }
        let chunk = &mut buf[..(j - i) * PAGE as usize];
        mem.read_exact_at(chunk, start)
            .map_err(|e| mem_err(pid, format!("read {} pages at {start:#x}", j - i), e))?;
        for (k, page) in chunk.chunks_exact(PAGE as usize).enumerate() {
            if page_hash(page) != pages[i + k].1.hash {
                out.push(pages[i + k]);
            }
        }
        i = j;
    }
    Ok(out)
}

/// Maps `d` at its address (`MAP_FIXED`): anonymous, or its file reopened by path in
/// the process's root (the scratch page carries the path).
pub(crate) fn map_vma(inj: &mut Injection<'_>, scratch: u64, d: &DumpVma) -> Result<(), CrError> {
    let pid = inj.tracee().pid().as_raw();
    let len = d.end - d.start;
    let prot = d.prot() as u64;
    let Some(file) = &d.file else {
        let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED;
        if d.name == "[stack]" {
            flags |= libc::MAP_GROWSDOWN;
        }
        inj.syscall(
            "mmap",
            libc::SYS_mmap,
            &[d.start, len, prot, flags as u64, u64::MAX, 0],
        )?;
        return Ok(());
    };
    let mut path = file.as_os_str().as_bytes().to_vec();
    path.push(0);
    if path.len() as u64 > SCRATCH_LEN {
        return Err(crate::cr::inject::InjectError::PathTooLong {
            pid,
            path: file.clone(),
        }
        .into());
    }
    inj.tracee()
        .write_memory(scratch, &path)
        .map_err(crate::cr::inject::InjectError::from)?;
    let fd = inj
        .syscall(
            "openat",
            libc::SYS_openat,
            &[
                libc::AT_FDCWD as u64,
                scratch,
                (libc::O_RDONLY | libc::O_CLOEXEC) as u64,
                0,
            ],
        )
        .map_err(|e| {
            mem_err(
                pid,
                format!(
                    "reopening {} to map it at {:#x}-{:#x}",
                    file.display(),
                    d.start,
                    d.end
                ),
                io::Error::other(e.to_string()),
            )
        })?;
    let share = if d.is_shared() {
        libc::MAP_SHARED
    } else {
        libc::MAP_PRIVATE
    };
    let mapped = inj.syscall(
        "mmap",
        libc::SYS_mmap,
        &[
            d.start,
            len,
            prot,
            (share | libc::MAP_FIXED) as u64,
            fd,
            d.offset,
        ],
    );
    let closed = inj.syscall("close", libc::SYS_close, &[fd]);
    mapped?;
    closed?;
    Ok(())
}

/// A free range of [`SCRATCH_LEN`] bytes, a page clear on each side (so it merges with
/// no neighbour), in both the child's `maps` and the dump's `vmas`: the highest gap
/// below the top mapping.
fn free_range(maps: &[Mapping], vmas: &[DumpVma]) -> Option<u64> {
    free_range_among(
        maps.iter()
            .map(|m| (m.start, m.end))
            .chain(vmas.iter().map(|v| (v.start, v.end)))
            .collect(),
    )
}

/// A free range of [`SCRATCH_LEN`] bytes, a page clear on each side, outside all of
/// `ranges`: the highest gap below the top one.
pub(crate) fn free_range_among(mut ranges: Vec<(u64, u64)>) -> Option<u64> {
    // User space ends below 2^47; the vsyscall page above is not a neighbour.
    const TOP: u64 = 0x7fff_ffff_f000;
    ranges.retain(|(s, _)| *s < TOP);
    ranges.sort_unstable();
    let need = SCRATCH_LEN + 2 * PAGE;
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (s, e) in ranges {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    merged
        .windows(2)
        .rev()
        .find(|w| w[1].0 - w[0].1 >= need && w[0].1 >= 0x10000)
        .map(|w| w[1].0 - PAGE - SCRATCH_LEN)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapping(start: u64, end: u64) -> Mapping {
        Mapping {
            start,
            end,
            perms: *b"rw-p",
            offset: 0,
            inode: 0,
            name: String::new(),
        }
    }

    #[test]
    fn ranges_intersect_and_subtract() {
        let others = [(0x3000, 0x5000), (0x1000, 0x2000)];
        assert_eq!(
            intersect((0x1800, 0x4000), &others),
            vec![(0x1800, 0x2000), (0x3000, 0x4000)]
        );
        assert_eq!(
            subtract((0x0, 0x6000), &others),
            vec![(0x0, 0x1000), (0x2000, 0x3000), (0x5000, 0x6000)]
        );
        assert_eq!(subtract((0x3000, 0x4000), &others), vec![]);
    }

    #[test]
    fn the_scratch_page_goes_in_a_gap_of_both_spaces() {
        let maps = [
            mapping(0x400000, 0x500000),
            mapping(0x7f0000000000, 0x7f0000100000),
        ];
        let vmas = [DumpVma {
            start: 0x7e0000000000,
            end: 0x7f0000000000 - 0x2000,
            perms: "rw-p".into(),
            offset: 0,
            inode: 0,
            name: String::new(),
            file: None,
        }];
        let at = free_range(&maps, &vmas).unwrap();
        assert_eq!(at, 0x7e0000000000 - PAGE - SCRATCH_LEN);
        assert!(free_range(&[mapping(0x1000, 0x2000)], &[]).is_none());
    }
}
