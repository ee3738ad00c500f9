//! Loads, attaches and pins the tracker's programs, links and maps with aya, and
//! removes them again. Everything lives under one pin directory on bpffs:
//!
//! ```text
//! <pin_dir>/progs/<program>            the loaded programs
//! <pin_dir>/links/<category>:<name>    one perf-event link per attached tracepoint
//! <pin_dir>/maps/<MAP>                 the maps, adopted by deltaboxd
//! ```
//!
//! A pinned link keeps its program attached after the loader exits; unpinning it
//! (removing the file) detaches it once no process holds its fd.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use aya::{
    EbpfLoader,
    programs::{ProgramError, TracePoint, links::FdLink},
};
use deltabox_common::{MAX_FAULT_PAGES, MAX_INODE_STATS, map_names};

use super::offsets::{self, OffsetsError};

/// The eBPF object, built by this crate's build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/deltabox-ebpf"));

/// Every (program, tracepoint category, tracepoint name) attachment.
pub const ATTACHMENTS: &[(&str, &str, &str)] = &[
    ("dbx_dirty_folio", "writeback", "writeback_dirty_folio"),
    ("dbx_write_enter", "syscalls", "sys_enter_write"),
    ("dbx_write_enter", "syscalls", "sys_enter_pwrite64"),
    ("dbx_write_enter", "syscalls", "sys_enter_writev"),
    ("dbx_write_enter", "syscalls", "sys_enter_pwritev"),
    ("dbx_write_enter", "syscalls", "sys_enter_pwritev2"),
    ("dbx_write_exit", "syscalls", "sys_exit_write"),
    ("dbx_write_exit", "syscalls", "sys_exit_pwrite64"),
    ("dbx_write_exit", "syscalls", "sys_exit_writev"),
    ("dbx_write_exit", "syscalls", "sys_exit_pwritev"),
    ("dbx_write_exit", "syscalls", "sys_exit_pwritev2"),
    ("dbx_page_fault", "exceptions", "page_fault_user"),
];

/// The programs, in load order.
pub const PROGRAMS: &[&str] = &[
    "dbx_dirty_folio",
    "dbx_write_enter",
    "dbx_write_exit",
    "dbx_page_fault",
];

/// The maps pinned for adoption (aya-log's ring buffer is found through a program).
pub const PINNED_MAPS: &[&str] = &[
    map_names::WATCHED,
    map_names::INODE_STATS,
    map_names::PENDING,
    map_names::COUNTERS,
    map_names::FAULT_WATCHED,
    map_names::FAULT_COUNTS,
    map_names::FAULT_PAGES,
];

