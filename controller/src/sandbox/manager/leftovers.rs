//! Cleaning up a tree an earlier daemon left behind that cannot be re-adopted (its init
//! is gone): its processes, mounts and cgroups, so that nothing half-made remains.
//! Test guards use it too, after a daemon they killed.

use std::fs;
use std::io;
use std::path::Path;

use nix::mount::{MntFlags, umount2};

use crate::cgroup::CgroupFs;
use crate::sandbox::rootfs;
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
            let _ = umount2(mountpoint, MntFlags::MNT_DETACH);
        }
        // Never a recursive delete over something still mounted (a view's data).
        let left = mounts_under(run_dir)?;
        if !left.is_empty() {
            return Err(io::Error::other(format!(
                "{} still has mounts ({}): not removed",
                run_dir.display(),
                left.iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        fs::remove_dir_all(run_dir)?;
    }
    Ok(())
}

/// Mount points at or under `dir`, in mount order (the mountinfo parsing of
/// [`rootfs::mount_points`]).
fn mounts_under(dir: &Path) -> io::Result<Vec<std::path::PathBuf>> {
    rootfs::mount_points(dir).map_err(io::Error::other)
}
