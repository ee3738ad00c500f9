//! `cargo xtask bench cr`: DeltaCR's own latency and memory figures (issue 5's
//! benchmarks), measured with the DeltaCR library, without daemon or DeltaFS.
//!
//! For each memory size and page kind, a sandbox-like cgroup runs `bash` and a
//! `python3` process holding that memory ([`procs`]); rounds of checkpoint and rollback
//! of both are timed, the new templates' own memory read, and a full copy of the
//! processes' pages timed as the baseline ([`measure`], [`memory`]); then the fallback
//! restore from dumps is timed for a few sizes of delta. The figures are printed with
//! the targets and written into docs/benchmarks.md ([`report`]).
//!
//! The DeltaCR library is the controller crate, whose build script needs the eBPF
//! toolchain that `cargo xtask setup` installs: xtask links it only with its `bench-cr`
//! feature, so that set-up still builds on a fresh machine. Without the feature (a
//! plain `cargo xtask`), `bench cr` builds xtask in release mode with it and runs that
//! build (a release build also because the figures are the library's, not a debug
//! build's).

#[cfg(feature = "bench-cr")]
mod measure;
#[cfg(any(feature = "bench-cr", test))]
mod memory;
#[cfg(feature = "bench-cr")]
mod procs;
#[cfg(any(feature = "bench-cr", test))]
mod report;
#[cfg(any(feature = "bench-cr", test))]
mod targets;

use anyhow::Result;

/// Options of `cargo xtask bench cr`.
#[derive(clap::Args, Debug, Clone)]
pub struct Options {
    /// Checkpoints and rollbacks per memory size and page kind (after one warm-up)
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
    pub ops: u32,
    /// Memory sizes of the python process, MiB, comma-separated (each with 4 KiB pages
    /// and with transparent huge pages)
    #[arg(long, value_delimiter = ',', default_values_t = DEFAULT_SIZES)]
    pub sizes: Vec<u64>,
    /// Milliseconds between operations (back to back, kernel fast paths would flatter
    /// the figures)
    #[arg(long, default_value_t = 100)]
    pub gap_ms: u64,
    /// A smoke run of about a minute: 64 and 256 MiB, 20 rounds each, one full copy,
    /// fallback at 4 and 16 MiB of delta; overrides --ops and --sizes
    #[arg(long)]
    pub quick: bool,
    /// MiB at the start of the python buffer that the writes between operations stay
    /// in, a hot working set (0: anywhere in the buffer). Each write to a huge page that
    /// a template shares splits the writer's mapping of it into 4 KiB entries
    #[arg(long, default_value_t = 0)]
    pub hot_mib: u64,
    /// Run at real-time priority (SCHED_FIFO 10, inherited by the processes it starts),
    /// which takes other processes' CPU time out of the figures on a shared machine
    #[arg(long)]
    pub realtime: bool,
    /// Do not rewrite the figures in docs/benchmarks.md
    #[arg(long)]
    pub no_doc: bool,
    /// Measure only this part (`fallback`: the fallback restore from dumps, with
    /// --quick its 4 and 16 MiB deltas); the figures are printed, docs/benchmarks.md is
    /// left alone (its section is a whole run's)
    #[arg(long, value_enum)]
    pub only: Option<Part>,
}

/// A part of `bench cr` that `--only` runs alone.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The fallback restore from dumps.
    Fallback,
}

const DEFAULT_SIZES: [u64; 4] = [64, 256, 1024, 4096];
const DEFAULT_OPS: u32 = 200;
const DEFAULT_GAP_MS: u64 = 100;

impl Default for Options {
    fn default() -> Self {
        Self {
            ops: DEFAULT_OPS,
            sizes: DEFAULT_SIZES.to_vec(),
            gap_ms: DEFAULT_GAP_MS,
            quick: false,
            hot_mib: 0,
            realtime: false,
            no_doc: false,
            only: None,
        }
    }
}

impl Options {
    /// The arguments after `bench cr` that differ from the defaults.
    fn args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if self.quick {
            args.push("--quick".to_owned());
        } else {
            if self.ops != DEFAULT_OPS {
                args.extend(["--ops".to_owned(), self.ops.to_string()]);
            }
            if self.sizes != DEFAULT_SIZES {
                let sizes: Vec<String> = self.sizes.iter().map(u64::to_string).collect();
                args.extend(["--sizes".to_owned(), sizes.join(",")]);
            }
        }
        if self.gap_ms != DEFAULT_GAP_MS {
            args.extend(["--gap-ms".to_owned(), self.gap_ms.to_string()]);
        }
        if self.hot_mib != 0 {
            args.extend(["--hot-mib".to_owned(), self.hot_mib.to_string()]);
        }
        if self.realtime {
            args.push("--realtime".to_owned());
        }
        if self.no_doc {
            args.push("--no-doc".to_owned());
        }
        if let Some(Part::Fallback) = self.only {
            args.extend(["--only".to_owned(), "fallback".to_owned()]);
        }
        args
    }

    /// The command line that reproduces the run (without `--no-doc`).
    #[cfg(any(feature = "bench-cr", test))]
    fn command_line(&self) -> String {
        let mut line = "cargo xtask bench cr".to_owned();
        for arg in self.args().iter().filter(|a| *a != "--no-doc") {
            line.push(' ');
            line.push_str(arg);
        }
        line
    }
}

