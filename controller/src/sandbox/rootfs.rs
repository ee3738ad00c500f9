//! The base trees a sandbox's DeltaFS root is layered over.
//!
//! The embedded default base (DESIGN.md, "The user's view") needs no image: the host's
//! `/usr` and `/etc` bound read-only, `/bin /lib /lib64 /sbin` as the host has them
//! (symlinks into `usr` on merged-/usr systems, else read-only binds), and empty
//! `/root /tmp /home /workspace …`. The host's secrets are masked by binding an empty
//! file or directory over them. Everything a sandbox writes goes to its DeltaFS layers;
//! the read-only binds make sure nothing reaches the host even by mistake.
//! `--rootfs DIR` takes any root tree instead, checked by [`check_rootfs`].

use std::{
    fs, io,
    os::unix::fs::{PermissionsExt as _, symlink},
    path::{Path, PathBuf},
};

use nix::mount::{MntFlags, MsFlags, mount, umount2};

/// The host's system directories bound read-only into the default base.
const RO_BINDS: [&str; 2] = ["usr", "etc"];
/// Top-level directories taken as the host has them: symlink or read-only bind.
const AS_HOST: [&str; 4] = ["bin", "lib", "lib64", "sbin"];
/// Empty directories of the default base, with their modes.
const EMPTY_DIRS: [(&str, u32); 13] = [
    ("root", 0o700),
    ("tmp", 0o1777),
    ("home", 0o755),
    ("workspace", 0o755),
    ("proc", 0o555),
    ("dev", 0o755),
    ("sys", 0o555),
    ("run", 0o755),
    ("var", 0o755),
    ("var/tmp", 0o1777),
    ("mnt", 0o755),
    ("opt", 0o755),
    ("usr", 0o755),
];
/// Host secrets hidden under an empty file.
const SECRET_FILES: [&str; 4] = ["etc/shadow", "etc/gshadow", "etc/shadow-", "etc/gshadow-"];
/// Host secret directories hidden under an empty directory.
const SECRET_DIRS: [&str; 1] = ["etc/ssl/private"];
/// Written last: the base is complete.
const READY: &str = ".deltabox-base";

/// Why a base tree cannot be made or used.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// A file operation failed.
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
    /// A mount failed.
    #[error("{op} {}: {source}", path.display())]
    Mount {
        /// What was done.
        op: &'static str,
        /// The mount point.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: nix::Error,
    },
    /// `--rootfs` does not exist.
    #[error("rootfs {} does not exist", .0.display())]
    Missing(PathBuf),
    /// `--rootfs` is not a directory.
    #[error("rootfs {} is not a directory", .0.display())]
    NotADirectory(PathBuf),
    /// `--rootfs` has no shell to run commands with.
    #[error("rootfs {} has no executable /bin/sh or /usr/bin/sh", .0.display())]
    NoShell(PathBuf),
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> RootfsError {
    let path = path.to_owned();
    move |source| RootfsError::Io { op, path, source }
}

fn mount_err(op: &'static str, path: &Path) -> impl FnOnce(nix::Error) -> RootfsError {
    let path = path.to_owned();
    move |source| RootfsError::Mount { op, path, source }
}

