//! The filesystem benchmark's figures: the median of each step per filesystem, with its
//! ratio to ext4; printed, and written into docs/benchmarks.md between two markers so
//! that the rest of that file (the DeltaFS-specific figures) is left alone.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{Result, bail};

use crate::fstarget::Kind;
use crate::machine::Facts;
use crate::table::{markdown_table, text_table};

/// The timed steps, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Untar,
    FindStat,
    GitCommit,
    PipInstall,
    SeqWrite,
    SeqRead,
}

const OPS: [Op; 6] = [
    Op::Untar,
    Op::FindStat,
    Op::GitCommit,
    Op::PipInstall,
    Op::SeqWrite,
    Op::SeqRead,
];

impl Op {
    /// For the progress lines.
    pub fn short(self) -> &'static str {
        match self {
            Op::Untar => "untar",
            Op::FindStat => "find+stat",
            Op::GitCommit => "git",
            Op::PipInstall => "pip",
            Op::SeqWrite => "write",
            Op::SeqRead => "read",
        }
    }

    fn label(self, size_mib: u64) -> String {
        match self {
            Op::Untar => "untar".to_owned(),
            Op::FindStat => "find + stat (warm)".to_owned(),
            Op::GitCommit => "git add -A && git commit".to_owned(),
            Op::PipInstall => "pip install (local wheels)".to_owned(),
            Op::SeqWrite => format!("{} sequential write + fsync", size(size_mib)),
            Op::SeqRead => format!("{} sequential read (cold)", size(size_mib)),
        }
    }

    /// Sequential I/O: reported as throughput, its ratio as a throughput ratio.
    fn is_io(self) -> bool {
        matches!(self, Op::SeqWrite | Op::SeqRead)
    }
}

fn size(mib: u64) -> String {
    if mib.is_multiple_of(1024) {
        format!("{} GiB", mib / 1024)
    } else {
        format!("{mib} MiB")
    }
}

/// One filesystem's runs.
#[derive(Debug)]
pub struct Column {
    pub kind: Kind,
    state: State,
}

#[derive(Debug)]
enum State {
    /// The samples of each finished run.
    Ran(Vec<Vec<(Op, Duration)>>),
    NotRun(String),
    Failed(String),
}

impl Column {
    pub fn new(kind: Kind) -> Self {
        Self {
            kind,
            state: State::Ran(Vec::new()),
        }
    }

    pub fn not_run(kind: Kind, why: String) -> Self {
        Self {
            kind,
            state: State::NotRun(why),
        }
    }

    pub fn failed(kind: Kind, err: String) -> Self {
        Self {
            kind,
            state: State::Failed(err),
        }
    }

    /// Whether it is still being measured (neither failed nor left out).
    pub fn is_running(&self) -> bool {
        matches!(self.state, State::Ran(_))
    }

    pub fn add(&mut self, samples: Vec<(Op, Duration)>) {
        if let State::Ran(runs) = &mut self.state {
            runs.push(samples);
        }
    }

    /// The times of `op`, one per finished run, in run order.
    fn samples(&self, op: Op) -> Vec<Duration> {
        let State::Ran(runs) = &self.state else {
            return Vec::new();
        };
        runs.iter()
            .flat_map(|run| run.iter().filter(|(o, _)| *o == op).map(|(_, d)| *d))
            .collect()
    }

    /// The median of `op` over the runs (the lower middle one for an even count).
    pub fn median(&self, op: Op) -> Option<Duration> {
        let mut samples = self.samples(op);
        if samples.is_empty() {
            return None;
        }
        samples.sort();
        Some(samples[(samples.len() - 1) / 2])
    }

    fn title(&self) -> &'static str {
        match self.kind {
            Kind::Ext4 => "ext4",
            Kind::Xfs => "xfs (the store)",
            Kind::Overlayfs => "overlayfs",
            Kind::DeltaFs => "DeltaFS",
        }
    }
}

/// A whole `bench fs` run.
#[derive(Debug)]
pub struct FsReport {
    pub command: String,
    pub facts: Facts,
    pub runs: u32,
    pub size_mib: u64,
    pub tree_files: u64,
    pub tree_mib: u64,
    pub tree_source: String,
    pub wheels: String,
    pub columns: Vec<Column>,
}

