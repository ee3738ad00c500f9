//! The CLI's arguments, all in one place; the handlers are in `commands/`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use deltabox_controller::api::client::DEFAULT_SOCKET;
pub use deltabox_controller::api::sandbox_render::parse_size;

const AFTER_HELP: &str = "\
SANDBOX, NODE and SESSION are full ids or any unique prefix of one.

CGROUP_PATH is an absolute path inside the cgroup2 mount (for instance
/sys/fs/cgroup/unified/deltabox/demo) or a path relative to that mount
(deltabox/demo); the daemon finds the mount in /proc/self/mountinfo.

Example:
  sb=$(deltabox create --memory 2G --cpus 1.5)
  deltabox exec $sb -- pip install requests
  node=$(deltabox checkpoint $sb --label installed)
  deltabox exec $sb -- rm -rf /usr/lib/python3
  deltabox rollback $sb $node

Exit codes (`exec` and `session run` exit with the command's own code instead
when the daemon ran it):
  0  success
  1  any other failure (writing the output, reading stdin, for instance)
  2  bad arguments
  3  deltaboxd is not running (no socket, or nothing listens on it)
  4  permission denied on the socket (run as root)
  5  the daemon refused the request (unknown or ambiguous id, bad input, wrong state)
  6  the daemon failed, answered something unexpected, or timed out";

/// Client of deltaboxd, DeltaBox's daemon: create sandboxes, run commands and
/// sessions in them, checkpoint, roll back and branch them; watch cgroups and read
/// the per-inode write counters its eBPF programs keep.
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
    /// Create a sandbox and print its id.
    #[command(
        after_help = "Example:\n  deltabox create --memory 2G --cpus 1.5 --pids 512\n  deltabox create --rootfs ./debian-root --auto-checkpoint"
    )]
    Create(CreateArgs),
    /// List the sandboxes.
    #[command(
        after_help = "Example:\n  deltabox ls\n  deltabox ls --json | jq -r '.sandboxes[].id'"
    )]
    Ls(JsonArgs),
    /// Show the daemon (its eBPF programs, watched cgroups, counters), or one sandbox.
    #[command(after_help = "Example:\n  deltabox status\n  deltabox status 0193a")]
    Status(StatusArgs),
    /// Run a one-shot command in a sandbox; exits with its exit code.
    #[command(after_help = "\
The command's stdout and stderr go to this process's stdout and stderr as the
command writes them (streamed by the daemon; --json collects them instead). The
exit code is the command's, 128+N if signal N killed it, 124 if the timeout did.

Example:
  deltabox exec 0193a --cwd /workspace --env DEBUG=1 -- python3 -c 'print(1)'")]
    Exec(ExecArgs),
    /// Persistent bash or python sessions: start, run code, stop.
    #[command(after_help = "\
A session keeps its interpreter's state (variables, imports, working directory)
from one run to the next, and checkpoints and rollbacks include it.

Example:
  s=$(deltabox session start 0193a --kind python)
  deltabox session run 0193a $s 'import json; x = 41'
  deltabox session run 0193a $s 'print(x + 1)'
  deltabox session stop 0193a $s")]
    Session(SessionArgs),
    /// Checkpoint a sandbox's files and sessions together; prints the node id.
    #[command(
        after_help = "The node id goes to stdout, the time it took to stderr.\n\nExample:\n  node=$(deltabox checkpoint 0193a --label 'deps installed')"
    )]
    Checkpoint(CheckpointArgs),
    /// Roll a sandbox back to a node of its tree (files and processes by default).
    #[command(
        after_help = "Example:\n  deltabox rollback 0193a 0193b\n  deltabox rollback 0193a 0193b --files-only"
    )]
    Rollback(RollbackArgs),
    /// New sandboxes from a node; prints their ids, one per line.
    #[command(
        after_help = "Example:\n  for sb in $(deltabox branch 0193b --count 4); do deltabox exec $sb -- ./try.sh; done"
    )]
    Branch(BranchArgs),
    /// Draw the checkpoint tree of a sandbox or of a node.
    #[command(after_help = "Example:\n  deltabox tree 0193a")]
    Tree(TreeArgs),
    /// Files added (+), removed (-) and modified (~) from one node to another.
    #[command(after_help = "Example:\n  deltabox diff 0193b 0193c")]
    Diff(DiffArgs),
    /// Remove sandboxes, or with --node a node and its subtree.
    #[command(after_help = "\
