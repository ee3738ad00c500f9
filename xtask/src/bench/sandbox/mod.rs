//! `cargo xtask bench sandbox`: end-to-end checkpoint and rollback latency of DeltaBox
//! sandboxes (issue 6's benchmarks).
//!
//! Set-up and build, start the bench's own `deltaboxd serve` ([`daemon`]), then:
//!
//! 1. the SWE-like trajectory on a real Python project fetched once from PyPI
//!    ([`project`], [`swe`]), under DeltaBox and under a file-only baseline (git, the
//!    interpreter restarted) in alternation;
//! 2. the RL-like micro-benchmark ([`rl`]): short steps, frequent resets, fan-outs.
//!
//! Latencies are taken by this client over raw HTTP on the API socket ([`http`]) and,
//! where the daemon reports them, by the daemon. The figures are printed and written into
//! docs/benchmarks.md ([`report`]). The sandboxes, the daemon, its data directory and
//! cgroup are removed by guards, so also on an error or Ctrl-C.

pub(super) mod cleanup;
mod daemon;
mod http;
mod ops;
mod project;
mod report;
mod rl;
pub(super) mod stats;
mod swe;

use std::process::Command;
use std::time::Duration;

use anyhow::{Result, bail};

use self::daemon::Daemon;
use self::http::Api;
use self::ops::Made;
use self::report::SandboxReport;
use crate::build;
use crate::machine::Facts;
use crate::signals::{check_interrupted, interrupted};
use crate::util::{output, step, target_dir, workspace_root};

/// Options of `cargo xtask bench sandbox`.
#[derive(clap::Args, Debug, Clone)]
pub struct Options {
    /// Steps of the SWE-like trajectory (each system)
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u32).range(5..))]
    pub steps: u32,
    /// Steps of the RL-like micro-benchmark
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(8..))]
    pub rl_steps: u32,
    /// Sandboxes per fan-out in the RL-like micro-benchmark
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub fanout: u32,
    /// Fewer steps (15 and 60) for a run of about two minutes; overrides --steps and
    /// --rl-steps
    #[arg(long)]
    pub quick: bool,
    /// Benchmark a debug build of deltaboxd instead of a release build
    #[arg(long)]
    pub debug: bool,
    /// Seconds to wait for the daemon's API socket
    #[arg(long, default_value_t = 30)]
    pub timeout_secs: u64,
    /// Do not rewrite the figures in docs/benchmarks.md
    #[arg(long)]
    pub no_doc: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            steps: 60,
            rl_steps: 200,
            fanout: 4,
            quick: false,
            debug: false,
            timeout_secs: 30,
            no_doc: false,
        }
    }
}

impl Options {
    fn steps(&self) -> usize {
        if self.quick { 15 } else { self.steps as usize }
    }

    fn rl_steps(&self) -> usize {
        if self.quick {
            60
        } else {
            self.rl_steps as usize
        }
    }

    fn command_line(&self) -> String {
        let mut line = "cargo xtask bench sandbox".to_owned();
        if self.quick {
            line.push_str(" --quick");
        } else {
            if self.steps != 60 {
                line.push_str(&format!(" --steps {}", self.steps));
            }
            if self.rl_steps != 200 {
                line.push_str(&format!(" --rl-steps {}", self.rl_steps));
            }
        }
        if self.fanout != 4 {
            line.push_str(&format!(" --fanout {}", self.fanout));
        }
        if self.debug {
            line.push_str(" --debug");
        }
        line
    }
}

/// Runs the benchmark; prints the figures and writes them into docs/benchmarks.md.
pub fn run(options: &Options) -> Result<()> {
    let result = run_bench(options);
    if result.is_err() {
        println!(
            "==> bench sandbox stopped; cleaned up what it had started (see warnings above, if any)"
        );
    }
    if interrupted() {
        bail!("interrupted");
    }
    result
}

fn run_bench(options: &Options) -> Result<()> {
    let bin = build::build(!options.debug, true)?;
    check_interrupted()?;
    let target = target_dir()?;
    let project = project::fetch(target)?;
    check_interrupted()?;

    step("starting the bench's own deltaboxd serve");
    let daemon = Daemon::start(
        &bin.join("deltaboxd"),
        Duration::from_secs(options.timeout_secs),
    )?;
    println!(
        "  deltaboxd (pid {}) on {}",
        daemon.pid().unwrap_or_default(),
        daemon.socket().display()
    );
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_owned());
    let api = Api::new(daemon.socket());
    let mut made = Made::new(&api);
    let measured = measure(&api, &mut made, &project, options);
    if measured.is_err() && !interrupted() {
        let log = daemon.log_text();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        eprintln!("deltaboxd's log, last lines:");
        for line in tail.iter().rev() {
            eprintln!("  {line}");
        }
    }
    step("cleaning up");
    let removed = made.remove_all();
    drop(made);
    let stopped = daemon.shut_down();
    let (swe, rl) = measured?;
    removed?;
    stopped?;

    let report = SandboxReport {
        command: options.command_line(),
        facts: Facts::collect(),
        profile: if options.debug { "debug" } else { "release" },
        dirty: dirty_sources(),
        load,
        project: format!(
            "{} {} ({} KiB source distribution from PyPI)",
            project::PACKAGE,
            project::VERSION,
            project.bytes.div_ceil(1024)
        ),
        swe,
        rl,
    };
    step("bench sandbox: figures");
    print!("{}", report.text());
    if !options.no_doc {
        let doc = workspace_root().join("docs/benchmarks.md");
        report.write_doc(&doc)?;
        step(format!("wrote the figures into {}", doc.display()));
    }
    Ok(())
}

/// `uncommitted changes in controller/, deltafs-kmod-shim/` when the daemon's sources
/// differ from the commit the report names (other work in the same checkout).
fn dirty_sources() -> Option<String> {
    let status = output(Command::new("git").current_dir(workspace_root()).args([
        "status",
        "--porcelain",
        "--",
        "controller",
        "deltafs-kmod-shim",
    ]))
    .ok()?;
    let mut dirs: Vec<&str> = status
        .lines()
        .filter_map(|l| l.get(3..)?.split('/').next())
        .collect();
    dirs.sort_unstable();
    dirs.dedup();
    (!dirs.is_empty()).then(|| {
        let dirs: Vec<String> = dirs.iter().map(|d| format!("{d}/")).collect();
        format!("uncommitted changes in {}", dirs.join(", "))
    })
}

fn measure(
    api: &Api,
    made: &mut Made,
    project: &project::Project,
    options: &Options,
) -> Result<(swe::Outcome, rl::Figures)> {
    let swe = swe::run(api, made, project, options.steps())?;
    // The trajectory's sandboxes go before the micro-benchmark starts.
    made.remove_all()?;
    check_interrupted()?;
    let rl = rl::run(api, made, options.rl_steps(), options.fanout as usize)?;
    Ok((swe, rl))
}
