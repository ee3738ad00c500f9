//! A tree's cgroups: the cgroup v2 layout (ids for eBPF) and the limits; freezing and
//! killing one is [`super::freezer`]'s.
//!
//! Layout (v2): `<tree>/init`, `<tree>/templates`,
//! `<tree>/sb-<sandbox>/{anchor,work,standby}`.
//! Limits go in `sb-<sandbox>` through cgroup v2 files when cgroup2 has the controller;
//! on hosts where the memory, cpu or pids controller is bound to a cgroup v1 hierarchy
//! (this machine: cgroup2 offers only hugetlb), the limit lives in that hierarchy at
//! `<v1 mount>/<daemon's own v1 cgroup>/<tree rel. path>/sb-<sandbox>`, nested under
//! the daemon's cgroup so any limit placed on the daemon still covers its sandboxes.

use std::{
    fs, io,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use super::Limits;
use super::freezer::{SETTLE_TIMEOUT, kill};

/// The controllers the limits use.
const LIMIT_CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];
/// The cpu.max / cfs period, in microseconds.
const CPU_PERIOD_US: u64 = 100_000;

/// Why a cgroup operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CgroupSetupError {
    /// A file or directory operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// The kernel did not confirm a freeze / an empty cgroup in time.
    #[error("{} did not reach `{what}` within {timeout:?}", path.display())]
    Timeout {
        /// The cgroup.
        path: PathBuf,
        /// The awaited state.
        what: &'static str,
        /// How long we waited.
        timeout: Duration,
    },
    /// No hierarchy offers a controller a limit needs.
    #[error("no cgroup hierarchy offers the {0} controller (neither cgroup2 nor v1)")]
    NoController(&'static str),
}

pub(super) fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CgroupSetupError {
    let path = path.to_owned();
    move |source| CgroupSetupError::Io { op, path, source }
}

/// Where each limit controller lives for a tree.
#[derive(Debug, Clone)]
pub(crate) struct TreeCgroups {
    /// The tree's cgroup v2 directory.
    pub tree: PathBuf,
    /// Controllers available in cgroup2 (enabled for the tree's subtree).
    v2_limits: Vec<&'static str>,
    /// (controller, the tree's directory in its v1 hierarchy).
    v1: Vec<(&'static str, PathBuf)>,
}

impl TreeCgroups {
    /// Creates the tree's cgroups: `tree` (parents as needed, limit controllers enabled
    /// from `cg2_root`'s child down) with `init/` and `templates/`, and the tree's
    /// directories in v1 limit hierarchies.
    pub fn create(cg2_root: &Path, tree: &Path) -> Result<Self, CgroupSetupError> {
        let available = fs::read_to_string(cg2_root.join("cgroup.controllers"))
            .map_err(io_err("read", &cg2_root.join("cgroup.controllers")))?;
        let v2_limits: Vec<&'static str> = LIMIT_CONTROLLERS
            .into_iter()
            .filter(|c| available.split_whitespace().any(|a| a == *c))
            .collect();
        let rel = tree.strip_prefix(cg2_root).unwrap_or(tree);
        // Each ancestor from the root down enables the controllers for its children.
        let mut dir = cg2_root.to_owned();
        let enable: String = v2_limits.iter().map(|c| format!("+{c} ")).collect();
        for part in rel.components() {
            if !enable.is_empty() {
                let file = dir.join("cgroup.subtree_control");
                fs::write(&file, enable.trim()).map_err(io_err("write", &file))?;
            }
            dir.push(part);
            match fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_err("mkdir", &dir)(e)),
            }
        }
        if !enable.is_empty() {
            let file = tree.join("cgroup.subtree_control");
            fs::write(&file, enable.trim()).map_err(io_err("write", &file))?;
        }
        for child in ["init", "templates"] {
            mkdir(&tree.join(child))?;
        }
        let mut v1 = Vec::new();
        for controller in LIMIT_CONTROLLERS {
            if v2_limits.contains(&controller) {
                continue;
            }
            if let Some(base) = v1_own_dir(controller) {
                let dir = base.join(rel);
                fs::create_dir_all(&dir).map_err(io_err("mkdir", &dir))?;
                v1.push((controller, dir));
            }
        }
        Ok(Self {
            tree: tree.to_owned(),
            v2_limits,
            v1,
        })
    }

    /// `sb-<sandbox>` in cgroup v2.
    pub fn sandbox(&self, sandbox: &str) -> PathBuf {
        self.tree.join(format!("sb-{sandbox}"))
    }

    /// The sandbox's directories in the v1 limit hierarchies.
    pub fn sandbox_v1(&self, sandbox: &str) -> Vec<PathBuf> {
        self.v1
            .iter()
            .map(|(_, d)| d.join(format!("sb-{sandbox}")))
            .collect()
    }

    /// How many times the OOM killer killed a process of the sandbox: `oom_kill` of
    /// `memory.events` (v2) or `memory.oom_control` (the v1 mirror), whichever exists.
    pub fn oom_kills(&self, sandbox: &str) -> u64 {
        let v1 = self
            .v1
            .iter()
            .find(|(controller, _)| *controller == "memory")
            .map(|(_, dir)| dir.join(format!("sb-{sandbox}")).join("memory.oom_control"));
        [Some(self.sandbox(sandbox).join("memory.events")), v1]
            .into_iter()
            .flatten()
            .filter_map(|path| fs::read_to_string(path).ok())
            .filter_map(|text| {
                text.lines().find_map(|line| {
                    let (key, value) = line.split_once(' ')?;
                    (key == "oom_kill").then(|| value.trim().parse::<u64>().ok())?
                })
            })
            .sum()
    }

    /// Creates `sb-<sandbox>/{anchor,work,standby}` and writes the limits.
    pub fn create_sandbox(&self, sandbox: &str, limits: &Limits) -> Result<(), CgroupSetupError> {
        let sb = self.sandbox(sandbox);
        mkdir(&sb)?;
        mkdir(&sb.join("anchor"))?;
        mkdir(&sb.join("work"))?;
        mkdir(&sb.join("standby"))?;
        for (controller, dir) in &self.v1 {
            let dir = dir.join(format!("sb-{sandbox}"));
            mkdir(&dir)?;
            write_v1_limits(controller, &dir, limits)?;
        }
        for controller in &self.v2_limits {
            write_v2_limits(controller, &sb, limits)?;
        }
        for (needed, controller) in [
            (limits.memory_bytes.is_some(), "memory"),
            (limits.cpus.is_some(), "cpu"),
            (limits.pids.is_some(), "pids"),
        ] {
            let present = self.v2_limits.contains(&controller)
                || self.v1.iter().any(|(c, _)| *c == controller);
            if needed && !present {
                return Err(CgroupSetupError::NoController(controller));
            }
        }
        Ok(())
    }

    /// Kills every process of `sb-<sandbox>` and removes its cgroups (v2 and v1).
    pub fn remove_sandbox(&self, sandbox: &str) -> Result<(), CgroupSetupError> {
        let sb = self.sandbox(sandbox);
        if sb.exists() {
            kill(&sb)?;
            for child in ["work", "standby", "anchor"] {
                rmdir(&sb.join(child))?;
            }
            rmdir(&sb)?;
        }
        for dir in self.sandbox_v1(sandbox) {
            migrate_to_parent(&dir)?;
            rmdir(&dir)?;
        }
        Ok(())
    }

    /// Kills everything of the tree and removes all its cgroups, bottom-up.
    pub fn remove_all(&self) -> Result<(), CgroupSetupError> {
        if self.tree.exists() {
            kill(&self.tree)?;
            remove_tree(&self.tree)?;
        }
        for (controller, dir) in &self.v1 {
            if dir.exists() {
                remove_tree(dir)?;
            }
            remove_empty_parents(controller, dir);
        }
        Ok(())
    }
}

