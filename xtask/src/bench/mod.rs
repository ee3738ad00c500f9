//! `cargo xtask bench [fs|sandbox]`: DeltaBox's benchmarks. `bench` alone runs all of
//! them: `fs` (ext4, the xfs store, overlayfs and DeltaFS side by side) and `sandbox`
//! (end-to-end checkpoint and rollback of sandboxes, against a git baseline).

mod fs;
mod report;
mod sandbox;
mod workload;

use anyhow::Result;

use crate::setup;
use crate::signals::catch_interrupts;

/// Options of `cargo xtask bench`.
#[derive(clap::Args, Debug)]
pub struct Options {
    #[command(subcommand)]
    pub which: Option<Which>,
}

/// One benchmark.
#[derive(clap::Subcommand, Debug)]
pub enum Which {
    /// Untar, find + stat, git add + commit, pip install, 1 GiB sequential write and read
    /// on ext4, the xfs store, overlayfs and DeltaFS; figures into docs/benchmarks.md
    Fs(fs::Options),
    /// Checkpoint and rollback latency of sandboxes on a SWE-like trajectory (against a
    /// git + restart baseline) and an RL-like micro-benchmark; figures into
    /// docs/benchmarks.md
    Sandbox(sandbox::Options),
}

pub fn run(options: &Options) -> Result<()> {
    catch_interrupts()?;
    setup::run(&setup::Options { quiet: true })?;
    match &options.which {
        Some(Which::Fs(fs_options)) => fs::run(fs_options),
        Some(Which::Sandbox(sandbox_options)) => sandbox::run(sandbox_options),
        // Every benchmark, with its default options.
        None => {
            fs::run(&fs::Options::default())?;
            sandbox::run(&sandbox::Options::default())
        }
    }
}
