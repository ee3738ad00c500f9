//! `cargo xtask conformance`: pjdfstest and fsx on ext4, overlayfs and DeltaFS (a fresh
//! mount, and one 50 layers deep), with fsx checkpointed and rolled back under it on
//! DeltaFS. Prints the tally (ext4 beside every target), writes it to
//! docs/conformance.md after a run of all targets, and fails when a case that passes on
//! ext4 does not pass on DeltaFS or fsx fails. `cargo xtask test` runs it as a step.
//!
//! Until the `deltafs` binary exists, the DeltaFS targets are reported as not run (never
//! as passed) and the others run as usual.

mod fsx;
mod pjdfstest;
mod report;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result};

use self::report::{Outcome, Report, TargetReport};
use crate::fstarget::deltafs::{self, Binary};
use crate::fstarget::{Kind, Scratch};
use crate::machine::Facts;
use crate::setup;
use crate::signals::{catch_interrupts, check_interrupted};
use crate::util::{human_duration, step, target_dir, workspace_root};

/// The fsx operation count of a full run (about 20 s on ext4 here).
pub const FULL_FSX_OPS: u64 = 100_000;

/// What `--target` selects.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetArg {
    Ext4,
    Overlayfs,
    Deltafs,
    DeltafsDeep,
    All,
}

/// One filesystem configuration under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Ext4,
    Overlayfs,
    DeltaFs,
    DeltaFsDeep,
}

impl Target {
    pub fn label(self) -> &'static str {
        match self {
            Target::Ext4 => "ext4",
            Target::Overlayfs => "overlayfs",
            Target::DeltaFs => "deltafs",
            Target::DeltaFsDeep => "deltafs-deep",
        }
    }

    fn kind(self) -> Kind {
        match self {
            Target::Ext4 => Kind::Ext4,
            Target::Overlayfs => Kind::Overlayfs,
            Target::DeltaFs | Target::DeltaFsDeep => Kind::DeltaFs,
        }
    }

    pub fn is_deltafs(self) -> bool {
        matches!(self, Target::DeltaFs | Target::DeltaFsDeep)
    }

    /// Whether fsx runs on this target too: on DeltaFS, and on ext4 when ext4 itself was
    /// selected (not when it is only pjdfstest's baseline).
    fn runs_fsx(self, selected: TargetArg) -> bool {
        match self {
            Target::Ext4 => matches!(selected, TargetArg::Ext4 | TargetArg::All),
            Target::DeltaFs => true,
            Target::Overlayfs | Target::DeltaFsDeep => false,
        }
    }
}

/// Options of `cargo xtask conformance`.
#[derive(clap::Args, Debug)]
pub struct Options {
    /// The filesystem to test (pjdfstest always runs on ext4 as well: it is the baseline)
    #[arg(long, value_enum, default_value = "all")]
    pub target: TargetArg,
    /// fsx operations per run (on ext4 and on DeltaFS)
    #[arg(long, default_value_t = FULL_FSX_OPS)]
    pub fsx_ops: u64,
    /// fsx's random seed (the sequence of operations is reproducible from it)
    #[arg(long, default_value_t = 1)]
    pub fsx_seed: u64,
    /// Milliseconds between two checkpoint + rollback cycles under fsx on DeltaFS
    #[arg(long, default_value_t = 100)]
    pub checkpoint_interval_ms: u64,
    /// What each cycle under fsx on DeltaFS does
    #[arg(long, value_enum, default_value = "freeze-switch")]
    pub cycle: fsx::Cycle,
    /// Layers under the deep DeltaFS mount (freezes before pjdfstest runs)
    #[arg(long, default_value_t = 50)]
    pub depth: u32,
    /// Use this deltafs binary instead of building it with cargo
    #[arg(long, value_name = "PATH")]
    pub deltafs_bin: Option<PathBuf>,
    /// Build deltafs with --release
    #[arg(long)]
    pub release: bool,
    /// Do not rewrite docs/conformance.md (only runs of all targets write it)
    #[arg(long)]
    pub no_doc: bool,
}

impl Options {
    /// What `cargo xtask test` runs: every target, `fsx_ops` operations, no doc.
    pub fn for_test(fsx_ops: u64) -> Self {
        Self {
            target: TargetArg::All,
            fsx_ops,
            fsx_seed: 1,
            checkpoint_interval_ms: 100,
            cycle: fsx::Cycle::FreezeSwitch,
            depth: 50,
            deltafs_bin: None,
            release: false,
            no_doc: true,
        }
    }

    fn targets(&self) -> Vec<Target> {
        match self.target {
            TargetArg::All => vec![
                Target::Ext4,
                Target::Overlayfs,
                Target::DeltaFs,
                Target::DeltaFsDeep,
            ],
            TargetArg::Ext4 => vec![Target::Ext4],
            TargetArg::Overlayfs => vec![Target::Ext4, Target::Overlayfs],
            TargetArg::Deltafs => vec![Target::Ext4, Target::DeltaFs],
            TargetArg::DeltafsDeep => vec![Target::Ext4, Target::DeltaFsDeep],
        }
    }

