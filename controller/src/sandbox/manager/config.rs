//! What the sandbox manager is configured with.

use std::path::PathBuf;

use super::pool;

/// Where the manager keeps things.
#[derive(Clone, Debug)]
pub struct ManagerConfig {
    /// Persistent data: the DeltaFS store (`<data_dir>/store`) and the tree database
    /// (`<data_dir>/tree.redb`). Best on a reflink filesystem.
    pub data_dir: PathBuf,
    /// Runtime state (mount points, the default base): `<run_dir>/trees/<tree>`,
    /// `<run_dir>/base`.
    pub run_dir: PathBuf,
    /// The cgroup v2 directory under which each tree gets one (absolute).
    pub cgroup: PathBuf,
    /// The `deltabox-init` binary.
    pub init_binary: PathBuf,
    /// How long a request waits for another operation on the same sandbox before it
    /// fails with `busy`.
    pub busy_wait: std::time::Duration,
    /// The template pool's bounds and the dump policy.
    pub pool: pool::PoolConfig,
    /// A node whose session template is this many forks deep or more
    /// ([`Template::generation`]) is re-rooted in the background once dumped
    /// (`tree_ops/reroot.rs`); 0: never.
    pub reroot_generations: u32,
    /// Turn on cgroup2's `favordynmods` at start-up, which makes a move between
    /// cgroups cost 0.3 ms instead of an RCU grace period ([`crate::cgroup::favor_dynamic_moves`]).
    pub favor_dynmods: bool,
    /// Standby forks are kept for each sandbox's this many most recent nodes
    /// (`standby.rs`); 0: none.
    pub standby_nodes: usize,
}
