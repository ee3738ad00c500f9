//! `cargo xtask bench [fs|sandbox|cr]`: DeltaBox's benchmarks. `bench` alone runs all
//! of them: `fs` (ext4, the xfs store, overlayfs and DeltaFS side by side), `sandbox`
//! (end-to-end checkpoint and rollback of sandboxes, against a git baseline) and `cr`
//! (DeltaCR's checkpoint, rollback and fallback restore by memory size and page kind,
//! against a full copy).

mod cr;
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
    /// DeltaCR alone (no daemon): checkpoint and rollback latency (median, P95, P99) of
    /// bash plus a python3 process holding 64 MiB to 4 GiB, with 4 KiB pages and with
    /// transparent huge pages; each template's own memory; a full-copy baseline;
    /// fallback restore from dumps per MiB of delta; targets MET/MISSED; figures into
    /// docs/benchmarks.md. Needs root; builds xtask with the controller library
    /// (`--features bench-cr`, release) and runs that build
    Cr(cr::Options),
}

pub fn run(options: &Options) -> Result<()> {
    catch_interrupts()?;
    setup::run(&setup::Options { quiet: true })?;
    match &options.which {
        Some(Which::Fs(fs_options)) => fs::run(fs_options),
        Some(Which::Sandbox(sandbox_options)) => sandbox::run(sandbox_options),
        Some(Which::Cr(cr_options)) => cr::run(cr_options),
        // Every benchmark, with its default options.
        None => {
            fs::run(&fs::Options::default())?;
            sandbox::run(&sandbox::Options::default())?;
            cr::run(&cr::Options::default())
        }
    }
}

/// Rewrites the benchmark document `path` as `update` makes it from its current text
/// (empty when the file does not exist yet): each bench replaces its own section.
fn rewrite_doc(path: &std::path::Path, update: impl FnOnce(&str) -> String) -> Result<()> {
    use anyhow::Context as _;
    let old = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(err) => return Err(err).with_context(|| format!("cannot read {}", path.display())),
    };
    std::fs::write(path, update(&old)).with_context(|| format!("cannot write {}", path.display()))
}
