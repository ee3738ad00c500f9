//! DeltaBox's controller library: everything `deltaboxd` and `deltabox` do, so that
//! the binaries stay argument parsing and wiring, and tests call the logic directly.
//!
//! - [`bpf`]: the eBPF write tracker (load, pin, adopt, unload, read the counters).
//! - [`cgroup`]: cgroup v2 paths and ids.
//! - [`cr`]: DeltaCR, process checkpoint and rollback by template fork.
//! - [`api`]: the HTTP/JSON API: types, server, client.
//! - [`daemon`]: the daemon's configuration and run loop.
//! - [`foreground`]: state operations first, background threads wait for them.
//! - [`metrics`]: the Prometheus metrics.
//! - [`sandbox`]: sandboxes: namespaces, cgroups, DeltaFS roots, commands, sessions.
//! - [`tree`]: the checkpoint tree's records in an embedded database.

pub mod api;
pub mod bpf;
pub mod cgroup;
pub mod cr;
pub mod daemon;
pub mod foreground;
pub mod metrics;
pub mod sandbox;
pub mod tree;
