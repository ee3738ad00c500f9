//! Incremental dumps: a template's state on disk, so that a checkpoint outlives its
//! template (docs/deltacr.md, "Dumps and the fallback restore").
//!
//! A dump is a directory `<dumps root>/<name>` holding `manifest.json` ([`Manifest`]:
//! the recorded [`ProcessState`], the memory map, and an index of the private pages)
//! and `pages`, 4 KiB pages concatenated. It is incremental against a parent dump: a
//! page whose hash equals the parent's page at the same address is not written again,
//! the index points into the parent's (or an older dump's) `pages` file instead.
//! All-zero pages are not stored at all.
//!
//! - [`write`]: writing a template's dump ([`write::dump_template`]);
//! - [`apply`]: the fallback restore, making a fork of another template equal to a
//!   dump ([`Template::restore_from_dump`](super::Template::restore_from_dump));
//! - `pages`: writing dumped pages into a process (`process_vm_writev`);
//! - [`worker`]: the background thread that writes dumps off the checkpoint's path.

pub mod apply;
pub(crate) mod frames;
pub(crate) mod pages;
pub mod worker;
pub mod write;

use std::collections::HashMap;
use std::fs::File;
use std::hash::Hasher as _;
use std::io;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::ProcessState;
use super::carried::MmLayout;

pub use worker::{DumpPolicy, DumpWorker};
pub use write::{DumpOptions, dump_template, dump_template_against};

/// Version of the manifest's format.
pub const DUMP_VERSION: u32 = 1;
/// The manifest's file name in a dump directory.
pub const MANIFEST: &str = "manifest.json";
/// The pages file's name in a dump directory.
pub const PAGES: &str = "pages";
/// Bytes per page.
pub const PAGE: u64 = 4096;

/// `/proc/<pid>/pagemap`: the page is present in memory.
pub(crate) const PM_PRESENT: u64 = 1 << 63;
/// The page is swapped out (only anonymous pages are).
pub(crate) const PM_SWAPPED: u64 = 1 << 62;
/// The page is a page of the file (or shared anonymous), not a private copy.
pub(crate) const PM_FILE: u64 = 1 << 61;

/// Errors of dumping and of restoring from a dump, naming the dump, process or path.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    /// Reading or writing a dump's files failed.
    #[error("dump {}: {what}", dir.display())]
    Io {
        /// The dump directory.
        dir: PathBuf,
        /// What was done.
        what: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A manifest could not be parsed or written.
    #[error("dump {}: its manifest", dir.display())]
    Manifest {
        /// The dump directory.
        dir: PathBuf,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },
    /// A manifest of another version.
    #[error("dump {}: manifest version {found}, this controller reads {DUMP_VERSION}", dir.display())]
    Version {
        /// The dump directory.
        dir: PathBuf,
        /// The version found.
        found: u32,
    },
    /// Reading or writing a process's memory, page map or maps failed.
    #[error("pid {pid}: {what}")]
    Memory {
        /// The process (a template being dumped, or a process being restored).
        pid: i32,
        /// What was done, with the address.
        what: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The template died while it was dumped: the dump is not written.
    #[error("template {pid} died while it was dumped")]
    TemplateGone {
        /// The template.
        pid: i32,
    },
    /// The process forked for a fallback restore has its vdso elsewhere than the
    /// dumped process (a template of another program run).
    #[error(
        "pid {pid} has its [vdso] at {found:#x}, the dump {} at {dumped:#x}: DeltaCR does \
         not move a vdso, so the dump needs a template of the same program run",
        dir.display()
    )]
    VdsoMoved {
        /// The forked process.
        pid: i32,
        /// The dump.
        dir: PathBuf,
        /// Where the process has it.
        found: u64,
        /// Where the dump has it.
        dumped: u64,
    },
    /// No free address range for the restore's scratch page.
    #[error("pid {pid}: no free address range for a scratch page")]
    NoScratchRoom {
        /// The process.
        pid: i32,
    },
}

/// One mapping of the dumped process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DumpVma {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// `rwxp`-style permissions, as `/proc/<pid>/maps` shows them.
    pub perms: String,
    /// Offset into the file.
    pub offset: u64,
    /// Inode of the file (0: anonymous).
    pub inode: u64,
    /// The name `/proc/<pid>/maps` gave (`[heap]`, `[stack]`, a path, empty).
    pub name: String,
    /// For a file mapping, the file as the process names it in its own root (the
    /// sandbox prefix stripped), to reopen it in a restored process.
    pub file: Option<PathBuf>,
}

