//! The conformance tally: per target, pjdfstest's passed / failed / skipped with ext4
//! beside it, the cases that pass on ext4 and not on the target, and the fsx runs. Printed
//! as text, written to docs/conformance.md as Markdown, and turned into the verdict of the
//! `cargo xtask test` step.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{Result, bail};

use super::{Target, fsx, pjdfstest};
use crate::machine::Facts;
use crate::table::{markdown_table, text_table};
use crate::util::human_duration;

/// What became of one suite on one target.
#[derive(Debug)]
pub enum Outcome<T> {
    Ran(T),
    /// Not run, and why (the DeltaFS binary does not exist yet).
    NotRun(String),
    /// It could not run to the end (mount failed, daemon died, timeout).
    Error(String),
}

impl<T> Outcome<T> {
    pub fn ran(&self) -> Option<&T> {
        match self {
            Outcome::Ran(run) => Some(run),
            _ => None,
        }
    }
}

/// One target's results: pjdfstest always, fsx on the targets that run it.
#[derive(Debug)]
pub struct TargetReport {
    pub target: Target,
    pub pjdfstest: Outcome<pjdfstest::Run>,
    pub fsx: Option<Outcome<fsx::Run>>,
}

/// A whole conformance run.
#[derive(Debug)]
pub struct Report {
    /// The command line, for the doc.
    pub command: String,
    pub facts: Facts,
    /// `pjdfstest v0.2.2`, `fsx v0.3.2`.
    pub versions: Vec<String>,
    pub targets: Vec<TargetReport>,
}

/// A case that passes on ext4 and not on a target.
#[derive(Debug, PartialEq, Eq)]
pub struct Regression {
    pub name: String,
    /// `failed`, `skipped`, … or `missing` (the target's run did not report it).
    pub status: String,
    pub detail: String,
}

impl Regression {
    /// Whether it counts against the target: every status but `skipped`. A skip is the
    /// suite deciding the target lacks something before it tests it (for FUSE, glibc's
    /// `pathconf` knows no `LINK_MAX`): it is listed, it does not fail the step.
    pub fn is_failure(&self) -> bool {
        self.status != "skipped"
    }
}

/// `3` failures, or `3 (+1 skipped)`.
fn regression_count(list: &[Regression]) -> String {
    let failures = list.iter().filter(|r| r.is_failure()).count();
    let skips = list.len() - failures;
    if skips == 0 {
        failures.to_string()
    } else {
        format!("{failures} (+{skips} skipped)")
    }
}

/// The cases that pass in `baseline` and not in `run`.
pub fn regressions(baseline: &pjdfstest::Run, run: &pjdfstest::Run) -> Vec<Regression> {
    baseline
        .cases
        .iter()
        .filter(|(_, status)| status.is_pass())
        .filter_map(|(name, _)| match run.cases.get(name) {
            Some(status) if status.is_pass() => None,
            Some(status) => Some(Regression {
                name: name.clone(),
                status: status.word().to_owned(),
                detail: status.detail().to_owned(),
            }),
            None => Some(Regression {
                name: name.clone(),
                status: "missing".to_owned(),
                detail: String::new(),
            }),
        })
        .collect()
}

/// Columns of the pjdfstest tally, in the terminal and in docs/conformance.md.
const PJDFSTEST_HEADER: [&str; 7] = [
    "target",
    "passed",
    "failed",
    "skipped",
    "total",
    "time",
    "fail here, pass on ext4",
];

/// Columns of the fsx rows, in the terminal and in docs/conformance.md.
const FSX_HEADER: [&str; 7] = [
    "target",
    "operations asked",
    "result",
    "time",
    "checkpoint + rollback cycles",
    "freeze round trip (median / max)",
    "switch round trip (median / max)",
];

impl Report {
    fn baseline(&self) -> Option<&pjdfstest::Run> {
        self.targets
            .iter()
            .find(|t| t.target == Target::Ext4)
            .and_then(|t| t.pjdfstest.ran())
    }

