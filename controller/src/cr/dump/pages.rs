//! Writing dumped pages into a process: the last step of a fallback restore and of a
//! restore into a husk.
//!
//! The chain's `pages` files are mapped ([`MappedFile`]) and the pages go to the
//! process with `process_vm_writev`, up to [`IOV_MAX`] contiguous address spans and as
//! many contiguous stored spans per call: one copy, from the page cache into the
//! process's pages, and a few syscalls for thousands of pages. `process_vm_writev`
//! honours the process's page protections, so a page it refuses (a private copy in a
//! read-only mapping: relocations, a patched text page) is written through
//! `/proc/<pid>/mem` instead, which may write there (`FOLL_FORCE`).

use std::fs::File;
use std::io::IoSlice;
use std::os::unix::fs::FileExt as _;

use nix::errno::Errno;
use nix::sys::uio::{RemoteIoVec, process_vm_writev};
use nix::unistd::Pid;

use super::mapped::MappedFile;
use super::{Dump, DumpError, PAGE, PageRef};
use crate::cr::CrError;

/// Most iovecs one `process_vm_writev` takes (each side).
const IOV_MAX: usize = 1024;

/// An all-zero page, the source of the zero pages written.
static ZERO: [u8; PAGE as usize] = [0; PAGE as usize];

/// Writes `writes` (sorted by address) into the process `pid`, whose `/proc/<pid>/mem`
/// is `mem` (opened for writing).
pub(crate) fn write_pages(
    pid: i32,
    mem: &File,
    dump: &Dump,
    writes: &[(u64, PageRef)],
) -> Result<(), CrError> {
    if writes.is_empty() {
        return Ok(());
    }
    let root = dump.dir().parent().unwrap_or(dump.dir());
    let chain = &dump.manifest().chain;
    let maps = dump
        .chain_files()?
        .iter()
        .enumerate()
        .map(|(i, f)| {
            MappedFile::map(f).map_err(|source| DumpError::Io {
                dir: root.join(&chain[i]),
                what: "mapping its pages file".to_owned(),
                source,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let bytes: Vec<&[u8]> = maps.iter().map(MappedFile::bytes).collect();
    let mut batch = Batch::default();
    for &(addr, p) in writes {
        if let Some((src, off)) = p.at
            && bytes
                .get(src as usize)
                .is_none_or(|b| (b.len() as u64) < off + PAGE)
        {
            return Err(DumpError::Io {
                dir: dump.dir().to_path_buf(),
                what: format!(
                    "its page at {addr:#x} is at {off} of chain file {src}, which is shorter \
                     or not listed"
                ),
                source: std::io::ErrorKind::InvalidData.into(),
            }
            .into());
        }
        if !batch.push(addr, p.at) {
            batch.flush(pid, mem, &bytes)?;
            let pushed = batch.push(addr, p.at);
            debug_assert!(pushed, "an empty batch takes a page");
        }
    }
    batch.flush(pid, mem, &bytes)
}

/// Pages for one `process_vm_writev`: the stored spans (chain file, offset, length;
/// `None`: a zero page) and the address spans, each merged where contiguous, and the
/// pages one by one for the fallback.
#[derive(Default)]
struct Batch {
    local: Vec<(Option<u32>, u64, usize)>,
    remote: Vec<RemoteIoVec>,
    pages: Vec<(u64, Option<(u32, u64)>)>,
}

impl Batch {
    /// Adds a page; `false` if the batch is full (a new span would be one too many).
    fn push(&mut self, addr: u64, at: Option<(u32, u64)>) -> bool {
        let joins_local = match (self.local.last(), at) {
            (Some(&(Some(s), off, len)), Some((src, o))) => s == src && off + len as u64 == o,
            // Zero pages never join: the one zero page is repeated.
            _ => false,
        };
        let joins_remote = self
            .remote
            .last()
            .is_some_and(|r| r.base as u64 + r.len as u64 == addr);
        if (!joins_local && self.local.len() == IOV_MAX)
            || (!joins_remote && self.remote.len() == IOV_MAX)
        {
            return false;
        }
        match self.local.last_mut() {
            Some(l) if joins_local => l.2 += PAGE as usize,
            _ => self
                .local
                .push((at.map(|(s, _)| s), at.map_or(0, |(_, o)| o), PAGE as usize)),
        }
        match self.remote.last_mut() {
            Some(r) if joins_remote => r.len += PAGE as usize,
            _ => self.remote.push(RemoteIoVec {
                base: addr as usize,
                len: PAGE as usize,
            }),
        }
        self.pages.push((addr, at));
        true
    }

    /// Writes the batch and empties it; `bytes` are the chain's mapped files (checked
    /// to hold every page pushed).
    fn flush(&mut self, pid: i32, mem: &File, bytes: &[&[u8]]) -> Result<(), CrError> {
        if self.pages.is_empty() {
            return Ok(());
        }
        let slice = |src: Option<u32>, off: u64, len: usize| -> &[u8] {
            match src {
                Some(s) => &bytes[s as usize][off as usize..off as usize + len],
                None => &ZERO,
            }
        };
        let local: Vec<IoSlice<'_>> = self
            .local
            .iter()
            .map(|&(src, off, len)| IoSlice::new(slice(src, off, len)))
            .collect();
        let done = match process_vm_writev(Pid::from_raw(pid), &local, &self.remote) {
            Ok(n) => n,
            // The first span refused (a read-only mapping): all through /proc/<pid>/mem.
            Err(Errno::EFAULT) => 0,
            Err(e) => {
                return Err(DumpError::Memory {
                    pid,
                    what: format!(
                        "process_vm_writev of {} pages from {:#x}",
                        self.pages.len(),
                        self.pages[0].0
                    ),
                    source: e.into(),
                }
                .into());
            }
        };
        // A short write stops at a span boundary, so at a page boundary.
        for &(addr, at) in &self.pages[done / PAGE as usize..] {
            let page = slice(at.map(|(s, _)| s), at.map_or(0, |(_, o)| o), PAGE as usize);
            mem.write_all_at(page, addr)
                .map_err(|source| DumpError::Memory {
                    pid,
                    what: format!("write the page at {addr:#x}"),
                    source,
                })?;
        }
        self.local.clear();
        self.remote.clear();
        self.pages.clear();
        Ok(())
    }
}
