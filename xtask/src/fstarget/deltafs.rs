//! Drives the `deltafs` binary (package `deltafs`, `deltafs-kmod-shim/`) through its
//! command-line contract:
//!
//! ```text
//! deltafs mount --store DIR --base DIR MOUNTPOINT
//!   stdout: mounted <MOUNTPOINT>          once the mount is ready
//!   stdin, one command per line, one answer line each:
//!     freeze       -> frozen <id>
//!     switch <id>  -> switched <id>
//!     quit         -> unmounted            and exit 0 (SIGTERM also unmounts)
//! ```
//!
//! The daemon runs in its own process group, so a Ctrl-C in the terminal reaches xtask
//! (which then shuts it down in order) and not the daemon directly. Its stderr goes to a
//! log file that is kept for a post mortem.

use std::fs::File;
use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::util::{cargo, output, output_with_timeout, profile_dir, run_cmd, step};

/// How long the daemon may take to print `mounted`.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a freeze or a switch may take to be answered (they should take milliseconds).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `quit` or SIGTERM may take before the next, harder way.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether the DeltaFS targets can run, and with which binary.
#[derive(Debug)]
pub enum Binary {
    Available(PathBuf),
    /// Why not (the package has no `deltafs` binary yet).
    NotAvailable(String),
}

/// The `deltafs` binary: `explicit` if given, else built with `cargo build -p deltafs
/// --bin deltafs` once the package declares that binary. A binary that is declared but
/// does not build is an error, not "not available".
pub fn binary(explicit: Option<&Path>, release: bool) -> Result<Binary> {
    if let Some(path) = explicit {
        if !path.is_file() {
            bail!("--deltafs-bin {} is not a file", path.display());
        }
        return Ok(Binary::Available(path.to_owned()));
    }
    let metadata = output(cargo().args(["metadata", "--no-deps", "--format-version", "1"]))?;
    let metadata: serde_json::Value =
        serde_json::from_str(&metadata).context("cannot parse the output of `cargo metadata`")?;
    if !declares_binary(&metadata, "deltafs", "deltafs") {
        return Ok(Binary::NotAvailable(
            "the deltafs package (deltafs-kmod-shim/) has no `deltafs` binary yet (issue 4)"
                .to_owned(),
        ));
    }
    let mut build = cargo();
    build.args(["build", "--quiet", "-p", "deltafs", "--bin", "deltafs"]);
    if release {
        build.arg("--release");
    }
    step(format!(
        "building deltafs: cargo build -p deltafs --bin deltafs{}",
        if release { " --release" } else { "" }
    ));
    run_cmd(&mut build).context("the deltafs binary does not build")?;
    let path = profile_dir(release)?.join("deltafs");
    if is_placeholder(&path)? {
        return Ok(Binary::NotAvailable(format!(
            "{} is a placeholder: `deltafs mount --help` exits 0 without printing anything",
            path.display()
        )));
    }
    Ok(Binary::Available(path))
}

/// Whether the binary is still the placeholder committed before the daemon (`fn main()
/// {}`): `mount --help` exits 0 and prints nothing. Whatever implements the contract
/// prints a usage, or fails with a message.
fn is_placeholder(path: &Path) -> Result<bool> {
    let mut help = Command::new(path);
    help.args(["mount", "--help"]);
    let out = output_with_timeout(&mut help, Duration::from_secs(10))?;
    Ok(out.status.success() && out.stdout.is_empty() && out.stderr.is_empty())
}

/// Whether `cargo metadata` JSON lists a binary target `bin` in package `package`.
fn declares_binary(metadata: &serde_json::Value, package: &str, bin: &str) -> bool {
    let Some(packages) = metadata["packages"].as_array() else {
        return false;
    };
    packages
        .iter()
        .filter(|p| p["name"] == package)
        .filter_map(|p| p["targets"].as_array())
        .flatten()
        .any(|target| {
            target["name"] == bin
                && target["kind"]
                    .as_array()
                    .is_some_and(|kinds| kinds.iter().any(|kind| kind == "bin"))
        })
}

/// A running `deltafs mount`. Dropping it sends `quit`, then SIGTERM, then SIGKILL (by
/// pid), each after [`STOP_TIMEOUT`], and reaps it.
pub struct DeltaFs {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    /// Lines of the daemon's stdout, read by a thread; closed when it exits.
    lines: Receiver<String>,
    log: PathBuf,
}

impl DeltaFs {
    /// Starts `binary mount --store store --base base mountpoint` and waits for `mounted`.
    pub fn mount(
        binary: &Path,
        store: &Path,
        base: &Path,
        mountpoint: &Path,
        log: &Path,
    ) -> Result<Self> {
        let log_file =
            File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
        let mut cmd = Command::new(binary);
        cmd.arg("mount")
            .arg("--store")
            .arg(store)
            .arg("--base")
            .arg(base)
            .arg(mountpoint)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .process_group(0);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let stdout = child.stdout.take().context("no stdout pipe")?;
        let stdin = child.stdin.take();
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut daemon = Self {
            child: Some(child),
            stdin,
            lines,
            log: log.to_owned(),
        };
        let line = daemon.next_line(MOUNT_TIMEOUT, "mount")?;
        let mounted = reply_value(&line, "mounted").with_context(|| daemon.context("mount"))?;
        if Path::new(mounted) != mountpoint {
            bail!(
                "deltafs says it mounted {mounted}, not {}",
                mountpoint.display()
            );
        }
        Ok(daemon)
    }

    /// `freeze` → the frozen layer's id.
    pub fn freeze(&mut self) -> Result<String> {
        let line = self.request("freeze")?;
        Ok(reply_value(&line, "frozen")
            .with_context(|| self.context("freeze"))?
            .to_owned())
    }

