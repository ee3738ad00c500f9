//! cgroup v2 paths and ids.
//!
//! A cgroup's id, as `bpf_get_current_cgroup_id()` returns it, is the inode number of
//! its directory on the cgroup2 filesystem. [`CgroupFs`] turns what a user types (an
//! absolute path inside the cgroup2 mount, or a path relative to it) into a checked
//! directory and its id, and finds the directory of an id it did not resolve itself
//! (cgroups adopted from pinned maps after a restart).

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{DirEntryExt, MetadataExt};
use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;

/// Where the kernel lists this process's mounts.
const MOUNTINFO: &str = "/proc/self/mountinfo";

/// Most directories [`CgroupFs::path_of`] reads before giving up: a host has hundreds
/// of cgroups, not tens of thousands, and the walk runs on an API request.
const MAX_WALKED_DIRS: usize = 65_536;

/// Deepest nesting [`CgroupFs::path_of`] descends to.
const MAX_WALK_DEPTH: usize = 64;

/// Errors of cgroup path resolution.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// `/proc/self/mountinfo` could not be read.
    #[error("cannot read {}", path.display())]
    MountInfo {
        /// The mountinfo file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// No cgroup2 filesystem is mounted.
    #[error("no cgroup2 filesystem is mounted (none listed in {})", path.display())]
    NoCgroup2Mount {
        /// The mountinfo file that was searched.
        path: PathBuf,
    },
    /// The path does not exist.
    #[error("no cgroup v2 directory at {}", path.display())]
    NotFound {
        /// The path as resolved against the mount.
        path: PathBuf,
    },
    /// The path resolves outside the cgroup2 mount.
    #[error("{} is outside the cgroup2 mount at {}", path.display(), mount.display())]
    OutsideMount {
        /// The canonical path.
        path: PathBuf,
        /// The cgroup2 mount point.
        mount: PathBuf,
    },
    /// The path exists inside the mount but is not a cgroup directory.
    #[error("{} is not a cgroup v2 directory", path.display())]
    NotACgroup {
        /// The canonical path.
        path: PathBuf,
    },
    /// The path was empty.
    #[error("empty cgroup path")]
    EmptyPath,
    /// Reconfiguring the cgroup2 superblock failed.
    #[error("cannot reconfigure the cgroup2 mount at {} with {options}", mount.display())]
    Reconfigure {
        /// The mount point.
        mount: PathBuf,
        /// The options it was given.
        options: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Reading the path failed for another reason.
    #[error("cannot read {}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// A checked cgroup v2 directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cgroup {
    /// Canonical absolute path of the directory.
    pub path: PathBuf,
    /// cgroup id: the directory's inode number.
    pub id: u64,
}

/// The cgroup2 filesystem, at its mount point.
#[derive(Clone, Debug)]
pub struct CgroupFs {
    root: PathBuf,
    dev: u64,
}

impl CgroupFs {
    /// The cgroup2 mount this process sees, read from `/proc/self/mountinfo` once and
    /// then kept: each checkpoint and restore of a process needs it, and reading
    /// mountinfo costs 0.1-0.2 ms (measured with a loop of reads, shared 2-vCPU VM).
    /// A failure is not kept: the next call reads again.
    pub fn host() -> Result<&'static Self, CgroupError> {
        static HOST: OnceLock<CgroupFs> = OnceLock::new();
        if let Some(fs) = HOST.get() {
            return Ok(fs);
        }
        let fs = Self::from_mountinfo()?;
        Ok(HOST.get_or_init(|| fs))
    }

    /// The cgroup2 mount this process sees, from `/proc/self/mountinfo`.
    pub fn from_mountinfo() -> Result<Self, CgroupError> {
        Self::at(&host_cgroup2_mount()?.0)
    }

    /// The cgroup2 filesystem mounted at `root` (tests pass a temporary directory).
    pub fn at(root: &Path) -> Result<Self, CgroupError> {
        let io_err = |source| CgroupError::Io {
            path: root.to_path_buf(),
            source,
        };
        let root = root.canonicalize().map_err(io_err)?;
        let dev = fs::metadata(&root).map_err(io_err)?.dev();
        Ok(Self { root, dev })
    }

    /// The mount point.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Resolves an absolute path inside the mount, or a path relative to the mount
    /// (`deltabox/demo`), to a cgroup directory and its id.
    pub fn resolve(&self, user_path: impl AsRef<Path>) -> Result<Cgroup, CgroupError> {
        let user_path = user_path.as_ref();
        if user_path.as_os_str().is_empty() {
            return Err(CgroupError::EmptyPath);
        }
        let joined = if user_path.is_absolute() {
            user_path.to_path_buf()
        } else {
            self.root.join(user_path)
        };
        let path = match joined.canonicalize() {
            Ok(path) => path,
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                // `../../etc` that does not exist is still better reported as outside.
                let path = lexically_normal(&joined);
                if !path.starts_with(&self.root) {
                    return Err(CgroupError::OutsideMount {
                        path,
                        mount: self.root.clone(),
                    });
                }
                return Err(CgroupError::NotFound { path });
            }
            Err(source) => {
                return Err(CgroupError::Io {
                    path: joined,
                    source,
                });
            }
        };
        if !path.starts_with(&self.root) {
            return Err(CgroupError::OutsideMount {
                path,
                mount: self.root.clone(),
            });
        }
        let meta = fs::metadata(&path).map_err(|source| CgroupError::Io {
            path: path.clone(),
            source,
        })?;
        // Another filesystem mounted inside the cgroup2 tree, or a control file such as
        // `cgroup.procs`, is not a cgroup; every cgroup directory has `cgroup.procs`.
        if !meta.is_dir() || meta.dev() != self.dev || !path.join("cgroup.procs").is_file() {
            return Err(CgroupError::NotACgroup { path });
        }
        Ok(Cgroup {
            id: meta.ino(),
            path,
        })
    }

    /// Finds the directory whose inode number is `id` by walking the tree breadth
    /// first, within bounds; `None` if it is not found (removed, or beyond the bounds).
    pub fn path_of(&self, id: u64) -> Option<PathBuf> {
        if fs::metadata(&self.root).ok()?.ino() == id {
            return Some(self.root.clone());
        }
        let mut queue = VecDeque::from([(self.root.clone(), 0usize)]);
        let mut walked = 0usize;
        while let Some((dir, depth)) = queue.pop_front() {
            walked += 1;
            if walked > MAX_WALKED_DIRS {
                return None;
            }
            // A directory that vanished mid-walk is skipped, not an error.
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                // d_ino from readdir equals st_ino on kernfs: no stat per entry.
                let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
                if !is_dir {
                    continue;
                }
                if entry.ino() == id {
                    return Some(entry.path());
                }
                if depth + 1 < MAX_WALK_DEPTH {
                    queue.push_back((entry.path(), depth + 1));
                }
            }
        }
        None
    }

    /// [`CgroupFs::path_of`] as display text, `<unknown cgroup ID>` when not found.
    pub fn display_path_of(&self, id: u64) -> String {
        self.path_of(id)
            .map_or_else(|| unknown_cgroup(id), |p| p.display().to_string())
    }
}

