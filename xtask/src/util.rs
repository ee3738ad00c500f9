//! Helpers shared by the tasks: the workspace's paths, running commands, progress lines.

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{OnceLock, mpsc};
use std::thread;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use nix::mount::{MntFlags, umount2};

use crate::cgroup::MountInfoEntry;
use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, mkdtemp};

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
}

/// Cargo's target directory for this workspace, as `cargo metadata` reports it (it honours
/// `CARGO_TARGET_DIR` and `build.target-dir`).
pub fn target_dir() -> Result<&'static Path> {
    static TARGET_DIR: OnceLock<PathBuf> = OnceLock::new();
    if let Some(dir) = TARGET_DIR.get() {
        return Ok(dir);
    }
    let stdout = output(cargo().args(["metadata", "--no-deps", "--format-version", "1"]))?;
    let metadata: serde_json::Value =
        serde_json::from_str(&stdout).context("cannot parse the output of `cargo metadata`")?;
    let dir = metadata["target_directory"]
        .as_str()
        .context("`cargo metadata` reports no target_directory")?;
    Ok(TARGET_DIR.get_or_init(|| PathBuf::from(dir)))
}

/// `target/debug` or `target/release`.
pub fn profile_dir(release: bool) -> Result<PathBuf> {
    Ok(target_dir()?.join(if release { "release" } else { "debug" }))
}

/// A `cargo` command (the rustup proxy on `PATH`, so `+nightly` works) run at the
/// workspace root.
pub fn cargo() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root());
    cmd
}

/// Prints a progress line for a step that takes a while.
pub fn step(message: impl AsRef<str>) {
    println!("==> {}", message.as_ref());
}

/// The command line of `cmd`, for messages.
pub fn display(cmd: &Command) -> String {
    let mut line = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        line.push(' ');
        line.push_str(&quote(arg));
    }
    line
}