impl DumpVma {
    /// Anonymous memory (no file behind it).
    pub fn is_anonymous(&self) -> bool {
        self.file.is_none()
    }

    /// A shared mapping (only read-only ones are checkpointed).
    pub fn is_shared(&self) -> bool {
        self.perms.as_bytes().get(3) == Some(&b's')
    }

    /// The `PROT_*` bits.
    pub fn prot(&self) -> i32 {
        super::procfs::prot_of(self.perms.as_bytes())
    }

    /// Same range, permissions and backing (file, offset, inode): a fork holding this
    /// mapping can keep it, only its pages may differ.
    pub fn same_mapping(&self, other: &Self) -> bool {
        self.start == other.start
            && self.end == other.end
            && self.perms == other.perms
            && self.offset == other.offset
            && self.inode == other.inode
            && self.file == other.file
            && (self.name == "[heap]") == (other.name == "[heap]")
    }
}

/// Contiguous private pages of the dumped process, stored contiguously in one pages
/// file (or all zero).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRun {
    /// Address of the first page.
    pub start: u64,
    /// Index in [`Manifest::chain`] of the dump whose `pages` file holds them; `None`:
    /// all-zero pages, not stored.
    pub src: Option<u32>,
    /// Byte offset of the first page in that file.
    pub offset: u64,
    /// One hash per page (SipHash-1-3 of its 4096 bytes).
    pub hashes: Vec<u64>,
}

/// What a dump cost.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DumpStats {
    /// Private pages of the process (all of its memory that is not a file's).
    pub pages: u64,
    /// Of them, stored in this dump's `pages` file (new or changed since the parent).
    pub written: u64,
    /// Of them, all zero (not stored).
    pub zero: u64,
    /// Of them, known to be the parent's by their page frame ([`dump_template_against`]):
    /// taken from the parent dump without being read.
    #[serde(default)]
    pub unchanged: u64,
    /// Milliseconds the dump took.
    pub ms: f64,
}

/// A dump's `manifest.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`DUMP_VERSION`].
    pub version: u32,
    /// This dump's directory name.
    pub name: String,
    /// The dump this one is incremental against.
    pub parent: Option<String>,
    /// Dump directory names (siblings of this one) whose `pages` files the runs refer
    /// to; the first is this dump.
    pub chain: Vec<String>,
    /// The recorded registers, fds, threads and signal state.
    pub state: ProcessState,
    /// The template's scratch page (its own, not the process's: not restored).
    pub scratch: u64,
    /// The `[vdso]` range (a restore by fork needs a template with its vdso there; a
    /// restore into a fresh process moves the vdso there).
    pub vdso: Option<(u64, u64)>,
    /// The hash ([`page_hash`]) of the `[vdso]`'s bytes: a restore into a fresh process
    /// needs the same vdso (the same kernel), whose functions the program has pointers
    /// to. `None` in dumps written before it was recorded.
    #[serde(default)]
    pub vdso_hash: Option<u64>,
    /// The memory layout fields of the process ([`MmLayout`]), for a restore into a
    /// fresh process. `None` in dumps written before it was recorded, or when it could
    /// not be read (the dump still serves restores by fork).
    #[serde(default)]
    pub mm: Option<MmLayout>,
    /// The mappings, specials (`[vdso]`, `[vvar]`, `[vsyscall]`) and the scratch page
    /// left out.
    pub vmas: Vec<DumpVma>,
    /// The private pages.
    pub runs: Vec<PageRun>,
    /// What it cost.
    pub stats: DumpStats,
}

/// Where one private page's bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRef {
    /// Its hash.
    pub hash: u64,
    /// Index in the chain and byte offset; `None`: zero.
    pub at: Option<(u32, u64)>,
}

/// A dump opened for reading.
#[derive(Debug)]
pub struct Dump {
    dir: PathBuf,
    manifest: Manifest,
}

impl Dump {
    /// Opens the dump `root/name` (its manifest must exist: a dump is complete once it
    /// has one).
    pub fn open(root: &Path, name: &str) -> Result<Self, DumpError> {
        let dir = root.join(name);
        let text = std::fs::read(dir.join(MANIFEST)).map_err(|source| DumpError::Io {
            dir: dir.clone(),
            what: "reading its manifest".to_owned(),
            source,
        })?;
        let manifest: Manifest =
            serde_json::from_slice(&text).map_err(|source| DumpError::Manifest {
                dir: dir.clone(),
                source,
            })?;
        if manifest.version != DUMP_VERSION {
            return Err(DumpError::Version {
                dir,
                found: manifest.version,
            });
        }
        Ok(Self { dir, manifest })
    }