/// The markers between which `write_doc` puts the figures.
const BEGIN: &str = "<!-- BEGIN cargo xtask bench fs: generated, rerun it rather than editing -->";
const END: &str = "<!-- END cargo xtask bench fs -->";

impl FsReport {
    /// The rows: step, then one cell per column.
    fn rows(&self) -> Vec<[String; 5]> {
        let ext4 = self.columns.iter().find(|c| c.kind == Kind::Ext4);
        OPS.iter()
            .map(|&op| {
                let mut row: [String; 5] = Default::default();
                row[0] = op.label(self.size_mib);
                let base = ext4.and_then(|c| c.median(op));
                for (cell, column) in row[1..].iter_mut().zip(&self.columns) {
                    *cell = self.cell(op, column, base);
                }
                row
            })
            .collect()
    }

    fn cell(&self, op: Op, column: &Column, base: Option<Duration>) -> String {
        let median = match &column.state {
            State::NotRun(_) => return "not run".to_owned(),
            State::Failed(_) => return "failed".to_owned(),
            State::Ran(_) => column.median(op),
        };
        let Some(median) = median else {
            return "-".to_owned();
        };
        let mut cell = format_duration(median);
        if op.is_io() {
            let mib_s = self.size_mib as f64 / median.as_secs_f64();
            let _ = write!(cell, ", {mib_s:.0} MiB/s");
        }
        if column.kind != Kind::Ext4
            && let Some(base) = base
        {
            // Time ratio for the steps, throughput ratio for sequential I/O.
            let ratio = if op.is_io() {
                base.as_secs_f64() / median.as_secs_f64()
            } else {
                median.as_secs_f64() / base.as_secs_f64()
            };
            let _ = write!(cell, " ({ratio:.2}x)");
        }
        cell
    }

    /// Every run's time, in run order: the spread behind each median.
    fn sample_rows(&self) -> Vec<[String; 5]> {
        OPS.iter()
            .map(|&op| {
                let mut row: [String; 5] = Default::default();
                row[0] = op.label(self.size_mib);
                for (cell, column) in row[1..].iter_mut().zip(&self.columns) {
                    let samples: Vec<String> = column
                        .samples(op)
                        .into_iter()
                        .map(format_duration)
                        .collect();
                    *cell = if samples.is_empty() {
                        "-".to_owned()
                    } else {
                        samples.join(" / ")
                    };
                }
                row
            })
            .collect()
    }

    fn header(&self) -> [&str; 5] {
        let mut header = ["step"; 5];
        for (title, column) in header[1..].iter_mut().zip(&self.columns) {
            *title = column.title();
        }
        header
    }

    /// Why each column that did not run did not, or what failed.
    fn notes(&self) -> Vec<String> {
        self.columns
            .iter()
            .filter_map(|c| match &c.state {
                State::NotRun(why) => Some(format!("{} not run: {why}", c.title())),
                State::Failed(err) => Some(format!("{} failed: {err}", c.title())),
                State::Ran(_) => None,
            })
            .collect()
    }

    pub fn text(&self) -> String {
        let mut out = text_table(&self.header(), &self.rows());
        for note in self.notes() {
            let _ = writeln!(out, "  {note}");
        }
        out
    }

    /// The columns that were not run, with why.
    pub fn not_run(&self) -> Vec<String> {
        self.columns
            .iter()
            .filter_map(|c| match &c.state {
                State::NotRun(why) => Some(format!("{}: {why}", c.title())),
                _ => None,
            })
            .collect()
    }

    /// Fails when a filesystem's runs failed.
    pub fn errors(&self) -> Result<()> {
        let failed: Vec<String> = self
            .columns
            .iter()
            .filter_map(|c| match &c.state {
                State::Failed(err) => Some(format!("{}: {err}", c.title())),
                _ => None,
            })
            .collect();
        if !failed.is_empty() {
            bail!("the benchmark failed on {}", failed.join("; "));
        }
        Ok(())
    }

