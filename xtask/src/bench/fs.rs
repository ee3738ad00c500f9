//! `cargo xtask bench fs`: the same workload on ext4, the xfs store, overlayfs (upper on
//! the xfs store) and DeltaFS (store on the xfs store), in one run, each step timed, the
//! median of several runs kept, with ratios against ext4. DeltaFS runs once its `deltafs`
//! binary exists; until then it is reported as not run.
//!
//! One run on one filesystem, in a fresh scratch directory (a fresh mount for overlayfs and
//! DeltaFS): untar the Python tree, `find` + `stat` over it, `git add -A && git commit` in
//! it, `pip install` the wheels into it, write 1 GiB sequentially (with `fsync`), drop the
//! caches, read it back. `sync` before every step, so no step pays for an earlier one's
//! writeback.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result};

use super::report::{Column, FsReport, Op};
use super::workload::{self, Tree, Wheels};
use crate::fstarget::deltafs::{self, Binary};
use crate::fstarget::{Kind, Scratch};
use crate::machine::Facts;
use crate::signals::check_interrupted;
use crate::util::{human_duration, step, target_dir, workspace_root};

/// Options of `cargo xtask bench fs`.
#[derive(clap::Args, Debug)]
pub struct Options {
    /// Runs per filesystem; the median is reported (at least 3)
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(3..))]
    pub runs: u32,
    /// Size of the sequential write and read, in MiB
    #[arg(long, default_value_t = 1024)]
    pub size_mib: u64,
    /// Use this deltafs binary instead of building it with cargo (--release)
    #[arg(long, value_name = "PATH")]
    pub deltafs_bin: Option<PathBuf>,
    /// Do not rewrite the figures in docs/benchmarks.md
    #[arg(long)]
    pub no_doc: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            runs: 3,
            size_mib: 1024,
            deltafs_bin: None,
            no_doc: false,
        }
    }
}

/// The filesystems, in the order of the columns.
const KINDS: [Kind; 4] = [Kind::Ext4, Kind::Xfs, Kind::Overlayfs, Kind::DeltaFs];

pub fn run(options: &Options) -> Result<()> {
    let cache = target_dir()?;
    let python = workload::python()?;
    let tree = workload::tree(cache, &python)?;
    let wheels = workload::wheels(cache, &python)?;
    println!(
        "  tree: {} ({} files, {} MiB) from {}",
        tree.tarball.display(),
        tree.files,
        tree.bytes >> 20,
        tree.source.display()
    );
    println!(
        "  wheels: {} ({})",
        wheels.packages.join(", "),
        wheels.origin
    );
    let binary =
        deltafs::binary(options.deltafs_bin.as_deref(), true).map_err(|err| format!("{err:#}"));

    // Columns that cannot run are settled first; the others run round-robin (run 1 on
    // every filesystem, then run 2, …), so that background load on this shared machine
    // is spread over all of them rather than landing on one.
    let mut columns = Vec::new();
    let mut deltafs = None;
    for kind in KINDS {
        match (kind, &binary) {
            (Kind::DeltaFs, Ok(Binary::Available(path))) => deltafs = Some(path.clone()),
            (Kind::DeltaFs, Ok(Binary::NotAvailable(why))) => {
                let why = format!("not available yet: {why}");
                step(format!("deltafs: {why}; NOT RUN"));
                columns.push(Column::not_run(kind, why));
                continue;
            }
            (Kind::DeltaFs, Err(err)) => {
                step(format!("deltafs: ERROR: {err}"));
                columns.push(Column::failed(kind, err.clone()));
                continue;
            }
            _ => {}
        }
        columns.push(Column::new(kind));
    }
    for run in 1..=options.runs {
        for column in columns.iter_mut().filter(|c| c.is_running()) {
            check_interrupted()?;
            let kind = column.kind;
            step(format!("{}: run {run} of {}", kind.name(), options.runs));
            let binary = if kind == Kind::DeltaFs {
                deltafs.as_deref()
            } else {
                None
            };
            match one_run(kind, binary, &tree, &python, &wheels, options.size_mib) {
                Ok(samples) => {
                    let line: Vec<String> = samples
                        .iter()
                        .map(|(op, d)| format!("{} {}", op.short(), human_duration(*d)))
                        .collect();
                    println!("  {}", line.join(", "));
                    column.add(samples);
                }
                Err(err) => {
                    check_interrupted()?;
                    println!("  ERROR: {err:#}");
                    *column = Column::failed(kind, format!("{err:#}"));
                }
            }
        }
    }

    let report = FsReport {
        command: command_line(options),
        facts: Facts::collect(),
        runs: options.runs,
        size_mib: options.size_mib,
        tree_files: tree.files,
        tree_mib: tree.bytes >> 20,
        tree_source: tree.source.display().to_string(),
        wheels: format!("{} ({})", wheels.packages.join(", "), wheels.origin),
        columns,
    };
    step("bench fs: medians, and ratios against ext4");
    print!("{}", report.text());
    if !options.no_doc {
        let doc = workspace_root().join("docs/benchmarks.md");
        report.write_doc(&doc)?;
        step(format!("wrote the figures into {}", doc.display()));
    }
    let missing = report.not_run();
    if !missing.is_empty() {
        step(format!("NOT RUN: {}", missing.join("; ")));
    }
    report.errors()
}

fn command_line(options: &Options) -> String {
    let mut line = "cargo xtask bench fs".to_owned();
    if options.runs != 3 {
        line.push_str(&format!(" --runs {}", options.runs));
    }
    if options.size_mib != 1024 {
        line.push_str(&format!(" --size-mib {}", options.size_mib));
    }
    line
}

/// One run of every step on a fresh scratch directory of `kind`.
fn one_run(
    kind: Kind,
    deltafs: Option<&Path>,
    tree: &Tree,
    python: &Path,
    wheels: &Wheels,
    size_mib: u64,
) -> Result<Vec<(Op, Duration)>> {
    let scratch = Scratch::new(kind, "bench", deltafs)?;
    let dir = scratch.path().to_owned();
    let src = dir.join(&tree.top);
    let mut samples = Vec::new();

    workload::warm(&tree.tarball)?;
    workload::sync()?;
    samples.push((Op::Untar, workload::untar(tree, &dir)?));
    check_interrupted()?;
    workload::sync()?;
    samples.push((Op::FindStat, workload::find_stat(&src)?));
    check_interrupted()?;
    workload::sync()?;
    samples.push((Op::GitCommit, workload::git_commit(&src)?));
    check_interrupted()?;
    workload::sync()?;
    let site = src.join("site-packages");
    samples.push((
        Op::PipInstall,
        workload::pip_install(python, wheels, &site)?,
    ));
    check_interrupted()?;
    workload::sync()?;
    let big = dir.join("big");
    let bytes = size_mib << 20;
    samples.push((Op::SeqWrite, workload::seq_write(&big, bytes)?));
    workload::drop_caches()?;
    samples.push((Op::SeqRead, workload::seq_read(&big, bytes)?));
    scratch
        .finish()
        .with_context(|| format!("cleaning up after the {} run", kind.name()))?;
    Ok(samples)
}