/// `mkdir`, accepting an existing directory.
fn mkdir(dir: &Path) -> Result<(), CgroupSetupError> {
    match fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io_err("mkdir", dir)(e)),
    }
}

/// `rmdir` of a cgroup, retrying while the kernel still counts exiting tasks.
pub(super) fn rmdir(dir: &Path) -> Result<(), CgroupSetupError> {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() > deadline => return Err(io_err("rmdir", dir)(e)),
            Err(_) => thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// Moves what is left in a v1 limit cgroup (templates: they live in the tree's v2
/// `templates/` but keep the v1 cgroups of the process they were forked from, and they
/// outlive the sandbox) to its parent, the tree's v1 cgroup, so it can be removed.
fn migrate_to_parent(dir: &Path) -> Result<(), CgroupSetupError> {
    let procs = dir.join("cgroup.procs");
    let list = match fs::read_to_string(&procs) {
        Ok(l) => l,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("read", &procs)(e)),
    };
    let Some(parent) = dir.parent() else {
        return Ok(());
    };
    let target = parent.join("cgroup.procs");
    for pid in list.lines() {
        match fs::write(&target, pid) {
            // ESRCH: it exited meanwhile.
            Err(e) if e.raw_os_error() != Some(libc::ESRCH) => {
                return Err(io_err("write", &target)(e));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Removes what a tree left when its daemon died: kills every process under the v2
/// directory `tree` (`cgroup.kill`: it is never forked into again), removes it and the
/// tree's directories in the v1 limit hierarchies, children first. Missing is fine.
pub fn remove_leftover_tree(cg2_root: &Path, tree: &Path) -> Result<(), CgroupSetupError> {
    if tree.exists() {
        kill(tree)?;
        remove_tree(tree)?;
    }
    let rel = tree.strip_prefix(cg2_root).unwrap_or(tree);
    for controller in LIMIT_CONTROLLERS {
        if let Some(base) = v1_own_dir(controller) {
            remove_tree(&base.join(rel))?;
            remove_empty_parents(controller, &base.join(rel));
        }
    }
    Ok(())
}

/// Removes the directories the v1 mirror of a tree needed above it (the mirror of the
/// daemon's `--sandbox-cgroup`), up to the daemon's own v1 cgroup, while they are empty
/// (another tree's directory keeps them).
fn remove_empty_parents(controller: &str, dir: &Path) {
    let Some(base) = v1_own_dir(controller) else {
        return;
    };
    let mut parent = dir.parent();
    while let Some(p) = parent {
        if p == base || !p.starts_with(&base) || fs::remove_dir(p).is_err() {
            break;
        }
        parent = p.parent();
    }
}

/// Removes a cgroup directory and its child cgroups, children first.
fn remove_tree(dir: &Path) -> Result<(), CgroupSetupError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("read dir", dir)(e)),
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_tree(&entry.path())?;
        }
    }
    rmdir(dir)
}