Removing a sandbox stops its processes and drops its root view and cgroups; its
nodes stay (branch from them later). Removing a node removes its subtree; a node
that a live sandbox is at cannot be removed. The ids are removed in order; the
first failure stops the command.

Example:
  deltabox rm 0193a 0193f
  deltabox rm --node 0193b")]
    Rm(RmArgs),
    /// Drop layers no node or sandbox uses, and trees left empty.
    #[command(after_help = "Example:\n  deltabox rm --node 0193b && deltabox gc")]
    Gc(JsonArgs),
    /// Start counting the writes of a cgroup (no-op if already watched).
    Watch(CgroupArgs),
    /// Stop counting a cgroup and drop its counters.
    Unwatch(CgroupArgs),
    /// Advance a watched cgroup's epoch: its counts restart at zero.
    Epoch(CgroupArgs),
    /// Per-inode write counters of the current epochs.
    InodeStats(InodeStatsArgs),
    /// Latency percentiles since the daemon started, and what the sandboxes cost.
    #[command(after_help = "\
Per operation (checkpoint, rollback, branch, exec, session run): count since the
daemon started, p50/p90/p99 over the last 4096, max over all. Then sandboxes,
trees, nodes, templates live and gone, the memory the live templates own and the
disk the DeltaFS layers use.

Example:
  deltabox stats
  deltabox stats --json | jq '.operations[] | select(.operation == \"checkpoint\")'")]
    Stats(JsonArgs),
}

#[derive(Args)]
pub struct StatusArgs {
    /// Show this sandbox instead of the daemon.
    #[arg(value_name = "SANDBOX")]
    pub sandbox: Option<String>,
    /// Print the API's JSON as is.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct JsonArgs {
    /// Print the API's JSON as is.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct CreateArgs {
    /// A root tree to layer the sandbox over (a debootstrap, an unpacked OCI image);
    /// default: the host's system directories read-only, with empty /root, /tmp,
    /// /home and /workspace.
    #[arg(long, value_name = "DIR")]
    pub rootfs: Option<PathBuf>,
    /// Memory limit: bytes, or with K, M, G, T (powers of 1024; KiB, MB... also
    /// accepted), for instance 512M, 2G, 1.5GiB.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub memory: Option<u64>,
    /// CPU limit, in CPUs (for instance 1.5).
    #[arg(long, value_name = "CPUS", value_parser = parse_cpus)]
    pub cpus: Option<f64>,
    /// Most processes at once.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub pids: Option<u64>,
    /// End every exec and session run with a checkpoint (a node per tool call).
    #[arg(long)]
    pub auto_checkpoint: bool,
    /// Print the API's JSON as is.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct ExecArgs {
    /// The sandbox.
    #[arg(value_name = "SANDBOX")]
    pub sandbox: String,
    /// Working directory in the sandbox (default /workspace).
    #[arg(long, value_name = "DIR")]
    pub cwd: Option<String>,
    /// Extra environment variable; repeat for more.
    #[arg(long = "env", short = 'e', value_name = "K=V", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// Kill the command after this many seconds (default: the daemon's, 600).
    #[arg(long, value_name = "SECONDS", value_parser = parse_seconds)]
    pub timeout: Option<u64>,
    /// Print the API's JSON (exit code, output, timing) once the command ended, not
    /// streamed, and exit 0.
    #[arg(long)]
    pub json: bool,
    /// The command and its arguments, after `--`.
    #[arg(value_name = "CMD", required = true, num_args = 1.., trailing_var_arg = true, allow_hyphen_values = true)]
    pub argv: Vec<String>,
}

