//! Writing dumped pages into a process: the last step of a fallback restore and of a
//! restore into a husk.
//!
//! The pages go in batches of up to [`BATCH_BYTES`]: the batch's stored pages are read
//! from the chain's `pages` files into one buffer, a `pread` per run of pages stored
//! contiguously, and written with one `process_vm_writev` whose remote side is the
//! batch's runs of contiguous addresses (up to [`IOV_MAX`]). A few syscalls for
//! thousands of pages, and the buffer stays in the CPU's cache. (Mapping the `pages`
//! files and handing the mapping to `process_vm_writev` instead, one copy less, was
//! 10-20 % faster for a fallback restore but 1.3-1.7x slower for a restore into a husk,
//! and needs an `unsafe` mapping type: see docs/deltacr.md.) `process_vm_writev`
//! honours the process's page protections, so a run it refuses (a private copy in a
//! read-only mapping: relocations, a patched text page) is written through
//! `/proc/<pid>/mem` instead, which may write there (`FOLL_FORCE`).

use std::fs::File;
use std::io::IoSlice;
use std::os::unix::fs::FileExt as _;

use nix::errno::Errno;
use nix::sys::uio::{RemoteIoVec, process_vm_writev};
use nix::unistd::Pid;

use super::{Dump, DumpError, PAGE, PageRef};
use crate::cr::CrError;

/// Most remote iovecs one `process_vm_writev` takes.
const IOV_MAX: usize = 1024;
/// Bytes written per batch (the buffer's size).
const BATCH_BYTES: usize = 1 << 20;

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
    let files = dump.chain_files()?;
    let mut buf = vec![0u8; BATCH_BYTES];
    let mut rest = writes;
    while !rest.is_empty() {
        // The batch: as many pages as fit the buffer and the remote iovecs.
        let mut remote: Vec<RemoteIoVec> = Vec::new();
        let mut taken = 0;
        for &(addr, _) in rest {
            if taken * PAGE as usize == BATCH_BYTES {
                break;
            }
            let full = remote.len() == IOV_MAX;
            match remote.last_mut() {
                Some(r) if r.base as u64 + r.len as u64 == addr => r.len += PAGE as usize,
                _ if full => break,
                _ => remote.push(RemoteIoVec {
                    base: addr as usize,
                    len: PAGE as usize,
                }),
            }
            taken += 1;
        }
        let batch = &rest[..taken];
        let bytes = &mut buf[..taken * PAGE as usize];
        // Its pages, runs stored contiguously in one file read at once.
        let mut k = 0;
        while k < taken {
            let at = k * PAGE as usize;
            let Some((src, off)) = batch[k].1.at else {
                bytes[at..at + PAGE as usize].fill(0);
                k += 1;
                continue;
            };
            let mut l = k + 1;
            while l < taken && batch[l].1.at == Some((src, off + (l - k) as u64 * PAGE)) {
                l += 1;
            }
            let name = chain.get(src as usize);
            let file = files.get(src as usize).ok_or_else(|| DumpError::Io {
                dir: dump.dir().to_path_buf(),
                what: format!("its index names chain file {src}, which it does not list"),
                source: std::io::ErrorKind::InvalidData.into(),
            })?;
            let len = (l - k) * PAGE as usize;
            file.read_exact_at(&mut bytes[at..at + len], off)
                .map_err(|source| DumpError::Io {
                    dir: root.join(name.map_or("", String::as_str)),
                    what: format!("reading {len} bytes of pages at {off}"),
                    source,
                })?;
            k = l;
        }
        let done = match process_vm_writev(Pid::from_raw(pid), &[IoSlice::new(bytes)], &remote) {
            Ok(n) => n / PAGE as usize,
            // The first run refused.
            Err(Errno::EFAULT) => 0,
            Err(e) => {
                return Err(DumpError::Memory {
                    pid,
                    what: format!("process_vm_writev of {taken} pages from {:#x}", rest[0].0),
                    source: e.into(),
                }
                .into());
            }
        };
        if done >= taken {
            rest = &rest[taken..];
            continue;
        }
        // Refused at page `done` (runs are whole pages: a short write stops at a page
        // boundary): the rest of its run of addresses through /proc/<pid>/mem, then
        // process_vm_writev again from the next page.
        let mut end = done + 1;
        while end < taken && batch[end].0 == batch[end - 1].0 + PAGE {
            end += 1;
        }
        let (from, to) = (done * PAGE as usize, end * PAGE as usize);
        mem.write_all_at(&bytes[from..to], batch[done].0)
            .map_err(|source| DumpError::Memory {
                pid,
                what: format!("write {} pages at {:#x}", end - done, batch[done].0),
                source,
            })?;
        rest = &rest[end..];
    }
    Ok(())
}