    /// The command line, for the report.
    fn command(&self) -> String {
        let mut line = "cargo xtask conformance".to_owned();
        if self.target != TargetArg::All {
            line.push_str(&format!(" --target {}", self.target_name()));
        }
        if self.fsx_ops != FULL_FSX_OPS {
            line.push_str(&format!(" --fsx-ops {}", self.fsx_ops));
        }
        if self.fsx_seed != 1 {
            line.push_str(&format!(" --fsx-seed {}", self.fsx_seed));
        }
        if self.checkpoint_interval_ms != 100 {
            line.push_str(&format!(
                " --checkpoint-interval-ms {}",
                self.checkpoint_interval_ms
            ));
        }
        if self.cycle != fsx::Cycle::FreezeSwitch {
            line.push_str(" --cycle freeze");
        }
        if self.depth != 50 {
            line.push_str(&format!(" --depth {}", self.depth));
        }
        if let Some(path) = &self.deltafs_bin {
            line.push_str(&format!(" --deltafs-bin {}", path.display()));
        }
        if self.release {
            line.push_str(" --release");
        }
        line
    }

    fn target_name(&self) -> &'static str {
        match self.target {
            TargetArg::Ext4 => "ext4",
            TargetArg::Overlayfs => "overlayfs",
            TargetArg::Deltafs => "deltafs",
            TargetArg::DeltafsDeep => "deltafs-deep",
            TargetArg::All => "all",
        }
    }
}

pub fn run(options: &Options) -> Result<()> {
    catch_interrupts()?;
    setup::run(&setup::Options { quiet: true })?;
    run_suites(options)
}

/// The conformance run without set-up (`cargo xtask test` has run it already).
pub fn run_suites(options: &Options) -> Result<()> {
    let report = collect(options)?;
    step("conformance tally");
    print!("{}", report.text());
    if options.target == TargetArg::All && !options.no_doc {
        let doc = workspace_root().join("docs/conformance.md");
        fs::write(&doc, report.markdown())
            .with_context(|| format!("cannot write {}", doc.display()))?;
        step(format!("wrote {}", doc.display()));
    }
    let not_run = report.not_run();
    if !not_run.is_empty() {
        step(format!(
            "NOT RUN (neither passed nor failed): {}",
            not_run.join("; ")
        ));
    }
    report.verdict()
}

fn collect(options: &Options) -> Result<Report> {
    let work = target_dir()?.join("conformance");
    fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    let pjd_config = work.join("pjdfstest.toml");
    fs::write(&pjd_config, pjdfstest::config_text()?)
        .with_context(|| format!("cannot write {}", pjd_config.display()))?;
    let fsx_config = work.join("fsx.toml");
    fsx::write_config(&fsx_config)?;

    let targets = options.targets();
    let needs_deltafs = targets
        .iter()
        .any(|t| matches!(t, Target::DeltaFs | Target::DeltaFsDeep));
    // Err: the binary exists but does not build (an error of the DeltaFS targets).
    let binary = if needs_deltafs {
        deltafs::binary(options.deltafs_bin.as_deref(), options.release)
            .map_err(|err| format!("{err:#}"))
    } else {
        Ok(Binary::NotAvailable("not selected".to_owned()))
    };

    let mut reports = Vec::new();
    for target in targets {
        check_interrupted()?;
        let ctx = Context {
            options,
            work: work.join(target.label()),
            pjd_config: &pjd_config,
            fsx_config: &fsx_config,
        };
        reports.push(run_target(&ctx, target, &binary)?);
    }
    Ok(Report {
        command: options.command(),
        facts: Facts::collect(),
        versions: vec![tool_version("pjdfstest"), tool_version("fsx")],
        targets: reports,
    })
}

struct Context<'a> {
    options: &'a Options,
    work: PathBuf,
    pjd_config: &'a Path,
    fsx_config: &'a Path,
}

