//! `cargo xtask test`: every quality gate, in order, stopping at the first failure:
//! set-up, `cargo fmt --check`, clippy with warnings denied, the workspace build, unit
//! tests, then the root integration tests (`tests/`, package `deltabox-tests`). Prints a
//! summary of the steps and their durations either way. `.ci/run` runs exactly this.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::setup;
use crate::util::{cargo, display, human_duration, run_cmd, step};

/// Options of `cargo xtask test`.
#[derive(clap::Args, Debug, Default)]
pub struct Options {}

/// One gate: a name for the summary and the command (`None`: set-up, run in-process).
struct Step {
    name: &'static str,
    command: Option<Command>,
}

fn cargo_step(name: &'static str, args: &[&str]) -> Step {
    let mut command = cargo();
    command.args(args);
    Step {
        name,
        command: Some(command),
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
        command: Some(command),
    }
}

fn steps() -> Vec<Step> {
    vec![
        Step {
            name: "setup",
            command: None,
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
    ]
}

pub fn run(_options: &Options) -> Result<()> {
    let start = Instant::now();
    let mut done: Vec<(&str, Duration, bool)> = Vec::new();
    for mut gate in steps() {
        let step_start = Instant::now();
        let result = match gate.command.as_mut() {
            None => setup::run(&setup::Options { quiet: true }).map(drop),
            Some(command) => {
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
                "integration tests"
            ]
        );
        let integration = steps().pop().unwrap().command.unwrap();
        assert_eq!(
            display(&integration),
            "cargo test -p deltabox-tests -- --test-threads=2"
        );
    }
}
