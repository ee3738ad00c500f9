//! Facts about this machine and this run, for the reports in docs/ (conformance,
//! benchmarks): when, on which kernel, CPU, memory and disk.

use std::fs;
use std::process::Command;

use crate::util::{output, workspace_root};

/// What the reports say about where they were measured.
#[derive(Clone, Debug)]
pub struct Facts {
    /// `2026-11-22 14:03 UTC`.
    pub date: String,
    /// `uname -r`.
    pub kernel: String,
    /// `AMD EPYC, 2 CPUs`.
    pub cpu: String,
    /// `24 GiB`.
    pub memory: String,
    /// The filesystem and device of `/`: `ext4 on /dev/vda`.
    pub root_fs: String,
    /// The workspace's commit (what DeltaFS was built from): `f1c0585`, with a note when
    /// `deltafs-kmod-shim/` has uncommitted changes.
    pub commit: String,
}

impl Facts {
    pub fn collect() -> Self {
        let run = |program: &str, args: &[&str]| {
            output(Command::new(program).args(args))
                .map(|text| text.trim().to_owned())
                .unwrap_or_else(|_| "unknown".to_owned())
        };
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let cpus = std::thread::available_parallelism().map_or(0, usize::from);
        Self {
            date: run("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            kernel: run("uname", &["-r"]),
            cpu: format!(
                "{}, {cpus} CPUs",
                cpu_model(&cpuinfo).unwrap_or("unknown CPU")
            ),
            memory: mem_total_gib(&meminfo)
                .map_or_else(|| "unknown".to_owned(), |gib| format!("{gib} GiB")),
            root_fs: run("findmnt", &["-n", "-o", "FSTYPE,SOURCE", "/"])
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" on "),
            commit: commit(),
        }
    }

    /// One line: `Linux 6.18.44, AMD EPYC, 2 CPUs, 24 GiB RAM, / is ext4 on /dev/vda;
    /// commit f1c0585`.
    pub fn line(&self) -> String {
        format!(
            "Linux {}, {}, {} RAM, / is {}; commit {}",
            self.kernel, self.cpu, self.memory, self.root_fs, self.commit
        )
    }
}

/// `git rev-parse --short HEAD` of the workspace, noting uncommitted changes to DeltaFS.
fn commit() -> String {
    let git = |args: &[&str]| {
        output(
            Command::new("git")
                .arg("-C")
                .arg(workspace_root())
                .args(args),
        )
        .ok()
    };
    let Some(head) = git(&["rev-parse", "--short", "HEAD"]) else {
        return "unknown".to_owned();
    };
    let dirty = git(&["status", "--porcelain", "--", "deltafs-kmod-shim"])
        .is_some_and(|status| !status.trim().is_empty());
    if dirty {
        format!(
            "{} (with uncommitted changes in deltafs-kmod-shim/)",
            head.trim()
        )
    } else {
        head.trim().to_owned()
    }
}

/// The first `model name` of `/proc/cpuinfo` text.
fn cpu_model(cpuinfo: &str) -> Option<&str> {
    cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name")?.split_once(':'))
        .map(|(_, model)| model.trim())
}

/// `MemTotal` of `/proc/meminfo` text, rounded to GiB.
fn mem_total_gib(meminfo: &str) -> Option<u64> {
    let kib: u64 = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some((kib + (1 << 19)) >> 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cpu_and_memory() {
        assert_eq!(
            cpu_model("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t: fpu\n"),
            Some("AMD EPYC")
        );
        assert_eq!(cpu_model("processor\t: 0\n"), None);
        assert_eq!(
            mem_total_gib("MemTotal:       24684092 kB\nMemFree: 1 kB\n"),
            Some(24)
        );
        assert_eq!(mem_total_gib("MemFree: 1 kB\n"), None);
    }
}