    /// The pjdfstest rows: target, passed, failed, skipped, total, time, regressions.
    fn pjdfstest_rows(&self) -> Vec<[String; 7]> {
        let baseline = self.baseline();
        self.targets
            .iter()
            .map(|t| {
                let name = t.target.label().to_owned();
                match &t.pjdfstest {
                    Outcome::Ran(run) => {
                        let s = run.summary;
                        let vs_ext4 = match (t.target, baseline) {
                            (Target::Ext4, _) => "(baseline)".to_owned(),
                            (_, Some(base)) => regression_count(&regressions(base, run)),
                            (_, None) => "no ext4 baseline".to_owned(),
                        };
                        [
                            name,
                            (s.passed).to_string(),
                            (s.failed).to_string(),
                            s.skipped.to_string(),
                            s.total.to_string(),
                            human_duration(run.duration),
                            vs_ext4,
                        ]
                    }
                    Outcome::NotRun(why) => not_a_row(name, &format!("not run: {why}")),
                    Outcome::Error(err) => not_a_row(name, &format!("ERROR: {err}")),
                }
            })
            .collect()
    }

    /// The fsx rows: target, operations, result, time, cycles, freeze, switch.
    fn fsx_rows(&self) -> Vec<[String; 7]> {
        self.targets
            .iter()
            .filter_map(|t| Some((t.target.label().to_owned(), t.fsx.as_ref()?)))
            .map(|(name, outcome)| match outcome {
                Outcome::Ran(run) => {
                    let (cycles, freeze, switch) = match &run.checkpoints {
                        Some(c) => (
                            format!("{} (every {} ms)", c.freezes.len(), c.interval.as_millis()),
                            spread(&c.freezes),
                            spread(&c.switches),
                        ),
                        None => ("-".to_owned(), "-".to_owned(), "-".to_owned()),
                    };
                    let result = match &run.failure {
                        None => "passed".to_owned(),
                        Some(_) => "FAILED (see below)".to_owned(),
                    };
                    [
                        name,
                        format!("{} (seed {})", run.ops, run.seed),
                        result,
                        human_duration(run.duration),
                        cycles,
                        freeze,
                        switch,
                    ]
                }
                Outcome::NotRun(why) => not_a_row(name, &format!("not run: {why}")),
                Outcome::Error(err) => not_a_row(name, &format!("ERROR: {err}")),
            })
            .collect()
    }