    /// Whether a complete dump `root/name` exists.
    pub fn exists(root: &Path, name: &str) -> bool {
        root.join(name).join(MANIFEST).is_file()
    }

    /// The dump's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Its manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The recorded process state.
    pub fn state(&self) -> &ProcessState {
        &self.manifest.state
    }

    /// Every private page by address.
    pub fn page_index(&self) -> HashMap<u64, PageRef> {
        page_index(&self.manifest.runs)
    }

    /// Every private page, sorted by address (what [`Self::page_index`] holds, without
    /// a hash table: the restore walks it in order).
    pub fn sorted_pages(&self) -> Vec<(u64, PageRef)> {
        sorted_pages(&self.manifest.runs)
    }

    /// Opens the `pages` files of the chain, in chain order.
    pub fn chain_files(&self) -> Result<Vec<File>, DumpError> {
        let root = self.dir.parent().unwrap_or(Path::new("/"));
        self.manifest
            .chain
            .iter()
            .map(|name| {
                let path = root.join(name).join(PAGES);
                File::open(&path).map_err(|source| DumpError::Io {
                    dir: root.join(name),
                    what: format!("opening {}", path.display()),
                    source,
                })
            })
            .collect()
    }

    /// Bytes of this dump's own `pages` file.
    pub fn own_bytes(&self) -> u64 {
        std::fs::metadata(self.dir.join(PAGES)).map_or(0, |m| m.len())
    }
}

/// Every page of `runs` by address.
pub fn page_index(runs: &[PageRun]) -> HashMap<u64, PageRef> {
    let mut index = HashMap::new();
    for run in runs {
        for (i, hash) in run.hashes.iter().enumerate() {
            let i = i as u64;
            index.insert(
                run.start + i * PAGE,
                PageRef {
                    hash: *hash,
                    at: run.src.map(|s| (s, run.offset + i * PAGE)),
                },
            );
        }
    }
    index
}

/// Every page of `runs` sorted by address (a page listed twice: the last run's, as in
/// [`page_index`]).
pub fn sorted_pages(runs: &[PageRun]) -> Vec<(u64, PageRef)> {
    let mut out: Vec<(u64, PageRef)> =
        Vec::with_capacity(runs.iter().map(|r| r.hashes.len()).sum());
    for run in runs {
        for (i, hash) in run.hashes.iter().enumerate() {
            let i = i as u64;
            out.push((
                run.start + i * PAGE,
                PageRef {
                    hash: *hash,
                    at: run.src.map(|s| (s, run.offset + i * PAGE)),
                },
            ));
        }
    }
    // Dumps write their runs in address order: sorting is a check, and stable so that
    // the last of equal addresses stays last.
    if !out.is_sorted_by_key(|(a, _)| *a) {
        out.sort_by_key(|(a, _)| *a);
    }
    let mut dedup: Vec<(u64, PageRef)> = Vec::with_capacity(out.len());
    for (addr, page) in out {
        match dedup.last_mut() {
            Some(last) if last.0 == addr => last.1 = page,
            _ => dedup.push((addr, page)),
        }
    }
    dedup
}

/// The hash of one page.
pub fn page_hash(page: &[u8]) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    h.write(page);
    h.finish()
}