    /// `switch <id>`.
    pub fn switch(&mut self, id: &str) -> Result<()> {
        let line = self.request(&format!("switch {id}"))?;
        let switched = reply_value(&line, "switched").with_context(|| self.context("switch"))?;
        if switched != id {
            bail!("asked deltafs to switch to {id}, it answered `{line}`");
        }
        Ok(())
    }

    /// `quit`: expects `unmounted` and exit status 0.
    pub fn quit(mut self) -> Result<()> {
        let line = self.request("quit")?;
        if line.trim() != "unmounted" {
            bail!("deltafs answered `{line}` to quit, not `unmounted`");
        }
        let mut child = self.child.take().context("deltafs was already stopped")?;
        let status = wait_timeout(&mut child, STOP_TIMEOUT)?;
        match status {
            Some(status) if status.success() => Ok(()),
            Some(status) => bail!("deltafs exited with {status} after quit"),
            None => {
                self.child = Some(child);
                bail!("deltafs did not exit within {STOP_TIMEOUT:?} of `unmounted`")
            }
        }
    }

    /// Sends one command line and returns the answer line.
    fn request(&mut self, command: &str) -> Result<String> {
        let stdin = self.stdin.as_mut().context("deltafs's stdin is closed")?;
        writeln!(stdin, "{command}")
            .and_then(|()| stdin.flush())
            .with_context(|| format!("cannot send `{command}` to deltafs (did it exit?)"))?;
        let verb = command.split(' ').next().unwrap_or(command);
        self.next_line(COMMAND_TIMEOUT, verb)
    }

    /// The next non-empty stdout line; fails when the daemon exits or times out.
    fn next_line(&mut self, timeout: Duration, what: &str) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.trim().is_empty() => continue,
                Ok(line) => return Ok(line),
                Err(RecvTimeoutError::Timeout) => {
                    bail!(
                        "deltafs did not answer {what} within {timeout:?}{}",
                        self.log_tail()
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.as_mut().and_then(|child| {
                        wait_timeout(child, Duration::from_secs(2)).ok().flatten()
                    });
                    let status = status.map_or("still running".to_owned(), |s| s.to_string());
                    bail!(
                        "deltafs closed its stdout during {what} ({status}){}",
                        self.log_tail()
                    )
                }
            }
        }
    }

    fn context(&self, what: &str) -> String {
        format!("unexpected answer of deltafs to {what}{}", self.log_tail())
    }

    /// `; the end of its log (PATH): …` with the last lines of the daemon's stderr.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(10)..].join("\n    ");
        if tail.is_empty() {
            format!("; its log {} is empty", self.log.display())
        } else {
            format!("; the end of its log {}:\n    {tail}", self.log.display())
        }
    }
}

impl Drop for DeltaFs {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        if let Some(mut stdin) = self.stdin.take() {
            let _ = writeln!(stdin, "quit").and_then(|()| stdin.flush());
            // Closing stdin is a second hint to stop.
            drop(stdin);
            if let Ok(Some(_)) = wait_timeout(&mut child, STOP_TIMEOUT) {
                return;
            }
        }
        let Ok(pid) = i32::try_from(child.id()) else {
            return;
        };
        // The child is not reaped yet, so the pid is still ours.
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        if let Ok(Some(_)) = wait_timeout(&mut child, STOP_TIMEOUT) {
            return;
        }
        eprintln!("warning: deltafs (pid {pid}) ignored quit and SIGTERM; killing it");
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Polls `child` until it exits or `timeout` passes.
fn wait_timeout(child: &mut Child, timeout: Duration) -> Result<Option<std::process::ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child
            .try_wait()
            .with_context(|| format!("cannot wait for process {}", child.id()))?
        {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// `frozen 42` with `word` `frozen` → `42`; anything else is an error that quotes it.
fn reply_value<'a>(line: &'a str, word: &str) -> Result<&'a str> {
    let line = line.trim();
    match line.split_once(' ') {
        Some((first, value)) if first == word && !value.trim().is_empty() => Ok(value.trim()),
        _ => bail!("expected `{word} <value>`, got `{line}`"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_value_of_an_answer() {
        assert_eq!(reply_value("frozen 42", "frozen").unwrap(), "42");
        assert_eq!(
            reply_value("  switched 0190a3c4-7e1f \n", "switched").unwrap(),
            "0190a3c4-7e1f"
        );
        assert_eq!(
            reply_value("mounted /a b/mnt", "mounted").unwrap(),
            "/a b/mnt"
        );
        let err = reply_value("error: no such layer", "switched").unwrap_err();
        assert_eq!(
            err.to_string(),
            "expected `switched <value>`, got `error: no such layer`"
        );
        assert!(reply_value("frozen", "frozen").is_err());
        assert!(reply_value("frozen ", "frozen").is_err());
        assert!(reply_value("switched 1", "frozen").is_err());
    }

    #[test]
    fn finds_a_binary_target_in_cargo_metadata() {
        let metadata: serde_json::Value = serde_json::from_str(
            r#"{"packages": [
                {"name": "deltafs", "targets": [
                    {"name": "deltafs", "kind": ["lib"]},
                    {"name": "deltafs-probe", "kind": ["bin"]}]},
                {"name": "other", "targets": [{"name": "deltafs", "kind": ["bin"]}]}
            ]}"#,
        )
        .unwrap();
        assert!(!declares_binary(&metadata, "deltafs", "deltafs"));
        assert!(declares_binary(&metadata, "deltafs", "deltafs-probe"));
        assert!(declares_binary(&metadata, "other", "deltafs"));
        assert!(!declares_binary(
            &serde_json::Value::Null,
            "deltafs",
            "deltafs"
        ));
    }
}
