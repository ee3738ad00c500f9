//! Support for the DeltaCR tests: a cgroup tree per test ([`CrEnv`]) whose drop kills
//! every process the test started or restored (by pid, then through `cgroup.kill`)
//! and removes the cgroups, even when an assertion failed; and [`Lines`], a
//! line reader with a timeout over a process's stdout.

use std::cell::RefCell;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use deltabox_controller::cr::pidfd::Pidfd;
use deltabox_controller::cr::{CheckpointOptions, RestoreOptions, Restored};
use nix::unistd::Pid;

use crate::cgroup::{cgroup2_root, remove_tree};
use crate::unique;

/// How long a test waits for one line of output.
pub const LINE_TIMEOUT: Duration = Duration::from_secs(10);

/// The test helper binary (`tests/src/bin/cr-target.rs`).
pub fn target_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test>-<hash> → target/<profile>/cr-target
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join("cr-target");
    assert!(
        bin.exists(),
        "{} missing: build it with `cargo build -p deltabox-tests --bin cr-target`",
        bin.display()
    );
    bin
}

/// A process under test: its pid, stdin, and stdout lines.
pub struct Proc {
    /// The pid.
    pub pid: i32,
    stdin: File,
    /// Its stdout.
    pub out: Lines,
}

impl Proc {
    /// Writes `line` and a newline to its stdin, in one `write` (a raw `read` in the
    /// target must see the whole line).
    pub fn send(&mut self, line: &str) {
        self.stdin
            .write_all(format!("{line}\n").as_bytes())
            .unwrap_or_else(|e| panic!("write to pid {}: {e}", self.pid));
    }

    /// Waits until it is blocked in syscall `nr` (`/proc/<pid>/syscall`).
    pub fn wait_blocked_in(&self, nr: i64) {
        wait_blocked_in(self.pid, nr);
    }

    /// The next line of its stdout.
    pub fn line(&mut self) -> String {
        self.out
            .next_line(LINE_TIMEOUT)
            .unwrap_or_else(|e| panic!("no line from pid {}: {e}", self.pid))
    }

    /// Sends `line` and returns the reply line.
    pub fn ask(&mut self, line: &str) -> String {
        self.send(line);
        self.line()
    }
}

/// Lines of a pipe, read with a timeout.
pub struct Lines {
    file: File,
    buf: Vec<u8>,
}

impl Lines {
    /// Wraps the read end of a pipe.
    pub fn new(file: File) -> Self {
        Self {
            file,
            buf: Vec::new(),
        }
    }

    /// The next line (without its newline), or an error after `timeout` or at EOF.
    pub fn next_line(&mut self, timeout: Duration) -> io::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                return Ok(String::from_utf8_lossy(&line[..i]).into_owned());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("partial: {:?}", String::from_utf8_lossy(&self.buf)),
                ));
            }
            let mut pfd = libc::pollfd {
                fd: self.file.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = left.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: one valid pollfd for the duration of the call.
            let ready = unsafe { libc::poll(&mut pfd, 1, ms) };
            if ready <= 0 {
                continue;
            }
            let mut chunk = [0u8; 4096];
            let n = self.file.read(&mut chunk)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("EOF; partial: {:?}", String::from_utf8_lossy(&self.buf)),
                ));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// The cgroups of one test — `<cgroup2>/<unique>/session` for the processes under test
/// and `<unique>/templates` for the templates' own cgroups — and every process it started.
/// Dropping it kills them all and removes the tree.
///
/// Processes are held by pidfd, not by pid: many are reaped during the test, and on a
/// busy machine (`pid_max` is 32768 here) their pids are soon reused, so a kill by a
/// remembered pid would hit an unrelated process (it killed a CI run's rustc).
pub struct CrEnv {
    root: PathBuf,
    pids: RefCell<Vec<Pidfd>>,
    children: RefCell<Vec<Child>>,
}

