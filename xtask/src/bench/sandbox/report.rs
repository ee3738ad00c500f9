//! The sandbox benchmark's figures: tables printed and written into docs/benchmarks.md
//! between this bench's own markers (the rest of the file is left alone), with the
//! targets of issue 6 and whether each is met.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;

use super::rl::{self, Figures};
use super::stats::{Samples, ms};
use super::swe::{self, Outcome};
use crate::machine::Facts;
use crate::table::{markdown_table, text_table};

/// Targets (milliseconds, and a share).
const CHECKPOINT_TARGET_MS: f64 = 3.0;
const ROLLBACK_TARGET_MS: f64 = 2.0;
const SHARE_TARGET: f64 = 0.03;

/// A whole `bench sandbox` run.
pub struct SandboxReport {
    /// The command line that reproduces the run.
    pub command: String,
    /// Where and when.
    pub facts: Facts,
    /// `debug` or `release`: the profile deltaboxd was built with.
    pub profile: &'static str,
    /// `/proc/loadavg`'s 1, 5 and 15 minute averages when the measurements started (the
    /// machine may be shared: background load shows in the tails).
    pub load: String,
    /// Set when the daemon was built from a working tree with uncommitted changes.
    pub dirty: Option<String>,
    /// `more-itertools 10.5.0 (121 KiB sdist from PyPI)`.
    pub project: String,
    /// The SWE-like trajectory under both systems.
    pub swe: Outcome,
    /// The RL-like micro-benchmark.
    pub rl: Figures,
}

const BEGIN: &str =
    "<!-- BEGIN cargo xtask bench sandbox: generated, rerun it rather than editing -->";
const END: &str = "<!-- END cargo xtask bench sandbox -->";

const LATENCY_HEADER: [&str; 5] = ["operation", "n", "median", "P95", "P99"];

fn latency_row(what: &str, samples: &Samples) -> [String; 5] {
    match samples.summary() {
        Some(s) => [
            what.to_owned(),
            s.count.to_string(),
            ms(s.median),
            ms(s.p95),
            ms(s.p99),
        ],
        None => [
            what.to_owned(),
            "0".to_owned(),
            "-".to_owned(),
            "-".to_owned(),
            "-".to_owned(),
        ],
    }
}

fn median(samples: &Samples) -> f64 {
    samples.summary().map_or(f64::NAN, |s| s.median)
}

fn pct(share: f64) -> String {
    format!("{:.2} %", share * 100.0)
}

fn verdict(met: bool) -> String {
    if met { "met" } else { "MISSED" }.to_owned()
}

impl SandboxReport {
    fn swe_rows(&self) -> Vec<[String; 5]> {
        let (d, b) = (&self.swe.deltabox, &self.swe.baseline);
        let mut rows = vec![
            latency_row(
                "DeltaBox checkpoint, client (API round trip)",
                &d.checkpoint_client,
            ),
            latency_row(
                "DeltaBox checkpoint, daemon (timings.total_ms)",
                &d.checkpoint_daemon,
            ),
        ];
        for (name, samples) in &d.checkpoint_parts {
            rows.push(latency_row(&format!("  of which {name}"), samples));
        }
        // Whether a checkpoint costs more as the tree grows (more nodes, more templates).
        let n = d.checkpoint_client.len();
        let third = n / 3;
        if third >= 3 {
            rows.push(latency_row(
                &format!("DeltaBox checkpoint, client, steps 1-{third}"),
                &d.checkpoint_client.slice(0..third),
            ));
            rows.push(latency_row(
                &format!("DeltaBox checkpoint, client, steps {}-{n}", n - third + 1),
                &d.checkpoint_client.slice(n - third..n),
            ));
        }
        rows.push(latency_row(
            "DeltaBox rollback, client (API round trip)",
            &d.rollback_client,
        ));
        rows.push(latency_row(
            "DeltaBox rollback, daemon (timings.total_ms)",
            &d.rollback_daemon,
        ));
        for (name, samples) in &d.rollback_parts {
            rows.push(latency_row(&format!("  of which {name}"), samples));
        }
        rows.extend([
            latency_row("baseline git add + commit, client", &b.checkpoint_client),
            latency_row(
                "baseline rollback (git + fresh interpreter + set-up), client",
                &b.rollback_client,
            ),
            latency_row("  of which git stash + checkout", &b.rollback_git),
            latency_row(
                "  of which interpreter restart + set-up",
                &b.rollback_restart,
            ),
        ]);
        rows
    }