    /// The generated section, markers included.
    fn section(&self) -> String {
        let mut md = format!("{BEGIN}\n\n");
        let _ = write!(
            md,
            "Measured with `{}` on {} ({}): the median of {} runs per filesystem, each run \
             in a fresh directory (a fresh mount for overlayfs and DeltaFS).\n\n",
            self.command,
            self.facts.date,
            self.facts.line(),
            self.runs
        );
        md.push_str(&markdown_table(&self.header(), &self.rows()));
        let _ = write!(
            md,
            "\nIn parentheses, against ext4: for the steps, time on that filesystem / time on \
             ext4 (lower is better; the target for DeltaFS is at most 1.5x); for sequential \
             I/O, throughput / ext4's throughput (higher is better; the target is at least \
             0.9x).\n\n\
             - **untar**: `tar -xf` of {} files ({} MiB), the CPython standard library of this \
             machine (`{}`, with its `__pycache__` directories, without `site-packages`), \
             made into a tarball once and cached under the target directory.\n\
             - **find + stat**: `find <tree> -exec stat --format=%s {{}} +` right after the \
             untar (warm caches).\n\
             - **git**: `git init` (not timed), then `git add -A && git commit` of the whole \
             tree, with no user or system git configuration.\n\
             - **pip install**: `python3 -m pip install --no-index --find-links <dir> \
             --target <tree>/site-packages` of {}.\n\
             - **sequential write**: 1 MiB `write`s and an `fsync`, timed together; then \
             `sync` and `echo 3 > /proc/sys/vm/drop_caches`; **sequential read**: 1 MiB \
             `read`s of the whole file.\n\
             - `sync` before every step; the tarball is read once before each untar, so \
             every untar reads it from the page cache. The runs go round-robin (run 1 on \
             every filesystem, then run 2, …), so background load on this shared 2-CPU \
             machine is spread over the filesystems. The xfs column is a directory on the loop-mounted \
             xfs store that overlayfs's upper directory and DeltaFS's layers are on (see \
             setup.md), so it separates the cost of the backing filesystem from that of the \
             layering.\n",
            self.tree_files, self.tree_mib, self.tree_source, self.wheels
        );
        for note in self.notes() {
            let _ = writeln!(md, "- {note}");
        }
        md.push_str("\nEvery run, in order (the spread behind each median):\n\n");
        md.push_str(&markdown_table(&self.header(), &self.sample_rows()));
        md.push('\n');
        md.push_str(END);
        md
    }

    /// Writes the figures into `path` between the markers, keeping the rest of the file;
    /// creates the file (with a section for the DeltaFS-specific figures) if missing.
    pub fn write_doc(&self, path: &Path) -> Result<()> {
        super::rewrite_doc(path, |old| splice(old, &self.section()))
    }
}

/// `old` with the text between the markers replaced by `section`; a new file when `old`
/// is empty; `section` appended when `old` has no markers.
fn splice(old: &str, section: &str) -> String {
    if old.trim().is_empty() {
        return format!("{HEAD}{section}\n\n{DELTAFS_SECTION}");
    }
    match (old.find(BEGIN), old.find(END)) {
        (Some(begin), Some(end)) if begin < end => {
            format!("{}{section}{}", &old[..begin], &old[end + END.len()..])
        }
        _ => format!("{}\n\n{section}\n", old.trim_end()),
    }
}

const HEAD: &str = "\
# Benchmarks

Figures measured on the target machine, each with the command that produced it. Rerun the
command to refresh them.

## Filesystems: `cargo xtask bench fs`

ext4, the xfs store, overlayfs and DeltaFS side by side in one run (code in
`xtask/src/bench/`). `cargo xtask bench` runs every benchmark (only `fs` for now).

";

const DELTAFS_SECTION: &str = "\
## DeltaFS-specific figures (from the DeltaFS library)

Freeze and switch latency on a 10 000-file tree with 100 changed files (targets: freeze
at most 100 µs, switch at most 500 µs) and lookup at a depth of 1 000 layers against
depth 1 (target: within 2x) are measured by the DeltaFS library's own benchmark, not by
`cargo xtask bench fs`; the DeltaFS engineer adds them here, with their command.
`cargo xtask bench fs` rewrites only the text between its two markers above and leaves
this section alone.

