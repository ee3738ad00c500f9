//! What a process's memory costs, from `/proc`: the pages it alone maps and its page
//! tables (a template's cost per checkpoint), its huge pages, and the full-copy
//! baseline: every private page copied into a file, as a full-state dump does.

// Without the `bench-cr` feature only the unit tests use this module.
#![cfg_attr(not(feature = "bench-cr"), allow(dead_code))]

use std::fs::{self, File};
use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};

/// Bytes per page.
const PAGE: u64 = 4096;
/// `/proc/<pid>/pagemap`: present, swapped, file-backed (or shared anonymous).
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;
const PM_FILE: u64 = 1 << 61;
/// Pages read (and written) at once by the full copy.
const COPY_PAGES: u64 = 256;

/// The value, in KiB, of `key:` in `/proc/<pid>/smaps_rollup` or `status` text.
pub fn kib_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(key)?.strip_prefix(':')?;
        rest.trim().strip_suffix("kB")?.trim().parse().ok()
    })
}

/// KiB of pages mapped by `pid` alone (`Private_Clean + Private_Dirty`).
pub fn private_kib(pid: i32) -> Result<u64> {
    let text = read(pid, "smaps_rollup")?;
    Ok(kib_field(&text, "Private_Clean").unwrap_or(0)
        + kib_field(&text, "Private_Dirty").unwrap_or(0))
}

/// KiB of `pid`'s page tables (`VmPTE`).
pub fn page_table_kib(pid: i32) -> Result<u64> {
    Ok(kib_field(&read(pid, "status")?, "VmPTE").unwrap_or(0))
}

/// KiB of `pid`'s anonymous memory in transparent huge pages.
pub fn huge_kib(pid: i32) -> Result<u64> {
    Ok(kib_field(&read(pid, "smaps_rollup")?, "AnonHugePages").unwrap_or(0))
}

fn read(pid: i32, file: &str) -> Result<String> {
    let path = format!("/proc/{pid}/{file}");
    fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))
}

/// The private mappings of `/proc/<pid>/maps` text worth copying: `(start, end)` of
/// each `p` mapping, without `[vsyscall]` (not readable through `/proc/<pid>/mem`).
pub fn private_ranges(maps: &str) -> Vec<(u64, u64)> {
    maps.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (range, perms) = (fields.next()?, fields.next()?);
            if perms.as_bytes().get(3) != Some(&b'p') || line.ends_with("[vsyscall]") {
                return None;
            }
            let (start, end) = range.split_once('-')?;
            Some((
                u64::from_str_radix(start, 16).ok()?,
                u64::from_str_radix(end, 16).ok()?,
            ))
        })
        .collect()
}

/// Runs of private pages (`(first address, pages)`) from the page map entries of the
/// pages from `start` on: present or swapped, and not a file's page.
pub fn private_runs(start: u64, entries: &[u64]) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for (i, &e) in entries.iter().enumerate() {
        if e & (PM_PRESENT | PM_SWAPPED) == 0 || e & PM_FILE != 0 {
            continue;
        }
        let addr = start + i as u64 * PAGE;
        match runs.last_mut() {
            Some((first, n)) if *first + *n * PAGE == addr => *n += 1,
            _ => runs.push((addr, 1)),
        }
    }
    runs
}

/// One full copy: how long, and how much.
#[derive(Clone, Copy, Debug)]
pub struct FullCopy {
    /// Finding and copying the pages into the file (page cache).
    pub copy: Duration,
    /// The `fsync` of the file after it.
    pub fsync: Duration,
    /// Bytes copied.
    pub bytes: u64,
}

/// Copies every private page of each of `pids` (found in its page map, read through
/// `/proc/<pid>/mem`) into a new file `file`, then `fsync`s it; removes the file.
pub fn full_copy(pids: &[i32], file: &Path) -> Result<FullCopy> {
    let start = Instant::now();
    let mut out =
        File::create(file).with_context(|| format!("cannot create {}", file.display()))?;
    let mut bytes = 0;
    let mut buf = vec![0u8; (COPY_PAGES * PAGE) as usize];
    for &pid in pids {
        let maps = read(pid, "maps")?;
        let mem = File::open(format!("/proc/{pid}/mem"))
            .with_context(|| format!("cannot open /proc/{pid}/mem"))?;
        let pagemap = File::open(format!("/proc/{pid}/pagemap"))
            .with_context(|| format!("cannot open /proc/{pid}/pagemap"))?;
        for (vstart, vend) in private_ranges(&maps) {
            let count = ((vend - vstart) / PAGE) as usize;
            let mut raw = vec![0u8; count * 8];
            pagemap
                .read_exact_at(&mut raw, vstart / PAGE * 8)
                .with_context(|| format!("cannot read the page map of pid {pid} at {vstart:#x}"))?;
            let entries: Vec<u64> = raw
                .chunks_exact(8)
                .map(|c| u64::from_ne_bytes(c.try_into().unwrap_or_default()))
                .collect();
            for (first, pages) in private_runs(vstart, &entries) {
                let mut done = 0;
                while done < pages {
                    let n = (pages - done).min(COPY_PAGES);
                    let at = first + done * PAGE;
                    let chunk = &mut buf[..(n * PAGE) as usize];
                    mem.read_exact_at(chunk, at).with_context(|| {
                        format!("cannot read {n} pages of pid {pid} at {at:#x}")
                    })?;
                    out.write_all(chunk)
                        .with_context(|| format!("cannot write {}", file.display()))?;
                    bytes += n * PAGE;
                    done += n;
                }
            }
        }
    }
    let copy = start.elapsed();
    let synced = Instant::now();
    out.sync_all()
        .with_context(|| format!("cannot fsync {}", file.display()))?;
    let fsync = synced.elapsed();
    drop(out);
    fs::remove_file(file).with_context(|| format!("cannot remove {}", file.display()))?;
    Ok(FullCopy { copy, fsync, bytes })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_kib_fields() {
        let text = "Rss:              262400 kB\nPrivate_Clean:        12 kB\n\
                    Private_Dirty:       104 kB\nAnonHugePages:    260096 kB\n";
        assert_eq!(kib_field(text, "Private_Dirty"), Some(104));
        assert_eq!(kib_field(text, "AnonHugePages"), Some(260096));
        assert_eq!(kib_field(text, "Private"), None);
        assert_eq!(kib_field("VmPTE:\t     540 kB\n", "VmPTE"), Some(540));
    }

    #[test]
    fn finds_private_mappings_and_pages() {
        let maps = "00400000-00401000 r-xp 00000000 08:01 12 /usr/bin/python3\n\
                    7f0000000000-7f0000200000 rw-p 00000000 00:00 0 \n\
                    7f0000200000-7f0000201000 rw-s 00000000 00:05 7 /dev/zero (deleted)\n\
                    ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0 [vsyscall]\n";
        assert_eq!(
            private_ranges(maps),
            [(0x400000, 0x401000), (0x7f0000000000, 0x7f0000200000)]
        );
        let entries = [
            PM_PRESENT,
            PM_PRESENT,
            0,
            PM_SWAPPED,
            PM_PRESENT | PM_FILE,
            PM_PRESENT,
        ];
        assert_eq!(
            private_runs(0x1000, &entries),
            [(0x1000, 2), (0x4000, 1), (0x6000, 1)]
        );
    }
}
