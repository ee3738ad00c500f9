//! `deltaboxd`: DeltaBox's daemon. Argument parsing and wiring only; the work is in
//! `deltabox_controller::daemon`.

use std::io::{IsTerminal as _, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use deltabox_controller::api::client::DEFAULT_SOCKET;
use deltabox_controller::api::sandbox_render::parse_size;
use deltabox_controller::api::{self, render};
use deltabox_controller::bpf::DEFAULT_PIN_DIR;
use deltabox_controller::cgroup::CgroupFs;
use deltabox_controller::cr::dump::DumpPolicy;
use deltabox_controller::daemon::{self, DEFAULT_METRICS_ADDR, DaemonError, ServeConfig};
use deltabox_controller::sandbox::ManagerConfig;
use deltabox_controller::sandbox::manager::busy::BUSY_WAIT;
use deltabox_controller::sandbox::manager::pool::{
    DEFAULT_MAX_TEMPLATES, PoolConfig, default_max_bytes,
};
use tracing_subscriber::EnvFilter;

const AFTER_HELP: &str = "\
Exit codes:
  0   stopped cleanly (SIGTERM or SIGINT), or load/unload done
  1   any other failure
  2   bad arguments
  64  bad --metrics-addr (not IP:PORT, or not loopback)
  69  the eBPF programs cannot be loaded or adopted, no cgroup2 mount, or the
      sandbox store (--data-dir) cannot be opened (locked by another daemon, say)
  70  internal set-up failure (signal handlers, metrics registry)
  73  cannot create the socket (its directory, bind, or a non-socket file is in the way)
  75  another process owns the socket (its pid is named)
  77  not running as root

Logs go to stderr; set RUST_LOG (default `info`), for example
RUST_LOG=deltabox_controller=debug; the eBPF programs' records have the target
deltabox_ebpf.";

/// DeltaBox's daemon: loads the eBPF write tracker, serves the HTTP/JSON API on a
/// Unix socket and Prometheus metrics on loopback TCP.
///
/// With no subcommand it runs `serve` (the options below are serve's).
#[derive(Parser)]
#[command(name = "deltaboxd", version, args_conflicts_with_subcommands = true, after_help = AFTER_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the API until SIGTERM or SIGINT (the default).
    ///
    /// Loads and pins the eBPF programs, or adopts those already pinned. At exit the
    /// socket is removed and the programs stay pinned (counting goes on) unless
    /// --unload-on-exit is given.
    Serve(Box<ServeArgs>),
    /// Load, attach and pin the eBPF programs, print them, and exit.
    ///
    /// Replaces any deltabox pins already in the pin directory. Do not run it under a
    /// running daemon: that daemon keeps the old maps.
    Load(PinArgs),
    /// Detach and unpin every deltabox program, link and map, print them, and exit.
    Unload(PinArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// Unix socket of the API (its directory is created; the socket is mode 0600).
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Address of the Prometheus endpoint /metrics; must be loopback.
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_METRICS_ADDR)]
    metrics_addr: String,
    /// Also serve the API over TCP at this loopback address (off by default). Unlike
    /// the socket (mode 0600, root only), any local user can reach it.
    #[arg(long, value_name = "ADDR")]
    api_tcp: Option<String>,
    /// Directory on bpffs where programs, links and maps are pinned.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// Only adopt programs already pinned; fail if there are none.
    #[arg(long)]
    adopt_only: bool,
    /// Unload the programs at exit instead of leaving them pinned.
    #[arg(long)]
    unload_on_exit: bool,
    /// Persistent sandbox data: the DeltaFS store (layers) and the checkpoint tree's
    /// database. Best on a reflink filesystem (xfs, btrfs): `cargo xtask setup` mounts
    /// one at /var/lib/deltabox/store.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// Runtime state of sandboxes (mount points, the embedded default base).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_RUN_DIR)]
    run_dir: PathBuf,
    /// cgroup v2 directory under which each tree of sandboxes gets its cgroups
    /// (absolute, or relative to the cgroup2 mount).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_SANDBOX_CGROUP)]
    sandbox_cgroup: PathBuf,
    /// The sandbox init binary (default: `deltabox-init` next to this binary).
    #[arg(long, value_name = "PATH")]
    init_binary: Option<PathBuf>,
    /// Serve no sandboxes (their routes answer 503): only the write tracker.
    #[arg(long)]
    no_sandboxes: bool,
    /// How long a request on a sandbox waits for the operation in progress there to
    /// end before it fails with `busy` (409)
    #[arg(long, value_name = "MS", default_value_t = BUSY_WAIT.as_millis() as u64)]
    busy_wait_ms: u64,
    /// The most live templates (one per session of a checkpoint node) over all
    /// sandboxes; beyond it the least recently used are evicted to their dumps.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_TEMPLATES)]
    pool_max_templates: u64,
    /// The most memory the live templates may own (pages no other process maps:
    /// 512M, 4G, ...); beyond it the least recently used are evicted to their dumps.
    /// Default: a quarter of the machine's memory.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pool_max_bytes: Option<u64>,
    /// When checkpoints are written to disk as dumps: `eager` (in the background after
    /// each checkpoint), `on-evict` (only when the pool evicts a template: a template
    /// that dies otherwise takes its node's processes with it), or `off` (never; the
    /// pool then evicts nothing). The environment variable is read when the flag is
    /// not given.
    #[arg(
        long,
        value_name = "POLICY",
        env = "DELTABOX_DUMP_POLICY",
        default_value = "eager"
    )]
    dump_policy: DumpPolicy,
    /// Warm rollbacks up unless they say otherwise: after the answer, pre-fault the
    /// pages the sessions wrote after the node last time (docs/deltacr.md, "Warm-up").
    #[arg(long)]
    warm_up: bool,
    /// Re-root a checkpoint's templates once they are this many forks from a fresh
    /// process (each rollback adds two, and forks cost more the deeper they are): in the
    /// background, after its dump, from the dump through a shallow template of the tree
    /// or into a fresh process (docs/deltacr.md, "Re-rooting deep lineages"). 0: never.
    /// The environment variable is read when the flag is not given.
    #[arg(
        long,
        value_name = "N",
        env = "DELTABOX_REROOT_GENERATIONS",
        default_value_t = 8
    )]
    reroot_generations: u32,
    /// Leave the host's cgroup2 mount as it is. By default the daemon turns on its
    /// `favordynmods` option, with which moving a process between cgroups (a branch
    /// joining its sandbox's limits, a standby joining its sandbox) costs 0.3 ms instead
    /// of an RCU grace period (8 ms here); on kernel 6.18 it stays on until reboot
    /// (docs/sandboxes.md, "Moving processes between cgroups").
    #[arg(long)]
    no_favordynmods: bool,
    /// Keep standby forks for each sandbox's N most recent nodes (checkpointed or
    /// rolled back to): their sessions forked from the templates in the background, so
    /// that a rollback to one of them skips the fork (docs/deltacr.md, "Standby forks").
    /// Each costs a process per session and a copy of its page tables. 0: none. The
    /// environment variable is read when the flag is not given.
    #[arg(
        long,
        value_name = "N",
        env = "DELTABOX_STANDBY_NODES",
        default_value_t = 3
    )]
    standby_nodes: usize,
}

