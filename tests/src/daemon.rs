//! `deltaboxd` started for one test, and the `deltabox` CLI pointed at it. Dropping
//! the guard stops the daemon by pid (SIGTERM, then SIGKILL), removes its socket
//! directory and unloads its pin directory, whatever the test did.

use deltabox_controller::cgroup::CgroupFs;
use deltabox_controller::sandbox::manager::leftovers;
use std::{
    fs,
    io::{Read as _, Write as _},
    net::TcpListener,
    os::unix::{net::UnixStream, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

/// The directory holding the workspace's built binaries (`target/<profile>`), next to
/// this test executable's `deps/` directory.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("test executable under target/<profile>/deps")
        .to_path_buf()
}

/// Path of a built binary of the workspace, failing clearly when it was not built.
pub fn binary(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build` first (`cargo xtask test` does)",
        path.display()
    );
    path
}

/// A loopback TCP port free right now (for `--metrics-addr`).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// A running `deltaboxd serve`.
pub struct TestDaemon {
    child: Option<Child>,
    dir: PathBuf,
    socket: PathBuf,
    pin_dir: PathBuf,
    metrics_port: u16,
    data_dir: PathBuf,
    sandbox_cgroup: PathBuf,
}

/// Where test daemons keep sandbox data: on the reflink store `cargo xtask setup` mounts.
const TEST_DATA_ROOT: &str = "/var/lib/deltabox/store/tests";

impl TestDaemon {
    /// Starts `deltaboxd serve` with its own socket, metrics port and pin directory
    /// plus `extra` arguments, and waits until its socket accepts connections.
    pub fn start(test: &str, extra: &[&str]) -> Self {
        let dir = PathBuf::from("/run/deltabox-tests").join(crate::unique(test));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create daemon dir");
        let socket = dir.join("api.sock");
        let pin_dir = PathBuf::from("/sys/fs/bpf").join(crate::unique(test));
        let metrics_port = free_port();
        let data_dir = PathBuf::from(TEST_DATA_ROOT).join(crate::unique(test));
        let _ = fs::remove_dir_all(&data_dir);
        let sandbox_cgroup = CgroupFs::from_mountinfo()
            .expect("cgroup2 mount")
            .root()
            .join("deltabox-tests")
            .join(crate::unique(test));
        let child = Command::new(binary("deltaboxd"))
            .arg("serve")
            .arg("--socket")
            .arg(&socket)
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{metrics_port}"))
            .arg("--pin-dir")
            .arg(&pin_dir)
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--run-dir")
            .arg(dir.join("run"))
            .arg("--sandbox-cgroup")
            .arg(&sandbox_cgroup)
            .args(extra)
            .stdout(Stdio::null())
            // A file, not a pipe nobody drains until the end: a full pipe would block
            // the daemon's logging.
            .stderr(log_file(&dir))
            .spawn()
            .expect("spawn deltaboxd");
        let mut daemon = Self {
            child: Some(child),
            dir,
            socket,
            pin_dir,
            metrics_port,
            data_dir,
            sandbox_cgroup,
        };
        daemon.wait_ready();
        daemon
    }

    /// Ready = `GET /v1/status` answers 200. The socket listens before the programs
    /// are loaded, so a successful connect alone is too early.
    fn wait_ready(&mut self) {
        // Usually well under a second; in a cold CI run on 2 loaded CPUs a start once
        // took ~30 s before the eBPF programs were ready (seen at 0fb02c6), so the wait
        // is generous, and a slow start is reported.
        let start = Instant::now();
        let deadline = start + Duration::from_secs(90);
        while Instant::now() < deadline {
            if status_ok(&self.socket) {
                if start.elapsed() > Duration::from_secs(10) {
                    eprintln!(
                        "deltaboxd took {:?} to listen on {}",
                        start.elapsed(),
                        self.socket.display()
                    );
                }
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                let _ = self.child.take().expect("child").wait();
                panic!("deltaboxd exited at start ({status}): {}", self.log());
            }
            thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "deltaboxd did not listen on {} within 90 s",
            self.socket.display()
        );
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon running").id()
    }

    /// Its API socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Its pin directory.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Its metrics port on 127.0.0.1.
    pub fn metrics_port(&self) -> u16 {
        self.metrics_port
    }

    /// Its `/metrics` text.
    pub fn scrape(&self) -> String {
        use std::io::{Read as _, Write as _};
        let mut conn =
            std::net::TcpStream::connect(("127.0.0.1", self.metrics_port)).expect("connect");
        conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .expect("send");
        let mut text = String::new();
        conn.read_to_string(&mut text).expect("read");
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        text
    }

    /// The value of one series (`name` or `name{labels}`) in a fresh scrape.
    pub fn metric(&self, series: &str) -> f64 {
        let text = self.scrape();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
    }

    /// Runs `deltabox --socket <ours> args…`.
    pub fn cli(&self, args: &[&str]) -> Output {
        cli(&self.socket, args)
    }

    /// Its sandbox data directory (`--data-dir`).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Its sandbox cgroup directory (`--sandbox-cgroup`).
    pub fn sandbox_cgroup(&self) -> &Path {
        &self.sandbox_cgroup
    }

    /// Its run directory (`--run-dir`).
    pub fn run_dir(&self) -> PathBuf {
        self.dir.join("run")
    }

    /// SIGKILLs the daemon (as a crash would) and reaps it; what it made stays.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the daemon again on the same socket and directories (after [`Self::kill`]
    /// or [`Self::stop`]).
    pub fn restart(&mut self, extra: &[&str]) {
        assert!(self.child.is_none(), "the daemon is still running");
        let child = Command::new(binary("deltaboxd"))
            .arg("serve")
            .arg("--socket")
            .arg(&self.socket)
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{}", self.metrics_port))
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--run-dir")
            .arg(self.dir.join("run"))
            .arg("--sandbox-cgroup")
            .arg(&self.sandbox_cgroup)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log_file(&self.dir))
            .spawn()
            .expect("spawn deltaboxd");
        self.child = Some(child);
        self.wait_ready();
    }

    /// What the daemon wrote to stderr so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("deltaboxd.log")).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for the exit; returns its status and stderr.
    pub fn stop(&mut self) -> (ExitStatus, String) {
        let child = self.child.take().expect("daemon running");
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let out = wait_with_timeout(child, Duration::from_secs(20));
        (out.status, self.log())
    }
}

fn status_ok(socket: &Path) -> bool {
    let Ok(mut conn) = UnixStream::connect(socket) else {
        return false;
    };
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let request = b"GET /v1/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let mut head = [0u8; 12];
    conn.write_all(request).is_ok()
        && conn.read_exact(&mut head).is_ok()
        && head.starts_with(b"HTTP/1.1 200")
}

/// The daemon's log file in `dir` (appended to across restarts).
fn log_file(dir: &Path) -> Stdio {
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("deltaboxd.log"))
        .expect("create the daemon's log file")
        .into()
}

/// Waits for `child`, killing it by pid if it outlives `timeout`.
fn wait_with_timeout(mut child: Child, timeout: Duration) -> Output {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    if !matches!(child.try_wait(), Ok(Some(_))) {
        let _ = child.kill();
    }
    child.wait_with_output().expect("wait for child")
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
        if thread::panicking() {
            // The test failed: what the daemon logged is the first thing to read.
            let log: String = self
                .log()
                .lines()
                .filter(|l| !l.contains("fuser"))
                .collect::<Vec<_>>()
                .join("\n");
            eprintln!(
                "--- deltaboxd log ({}) ---\n{log}\n--- end of log ---",
                self.dir.display()
            );
        }
        // What a daemon that died (or was SIGKILLed by the test) left: its trees'
        // processes, cgroups and mounts.
        if let Err(e) = leftovers::clean(&self.dir.join("run"), &self.sandbox_cgroup) {
            eprintln!("cleaning up after {}: {e}", self.dir.display());
        }
        // The daemon's clean-up gives up on a cgroup the kernel is slow to let go of;
        // the test guard's waits longer and says so if it fails too.
        if self.sandbox_cgroup.exists() {
            eprintln!(
                "{} survived the daemon's clean-up: removing it",
                self.sandbox_cgroup.display()
            );
            crate::cgroup::remove_tree(&self.sandbox_cgroup);
        }
        let _ = fs::remove_dir_all(&self.dir);
        let _ = fs::remove_dir_all(&self.data_dir);
        let _ = deltabox_controller::bpf::unload(&self.pin_dir);
    }
}

/// Runs `deltabox --socket SOCKET args…`.
pub fn cli(socket: &Path, args: &[&str]) -> Output {
    Command::new(binary("deltabox"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("run deltabox")
}

/// Runs `cmd` as the unprivileged user `nobody` (uid/gid 65534).
pub fn as_nobody(cmd: &mut Command) -> Output {
    // SAFETY: between fork and exec only async-signal-safe syscalls are made.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(65534) != 0
                || libc::setuid(65534) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.output().expect("run as nobody")
}
