//! The eBPF write tracker: counts, per watched cgroup and inode, write syscalls,
//! bytes written and page-cache folios dirtied since the cgroup's current epoch; and
//! the copy-on-write fault counter ([`faults`]), loaded with it.
//!
//! [`WriteTracker`] is the one point through which the rest of the controller reaches
//! the kernel's maps, so the API above it is testable without root ([`fake`] in tests).
//! [`loader`] loads, pins, adopts and unloads the programs with aya; [`offsets`] reads
//! the kernel struct and tracepoint offsets the programs need from BTF and tracefs.

pub mod faults;
pub mod loader;
pub mod offsets;
mod tracker;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use faults::{CowFaultCounter, FaultTotals, PinnedFaults, ProcessPages};
pub use loader::{BpfError, LoadOptions, load_and_pin, unload};
pub use tracker::{Origin, PinnedTracker};

/// Default pin directory of programs, links and maps (on bpffs).
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/deltabox";

/// One attached program, as pinned.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachedProgram {
    /// Program name in the eBPF object.
    pub name: String,
    /// `category:name` of the tracepoint it is attached to.
    pub tracepoint: String,
    /// Kernel program id.
    pub program_id: u32,
    /// Kernel link id of the attachment.
    pub link_id: u32,
    /// Where the link is pinned.
    pub pinned_at: PathBuf,
}

/// Counters of one (cgroup, inode) in the cgroup's current epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InodeRecord {
    /// cgroup v2 id.
    pub cgroup_id: u64,
    /// Inode number.
    pub ino: u64,
    /// Epoch the counts belong to (the cgroup's current one).
    pub epoch: u64,
    /// Base name seen by the first write syscall (may be empty or truncated).
    pub name: String,
    /// Write-family syscalls.
    pub writes: u64,
    /// Bytes those syscalls wrote.
    pub bytes: u64,
    /// Page-cache folios dirtied.
    pub pages_dirtied: u64,
}

/// Totals since the programs were loaded, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GlobalCounters {
    /// Write syscalls counted in watched cgroups.
    pub write_syscalls: u64,
    /// Folios dirtied in watched cgroups.
    pub dirtied_folios: u64,
    /// New inodes not counted because the stats map was full.
    pub stats_full: u64,
    /// Write syscalls whose fd could not be followed to an inode.
    pub fd_unresolved: u64,
}

/// What the controller needs from the write tracker. Implemented by
/// [`PinnedTracker`] over the kernel's maps.
pub trait WriteTracker: Send + Sync {
    /// The attached programs.
    fn attached(&self) -> Result<Vec<AttachedProgram>, BpfError>;
    /// Starts counting the cgroup; returns its epoch. Watching a watched cgroup
    /// changes nothing and returns its current epoch.
    fn watch(&self, cgroup_id: u64) -> Result<u64, BpfError>;
    /// Stops counting the cgroup and drops its counters; false if it was not watched.
    fn unwatch(&self, cgroup_id: u64) -> Result<bool, BpfError>;
    /// Watched cgroup ids with their current epoch.
    fn watched(&self) -> Result<Vec<(u64, u64)>, BpfError>;
    /// Advances the cgroup's epoch (the counts restart from zero); returns the new
    /// epoch. Fails if it is not watched. The older epochs' counters stay until
    /// [`Self::drop_stale_stats`].
    fn advance_epoch(&self, cgroup_id: u64) -> Result<u64, BpfError>;
    /// Removes the counters of `cgroup_id`'s earlier epochs (a walk of the whole stats
    /// map: callers on a latency path run it on another thread). Their keys carry the
    /// epoch, so until then they are only memory; [`Self::advance_epoch`] leaves them.
    fn drop_stale_stats(&self, _cgroup_id: u64) -> Result<(), BpfError> {
        Ok(())
    }
    /// Counters of the current epoch, of one cgroup or of every watched one.
    fn inode_stats(&self, cgroup_id: Option<u64>) -> Result<Vec<InodeRecord>, BpfError>;
    /// Totals since load.
    fn counters(&self) -> Result<GlobalCounters, BpfError>;
}
