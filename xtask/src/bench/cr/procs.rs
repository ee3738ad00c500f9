//! The bench's sandbox-like workload and its guard: a cgroup2 tree
//! (`<cgroup2>/xtask-bench-cr-<pid>/{session,templates}`) with `bash` and a `python3`
//! process holding memory, talked to over stdin/stdout pipes; and [`BenchEnv`], whose
//! drop kills every process it started or restored (by pid, then `cgroup.kill` of the
//! tree, which reaches the frozen templates too), removes the cgroups and the bench's
//! directory on the store, also after an error or Ctrl-C.

use std::cell::RefCell;
use std::fs::{self, File};
use std::io::{Read as _, Write as _};
use std::os::fd::AsFd as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use deltabox_controller::cr::pidfd::Pidfd;
use deltabox_controller::cr::{CheckpointOptions, RestoreOptions, Restored};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::unistd::Pid;

use crate::bench::sandbox::cleanup::{kill_cgroup_tree, remove_cgroup_tree};
use crate::cgroup::cgroup2_mount;

/// How long the bench waits for one reply line (allocating and touching 4 GiB in
/// python takes a few seconds).
const REPLY_TIMEOUT: Duration = Duration::from_secs(120);

/// The python workload: holds `argv[1]` MiB in one private anonymous mapping (huge
/// pages when `argv[2]` is 1), every page touched, then answers commands on stdin:
/// `w N` writes one byte in each of N pseudo-random pages (of the first `argv[3]` MiB
/// only, a hot working set, unless that is 0), `d M` rewrites every page of
/// the first M MiB, `c M` sums the first byte of those pages, `n` tells the counter
/// (bumped by `w` and `d`). It reads with `os.read`, so a checkpoint finds it in `read`.
pub const PYTHON: &str = r#"
import mmap, os, sys
mib, thp, hot = int(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])
size, page = mib << 20, 4096
npages = size // page
hot_pages = min(hot << 8, npages) if hot else npages
buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
buf.madvise(mmap.MADV_HUGEPAGE if thp else mmap.MADV_NOHUGEPAGE)
chunk = bytes(range(1, 256)) * ((2 << 20) // 255 + 1)
for off in range(0, size, 2 << 20):
    n = min(2 << 20, size - off)
    buf[off:off + n] = chunk[:n]
counter, x = 0, 12345
os.write(1, b"ready\n")
pending = b""
while True:
    while b"\n" not in pending:
        got = os.read(0, 4096)
        if not got:
            sys.exit(0)
        pending += got
    line, pending = pending.split(b"\n", 1)
    cmd, *args = line.split()
    if cmd == b"w":
        for _ in range(int(args[0])):
            x = (x * 6364136223846793005 + 1442695040888963407) % (1 << 64)
            at = ((x >> 33) % hot_pages) * page + 8
            buf[at] = (buf[at] + 1) & 255
        counter += 1
        os.write(1, b"ok %d\n" % counter)
    elif cmd == b"d":
        counter += 1
        v = counter & 255 or 1
        for p in range(int(args[0]) * 256):
            buf[p * page] = v
        os.write(1, b"ok %d\n" % counter)
    elif cmd == b"c":
        s = sum(buf[p * page] for p in range(int(args[0]) * 256))
        os.write(1, b"%d\n" % s)
    elif cmd == b"n":
        os.write(1, b"%d\n" % counter)
    else:
        os.write(1, b"? %s\n" % line)
"#;

/// The daemon's store (xfs, reflinks), where full copies and dumps go when it exists.
pub const STORE: &str = "/var/lib/deltabox/store";

/// What bash is told each round: bump a variable and say it.
pub const BASH_STEP: &str = "x=$((x+1)); echo $x";

/// The bench's cgroups, directory and processes.
pub struct BenchEnv {
    root: PathBuf,
    dir: PathBuf,
    /// Held by pidfd: most are killed and reaped during the run, and their pids soon
    /// name other processes (`pid_max` is 32768 here); a kill by a remembered pid at
    /// the end killed other people's compilers.
    pids: RefCell<Vec<Pidfd>>,
}

impl BenchEnv {
    /// Creates the cgroup tree and `dir` (where full copies and dumps go).
    pub fn new(dir: PathBuf) -> Result<Self> {
        let root = cgroup2_mount()?.join(format!("xtask-bench-cr-{}", std::process::id()));
        let env = Self {
            root,
            dir,
            pids: RefCell::new(Vec::new()),
        };
        for d in [env.root.clone(), env.session(), env.templates()] {
            fs::create_dir(&d).with_context(|| format!("cannot create cgroup {}", d.display()))?;
        }
        fs::create_dir_all(&env.dir)
            .with_context(|| format!("cannot create {}", env.dir.display()))?;
        Ok(env)
    }

    /// The sandbox-like cgroup the processes run in.
    pub fn session(&self) -> PathBuf {
        self.root.join("session")
    }

    fn templates(&self) -> PathBuf {
        self.root.join("templates")
    }

    /// The bench's directory on the store.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Templates go under this bench's tree.
    pub fn checkpoint_opts(&self) -> CheckpointOptions {
        CheckpointOptions {
            template_cgroups: self.templates(),
            ..CheckpointOptions::default()
        }
    }

    /// Restored processes go into the session cgroup.
    pub fn restore_opts(&self) -> RestoreOptions {
        RestoreOptions {
            cgroup: Some(self.session()),
            ..RestoreOptions::default()
        }
    }

    /// Kills `pid` when the bench ends, if it is still that process. Call it while the
    /// process is alive; those that have exited since are forgotten here (the bench
    /// tracks one process per round).
    pub fn track(&self, pid: i32) {
        let mut pids = self.pids.borrow_mut();
        pids.retain(|p| matches!(p.wait_exit(Duration::ZERO), Ok(false)));
        if let Ok(pidfd) = Pidfd::open(Pid::from_raw(pid)) {
            pids.push(pidfd);
        }
    }

    /// Starts `program args` in the session cgroup, in a session of its own (a Ctrl-C
    /// on the terminal reaches only the bench, which cleans up), with piped stdio and
    /// no other fd (DeltaCR refuses pipes beyond stdio).
    pub fn spawn(&self, program: &str, args: &[&str]) -> Result<Proc> {
        let procs = self.session().join("cgroup.procs");
        let procs_file = File::options()
            .write(true)
            .open(&procs)
            .with_context(|| format!("cannot open {}", procs.display()))?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let hook = move || {
            // Into the cgroup before the program runs, then out of the terminal's
            // session, then every fd but stdio closed: three syscalls, no allocation.
            (&procs_file).write_all(b"0")?;
            nix::unistd::setsid()?;
            // SAFETY: close_range takes plain integers and touches no memory.
            unsafe { libc::syscall(libc::SYS_close_range, 3, u32::MAX, 0) };
            Ok(())
        };
        // SAFETY: the hook runs in the forked child before exec and makes only the
        // async-signal-safe syscalls above, on a descriptor opened before the fork.
        unsafe { cmd.pre_exec(hook) };
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {program} in {}", procs.display()))?;
        let pid = child.id() as i32;
        self.track(pid);
        let take = |what: &str| format!("{program} (pid {pid}) has no {what} pipe");
        let stdin = File::from(std::os::fd::OwnedFd::from(
            child.stdin.take().with_context(|| take("stdin"))?,
        ));
        let stdout = File::from(std::os::fd::OwnedFd::from(
            child.stdout.take().with_context(|| take("stdout"))?,
        ));
        let stderr = child
            .stderr
            .take()
            .map(|e| File::from(std::os::fd::OwnedFd::from(e)));
        // Not kept: `Child::kill` and `Child::wait` go by pid, and the process is reaped
        // elsewhere (a rollback's kill reaps it), after which its pid may name another
        // process. The pidfd taken by `track` stands for it.
        drop(child);
        Ok(Proc {
            pid,
            name: program.to_owned(),
            stdin,
            stdout,
            stderr,
            buf: Vec::new(),
        })
    }

    /// Takes a restored process under the guard.
    pub fn adopt(&self, name: &str, restored: Restored) -> Result<Proc> {
        let pid = restored.pid().as_raw();
        self.track(pid);
        let stdio = restored.stdio;
        Ok(Proc {
            pid,
            name: name.to_owned(),
            stdin: stdio
                .stdin
                .with_context(|| format!("restored {name} (pid {pid}) has no stdin pipe"))?,
            stdout: stdio
                .stdout
                .with_context(|| format!("restored {name} (pid {pid}) has no stdout pipe"))?,
            stderr: stdio.stderr,
            buf: Vec::new(),
        })
    }
}

impl Drop for BenchEnv {
    fn drop(&mut self) {
        for pidfd in self.pids.borrow().iter() {
            let _ = pidfd.send_signal(libc::SIGKILL);
        }
        // What was not tracked (a template whose handle was lost) dies with the tree.
        if let Err(err) = kill_cgroup_tree(&self.root) {
            eprintln!("warning: {err:#}");
        }
        if let Err(err) = remove_cgroup_tree(&self.root) {
            eprintln!("warning: {err:#}");
        }
        for pidfd in self.pids.borrow().iter() {
            // Templates and restored processes are our children (CLONE_PARENT).
            pidfd.try_reap();
        }
        if let Err(err) = fs::remove_dir_all(&self.dir)
            && err.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("warning: cannot remove {}: {err}", self.dir.display());
        }
        // The store is an xfs image on a loop device, mounted without `discard`: the
        // blocks of the full copies stay allocated in the image file (on the machine's
        // disk) until trimmed. Best effort; only free blocks are discarded.
        if self.dir.starts_with(STORE) {
            let _ = Command::new("fstrim")
                .arg(STORE)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// A workload process: its pid and pipes.
pub struct Proc {
    /// The pid.
    pub pid: i32,
    name: String,
    stdin: File,
    stdout: File,
    stderr: Option<File>,
    buf: Vec<u8>,
}

impl Proc {
    /// Sends `line` and returns its reply.
    pub fn ask(&mut self, line: &str) -> Result<String> {
        self.stdin
            .write_all(format!("{line}\n").as_bytes())
            .with_context(|| format!("cannot write to {} (pid {})", self.name, self.pid))?;
        self.line()
    }

    /// The next line of its stdout.
    pub fn line(&mut self) -> Result<String> {
        let deadline = Instant::now() + REPLY_TIMEOUT;
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                return Ok(String::from_utf8_lossy(&line[..i]).into_owned());
            }
            crate::signals::check_interrupted()?;
            if Instant::now() >= deadline {
                let err = self.stderr_text();
                bail!(
                    "{} (pid {}) did not answer within {REPLY_TIMEOUT:?}{err}",
                    self.name,
                    self.pid
                );
            }
            let mut fds = [PollFd::new(self.stdout.as_fd(), PollFlags::POLLIN)];
            let ready = poll(&mut fds, PollTimeout::from(200u16))
                .with_context(|| format!("cannot poll the stdout of pid {}", self.pid))?;
            if ready == 0 {
                continue;
            }
            let mut chunk = [0u8; 4096];
            let n = self
                .stdout
                .read(&mut chunk)
                .with_context(|| format!("cannot read the stdout of pid {}", self.pid))?;
            if n == 0 {
                let err = self.stderr_text();
                bail!("{} (pid {}) closed its stdout{err}", self.name, self.pid);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// What it wrote on stderr, if anything is there to read now.
    fn stderr_text(&mut self) -> String {
        let Some(err) = &mut self.stderr else {
            return String::new();
        };
        let mut fds = [PollFd::new(err.as_fd(), PollFlags::POLLIN)];
        if !matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0) {
            return String::new();
        }
        let mut chunk = [0u8; 8192];
        match err.read(&mut chunk) {
            Ok(n) if n > 0 => format!(
                "; its stderr: {}",
                String::from_utf8_lossy(&chunk[..n]).trim()
            ),
            _ => String::new(),
        }
    }

    /// Waits until it is blocked in `read` (`/proc/<pid>/syscall`), where an agent's
    /// session waits between commands.
    pub fn wait_idle(&self) -> Result<()> {
        let deadline = Instant::now() + REPLY_TIMEOUT;
        let path = format!("/proc/{}/syscall", self.pid);
        loop {
            let text = fs::read_to_string(&path).unwrap_or_default();
            if text.split_whitespace().next() == Some("0") {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} (pid {}) never blocked in read: {text}",
                    self.name,
                    self.pid
                );
            }
            thread::sleep(Duration::from_micros(200));
        }
    }
}
