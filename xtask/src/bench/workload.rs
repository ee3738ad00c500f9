//! The inputs of the filesystem benchmark, made once and cached under cargo's target
//! directory (no network), and the timed operations themselves.
//!
//! - **The Python tree**: a tarball of this machine's CPython standard library (with its
//!   `__pycache__` directories, without `site-packages`): several thousand files.
//! - **The wheels**: `/opt/wheels/*.whl` when there are any; otherwise the wheels CPython
//!   bundles for `ensurepip` (pip and setuptools), copied next to the tarball.

use std::fs::{self, File};
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use crate::util::{display, output, run_cmd, step};

/// Where the benchmark's cached inputs go, under the target directory.
const CACHE: &str = "bench-inputs";

/// Wheels the machine may provide.
const OPT_WHEELS: &str = "/opt/wheels";

/// The untar input.
#[derive(Debug)]
pub struct Tree {
    pub tarball: PathBuf,
    /// The directory the tarball extracts to (its single top-level entry).
    pub top: String,
    pub files: u64,
    pub bytes: u64,
    /// Where it was made from.
    pub source: PathBuf,
}

/// The pip input.
#[derive(Debug)]
pub struct Wheels {
    pub dir: PathBuf,
    /// Distribution names, from the wheel file names.
    pub packages: Vec<String>,
    /// Where they came from, for the report.
    pub origin: String,
}

/// The real interpreter behind `python3` (not a pyenv shim, whose start-up would be
/// timed too).
pub fn python() -> Result<PathBuf> {
    let path = output(Command::new("python3").args(["-c", "import sys; print(sys.executable)"]))
        .context("python3 is needed for the Python tree and for pip")?;
    Ok(PathBuf::from(path.trim()))
}

/// The tarball of the CPython standard library, made on first use.
pub fn tree(cache_root: &Path, python: &Path) -> Result<Tree> {
    let stdlib = output(Command::new(python).args([
        "-c",
        "import sysconfig; print(sysconfig.get_paths()['stdlib'])",
    ]))?;
    let source = PathBuf::from(stdlib.trim());
    let parent = source
        .parent()
        .with_context(|| format!("{} has no parent", source.display()))?;
    let top = source
        .file_name()
        .and_then(|name| name.to_str())
        .with_context(|| format!("{} has no UTF-8 name", source.display()))?
        .to_owned();
    let cache = cache_root.join(CACHE);
    fs::create_dir_all(&cache).with_context(|| format!("cannot create {}", cache.display()))?;
    let tarball = cache.join(format!("{top}-stdlib.tar"));
    if !tarball.exists() {
        step(format!(
            "making {} from {} (once)",
            tarball.display(),
            source.display()
        ));
        let partial = tarball.with_extension("tar.partial");
        run_cmd(
            Command::new("tar")
                .arg("-cf")
                .arg(&partial)
                .arg("--exclude=site-packages")
                .arg("-C")
                .arg(parent)
                .arg(&top),
        )?;
        fs::rename(&partial, &tarball)
            .with_context(|| format!("cannot rename {}", partial.display()))?;
    }
    let listing = output(Command::new("tar").arg("-tvf").arg(&tarball))?;
    let (files, bytes) = count_listing(&listing);
    Ok(Tree {
        tarball,
        top,
        files,
        bytes,
        source,
    })
}

/// Regular files and their bytes in `tar -tv` output (`-rw-r--r-- root/root 1234 …`).
fn count_listing(listing: &str) -> (u64, u64) {
    listing
        .lines()
        .filter(|line| line.starts_with('-'))
        .filter_map(|line| line.split_whitespace().nth(2)?.parse::<u64>().ok())
        .fold((0, 0), |(files, bytes), size| (files + 1, bytes + size))
}

/// The wheels to install: `/opt/wheels` if it has any, else `ensurepip`'s bundled ones.
pub fn wheels(cache_root: &Path, python: &Path) -> Result<Wheels> {
    let opt = Path::new(OPT_WHEELS);
    let found = wheel_files(opt);
    if !found.is_empty() {
        return Ok(Wheels {
            dir: opt.to_owned(),
            packages: package_names(&found),
            origin: format!("{OPT_WHEELS} ({} wheels)", found.len()),
        });
    }
    let bundled = output(Command::new(python).args([
        "-c",
        "import ensurepip, os; print(os.path.join(os.path.dirname(ensurepip.__file__), \
         '_bundled'))",
    ]))?;
    let bundled = PathBuf::from(bundled.trim());
    let files = wheel_files(&bundled);
    if files.is_empty() {
        bail!(
            "no wheels in {OPT_WHEELS} nor in {} (ensurepip's): nothing for pip to install",
            bundled.display()
        );
    }
    let dir = cache_root.join(CACHE).join("wheels");
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for file in &files {
        let target = dir.join(file.file_name().context("a wheel without a name")?);
        if !target.exists() {
            fs::copy(file, &target)
                .with_context(|| format!("cannot copy {} to {}", file.display(), dir.display()))?;
        }
    }
    let names: Vec<String> = files
        .iter()
        .filter_map(|f| Some(f.file_name()?.to_string_lossy().into_owned()))
        .collect();
    Ok(Wheels {
        dir,
        packages: package_names(&files),
        origin: format!(
            "{OPT_WHEELS} is empty here, so CPython's bundled ensurepip wheels: {}",
            names.join(", ")
        ),
    })
}

fn wheel_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|entry| Some(entry.ok()?.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "whl"))
        .collect();
    files.sort();
    files
}