fn quote(arg: &OsStr) -> String {
    let arg = arg.to_string_lossy();
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./:=,+@%".contains(c);
    if !arg.is_empty() && arg.chars().all(plain) {
        arg.into_owned()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// Runs `cmd` with inherited stdio; fails, naming the command, unless it exits 0.
pub fn run_cmd(cmd: &mut Command) -> Result<()> {
    let line = display(cmd);
    let status = cmd
        .status()
        .with_context(|| format!("cannot start `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// Runs `cmd` and returns its stdout; fails with its stderr unless it exits 0.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = raw_output(cmd)?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            display(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("`{}` printed non-UTF-8", display(cmd)))
}

/// Runs `cmd` with stdin closed and captures its output, whatever its exit status.
pub fn raw_output(cmd: &mut Command) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start `{}`", display(cmd)))
}

/// Like [`raw_output`], but kills the command (SIGKILL, by pid) if it runs longer than
/// `timeout`.
pub fn output_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let line = display(cmd);
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start `{line}`"))?;
    let pid = Pid::from_raw(i32::try_from(child.id()).context("pid out of range")?);
    let (tx, rx) = mpsc::channel();
    let waiter = thread::spawn(move || {
        // The receiver only goes away after a timeout, when the result no longer matters.
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(result) => {
            let _ = waiter.join();
            result.with_context(|| format!("cannot wait for `{line}`"))
        }
        Err(_) => {
            // The child is not reaped yet (the waiter holds it), so the pid is still ours.
            let _ = kill(pid, Signal::SIGKILL);
            let _ = waiter.join();
            bail!("`{line}` did not finish within {timeout:?} and was killed")
        }
    }
}

/// A child process that is killed (SIGKILL, by pid) and reaped when dropped, unless it
/// was waited for.
#[derive(Debug)]
pub struct ChildGuard(Option<Child>);

impl ChildGuard {
    pub fn new(child: Child) -> Self {
        Self(Some(child))
    }

    /// Whether the child has exited (then it is reaped and its status returned).
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        let child = self
            .0
            .as_mut()
            .context("the child was already waited for")?;
        child
            .try_wait()
            .with_context(|| format!("cannot wait for process {}", child.id()))
    }

    /// The child's pid, while it has not been waited for.
    pub fn pid(&self) -> Option<u32> {
        self.0.as_ref().map(Child::id)
    }

    /// Waits for the child to exit.
    pub fn wait(&mut self) -> Result<ExitStatus> {
        let mut child = self.0.take().context("the child was already waited for")?;
        child
            .wait()
            .with_context(|| format!("cannot wait for process {}", child.id()))
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            // Best effort: it may have exited already.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A directory created with `mkdtemp` under `base`, removed with its content when
/// dropped (or by [`TempDir::remove`], which reports failure).
#[derive(Debug)]
pub struct TempDir(Option<PathBuf>);

impl TempDir {
    pub fn new(base: &Path, prefix: &str) -> Result<Self> {
        fs::create_dir_all(base).with_context(|| format!("cannot create {}", base.display()))?;
        let path = mkdtemp(&base.join(format!("{prefix}XXXXXX"))).with_context(|| {
            format!("cannot create a temporary directory in {}", base.display())
        })?;
        Ok(Self(Some(path)))
    }

    pub fn path(&self) -> &Path {
        self.0
            .as_deref()
            .expect("the directory is only taken by remove(self)")
    }

    pub fn remove(mut self) -> Result<()> {
        let path = self
            .0
            .take()
            .expect("the directory is only taken by remove(self)");
        remove_unmounted(&path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            // Best effort while unwinding or on an early return.
            let _ = remove_unmounted(&path);
        }
    }
}

/// Removes `path` recursively, but never through a mount: what a killed daemon left
/// mounted below it (a sandbox view, read-only binds of the host's `/usr` and `/etc`)
/// is lazily unmounted first, and if anything is still mounted nothing is removed.
fn remove_unmounted(path: &Path) -> Result<()> {
    unmount_under(path)?;
    if has_mounts_under(path) {
        bail!(
            "not removing {}: something is still mounted below it",
            path.display()
        );
    }
    fs::remove_dir_all(path).with_context(|| format!("cannot remove {}", path.display()))
}

/// Lazily unmounts everything mounted at or below `dir`, deepest first; returns how many.
pub fn unmount_under(dir: &Path) -> Result<usize> {
    let mountinfo =
        fs::read_to_string("/proc/self/mountinfo").context("cannot read /proc/self/mountinfo")?;
    let mut points: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(MountInfoEntry::parse)
        .map(|e| PathBuf::from(e.mount_point))
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points.dedup();
    for point in &points {
        // Detach: a mount still busy (a process not reaped yet) goes when it is released.
        match umount2(point, MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => {}
            Err(e) => {
                return Err(e).with_context(|| format!("cannot unmount {}", point.display()));
            }
        }
    }
    Ok(points.len())
}

/// Whether anything is still mounted at or below `dir`.
pub fn has_mounts_under(dir: &Path) -> bool {
    fs::read_to_string("/proc/self/mountinfo")
        .map(|text| {
            text.lines()
                .filter_map(MountInfoEntry::parse)
                .any(|e| Path::new(&e.mount_point).starts_with(dir))
        })
        // Unknown: assume there are, so that nothing is removed recursively.
        .unwrap_or(true)
}

/// `1.2 s`, `340 ms`.
pub fn human_duration(duration: Duration) -> String {
    if duration >= Duration::from_secs(1) {
        format!("{:.1} s", duration.as_secs_f64())
    } else {
        format!("{} ms", duration.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_quotes_only_what_needs_it() {
        let mut cmd = Command::new("cargo");
        cmd.args([
            "test",
            "-p",
            "deltabox-tests",
            "--",
            "--test-threads=2",
            "a b",
            "it's",
        ]);
        assert_eq!(
            display(&cmd),
            r"cargo test -p deltabox-tests -- --test-threads=2 'a b' 'it'\''s'"
        );
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(human_duration(Duration::from_millis(340)), "340 ms");
        assert_eq!(human_duration(Duration::from_millis(1234)), "1.2 s");
    }

    #[test]
    fn workspace_root_holds_the_workspace_manifest() {
        assert!(workspace_root().join("Cargo.toml").is_file());
        assert!(workspace_root().join("xtask").is_dir());
    }
}
