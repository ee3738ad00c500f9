//! The filesystems the conformance harness and the benchmarks compare, each prepared as a
//! scratch directory that is torn down by guards, also on an error or Ctrl-C:
//!
//! - **ext4**: a directory under `/var/tmp/dbx` (checked to be on ext4).
//! - **xfs**: a directory on the xfs store (what overlayfs's upper and DeltaFS's layers
//!   are on: the backing filesystem alone, for reference).
//! - **overlayfs**: a kernel overlay mount whose (empty) lower directory is on ext4 and
//!   whose upper and work directories are on the xfs store set-up mounts, as DeltaFS's
//!   layers are.
//! - **DeltaFS**: `deltafs mount --store <dir on the xfs store> --base <empty dir on ext4>
//!   <mount point>`, driven through its stdin (see [`deltafs`]).
//!
//! Teardown order (the fields' order in [`Scratch`]): stop the DeltaFS daemon (it
//! unmounts), unmount whatever is still mounted (lazily if busy), remove the mount point
//! (`rmdir`, never recursively: a mount that would not go away is left, not emptied),
//! remove the backing directories.

pub mod deltafs;

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sys::statfs::{EXT4_SUPER_MAGIC, statfs};

use self::deltafs::DeltaFs;
use crate::cgroup::MountInfoEntry;
use crate::setup::STORE_DIR;
use crate::util::{TempDir, target_dir};

/// Which filesystem a scratch directory is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Ext4,
    Xfs,
    Overlayfs,
    DeltaFs,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Ext4 => "ext4",
            Kind::Xfs => "xfs",
            Kind::Overlayfs => "overlayfs",
            Kind::DeltaFs => "deltafs",
        }
    }
}

/// A scratch directory on one filesystem. Dropping it tears everything down; [`finish`]
/// does the same and reports what failed.
///
/// [`finish`]: Scratch::finish
pub struct Scratch {
    /// Where the workload runs: the mount point, or the ext4 directory.
    dir: PathBuf,
    // Dropped in this order.
    daemon: Option<DeltaFs>,
    mount: Option<MountGuard>,
    mountpoint: Option<EmptyDir>,
    backing: Vec<TempDir>,
}

impl Scratch {
    /// A scratch directory of `kind`; `purpose` names its directories
    /// (`conf-deltafs-XXXXXX`; keep it short, see [`EXT4_ROOT`]). DeltaFS needs its
    /// binary.
    pub fn new(kind: Kind, purpose: &str, deltafs: Option<&Path>) -> Result<Self> {
        let prefix = format!("{purpose}-{}-", kind.name());
        let ext4_root = ext4_root()?;
        match kind {
            Kind::Ext4 | Kind::Xfs => {
                let root = if kind == Kind::Ext4 {
                    ext4_root
                } else {
                    store_root()?
                };
                let dir = open_dir(&root, &prefix)?;
                Ok(Self {
                    dir: dir.path().to_owned(),
                    daemon: None,
                    mount: None,
                    mountpoint: None,
                    backing: vec![dir],
                })
            }
            Kind::Overlayfs => {
                let lower = open_dir(&ext4_root, &format!("{prefix}lower-"))?;
                let store = open_dir(&store_root()?, &prefix)?;
                let (upper, work) = (store.path().join("upper"), store.path().join("work"));
                for dir in [&upper, &work] {
                    fs::create_dir(dir)
                        .with_context(|| format!("cannot create {}", dir.display()))?;
                }
                let mountpoint = EmptyDir::new(&ext4_root, &format!("{prefix}m-"))?;
                let options = format!(
                    "lowerdir={},upperdir={},workdir={}",
                    lower.path().display(),
                    upper.display(),
                    work.display()
                );
                mount(
                    Some("overlay"),
                    mountpoint.path(),
                    Some("overlay"),
                    MsFlags::empty(),
                    Some(options.as_str()),
                )
                .with_context(|| {
                    format!(
                        "cannot mount overlayfs ({options}) at {}",
                        mountpoint.path().display()
                    )
                })?;
                Ok(Self {
                    dir: mountpoint.path().to_owned(),
                    daemon: None,
                    mount: Some(MountGuard(mountpoint.path().to_owned())),
                    mountpoint: Some(mountpoint),
                    backing: vec![store, lower],
                })
            }
            Kind::DeltaFs => {
                let binary = deltafs.context("no deltafs binary to mount DeltaFS with")?;
                let base = open_dir(&ext4_root, &format!("{prefix}base-"))?;
                let store = open_dir(&store_root()?, &prefix)?;
                let mountpoint = EmptyDir::new(&ext4_root, &format!("{prefix}m-"))?;
                let log = log_path(&prefix)?;
                // The guard is in place before the mount, in case the daemon mounts and
                // then fails.
                let mount_guard = MountGuard(mountpoint.path().to_owned());
                let daemon =
                    DeltaFs::mount(binary, store.path(), base.path(), mountpoint.path(), &log)?;
                Ok(Self {
                    dir: mountpoint.path().to_owned(),
                    daemon: Some(daemon),
                    mount: Some(mount_guard),
                    mountpoint: Some(mountpoint),
                    backing: vec![store, base],
                })
            }
        }
    }

