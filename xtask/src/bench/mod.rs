//! `cargo xtask bench [fs]`: DeltaBox's benchmarks. `bench` alone runs all of them; only
//! `fs` (ext4, the xfs store, overlayfs and DeltaFS side by side) exists for now.

mod fs;
mod report;
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
}

pub fn run(options: &Options) -> Result<()> {
    catch_interrupts()?;
    setup::run(&setup::Options { quiet: true })?;
    match &options.which {
        Some(Which::Fs(fs_options)) => fs::run(fs_options),
        // Every benchmark, with its default options.
        None => fs::run(&fs::Options::default()),
    }
}