/// Builds the default base at `dir` (idempotent: a complete base is reused, a partial
/// one is finished) and returns its path.
pub fn ensure_default_base(dir: &Path) -> Result<PathBuf, RootfsError> {
    fs::create_dir_all(dir).map_err(io_err("mkdir", dir))?;
    let dir = fs::canonicalize(dir).map_err(io_err("resolve", dir))?;
    let mounted = mount_points_under(&dir)?;
    if dir.join(READY).exists() && dir_is_complete(&dir, &mounted) {
        return Ok(dir);
    }
    for (sub, mode) in EMPTY_DIRS {
        let path = dir.join(sub);
        if !path.exists() {
            fs::create_dir(&path).map_err(io_err("mkdir", &path))?;
            fs::set_permissions(&path, fs::Permissions::from_mode(mode))
                .map_err(io_err("chmod", &path))?;
        }
    }
    for name in AS_HOST {
        let host = Path::new("/").join(name);
        let path = dir.join(name);
        let Ok(meta) = fs::symlink_metadata(&host) else {
            continue;
        };
        if meta.file_type().is_symlink() {
            let target = fs::read_link(&host).map_err(io_err("readlink", &host))?;
            if fs::symlink_metadata(&path).is_err() {
                symlink(&target, &path).map_err(io_err("symlink", &path))?;
            }
        } else if meta.is_dir() {
            fs::create_dir_all(&path).map_err(io_err("mkdir", &path))?;
            bind_ro(&host, &path, &mounted)?;
        }
    }
    fs::create_dir_all(dir.join("etc")).map_err(io_err("mkdir", &dir.join("etc")))?;
    for name in RO_BINDS {
        bind_ro(&Path::new("/").join(name), &dir.join(name), &mounted)?;
    }
    // Masks come from outside the base, so nothing of them shows inside.
    let masks = masks_dir(&dir);
    let empty_file = masks.join("empty-file");
    let empty_dir = masks.join("empty-dir");
    fs::create_dir_all(&empty_dir).map_err(io_err("mkdir", &empty_dir))?;
    fs::write(&empty_file, b"").map_err(io_err("create", &empty_file))?;
    fs::set_permissions(&empty_file, fs::Permissions::from_mode(0o000))
        .map_err(io_err("chmod", &empty_file))?;
    fs::set_permissions(&empty_dir, fs::Permissions::from_mode(0o700))
        .map_err(io_err("chmod", &empty_dir))?;
    for secret in secret_files()? {
        let target = dir.join(&secret);
        if target.exists() {
            bind_ro(&empty_file, &target, &mounted)?;
        }
    }
    for secret in SECRET_DIRS {
        let target = dir.join(secret);
        if target.is_dir() {
            bind_ro(&empty_dir, &target, &mounted)?;
        }
    }
    let ready = dir.join(READY);
    fs::write(&ready, b"deltabox default base\n").map_err(io_err("create", &ready))?;
    Ok(dir)
}

/// Unmounts everything [`ensure_default_base`] mounted under `dir` (deepest first).
pub fn release_default_base(dir: &Path) -> Result<(), RootfsError> {
    let dir = fs::canonicalize(dir).map_err(io_err("resolve", dir))?;
    let mut mounts = mount_points_under(&dir)?;
    // Deepest first: masks inside etc before etc itself. A path may be mounted twice
    // (a repeated call): unmount until none is left.
    mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for path in &mounts {
        umount2(path, MntFlags::MNT_DETACH).map_err(mount_err("unmount", path))?;
    }
    let left = mount_points_under(&dir)?;
    if let Some(path) = left.first() {
        return Err(RootfsError::Mount {
            op: "still mounted after unmount",
            path: path.clone(),
            source: nix::Error::EBUSY,
        });
    }
    let _ = fs::remove_file(dir.join(READY));
    Ok(())
}

/// Checks a `--rootfs DIR`: exists, is a directory, has an executable shell.
pub fn check_rootfs(dir: &Path) -> Result<(), RootfsError> {
    let meta = fs::metadata(dir).map_err(|_| RootfsError::Missing(dir.to_owned()))?;
    if !meta.is_dir() {
        return Err(RootfsError::NotADirectory(dir.to_owned()));
    }
    let has_shell = ["bin/sh", "usr/bin/sh"].iter().any(|sh| {
        resolve_in(dir, Path::new(sh))
            .and_then(|p| fs::metadata(p).ok())
            .is_some_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    });
    if has_shell {
        Ok(())
    } else {
        Err(RootfsError::NoShell(dir.to_owned()))
    }
}

/// Resolves `rel` inside `root`, following symlinks as the sandbox would (absolute
/// targets are taken from `root`, not from the host).
fn resolve_in(root: &Path, rel: &Path) -> Option<PathBuf> {
    let mut parts: Vec<std::ffi::OsString> = Vec::new();
    let mut todo: Vec<std::ffi::OsString> = rel
        .components()
        .rev()
        .filter_map(|c| match c {
            std::path::Component::Normal(n) => Some(n.to_owned()),
            _ => None,
        })
        .collect();
    let mut hops = 0;
    while let Some(part) = todo.pop() {
        if part == ".." {
            parts.pop();
            continue;
        }
        let mut path = root.to_path_buf();
        path.extend(&parts);
        path.push(&part);
        match fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => {
                hops += 1;
                if hops > 40 {
                    return None;
                }
                let target = fs::read_link(&path).ok()?;
                if target.is_absolute() {
                    parts.clear();
                }
                for c in target.components().rev() {
                    match c {
                        std::path::Component::Normal(n) => todo.push(n.to_owned()),
                        std::path::Component::ParentDir => todo.push("..".into()),
                        _ => {}
                    }
                }
            }
            Ok(_) => parts.push(part),
            Err(_) => return None,
        }
    }
    let mut path = root.to_path_buf();
    path.extend(&parts);
    Some(path)
}