    fn share_rows(&self) -> Vec<[String; 5]> {
        let row = |name: &str, t: &swe::Trajectory| {
            [
                name.to_owned(),
                t.steps.to_string(),
                ms(t.work_ms),
                ms(t.state_ms()),
                format!(
                    "{} ({})",
                    pct(t.share()),
                    t.daemon_share().map_or_else(|| "-".to_owned(), pct)
                ),
            ]
        };
        vec![
            row("DeltaBox", &self.swe.deltabox),
            row("baseline (git, processes restarted)", &self.swe.baseline),
        ]
    }

    fn rl_rows(&self) -> Vec<[String; 5]> {
        let r = &self.rl;
        vec![
            latency_row("step (session run)", &r.step_client),
            latency_row(
                "reset = rollback to the set-up node, client",
                &r.reset_client,
            ),
            latency_row("reset, daemon (timings.total_ms)", &r.reset_daemon),
            latency_row("checkpoint before a fan-out, client", &r.checkpoint_client),
            latency_row("checkpoint before a fan-out, daemon", &r.checkpoint_daemon),
            latency_row(
                &format!("branch x{}, client (one call)", r.fanout),
                &r.branch_client,
            ),
            latency_row("branch, daemon (branch_ms, per sandbox)", &r.branch_daemon),
            latency_row("step in a branched sandbox", &r.branch_step_client),
            latency_row("remove a branched sandbox, client", &r.remove_client),
        ]
    }

    fn rl_line(&self) -> String {
        format!(
            "{} steps in {}: {:.1} steps/s overall; {:.0} resets/s back to back \
             (resets / time spent resetting); state management {} of the loop",
            self.rl.steps,
            ms(self.rl.wall_ms),
            self.rl.steps_per_sec(),
            self.rl.resets_per_sec(),
            pct(self.rl.share())
        )
    }

    fn target_rows(&self) -> Vec<[String; 4]> {
        let d = &self.swe.deltabox;
        let checkpoint = median(&d.checkpoint_client);
        let rollback = median(&d.rollback_client);
        let reset = median(&self.rl.reset_client);
        vec![
            [
                "checkpoint <= 3 ms median, end to end".to_owned(),
                format!(
                    "{} (daemon {})",
                    ms(checkpoint),
                    ms(median(&d.checkpoint_daemon))
                ),
                verdict(checkpoint <= CHECKPOINT_TARGET_MS),
                "SWE trajectory, client side".to_owned(),
            ],
            [
                "rollback <= 2 ms median, end to end".to_owned(),
                format!(
                    "{} (daemon {})",
                    ms(rollback),
                    ms(median(&d.rollback_daemon))
                ),
                verdict(rollback <= ROLLBACK_TARGET_MS),
                "SWE trajectory, client side".to_owned(),
            ],
            [
                "rollback <= 2 ms median, end to end".to_owned(),
                format!(
                    "{} (daemon {})",
                    ms(reset),
                    ms(median(&self.rl.reset_daemon))
                ),
                verdict(reset <= ROLLBACK_TARGET_MS),
                "RL resets, client side".to_owned(),
            ],
            [
                "state management <= 3 % of the trajectory".to_owned(),
                pct(d.share()),
                verdict(d.share() <= SHARE_TARGET),
                "SWE trajectory, client side".to_owned(),
            ],
        ]
    }

    /// The tables, as printed on the terminal.
    pub fn text(&self) -> String {
        let mut out = String::from("SWE-like trajectory: latencies\n");
        out.push_str(&text_table(&LATENCY_HEADER, &self.swe_rows()));
        out.push_str("SWE-like trajectory: time shares\n");
        out.push_str(&text_table(&SHARE_HEADER, &self.share_rows()));
        out.push_str("RL-like micro-benchmark\n");
        out.push_str(&text_table(&LATENCY_HEADER, &self.rl_rows()));
        let _ = writeln!(out, "  {}", self.rl_line());
        out.push_str("Targets\n");
        out.push_str(&text_table(&TARGET_HEADER, &self.target_rows()));
        out
    }