impl CrEnv {
    /// Creates the tree for test `name`.
    pub fn new(name: &str) -> Self {
        let root = cgroup2_root().join(unique(&format!("cr-{name}")));
        remove_tree(&root);
        for dir in [&root, &root.join("session"), &root.join("templates")] {
            fs::create_dir(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        }
        Self {
            root,
            pids: RefCell::new(Vec::new()),
            children: RefCell::new(Vec::new()),
        }
    }

    /// The session cgroup.
    pub fn session(&self) -> PathBuf {
        self.root.join("session")
    }

    /// Options that put templates under this test's tree.
    pub fn checkpoint_opts(&self) -> CheckpointOptions {
        CheckpointOptions {
            template_cgroups: self.root.join("templates"),
            ..CheckpointOptions::default()
        }
    }

    /// Options that put restored processes in the session cgroup.
    pub fn restore_opts(&self) -> RestoreOptions {
        RestoreOptions {
            cgroup: Some(self.session()),
            ..RestoreOptions::default()
        }
    }

    /// Starts `cr-target ARGS` in the session cgroup with piped stdio.
    pub fn spawn_target(&self, args: &[&str]) -> Proc {
        let mut cmd = Command::new(target_bin());
        cmd.args(args);
        self.spawn(cmd)
    }

    /// Starts `cmd` in the session cgroup with piped stdin and stdout, and no other fd
    /// (the test runner may leak some, e.g. a jobserver pipe, which DeltaCR refuses).
    pub fn spawn(&self, mut cmd: Command) -> Proc {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // SAFETY: close_range is async-signal-safe and touches no memory.
        unsafe {
            cmd.pre_exec(|| {
                libc::syscall(libc::SYS_close_range, 3, u32::MAX, 0);
                Ok(())
            });
        }
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let pid = child.id() as i32;
        self.track(pid);
        fs::write(self.session().join("cgroup.procs"), pid.to_string())
            .expect("move the target into the session cgroup");
        let stdin = File::from(std::os::fd::OwnedFd::from(child.stdin.take().unwrap()));
        let stdout = File::from(std::os::fd::OwnedFd::from(child.stdout.take().unwrap()));
        self.children.borrow_mut().push(child);
        Proc {
            pid,
            stdin,
            out: Lines::new(stdout),
        }
    }

    /// Takes a restored process under this test's guard.
    pub fn adopt(&self, restored: Restored) -> Proc {
        let pid = restored.pid().as_raw();
        self.track(pid);
        let Restored { stdio, .. } = restored;
        Proc {
            pid,
            stdin: stdio.stdin.expect("restored stdin"),
            out: Lines::new(stdio.stdout.expect("restored stdout")),
        }
    }

    /// Kills `pid` when the test ends (if it is still the same process: see the type's
    /// documentation). Call it while the process is alive; one already gone is skipped.
    pub fn track(&self, pid: i32) {
        if let Ok(pidfd) = Pidfd::open(Pid::from_raw(pid)) {
            self.pids.borrow_mut().push(pidfd);
        }
    }
}

impl Drop for CrEnv {
    fn drop(&mut self) {
        for pidfd in self.pids.borrow().iter() {
            // Gone already: fine.
            let _ = pidfd.send_signal(libc::SIGKILL);
        }
        for child in self.children.borrow_mut().iter_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
        remove_tree(&self.root);
        for pidfd in self.pids.borrow().iter() {
            // Ours to reap when spawned or restored with CLONE_PARENT; else init's.
            let _ = pidfd.wait_exit(Duration::from_secs(1));
            pidfd.try_reap();
        }
    }
}

/// Waits (up to [`LINE_TIMEOUT`]) until `pid` is blocked in syscall `nr`.
pub fn wait_blocked_in(pid: i32, nr: i64) {
    let deadline = Instant::now() + LINE_TIMEOUT;
    loop {
        let text = fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap_or_default();
        if text.split_whitespace().next() == Some(nr.to_string().as_str()) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "pid {pid} never blocked in syscall {nr}: {text}"
        );
        thread::sleep(Duration::from_millis(1));
    }
}

/// Reads a `u64` at `addr` in `pid`'s memory through `/proc/<pid>/mem`.
pub fn read_u64(pid: i32, addr: u64) -> u64 {
    let mem = File::open(format!("/proc/{pid}/mem")).expect("open /proc/pid/mem");
    let mut buf = [0u8; 8];
    mem.read_exact_at(&mut buf, addr)
        .unwrap_or_else(|e| panic!("read {addr:#x} of pid {pid}: {e}"));
    u64::from_ne_bytes(buf)
}

/// The value after `key=` in `line`.
pub fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

/// A python3 read-eval-print loop over stdin: `name = expr` lines are executed,
/// expressions answered with their repr (run as `python3 -u -c PY_REPL`).
pub const PY_REPL: &str = "
import sys
ns = {}
for line in sys.stdin:
    try:
        r = eval(line, ns)
    except SyntaxError:
        exec(line, ns)
        r = None
    print(repr(r), flush=True)
";