/// Where the empty files and directories bound over host secrets live.
fn masks_dir(dir: &Path) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_owned();
    name.push(".masks");
    dir.with_file_name(name)
}

/// The host secrets to hide, relative to the root: shadow files, SSH host private keys.
fn secret_files() -> Result<Vec<PathBuf>, RootfsError> {
    let mut out: Vec<PathBuf> = SECRET_FILES.iter().map(PathBuf::from).collect();
    if let Ok(entries) = fs::read_dir("/etc/ssh") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("ssh_host_") && name.ends_with("_key") {
                out.push(Path::new("etc/ssh").join(name));
            }
        }
    }
    Ok(out)
}

/// Binds `src` on `target` read-only, unless `target` is already a mount point.
fn bind_ro(src: &Path, target: &Path, mounted: &[PathBuf]) -> Result<(), RootfsError> {
    if mounted.iter().any(|m| m == target) {
        return Ok(());
    }
    if !target.exists() {
        fs::create_dir_all(target).map_err(io_err("mkdir", target))?;
    }
    mount(
        Some(src),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(mount_err("bind", target))?;
    mount(
        None::<&str>,
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .map_err(|e| {
        let _ = umount2(target, MntFlags::MNT_DETACH);
        mount_err("remount read-only", target)(e)
    })
}

/// Whether the binds of a base are all in place.
fn dir_is_complete(dir: &Path, mounted: &[PathBuf]) -> bool {
    RO_BINDS
        .iter()
        .all(|name| mounted.iter().any(|m| *m == dir.join(name)))
}

/// Mount points at or under `dir`, from `/proc/self/mountinfo`.
fn mount_points_under(dir: &Path) -> Result<Vec<PathBuf>, RootfsError> {
    Ok(mount_points(dir)?
        .into_iter()
        .filter(|p| p != dir)
        .collect())
}

/// Mount points at `dir` or below it, in mount order (unmount in reverse).
pub(crate) fn mount_points(dir: &Path) -> Result<Vec<PathBuf>, RootfsError> {
    let path = Path::new("/proc/self/mountinfo");
    let info = fs::read_to_string(path).map_err(io_err("read", path))?;
    Ok(info
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .map(unescape)
        .filter(|p| p.starts_with(dir))
        .collect())
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(field: &str) -> PathBuf {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Ok(v) = u8::from_str_radix(&field[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(std::ffi::OsString::from(
        String::from_utf8_lossy(&out).into_owned(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_in_follows_symlinks_inside_the_root() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        fs::create_dir_all(r.join("usr/bin")).unwrap();
        fs::write(r.join("usr/bin/dash"), b"").unwrap();
        symlink("usr/bin", r.join("bin")).unwrap();
        // An absolute target is the sandbox's, not the host's.
        symlink("/usr/bin/dash", r.join("usr/bin/sh")).unwrap();
        assert_eq!(
            resolve_in(r, Path::new("bin/sh")),
            Some(r.join("usr/bin/dash"))
        );
        symlink("../../nowhere", r.join("usr/bin/bad")).unwrap();
        assert_eq!(resolve_in(r, Path::new("bin/bad")), None);
        symlink("loop", r.join("loop")).unwrap();
        assert_eq!(resolve_in(r, Path::new("loop")), None);
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape("/a\\040b/c"), PathBuf::from("/a b/c"));
        assert_eq!(unescape("/plain"), PathBuf::from("/plain"));
    }

    #[test]
    fn masks_live_next_to_the_base() {
        assert_eq!(
            masks_dir(Path::new("/x/base")),
            PathBuf::from("/x/base.masks")
        );
    }
}
