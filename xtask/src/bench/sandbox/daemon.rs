//! The bench's own `deltaboxd serve`: its socket, log and run directory in a temporary
//! directory, its programs pinned in a directory of its own (unloaded at exit), its
//! sandbox data on the reflink store and its sandboxes under a cgroup of its own, so it
//! never touches a deltaboxd already running. Dropping it stops it (SIGTERM by pid, then
//! SIGKILL) and removes what it leaves ([`super::cleanup`]): processes in its cgroup,
//! mounts under its run directory, its cgroups and files.

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

use nix::unistd::mkdtemp;

use super::cleanup;
use crate::cgroup::cgroup2_mount;
use crate::setup::BPFFS;
use crate::signals::check_interrupted;
use crate::util::display;

/// Where the sandbox data goes: the reflink store `cargo xtask setup` mounts.
const DATA_ROOT: &str = "/var/lib/deltabox/store";

/// A running `deltaboxd serve` and everything it was given.
pub struct Daemon {
    child: Option<Child>,
    socket: PathBuf,
    log: PathBuf,
    /// `--pin-dir`: unpinned by the daemon at exit, removed here if it was killed.
    pin_dir: PathBuf,
    cgroup_mount: PathBuf,
    /// The `--sandbox-cgroup`'s name under the cgroup2 root.
    cgroup_name: String,
    /// Plain paths, not `TempDir`s: they are removed only once nothing is mounted below
    /// them (the run directory holds bind mounts of the host's `/usr` and `/etc`).
    data_dir: Option<PathBuf>,
    run_dir: Option<PathBuf>,
}

/// A new directory `base/<prefix>XXXXXX`.
fn temp_dir(base: &Path, prefix: &str) -> Result<PathBuf> {
    fs::create_dir_all(base).with_context(|| format!("cannot create {}", base.display()))?;
    mkdtemp(&base.join(format!("{prefix}XXXXXX")))
        .with_context(|| format!("cannot create a temporary directory in {}", base.display()))
}

impl Daemon {
    /// Starts the daemon and waits until its socket accepts connections.
    pub fn start(deltaboxd: &Path, timeout: Duration) -> Result<Self> {
        let pid = std::process::id();
        let cgroup_mount = cgroup2_mount()?;
        let cgroup_name = format!("deltabox-bench-{pid}-trees");
        let cgroup = cgroup_mount.join(&cgroup_name);
        let run_dir = temp_dir(&std::env::temp_dir(), "deltabox-bench-")?;
        let data_dir = match temp_dir(Path::new(DATA_ROOT), &format!("bench-{pid}-")) {
            Ok(dir) => dir,
            Err(err) => {
                let _ = fs::remove_dir(&run_dir);
                return Err(err);
            }
        };
        let socket = run_dir.join("api.sock");
        let log = run_dir.join("deltaboxd.log");
        let pin_dir = Path::new(BPFFS).join(format!("deltabox-bench-{pid}"));
        let log_file =
            File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let log_err = log_file
            .try_clone()
            .with_context(|| format!("cannot duplicate {}", log.display()))?;
        let mut cmd = Command::new(deltaboxd);
        cmd.arg("serve")
            .arg("--socket")
            .arg(&socket)
            .args(["--metrics-addr", &format!("127.0.0.1:{}", free_port()?)])
            .arg("--pin-dir")
            .arg(&pin_dir)
            .arg("--unload-on-exit")
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--run-dir")
            .arg(run_dir.join("run"))
            .arg("--sandbox-cgroup")
            .arg(&cgroup)
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err)
            // Its own process group: Ctrl-C reaches the bench only, which then removes
            // the sandboxes and stops the daemon in order.
            .process_group(0);
        let mut daemon = Self {
            child: None,
            socket,
            log,
            pin_dir,
            cgroup_mount,
            cgroup_name,
            data_dir: Some(data_dir),
            run_dir: Some(run_dir),
        };
        // Spawned once the guard exists, so that its directories go on any failure.
        daemon.child = Some(
            cmd.spawn()
                .with_context(|| format!("cannot start `{}`", display(&cmd)))?,
        );
        daemon.wait_ready(timeout)?;
        Ok(daemon)
    }

    /// The API socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The daemon's pid while it runs.
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

    /// The daemon's log so far (for error messages).
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log)
            .unwrap_or_else(|e| format!("(cannot read {}: {e})", self.log.display()))
    }

    /// Sends SIGTERM and waits up to 10 s, then SIGKILL. Returns how it ended.
    fn stop(&mut self) -> Result<String> {
        let Some(mut child) = self.child.take() else {
            return Ok("already stopped".to_owned());
        };
        let pid = Pid::from_raw(i32::try_from(child.id()).context("pid out of range")?);
        // Not reaped until we wait for it, so the pid is still this child's.
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

    /// Stops the daemon and removes its cgroup, data and run directories; reports each
    /// step, and the first failure.
    pub fn shut_down(mut self) -> Result<()> {
        let pid = self.pid().unwrap_or_default();
        let how = self.stop()?;
        println!("  deltaboxd (pid {pid}) {how}");
        self.remove_files()
    }

    /// Removes what the daemon left: processes in its cgroup, mounts under its run
    /// directory, its cgroup (and v1 mirrors), then its directories. Tries every step;
    /// returns the first failure.
    fn remove_files(&mut self) -> Result<()> {
        let mut first: Option<anyhow::Error> = None;
        let mut note = |r: Result<()>| {
            if let Err(e) = r {
                first.get_or_insert(e);
            }
        };
        let cgroup = self.cgroup_mount.join(&self.cgroup_name);
        note(cleanup::kill_cgroup_tree(&cgroup));
        if let Some(run_dir) = &self.run_dir {
            match crate::util::unmount_under(run_dir) {
                Ok(0) => {}
                Ok(n) => println!(
                    "  unmounted {n} mounts the daemon left under {}",
                    run_dir.display()
                ),
                Err(e) => note(Err(e)),
            }
        }
        if cgroup.exists() {
            note(cleanup::remove_cgroup_tree(&cgroup));
            println!("  removed cgroup {}", cgroup.display());
        }
        for mirror in cleanup::v1_mirrors(&self.cgroup_mount, &self.cgroup_name) {
            note(cleanup::remove_cgroup_tree(&mirror));
        }
        if self.pin_dir.exists() && self.child.is_none() {
            // Files in bpffs: removing them unpins the programs and maps.
            note(
                fs::remove_dir_all(&self.pin_dir)
                    .with_context(|| format!("cannot remove {}", self.pin_dir.display())),
            );
        }
        for dir in [self.data_dir.take(), self.run_dir.take()]
            .into_iter()
            .flatten()
        {
            if crate::util::has_mounts_under(&dir) {
                note(Err(anyhow::anyhow!(
                    "{} still has mounts below it; left in place",
                    dir.display()
                )));
                continue;
            }
            match fs::remove_dir_all(&dir) {
                Ok(()) => println!("  removed {}", dir.display()),
                Err(e) => note(Err(e).with_context(|| format!("cannot remove {}", dir.display()))),
            }
        }
        first.map_or(Ok(()), Err)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Err(err) = self.stop() {
            eprintln!("warning: {err:#}");
        }
        if let Err(err) = self.remove_files() {
            eprintln!("warning: {err:#}");
        }
    }
}

/// A loopback TCP port nobody listens on right now (for the daemon's `/metrics`).
fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("cannot bind a loopback port")?;
    Ok(listener
        .local_addr()
        .context("cannot read the bound address")?
        .port())
}
