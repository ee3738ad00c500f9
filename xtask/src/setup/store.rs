//! The xfs store: DeltaFS keeps its layers on a loop-mounted xfs image made with
//! `-m reflink=1`, so a copy-up of a file from a frozen layer is a `FICLONE` (O(1)), not a
//! copy (DESIGN.md, "DeltaFS"). Set-up creates the sparse image, makes the filesystem if
//! the image has none, mounts it, and checks that `cp --reflink=always` works there.
//! Mounted with `discard`, so space freed in the store is punched out of the image and
//! returned to the host's disk; a store mounted before that option was used is trimmed
//! (`fstrim`) at each set-up instead.

use std::fs::{self, File};
use std::io::Read as _;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use anyhow::{Context as _, Result, bail};

use super::{Check, Failure, Outcome};
use crate::cgroup::MountInfoEntry;
use crate::util::{output, raw_output, run_cmd};

/// The image file.
pub const STORE_IMAGE: &str = "/var/lib/deltabox/store.img";
/// Where the image is mounted; DeltaFS stores and overlayfs uppers go below it.
pub const STORE_DIR: &str = "/var/lib/deltabox/store";
/// The image's apparent size: sparse, so it costs only what is written.
const STORE_SIZE: u64 = 32 << 30;
/// xfs superblock magic, at offset 0 of the image.
const XFS_MAGIC: &[u8; 4] = b"XFSB";

pub fn ensure_store() -> Check {
    ensure_store_inner().map_err(|err| {
        Failure::from_error(
            &err,
            format!(
                "see docs/setup.md, xfs store; to start over, `umount {STORE_DIR}; rm \
                 {STORE_IMAGE}` (this deletes every layer in it) and rerun set-up"
            ),
        )
    })
}

fn ensure_store_inner() -> Result<Outcome> {
    let image = Path::new(STORE_IMAGE);
    let dir = Path::new(STORE_DIR);
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut done = Vec::new();

    match mounted_fstype(dir)? {
        Some(fstype) if fstype == "xfs" => {
            // Idempotent and ~0.2 s on an idle 32 GiB store: gives back to the host what
            // earlier runs wrote and deleted when the mount predates `discard`.
            run_cmd(Command::new("fstrim").arg(dir))?;
        }
        Some(fstype) => bail!("{} is a {fstype} mount, not the xfs store", dir.display()),
        None => {
            if !image.exists() {
                let file = File::create_new(image)
                    .with_context(|| format!("cannot create {}", image.display()))?;
                file.set_len(STORE_SIZE)
                    .with_context(|| format!("cannot size {} to 32 GiB", image.display()))?;
                done.push("created the 32 GiB sparse image");
            }
            if !has_xfs(image)? {
                if let Some(other) = other_filesystem(image)? {
                    bail!(
                        "{} holds a {other} filesystem, not xfs; set-up will not format over it",
                        image.display()
                    );
                }
                run_cmd(
                    Command::new("mkfs.xfs")
                        .args(["-q", "-m", "reflink=1"])
                        .arg(image),
                )?;
                done.push("made xfs with reflink=1");
            }
            run_cmd(
                Command::new("mount")
                    .args(["-t", "xfs", "-o", "loop,noatime,discard"])
                    .arg(image)
                    .arg(dir),
            )?;
            done.push("mounted");
        }
    }

    check_reflink(dir)?;
    let meta = fs::metadata(image).with_context(|| format!("cannot stat {}", image.display()))?;
    let used = meta.blocks() * 512;
    let detail = format!(
        "{} ({} GiB sparse, {} MiB used) xfs at {}, reflink copies work",
        image.display(),
        meta.len() >> 30,
        used >> 20,
        dir.display()
    );
    if done.is_empty() {
        Ok(Outcome::Ok(detail))
    } else {
        Ok(Outcome::Installed(format!("{}: {detail}", done.join(", "))))
    }
}

/// The type of the filesystem mounted at `dir`, if any (the last mount there wins).
fn mounted_fstype(dir: &Path) -> Result<Option<String>> {
    let mountinfo =
        fs::read_to_string("/proc/self/mountinfo").context("cannot read /proc/self/mountinfo")?;
    Ok(fstype_at(&mountinfo, dir))
}

/// The filesystem type of the topmost mount at `dir` in mountinfo text.
fn fstype_at(mountinfo: &str, dir: &Path) -> Option<String> {
    mountinfo
        .lines()
        .rev()
        .filter_map(MountInfoEntry::parse)
        .find(|entry| Path::new(&entry.mount_point) == dir)
        .map(|entry| entry.fstype)
}

/// Whether the image starts with the xfs superblock magic.
fn has_xfs(image: &Path) -> Result<bool> {
    let mut magic = [0u8; 4];
    File::open(image)
        .and_then(|mut file| file.read_exact(&mut magic))
        .with_context(|| format!("cannot read {}", image.display()))?;
    Ok(&magic == XFS_MAGIC)
}

/// The filesystem `blkid` finds in the image, if any (`blkid -p` exits 2 when none).
fn other_filesystem(image: &Path) -> Result<Option<String>> {
    let mut blkid = Command::new("blkid");
    blkid.args(["-p", "-o", "value", "-s", "TYPE"]).arg(image);
    let out = raw_output(&mut blkid)?;
    match out.status.code() {
        Some(2) => Ok(None),
        Some(0) => Ok(Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())),
        _ => bail!(
            "`blkid -p {}` failed ({}): {}",
            image.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    }
}

/// Clones a small file with `cp --reflink=always` (FICLONE), compares the copy, removes
/// both.
fn check_reflink(dir: &Path) -> Result<()> {
    let source = dir.join(format!(".setup-reflink-{}", std::process::id()));
    let clone = source.with_extension("clone");
    let result = (|| {
        let data: Vec<u8> = (0..256 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
        fs::write(&source, &data).with_context(|| format!("cannot write {}", source.display()))?;
        output(
            Command::new("cp")
                .arg("--reflink=always")
                .arg(&source)
                .arg(&clone),
        )
        .with_context(|| {
            format!(
                "reflink copies (FICLONE) fail on {}: was it made without `-m reflink=1`?",
                dir.display()
            )
        })?;
        let copied =
            fs::read(&clone).with_context(|| format!("cannot read {}", clone.display()))?;
        if copied != data {
            bail!(
                "the reflink clone {} differs from its source",
                clone.display()
            );
        }
        Ok(())
    })();
    let _ = fs::remove_file(&source);
    let _ = fs::remove_file(&clone);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_topmost_mount_at_a_point() {
        let mountinfo = "\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
90 22 7:0 / /var/lib/deltabox/store rw,noatime - xfs /dev/loop0 rw,attr2
91 90 0:50 / /var/lib/deltabox/store rw - tmpfs tmpfs rw
";
        let store = Path::new(STORE_DIR);
        assert_eq!(fstype_at(mountinfo, store).as_deref(), Some("tmpfs"));
        let root_only = mountinfo.lines().next().unwrap();
        assert_eq!(fstype_at(root_only, store), None);
        let two = mountinfo.lines().take(2).collect::<Vec<_>>().join("\n");
        assert_eq!(fstype_at(&two, store).as_deref(), Some("xfs"));
        assert_eq!(
            fstype_at(mountinfo, Path::new("/")).as_deref(),
            Some("ext4")
        );
    }
}
