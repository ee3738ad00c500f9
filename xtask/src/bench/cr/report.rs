//! The DeltaCR benchmark's figures: tables printed and written into docs/benchmarks.md
//! between this bench's own markers (the rest of the file is left alone), with the
//! targets of issue 5 and whether each is met.

// Without the `bench-cr` feature only the unit tests use this module.
#![cfg_attr(not(feature = "bench-cr"), allow(dead_code))]

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;

use super::targets::TARGET_HEADER;
use crate::bench::sandbox::stats::{Samples, ms};
use crate::machine::Facts;
use crate::table::{markdown_table, text_table};

/// The figures of one memory size and page kind.
#[derive(Debug, Default)]
pub struct Config {
    /// MiB the python process holds (touched).
    pub mib: u64,
    /// Backed by transparent huge pages (`MADV_HUGEPAGE`) rather than 4 KiB pages.
    pub thp: bool,
    /// `AnonHugePages` of the python process once its memory was touched, KiB.
    pub huge_kib: u64,
    /// `AnonHugePages` of the python process after the rounds, KiB: a write to a huge
    /// page shared with a template splits the writer's mapping of it into 4 KiB
    /// entries, which its later forks (templates, rollbacks) inherit.
    pub huge_kib_end: u64,
    /// Checkpoint of the sandbox (bash and python, in parallel), ms.
    pub checkpoint: Samples,
    /// Of which the python process's pause (interrupt to release), ms.
    pub pause: Samples,
    /// Rollback of the sandbox (both processes, in parallel), ms.
    pub rollback: Samples,
    /// Of which the python template's injected fork, ms.
    pub fork: Samples,
    /// KiB of pages the new templates (both) alone own once the processes wrote after
    /// the checkpoint.
    pub own_kib: Samples,
    /// KiB of page tables of the new templates (both).
    pub pte_kib: Samples,
    /// Full copy of both processes' private pages into a file, ms (no fsync).
    pub full_copy: Samples,
    /// The `fsync` of that file, ms.
    pub full_fsync: Samples,
    /// MiB the full copy wrote.
    pub full_copy_mib: f64,
}

impl Config {
    /// `4 KiB` or `THP`.
    fn pages(&self) -> &'static str {
        if self.thp { "THP" } else { "4 KiB" }
    }

    pub(super) fn median(samples: &Samples) -> Option<f64> {
        samples.summary().map(|s| s.median)
    }
}

/// The fallback restore at one size of delta.
#[derive(Debug, Default)]
pub struct Fallback {
    /// MiB the process rewrote since the ancestor's checkpoint.
    pub delta_mib: u64,
    /// MiB the incremental dump wrote (the delta as the dump saw it: the rewritten
    /// pages plus those the interpreter dirtied).
    pub dumped_mib: f64,
    /// The whole restore from the ancestor's template and the dump, ms.
    pub total: Samples,
    /// Of which making the child's memory the dump's, ms.
    pub memory: Samples,
}

impl Fallback {
    /// Median milliseconds per 64 MiB of delta.
    pub(super) fn per_64(&self) -> Option<f64> {
        let s = self.total.summary()?;
        Some(s.median * 64.0 / self.delta_mib as f64)
    }
}

/// A whole `bench cr` run.
#[derive(Debug)]
pub struct CrReport {
    /// The command line that reproduces the run.
    pub command: String,
    /// Where and when.
    pub facts: Facts,
    /// `/proc/loadavg`'s averages at the start and at the end of the measurements.
    pub load: (String, String),
    /// Operations of each kind per configuration.
    pub ops: usize,
    /// Pause before each operation, ms.
    pub gap_ms: u64,
    /// Pages the python process writes between two operations.
    pub writes: u32,
    /// MiB at the start of its buffer those writes stay in (0: anywhere in it).
    pub hot_mib: u64,
    /// Per memory size and page kind.
    pub configs: Vec<Config>,
    /// MiB the process of the fallback measurement holds (4 KiB pages).
    pub fallback_mib: u64,
    /// Per size of delta.
    pub fallback: Vec<Fallback>,
    /// Where the full copies and dumps were written.
    pub store: String,
    /// Run at real-time priority (`--realtime`).
    pub realtime: bool,
}

