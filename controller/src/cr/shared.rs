//! Writable shared file mappings (`mmap(MAP_SHARED)` of a file, with `PROT_WRITE`).
//!
//! A fork shares such a mapping's pages with its parent: a template that kept it would
//! share the live file's pages with the process it was taken from (and its writes after
//! the checkpoint), and every restore would share them with the template. So a
//! checkpoint records each one by path, offset and protection ([`SharedMapping`]),
//! and the template replaces it with an inaccessible anonymous placeholder of the same
//! size (it holds no reference to the file). Each restore maps the file again, by path
//! in the restored process's own root, at the same address (`MAP_FIXED`): processes
//! restored together (a sandbox's) that mapped one file share its pages again, and
//! those are the node's file as the restored sandbox's view has it.
//!
//! Shared mappings that are not a file reachable by path — shared anonymous memory
//! (`/dev/zero (deleted)`), SysV shm, memfds, deleted files — are still refused.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::CrError;
use super::inject::{Batch, InjectError, Injection, SCRATCH_LEN};
use super::procfs::{self, Mapping};

/// One writable shared file mapping at a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedMapping {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// Its `PROT_*` bits.
    pub prot: i32,
    /// Offset into the file.
    pub offset: u64,
    /// The file, relative to the process's root when the checkpoint had a root prefix.
    pub path: PathBuf,
}

/// Whether `name` (a `/proc/<pid>/maps` path) is a file that can be opened again by path.
fn is_reopenable(name: &str) -> bool {
    name.starts_with('/')
        && !name.ends_with(" (deleted)")
        && !name.starts_with("/SYSV")
        && !name.starts_with("/memfd:")
        && !name.starts_with("/dev/zero")
}

/// The writable shared mappings of `pid` (from its `maps`), each a file named relative
/// to `root` when given; refuses, naming the process and the mapping, one that is not a
/// reopenable file or lies outside `root`.
pub fn record(
    pid: i32,
    maps: &[Mapping],
    root: Option<&Path>,
) -> Result<Vec<SharedMapping>, CrError> {
    let mut out = Vec::new();
    for m in maps.iter().filter(|m| m.is_shared_writable()) {
        if !is_reopenable(&m.name) {
            return Err(CrError::SharedWritableMapping {
                pid,
                comm: procfs::comm_or_unknown(pid),
                start: m.start,
                end: m.end,
                name: m.name.clone(),
            });
        }
        let path = PathBuf::from(&m.name);
        let path = match root {
            Some(root) => super::template::under_root(pid, root, &path)?,
            None => path,
        };
        out.push(SharedMapping {
            start: m.start,
            end: m.end,
            prot: m.prot(),
            offset: m.offset,
            path,
        });
    }
    Ok(out)
}

/// For a new template: adds to `batch` the calls that replace each mapping of `shared`
/// by an inaccessible private anonymous placeholder of the same range, so that the
/// template holds no page of the file and the range stays reserved for the restores'
/// `MAP_FIXED`.
pub(super) fn queue_unmap(batch: &mut Batch, shared: &[SharedMapping]) {
    for m in shared {
        let flags =
            (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE)
                as u64;
        batch.call(
            "mmap",
            libc::SYS_mmap,
            &[
                m.start,
                m.end - m.start,
                libc::PROT_NONE as u64,
                flags,
                u64::MAX,
                0,
            ],
        );
    }
}

/// In a restored process (its root set): opens each file of `shared` by path and maps
/// it again at its address, shared, with its protection. `scratch` is a writable page
/// of the process ([`SCRATCH_LEN`] bytes) for the path.
pub(super) fn map_again(
    inj: &mut Injection<'_>,
    shared: &[SharedMapping],
    scratch: u64,
) -> Result<(), CrError> {
    let pid = inj.tracee().pid().as_raw();
    for m in shared {
        let mut path = m.path.as_os_str().as_bytes().to_vec();
        path.push(0);
        if path.len() as u64 > SCRATCH_LEN {
            return Err(InjectError::PathTooLong {
                pid,
                path: m.path.clone(),
            }
            .into());
        }
        inj.tracee()
            .write_memory(scratch, &path)
            .map_err(InjectError::from)?;
        let open_flags = (libc::O_RDWR | libc::O_CLOEXEC | libc::O_NOCTTY) as u64;
        let at_fdcwd = libc::AT_FDCWD as i64 as u64;
        let fd = inj
            .syscall(
                "openat",
                libc::SYS_openat,
                &[at_fdcwd, scratch, open_flags, 0],
            )
            .map_err(|source| CrError::SharedRemap {
                pid,
                path: m.path.clone(),
                source,
            })?;
        let flags = (libc::MAP_SHARED | libc::MAP_FIXED) as u64;
        let mapped = inj.syscall(
            "mmap",
            libc::SYS_mmap,
            &[m.start, m.end - m.start, m.prot as u64, flags, fd, m.offset],
        );
        inj.syscall("close", libc::SYS_close, &[fd])?;
        mapped.map_err(|source| CrError::SharedRemap {
            pid,
            path: m.path.clone(),
            source,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_files_reachable_by_path_are_reopenable() {
        assert!(is_reopenable("/workspace/data.bin"));
        assert!(!is_reopenable("/dev/zero (deleted)"));
        assert!(!is_reopenable("/SYSV00000000 (deleted)"));
        assert!(!is_reopenable("/memfd:x (deleted)"));
        assert!(!is_reopenable("/tmp/gone (deleted)"));
        assert!(!is_reopenable(""));
        assert!(!is_reopenable("[anon_shmem]"));
    }
}
