//! `cargo xtask demo`: DeltaBox end to end on this machine.
//!
//! Set-up and build, start `deltaboxd serve` on a socket in a temporary directory (its
//! own pin directory, sandbox data directory and cgroup), then:
//!
//! 1. a tree search on the embedded default sandbox ([`tree_search`]): checkpoint,
//!    branch, roll back, with each operation's latency and the share of time spent in
//!    state management;
//! 2. the write tracker: create a cgroup `deltabox-demo-<pid>` and have the daemon
//!    watch it, run a real workload in it (`sh` writing files of different sizes under
//!    `target/`, on the disk: `/tmp` may be a tmpfs), print what the tracker counted
//!    per file, advance the epoch, write again and print again to show the counts
//!    restart.
//!
//! Cleanup (remove the sandboxes, unwatch, SIGTERM the daemon, remove the cgroups, the
//! sandbox data and the files) is done by guards, so it also happens on an error or
//! Ctrl-C.

mod daemon;
mod tree_search;
mod workload;

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};

use self::daemon::{Cli, Daemon, SandboxDirs, Watch};
use self::workload::{FIRST, SECOND};
use crate::cgroup::{Cgroup, cgroup2_mount};
use crate::setup::BPFFS;
use crate::signals::{catch_interrupts, check_interrupted, interrupted};
use crate::util::{TempDir, step, target_dir};
use crate::{build, setup};

/// Where the demo's sandbox data goes: the reflink store `cargo xtask setup` mounts.
const DEMO_DATA_ROOT: &str = "/var/lib/deltabox/store";

/// Options of `cargo xtask demo`.
#[derive(clap::Args, Debug)]
pub struct Options {
    /// Seconds to wait for the daemon's API socket
    #[arg(long, default_value_t = 30)]
    pub timeout_secs: u64,
}

pub fn run(options: &Options) -> Result<()> {
    catch_interrupts()?;
    let result = run_demo(options);
    if result.is_err() {
        // The guards inside run_demo have unwatched, stopped the daemon and removed the
        // cgroup and files by now; each printed a warning if it could not.
        println!("==> demo stopped; cleaned up what it had started (see warnings above, if any)");
    }
    if interrupted() {
        // A child killed by the same Ctrl-C makes a less useful error than this.
        bail!("interrupted");
    }
    result
}

fn run_demo(options: &Options) -> Result<()> {
    setup::run(&setup::Options { quiet: true })?;
    let bin = build::build(false, true)?;
    check_interrupted()?;

    let pid = std::process::id();
    // Declared in reverse order of cleanup: the watch goes first, then the daemon, the
    // cgroup, and the files.
    let files = TempDir::new(target_dir()?, &format!("deltabox-demo-{pid}-"))?;
    let run_dir = TempDir::new(&std::env::temp_dir(), "deltabox-demo-")?;
    let cgroup = Cgroup::create(&cgroup2_mount()?, &format!("deltabox-demo-{pid}"))?;
    step(format!(
        "starting deltaboxd serve --socket {}",
        run_dir.path().join("api.sock").display()
    ));
    let pin_dir = Path::new(BPFFS).join(format!("deltabox-demo-{pid}"));
    let data_dir = TempDir::new(Path::new(DEMO_DATA_ROOT), &format!("demo-{pid}-"))?;
    let sandboxes = SandboxDirs {
        data_dir: data_dir.path().to_owned(),
        run_dir: run_dir.path().join("run"),
        cgroup: cgroup2_mount()?.join(format!("deltabox-demo-{pid}-trees")),
    };
    let mut daemon = Daemon::start(
        &bin.join("deltaboxd"),
        run_dir.path(),
        &pin_dir,
        &sandboxes,
        Duration::from_secs(options.timeout_secs),
    )?;
    let cli = Cli::new(bin.join("deltabox"), daemon.socket());
    let status = cli.status()?;
    println!(
        "  deltaboxd {} (pid {}): {} programs attached, pinned in {}, metrics on http://{}/metrics",
        status.version,
        status.pid,
        status.bpf.programs.len(),
        status.bpf.pin_dir.display(),
        status.metrics_addr
    );

    let mut made = Vec::new();
    let searched = tree_search::run(&cli, &mut made);
    for sandbox in &made {
        if let Err(e) = cli.value(&["rm", sandbox]) {
            eprintln!("warning: cannot remove sandbox {sandbox}: {e:#}");
        }
    }
    searched?;
    check_interrupted()?;

    step("the eBPF write tracker on a cgroup of its own");
    let (mut watch, watched) = Watch::start(&cli, cgroup.path())?;
    let id = cgroup.id()?;
    if watched.id != id {
        bail!(
            "the daemon reports id {} for {}, whose directory is inode {id}",
            watched.id,
            cgroup.path().display()
        );
    }
    step(format!(
        "watching cgroup {} (id {}, epoch {})",
        watched.path, watched.id, watched.epoch
    ));
    check_interrupted()?;

    step(format!(
        "workload in the cgroup: sh writes {} in {}",
        FIRST.files.join(", "),
        files.path().display()
    ));
    let inodes = workload::run(&FIRST, &cgroup, files.path())?;
    let stats = cli.inode_stats(cgroup.path())?;
    workload::print_table(&FIRST, &inodes, &stats, watched.epoch)?;
    check_interrupted()?;

    let advanced = cli.epoch(cgroup.path())?;
    step(format!(
        "epoch advanced to {} (what a checkpoint does); workload writes {}",
        advanced.epoch,
        SECOND.files.join(", ")
    ));
    let inodes = workload::run(&SECOND, &cgroup, files.path())?;
    let stats = cli.inode_stats(cgroup.path())?;
    workload::print_table(&SECOND, &inodes, &stats, advanced.epoch)?;
    check_interrupted()?;

    step("cleaning up");
    watch.stop().context("cannot unwatch the demo cgroup")?;
    drop(watch);
    println!("  unwatched {}", cgroup.path().display());
    let daemon_pid = daemon.pid();
    let how = daemon.stop()?;
    println!("  deltaboxd (pid {}) {how}", daemon_pid.unwrap_or_default());
    let trees = sandboxes.cgroup.clone();
    if trees.exists() {
        std::fs::remove_dir(&trees)
            .with_context(|| format!("cannot remove the demo's cgroup {}", trees.display()))?;
    }
    let data_path = data_dir.path().to_owned();
    data_dir.remove()?;
    println!("  removed the sandbox data {}", data_path.display());
    let cgroup_path = cgroup.path().to_owned();
    cgroup.remove()?;
    println!("  removed cgroup {}", cgroup_path.display());
    let (files_path, run_path) = (files.path().to_owned(), run_dir.path().to_owned());
    files.remove()?;
    run_dir.remove()?;
    println!(
        "  removed {} and {}",
        files_path.display(),
        run_path.display()
    );
    Ok(())
}