const BEGIN: &str = "<!-- BEGIN cargo xtask bench cr: generated, rerun it rather than editing -->";
const END: &str = "<!-- END cargo xtask bench cr -->";

const LATENCY_HEADER: [&str; 7] = ["memory", "pages", "operation", "n", "median", "P95", "P99"];
const COST_HEADER: [&str; 7] = [
    "memory",
    "pages",
    "huge pages (start, end)",
    "template owns",
    "template page tables",
    "full copy (no fsync)",
    "checkpoint / full copy",
];
const FALLBACK_HEADER: [&str; 7] = [
    "delta",
    "dumped",
    "n",
    "restore median (P95)",
    "of which memory",
    "per MiB",
    "per 64 MiB",
];

/// `64 MiB`, `1 GiB`.
pub fn size(mib: u64) -> String {
    if mib >= 1024 && mib.is_multiple_of(1024) {
        format!("{} GiB", mib / 1024)
    } else {
        format!("{mib} MiB")
    }
}

/// `12 KiB`, `3.4 MiB`.
pub fn kib(value: f64) -> String {
    if value >= 1024.0 {
        format!("{:.1} MiB", value / 1024.0)
    } else {
        format!("{value:.0} KiB")
    }
}

fn latency_row(config: &Config, what: &str, samples: &Samples) -> [String; 7] {
    let mut row = [
        size(config.mib),
        config.pages().to_owned(),
        what.to_owned(),
        "0".to_owned(),
        "-".to_owned(),
        "-".to_owned(),
        "-".to_owned(),
    ];
    if let Some(s) = samples.summary() {
        row[3] = s.count.to_string();
        row[4] = ms(s.median);
        row[5] = ms(s.p95);
        row[6] = ms(s.p99);
    }
    row
}

impl CrReport {
    pub(super) fn config(&self, mib: u64, thp: bool) -> Option<&Config> {
        self.configs.iter().find(|c| c.mib == mib && c.thp == thp)
    }

    fn latency_rows(&self) -> Vec<[String; 7]> {
        let mut rows = Vec::new();
        for c in &self.configs {
            rows.push(latency_row(c, "checkpoint", &c.checkpoint));
            rows.push(latency_row(c, "  of which python's pause", &c.pause));
            rows.push(latency_row(c, "rollback", &c.rollback));
            rows.push(latency_row(c, "  of which python's template fork", &c.fork));
        }
        rows
    }

    fn cost_rows(&self) -> Vec<[String; 7]> {
        self.configs
            .iter()
            .map(|c| {
                let copy = Config::median(&c.full_copy);
                let ratio = match (Config::median(&c.checkpoint), copy) {
                    (Some(ck), Some(copy)) if copy > 0.0 => format!("{:.3}", ck / copy),
                    _ => "-".to_owned(),
                };
                let copy = copy.map_or_else(
                    || "-".to_owned(),
                    |copy| {
                        let fsync = Config::median(&c.full_fsync)
                            .map_or_else(String::new, |f| format!(", then fsync {}", ms(f)));
                        format!(
                            "{} of {:.0} MiB (median of {}){fsync}",
                            ms(copy),
                            c.full_copy_mib,
                            c.full_copy.len()
                        )
                    },
                );
                [
                    size(c.mib),
                    c.pages().to_owned(),
                    format!("{}, {}", kib(c.huge_kib as f64), kib(c.huge_kib_end as f64)),
                    Config::median(&c.own_kib).map_or_else(|| "-".to_owned(), kib),
                    Config::median(&c.pte_kib).map_or_else(|| "-".to_owned(), kib),
                    copy,
                    ratio,
                ]
            })
            .collect()
    }