/// `pip-23.2.1-py3-none-any.whl` → `pip`; one name per distribution.
fn package_names(files: &[PathBuf]) -> Vec<String> {
    let mut names: Vec<String> = files
        .iter()
        .filter_map(|file| {
            let name = file.file_name()?.to_str()?;
            Some(name.split('-').next()?.to_owned())
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Runs `cmd` with its output discarded and returns how long it took.
fn timed(cmd: &mut Command) -> Result<Duration> {
    cmd.stdin(Stdio::null()).stdout(Stdio::null());
    let start = Instant::now();
    run_cmd(cmd)?;
    Ok(start.elapsed())
}

/// Flushes dirty data, so that what an earlier step wrote is not written back during the
/// next one.
pub fn sync() -> Result<()> {
    run_cmd(&mut Command::new("sync"))
}

/// `sync`, then drops the page cache, dentries and inodes.
pub fn drop_caches() -> Result<()> {
    sync()?;
    fs::write("/proc/sys/vm/drop_caches", "3").context("cannot write /proc/sys/vm/drop_caches")
}

/// Reads `path` once (not timed), so that every untar reads its tarball from the page
/// cache: the caches are dropped before each sequential read.
pub fn warm(path: &Path) -> Result<()> {
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    std::io::copy(&mut file, &mut std::io::sink())
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(())
}

/// `tar -xf <tarball> -C <dir>`.
pub fn untar(tree: &Tree, dir: &Path) -> Result<Duration> {
    timed(
        Command::new("tar")
            .arg("-xf")
            .arg(&tree.tarball)
            .arg("-C")
            .arg(dir),
    )
}

/// `find <dir> -exec stat --format=%s {} +` over the extracted tree (warm).
pub fn find_stat(dir: &Path) -> Result<Duration> {
    timed(
        Command::new("find")
            .arg(dir)
            .args(["-exec", "stat", "--format=%s", "{}", "+"]),
    )
}

/// `git init` (not timed), then `git add -A && git commit` timed, with no user or
/// system configuration (no hooks, no signing, no automatic gc).
pub fn git_commit(dir: &Path) -> Result<Duration> {
    let git = |args: &[&str]| {
        let mut cmd = Command::new("git");
        cmd.current_dir(dir)
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .args(["-c", "user.name=bench", "-c", "user.email=bench@localhost"])
            .args(["-c", "gc.auto=0", "-c", "commit.gpgsign=false"])
            .args(args);
        cmd
    };
    run_cmd(git(&["init", "-q"]).stdout(Stdio::null()))?;
    let start = Instant::now();
    run_cmd(git(&["add", "-A"]).stdout(Stdio::null()))?;
    run_cmd(git(&["commit", "-q", "-m", "bench"]).stdout(Stdio::null()))?;
    Ok(start.elapsed())
}

/// `python -m pip install --no-index --find-links <wheels> --target <dir> <packages>`.
pub fn pip_install(python: &Path, wheels: &Wheels, dir: &Path) -> Result<Duration> {
    let mut cmd = Command::new(python);
    cmd.args(["-m", "pip", "install", "--quiet", "--no-index"])
        .args(["--disable-pip-version-check", "--no-cache-dir"])
        .arg("--root-user-action=ignore")
        .arg("--find-links")
        .arg(&wheels.dir)
        .arg("--target")
        .arg(dir)
        .args(&wheels.packages)
        .env("PIP_CONFIG_FILE", "/dev/null");
    timed(&mut cmd).with_context(|| format!("pip install failed: `{}`", display(&cmd)))
}

/// Writes `bytes` to a new file in 1 MiB writes, then `fsync`; timed with the fsync.
pub fn seq_write(path: &Path, bytes: u64) -> Result<Duration> {
    let chunk: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    let start = Instant::now();
    let mut file =
        File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        file.write_all(&chunk[..n])
            .with_context(|| format!("cannot write {}", path.display()))?;
        left -= n as u64;
    }
    file.sync_all()
        .with_context(|| format!("cannot fsync {}", path.display()))?;
    Ok(start.elapsed())
}

/// Reads the whole file in 1 MiB reads (after [`drop_caches`]: cold); checks its size.
pub fn seq_read(path: &Path, bytes: u64) -> Result<Duration> {
    let mut buf = vec![0u8; 1 << 20];
    let start = Instant::now();
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut total = 0u64;
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    let elapsed = start.elapsed();
    if total != bytes {
        bail!(
            "read {total} bytes back from {}, wrote {bytes}",
            path.display()
        );
    }
    Ok(elapsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_regular_files_in_a_tar_listing() {
        let listing = "\
drwxr-xr-x root/root         0 2024-01-01 00:00 python3.11/
-rw-r--r-- root/root      1234 2024-01-01 00:00 python3.11/os.py
lrwxrwxrwx root/root         0 2024-01-01 00:00 python3.11/link -> os.py
-rw-r--r-- root/root       100 2024-01-01 00:00 python3.11/with space.py
";
        assert_eq!(count_listing(listing), (2, 1334));
    }

    #[test]
    fn names_packages_after_their_wheels() {
        let files = [
            PathBuf::from("/w/pip-23.2.1-py3-none-any.whl"),
            PathBuf::from("/w/setuptools-65.5.0-py3-none-any.whl"),
            PathBuf::from("/w/pip-24.0-py3-none-any.whl"),
        ];
        assert_eq!(package_names(&files), ["pip", "setuptools"]);
    }
}
