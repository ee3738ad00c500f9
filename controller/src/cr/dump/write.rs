//! Writing a template's dump.
//!
//! The template is stopped and frozen, so its memory is the checkpoint's and does not
//! change while it is read (`/proc/<pid>/mem`, which needs no ptrace stop). Its private
//! pages are found in `/proc/<pid>/pagemap` (present and not a file's page, or
//! swapped), hashed, and compared with the parent dump's page at the same address:
//! only new or changed pages go into this dump's `pages` file. Given the parent
//! node's live template (the one the parent dump was made from), a page whose frame
//! is that template's at the same address is the parent's page: its entry is taken
//! from the parent dump, unread and unhashed ([`super::frames`]), so a dump reads
//! only the pages written since the parent checkpoint. The dump is written in
//! a temporary directory and renamed into place once complete, so a dump that has a
//! manifest is whole.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{BufWriter, Write as _};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::frames::{BaseFrames, read_frames};
use super::{
    DUMP_VERSION, Dump, DumpError, DumpStats, DumpVma, MANIFEST, Manifest, PAGE, PAGES, PageRef,
    PageRun, file_in_root, is_special, is_zero, page_hash, private_pages,
};
use crate::cr::inject::SCRATCH_LEN;
use crate::cr::procfs::{self, Mapping};
use crate::cr::{CrError, Template};

/// Where a dump goes and what it is incremental against.
#[derive(Clone, Debug)]
pub struct DumpOptions {
    /// The directory holding every dump (`<data dir>/dumps`).
    pub root: PathBuf,
    /// This dump's name (a directory under `root`).
    pub name: String,
    /// The dump this one is incremental against, if it exists (a sibling's name).
    pub parent: Option<String>,
    /// The process's root as the controller reads paths in `/proc/<pid>/maps` (the
    /// checkpoint's [`crate::cr::CheckpointOptions::root_prefix`]).
    pub root_prefix: Option<PathBuf>,
}

/// Pages read from the template at once.
const READ_PAGES: u64 = 256;

/// Writes the dump of `template` (see the module's comment), reading all its pages.
/// Returns what it cost.
pub fn dump_template(template: &Template, opts: &DumpOptions) -> Result<DumpStats, CrError> {
    dump_template_against(template, opts, None)
}

/// [`dump_template`], given `base`: the live template the parent dump
/// (`opts.parent`) was made from. Pages `template` shares with it are taken from the
/// parent dump without being read. If `base` dies during the dump, the dump is made
/// again reading every page (its frames could since belong to other pages).
pub fn dump_template_against(
    template: &Template,
    opts: &DumpOptions,
    base: Option<&Template>,
) -> Result<DumpStats, CrError> {
    let base = base
        .filter(|_| opts.parent.is_some())
        .and_then(BaseFrames::open);
    let stats = write_dump(template, opts, base.as_ref())?;
    match base {
        Some(b) if !b.still_alive() => {
            tracing::debug!(dump = %opts.name, "the base template died during the dump: again, reading every page");
            write_dump(template, opts, None)
        }
        _ => Ok(stats),
    }
}

