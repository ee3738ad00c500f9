//! The runtime's public types: a tree's configuration, limits, spawn requests and
//! results, exit statuses, and the error type.

use std::{fs::File, io, os::fd::OwnedFd, path::PathBuf, time::Duration};

use nix::unistd::Pid;

use super::{CgroupSetupError, ProtoError};

/// Where a tree lives on the host.
#[derive(Clone, Debug)]
pub struct TreeConfig {
    /// The tree's id (names it in errors).
    pub id: String,
    /// Host directory of the tree: `root/` (the tree's `/`), `init.sock`.
    pub run_dir: PathBuf,
    /// The tree's cgroup v2 directory (created with its parents).
    pub cgroup: PathBuf,
    /// The `deltabox-init` binary.
    pub init_binary: PathBuf,
}

/// A sandbox's resource limits (None: unlimited).
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Limits {
    /// Memory (no swap beyond it), bytes.
    pub memory_bytes: Option<u64>,
    /// CPU bandwidth in CPUs (1.5 = one and a half cores).
    pub cpus: Option<f64>,
    /// Maximum number of tasks.
    pub pids: Option<u64>,
}

/// A command to run in a sandbox.
#[derive(Clone, Debug)]
pub struct SpawnRequest {
    /// The command line; argv\[0\] without a slash is searched in env's `PATH`.
    pub argv: Vec<String>,
    /// The whole environment.
    pub env: Vec<(String, String)>,
    /// Working directory inside the sandbox.
    pub cwd: PathBuf,
    /// Whether to give the command a stdin pipe (else /dev/null).
    pub stdin: bool,
}

/// A running command.
#[derive(Debug)]
pub struct Spawned {
    /// Its pid in the tree's pid namespace.
    pub ns_pid: i32,
    /// Its pid on the host.
    pub host_pid: Pid,
    /// A pidfd of it.
    pub pidfd: OwnedFd,
    /// The write end of its stdin, if asked for.
    pub stdin: Option<File>,
    /// The read end of its stdout.
    pub stdout: File,
    /// The read end of its stderr.
    pub stderr: File,
}

/// How a process of the tree ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// It was killed by this signal.
    Signal(i32),
}

/// Why a runtime operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// A host file operation failed.
    #[error("tree {tree}: {op} {}: {source}", path.display())]
    Io {
        /// The tree.
        tree: String,
        /// What was done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// A cgroup operation failed.
    #[error("tree {tree}: {source}")]
    Cgroup {
        /// The tree.
        tree: String,
        /// What failed.
        #[source]
        source: CgroupSetupError,
    },
    /// Talking to init failed.
    #[error("tree {tree}: {source}")]
    Proto {
        /// The tree.
        tree: String,
        /// What failed.
        #[source]
        source: ProtoError,
    },
    /// Init could not set up the tree's namespaces.
    #[error("tree {tree}: init failed to start: {error}")]
    InitSetup {
        /// The tree.
        tree: String,
        /// Init's message.
        error: String,
    },
    /// Init exited or closed its control socket.
    #[error("tree {tree}: init (host pid {pid}) is gone")]
    InitGone {
        /// The tree.
        tree: String,
        /// Init's host pid (0 if it never said).
        pid: i32,
    },
    /// Init did not answer in time.
    #[error("tree {tree}: init (host pid {pid}) did not answer {what} within {timeout:?}")]
    Timeout {
        /// The tree.
        tree: String,
        /// Init's host pid.
        pid: i32,
        /// The request.
        what: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// No such sandbox in this tree.
    #[error("tree {tree}: unknown sandbox {sandbox}")]
    UnknownSandbox {
        /// The tree.
        tree: String,
        /// The name asked for.
        sandbox: String,
    },
    /// The sandbox name cannot be a path component.
    #[error("bad sandbox name {0:?} (letters, digits, '-', '_' and '.' only)")]
    BadName(String),
    /// Init refused or failed a request; its message names the problem.
    #[error("tree {tree}: {error}")]
    Init {
        /// The tree.
        tree: String,
        /// Init's message.
        error: String,
    },
}