    /// Text for the terminal.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "pjdfstest ({}):", self.versions.join(", "));
        out.push_str(&text_table(&PJDFSTEST_HEADER, &self.pjdfstest_rows()));
        let fsx_rows = self.fsx_rows();
        if !fsx_rows.is_empty() {
            out.push_str("fsx:\n");
            out.push_str(&text_table(&FSX_HEADER, &fsx_rows));
        }
        for (target, why) in self.fsx_failures() {
            let _ = writeln!(out, "fsx failed on {}: {why}", target.label());
        }
        for (target, list) in self.regression_lists() {
            let _ = writeln!(out, "pass on ext4, not on {}:", target.label());
            // Every case for DeltaFS; the first few for overlayfs, only a comparison.
            let shown = if target.is_deltafs() { list.len() } else { 5 };
            for r in list.iter().take(shown) {
                let _ = writeln!(out, "  {} ({}) {}", r.name, r.status, r.detail);
            }
            if list.len() > shown {
                let _ = writeln!(out, "  … and {} more", list.len() - shown);
            }
        }
        out
    }

    /// What went wrong in each failed fsx run.
    fn fsx_failures(&self) -> Vec<(Target, &str)> {
        self.targets
            .iter()
            .filter_map(|t| match &t.fsx {
                Some(Outcome::Ran(run)) => Some((t.target, run.failure.as_deref()?)),
                _ => None,
            })
            .collect()
    }

    /// The regressions of each non-ext4 target that ran pjdfstest, where there are some.
    fn regression_lists(&self) -> Vec<(Target, Vec<Regression>)> {
        let Some(baseline) = self.baseline() else {
            return Vec::new();
        };
        self.targets
            .iter()
            .filter(|t| t.target != Target::Ext4)
            .filter_map(|t| Some((t.target, regressions(baseline, t.pjdfstest.ran()?))))
            .filter(|(_, list)| !list.is_empty())
            .collect()
    }

    /// docs/conformance.md.
    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let _ = write!(
            md,
            "# Conformance: pjdfstest and fsx on ext4, overlayfs and DeltaFS\n\n\
             Written by `{}` on {} ({}). Rerun it rather than editing this file: it is \
             rewritten by every run of all targets.\n\n\
             Suites: {} (from crates.io, installed by `cargo xtask setup`). What runs where, \
             and how the harness mounts each target, is explained under \"How it runs\" \
             below.\n\n## pjdfstest\n\n",
            self.command,
            self.facts.date,
            self.facts.line(),
            self.versions.join(", ")
        );
        md.push_str(&markdown_table(&PJDFSTEST_HEADER, &self.pjdfstest_rows()));
        let fsx_rows = self.fsx_rows();
        if !fsx_rows.is_empty() {
            md.push_str("\n## fsx\n\n");
            md.push_str(&markdown_table(&FSX_HEADER, &fsx_rows));
            for (target, why) in self.fsx_failures() {
                let _ = writeln!(md, "\nfsx failed on {}: {why}", target.label());
            }
            md.push_str(
                "\nA cycle is `freeze` then `switch <the id just frozen>` sent on the `deltafs` \
                 daemon's stdin while fsx runs; the round trips are measured from sending the \
                 command to reading its answer, so they include the pipe and the harness.\n",
            );
        }
        md.push_str("\n## Cases that pass on ext4 and not on DeltaFS\n\n");
        let lists = self.regression_lists();
        let deltafs_ran: Vec<Target> = self
            .targets
            .iter()
            .filter(|t| t.target.is_deltafs() && t.pjdfstest.ran().is_some())
            .map(|t| t.target)
            .collect();
        if deltafs_ran.is_empty() {
            md.push_str("None known: pjdfstest did not run on DeltaFS (see the table above).\n\n");
        }
        for target in deltafs_ran {
            let list = lists
                .iter()
                .find(|(t, _)| *t == target)
                .map_or(&[][..], |(_, list)| list.as_slice());
            let _ = writeln!(md, "### {}\n", target.label());
            if list.is_empty() {
                md.push_str("None: every case that passes on ext4 passes here.\n\n");
            }
            md.push_str(&markdown_list(list));
        }
        for (target, list) in lists.iter().filter(|(t, _)| !t.is_deltafs()) {
            let _ = writeln!(
                md,
                "### {}, for comparison ({} cases)\n",
                target.label(),
                list.len()
            );
            md.push_str(&markdown_list(list));
        }
        md.push_str(HOW_IT_RUNS);
        md
    }

    /// The verdict of the `cargo xtask test` step: fails when the ext4 baseline did not
    /// run, when a DeltaFS target could not run to the end, when a case that passes on
    /// ext4 does not pass on DeltaFS, or when fsx failed on ext4 or DeltaFS. overlayfs is
    /// for comparison only. Targets not run (no DeltaFS binary yet) do not fail it.
    pub fn verdict(&self) -> Result<()> {
        let mut problems = Vec::new();
        let Some(baseline) = self.baseline() else {
            bail!("pjdfstest did not run on ext4, so there is no baseline to compare with");
        };
        for t in &self.targets {
            let gated = matches!(t.target, Target::DeltaFs | Target::DeltaFsDeep);
            let name = t.target.label();
            match &t.pjdfstest {
                Outcome::Error(err) if gated || t.target == Target::Ext4 => {
                    problems.push(format!("pjdfstest on {name} did not finish: {err}"));
                }
                Outcome::Ran(run) if gated => {
                    let list: Vec<Regression> = regressions(baseline, run)
                        .into_iter()
                        .filter(Regression::is_failure)
                        .collect();
                    if !list.is_empty() {
                        let names: Vec<&str> =
                            list.iter().take(10).map(|r| r.name.as_str()).collect();
                        let more = if list.len() > names.len() {
                            ", …"
                        } else {
                            ""
                        };
                        problems.push(format!(
                            "{} pjdfstest cases pass on ext4 and not on {name}: {}{more}",
                            list.len(),
                            names.join(", ")
                        ));
                    }
                }
                _ => {}
            }
            match &t.fsx {
                Some(Outcome::Error(err)) => {
                    problems.push(format!("fsx on {name} did not finish: {err}"));
                }
                Some(Outcome::Ran(run)) => {
                    if let Some(why) = &run.failure {
                        problems.push(format!("fsx failed on {name}: {why}"));
                    }
                }
                _ => {}
            }
        }
        if !problems.is_empty() {
            bail!("{}", problems.join("; "));
        }
        Ok(())
    }

    /// The targets that were not run, with why (said again at the end of the output).
    pub fn not_run(&self) -> Vec<String> {
        self.targets
            .iter()
            .filter_map(|t| match &t.pjdfstest {
                Outcome::NotRun(why) => Some(format!("{}: {why}", t.target.label())),
                _ => None,
            })
            .collect()
    }
}

