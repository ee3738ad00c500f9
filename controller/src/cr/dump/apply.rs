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
//!    page whose content differs: known from the base template's own dump's hashes
//!    when given, else read and hashed; in the new mappings, a write of every dumped
//!    page except the zero pages of anonymous memory.
//!
//! Pages written are the child's own copies; pages not written stay shared
//! copy-on-write with the base template.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::FileExt as _;

use super::write::{dump_vmas, spans};
use super::{
    Dump, DumpError, DumpVma, PAGE, PageRef, page_hash, page_index, private_pages, read_pages,
};
use crate::cr::CrError;
use crate::cr::inject::{Injection, SCRATCH_LEN};
use crate::cr::procfs::{self, Mapping};

/// Bytes written to the process at once.
const WRITE_CHUNK: u64 = 1 << 20;
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
    inj.syscall(
        "mmap",
        libc::SYS_mmap,
        &[
            scratch,
            SCRATCH_LEN,
            (libc::PROT_READ | libc::PROT_WRITE) as u64,
            (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE) as u64,
            u64::MAX,
            0,
        ],
    )?;

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
    let index = dump.page_index();
    let mut pages: Vec<(u64, PageRef)> = index.iter().map(|(a, p)| (*a, *p)).collect();
    pages.sort_unstable_by_key(|(a, _)| *a);
    let base_index = base.map(|b| page_index(&b.manifest().runs));
    let mut writes: Vec<(u64, PageRef)> = Vec::new();
    let mut drop_pages = Vec::new();
    for r in kept.iter().filter(|r| !r.shared) {
        let private = private_pages(&pagemap, r.start, r.end)
            .map_err(|e| mem_err(pid, format!("read the page map at {:#x}", r.start), e))?;
        drop_pages.extend(private.iter().filter(|a| !index.contains_key(a)));
        let private: HashSet<u64> = private.into_iter().collect();
        // Pages both have, without a base dump to say what the child's hold: read.
        let mut compare = Vec::new();
        for &(addr, p) in in_range(&pages, r.start, r.end) {
            if private.contains(&addr) {
                match base_index.as_ref().and_then(|b| b.get(&addr)) {
                    Some(b) if b.hash == p.hash => {}
                    Some(_) => writes.push((addr, p)),
                    None => compare.push((addr, p)),
                }
            } else if !(p.at.is_none() && r.anonymous) {
                writes.push((addr, p));
            }
        }
        writes.extend(differing(pid, &mem, &compare)?);
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

/// Writes `writes` (sorted) into the process, contiguous pages at once, reading
/// contiguous stored pages at once.
pub(crate) fn write_pages(
    pid: i32,
    mem: &File,
    dump: &Dump,
    writes: &[(u64, PageRef)],
) -> Result<(), CrError> {
    if writes.is_empty() {
        return Ok(());
    }
    let files = dump.chain_files()?;
    let mut buf: Vec<u8> = Vec::with_capacity(WRITE_CHUNK as usize);
    let mut i = 0;
    while i < writes.len() {
        // One span of contiguous addresses, at most WRITE_CHUNK bytes.
        let start = writes[i].0;
        let mut j = i + 1;
        while j < writes.len()
            && writes[j].0 == start + (j - i) as u64 * PAGE
            && ((j - i + 1) as u64) * PAGE <= WRITE_CHUNK
        {
            j += 1;
        }
        buf.clear();
        buf.resize((j - i) * PAGE as usize, 0);
        // Within it, pages stored contiguously in one file are read at once.
        let mut k = i;
        while k < j {
            let Some((src, off)) = writes[k].1.at else {
                k += 1;
                continue;
            };
            let mut l = k + 1;
            while l < j && writes[l].1.at == Some((src, off + (l - k) as u64 * PAGE)) {
                l += 1;
            }
            let file = files.get(src as usize).ok_or_else(|| DumpError::Io {
                dir: dump.dir().to_path_buf(),
                what: format!("its index names chain file {src}, which it does not list"),
                source: io::ErrorKind::InvalidData.into(),
            })?;
            let at = (k - i) * PAGE as usize;
            let len = (l - k) * PAGE as usize;
            let dir = dump
                .dir()
                .parent()
                .unwrap_or(dump.dir())
                .join(&dump.manifest().chain[src as usize]);
            read_pages(file, &dir, off, &mut buf[at..at + len])?;
            k = l;
        }
        mem.write_all_at(&buf, start)
            .map_err(|e| mem_err(pid, format!("write {} pages at {start:#x}", j - i), e))?;
        i = j;
    }
    Ok(())
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
