//! `PROCMAP_QUERY` (Linux 6.11, `include/uapi/linux/fs.h`): the kernel answers for one
//! mapping of a process — the one covering an address, or the next one with given
//! permissions — instead of formatting all of `/proc/<pid>/maps` for the controller to
//! parse (~0.1 ms for a python process here, on a checkpoint's critical path).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use super::procfs::{Mapping, ProcError};

/// `PROCMAP_QUERY_VMA_WRITABLE`.
pub const WRITABLE: u64 = 0x02;
/// `PROCMAP_QUERY_VMA_SHARED`.
pub const SHARED: u64 = 0x08;
const READABLE: u64 = 0x01;
const EXECUTABLE: u64 = 0x04;
/// `PROCMAP_QUERY_COVERING_OR_NEXT_VMA`: the mapping at the address, or the next one.
const COVERING_OR_NEXT: u64 = 0x10;

/// `AT_SYSINFO_EHDR`: the vdso's address in the auxiliary vector.
const AT_SYSINFO_EHDR: u64 = 33;

/// Bytes of a mapping's name the query returns (`PATH_MAX`).
const NAME_MAX: usize = 4096;

/// `struct procmap_query`.
#[repr(C)]
#[derive(Debug, Default)]
struct Query {
    size: u64,
    query_flags: u64,
    query_addr: u64,
    vma_start: u64,
    vma_end: u64,
    vma_flags: u64,
    vma_page_size: u64,
    vma_offset: u64,
    inode: u64,
    dev_major: u32,
    dev_minor: u32,
    vma_name_size: u32,
    build_id_size: u32,
    vma_name_addr: u64,
    build_id_addr: u64,
}

nix::ioctl_readwrite!(procmap_query, b'f', 17, Query);

/// A process's `/proc/<pid>/maps`, open for queries.
#[derive(Debug)]
pub struct ProcMaps {
    pid: i32,
    file: File,
}

impl ProcMaps {
    /// Opens the maps of `pid`.
    pub fn open(pid: i32) -> Result<Self, ProcError> {
        let path = PathBuf::from(format!("/proc/{pid}/maps"));
        let file = File::open(&path).map_err(|source| ProcError::Read { path, source })?;
        Ok(Self { pid, file })
    }

    /// The first mapping that ends after `addr` and has every permission of `flags`
    /// ([`WRITABLE`], [`SHARED`]), with its name as `maps` shows it; `None` if there
    /// is none.
    pub fn next(&self, addr: u64, flags: u64) -> Result<Option<Mapping>, ProcError> {
        let mut name = vec![0u8; NAME_MAX];
        let mut q = Query {
            size: std::mem::size_of::<Query>() as u64,
            query_flags: flags | COVERING_OR_NEXT,
            query_addr: addr,
            vma_name_size: NAME_MAX as u32,
            vma_name_addr: name.as_mut_ptr() as u64,
            ..Query::default()
        };
        // SAFETY: `q` is a `struct procmap_query` of the size it declares, and its name
        // buffer is `name`, live and writable for `vma_name_size` bytes during the call;
        // no build id is asked for (size 0).
        match unsafe { procmap_query(self.file.as_raw_fd(), &mut q) } {
            Ok(_) => {}
            Err(nix::errno::Errno::ENOENT) => return Ok(None),
            Err(e) => {
                return Err(ProcError::Read {
                    path: PathBuf::from(format!("/proc/{}/maps (PROCMAP_QUERY)", self.pid)),
                    source: io::Error::from(e),
                });
            }
        }
        // The size returned counts the terminating NUL (0: no name).
        let len = (q.vma_name_size as usize).saturating_sub(1).min(NAME_MAX);
        name.truncate(len);
        let flag = |bit: u64, c: u8| if q.vma_flags & bit != 0 { c } else { b'-' };
        Ok(Some(Mapping {
            start: q.vma_start,
            end: q.vma_end,
            perms: [
                flag(READABLE, b'r'),
                flag(WRITABLE, b'w'),
                flag(EXECUTABLE, b'x'),
                if q.vma_flags & SHARED != 0 {
                    b's'
                } else {
                    b'p'
                },
            ],
            offset: q.vma_offset,
            inode: q.inode,
            name: String::from_utf8_lossy(&name).into_owned(),
        }))
    }