/// What the API shows for a watched id whose directory cannot be found.
pub fn unknown_cgroup(id: u64) -> String {
    format!("<unknown cgroup {id}>")
}

/// The mount point of the first cgroup2 filesystem listed in mountinfo text.
pub fn cgroup2_mount_point(mountinfo: &str) -> Option<PathBuf> {
    cgroup2_mount(mountinfo).map(|(mount_point, _)| mount_point)
}

/// The mount point and superblock options of the cgroup2 mount this process sees
/// (`/proc/self/mountinfo`).
fn host_cgroup2_mount() -> Result<(PathBuf, Vec<String>), CgroupError> {
    let path = PathBuf::from(MOUNTINFO);
    let text = fs::read_to_string(&path).map_err(|source| CgroupError::MountInfo {
        path: path.clone(),
        source,
    })?;
    cgroup2_mount(&text).ok_or(CgroupError::NoCgroup2Mount { path })
}

/// The mount point and the superblock options (`rw,nsdelegate,...`) of the first
/// cgroup2 filesystem listed in mountinfo text.
fn cgroup2_mount(mountinfo: &str) -> Option<(PathBuf, Vec<String>)> {
    mountinfo.lines().find_map(|line| {
        // `ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER`
        let (left, right) = line.split_once(" - ")?;
        let mut right = right.split_whitespace();
        if right.next()? != "cgroup2" {
            return None;
        }
        let options = right.nth(1).unwrap_or_default();
        let mount_point = left.split_whitespace().nth(4)?;
        Some((
            unescape_octal(mount_point),
            options.split(',').map(str::to_owned).collect(),
        ))
    })
}