Not measured yet.
";

/// `2.31 s`, `412 ms`.
fn format_duration(d: Duration) -> String {
    if d >= Duration::from_secs(10) {
        format!("{:.1} s", d.as_secs_f64())
    } else if d >= Duration::from_secs(1) {
        format!("{:.2} s", d.as_secs_f64())
    } else {
        format!("{} ms", d.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(secs: [f64; 6]) -> Vec<(Op, Duration)> {
        OPS.iter()
            .zip(secs)
            .map(|(op, s)| (*op, Duration::from_secs_f64(s)))
            .collect()
    }

    fn report() -> FsReport {
        let mut ext4 = Column::new(Kind::Ext4);
        ext4.add(run([2.0, 0.5, 10.0, 3.0, 1.0, 1.0]));
        ext4.add(run([2.2, 0.4, 12.0, 3.0, 1.0, 1.0]));
        ext4.add(run([9.0, 0.6, 11.0, 3.0, 1.0, 1.0]));
        let mut xfs = Column::new(Kind::Xfs);
        xfs.add(run([3.0, 1.0, 11.0, 4.5, 2.0, 0.5]));
        FsReport {
            command: "cargo xtask bench fs".to_owned(),
            facts: Facts {
                date: "2026-11-22 10:00 UTC".to_owned(),
                kernel: "6.18.44".to_owned(),
                cpu: "AMD EPYC, 2 CPUs".to_owned(),
                memory: "24 GiB".to_owned(),
                root_fs: "ext4 on /dev/vda".to_owned(),
                commit: "f1c0585".to_owned(),
            },
            runs: 3,
            size_mib: 1024,
            tree_files: 7733,
            tree_mib: 237,
            tree_source: "/usr/lib/python3.11".to_owned(),
            wheels: "pip, setuptools".to_owned(),
            columns: vec![
                ext4,
                xfs,
                Column::failed(Kind::Overlayfs, "mount failed".to_owned()),
                Column::not_run(Kind::DeltaFs, "no binary".to_owned()),
            ],
        }
    }

    #[test]
    fn medians_and_ratios() {
        let r = report();
        assert_eq!(
            r.columns[0].median(Op::Untar),
            Some(Duration::from_secs_f64(2.2))
        );
        let rows = r.rows();
        assert_eq!(rows[0][1], "2.20 s");
        assert_eq!(rows[0][2], "3.00 s (1.36x)");
        assert_eq!(rows[1][2], "1.00 s (2.00x)");
        assert_eq!(rows[2][1], "11.0 s");
        // Throughput: half of ext4's for the write, twice for the read.
        assert_eq!(rows[4][2], "2.00 s, 512 MiB/s (0.50x)");
        assert_eq!(rows[5][2], "500 ms, 2048 MiB/s (2.00x)");
        assert_eq!(rows[5][3], "failed");
        assert_eq!(rows[5][4], "not run");
        assert_eq!(rows[4][0], "1 GiB sequential write + fsync");
        assert!(
            r.errors()
                .unwrap_err()
                .to_string()
                .contains("overlayfs: mount failed")
        );
        assert_eq!(r.not_run(), ["DeltaFS: no binary"]);
    }

    #[test]
    fn the_doc_keeps_what_is_outside_the_markers() {
        let section = report().section();
        let fresh = splice("", &section);
        assert!(fresh.starts_with("# Benchmarks\n"));
        assert!(fresh.contains("## DeltaFS-specific figures"));
        let edited = fresh.replace(
            "Not measured yet.",
            "freeze: 42 µs (cargo bench -p deltafs)",
        );
        let mut other = report();
        other.runs = 5;
        let again = splice(&edited, &other.section());
        assert!(again.contains("freeze: 42 µs (cargo bench -p deltafs)"));
        assert!(again.contains("the median of 5 runs"));
        assert!(!again.contains("the median of 3 runs"));
        assert_eq!(again.matches(BEGIN).count(), 1);
        let appended = splice("# Other\n", &section);
        assert!(appended.starts_with("# Other\n\n<!-- BEGIN"));
    }
}
