//! `cargo xtask build`: set-up, then `cargo build` of the whole workspace. The controller's
//! build script compiles the eBPF programs (`ebpf/programs`) with the nightly and
//! bpf-linker through aya-build, so one cargo build makes both halves.

use std::path::PathBuf;

use anyhow::{Context as _, Result};

use crate::setup;
use crate::util::{cargo, profile_dir, run_cmd, step};

/// Options of `cargo xtask build`.
#[derive(clap::Args, Debug, Default)]
pub struct Options {
    /// Build with the release profile
    #[arg(long)]
    pub release: bool,
}

/// The binaries a build produces, by name.
const BINARIES: &[&str] = &["deltaboxd", "deltabox", "deltafs-probe"];

/// Runs set-up and builds; returns the directory holding the binaries.
pub fn run(options: &Options) -> Result<PathBuf> {
    setup::run(&setup::Options { quiet: true })?;
    build(options.release, false)
}

/// Builds without set-up (for tasks that ran it already); returns the binaries'
/// directory. `quiet` hides cargo's progress (and the eBPF build's replayed output).
pub fn build(release: bool, quiet: bool) -> Result<PathBuf> {
    let profile = if release { "release" } else { "dev" };
    step(format!(
        "cargo build --workspace ({profile} profile; the eBPF programs build in the \
         controller's build script, about a minute when cold)"
    ));
    let mut cmd = cargo();
    cmd.args(["build", "--workspace"]);
    if release {
        cmd.arg("--release");
    }
    if quiet {
        cmd.arg("--quiet");
    }
    run_cmd(&mut cmd).context("the build failed")?;
    let dir = profile_dir(release)?;
    for binary in BINARIES {
        let path = dir.join(binary);
        if path.exists() {
            println!("  {}", path.display());
        }
    }
    Ok(dir)
}