/// Builds xtask with the DeltaCR library (release) and runs `bench cr` in that build.
#[cfg(not(feature = "bench-cr"))]
pub fn run(options: &Options) -> Result<()> {
    use anyhow::{Context as _, bail};

    use crate::util::{cargo, profile_dir, run_cmd, step};

    step("building xtask with the DeltaCR library (release, --features bench-cr)");
    run_cmd(cargo().args([
        "build",
        "--release",
        "--quiet",
        "-p",
        "xtask",
        "--features",
        "bench-cr",
    ]))
    .context("building xtask with --features bench-cr failed")?;
    let bin = profile_dir(true)?.join("xtask");
    let status = std::process::Command::new(&bin)
        .args(["bench", "cr"])
        .args(options.args())
        .status()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    if !status.success() {
        bail!("{} bench cr failed ({status})", bin.display());
    }
    Ok(())
}

/// Measures, prints the figures and writes them into docs/benchmarks.md.
#[cfg(feature = "bench-cr")]
pub fn run(options: &Options) -> Result<()> {
    use std::path::{Path, PathBuf};
    use std::process::Command;
    use std::time::Duration;

    use anyhow::bail;

    use crate::machine::Facts;
    use crate::signals::interrupted;
    use crate::util::{output, step, target_dir, workspace_root};

    // SAFETY: geteuid takes no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("bench cr needs root (ptrace, cgroups, /proc/<pid>/mem of other processes)");
    }
    if options.realtime {
        set_realtime()?;
    }
    let plan = if options.quick {
        measure::Plan {
            sizes: vec![64, 256],
            ops: 20,
            gap: Duration::from_millis(options.gap_ms),
            copies: 1,
            fallback_mib: 256,
            deltas: vec![4, 16],
            fallback_reps: 3,
            hot_mib: options.hot_mib,
        }
    } else {
        measure::Plan {
            sizes: options.sizes.clone(),
            ops: options.ops as usize,
            gap: Duration::from_millis(options.gap_ms),
            copies: 3,
            fallback_mib: 256,
            deltas: vec![4, 16, 64, 128],
            fallback_reps: 10,
            hot_mib: options.hot_mib,
        }
    };
    // The store (xfs, where the daemon keeps layers and dumps) if it is there.
    let store = Path::new(procs::STORE);
    let base: PathBuf = if store.is_dir() {
        store.to_path_buf()
    } else {
        target_dir()?.to_path_buf()
    };
    let fstype = output(
        Command::new("findmnt")
            .args(["-n", "-o", "FSTYPE", "-T"])
            .arg(&base),
    )
    .map(|t| t.trim().to_owned())
    .unwrap_or_else(|_| "unknown".to_owned());
    let env = procs::BenchEnv::new(base.join(format!("xtask-bench-cr-{}", std::process::id())))?;
    let load = || {
        std::fs::read_to_string("/proc/loadavg")
            .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|_| "unknown".to_owned())
    };
    let load_start = load();
    let measured = (|| {
        let mut configs = Vec::new();
        let sizes = if options.only.is_some() {
            &[][..]
        } else {
            &plan.sizes[..]
        };
        for &mib in sizes {
            for thp in [false, true] {
                configs.push(measure::config(&env, &plan, mib, thp)?);
            }
        }
        let fallback = measure::fallback(&env, &plan)?;
        Ok::<_, anyhow::Error>((configs, fallback))
    })();
    let load_end = load();
    step("cleaning up");
    drop(env);
    let (configs, fallback) = match measured {
        Ok(m) => m,
        Err(err) => {
            println!("==> bench cr stopped; cleaned up what it had started");
            if interrupted() {
                bail!("interrupted");
            }
            return Err(err);
        }
    };
    let report = report::CrReport {
        command: options.command_line(),
        facts: Facts::collect(),
        load: (load_start, load_end),
        ops: plan.ops,
        gap_ms: options.gap_ms,
        writes: measure::WRITES,
        hot_mib: options.hot_mib,
        configs,
        fallback_mib: plan.fallback_mib,
        fallback,
        store: format!("`{}` ({fstype})", base.display()),
        realtime: options.realtime,
    };
    step(format!(
        "bench cr: figures (load average {} at the start, {} at the end)",
        report.load.0, report.load.1
    ));
    print!("{}", report.text());
    if !options.no_doc && options.only.is_none() {
        let doc = workspace_root().join("docs/benchmarks.md");
        report.write_doc(&doc)?;
        step(format!("wrote the figures into {}", doc.display()));
    }
    Ok(())
}

/// SCHED_FIFO priority 10 for this thread, and so for the threads and processes it
/// starts from now on.
#[cfg(feature = "bench-cr")]
fn set_realtime() -> Result<()> {
    use anyhow::Context as _;

    let param = libc::sched_param { sched_priority: 10 };
    // SAFETY: `param` is a valid sched_param for the duration of the call; pid 0 is the
    // calling thread.
    let ret = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
    if ret != 0 {
        return Err(std::io::Error::last_os_error())
            .context("cannot switch to SCHED_FIFO 10 (--realtime)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_names_what_differs_from_the_defaults() {
        assert_eq!(Options::default().command_line(), "cargo xtask bench cr");
        let quick = Options {
            quick: true,
            no_doc: true,
            ops: 5,
            ..Options::default()
        };
        assert_eq!(quick.command_line(), "cargo xtask bench cr --quick");
        assert_eq!(quick.args(), ["--quick", "--no-doc"]);
        let custom = Options {
            ops: 50,
            sizes: vec![64, 128],
            gap_ms: 10,
            hot_mib: 4,
            realtime: true,
            only: Some(Part::Fallback),
            ..Options::default()
        };
        assert_eq!(
            custom.command_line(),
            "cargo xtask bench cr --ops 50 --sizes 64,128 --gap-ms 10 --hot-mib 4 --realtime \
             --only fallback"
        );
    }
}