#[derive(Args)]
pub struct SessionArgs {
    #[command(subcommand)]
    pub command: SessionCommand,
}

#[derive(Subcommand)]
pub enum SessionCommand {
    /// Start a session; prints its id.
    #[command(after_help = "Example:\n  s=$(deltabox session start 0193a --kind python)")]
    Start(SessionStartArgs),
    /// Run code in a session; exits with its status.
    #[command(after_help = "\
Variables, imports, the working directory survive from one run to the next.
The status is bash's $? of the last command, or for python 0, 1 for an uncaught
exception, 130 when interrupted, or the SystemExit code; 124 if the timeout
interrupted it.

Example:
  deltabox session run 0193a 0193d 'x = 41'
  echo 'print(x + 1)' | deltabox session run 0193a 0193d -")]
    Run(SessionRunArgs),
    /// Stop a session.
    #[command(after_help = "Example:\n  deltabox session stop 0193a 0193d")]
    Stop(SessionStopArgs),
}

#[derive(Args)]
pub struct SessionStartArgs {
    /// The sandbox.
    #[arg(value_name = "SANDBOX")]
    pub sandbox: String,
    /// The interpreter.
    #[arg(long, value_enum, default_value_t = SessionKind::Bash)]
    pub kind: SessionKind,
    /// Print the API's JSON as is.
    #[arg(long)]
    pub json: bool,
}

/// Session interpreters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SessionKind {
    /// bash.
    Bash,
    /// python3.
    Python,
}

#[derive(Args)]
pub struct SessionRunArgs {
    /// The sandbox.
    #[arg(value_name = "SANDBOX")]
    pub sandbox: String,
    /// The session.
    #[arg(value_name = "SESSION")]
    pub session: String,
    /// The code; `-` (the default) reads it from stdin.
    #[arg(value_name = "CODE", default_value = "-")]
    pub code: String,
    /// Interrupt the code (not the session) after this many seconds (default 600).
    #[arg(long, value_name = "SECONDS", value_parser = parse_seconds)]
    pub timeout: Option<u64>,
    /// Print the API's JSON and exit 0.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct SessionStopArgs {
    /// The sandbox.
    #[arg(value_name = "SANDBOX")]
    pub sandbox: String,
    /// The session.
    #[arg(value_name = "SESSION")]
    pub session: String,
    /// Print the API's JSON as is.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct CheckpointArgs {
    /// The sandbox.
    #[arg(value_name = "SANDBOX")]
    pub sandbox: String,
    /// A label shown in the tree.
    #[arg(long, value_name = "LABEL")]
    pub label: Option<String>,
    /// Print the API's JSON as is.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct RollbackArgs {
    /// The sandbox.
    #[arg(value_name = "SANDBOX")]
    pub sandbox: String,
    /// The node to go back to (any node of the sandbox's tree).
    #[arg(value_name = "NODE")]
    pub node: String,
    /// Restore only the files; the processes keep running.
    #[arg(long, conflicts_with = "processes_only")]
    pub files_only: bool,
    /// Restore only the processes (sessions); the files stay as they are.
    #[arg(long)]
    pub processes_only: bool,
    /// After the answer, pre-fault the pages the sessions wrote after this node last
    /// time (the next command waits for it); default: the daemon's `--warm-up`.
    #[arg(long, conflicts_with = "no_warm_up")]
    pub warm_up: bool,
    /// No warm-up, whatever the daemon's default.
    #[arg(long)]
    pub no_warm_up: bool,
    /// Print the API's JSON as is.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct BranchArgs {
    /// The node to branch from.
    #[arg(value_name = "NODE")]
    pub node: String,
    /// How many sandboxes (1 to 64).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub count: u32,
    /// Print the API's JSON as is.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct TreeArgs {
    /// A sandbox, or a node.
    #[arg(value_name = "SANDBOX|NODE")]
    pub id: String,
    /// Print the API's JSON as is.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct DiffArgs {
    /// The older node.
    #[arg(value_name = "FROM")]
    pub from: String,
    /// The newer node.
    #[arg(value_name = "TO")]
    pub to: String,
    /// Print the API's JSON as is.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct RmArgs {
    /// Sandboxes, or with --node nodes.
    #[arg(value_name = "ID", required = true)]
    pub ids: Vec<String>,
    /// The ids are nodes: remove each and its subtree.
    #[arg(long)]
    pub node: bool,
    /// Print one JSON object with everything removed.
    #[arg(long)]
    pub json: bool,
}

