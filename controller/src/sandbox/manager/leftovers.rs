//! Cleaning up a tree an earlier daemon left behind (it was SIGKILLed, or the machine
//! went on without it): its processes, mounts and cgroups. Until a restarted daemon can
//! re-adopt a live tree, this is what makes "nothing half-made remains" true.

use std::fs;
use std::io;
use std::path::Path;

use nix::mount::{MntFlags, umount2};

use crate::cgroup::CgroupFs;
use crate::sandbox::runtime::remove_leftover_tree;

/// Kills every process under the tree's cgroup `cgroup` and removes its cgroups (v2,
/// and v1 where this host keeps the limit controllers), lazily unmounts everything
/// under `run_dir` and removes it. Missing pieces are fine (the earlier daemon may
/// have got half way).
pub fn clean(run_dir: &Path, cgroup: &Path) -> io::Result<()> {
    let cg2 = CgroupFs::from_mountinfo().map_err(io::Error::other)?;
    remove_leftover_tree(cg2.root(), cgroup).map_err(io::Error::other)?;
    if run_dir.exists() {
        for mountpoint in mounts_under(run_dir)?.iter().rev() {
            let _ = umount2(mountpoint.as_str(), MntFlags::MNT_DETACH);
        }
        // Never a recursive delete over something still mounted (a view's data).
        let left = mounts_under(run_dir)?;
        if !left.is_empty() {
            return Err(io::Error::other(format!(
                "{} still has mounts ({}): not removed",
                run_dir.display(),
                left.join(", ")
            )));
        }
        fs::remove_dir_all(run_dir)?;
    }
    Ok(())
}

/// Mount points at or under `dir`, in mount order (unmount in reverse).
fn mounts_under(dir: &Path) -> io::Result<Vec<String>> {
    let prefix = dir.to_string_lossy().into_owned();
    let info = fs::read_to_string("/proc/self/mountinfo")?;
    Ok(info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape)
        .filter(|m| m == &prefix || m.starts_with(&format!("{prefix}/")))
        .collect())
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let bytes = field.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 4 <= bytes.len()
            && let Ok(v) = u8::from_str_radix(&field[i + 1..i + 4], 8)
        {
            out.push(v as char);
            i += 4;
            continue;
        }
        out.push(bytes[i] as char);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape(r"/run/a\040b"), "/run/a b");
        assert_eq!(unescape("/plain"), "/plain");
    }
}
