//! The eBPF write tracker: counts, per watched cgroup and inode, write syscalls,
//! bytes written and page-cache folios dirtied since the cgroup's current epoch; and
//! the copy-on-write fault counter ([`faults`]), loaded with it.
//!
//! [`WriteTracker`] is the one point through which the rest of the controller reaches
//! the kernel's maps, so the API above it is testable without root ([`fake`] in tests).
//! [`loader`] loads, pins, adopts and unloads the programs with aya; [`offsets`] reads
//! the kernel struct and tracepoint offsets the programs need from BTF and tracefs;
//! `maps` holds the watch/epoch logic the tracker and the fault counter share.

mod batch;
pub mod faults;
pub mod loader;
mod maps;
pub mod offsets;
mod tracker;

pub use faults::{CowFaultCounter, FaultTotals, PinnedFaults, ProcessPages};
pub use loader::{BpfError, LoadOptions, load_and_pin, unload};
pub use tracker::{Origin, PinnedTracker};

/// Default pin directory of programs, links and maps (on bpffs).
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/deltabox";

pub use deltabox_client::types::{AttachedProgram, GlobalCounters, InodeRecord};

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