/// Errors of the write tracker.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    /// The cgroup is not in the watched set.
    #[error("cgroup {cgroup_id} is not watched")]
    NotWatched {
        /// The cgroup v2 id.
        cgroup_id: u64,
    },
    /// Nothing is pinned where programs were expected.
    #[error(
        "no deltabox programs are pinned under {}: run `cargo xtask build-and-load` or start deltaboxd without --adopt-only",
        pin_dir.display()
    )]
    NotLoaded {
        /// The pin directory.
        pin_dir: PathBuf,
    },
    /// Only part of the expected pins exist (an interrupted load or a foreign tool).
    #[error("{} is incomplete ({missing} is missing): reload with `deltaboxd load`", pin_dir.display())]
    Incomplete {
        /// The pin directory.
        pin_dir: PathBuf,
        /// The first missing pin.
        missing: String,
    },
    /// The pin directory is not on a bpf filesystem.
    #[error("{} is not on a bpf filesystem: mount it with `mount -t bpf bpf /sys/fs/bpf` (or run `cargo xtask setup`)", path.display())]
    NotBpffs {
        /// The directory.
        path: PathBuf,
    },
    /// Kernel offsets could not be read.
    #[error(transparent)]
    Offsets(#[from] OffsetsError),
    /// The object could not be loaded (maps, relocations).
    #[error("loading the eBPF object failed: {0}")]
    Object(#[from] aya::EbpfError),
    /// The verifier rejected a program; `log` is its log.
    #[error("the verifier rejected {program}: {source}\nverifier log:\n{log}")]
    Verifier {
        /// Program name.
        program: String,
        /// The load syscall's error.
        source: io::Error,
        /// The verifier's log.
        log: String,
    },
    /// A program could not be loaded or attached.
    #[error("program {program}: {source}")]
    Program {
        /// Program name.
        program: String,
        /// What aya reported.
        source: ProgramError,
    },
    /// A link operation failed.
    #[error("link {what}: {source}")]
    Link {
        /// Which link.
        what: String,
        /// What aya reported.
        source: aya::programs::links::LinkError,
    },
    /// Pinning failed.
    #[error("pinning {what}: {source}")]
    Pin {
        /// What was pinned.
        what: String,
        /// What aya reported.
        source: aya::pin::PinError,
    },
    /// A map operation failed.
    #[error("map {map}: {source}")]
    Map {
        /// Map name.
        map: &'static str,
        /// What aya reported.
        source: aya::maps::MapError,
    },
    /// A batched map read or delete failed.
    #[error("map {map}: batched {op}: {source}")]
    Batch {
        /// Map name.
        map: &'static str,
        /// `lookup` or `delete`.
        op: &'static str,
        /// The bpf(2) error.
        source: io::Error,
    },
    /// aya-log could not attach to the programs' log buffer.
    #[error("program logs: {0}")]
    Log(#[from] aya_log::Error),
    /// A filesystem operation under the pin directory failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> BpfError + '_ {
    move |source| BpfError::Io {
        path: path.into(),
        source,
    }
}

/// Subdirectories of the pin directory.
pub(crate) fn progs_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("progs")
}
pub(crate) fn links_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("links")
}
pub(crate) fn maps_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("maps")
}

/// File name of the pinned link of a tracepoint attachment.
pub(crate) fn link_file(category: &str, name: &str) -> String {
    format!("{category}:{name}")
}

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

fn ensure_bpffs(dir: &Path) -> Result<(), BpfError> {
    let stat = nix::sys::statfs::statfs(dir).map_err(|e| BpfError::Io {
        path: dir.into(),
        source: e.into(),
    })?;
    if stat.filesystem_type().0 as i64 != BPF_FS_MAGIC {
        return Err(BpfError::NotBpffs { path: dir.into() });
    }
    Ok(())
}

/// Choices made at load time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadOptions {
    /// Entries of the per-inode counters map (default [`MAX_INODE_STATS`]).
    pub inode_stats_capacity: u32,
    /// Entries of the faulting-pages map (default [`MAX_FAULT_PAGES`]).
    pub fault_pages_capacity: u32,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            inode_stats_capacity: MAX_INODE_STATS,
            fault_pages_capacity: MAX_FAULT_PAGES,
        }
    }
}

/// Loads the programs, attaches them and pins programs, links and maps under
/// `pin_dir`. Whatever deltabox had pinned there is removed first, so loading twice
/// leaves one attachment per tracepoint. On failure nothing stays pinned.
pub fn load_and_pin(pin_dir: &Path, options: LoadOptions) -> Result<(), BpfError> {
    let parent = pin_dir.parent().unwrap_or(Path::new("/"));
    ensure_bpffs(parent)?;
    unload(pin_dir)?;
    let result = load_and_pin_fresh(pin_dir, options);
    if result.is_err() {
        // Leave nothing half-attached behind.
        let _ = unload(pin_dir);
    }
    result
}

