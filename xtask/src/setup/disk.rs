//! Free disk space where the build and the tests write: the cargo target directory and
//! the xfs store's image. A cold `cargo xtask test` writes a few GiB there; a full disk
//! otherwise shows up much later as a compiler's "No space left on device".

use std::path::Path;

use anyhow::{Context as _, Result};
use nix::sys::statvfs::statvfs;

use super::store::STORE_IMAGE;
use super::{Check, Failure, Outcome};
use crate::util::target_dir;

/// Below this, a cold build and test run does not fit: measured, its target directory
/// peaked at 4.0 GiB and the store image at 0.8 GiB (docs/setup.md, "disk space").
const MIN_FREE: u64 = 5 << 30;

pub fn check_free_space() -> Check {
    let fix = "free disk space (`cargo clean` drops old builds) and rerun";
    let mut lines = Vec::new();
    let mut short = Vec::new();
    let store_dir = Path::new(STORE_IMAGE).parent().unwrap_or(Path::new("/"));
    let target = target_dir().map_err(|err| Failure::from_error(&err, fix))?;
    for (what, dir) in [("target", target), ("store", store_dir)] {
        let free = free_bytes(dir).map_err(|err| Failure::from_error(&err, fix))?;
        lines.push(format!("{what} {} GiB free", gib(free)));
        if free < MIN_FREE {
            short.push(format!(
                "only {} GiB free under {} ({what}), at least {} GiB needed",
                gib(free),
                dir.display(),
                gib(MIN_FREE)
            ));
        }
    }
    if short.is_empty() {
        Ok(Outcome::Ok(lines.join(", ")))
    } else {
        Err(Failure::new(short.join("; "), fix))
    }
}

/// Bytes an unprivileged writer could still use on the filesystem holding `path` (or its
/// nearest existing ancestor: the target directory may not exist before the first build).
fn free_bytes(path: &Path) -> Result<u64> {
    let existing = path
        .ancestors()
        .find(|dir| dir.exists())
        .unwrap_or(Path::new("/"));
    let stat =
        statvfs(existing).with_context(|| format!("cannot statvfs {}", existing.display()))?;
    Ok(stat.blocks_available() * stat.fragment_size())
}

fn gib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / f64::from(1u32 << 30))
}