/// Whether a page is all zero.
pub fn is_zero(page: &[u8]) -> bool {
    // An OR over each 64-byte block (which the compiler vectorises), stopping at the
    // first block that is not zero.
    page.chunks(64)
        .all(|block| block.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// The private pages (written since mapped: anonymous memory, private copies of file
/// pages) of `[start, end)` in a page map, by address. Present-and-not-file, or
/// swapped.
pub(crate) fn private_pages(pagemap: &File, start: u64, end: u64) -> io::Result<Vec<u64>> {
    let pages = (end - start) / PAGE;
    let mut out = Vec::new();
    // In chunks, not one buffer of 8 bytes per page of a huge reservation.
    let chunk = 32 * 1024u64;
    let mut first = 0;
    while first < pages {
        let n = chunk.min(pages - first);
        let mut raw = vec![0u8; (n * 8) as usize];
        pagemap.read_exact_at(&mut raw, (start / PAGE + first) * 8)?;
        for (i, entry) in raw.chunks_exact(8).enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(entry);
            let e = u64::from_ne_bytes(b);
            if e & PM_SWAPPED != 0 || e & (PM_PRESENT | PM_FILE) == PM_PRESENT {
                out.push(start + (first + i as u64) * PAGE);
            }
        }
        first += n;
    }
    Ok(out)
}

/// Mappings the kernel places and a restore never touches.
pub(crate) fn is_special(name: &str) -> bool {
    matches!(
        name,
        "[vdso]" | "[vvar]" | "[vvar_vclock]" | "[vsyscall]" | "[uprobes]"
    )
}

/// A file mapping's path as the process names it in its own root: `/sb/<sandbox>/x`
/// (how the controller reads a sandbox's view in `/proc`) becomes `/x`; with a
/// `root_prefix`, that prefix is stripped instead. `None` for anonymous memory and
/// pseudo-paths.
pub(crate) fn file_in_root(name: &str, root_prefix: Option<&Path>) -> Option<PathBuf> {
    if !name.starts_with('/') {
        return None;
    }
    let name = name.strip_suffix(" (deleted)").unwrap_or(name);
    let path = Path::new(name);
    if let Some(prefix) = root_prefix
        && let Ok(rest) = path.strip_prefix(prefix)
    {
        return Some(Path::new("/").join(rest));
    }
    let mut parts = path.components();
    parts.next();
    match (parts.next(), parts.next()) {
        (Some(std::path::Component::Normal(sb)), Some(std::path::Component::Normal(_)))
            if sb == "sb" =>
        {
            Some(Path::new("/").join(parts.as_path()))
        }
        _ => Some(path.to_path_buf()),
    }
}

/// The dump name of a node's session.
pub fn dump_name(node: &str, session: &str) -> String {
    format!("{node}-{session}")
}

/// The dump name of a node's other process (a background job, a session's child), by
/// the host pid it had at the checkpoint (unique in its node; a session id never starts
/// with `pid`).
pub fn process_dump_name(node: &str, pid: i32) -> String {
    format!("{node}-pid{pid}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_pages_are_recognised() {
        let mut page = vec![0u8; PAGE as usize];
        assert!(is_zero(&page));
        page[4095] = 1;
        assert!(!is_zero(&page));
        assert!(!is_zero(&page[1..]));
    }

    #[test]
    fn files_are_named_in_the_process_root() {
        assert_eq!(
            file_in_root("/sb/abc/usr/lib/libc.so.6", None),
            Some(PathBuf::from("/usr/lib/libc.so.6"))
        );
        assert_eq!(
            file_in_root("/x/y", Some(Path::new("/x"))),
            Some(PathBuf::from("/y"))
        );
        assert_eq!(
            file_in_root("/usr/bin/python3", None),
            Some(PathBuf::from("/usr/bin/python3"))
        );
        assert_eq!(file_in_root("[heap]", None), None);
    }

    #[test]
    fn vmas_compare_by_backing() {
        let a = DumpVma {
            start: 0x1000,
            end: 0x3000,
            perms: "rw-p".into(),
            offset: 0,
            inode: 0,
            name: String::new(),
            file: None,
        };
        let mut b = a.clone();
        assert!(a.same_mapping(&b));
        b.perms = "r--p".into();
        assert!(!a.same_mapping(&b));
        assert_eq!(a.prot(), libc::PROT_READ | libc::PROT_WRITE);
        assert!(a.is_anonymous() && !a.is_shared());
    }

    #[test]
    fn page_index_expands_runs() {
        let mut page = vec![0u8; PAGE as usize];
        page[0] = 7;
        let h = page_hash(&page);
        assert_ne!(h, page_hash(&vec![0u8; PAGE as usize]));
        let runs = [
            PageRun {
                start: 0x1000,
                src: Some(1),
                offset: 8192,
                hashes: vec![h, h],
            },
            PageRun {
                start: 0x9000,
                src: None,
                offset: 0,
                hashes: vec![0],
            },
        ];
        let index = page_index(&runs);
        assert_eq!(index[&0x2000].at, Some((1, 12288)));
        assert_eq!(index[&0x9000].at, None);
        let sorted = sorted_pages(&runs);
        assert_eq!(
            sorted.iter().map(|(a, _)| *a).collect::<Vec<_>>(),
            vec![0x1000, 0x2000, 0x9000]
        );
        assert!(sorted.iter().all(|(a, p)| index[a] == *p));
        // Out of order runs are sorted.
        let reversed: Vec<PageRun> = runs.iter().rev().cloned().collect();
        assert_eq!(sorted_pages(&reversed), sorted);
    }
}