fn load_and_pin_fresh(pin_dir: &Path, options: LoadOptions) -> Result<(), BpfError> {
    let offsets = offsets::kernel_offsets()?;
    let mut ebpf = EbpfLoader::new()
        .override_global("DBX_OFFSETS", &offsets, true)
        .map_max_entries(map_names::INODE_STATS, options.inode_stats_capacity)
        .map_max_entries(map_names::FAULT_PAGES, options.fault_pages_capacity)
        .load(OBJECT)?;
    for dir in [progs_dir(pin_dir), links_dir(pin_dir), maps_dir(pin_dir)] {
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    }
    for &name in PINNED_MAPS {
        let map = ebpf.map(name).ok_or_else(|| BpfError::Incomplete {
            pin_dir: pin_dir.into(),
            missing: format!("map {name} in the eBPF object"),
        })?;
        map.pin(maps_dir(pin_dir).join(name))
            .map_err(|source| BpfError::Pin {
                what: format!("map {name}"),
                source,
            })?;
    }
    for &program in PROGRAMS {
        let prog_err = |source| BpfError::Program {
            program: program.into(),
            source,
        };
        let prog: &mut TracePoint = ebpf
            .program_mut(program)
            .ok_or_else(|| BpfError::Incomplete {
                pin_dir: pin_dir.into(),
                missing: format!("program {program} in the eBPF object"),
            })?
            .try_into()
            .map_err(prog_err)?;
        prog.load().map_err(|e| match e {
            ProgramError::LoadError {
                io_error,
                verifier_log,
            } => BpfError::Verifier {
                program: program.into(),
                source: io_error,
                log: verifier_log.to_string(),
            },
            other => prog_err(other),
        })?;
        prog.pin(progs_dir(pin_dir).join(program))
            .map_err(|source| BpfError::Pin {
                what: format!("program {program}"),
                source,
            })?;
        for &(_, category, tp) in ATTACHMENTS.iter().filter(|a| a.0 == program) {
            let id = prog.attach(category, tp).map_err(prog_err)?;
            let link: FdLink =
                prog.take_link(id)
                    .map_err(prog_err)?
                    .try_into()
                    .map_err(|source| BpfError::Link {
                        what: link_file(category, tp),
                        source,
                    })?;
            link.pin(links_dir(pin_dir).join(link_file(category, tp)))
                .map_err(|source| BpfError::Pin {
                    what: format!("link {category}:{tp}"),
                    source,
                })?;
        }
    }
    Ok(())
}

/// Detaches and unpins everything deltabox pinned under `pin_dir`; returns the
/// removed pin paths (empty when nothing was pinned).
pub fn unload(pin_dir: &Path) -> Result<Vec<PathBuf>, BpfError> {
    let mut removed = Vec::new();
    if !pin_dir.exists() {
        return Ok(removed);
    }
    // Links first: removing a link's pin detaches it; programs and maps go after.
    for dir in [links_dir(pin_dir), progs_dir(pin_dir), maps_dir(pin_dir)] {
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err(&dir)(e)),
        };
        for entry in entries {
            let path = entry.map_err(io_err(&dir))?.path();
            fs::remove_file(&path).map_err(io_err(&path))?;
            removed.push(path);
        }
        fs::remove_dir(&dir).map_err(io_err(&dir))?;
    }
    fs::remove_dir(pin_dir).map_err(io_err(pin_dir))?;
    removed.sort();
    Ok(removed)
}

/// The first expected pin missing under `pin_dir`, if any.
pub(crate) fn missing_pin(pin_dir: &Path) -> Option<String> {
    let maps = PINNED_MAPS.iter().map(|m| maps_dir(pin_dir).join(m));
    let progs = PROGRAMS.iter().map(|p| progs_dir(pin_dir).join(p));
    let links = ATTACHMENTS
        .iter()
        .map(|(_, c, n)| links_dir(pin_dir).join(link_file(c, n)));
    maps.chain(progs)
        .chain(links)
        .find(|p| !p.exists())
        .map(|p| p.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifier_rejection_shows_the_log() {
        let err = BpfError::Verifier {
            program: "dbx_write_enter".into(),
            source: io::Error::from_raw_os_error(libc::EACCES),
            log: "63: (bf) r8 = r4\nR4 !read_ok".into(),
        };
        let text = err.to_string();
        assert!(
            text.contains("dbx_write_enter") && text.contains("R4 !read_ok"),
            "{text}"
        );
    }

    #[test]
    fn every_program_is_attached_somewhere() {
        for program in PROGRAMS {
            assert!(
                ATTACHMENTS.iter().any(|a| a.0 == *program),
                "{program} never attached"
            );
        }
        assert!(ATTACHMENTS.iter().all(|a| PROGRAMS.contains(&a.0)));
    }
}