/// A CPU count: a positive number.
pub fn parse_cpus(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(cpus) if cpus.is_finite() && cpus > 0.0 => Ok(cpus),
        _ => Err(format!(
            "{text:?} is not a CPU count: use a number above 0, like 1.5"
        )),
    }
}

/// Seconds (a non-negative number, fractions allowed) as milliseconds.
pub fn parse_seconds(text: &str) -> Result<u64, String> {
    match text.trim().parse::<f64>() {
        // Anything above u64::MAX ms saturates, which is what "forever" means here.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        Ok(secs) if secs.is_finite() && secs > 0.0 => Ok((secs * 1000.0).ceil() as u64),
        _ => Err(format!(
            "{text:?} is not a timeout: use seconds above 0, like 30 or 0.5"
        )),
    }
}

/// `K=V` (the value may be empty or contain `=`).
pub fn parse_env(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("{text:?} is not K=V")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("64KB"), Ok(64 << 10));
        assert_eq!(parse_size("1Ti"), Ok(1 << 40));
        for bad in ["", "G", "2X", "1.2.3M", "-1G", "2 GB extra"] {
            let err = parse_size(bad).unwrap_err();
            assert!(err.contains("is not a size"), "{bad}: {err}");
        }
        assert!(parse_size("0").unwrap_err().contains("out of range"));
        assert!(
            parse_size("99999999T")
                .unwrap_err()
                .contains("out of range")
        );
    }

    #[test]
    fn parses_cpus_seconds_and_env() {
        assert_eq!(parse_cpus("1.5"), Ok(1.5));
        assert!(parse_cpus("0").is_err());
        assert!(parse_cpus("many").is_err());
        assert_eq!(parse_seconds("30"), Ok(30_000));
        assert_eq!(parse_seconds("0.5"), Ok(500));
        assert!(parse_seconds("-1").is_err());
        assert_eq!(parse_env("A=b=c"), Ok(("A".into(), "b=c".into())));
        assert_eq!(parse_env("A="), Ok(("A".into(), String::new())));
        assert!(parse_env("=x").is_err());
        assert!(parse_env("A").is_err());
    }

    #[test]
    fn the_cli_is_well_formed() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
    }

    #[test]
    fn exec_takes_everything_after_the_sandbox() {
        let cli = Cli::try_parse_from([
            "deltabox", "exec", "sb", "--env", "A=1", "--", "ls", "-la", "--json",
        ])
        .unwrap();
        let Command::Exec(args) = cli.command else {
            panic!("not exec")
        };
        assert_eq!(args.argv, ["ls", "-la", "--json"]);
        assert_eq!(args.env, [("A".to_owned(), "1".to_owned())]);
        assert!(!args.json);
        let err = Cli::try_parse_from(["deltabox", "create", "--memory", "2X"])
            .err()
            .unwrap();
        assert!(err.to_string().contains("is not a size"), "{err}");
        let err = Cli::try_parse_from([
            "deltabox",
            "rollback",
            "a",
            "b",
            "--files-only",
            "--processes-only",
        ]);
        assert!(err.is_err());
    }
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