    fn fallback_rows(&self) -> Vec<[String; 7]> {
        self.fallback
            .iter()
            .map(|f| {
                let mut row = [
                    size(f.delta_mib),
                    format!("{:.1} MiB", f.dumped_mib),
                    f.total.len().to_string(),
                    "-".to_owned(),
                    "-".to_owned(),
                    "-".to_owned(),
                    "-".to_owned(),
                ];
                if let Some(s) = f.total.summary() {
                    row[3] = format!("{} ({})", ms(s.median), ms(s.p95));
                    row[5] = ms(s.median / f.delta_mib as f64);
                }
                if let Some(m) = f.memory.summary() {
                    row[4] = ms(m.median);
                }
                if let Some(per) = f.per_64() {
                    row[6] = ms(per);
                }
                row
            })
            .collect()
    }

    /// The tables as printed.
    pub fn text(&self) -> String {
        let mut out = String::from("Latency (DeltaCR library, this process as controller):\n");
        out.push_str(&text_table(&LATENCY_HEADER, &self.latency_rows()));
        out.push_str("\nMemory cost per checkpoint and the full-copy baseline:\n");
        out.push_str(&text_table(&COST_HEADER, &self.cost_rows()));
        let _ = writeln!(
            out,
            "\nFallback restore (template of the ancestor + incremental dump), {} process, \
             4 KiB pages:",
            size(self.fallback_mib)
        );
        out.push_str(&text_table(&FALLBACK_HEADER, &self.fallback_rows()));
        out.push_str("\nTargets (issue 5):\n");
        out.push_str(&text_table(&TARGET_HEADER, &self.target_rows()));
        out
    }

    /// The generated section, markers included.
    fn section(&self) -> String {
        let mut md = format!("{BEGIN}\n\n## DeltaCR: `cargo xtask bench cr`\n\n");
        let _ = write!(
            md,
            "Measured with `{}` on {} ({}); load average {} at the start, {} at the end. \
             The machine is shared with other engineers' builds and tests: the tails (P95, \
             P99) carry their noise.\n\n",
            self.command,
            self.facts.date,
            self.facts.line(),
            self.load.0,
            self.load.1
        );
        if self.realtime {
            md.push_str(
                "This run was at real-time priority (`--realtime`: SCHED_FIFO 10 for the \
                 bench and, inherited, for the processes it starts), so other processes' \
                 CPU time is mostly out of the figures.\n\n",
            );
        }
        let _ = write!(
            md,
            "A sandbox-like cgroup (cgroup2) runs `bash` and a `python3` process holding the \
             given memory in one private anonymous mapping, every page touched; with THP the \
             mapping is `madvise(MADV_HUGEPAGE)`d (THP is `madvise` here) and the table shows \
             its `AnonHugePages` before the first round and after the last, with 4 KiB pages `MADV_NOHUGEPAGE`. The bench calls the \
             DeltaCR library itself (release build, no daemon, no DeltaFS): a **checkpoint** \
             is `cr::checkpoint` of both processes, one thread each, as the daemon does; a \
             **rollback** is `cr::rollback` of both to those templates (kill the running \
             process, fork the template). Each of the {} rounds per row (after one warm-up): \
             the python process writes one byte in each of {} random pages {} (and \
             bash bumps a variable), {} ms pause, checkpoint, another {} random pages \
             written, {} ms pause, rollback, then a check that both processes are back at \
             the checkpoint's counters; the previous round's templates are destroyed after \
             the rollback, outside the timings.\n\n",
            self.ops,
            self.writes,
            if self.hot_mib == 0 {
                "anywhere in its buffer".to_owned()
            } else {
                format!(
                    "of the first {} of its buffer (a hot working set)",
                    size(self.hot_mib)
                )
            },
            self.gap_ms,
            self.writes,
            self.gap_ms
        );
        md.push_str(&markdown_table(&LATENCY_HEADER, &self.latency_rows()));
        md.push_str(
            "\n**Memory cost per checkpoint**: after the writes that follow a checkpoint, the \
             new templates' `Private_Clean + Private_Dirty` (`/proc/<pid>/smaps_rollup`: pages \
             mapped by that template alone: the old copies of pages written since, which the \
             previous template does not share) and their page tables (`VmPTE`), median over \
             the rounds. **Full copy**: what a full-state dump copies: every private page \
             (present or swapped, from `/proc/<pid>/pagemap`) of both processes read through \
             `/proc/<pid>/mem` and written into one file on the store; \
             the `fsync` after it is shown apart and left out of the ratio (which is then \
             the ratio most favourable to the copy).\n\n",
        );
        md.push_str(&markdown_table(&COST_HEADER, &self.cost_rows()));
        let _ = write!(
            md,
            "\n**Fallback restore** (the node's template gone): a python process holding {} \
             of 4 KiB pages is checkpointed and that template dumped in full; then it \
             rewrites every page of the first *delta* MiB of its buffer, is checkpointed \
             again, that template dumped incrementally (against the first dump) and \
             destroyed; the timed step is `Template::restore_from_dump` from the first \
             template with both dumps (the running process killed beforehand, outside the \
             timing), then a check of the restored process's counter and of a checksum of \
             the rewritten pages. *Dumped* is what the incremental dump wrote.\n\n",
            size(self.fallback_mib)
        );
        md.push_str(&markdown_table(&FALLBACK_HEADER, &self.fallback_rows()));
        md.push_str("\nTargets (issue 5):\n\n");
        md.push_str(&markdown_table(&TARGET_HEADER, &self.target_rows()));
        let _ = write!(
            md,
            "\nFull copies and dumps were written to {}.\n\n",
            self.store
        );
        md.push_str(END);
        md
    }