    /// Where the workload runs.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The DeltaFS daemon, for freezes and switches.
    pub fn deltafs(&mut self) -> Option<&mut DeltaFs> {
        self.daemon.as_mut()
    }

    /// Tears down in order and fails on the first step that did not work (the rest is
    /// still torn down by the guards).
    pub fn finish(mut self) -> Result<()> {
        if let Some(daemon) = self.daemon.take() {
            daemon.quit()?;
        }
        if let Some(guard) = self.mount.take() {
            guard.unmount()?;
        }
        if let Some(mountpoint) = self.mountpoint.take() {
            mountpoint.remove()?;
        }
        for dir in self.backing.drain(..) {
            dir.remove()?;
        }
        Ok(())
    }
}

/// A temporary directory with mode 0755 instead of mkdtemp's 0700: pjdfstest switches to
/// unprivileged users that must be able to reach its files.
fn open_dir(base: &Path, prefix: &str) -> Result<TempDir> {
    let dir = TempDir::new(base, prefix)?;
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))
        .with_context(|| format!("cannot chmod {}", dir.path().display()))?;
    Ok(dir)
}

/// Where ext4 scratch directories and mount points go. A short path on the root
/// filesystem: pjdfstest binds Unix sockets three directories below the directory it is
/// given, and a socket path has at most 108 bytes (under cargo's target directory some
/// socket cases failed with `ENAMETOOLONG`).
const EXT4_ROOT: &str = "/var/tmp/dbx";

/// [`EXT4_ROOT`], which must be on ext4 (the baseline everything is compared to).
fn ext4_root() -> Result<PathBuf> {
    let root = PathBuf::from(EXT4_ROOT);
    fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    let stat = statfs(&root).with_context(|| format!("cannot statfs {}", root.display()))?;
    if stat.filesystem_type() != EXT4_SUPER_MAGIC {
        bail!(
            "{} is not on ext4 (filesystem magic {:#x}); the ext4 baseline needs it there",
            root.display(),
            stat.filesystem_type().0
        );
    }
    Ok(root)
}

/// `<store>/xtask`, on the xfs store set-up mounts.
fn store_root() -> Result<PathBuf> {
    let store = Path::new(STORE_DIR);
    if !is_mounted(store)? {
        bail!(
            "the xfs store is not mounted at {}: run `cargo xtask setup`",
            store.display()
        );
    }
    let root = store.join("xtask");
    fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    Ok(root)
}

/// `<target>/fs-logs/<prefix>daemon.log`: kept after the run, for a failure's post mortem.
fn log_path(prefix: &str) -> Result<PathBuf> {
    let dir = target_dir()?.join("fs-logs");
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir.join(format!("{prefix}daemon.log")))
}

/// Whether something is mounted at `path` (per `/proc/self/mountinfo`).
pub fn is_mounted(path: &Path) -> Result<bool> {
    let mountinfo =
        fs::read_to_string("/proc/self/mountinfo").context("cannot read /proc/self/mountinfo")?;
    Ok(mountinfo
        .lines()
        .filter_map(MountInfoEntry::parse)
        .any(|entry| Path::new(&entry.mount_point) == path))
}

/// Unmounts a mount point when dropped, if anything is still mounted there: a plain
/// unmount, or a lazy one (`MNT_DETACH`) when it is busy.
struct MountGuard(PathBuf);

impl MountGuard {
    fn unmount(self) -> Result<()> {
        let path = self.0.clone();
        std::mem::forget(self);
        unmount_if_mounted(&path)
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if let Err(err) = unmount_if_mounted(&self.0) {
            eprintln!("warning: {err:#}");
        }
    }
}

fn unmount_if_mounted(path: &Path) -> Result<()> {
    while is_mounted(path)? {
        if umount2(path, MntFlags::empty()).is_err() {
            umount2(path, MntFlags::MNT_DETACH)
                .with_context(|| format!("cannot unmount {}", path.display()))?;
        }
    }
    Ok(())
}

/// An empty directory (a mount point), removed with `rmdir` when dropped.
struct EmptyDir(Option<PathBuf>);

impl EmptyDir {
    fn new(base: &Path, prefix: &str) -> Result<Self> {
        let dir = open_dir(base, prefix)?;
        let path = dir.path().to_owned();
        // From here on the directory is only ever removed with rmdir.
        std::mem::forget(dir);
        Ok(Self(Some(path)))
    }

    fn path(&self) -> &Path {
        self.0.as_deref().expect("taken only by remove(self)")
    }

    fn remove(mut self) -> Result<()> {
        let path = self.0.take().expect("taken only by remove(self)");
        fs::remove_dir(&path).with_context(|| format!("cannot remove {}", path.display()))
    }
}

impl Drop for EmptyDir {
    fn drop(&mut self) {
        if let Some(path) = self.0.take()
            && let Err(err) = fs::remove_dir(&path)
        {
            eprintln!("warning: cannot remove {}: {err}", path.display());
        }
    }
}