fn write_dump(
    template: &Template,
    opts: &DumpOptions,
    base: Option<&BaseFrames<'_>>,
) -> Result<DumpStats, CrError> {
    let start = Instant::now();
    let pid = template.pid().as_raw();
    let maps = procfs::maps(pid)?;
    let vdso = procfs::vdso(&maps);
    let vdso_hash = vdso.and_then(|(start, end)| vdso_hash(pid, start, end));
    let mm = match crate::cr::carried::mm_layout(pid) {
        Ok(mm) => Some(mm),
        Err(e) => {
            tracing::warn!(
                dump = %opts.name, pid,
                "the dump records no memory layout (a restore into a fresh process will \
                 refuse it): {e}"
            );
            None
        }
    };
    let mut state = template.state().clone();
    if state.handlers.is_none() {
        // At normal priority while the template is held: a restore waits for it.
        match super::worker::at_normal_priority(|| template.record_handlers()) {
            Ok(handlers) => state.handlers = Some(handlers),
            Err(e) => tracing::warn!(
                dump = %opts.name, pid,
                "the dump records no signal handlers (a restore into a fresh process will \
                 refuse it): {e}"
            ),
        }
    }
    let scratch = template.scratch();
    let vmas = dump_vmas(
        &maps,
        Some((scratch, scratch + SCRATCH_LEN)),
        opts.root_prefix.as_deref(),
    );

    let parent = match &opts.parent {
        Some(name) if Dump::exists(&opts.root, name) => Some(Dump::open(&opts.root, name)?),
        _ => None,
    };
    let parent_index = parent.as_ref().map(Dump::page_index).unwrap_or_default();

    let final_dir = opts.root.join(&opts.name);
    let tmp = opts.root.join(format!(".tmp-{}", opts.name));
    let io_err = |what: &str, source| DumpError::Io {
        dir: final_dir.clone(),
        what: what.to_owned(),
        source,
    };
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).map_err(|e| io_err("creating its directory", e))?;
    let written = (|| {
        let pages_file = File::create(tmp.join(PAGES)).map_err(|e| io_err("creating pages", e))?;
        let mut out = BufWriter::with_capacity(1 << 20, pages_file);
        let mem = File::open(format!("/proc/{pid}/mem"))
            .map_err(|source| mem_err(pid, "open /proc/<pid>/mem", source))?;
        let pagemap = File::open(format!("/proc/{pid}/pagemap"))
            .map_err(|source| mem_err(pid, "open /proc/<pid>/pagemap", source))?;

        let mut builder = RunBuilder::new(opts.name.clone());
        let mut stats = DumpStats::default();
        let mut own_offset = 0u64;
        let mut buf = vec![0u8; (READ_PAGES * PAGE) as usize];
        let parent_chain = parent.as_ref().map(|p| p.manifest().chain.as_slice());
        for vma in vmas.iter().filter(|v| !v.is_shared()) {
            let private = private_pages(&pagemap, vma.start, vma.end).map_err(|source| {
                mem_err(
                    pid,
                    &format!("read the page map of {:#x}-{:#x}", vma.start, vma.end),
                    source,
                )
            })?;
            for (first, count) in spans(&private) {
                let same = base.map_or_else(Vec::new, |b| same_frames(&pagemap, b, first, count));
                // The parent dump's entry of the `i`th page, if that page is the parent's.
                let unchanged = |i: u64| {
                    (same.get(i as usize) == Some(&true))
                        .then(|| parent_index.get(&(first + i * PAGE)))
                        .flatten()
                };
                let mut done = 0;
                while done < count {
                    let addr = first + done * PAGE;
                    if let Some(entry) = unchanged(done) {
                        // The parent's own page: its entry, unread.
                        stats.pages += 1;
                        stats.unchanged += 1;
                        if entry.at.is_none() {
                            stats.zero += 1;
                        }
                        builder.push_parent(addr, entry, parent_chain);
                        done += 1;
                        continue;
                    }
                    // Each read waits for the state operations running (a restore of
                    // another template, say): they go first.
                    crate::foreground::yield_to_operations(crate::foreground::BACKGROUND_WAIT);
                    // A run of pages to read: up to the next unchanged one.
                    let mut n = 1;
                    while done + n < count && n < READ_PAGES && unchanged(done + n).is_none() {
                        n += 1;
                    }
                    let chunk = &mut buf[..(n * PAGE) as usize];
                    mem.read_exact_at(chunk, addr).map_err(|source| {
                        mem_err(pid, &format!("read {n} pages at {addr:#x}"), source)
                    })?;
                    for (i, page) in chunk.chunks_exact(PAGE as usize).enumerate() {
                        let at = addr + i as u64 * PAGE;
                        stats.pages += 1;
                        if is_zero(page) {
                            stats.zero += 1;
                            builder.push(at, page_hash(page), None);
                            continue;
                        }
                        let hash = page_hash(page);
                        match parent_index.get(&at) {
                            Some(entry @ PageRef { at: Some(_), .. }) if entry.hash == hash => {
                                builder.push_parent(at, entry, parent_chain);
                            }
                            _ => {
                                out.write_all(page)
                                    .map_err(|e| io_err("writing pages", e))?;
                                builder.push(at, hash, Some((0, own_offset)));
                                own_offset += PAGE;
                                stats.written += 1;
                            }
                        }
                    }
                    done += n;
                }
            }
        }
        out.flush().map_err(|e| io_err("writing pages", e))?;
        // The template's memory is what was read only if it is still the same process.
        if template.pidfd.wait_exit(Duration::ZERO).unwrap_or(true) {
            return Err(DumpError::TemplateGone { pid }.into());
        }
        stats.ms = start.elapsed().as_secs_f64() * 1e3;
        let (chain, runs) = builder.finish();
        let manifest = Manifest {
            version: DUMP_VERSION,
            name: opts.name.clone(),
            parent: parent.as_ref().map(|p| p.manifest().name.clone()),
            chain,
            state,
            scratch: template.scratch(),
            vdso,
            vdso_hash,
            mm,
            vmas,
            runs,
            stats: stats.clone(),
        };
        let json = serde_json::to_vec(&manifest).map_err(|source| DumpError::Manifest {
            dir: final_dir.clone(),
            source,
        })?;
        fs::write(tmp.join(MANIFEST), json).map_err(|e| io_err("writing its manifest", e))?;
        let _ = fs::remove_dir_all(&final_dir);
        fs::rename(&tmp, &final_dir).map_err(|e| io_err("moving it into place", e))?;
        Ok::<_, CrError>(stats)
    })();
    if written.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    written
}

