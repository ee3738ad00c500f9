//! The CLI's arguments, all in one place; the handlers are in `commands/`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use deltabox_controller::api::client::DEFAULT_SOCKET;

const AFTER_HELP: &str = "\
CGROUP_PATH is an absolute path inside the cgroup2 mount (for instance
/sys/fs/cgroup/unified/deltabox/demo) or a path relative to that mount
(deltabox/demo); the daemon finds the mount in /proc/self/mountinfo.

Exit codes:
  0  success
  1  any other failure (writing the output, for instance)
  2  bad arguments
  3  deltaboxd is not running (no socket, or nothing listens on it)
  4  permission denied on the socket (run as root)
  5  the daemon refused the request (unknown cgroup, not watched, bad input)
  6  the daemon failed, answered something unexpected, or timed out";

/// Client of deltaboxd, DeltaBox's daemon: watch cgroups, advance their epochs, and
/// read the per-inode write counters its eBPF programs keep.
#[derive(Parser)]
#[command(name = "deltabox", version, after_help = AFTER_HELP)]
pub struct Cli {
    /// The daemon's API socket.
    #[arg(
        long,
        global = true,
        value_name = "PATH",
        env = "DELTABOX_SOCKET",
        default_value = DEFAULT_SOCKET
    )]
    pub socket: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Show the daemon, its eBPF programs, watched cgroups and global counters.
    Status(StatusArgs),
    /// Start counting the writes of a cgroup (no-op if already watched).
    Watch(CgroupArgs),
    /// Stop counting a cgroup and drop its counters.
    Unwatch(CgroupArgs),
    /// Advance a watched cgroup's epoch: its counts restart at zero.
    Epoch(CgroupArgs),
    /// Per-inode write counters of the current epochs.
    InodeStats(InodeStatsArgs),
}

#[derive(Args)]
pub struct StatusArgs {
    /// Print the API's JSON as is.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct CgroupArgs {
    /// The cgroup: absolute path inside the cgroup2 mount, or relative to the mount.
    #[arg(value_name = "CGROUP_PATH")]
    pub cgroup: String,
    /// Print the API's JSON as is.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct InodeStatsArgs {
    /// Only this watched cgroup (absolute, or relative to the cgroup2 mount).
    #[arg(long, value_name = "CGROUP_PATH")]
    pub cgroup: Option<String>,
    /// Print the API's JSON as is.
    #[arg(long)]
    pub json: bool,
}