    /// Writes the figures into `path` between the markers, keeping the rest of the file.
    pub fn write_doc(&self, path: &Path) -> Result<()> {
        crate::bench::rewrite_doc(path, |old| splice(old, &self.section()))
    }
}

/// `old` with the text between the markers replaced by `section`; `section` appended
/// when `old` has no markers.
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
pub(super) mod tests {
    use super::*;

    fn samples(values: &[f64]) -> Samples {
        let mut s = Samples::default();
        for &v in values {
            s.push(v);
        }
        s
    }

    fn config(mib: u64, thp: bool, checkpoint: f64, rollback: f64) -> Config {
        Config {
            mib,
            thp,
            huge_kib: if thp { mib * 1024 } else { 0 },
            huge_kib_end: if thp { mib * 512 } else { 0 },
            checkpoint: samples(&[checkpoint, checkpoint * 3.0, checkpoint]),
            pause: samples(&[checkpoint / 2.0]),
            rollback: samples(&[rollback, rollback, rollback * 5.0]),
            fork: samples(&[rollback / 2.0]),
            own_kib: samples(&[96.0, 100.0, 104.0]),
            pte_kib: samples(&[2048.0]),
            full_copy: samples(&[100.0, 120.0, 110.0]),
            full_fsync: samples(&[30.0]),
            full_copy_mib: mib as f64 + 12.0,
        }
    }