pub(super) fn write(path: &Path, value: &str) -> Result<(), CgroupSetupError> {
    fs::write(path, value).map_err(io_err("write", path))
}

fn write_v2_limits(controller: &str, sb: &Path, l: &Limits) -> Result<(), CgroupSetupError> {
    match controller {
        "memory" => {
            if let Some(bytes) = l.memory_bytes {
                write(&sb.join("memory.max"), &bytes.to_string())?;
                // No swapping around the limit: the sandbox is OOM-killed at it.
                let swap = sb.join("memory.swap.max");
                if swap.exists() {
                    write(&swap, "0")?;
                }
            }
        }
        "cpu" => {
            if let Some(cpus) = l.cpus {
                let quota = (cpus * CPU_PERIOD_US as f64).round().max(1000.0) as u64;
                write(&sb.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
            }
        }
        "pids" => {
            if let Some(pids) = l.pids {
                write(&sb.join("pids.max"), &pids.to_string())?;
            }
        }
        _ => {}
    }
    Ok(())
}

fn write_v1_limits(controller: &str, dir: &Path, l: &Limits) -> Result<(), CgroupSetupError> {
    match controller {
        "memory" => {
            if let Some(bytes) = l.memory_bytes {
                write(&dir.join("memory.limit_in_bytes"), &bytes.to_string())?;
                // memory+swap = memory: no swapping around the limit.
                let memsw = dir.join("memory.memsw.limit_in_bytes");
                if memsw.exists() {
                    write(&memsw, &bytes.to_string())?;
                }
            }
        }
        "cpu" => {
            if let Some(cpus) = l.cpus {
                let quota = (cpus * CPU_PERIOD_US as f64).round().max(1000.0) as u64;
                write(&dir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                write(&dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
            }
        }
        "pids" => {
            if let Some(pids) = l.pids {
                write(&dir.join("pids.max"), &pids.to_string())?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// The daemon's own cgroup in the v1 hierarchy of `controller`, if one is mounted.
fn v1_own_dir(controller: &str) -> Option<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let own = fs::read_to_string("/proc/self/cgroup").ok()?;
    v1_dir_from(&info, &own, controller)
}

/// [`v1_own_dir`] from the texts of `/proc/self/mountinfo` and `/proc/self/cgroup`.
fn v1_dir_from(mountinfo: &str, self_cgroup: &str, controller: &str) -> Option<PathBuf> {
    let mount = mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mut r = right.split_whitespace();
        if r.next()? != "cgroup" {
            return None;
        }
        let opts = r.nth(1)?;
        let dir = left.split_whitespace().nth(4)?;
        opts.split(',')
            .any(|o| o == controller)
            .then(|| PathBuf::from(dir))
    })?;
    let rel = self_cgroup.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let _ = parts.next()?;
        let names = parts.next()?;
        let path = parts.next()?;
        names
            .split(',')
            .any(|n| n == controller)
            .then(|| path.trim_start_matches('/').to_owned())
    })?;
    Some(mount.join(rel))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const SELF: &str = "9:name=systemd:/\n4:memory:/process_api/abc\n1:cpu:/\n0::/\n";

    #[test]
    fn v1_dir_is_the_daemons_own_cgroup_in_the_controllers_hierarchy() {
        assert_eq!(
            v1_dir_from(MOUNTINFO, SELF, "memory"),
            Some(PathBuf::from("/sys/fs/cgroup/memory/process_api/abc"))
        );
        assert_eq!(
            v1_dir_from(MOUNTINFO, SELF, "cpu"),
            Some(PathBuf::from("/sys/fs/cgroup/cpu/"))
        );
        // Not mounted as v1 (cgroup2 only), or not in /proc/self/cgroup.
        assert_eq!(v1_dir_from(MOUNTINFO, SELF, "pids"), None);
        assert_eq!(v1_dir_from(MOUNTINFO, "0::/\n", "memory"), None);
    }
}