    /// The generated section, markers included.
    fn section(&self) -> String {
        let mut md = format!("{BEGIN}\n\n## Sandboxes: `cargo xtask bench sandbox`\n\n");
        let _ = write!(
            md,
            "Measured with `{}` on {} ({}), deltaboxd built with the {} profile{}, driven \
             over its API socket by raw HTTP requests (one connection per request), so the \
             client-side figures are the whole API round trip without a CLI process's \
             start-up. Only measured numbers; every rollback is checked (files and the \
             Python session's memory) before the run goes on. Load average when the \
             measurements started: {}.\n\n",
            self.command,
            self.facts.date,
            self.facts.line(),
            self.profile,
            self.dirty
                .as_ref()
                .map_or_else(String::new, |d| format!(" from a working tree with {d}")),
            self.load
        );
        md.push_str("### Targets (issue 6)\n\n");
        md.push_str(&markdown_table(&TARGET_HEADER, &self.target_rows()));
        let _ = write!(
            md,
            "\n### SWE-like trajectory\n\n\
             The project is {}, unpacked into `/workspace` of two sandboxes (the default \
             root: the host's `/usr`, so its `/usr/bin/python3`, read-only). Each sandbox \
             has a persistent Python session (the package imported, a list of test results \
             in memory) and a bash session. A step appends a comment line to \
             `more_itertools/recipes.py` and runs the 176 tests of `tests/test_recipes.py` \
             with `unittest` inside the Python session (the edited modules reloaded), then \
             saves the state; every {} steps the sandbox rolls back {} steps (the last two \
             steps are dropped, and the next step starts from that state). \
             **DeltaBox**: a checkpoint of the sandbox (files and both sessions) per step, a \
             rollback (`mode: all`) to the node. **Baseline** (files only): `git add -A && \
             git commit` in the bash session per step; to roll back, `git stash -u && git \
             checkout <commit>`, then the Python session is stopped and a fresh interpreter \
             re-runs the set-up (its memory of earlier steps is lost, which DeltaBox \
             keeps). The two run in alternation, step by step.\n\n",
            self.project,
            swe::ROLLBACK_EVERY,
            swe::ROLLBACK_BACK
        );
        md.push_str(&markdown_table(&LATENCY_HEADER, &self.swe_rows()));
        md.push('\n');
        md.push_str(&markdown_table(&SHARE_HEADER, &self.share_rows()));
        md.push_str(
            "\nThe share is state management / (work + state management), both as the \
             client saw them; in parentheses the same with the daemon's own time for the \
             checkpoints and rollbacks. The work is the step's session run (edit + \
             tests).\n",
        );
        let _ = write!(
            md,
            "\n### RL-like micro-benchmark\n\n\
             One sandbox with a Python session holding an environment (a counter, a \
             4096-float observation buffer, a log file in `/workspace`). A step is one \
             session run that advances it; every {} steps a reset rolls back to the node \
             taken after the set-up; every {} steps a fan-out checkpoints, branches {} \
             sandboxes from that node in one call, runs a step in each and removes them. \
             Every step checks the counter in memory against the log on disk.\n\n",
            rl::EPISODE,
            rl::FANOUT_EVERY,
            self.rl.fanout
        );
        md.push_str(&markdown_table(&LATENCY_HEADER, &self.rl_rows()));
        let _ = writeln!(md, "\n{}.\n", self.rl_line());
        md.push_str(END);
        md
    }

    /// Writes the figures into `path` between the markers, keeping the rest of the file.
    pub fn write_doc(&self, path: &Path) -> Result<()> {
        crate::bench::rewrite_doc(path, |old| splice(old, &self.section()))
    }
}

const SHARE_HEADER: [&str; 5] = [
    "system",
    "steps",
    "work",
    "state management",
    "share (daemon-side)",
];
const TARGET_HEADER: [&str; 4] = ["target", "measured", "verdict", "where"];

/// `old` with the text between the markers replaced by `section`, or `section` appended.
fn splice(old: &str, section: &str) -> String {
    match (old.find(BEGIN), old.find(END)) {
        (Some(begin), Some(end)) if begin < end => {
            format!("{}{section}{}", &old[..begin], &old[end + END.len()..])
        }
        _ if old.trim().is_empty() => format!("# Benchmarks\n\n{section}\n"),
        _ => format!("{}\n\n{section}\n", old.trim_end()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splice_replaces_only_its_own_section() {
        let first = splice(
            "# Benchmarks\n\nfs figures\n",
            &format!("{BEGIN}\none\n{END}"),
        );
        assert!(
            first.starts_with("# Benchmarks\n\nfs figures\n\n<!-- BEGIN cargo xtask bench sandbox")
        );
        let tail = format!("{first}\n## Later\n");
        let second = splice(&tail, &format!("{BEGIN}\ntwo\n{END}"));
        assert!(second.contains("two") && !second.contains("one"));
        assert!(second.contains("fs figures") && second.ends_with("## Later\n"));
        assert_eq!(second.matches(BEGIN).count(), 1);
    }
}
