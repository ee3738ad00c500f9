//! Request and response bodies of the API, shared by the server and the client.
//! `controller/api/openapi.yaml` documents them; a test checks the two agree.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Body of the cgroup requests (`watch`, `unwatch`, `epoch`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CgroupRequest {
    /// Absolute path inside the cgroup2 mount, or a path relative to the mount.
    pub path: String,
}

/// A watched cgroup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchedCgroup {
    /// Absolute path of its directory, or `<unknown cgroup ID>` if it cannot be found.
    pub path: String,
    /// cgroup v2 id (inode number of the directory).
    pub id: u64,
    /// Current epoch: the counts are since this epoch began.
    pub epoch: u64,
}

/// `GET /v1/cgroups`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupsResponse {
    /// Watched cgroups, sorted by path.
    pub watched: Vec<WatchedCgroup>,
}

/// Query of `GET /v1/inode-stats`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InodeStatsQuery {
    /// Only this cgroup (a path as in [`CgroupRequest`]); every watched one if absent.
    pub cgroup: Option<String>,
}

/// Counters of one inode written by one cgroup in its current epoch: the tracker's
/// record plus the cgroup's path, as one flat JSON object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InodeStat {
    /// Path of the cgroup's directory (or `<unknown cgroup ID>`).
    pub cgroup_path: String,
    /// The counters, with the cgroup id, inode, epoch and name.
    #[serde(flatten)]
    pub record: InodeRecord,
}

/// `GET /v1/inode-stats`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InodeStatsResponse {
    /// Sorted by cgroup id, then inode.
    pub stats: Vec<InodeStat>,
}

/// The eBPF side of `GET /v1/status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BpfStatus {
    /// Where programs, links and maps are pinned.
    pub pin_dir: PathBuf,
    /// Whether this daemon loaded the programs or adopted pinned ones.
    pub origin: Origin,
    /// The attached programs.
    pub programs: Vec<AttachedProgram>,
}

/// `GET /v1/status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusResponse {
    /// Daemon version.
    pub version: String,
    /// Daemon pid.
    pub pid: u32,
    /// Seconds since the daemon started.
    pub uptime_secs: u64,
    /// The API's Unix socket.
    pub socket: PathBuf,
    /// Where `/metrics` is served (loopback TCP address).
    pub metrics_addr: String,
    /// The eBPF programs.
    pub bpf: BpfStatus,
    /// Watched cgroups, sorted by path.
    pub watched: Vec<WatchedCgroup>,
    /// Totals since the programs were loaded.
    pub counters: GlobalCounters,
}

/// Body of every error response.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong, naming the object (lower case, no final period).
    pub error: String,
    /// Machine-readable kind, snake_case (the daemon's `ErrorKind`).
    pub kind: String,
}

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

/// How the daemon got its eBPF programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// Loaded and attached now.
    Loaded,
    /// Found pinned and adopted.
    Adopted,
}