fn run_target(
    ctx: &Context,
    target: Target,
    binary: &Result<Binary, String>,
) -> Result<TargetReport> {
    let deltafs = match (target.kind(), binary) {
        (Kind::DeltaFs, Err(err)) => {
            step(format!("{}: ERROR: {err}", target.label()));
            return Ok(TargetReport {
                target,
                pjdfstest: Outcome::Error(err.clone()),
                fsx: target
                    .runs_fsx(ctx.options.target)
                    .then(|| Outcome::Error(err.clone())),
            });
        }
        (Kind::DeltaFs, Ok(Binary::NotAvailable(why))) => {
            let why = format!("not available yet: {why}");
            step(format!("{}: {why}; NOT RUN", target.label()));
            return Ok(TargetReport {
                target,
                pjdfstest: Outcome::NotRun(why.clone()),
                fsx: target
                    .runs_fsx(ctx.options.target)
                    .then(|| Outcome::NotRun(why.clone())),
            });
        }
        (Kind::DeltaFs, Ok(Binary::Available(path))) => Some(path.as_path()),
        _ => None,
    };
    fs::create_dir_all(&ctx.work)
        .with_context(|| format!("cannot create {}", ctx.work.display()))?;

    step(format!("pjdfstest on {}", target.label()));
    let pjdfstest = outcome(run_pjdfstest(ctx, target, deltafs))?;
    if let Outcome::Ran(run) = &pjdfstest {
        let s = run.summary;
        println!(
            "  {} passed, {} failed, {} skipped of {} in {}",
            s.passed,
            s.failed,
            s.skipped,
            s.total,
            human_duration(run.duration)
        );
    }
    let fsx = if target.runs_fsx(ctx.options.target) {
        check_interrupted()?;
        step(format!(
            "fsx on {}: {} operations{}",
            target.label(),
            ctx.options.fsx_ops,
            if deltafs.is_some() {
                format!(
                    ", {} every {} ms",
                    ctx.options.cycle.describe(),
                    ctx.options.checkpoint_interval_ms
                )
            } else {
                String::new()
            }
        ));
        Some(outcome(run_fsx(ctx, target, deltafs))?)
    } else {
        None
    };
    Ok(TargetReport {
        target,
        pjdfstest,
        fsx,
    })
}

/// An error becomes the target's `Error` outcome, except an interruption, which stops
/// the whole run.
fn outcome<T>(result: Result<T>) -> Result<Outcome<T>> {
    match result {
        Ok(run) => Ok(Outcome::Ran(run)),
        Err(err) => {
            check_interrupted()?;
            println!("  ERROR: {err:#}");
            Ok(Outcome::Error(format!("{err:#}")))
        }
    }
}

fn run_pjdfstest(ctx: &Context, target: Target, deltafs: Option<&Path>) -> Result<pjdfstest::Run> {
    let mut scratch = Scratch::new(target.kind(), "conf", deltafs)?;
    let mut dir = scratch.path().to_owned();
    if target == Target::DeltaFsDeep {
        dir = stack_layers(&mut scratch, ctx.options.depth)?;
    }
    let run = pjdfstest::run(ctx.pjd_config, &dir, &ctx.work.join("pjdfstest.log"))?;
    scratch.finish()?;
    Ok(run)
}

fn run_fsx(ctx: &Context, target: Target, deltafs: Option<&Path>) -> Result<fsx::Run> {
    let mut scratch = Scratch::new(target.kind(), "conf-fsx", deltafs)?;
    let dir = scratch.path().to_owned();
    let interval = Duration::from_millis(ctx.options.checkpoint_interval_ms);
    let cycle = ctx.options.cycle;
    let daemon = scratch.deltafs().map(|daemon| (daemon, interval, cycle));
    let run = fsx::run(
        ctx.fsx_config,
        &dir,
        ctx.options.fsx_ops,
        ctx.options.fsx_seed,
        &ctx.work.join("fsx"),
        daemon,
    )?;
    scratch.finish()?;
    Ok(run)
}

/// Builds `depth` frozen layers under a DeltaFS mount, each with real changes in the
/// directory pjdfstest then runs in: a file rewritten (a copy-up), a directory created
/// and the previous one removed (a whiteout). Returns that directory.
fn stack_layers(scratch: &mut Scratch, depth: u32) -> Result<PathBuf> {
    let dir = scratch.path().join("d");
    step(format!("stacking {depth} layers under {}", dir.display()));
    fs::create_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let daemon = scratch
        .deltafs()
        .context("the deep target needs a DeltaFS mount")?;
    for layer in 1..=depth {
        check_interrupted()?;
        let file = dir.join("layer");
        fs::write(&file, format!("layer {layer}\n"))
            .with_context(|| format!("cannot write {}", file.display()))?;
        let sub = dir.join(format!("d{layer}"));
        fs::create_dir(&sub).with_context(|| format!("cannot create {}", sub.display()))?;
        fs::write(sub.join("f"), layer.to_string())
            .with_context(|| format!("cannot write in {}", sub.display()))?;
        if layer > 1 {
            let previous = dir.join(format!("d{}", layer - 1));
            fs::remove_dir_all(&previous)
                .with_context(|| format!("cannot remove {}", previous.display()))?;
        }
        daemon
            .freeze()
            .with_context(|| format!("freeze {layer} of {depth}"))?;
    }
    Ok(dir)
}

/// `pjdfstest v0.2.2`, from `cargo install --list`.
fn tool_version(krate: &str) -> String {
    let version = setup::installed_version(krate).ok().flatten();
    format!(
        "{krate} {}",
        version.unwrap_or_else(|| "(version unknown)".to_owned())
    )
}
