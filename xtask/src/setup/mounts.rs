//! tracefs and bpffs: not mounted at boot on the target machine, needed to read tracepoint
//! formats and to pin eBPF maps and links.

use std::fs;
use std::path::{Path, PathBuf};

use nix::mount::{MsFlags, mount};

use super::{Check, Failure, Outcome};
use crate::cgroup::unescape;

/// Where the kernel lists this process's mounts.
const MOUNTS: &str = "/proc/self/mounts";

/// Where tracefs is expected.
pub const TRACEFS: &str = "/sys/kernel/tracing";
/// Where bpffs is expected.
pub const BPFFS: &str = "/sys/fs/bpf";

pub fn ensure_tracefs() -> Check {
    ensure_mounted(
        "tracefs",
        Path::new(TRACEFS),
        "the kernel needs CONFIG_TRACING (ftrace); check `dmesg` for the mount error",
    )
}

pub fn ensure_bpffs() -> Check {
    ensure_mounted(
        "bpf",
        Path::new(BPFFS),
        "the kernel needs CONFIG_BPF_SYSCALL; check `dmesg` for the mount error",
    )
}

/// Mounts a pseudo filesystem of type `fstype` at `target` unless one already is.
fn ensure_mounted(fstype: &str, target: &Path, fix: &str) -> Check {
    let mounts = fs::read_to_string(MOUNTS)
        .map_err(|e| Failure::new(format!("cannot read {MOUNTS}: {e}"), "mount /proc"))?;
    if is_mounted(&mounts, fstype, target) {
        return Ok(Outcome::Ok(format!("{fstype} at {}", target.display())));
    }
    if !target.is_dir() {
        return Err(Failure::new(
            format!(
                "{} does not exist, so {fstype} cannot be mounted there",
                target.display()
            ),
            fix,
        ));
    }
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC | MsFlags::MS_RELATIME;
    mount(Some(fstype), target, Some(fstype), flags, None::<&str>).map_err(|errno| {
        Failure::new(
            format!("cannot mount {fstype} at {}: {errno}", target.display()),
            fix,
        )
    })?;
    Ok(Outcome::Installed(format!(
        "mounted {fstype} at {}",
        target.display()
    )))
}

/// Whether `/proc/self/mounts` text lists a mount of type `fstype` at `target`.
fn is_mounted(mounts: &str, fstype: &str, target: &Path) -> bool {
    parse_mounts(mounts)
        .iter()
        .any(|(point, kind)| kind == fstype && point == target)
}

/// `(mount point, type)` of each line of `/proc/self/mounts` text.
fn parse_mounts(mounts: &str) -> Vec<(PathBuf, String)> {
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let _source = fields.next()?;
            let point = fields.next()?;
            let kind = fields.next()?;
            Some((PathBuf::from(unescape(point)), kind.to_owned()))
        })
        .collect()
}

/// The tracefs mount point to read events from: [`TRACEFS`] if mounted there, else any
/// tracefs mount (e.g. `/sys/kernel/debug/tracing`).
pub fn tracefs_dir() -> Option<PathBuf> {
    let mounts = fs::read_to_string(MOUNTS).ok()?;
    let tracefs: Vec<PathBuf> = parse_mounts(&mounts)
        .into_iter()
        .filter(|(_, kind)| kind == "tracefs")
        .map(|(point, _)| point)
        .collect();
    tracefs
        .iter()
        .find(|point| *point == Path::new(TRACEFS))
        .or(tracefs.first())
        .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTS_TEXT: &str = "\
sysfs /sys sysfs rw,relatime 0 0
/dev/vda / ext4 rw,relatime 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
tracefs /sys/kernel/tracing tracefs rw,relatime 0 0
/dev/loop0 /mnt/with\\040space xfs rw 0 0
";

    #[test]
    fn finds_mounts_by_type_and_point() {
        assert!(is_mounted(MOUNTS_TEXT, "tracefs", Path::new(TRACEFS)));
        assert!(!is_mounted(MOUNTS_TEXT, "bpf", Path::new(BPFFS)));
        assert!(!is_mounted(MOUNTS_TEXT, "sysfs", Path::new(TRACEFS)));
        assert!(is_mounted(MOUNTS_TEXT, "xfs", Path::new("/mnt/with space")));
    }

    #[test]
    fn parses_every_line() {
        let mounts = parse_mounts(MOUNTS_TEXT);
        assert_eq!(mounts.len(), 5);
        assert_eq!(
            mounts[2],
            (
                PathBuf::from("/sys/fs/cgroup/unified"),
                "cgroup2".to_owned()
            )
        );
    }
}