    /// A report with made-up figures.
    pub(in crate::bench::cr) fn report() -> CrReport {
        CrReport {
            command: "cargo xtask bench cr --quick".to_owned(),
            facts: Facts {
                date: "2026-11-22 13:00 UTC".to_owned(),
                kernel: "6.18.44".to_owned(),
                cpu: "AMD EPYC, 2 CPUs".to_owned(),
                memory: "24 GiB".to_owned(),
                root_fs: "ext4 on /dev/vda".to_owned(),
                commit: "f1c0585".to_owned(),
            },
            load: ("1.00 2.00 3.00".to_owned(), "1.50 2.00 3.00".to_owned()),
            ops: 3,
            gap_ms: 100,
            writes: 16,
            hot_mib: 0,
            configs: vec![
                config(64, false, 1.5, 1.0),
                config(256, false, 6.0, 8.0),
                config(256, true, 1.2, 1.9),
                config(1024, true, 2.0, 2.0),
                config(64, true, 0.9, 1.0),
            ],
            fallback_mib: 256,
            fallback: vec![
                Fallback {
                    delta_mib: 16,
                    dumped_mib: 16.5,
                    total: samples(&[40.0, 30.0, 35.0]),
                    memory: samples(&[20.0]),
                },
                Fallback {
                    delta_mib: 64,
                    dumped_mib: 64.5,
                    total: samples(&[8.0]),
                    memory: samples(&[5.0]),
                },
            ],
            store: "/var/lib/deltabox/store".to_owned(),
            realtime: false,
        }
    }

    #[test]
    fn sizes_and_amounts_read_well() {
        assert_eq!(size(64), "64 MiB");
        assert_eq!(size(1024), "1 GiB");
        assert_eq!(size(4096), "4 GiB");
        assert_eq!(size(1536), "1536 MiB");
        assert_eq!(kib(96.4), "96 KiB");
        assert_eq!(kib(2048.0), "2.0 MiB");
    }

    #[test]
    fn latency_rows_show_median_and_tails() {
        let r = report();
        let rows = r.latency_rows();
        assert_eq!(rows.len(), 4 * r.configs.len());
        assert_eq!(
            rows[0],
            [
                "64 MiB",
                "4 KiB",
                "checkpoint",
                "3",
                "1.50 ms",
                "4.50 ms",
                "4.50 ms"
            ]
        );
        assert_eq!(rows[2][4], "1.00 ms");
        assert_eq!(rows[2][6], "5.00 ms");
        let empty = Config::default();
        assert_eq!(
            latency_row(&empty, "rollback", &empty.rollback)[3..],
            ["0", "-", "-", "-"]
        );
    }

    #[test]
    fn cost_rows_give_the_ratio_to_the_full_copy() {
        let rows = report().cost_rows();
        // Checkpoint median 6 ms against a full copy median of 110 ms.
        assert_eq!(rows[1][6], "0.055");
        assert_eq!(
            rows[1][5],
            "110.0 ms of 268 MiB (median of 3), then fsync 30.0 ms"
        );
        assert_eq!(rows[1][3], "100 KiB");
        assert_eq!(rows[1][4], "2.0 MiB");
        assert_eq!(rows[2][2], "256.0 MiB, 128.0 MiB");
    }

    #[test]
    fn fallback_rows_scale_to_64_mib() {
        let rows = report().fallback_rows();
        assert_eq!(rows[0][3], "35.0 ms (40.0 ms)");
        assert_eq!(rows[0][5], "2.19 ms");
        assert_eq!(rows[0][6], "140.0 ms");
        assert_eq!(rows[1][6], "8.00 ms");
    }

    #[test]
    fn the_doc_section_replaces_only_its_own() {
        let section = report().section();
        assert!(section.contains("`cargo xtask bench cr --quick`"));
        assert!(section.contains("| 256 MiB | THP | checkpoint | 3 |"));
        let first = splice("# Benchmarks\n\nfs figures\n", &section);
        assert!(first.starts_with("# Benchmarks\n\nfs figures\n\n<!-- BEGIN cargo xtask bench cr"));
        let tail = format!("{first}\n## Later\n");
        let mut other = report();
        other.ops = 7;
        let second = splice(&tail, &other.section());
        assert!(
            second.contains("Each of the 7 rounds") && !second.contains("Each of the 3 rounds")
        );
        assert!(second.contains("fs figures") && second.ends_with("## Later\n"));
        assert_eq!(second.matches(BEGIN).count(), 1);
        assert!(splice("", &section).starts_with("# Benchmarks\n\n<!-- BEGIN"));
    }
}