const HOW_IT_RUNS: &str = "\
## How it runs

`cargo xtask conformance [--target ext4|overlayfs|deltafs|deltafs-deep|all] [--fsx-ops N]`
(code in `xtask/src/conformance/` and `xtask/src/fstarget/`). pjdfstest always runs on
ext4 too: it is the baseline every other target is compared with.

| target | where pjdfstest and fsx run |
|---|---|
| ext4 | a directory under `/var/tmp/dbx` (checked to be on ext4; a short path, for pjdfstest's Unix sockets) |
| overlayfs | a kernel overlay mount: empty lower directory on ext4, upper and work directories on the xfs store (`/var/lib/deltabox/store`, see setup.md); for comparison, it gates nothing |
| deltafs | a fresh `deltafs mount --store <dir on the xfs store> --base <empty dir on ext4> <mount point>`, one mount for pjdfstest and another for fsx |
| deltafs-deep | a DeltaFS mount 50 layers deep: in each layer a file is rewritten, a directory created and the previous one removed (copy-ups, whiteouts), then `freeze`; pjdfstest runs in the directory those changes touched |

- **pjdfstest** gets a configuration file naming the users `nobody` (group `nogroup`)
  and `daemon` (group `daemon`), `naptime = 0.02` and the Linux features ext4 has
  (`posix_fallocate`, `rename_ctime`, `utime_now`, `utimensat`). With only
  `posix_fallocate`, ext4 here passes 356, fails 0 and skips 42 of the 398 cases; the
  other three features run 27 more cases.
- **fsx** runs with every Linux operation enabled (reads, writes, mmap reads and writes,
  truncate, fsync, fdatasync, `posix_fallocate`, hole punching, `sendfile`,
  `posix_fadvise`, `copy_file_range`, close and reopen, `msync(MS_INVALIDATE)`) on ext4
  and on DeltaFS. On DeltaFS the harness sends, every interval, `freeze` and then `switch`
  to the id just frozen: a rollback to the state fsx expects, which exercises the switch
  and the redirection of fsx's open file descriptor.
- Every mount, directory and process is removed by guards, also on a failure or Ctrl-C
  (not after a `kill -9` of xtask: then `umount -l /var/tmp/dbx/*-m-*` and remove
  `/var/tmp/dbx/*` and `/var/lib/deltabox/store/xtask/*`);
  logs are kept under `<target dir>/conformance/` (pjdfstest's and fsx's output) and
  `<target dir>/fs-logs/` (the DeltaFS daemon's stderr).
- `cargo xtask test` runs the same (without rewriting this file), with the same
  100 000 fsx operations unless `cargo xtask test --fsx-ops N` says otherwise, after the
  integration tests, and fails when a case that passes on ext4 does not pass on a DeltaFS
  target, or when fsx fails. Its time is about the sum of the times in the tables above
  plus the mounts and the 50 freezes of the deep target. Until the `deltafs` binary exists (a placeholder whose `deltafs mount
  --help` exits 0 without printing anything counts as not there yet), the DeltaFS targets
  are reported as not run, and the step says so; they never count as passed.
";

/// One line per case: failures first, then skips (which do not fail the step).
fn markdown_list(list: &[Regression]) -> String {
    let mut md = String::new();
    let failures = list.iter().filter(|r| r.is_failure());
    let skips = list.iter().filter(|r| !r.is_failure());
    for r in failures.chain(skips) {
        let detail = if r.detail.is_empty() {
            String::new()
        } else {
            format!(": {}", r.detail.replace('|', "\\|"))
        };
        let _ = writeln!(md, "- `{}` {}{detail}", r.name, r.status);
    }
    if !list.is_empty() {
        md.push('\n');
    }
    md
}

fn not_a_row(name: String, message: &str) -> [String; 7] {
    [
        name,
        message.to_owned(),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
    ]
}

/// `1.2 ms / 3.4 ms` of a list of durations; `-` when empty.
fn spread(samples: &[Duration]) -> String {
    if samples.is_empty() {
        return "-".to_owned();
    }
    let mut sorted = samples.to_vec();
    sorted.sort();
    let micros = |d: Duration| format!("{:.2} ms", d.as_secs_f64() * 1e3);
    format!(
        "{} / {}",
        micros(sorted[sorted.len() / 2]),
        micros(sorted[sorted.len() - 1])
    )
}

#[cfg(test)]
mod tests;
