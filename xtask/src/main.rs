//! `cargo xtask`: DeltaBox's developer tasks, one module and one options struct per
//! subcommand (the layout of aya's xtask). Reached through the alias in
//! `.cargo/config.toml`.
//!
//! Every task except `setup` itself runs set-up first, so one command works on a fresh
//! machine.

mod bench;
mod build;
mod build_and_load;
mod cgroup;
mod conformance;
mod demo;
mod fstarget;
mod machine;
mod sdk;
mod setup;
mod signals;
mod table;
mod test;
mod util;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "DeltaBox developer tasks")]
struct XtaskOptions {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install and check everything DeltaBox needs on this machine (idempotent)
    Setup(setup::Options),
    /// Build the eBPF programs and the userspace crates
    Build(build::Options),
    /// Build, then load and attach the eBPF programs on this kernel (or detach them)
    BuildAndLoad(build_and_load::Options),
    /// Run every quality gate: fmt, clippy, build, unit tests, integration tests, conformance
    Test(test::Options),
    /// pjdfstest and fsx on ext4, overlayfs and DeltaFS; tally into docs/conformance.md
    Conformance(conformance::Options),
    /// Benchmarks (`fs`: ext4, xfs, overlayfs and DeltaFS side by side; `sandbox`:
    /// end-to-end checkpoint and rollback; `cr`: DeltaCR's checkpoint, rollback and
    /// fallback latency by memory size and page kind); figures into docs/benchmarks.md
    Bench(bench::Options),
    /// Start the daemon, run a tree search on the default sandbox (checkpoint, branch,
    /// roll back, with latencies), then track a real workload's writes in a cgroup
    Demo(demo::Options),
}

/// Exit codes: 0 success, 1 the task failed (the message says which step and why), 2 bad
/// arguments (clap's own code).
fn main() -> ExitCode {
    let options = XtaskOptions::parse();
    let result = match options.command {
        Command::Setup(options) => setup::run(&options).map(drop),
        Command::Build(options) => build::run(&options).map(drop),
        Command::BuildAndLoad(options) => build_and_load::run(&options),
        Command::Test(options) => test::run(&options),
        Command::Conformance(options) => conformance::run(&options),
        Command::Bench(options) => bench::run(&options),
        Command::Demo(options) => demo::run(&options),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn the_command_line_is_well_formed() {
        XtaskOptions::command().debug_assert();
        let parsed = XtaskOptions::try_parse_from(["xtask", "bench"]).unwrap();
        assert!(matches!(parsed.command, Command::Bench(_)));
        let parsed =
            XtaskOptions::try_parse_from(["xtask", "bench", "cr", "--sizes", "64,256"]).unwrap();
        assert!(matches!(parsed.command, Command::Bench(_)));
        let parsed =
            XtaskOptions::try_parse_from(["xtask", "conformance", "--target", "deltafs-deep"])
                .unwrap();
        assert!(matches!(parsed.command, Command::Conformance(_)));
    }
}
