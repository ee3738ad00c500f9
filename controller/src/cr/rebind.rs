//! Rebinding a template's private file mappings to other files with the same bytes.
//!
//! A template maps its program and libraries through the DeltaFS view it was made in.
//! That view's FUSE connection dies with the daemon that served it; from then on a page
//! that is not in memory faults with `SIGBUS`, in the template's forks too. A daemon that
//! adopts the template after a restart therefore gives it, for each such mapping, a
//! mapping of a file with exactly the same bytes (the frozen backing file of the
//! snapshot, which never changes): same address, length, offset and protection, now
//! served by the backing filesystem for good. The pages the process had already written
//! (its private copies, anonymous memory since) are read first and written back after,
//! so the template's memory is unchanged byte for byte.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::FileExt as _;
use std::path::PathBuf;

use super::dump::{PAGE, private_pages};
use super::hold::group_stop;
use super::inject::{InjectError, Injection, SCRATCH_LEN};
use super::procfs::{self, Mapping};
use super::ptrace::{Tracee, cr_options};
use super::{CrError, Template};
use crate::cr::ptrace::Stop;

/// Errors of rebinding, naming the template and the mapping.
#[derive(Debug, thiserror::Error)]
pub enum RebindError {
    /// Reading or writing the template's memory or page map failed.
    #[error("template {pid}: {what} at {start:#x}-{end:#x}")]
    Memory {
        /// The template.
        pid: i32,
        /// What was done.
        what: &'static str,
        /// The mapping.
        start: u64,
        /// Its end.
        end: u64,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The mapping asked for is neither private nor read-only.
    #[error("template {pid}: {start:#x}-{end:#x} is a writable shared mapping")]
    NotRebindable {
        /// The template.
        pid: i32,
        /// First address.
        start: u64,
        /// One past the last.
        end: u64,
    },
}

/// One mapping to rebind.
#[derive(Clone, Debug)]
pub struct Rebind {
    /// The mapping, as [`Template::file_mappings`] listed it.
    pub mapping: Mapping,
    /// The file with the same bytes, as the template names it (inside its root and mount
    /// namespace: a sandbox's template opens `/proc/<holder>/fd/<n>`).
    pub file: PathBuf,
}

impl Template {
    /// The template's file mappings that [`Self::rebind`] can move: private ones
    /// (program, libraries, mapped data files) and read-only shared ones (a checkpoint
    /// refuses writable shared file mappings).
    pub fn file_mappings(&self) -> Result<Vec<Mapping>, CrError> {
        Ok(procfs::maps(self.pid().as_raw())?
            .into_iter()
            .filter(|m| m.inode != 0 && m.name.starts_with('/') && rebindable(m))
            .collect())
    }

    /// Maps each rebind's file over its mapping (same address, length, offset,
    /// protection and sharing), keeping the pages the process had written. The template
    /// stays frozen and stopped throughout, as in a restore.
    pub fn rebind(&self, rebinds: &[Rebind]) -> Result<(), CrError> {
        if rebinds.is_empty() {
            return Ok(());
        }
        let _one_at_a_time = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let pid = self.pid().as_raw();
        let mem = OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/{pid}/mem"))
            .map_err(|source| memory_err(pid, "open /proc/<pid>/mem", &rebinds[0], source))?;
        let pagemap = File::open(format!("/proc/{pid}/pagemap"))
            .map_err(|source| memory_err(pid, "open /proc/<pid>/pagemap", &rebinds[0], source))?;
        let (mut tracee, first) = Tracee::seize_stopped(self.pid(), cr_options())?;
        // Killed, not detached, if the controller dies before the detach: it is about to
        // be thawed and to hold injection registers.
        tracee.set_exit_kill(true)?;
        self.cgroup.thaw()?;
        let done = (|| {
            {
                let mut inj = Injection::begin(&mut tracee, self.state.syscall_site)?;
                for rebind in rebinds {
                    self.rebind_one(&mut inj, &mem, &pagemap, rebind)?;
                }
                inj.finish(false)?;
            }
            if !matches!(first, Stop::Group(_)) {
                group_stop(&mut tracee)?;
            }
            Ok::<_, CrError>(())
        })();
        let refrozen = self.cgroup.freeze();
        tracee.take_deferred_signals();
        let detached = tracee.detach(0);
        done?;
        refrozen?;
        detached?;
        Ok(())
    }

    fn rebind_one(
        &self,
        inj: &mut Injection<'_>,
        mem: &File,
        pagemap: &File,
        rebind: &Rebind,
    ) -> Result<(), CrError> {
        let pid = self.pid().as_raw();
        let m = &rebind.mapping;
        if !rebindable(m) || m.end <= m.start {
            return Err(RebindError::NotRebindable {
                pid,
                start: m.start,
                end: m.end,
            }
            .into());
        }
        let shared = m.perms[3] == b's';
        let written = if shared {
            // A read-only shared mapping holds the file's pages only.
            Vec::new()
        } else {
            private_pages(pagemap, m.start, m.end)
                .map_err(|source| memory_err(pid, "read the page map", rebind, source))?
        };
        let mut saved = Vec::with_capacity(written.len());
        for addr in written {
            let mut page = vec![0u8; PAGE as usize];
            mem.read_exact_at(&mut page, addr)
                .map_err(|source| memory_err(pid, "read a written page", rebind, source))?;
            saved.push((addr, page));
        }

        let mut path = rebind.file.as_os_str().as_bytes().to_vec();
        path.push(0);
        if path.len() as u64 > SCRATCH_LEN {
            return Err(InjectError::PathTooLong {
                pid,
                path: rebind.file.clone(),
            }
            .into());
        }
        inj.tracee()
            .write_memory(self.scratch, &path)
            .map_err(InjectError::from)?;
        let flags = (libc::O_RDONLY | libc::O_CLOEXEC) as u64;
        let fd = inj.syscall(
            "openat",
            libc::SYS_openat,
            &[libc::AT_FDCWD as u64, self.scratch, flags, 0],
        )?;
        let mapped = inj.syscall(
            "mmap",
            libc::SYS_mmap,
            &[
                m.start,
                m.end - m.start,
                m.prot() as u64,
                (if shared {
                    libc::MAP_SHARED
                } else {
                    libc::MAP_PRIVATE
                } | libc::MAP_FIXED) as u64,
                fd,
                m.offset,
            ],
        );
        let closed = inj.syscall("close", libc::SYS_close, &[fd]);
        mapped?;
        closed?;
        // Through /proc/<pid>/mem, which writes read-only private mappings too (as a
        // debugger does): each page becomes a private copy again, as it was.
        for (addr, page) in &saved {
            mem.write_all_at(page, *addr)
                .map_err(|source| memory_err(pid, "write back a written page", rebind, source))?;
        }
        Ok(())
    }
}

fn memory_err(pid: i32, what: &'static str, rebind: &Rebind, source: io::Error) -> CrError {
    RebindError::Memory {
        pid,
        what,
        start: rebind.mapping.start,
        end: rebind.mapping.end,
        source,
    }
    .into()
}

/// Private, or shared without write permission: a frozen file mapped either way shows
/// the same bytes whichever file of that content backs it.
fn rebindable(m: &Mapping) -> bool {
    m.perms[3] == b'p' || m.perms[1] != b'w'
}
