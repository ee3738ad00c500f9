//! The SWE-like trajectory's project: the source distribution of a small pure-Python
//! package whose test suite runs with the standard library's `unittest` (the host's
//! `/usr/bin/python3`, which the sandboxes see, has no pytest). Downloaded once from PyPI
//! with `pip download` into `<target>/bench-cache/`, reused afterwards.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::util::{run_cmd, step};

/// The package, pinned so that every run measures the same code.
pub const PACKAGE: &str = "more-itertools";
pub const VERSION: &str = "10.5.0";
/// The directory the sdist unpacks to.
pub const TOP: &str = "more-itertools-10.5.0";
/// The file each step edits, and the test module each step runs (176 tests).
pub const EDITED: &str = "more_itertools/recipes.py";
pub const TESTS: &str = "tests.test_recipes";

/// The downloaded sdist.
pub struct Project {
    /// The cached `.tar.gz`.
    pub sdist: PathBuf,
    /// Its size.
    pub bytes: u64,
}

/// The cached sdist, downloaded first if missing.
pub fn fetch(target: &Path) -> Result<Project> {
    let cache = target.join("bench-cache");
    let sdist = cache.join(format!("{TOP}.tar.gz"));
    if !sdist.exists() {
        fs::create_dir_all(&cache).with_context(|| format!("cannot create {}", cache.display()))?;
        step(format!(
            "downloading the {PACKAGE} {VERSION} source distribution from PyPI into {} \
             (once)",
            cache.display()
        ));
        let python = which::which("python3").context("python3 (with pip) is needed")?;
        run_cmd(
            Command::new(python)
                .args(["-m", "pip", "download", "--no-deps", "--no-binary", ":all:"])
                .args(["--dest"])
                .arg(&cache)
                .arg(format!("{PACKAGE}=={VERSION}")),
        )
        .with_context(|| format!("cannot download {PACKAGE} {VERSION} from PyPI"))?;
        if !sdist.exists() {
            bail!(
                "pip download did not leave {} (see its output above)",
                sdist.display()
            );
        }
    }
    let bytes = fs::metadata(&sdist)
        .with_context(|| format!("cannot stat {}", sdist.display()))?
        .len();
    Ok(Project { sdist, bytes })
}