    /// Every mapping with all permissions of `flags`, in address order (the
    /// `[vsyscall]` gate area, which `maps` shows last, is no mapping of the process's).
    pub fn all_with(&self, flags: u64) -> Result<Vec<Mapping>, ProcError> {
        let mut out = Vec::new();
        let mut addr = 0;
        while let Some(m) = self.next(addr, flags)? {
            addr = m.end;
            out.push(m);
        }
        Ok(out)
    }

    /// The `[vdso]` (start, end), found where the auxiliary vector says the kernel
    /// mapped it; `None` if it is not there (moved by `mremap`, or no vdso).
    pub fn vdso(&self) -> Result<Option<(u64, u64)>, ProcError> {
        let path = PathBuf::from(format!("/proc/{}/auxv", self.pid));
        let auxv = std::fs::read(&path).map_err(|source| ProcError::Read { path, source })?;
        let Some(at) = auxv_value(&auxv, AT_SYSINFO_EHDR) else {
            return Ok(None);
        };
        Ok(self
            .next(at, 0)?
            .filter(|m| m.start == at && m.name == "[vdso]")
            .map(|m| (m.start, m.end)))
    }
}

/// The value of `key` in a raw auxiliary vector (pairs of native-endian u64).
fn auxv_value(auxv: &[u8], key: u64) -> Option<u64> {
    auxv.chunks_exact(16).find_map(|pair| {
        let word = |i: usize| u64::from_ne_bytes(pair[i..i + 8].try_into().unwrap_or_default());
        (word(0) == key).then(|| word(8))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_has_the_kernels_layout() {
        assert_eq!(std::mem::size_of::<Query>(), 104);
    }

    #[test]
    fn mappings_match_proc_maps() {
        use std::io::{BufRead, BufReader, Write};
        use std::process::{Command, Stdio};
        // A process that stands still (blocked reading its stdin once it echoed a
        // line), so that both views see the same mappings.
        let mut cat = Command::new("cat")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = cat.stdin.take().unwrap();
        stdin.write_all(b"ready\n").unwrap();
        let mut line = String::new();
        BufReader::new(cat.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let pid = cat.id() as i32;
        let maps = ProcMaps::open(pid).unwrap();
        let parsed = super::super::procfs::maps(pid).unwrap();
        let queried = maps.all_with(0);
        let vdso = maps.vdso();
        let shared = maps.all_with(SHARED | WRITABLE);
        let _ = cat.kill();
        let _ = cat.wait();
        assert!(super::super::procfs::vdso(&parsed).is_some());
        assert_eq!(vdso.unwrap(), super::super::procfs::vdso(&parsed));
        // Anonymous mappings' offsets are not the query's business (it gives 0).
        let key = |m: &Mapping| {
            let offset = if m.inode != 0 { m.offset } else { 0 };
            (m.start, m.end, m.perms, m.name.clone(), m.inode, offset)
        };
        let a: Vec<_> = queried.unwrap().iter().map(key).collect();
        // `[vsyscall]` is the gate area, not a mapping of the process's own.
        let b: Vec<_> = parsed
            .iter()
            .filter(|m| m.name != "[vsyscall]")
            .map(key)
            .collect();
        assert_eq!(a, b);
        let shared = shared.unwrap();
        assert!(shared.iter().all(Mapping::is_shared_writable));
        assert_eq!(
            shared.len(),
            parsed.iter().filter(|m| m.is_shared_writable()).count()
        );
    }

    #[test]
    fn auxv_values_are_found_by_key() {
        let mut auxv = Vec::new();
        for (k, v) in [(6u64, 4096u64), (33, 0x7fff_0000), (0, 0)] {
            auxv.extend_from_slice(&k.to_ne_bytes());
            auxv.extend_from_slice(&v.to_ne_bytes());
        }
        assert_eq!(auxv_value(&auxv, 33), Some(0x7fff_0000));
        assert_eq!(auxv_value(&auxv, 7), None);
    }
}
