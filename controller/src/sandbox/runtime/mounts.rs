//! The mounts of a tree's init: its own `/dev` and `/sys` before its `pivot_root`, and
//! each sandbox's `proc`, `dev`, `dev/shm` and `sys` in its mounted view (see
//! `docs/sandbox-runtime.md`).

use std::{
    fs::{self, File},
    os::unix::fs::PermissionsExt as _,
    path::Path,
};

use nix::mount::{MntFlags, MsFlags, mount, umount2};

/// The device nodes every tree and sandbox `/dev` gets (bind mounts of the host's).
const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

/// A `map_err` that says what failed: `"{what}: {error}"`.
pub(super) fn err<E: std::fmt::Display>(what: impl std::fmt::Display) -> impl FnOnce(E) -> String {
    move |e| format!("{what}: {e}")
}

/// Bind-mounts `from` on `target`.
fn bind(from: &Path, target: &Path) -> Result<(), String> {
    mount(
        Some(from),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(err(format!(
        "bind {} on {}",
        from.display(),
        target.display()
    )))
}

/// proc, a /dev with device nodes and /dev/shm in the sandbox's mounted view.
pub(super) fn setup_sandbox_root(root: &Path) -> Result<(), String> {
    if !fs::metadata(root).is_ok_and(|m| m.is_dir()) {
        return Err(format!("{} is not a mounted sandbox root", root.display()));
    }
    for (dir, mode) in [("proc", 0o555), ("dev", 0o755), ("tmp", 0o1777)] {
        let path = root.join(dir);
        if !path.exists() {
            fs::create_dir(&path).map_err(err(format!("mkdir {}", path.display())))?;
            fs::set_permissions(&path, fs::Permissions::from_mode(mode))
                .map_err(err(format!("chmod {}", path.display())))?;
        }
    }
    let proc_dir = root.join("proc");
    mount(
        Some("proc"),
        &proc_dir,
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(err(format!("mount proc on {}", proc_dir.display())))?;
    make_dev(&root.join("dev"), Path::new("/dev"))?;
    make_sys(&root.join("sys"), Path::new(THP_SYSFS))?;
    let shm = root.join("dev/shm");
    fs::create_dir(&shm).map_err(err(format!("mkdir {}", shm.display())))?;
    mount(
        Some("shm"),
        &shm,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )
    .map_err(err(format!("mount tmpfs on {}", shm.display())))?;
    Ok(())
}

/// Undoes [`setup_sandbox_root`] (lazily: nothing there may still be busy).
pub(super) fn unmount_sandbox_root(root: &Path) {
    for sub in [
        "dev/shm",
        "dev",
        "proc",
        THP_SYSFS.trim_start_matches('/'),
        "sys",
    ] {
        let _ = umount2(&root.join(sub), MntFlags::MNT_DETACH);
    }
    // The root itself too: when the daemon that served it died, the host's unmount of
    // the dead view does not reach this copy, and a new view propagated here would be
    // tucked beneath it. (After a normal removal the daemon's unmount finds it gone.)
    let _ = umount2(root, MntFlags::MNT_DETACH);
}

/// Where the kernel shows its transparent huge page settings. glibc's malloc reads
/// `enabled` there before it asks for huge pages (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`,
/// which every sandbox command gets): without it, a sandbox's memory stays in 4 KiB pages.
pub(super) const THP_SYSFS: &str = "/sys/kernel/mm/transparent_hugepage";

/// A read-only tmpfs at `sys` holding only `from` (the kernel's THP settings, see
/// [`THP_SYSFS`]), bound read-only at the same path: a sandbox reads the settings but
/// sees nothing else of the host's sysfs and changes nothing (it has no
/// `CAP_SYS_ADMIN` to remount). Nothing when the kernel has no THP (`from` missing).
pub(super) fn make_sys(sys: &Path, from: &Path) -> Result<(), String> {
    if !from.is_dir() {
        return Ok(());
    }
    if !sys.exists() {
        fs::create_dir(sys).map_err(err(format!("mkdir {}", sys.display())))?;
        fs::set_permissions(sys, fs::Permissions::from_mode(0o555))
            .map_err(err(format!("chmod {}", sys.display())))?;
    }
    let ro = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(
        Some("sysfs-thp"),
        sys,
        Some("tmpfs"),
        ro,
        Some("mode=555,size=64k"),
    )
    .map_err(err(format!("mount tmpfs on {}", sys.display())))?;
    let target = sys.join(THP_SYSFS.trim_start_matches("/sys/"));
    fs::create_dir_all(&target).map_err(err(format!("mkdir {}", target.display())))?;
    bind(from, &target)?;
    // A bind mount's read-only flag is its own (MS_BIND with MS_REMOUNT); the tmpfs's is
    // the superblock's.
    let remount = MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | ro;
    for (at, flags) in [(&*target, remount | MsFlags::MS_BIND), (sys, remount)] {
        mount(None::<&str>, at, None::<&str>, flags, None::<&str>)
            .map_err(err(format!("remount {} read-only", at.display())))?;
    }
    Ok(())
}

/// A tmpfs at `dev` with the device nodes of `from` bound onto empty files, and the
/// usual symlinks.
pub(super) fn make_dev(dev: &Path, from: &Path) -> Result<(), String> {
    mount(
        Some("tmpfs"),
        dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=755,size=65536k"),
    )
    .map_err(err(format!("mount tmpfs on {}", dev.display())))?;
    for name in DEVICES {
        let target = dev.join(name);
        File::create(&target).map_err(err(format!("create {}", target.display())))?;
        bind(&from.join(name), &target)?;
    }
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        let link = dev.join(name);
        std::os::unix::fs::symlink(target, &link)
            .map_err(err(format!("symlink {}", link.display())))?;
    }
    Ok(())
}
