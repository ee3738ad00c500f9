//! The demo's daemon (`deltaboxd serve`, stopped with SIGTERM when dropped) and its CLI
//! (`deltabox --socket … <command> --json`, parsed with serde_json).

use std::ffi::OsStr;
use std::fs::{self, File};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::signals::check_interrupted;
use crate::util::{display, raw_output};

/// Where the demo's daemon keeps sandboxes: its own directories and cgroup, so that it
/// never touches a deltaboxd already running.
pub struct SandboxDirs {
    /// `--data-dir` (DeltaFS layers and the tree database; on the reflink store).
    pub data_dir: PathBuf,
    /// `--run-dir`.
    pub run_dir: PathBuf,
    /// `--sandbox-cgroup`.
    pub cgroup: PathBuf,
}

/// A running `deltaboxd serve`. Dropping it sends SIGTERM (by pid) and waits, then
/// SIGKILL if it does not exit in time.
pub struct Daemon {
    child: Option<Child>,
    socket: PathBuf,
    log: PathBuf,
}

impl Daemon {
    /// Starts `deltaboxd serve` with its API socket and log in `dir` and its programs
    /// pinned in `pin_dir`, and waits until the socket accepts connections.
    pub fn start(
        deltaboxd: &Path,
        dir: &Path,
        pin_dir: &Path,
        sandboxes: &SandboxDirs,
        timeout: Duration,
    ) -> Result<Self> {
        let socket = dir.join("api.sock");
        let log = dir.join("deltaboxd.log");
        let metrics_addr = format!("127.0.0.1:{}", free_port()?);
        let log_file =
            File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let log_err = log_file
            .try_clone()
            .with_context(|| format!("cannot duplicate {}", log.display()))?;
        let mut cmd = Command::new(deltaboxd);
        cmd.arg("serve")
            .arg("--socket")
            .arg(&socket)
            .args(["--metrics-addr", &metrics_addr])
            // Its own pin directory, unloaded at exit: the demo neither adopts nor disturbs
            // the programs of a deltaboxd already running, and leaves nothing pinned.
            .arg("--pin-dir")
            .arg(pin_dir)
            .arg("--unload-on-exit")
            .arg("--data-dir")
            .arg(&sandboxes.data_dir)
            .arg("--run-dir")
            .arg(&sandboxes.run_dir)
            .arg("--sandbox-cgroup")
            .arg(&sandboxes.cgroup)
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err)
            // Its own process group: a Ctrl-C in the terminal reaches the demo only, which
            // then unwatches and stops the daemon in order.
            .process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start `{}`", display(&cmd)))?;
        let mut daemon = Self {
            child: Some(child),
            socket,
            log,
        };
        daemon.wait_ready(timeout)?;
        Ok(daemon)
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if UnixStream::connect(&self.socket).is_ok() {
                return Ok(());
            }
            let child = self
                .child
                .as_mut()
                .context("the daemon was already stopped")?;
            if let Some(status) = child.try_wait().context("cannot poll deltaboxd")? {
                self.child = None;
                bail!(
                    "deltaboxd exited before its socket was ready ({status}); its log:\n{}",
                    self.log_text()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "deltaboxd's socket {} is not ready after {timeout:?}; its log:\n{}",
                    self.socket.display(),
                    self.log_text()
                );
            }
            check_interrupted()?;
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log)
            .unwrap_or_else(|e| format!("(cannot read {}: {e})", self.log.display()))
    }

    /// Sends SIGTERM and waits up to 10 s, then SIGKILL. Returns how it ended.
    pub fn stop(&mut self) -> Result<String> {
        let Some(mut child) = self.child.take() else {
            return Ok("already stopped".to_owned());
        };
        let pid = Pid::from_raw(i32::try_from(child.id()).context("pid out of range")?);
        // The child is not reaped until we wait for it, so the pid is still ours.
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().context("cannot poll deltaboxd")? {
                return Ok(format!("stopped by SIGTERM ({status})"));
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let status = child.wait().context("cannot wait for deltaboxd")?;
                return Ok(format!(
                    "did not stop on SIGTERM within 10 s, killed ({status})"
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Err(err) = self.stop() {
            eprintln!("warning: {err:#}");
        }
    }
}

/// A loopback TCP port nobody listens on right now.
fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("cannot bind a loopback port")?;
    Ok(listener
        .local_addr()
        .context("cannot read the bound address")?
        .port())
}

/// `deltabox`, the daemon's CLI, pointed at the demo daemon's socket.
pub struct Cli {
    binary: PathBuf,
    socket: PathBuf,
}

/// `watch`, `unwatch` and `epoch --json`.
#[derive(Debug, Deserialize)]
pub struct Watched {
    pub path: String,
    pub id: u64,
    pub epoch: u64,
}

/// One row of `inode-stats --json`.
#[derive(Debug, Deserialize)]
pub struct InodeStat {
    pub cgroup_id: u64,
    pub ino: u64,
    pub epoch: u64,
    pub name: String,
    pub writes: u64,
    pub bytes: u64,
    pub pages_dirtied: u64,
}

#[derive(Debug, Deserialize)]
struct InodeStats {
    stats: Vec<InodeStat>,
}

/// The parts of `status --json` the demo prints.
#[derive(Debug, Deserialize)]
pub struct Status {
    pub version: String,
    pub pid: u32,
    pub metrics_addr: String,
    pub bpf: BpfStatus,
}

#[derive(Debug, Deserialize)]
pub struct BpfStatus {
    pub pin_dir: PathBuf,
    pub programs: Vec<serde_json::Value>,
}

impl Cli {
    pub fn new(binary: PathBuf, socket: &Path) -> Self {
        Self {
            binary,
            socket: socket.to_owned(),
        }
    }

    pub fn status(&self) -> Result<Status> {
        self.json(&["status".as_ref()])
    }

    pub fn watch(&self, cgroup: &Path) -> Result<Watched> {
        self.json(&["watch".as_ref(), cgroup.as_os_str()])
    }

    pub fn unwatch(&self, cgroup: &Path) -> Result<Watched> {
        self.json(&["unwatch".as_ref(), cgroup.as_os_str()])
    }

    pub fn epoch(&self, cgroup: &Path) -> Result<Watched> {
        self.json(&["epoch".as_ref(), cgroup.as_os_str()])
    }

    pub fn inode_stats(&self, cgroup: &Path) -> Result<Vec<InodeStat>> {
        let stats: InodeStats = self.json(&[
            "inode-stats".as_ref(),
            "--cgroup".as_ref(),
            cgroup.as_os_str(),
        ])?;
        Ok(stats.stats)
    }

    /// Runs `deltabox --socket S <args> --json` and returns the JSON it prints
    /// (`--json` goes before a `--`, after which the words are a command's).
    pub fn value(&self, args: &[&str]) -> Result<serde_json::Value> {
        let os: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
        self.json(&os)
    }

    /// Runs `deltabox --socket S <args> --json` and parses what it prints.
    fn json<T: DeserializeOwned>(&self, args: &[&OsStr]) -> Result<T> {
        let at = args.iter().position(|a| *a == "--").unwrap_or(args.len());
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--socket")
            .arg(&self.socket)
            .args(&args[..at])
            .arg("--json")
            .args(&args[at..]);
        let line = display(&cmd);
        let out = raw_output(&mut cmd)?;
        if !out.status.success() {
            bail!(
                "`{line}` failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "cannot parse the output of `{line}`: {}",
                String::from_utf8_lossy(&out.stdout).trim()
            )
        })
    }
}

/// A watched cgroup, unwatched when dropped.
pub struct Watch<'a> {
    cli: &'a Cli,
    cgroup: PathBuf,
    active: bool,
}

impl<'a> Watch<'a> {
    pub fn start(cli: &'a Cli, cgroup: &Path) -> Result<(Self, Watched)> {
        let watched = cli.watch(cgroup)?;
        Ok((
            Self {
                cli,
                cgroup: cgroup.to_owned(),
                active: true,
            },
            watched,
        ))
    }

    /// Unwatches, reporting failure.
    pub fn stop(&mut self) -> Result<()> {
        if !std::mem::take(&mut self.active) {
            return Ok(());
        }
        self.cli.unwatch(&self.cgroup).map(drop)
    }
}

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        if let Err(err) = self.stop() {
            eprintln!("warning: {err:#}");
        }
    }
}