/// For each of `count` pages from `first`: whether the template's frame there is
/// `base`'s (both present, private, known). Empty (nothing known) if either page map
/// cannot be read.
fn same_frames(pagemap: &File, base: &BaseFrames<'_>, first: u64, count: u64) -> Vec<bool> {
    let (Ok(mine), Some(theirs)) = (
        read_frames(pagemap, first, count),
        base.frames(first, count),
    ) else {
        return Vec::new();
    };
    mine.iter()
        .zip(&theirs)
        .map(|(a, b)| a.is_some() && a == b)
        .collect()
}

/// The hash of the bytes of the `[vdso]` at `start..end` of `pid` (`None` if unreadable).
pub(crate) fn vdso_hash(pid: i32, start: u64, end: u64) -> Option<u64> {
    let mut code = vec![0u8; usize::try_from(end.checked_sub(start)?).ok()?];
    let mem = File::open(format!("/proc/{pid}/mem")).ok()?;
    mem.read_exact_at(&mut code, start).ok()?;
    Some(page_hash(&code))
}

fn mem_err(pid: i32, what: &str, source: std::io::Error) -> CrError {
    DumpError::Memory {
        pid,
        what: what.to_owned(),
        source,
    }
    .into()
}

/// The process's mappings as a dump records them: specials left out, the template's
/// scratch page (`hole`) cut out (it may have merged with a neighbouring mapping).
pub(crate) fn dump_vmas(
    maps: &[Mapping],
    hole: Option<(u64, u64)>,
    root_prefix: Option<&Path>,
) -> Vec<DumpVma> {
    let hole = hole.unwrap_or((0, 0));
    let mut out = Vec::new();
    for m in maps.iter().filter(|m| !is_special(&m.name)) {
        let vma = DumpVma {
            start: m.start,
            end: m.end,
            perms: String::from_utf8_lossy(&m.perms).into_owned(),
            offset: m.offset,
            inode: m.inode,
            name: m.name.clone(),
            file: if m.inode != 0 {
                file_in_root(&m.name, root_prefix)
            } else {
                None
            },
        };
        out.extend(cut(vma, hole));
    }
    out
}

/// `vma` without the range `hole` (0, 1 or 2 pieces; file offsets follow).
pub(crate) fn cut(vma: DumpVma, hole: (u64, u64)) -> Vec<DumpVma> {
    let (hs, he) = hole;
    if he <= vma.start || hs >= vma.end || hs == he {
        return vec![vma];
    }
    let mut out = Vec::new();
    if vma.start < hs {
        out.push(DumpVma {
            end: hs,
            ..vma.clone()
        });
    }
    if he < vma.end {
        out.push(DumpVma {
            start: he,
            offset: vma.offset + (he - vma.start),
            ..vma
        });
    }
    out
}

/// Sorted page addresses as (first, count) spans of contiguous pages.
pub(crate) fn spans(pages: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &p in pages {
        match out.last_mut() {
            Some((first, count)) if *first + *count * PAGE == p => *count += 1,
            _ => out.push((p, 1)),
        }
    }
    out
}