/// The superblock options a reconfiguration of a cgroup2 mount showing `current` sets
/// to add `favordynmods`: the current ones (a reconfiguration resets what it does not
/// name) but the read-only flag, which is the mount's, not a cgroup2 parameter.
/// `None` when `favordynmods` is on already.
fn options_with_favordynmods(current: &[String]) -> Option<Vec<String>> {
    if current.iter().any(|o| o == FAVOR_DYNMODS) {
        return None;
    }
    let mut options: Vec<String> = current
        .iter()
        .filter(|o| !matches!(o.as_str(), "rw" | "ro" | ""))
        .cloned()
        .collect();
    options.push(FAVOR_DYNMODS.to_owned());
    Some(options)
}

/// The cgroup2 mount option that makes moving a process between cgroups cheap.
const FAVOR_DYNMODS: &str = "favordynmods";

/// Turns on `favordynmods` on the host's cgroup2 filesystem unless it is on already;
/// `Ok(true)` if this call turned it on.
///
/// Without it, writing a pid to `cgroup.procs` (v2 or v1) write-locks a global
/// per-CPU rwsem and so waits for an RCU grace period whenever the last move was a
/// while ago: 7.8 ms median here. With it, the move locks only the moved process's
/// thread group (kernel 6.18: a switch that stays on until reboot): 0.28 ms
/// (docs/sandboxes.md, "Moving processes between cgroups"). Forks and exits pay a
/// little more. The superblock is reconfigured through `fspick`/`fsconfig`, which
/// leaves the mount's own flags (nosuid, nodev, noexec) alone.
pub fn favor_dynamic_moves() -> Result<bool, CgroupError> {
    let (mount_point, current) = host_cgroup2_mount()?;
    let Some(options) = options_with_favordynmods(&current) else {
        return Ok(false);
    };
    let reconfigure = || -> rustix::io::Result<()> {
        let fs = rustix::mount::fspick(
            rustix::fs::CWD,
            &mount_point,
            rustix::mount::FsPickFlags::FSPICK_CLOEXEC,
        )?;
        for option in &options {
            match option.split_once('=') {
                Some((key, value)) => rustix::mount::fsconfig_set_string(&fs, key, value)?,
                None => rustix::mount::fsconfig_set_flag(&fs, option.as_str())?,
            }
        }
        rustix::mount::fsconfig_reconfigure(&fs)
    };
    reconfigure().map_err(|e| CgroupError::Reconfigure {
        mount: mount_point.clone(),
        options: options.join(","),
        source: e.into(),
    })?;
    Ok(true)
}

