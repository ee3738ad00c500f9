//! `cargo xtask test`: every quality gate, in order, stopping at the first failure:
//! set-up, `cargo fmt --check`, clippy with warnings denied, the workspace build, unit
//! tests, the root integration tests (`tests/`, package `deltabox-tests`), the Python
//! SDK's checks and tests against a real daemon (`sdk/python`), then the conformance suites (pjdfstest and fsx on ext4, overlayfs and DeltaFS: see
//! `conformance/`). Prints a summary of the steps and their durations either way.
//! `.ci/run` runs exactly this.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::signals::catch_interrupts;

use crate::util::{cargo, display, human_duration, run_cmd, step};
use crate::{conformance, sdk, setup};

/// Options of `cargo xtask test`.
#[derive(clap::Args, Debug)]
pub struct Options {
    /// fsx operations per run in the conformance step (100 000 took 91 to 174 s on ext4
    /// here, 192 s on DeltaFS without checkpoints)
    #[arg(long, default_value_t = conformance::FULL_FSX_OPS)]
    pub fsx_ops: u64,
}

/// One gate: a name for the summary and what it runs.
struct Step {
    name: &'static str,
    action: Action,
}

enum Action {
    /// Set-up, in-process.
    Setup,
    /// The conformance suites, in-process.
    Conformance,
    /// The Python SDK's lint, types and pytest against a real daemon, in-process.
    Sdk,
    Command(Command),
}

fn cargo_step(name: &'static str, args: &[&str]) -> Step {
    let mut command = cargo();
    command.args(args);
    Step {
        name,
        action: Action::Command(command),
    }
}

/// Clippy on the eBPF programs as they are really built (nightly, BPF target): the
/// workspace clippy above sees only the crate's empty host build.
fn bpf_clippy_step() -> Step {
    let mut command = cargo();
    command
        .args(["+nightly", "clippy", "-Z", "build-std=core"])
        .args(["--target", "bpfel-unknown-none", "--release"])
        .args(["-p", "deltabox-ebpf", "--", "-D", "warnings"])
        // Set by the outer `cargo run` for the stable toolchain.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER");
    Step {
        name: "clippy (bpf)",
        action: Action::Command(command),
    }
}

fn steps() -> Vec<Step> {
    vec![
        Step {
            name: "setup",
            action: Action::Setup,
        },
        cargo_step("fmt", &["fmt", "--all", "--check"]),
        cargo_step(
            "clippy",
            &[
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ],
        ),
        bpf_clippy_step(),
        cargo_step("build", &["build", "--workspace"]),
        cargo_step(
            "unit tests",
            &["test", "--workspace", "--exclude", "deltabox-tests"],
        ),
        cargo_step(
            "integration tests",
            &["test", "-p", "deltabox-tests", "--", "--test-threads=2"],
        ),
        Step {
            name: "python sdk",
            action: Action::Sdk,
        },
        Step {
            name: "conformance",
            action: Action::Conformance,
        },
    ]
}

pub fn run(options: &Options) -> Result<()> {
    catch_interrupts()?;
    let start = Instant::now();
    let mut done: Vec<(&str, Duration, bool)> = Vec::new();
    for mut gate in steps() {
        let step_start = Instant::now();
        let result = match &mut gate.action {
            Action::Setup => setup::run(&setup::Options { quiet: true }).map(drop),
            Action::Conformance => {
                step(format!(
                    "conformance: pjdfstest and fsx ({} operations) on ext4, overlayfs and \
                     DeltaFS",
                    options.fsx_ops
                ));
                conformance::run_suites(&conformance::Options::for_test(options.fsx_ops))
            }
            Action::Sdk => {
                step("python sdk: ruff, mypy --strict and pytest against a real deltaboxd");
                crate::util::profile_dir(false).and_then(|bin| sdk::test(&bin))
            }
            Action::Command(command) => {
                step(format!("{}: {}", gate.name, display(command)));
                run_cmd(command)
            }
        };
        done.push((gate.name, step_start.elapsed(), result.is_ok()));
        if let Err(err) = result {
            print_summary(&done, start.elapsed());
            bail!("step `{}` failed: {err:#}", gate.name);
        }
    }
    print_summary(&done, start.elapsed());
    Ok(())
}

fn print_summary(done: &[(&str, Duration, bool)], total: Duration) {
    step("test summary");
    for (name, duration, ok) in done {
        let status = if *ok { "ok" } else { "FAILED" };
        println!("  {status:<7} {name:<18} {:>8}", human_duration(*duration));
    }
    let skipped: Vec<&str> = steps()
        .iter()
        .skip(done.len())
        .map(|gate| gate.name)
        .collect();
    for name in skipped {
        println!("  {:<7} {name}", "skipped");
    }
    println!("  {:<7} {:<18} {:>8}", "", "total", human_duration(total));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gates_run_in_the_documented_order() {
        let names: Vec<&str> = steps().iter().map(|gate| gate.name).collect();
        assert_eq!(
            names,
            [
                "setup",
                "fmt",
                "clippy",
                "clippy (bpf)",
                "build",
                "unit tests",
                "integration tests",
                "python sdk",
                "conformance"
            ]
        );
        let mut gates = steps();
        gates.pop();
        gates.pop();
        let Action::Command(integration) = gates.pop().unwrap().action else {
            panic!("the integration tests are a command");
        };
        assert_eq!(
            display(&integration),
            "cargo test -p deltabox-tests -- --test-threads=2"
        );
    }
}