/// Collects pages into runs and the chain of dumps they refer to.
struct RunBuilder {
    chain: Vec<String>,
    chain_at: HashMap<String, u32>,
    runs: Vec<PageRun>,
}

impl RunBuilder {
    fn new(own: String) -> Self {
        let mut chain_at = HashMap::new();
        chain_at.insert(own.clone(), 0);
        Self {
            chain: vec![own],
            chain_at,
            runs: Vec::new(),
        }
    }

    fn chain_index(&mut self, name: &str) -> u32 {
        if let Some(&i) = self.chain_at.get(name) {
            return i;
        }
        let i = self.chain.len() as u32;
        self.chain.push(name.to_owned());
        self.chain_at.insert(name.to_owned(), i);
        i
    }

    /// Pushes the page at `addr` as the parent dump's `entry` (whose `src` indexes the
    /// parent's `chain`): where the parent's own page lives, or a zero page.
    fn push_parent(&mut self, addr: u64, entry: &PageRef, parent_chain: Option<&[String]>) {
        let at = entry.at.map(|(src, off)| {
            let name = parent_chain
                .and_then(|c| c.get(src as usize))
                .cloned()
                .unwrap_or_default();
            (self.chain_index(&name), off)
        });
        self.push(addr, entry.hash, at);
    }

    fn push(&mut self, addr: u64, hash: u64, at: Option<(u32, u64)>) {
        if let Some(run) = self.runs.last_mut() {
            let n = run.hashes.len() as u64;
            let follows = run.start + n * PAGE == addr
                && match (run.src, at) {
                    (None, None) => true,
                    (Some(s), Some((src, off))) => s == src && run.offset + n * PAGE == off,
                    _ => false,
                };
            if follows {
                run.hashes.push(hash);
                return;
            }
        }
        self.runs.push(PageRun {
            start: addr,
            src: at.map(|(s, _)| s),
            offset: at.map_or(0, |(_, o)| o),
            hashes: vec![hash],
        });
    }

    fn finish(self) -> (Vec<String>, Vec<PageRun>) {
        (self.chain, self.runs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vma(start: u64, end: u64) -> DumpVma {
        DumpVma {
            start,
            end,
            perms: "rw-p".into(),
            offset: 0x10000,
            inode: 5,
            name: "/x".into(),
            file: Some("/x".into()),
        }
    }

    #[test]
    fn the_scratch_page_is_cut_out() {
        let pieces = cut(vma(0x1000, 0x5000), (0x2000, 0x3000));
        assert_eq!(pieces.len(), 2);
        assert_eq!(
            (pieces[0].start, pieces[0].end, pieces[0].offset),
            (0x1000, 0x2000, 0x10000)
        );
        assert_eq!(
            (pieces[1].start, pieces[1].end, pieces[1].offset),
            (0x3000, 0x5000, 0x12000)
        );
        assert_eq!(
            cut(vma(0x1000, 0x2000), (0x1000, 0x2000)),
            Vec::<DumpVma>::new()
        );
        assert_eq!(cut(vma(0x1000, 0x2000), (0x3000, 0x4000)).len(), 1);
    }

    #[test]
    fn spans_join_contiguous_pages() {
        assert_eq!(
            spans(&[0x1000, 0x2000, 0x4000]),
            vec![(0x1000, 2), (0x4000, 1)]
        );
    }

    #[test]
    fn runs_join_contiguous_pages_of_one_file() {
        let mut b = RunBuilder::new("me".into());
        b.push(0x1000, 1, Some((0, 0)));
        b.push(0x2000, 2, Some((0, 4096)));
        b.push(0x3000, 3, None);
        b.push(0x4000, 4, None);
        let p = b.chain_index("parent");
        b.push(0x5000, 5, Some((p, 0)));
        b.push(0x6000, 6, Some((0, 8192)));
        let (chain, runs) = b.finish();
        assert_eq!(chain, vec!["me".to_owned(), "parent".to_owned()]);
        assert_eq!(runs.len(), 4);
        assert_eq!(runs[0].hashes, vec![1, 2]);
        assert_eq!(runs[1].src, None);
        assert_eq!(runs[2].src, Some(1));
    }
}