const DEFAULT_DATA_DIR: &str = "/var/lib/deltabox/store/deltaboxd";
const DEFAULT_RUN_DIR: &str = "/run/deltabox";
const DEFAULT_SANDBOX_CGROUP: &str = "deltabox/trees";

/// The sandbox settings of `args`, paths resolved.
fn sandbox_config(args: &ServeArgs) -> anyhow::Result<Option<ManagerConfig>> {
    if args.no_sandboxes {
        return Ok(None);
    }
    let cgroup = if args.sandbox_cgroup.is_absolute() {
        args.sandbox_cgroup.clone()
    } else {
        CgroupFs::from_mountinfo()?
            .root()
            .join(&args.sandbox_cgroup)
    };
    let init_binary = match &args.init_binary {
        Some(path) => path.clone(),
        None => std::env::current_exe()
            .context("cannot find deltaboxd's own path")?
            .with_file_name("deltabox-init"),
    };
    anyhow::ensure!(
        init_binary.is_file(),
        "the sandbox init binary {} does not exist: build it (`cargo build`) or pass --init-binary",
        init_binary.display()
    );
    Ok(Some(ManagerConfig {
        data_dir: args.data_dir.clone(),
        run_dir: args.run_dir.clone(),
        cgroup,
        init_binary,
        busy_wait: Duration::from_millis(args.busy_wait_ms),
        pool: PoolConfig {
            max_templates: args.pool_max_templates,
            max_bytes: args.pool_max_bytes.unwrap_or_else(default_max_bytes),
            dump_policy: args.dump_policy,
        },
        reroot_generations: args.reroot_generations,
        favor_dynmods: !args.no_favordynmods,
        standby_nodes: args.standby_nodes,
    }))
}

#[derive(Args)]
struct PinArgs {
    /// Directory on bpffs where programs, links and maps are pinned.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let causes = err.chain().map(ToString::to_string);
            eprintln!("deltaboxd: {}", api::join_causes(causes));
            let code = err
                .downcast_ref::<DaemonError>()
                .map_or(1, DaemonError::exit_code);
            ExitCode::from(code)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command.unwrap_or(Command::Serve(Box::new(cli.serve))) {
        Command::Serve(args) => serve(*args),
        Command::Load(args) => {
            let programs = daemon::load(&args.pin_dir)
                .with_context(|| format!("cannot load under {}", args.pin_dir.display()))?;
            if args.json {
                let value = serde_json::json!({ "pin_dir": args.pin_dir, "programs": programs });
                print(&format!("{value}\n"))
            } else {
                print(&render::programs_table(&programs))
            }
        }
        Command::Unload(args) => {
            let unpinned = daemon::unload(&args.pin_dir)
                .with_context(|| format!("cannot unload under {}", args.pin_dir.display()))?;
            if args.json {
                let value = serde_json::json!({ "pin_dir": args.pin_dir, "unpinned": unpinned });
                print(&format!("{value}\n"))
            } else {
                print(&render::unloaded_text(&unpinned))
            }
        }
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    // Checked before anything else so that a non-root run fails with its own code.
    daemon::require_root()?;
    let sandboxes = sandbox_config(&args)?;
    let config = ServeConfig {
        sandboxes,
        metrics_addr: daemon::parse_metrics_addr(&args.metrics_addr)?,
        api_tcp: args
            .api_tcp
            .as_deref()
            .map(daemon::parse_api_tcp_addr)
            .transpose()?,
        socket: args.socket,
        pin_dir: args.pin_dir,
        adopt_only: args.adopt_only,
        unload_on_exit: args.unload_on_exit,
        warm_up: args.warm_up,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    runtime.block_on(daemon::run(config))?;
    Ok(())
}

/// Logs to stderr through `tracing`; `init()` also routes the `log` crate (which
/// carries the eBPF programs' aya-log records) into it.
fn init_tracing() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// Writes to stdout; a closed pipe (`| head`) is not an error.
fn print(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("cannot write to stdout"),
    }
}
