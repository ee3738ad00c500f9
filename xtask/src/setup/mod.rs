//! `cargo xtask setup`: installs what DeltaBox needs and checks the kernel features it
//! relies on, idempotently, on a Debian bookworm machine with rustup (stable + nightly).
//!
//! One line per item: `ok` (already in place), `installed` (this run installed or mounted
//! it), or `FAILED` with what is missing and how to get it. Every item is checked even
//! after a failure, so one run lists everything to fix; only a missing root stops early.
//! A second run installs nothing and takes about a second. docs/setup.md explains each
//! item.

mod apt;
mod disk;
mod kernel;
mod mounts;
mod store;
mod suites;
mod toolchain;

pub use self::mounts::BPFFS;
pub use self::store::STORE_DIR;
pub use self::suites::installed_version;

use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::util::{human_duration, step};

/// Options of `cargo xtask setup`.
#[derive(clap::Args, Debug, Default)]
pub struct Options {
    /// Print only what was installed or failed, and a one-line summary (how the other
    /// tasks run set-up)
    #[arg(long)]
    pub quiet: bool,
}

/// A set-up item that is in place.
#[derive(Debug)]
pub enum Outcome {
    /// It was there already.
    Ok(String),
    /// This run installed, mounted or built it.
    Installed(String),
}

/// A set-up item that is not in place and could not be put in place.
#[derive(Debug)]
pub struct Failure {
    /// What is missing or broken.
    pub message: String,
    /// How to get it.
    pub fix: String,
}

impl Failure {
    pub fn new(message: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            fix: fix.into(),
        }
    }

    /// A failure whose message is an error chain.
    pub fn from_error(err: &anyhow::Error, fix: impl Into<String>) -> Self {
        Self::new(format!("{err:#}"), fix)
    }
}

/// The result of checking (and if need be installing) one item.
pub type Check = std::result::Result<Outcome, Failure>;

/// Runs set-up; returns how many items this run installed.
pub fn run(options: &Options) -> Result<usize> {
    let start = Instant::now();
    if !options.quiet {
        step("setup: installing and checking what DeltaBox needs");
    }
    let mut report = Report::new(options.quiet);
    report.item("root", kernel::check_root());
    if !report.failed.is_empty() {
        bail!("set-up cannot go on without root and CAP_SYS_ADMIN (see the fix above)");
    }
    report.item("disk space", disk::check_free_space());
    report.item("debian packages", apt::ensure_packages());
    report.item("nightly components", toolchain::ensure_components());
    report.item("bpf-linker", toolchain::ensure_bpf_linker());
    report.item("pjdfstest", suites::ensure_pjdfstest());
    report.item("fsx", suites::ensure_fsx());
    report.item("tracefs", mounts::ensure_tracefs());
    report.item("bpffs", mounts::ensure_bpffs());
    report.item("kernel BTF", kernel::check_btf());
    report.item("tracepoints", kernel::check_tracepoints());
    report.item("cgroup v2", kernel::check_cgroup());
    report.item("/dev/fuse", kernel::check_dev_fuse());
    report.item("FUSE passthrough", kernel::check_passthrough());
    report.item("xfs store", store::ensure_store());
    report.finish(start.elapsed())
}

/// Prints items as they are checked and sums them up.
struct Report {
    quiet: bool,
    ok: usize,
    installed: usize,
    failed: Vec<&'static str>,
}

impl Report {
    fn new(quiet: bool) -> Self {
        Self {
            quiet,
            ok: 0,
            installed: 0,
            failed: Vec::new(),
        }
    }

    fn item(&mut self, name: &'static str, check: Check) {
        match check {
            Ok(Outcome::Ok(detail)) => {
                self.ok += 1;
                if !self.quiet {
                    println!("  {:<10} {name}: {detail}", "ok");
                }
            }
            Ok(Outcome::Installed(detail)) => {
                self.installed += 1;
                println!("  {:<10} {name}: {detail}", "installed");
            }
            Err(failure) => {
                self.failed.push(name);
                println!("  {:<10} {name}: {}", "FAILED", failure.message);
                println!("  {:<10} fix: {}", "", failure.fix);
            }
        }
    }

    fn finish(self, elapsed: Duration) -> Result<usize> {
        let summary = format!(
            "{} ok, {} installed, {} failed ({})",
            self.ok,
            self.installed,
            self.failed.len(),
            human_duration(elapsed)
        );
        if !self.failed.is_empty() {
            bail!(
                "set-up failed: {} ({summary}); fix them (see above and docs/setup.md) and \
                 rerun `cargo xtask setup`",
                self.failed.join(", ")
            );
        }
        step(format!("setup: {summary}"));
        Ok(self.installed)
    }
}