/// Undoes mountinfo's `\ooo` escapes of space, tab, newline and backslash.
fn unescape_octal(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let digits = &bytes[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let value = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                if let Ok(byte) = u8::try_from(value) {
                    out.push(byte);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    PathBuf::from(OsString::from_vec(out))
}

/// Drops `.` and resolves `..` without touching the filesystem, for error messages
/// about paths that do not exist.
fn lexically_normal(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake cgroup tree: directories with a `cgroup.procs` file, as on cgroup2.
    fn fake_tree() -> (tempfile::TempDir, CgroupFs) {
        let dir = tempfile::tempdir().unwrap();
        for sub in ["", "deltabox", "deltabox/demo"] {
            let d = dir.path().join(sub);
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("cgroup.procs"), "").unwrap();
        }
        fs::create_dir(dir.path().join("plain")).unwrap();
        let cgroups = CgroupFs::at(dir.path()).unwrap();
        (dir, cgroups)
    }

    #[test]
    fn finds_cgroup2_mount_point() {
        let text = "\
25 30 0:23 / /sys rw,nosuid shared:7 - sysfs sysfs rw
33 25 0:28 / /sys/fs/cgroup rw shared:9 - tmpfs tmpfs ro,mode=755
34 33 0:29 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate
35 33 0:30 / /sys/fs/cgroup/cpu rw shared:11 - cgroup cgroup rw,cpu
";
        assert_eq!(
            cgroup2_mount_point(text),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            cgroup2_mount_point("1 0 0:1 / / rw - ext4 /dev/vda rw"),
            None
        );
        let escaped = "34 33 0:29 / /mnt/cg\\040two rw - cgroup2 none rw";
        assert_eq!(
            cgroup2_mount_point(escaped),
            Some(PathBuf::from("/mnt/cg two"))
        );
    }

    #[test]
    fn favordynmods_keeps_the_superblock_options() {
        let text = "34 33 0:29 / /sys/fs/cgroup rw,nosuid,nodev shared:10 - cgroup2 cgroup2 \
                    rw,nsdelegate,memory_recursiveprot\n";
        let (mount, current) = cgroup2_mount(text).unwrap();
        assert_eq!(mount, PathBuf::from("/sys/fs/cgroup"));
        assert_eq!(
            options_with_favordynmods(&current).unwrap(),
            ["nsdelegate", "memory_recursiveprot", "favordynmods"]
        );
        let on = ["rw".to_owned(), "favordynmods".to_owned()];
        assert_eq!(options_with_favordynmods(&on), None);
        assert_eq!(
            options_with_favordynmods(&["rw".to_owned()]).unwrap(),
            ["favordynmods"]
        );
    }

    #[test]
    fn resolves_absolute_and_relative_paths() {
        let (dir, cgroups) = fake_tree();
        let by_rel = cgroups.resolve("deltabox/demo").unwrap();
        let by_abs = cgroups.resolve(dir.path().join("deltabox/demo")).unwrap();
        assert_eq!(by_rel, by_abs);
        assert_eq!(by_rel.path, cgroups.root().join("deltabox/demo"));
        let ino = fs::metadata(dir.path().join("deltabox/demo"))
            .unwrap()
            .ino();
        assert_eq!(by_rel.id, ino);
        // `..` that stays inside the mount is fine.
        assert_eq!(cgroups.resolve("deltabox/demo/../demo").unwrap(), by_rel);
    }

    #[test]
    fn rejects_missing_outside_and_non_cgroup_paths() {
        let (dir, cgroups) = fake_tree();
        let err = cgroups.resolve("deltabox/nope").unwrap_err();
        assert!(matches!(err, CgroupError::NotFound { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!(
                "no cgroup v2 directory at {}",
                cgroups.root().join("deltabox/nope").display()
            )
        );

        let err = cgroups.resolve("../").unwrap_err();
        assert!(matches!(err, CgroupError::OutsideMount { .. }), "{err:?}");
        let err = cgroups.resolve("../../no/such/dir").unwrap_err();
        assert!(matches!(err, CgroupError::OutsideMount { .. }), "{err:?}");
        assert!(
            err.to_string().contains("outside the cgroup2 mount"),
            "{err}"
        );

        let outside = tempfile::tempdir().unwrap();
        let err = cgroups.resolve(outside.path()).unwrap_err();
        assert!(matches!(err, CgroupError::OutsideMount { .. }), "{err:?}");

        let err = cgroups.resolve("plain").unwrap_err();
        assert!(matches!(err, CgroupError::NotACgroup { .. }), "{err:?}");
        let err = cgroups.resolve("deltabox/cgroup.procs").unwrap_err();
        assert!(matches!(err, CgroupError::NotACgroup { .. }), "{err:?}");

        assert!(matches!(cgroups.resolve(""), Err(CgroupError::EmptyPath)));
        drop(dir);
    }

    #[test]
    fn finds_path_of_id() {
        let (_dir, cgroups) = fake_tree();
        let demo = cgroups.resolve("deltabox/demo").unwrap();
        assert_eq!(cgroups.path_of(demo.id), Some(demo.path.clone()));
        let root_id = fs::metadata(cgroups.root()).unwrap().ino();
        assert_eq!(cgroups.path_of(root_id).as_deref(), Some(cgroups.root()));
        assert_eq!(cgroups.path_of(u64::MAX), None);
        assert_eq!(
            cgroups.display_path_of(u64::MAX),
            "<unknown cgroup 18446744073709551615>"
        );
    }
}
