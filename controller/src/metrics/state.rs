//! What the sandboxes and their checkpoint trees cost, measured when asked (a scrape
//! of `/metrics`, `GET /v1/stats`): counts from the sandbox manager, the memory its
//! live templates own from `/proc/<pid>/smaps_rollup`, the disk its layers use.

use std::fs;
use std::io;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::sandbox::SandboxError;

/// Errors of reading a process's memory figures.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// `/proc/<pid>/smaps_rollup` could not be read (the process is gone, or the
    /// kernel has no `smaps_rollup`).
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The file had no `Private_Clean` or no `Private_Dirty` line.
    #[error("{path} has no Private_Clean and Private_Dirty lines")]
    Parse {
        /// The file.
        path: PathBuf,
    },
}

/// What the sandboxes and their trees cost now (the template pool's own figures are
/// [`super::pool::PoolFigures`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateFigures {
    /// Sandboxes alive.
    pub sandboxes: u64,
    /// Trees alive (each with its namespaces and init process).
    pub trees: u64,
    /// Nodes in the tree database, of every tree.
    pub nodes: u64,
    /// Templates of nodes (sessions' and other processes') whose process is alive.
    pub templates_live: u64,
    /// Sessions and other processes of nodes without a live template whose dump is on
    /// disk (evicted from
    /// the template pool, or killed after their dump): restored through the fallback.
    #[serde(default)]
    pub templates_dumped: u64,
    /// Sessions and other processes of nodes with neither a live template nor a dump
    /// (lost to a restart, a
    /// kill before their dump, or never made): a rollback to them cannot restore those
    /// processes.
    pub templates_gone: u64,
    /// Memory the live templates own: the sum over their processes of
    /// `Private_Clean + Private_Dirty` (pages no other process maps), bytes.
    pub template_memory_bytes: u64,
    /// Disk allocated to DeltaFS layers, bytes (reflinked extents count once per file).
    pub store_bytes: u64,
}

/// Something that can measure [`StateFigures`]: the sandbox manager (and, in the API's
/// tests, its fake). Blocking: it reads `/proc` and walks the store.
pub trait StateSource: Send + Sync {
    /// Measures the figures now.
    fn state_figures(&self) -> Result<StateFigures, SandboxError>;

    /// The cgroup v2 directory sandbox `sandbox` (a full id) runs its commands and
    /// sessions in, for the eBPF write tracker; `None` if it has none (or is unknown).
    fn work_cgroup(&self, _sandbox: &str) -> Option<PathBuf> {
        None
    }

    /// The full ids of the live sandboxes, without waiting for any of them (an
    /// operation may hold one for minutes).
    fn sandbox_ids(&self) -> Vec<String> {
        Vec::new()
    }

    /// The template pool's figures; `None` without a pool.
    fn pool_figures(&self) -> Option<super::pool::PoolFigures> {
        None
    }

    /// DeltaFS's counters; `None` without a store.
    fn deltafs_stats(&self) -> Option<deltafs::StatsSnapshot> {
        None
    }

    /// What the checkpoint that made node `node` (a full id) made the store write;
    /// `None` if unknown (a node of an earlier daemon, or no such node).
    fn checkpoint_writes(&self, _node: &str) -> Option<deltafs::SnapshotWrites> {
        None
    }
}

/// Bytes process `pid` (host namespace) maps that no other process maps:
/// `Private_Clean + Private_Dirty` of `/proc/<pid>/smaps_rollup`. For a template this
/// is what it alone keeps alive: the pages the session changed since the fork (the
/// template holds the old copies) and any it never shared.
pub fn private_bytes(pid: i32) -> Result<u64, StateError> {
    let path = PathBuf::from(format!("/proc/{pid}/smaps_rollup"));
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(source) => return Err(StateError::Read { path, source }),
    };
    parse_private_bytes(&text).ok_or(StateError::Parse { path })
}

/// `Private_Clean + Private_Dirty` of an `smaps_rollup` text, in bytes.
pub fn parse_private_bytes(text: &str) -> Option<u64> {
    let field = |name: &str| {
        text.lines().find_map(|line| {
            let rest = line.strip_prefix(name)?.strip_prefix(':')?;
            let kib = rest.trim().strip_suffix("kB")?.trim();
            kib.parse::<u64>().ok()
        })
    };
    Some((field("Private_Clean")? + field("Private_Dirty")?) * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROLLUP: &str = "\
55d0c0a4b000-7ffd5c5f1000 ---p 00000000 00:00 0                          [rollup]
Rss:                3968 kB
Pss:                1037 kB
Shared_Clean:       2996 kB
Shared_Dirty:          0 kB
Private_Clean:       244 kB
Private_Dirty:       728 kB
Referenced:         3968 kB
Anonymous:           728 kB
";

    #[test]
    fn parses_private_pages() {
        assert_eq!(parse_private_bytes(ROLLUP), Some((244 + 728) * 1024));
        assert_eq!(parse_private_bytes("Rss: 1 kB\n"), None);
        // `Private_Hugetlb` must not be taken for `Private_Clean`.
        assert_eq!(
            parse_private_bytes(
                "Private_Hugetlb: 9 kB\nPrivate_Clean: 1 kB\nPrivate_Dirty: 2 kB\n"
            ),
            Some(3 * 1024)
        );
    }

    #[test]
    fn measures_this_process() {
        // This test process has written to its own heap and stack: private pages.
        let bytes = private_bytes(i32::try_from(std::process::id()).unwrap()).unwrap();
        assert!(bytes > 0);
        let err = private_bytes(i32::MAX).unwrap_err();
        assert!(
            err.to_string().contains(&format!("/proc/{}/", i32::MAX)),
            "{err}"
        );
    }
}
