//! fsx (the file system exerciser): random reads, writes, mmap reads and writes,
//! truncates, hole punches, fallocates, copy_file_range, sendfile, fsyncs and
//! close/reopens of one file, each read checked against fsx's in-memory copy.
//!
//! On DeltaFS it runs while the harness checkpoints and rolls back under it: every
//! interval, `freeze` then `switch <that id>`. The switch is a rollback to the state just
//! frozen, so fsx's expected content stays valid while the switch and the redirection of
//! its open file descriptor (and of the file it reopens) are exercised.
//!
//! fsx prints `All operations completed A-OK!` and exits 0 when every operation checked
//! out; on a mismatch it logs `[ERROR fsx] miscompare: …` and an operation log dump to
//! stderr and exits 1; an unexpected I/O error makes it panic (exit 101).

use std::fs::{self, File};
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::fstarget::deltafs::DeltaFs;
use crate::signals::check_interrupted;
use crate::util::{ChildGuard, display, human_duration, step};

/// Operation weights: every operation fsx has on Linux, the data path ones most often.
const CONFIG: &str = "\
# written by `cargo xtask conformance`
[weights]
close_open = 1
read = 10
write = 10
mapread = 10
mapwrite = 10
invalidate = 1
truncate = 10
fsync = 1
fdatasync = 1
posix_fallocate = 1
punch_hole = 1
sendfile = 1
posix_fadvise = 1
copy_file_range = 1
";

/// The success line.
const OK_LINE: &str = "All operations completed A-OK!";

/// fsx's CPU time grows while it works; unchanged this long, fsx is stuck, and the run
/// fails at once rather than at its timeout. fsx 0.3.2's `sendfile` op, for one, waits
/// forever for the bytes of a `sendfile` that returned short.
const STALL: Duration = Duration::from_secs(60);

/// What one cycle under fsx does on DeltaFS.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Cycle {
    /// `freeze`: a checkpoint while fsx holds its file open.
    Freeze,
    /// `freeze` then `switch <that id>`: a checkpoint and a rollback to it.
    FreezeSwitch,
}

impl Cycle {
    /// For progress lines.
    pub fn describe(self) -> &'static str {
        match self {
            Cycle::Freeze => "checkpoint",
            Cycle::FreezeSwitch => "checkpoint + rollback",
        }
    }
}

/// Checkpoints and rollbacks taken under one run, with their round-trip times (command
/// sent on the daemon's stdin to answer read).
#[derive(Clone, Debug, Default)]
pub struct Checkpoints {
    pub interval: Duration,
    pub freezes: Vec<Duration>,
    pub switches: Vec<Duration>,
}

/// One fsx run.
#[derive(Clone, Debug)]
pub struct Run {
    pub ops: u64,
    pub seed: u64,
    pub duration: Duration,
    /// `None` when every operation checked out; else what went wrong.
    pub failure: Option<String>,
    pub checkpoints: Option<Checkpoints>,
}

/// Writes fsx's configuration file.
pub fn write_config(path: &Path) -> Result<()> {
    fs::write(path, CONFIG).with_context(|| format!("cannot write {}", path.display()))
}

/// Runs `ops` operations on `<dir>/fsx.data`; with `deltafs`, freezes and switches back
/// every `interval` until fsx exits. `artifacts` gets fsx's stdout, stderr and, on a
/// failure, its `.fsxgood` file. A failure of fsx is a `Run` with `failure` set; an
/// error of the daemon (or of starting fsx) is an `Err`.
pub fn run(
    config: &Path,
    dir: &Path,
    ops: u64,
    seed: u64,
    artifacts: &Path,
    mut deltafs: Option<(&mut DeltaFs, Duration, Cycle)>,
) -> Result<Run> {
    let binary = which::which("fsx").context("fsx is not on PATH: run `cargo xtask setup`")?;
    fs::create_dir_all(artifacts)
        .with_context(|| format!("cannot create {}", artifacts.display()))?;
    let stdout_path = artifacts.join("fsx.stdout");
    let stderr_path = artifacts.join("fsx.stderr");
    let open = |path: &Path| {
        File::create(path).with_context(|| format!("cannot create {}", path.display()))
    };
    let mut cmd = Command::new(binary);
    cmd.arg("-f")
        .arg(config)
        .arg("-N")
        .arg(ops.to_string())
        .arg("-S")
        .arg(seed.to_string())
        .arg("-P")
        .arg(artifacts)
        .arg(dir.join("fsx.data"))
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(open(&stdout_path)?)
        .stderr(open(&stderr_path)?);
    // Generous: about 0.2 ms per operation on ext4 here; a hung run is killed at this.
    let timeout = Duration::from_secs(300) + Duration::from_millis(20 * ops);
    let line = display(&cmd);
    let start = Instant::now();
    let mut child = ChildGuard::new(
        cmd.spawn()
            .with_context(|| format!("cannot start `{line}`"))?,
    );
    let mut checkpoints = deltafs.as_ref().map(|(_, interval, _)| Checkpoints {
        interval: *interval,
        ..Checkpoints::default()
    });
    let mut next_report = Duration::from_secs(30);
    let mut stall = Stall::new(Instant::now());
    let mut next_cycle = start
        + deltafs
            .as_ref()
            .map_or(Duration::ZERO, |(_, interval, _)| *interval);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        check_interrupted()?;
        let elapsed = start.elapsed();
        if elapsed > timeout {
            // The guard kills it (by pid) on the way out.
            anyhow::bail!("`{line}` did not finish within {}", human_duration(timeout));
        }
        if let Some(pid) = child.pid()
            && stall.observe(cpu_ticks(pid), Instant::now()) > STALL
        {
            anyhow::bail!(
                "fsx ({pid}) used no CPU for {} after {} of its run: stuck (fsx's output: \
                 {}); where its threads wait:\n{}",
                human_duration(STALL),
                human_duration(elapsed),
                stderr_path.display(),
                thread_stacks(pid)
            );
        }
        if elapsed > next_report {
            let taken = checkpoints
                .as_ref()
                .map(|c| format!(", {} checkpoint+rollback cycles", c.freezes.len()))
                .unwrap_or_default();
            println!("  … fsx running for {}{taken}", human_duration(elapsed));
            next_report += Duration::from_secs(30);
        }
        if let (Some((daemon, interval, cycle)), Some(taken)) = (&mut deltafs, &mut checkpoints)
            && Instant::now() >= next_cycle
        {
            // Quiesce fsx first, as deltaboxd freezes a sandbox's cgroup before a
            // checkpoint: a write landing between the freeze and the switch would be
            // rolled back, a true divergence from what fsx expects, not a bug.
            let Some(pid) = child.pid() else { continue };
            let paused = Paused::stop(pid)?;
            let started = Instant::now();
            let id = daemon.freeze().context("freeze under fsx")?;
            let frozen = Instant::now();
            taken.freezes.push(frozen - started);
            if *cycle == Cycle::FreezeSwitch {
                daemon
                    .switch(&id)
                    .with_context(|| format!("switch to {id} under fsx"))?;
                taken.switches.push(frozen.elapsed());
            }
            drop(paused);
            next_cycle = Instant::now() + *interval;
        }
        // Short naps, so that fsx's exit and a Ctrl-C are seen at once whatever the
        // interval.
        let nap = match checkpoints {
            Some(_) => next_cycle.saturating_duration_since(Instant::now()),
            None => Duration::from_millis(20),
        };
        thread::sleep(nap.clamp(Duration::from_millis(1), Duration::from_millis(20)));
    };
    let duration = start.elapsed();
    // A Ctrl-C reaches fsx too: its death is then no verdict.
    check_interrupted()?;
    let stdout = fs::read_to_string(&stdout_path).unwrap_or_default();
    let stderr = fs::read_to_string(&stderr_path).unwrap_or_default();
    let failure = verdict(status.success(), &stdout, &stderr).map(|why| {
        format!(
            "{why} ({status}; fsx's output: {}, {})",
            stdout_path.display(),
            stderr_path.display()
        )
    });
    if failure.is_none() {
        step(format!(
            "fsx: {ops} operations checked out in {}",
            human_duration(duration)
        ));
    }
    Ok(Run {
        ops,
        seed,
        duration,
        failure,
        checkpoints,
    })
}

/// The fields of `/proc/<pid>/stat` after `pid (comm) `, from field 3 (the state) on.
fn stat_fields(pid: impl std::fmt::Display) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(") ")?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// The CPU time (user + system, in clock ticks) of process `pid`, all its threads.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let fields = stat_fields(pid)?;
    // utime is field 14, stime 15.
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(field(14)? + field(15)?)
}

/// Each thread of `pid`: its `wchan` and kernel stack.
fn thread_stacks(pid: u32) -> String {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return "(gone)".to_owned();
    };
    tasks
        .flatten()
        .map(|task| {
            let dir = task.path();
            let read = |name: &str| fs::read_to_string(dir.join(name)).unwrap_or_default();
            format!(
                "thread {}: waiting in {:?}\n{}",
                task.file_name().to_string_lossy(),
                read("wchan"),
                read("stack")
            )
        })
        .collect()
}

/// How long a sampled value (fsx's CPU time) has stayed the same.
struct Stall {
    last: Option<u64>,
    since: Instant,
}

impl Stall {
    fn new(now: Instant) -> Self {
        Self {
            last: None,
            since: now,
        }
    }

    /// Takes a sample at `now`; returns how long the value has not changed.
    fn observe(&mut self, value: Option<u64>, now: Instant) -> Duration {
        if value != self.last {
            self.last = value;
            self.since = now;
        }
        now - self.since
    }
}

/// `None` when fsx succeeded; else the first lines that say what went wrong.
pub fn verdict(success: bool, stdout: &str, stderr: &str) -> Option<String> {
    if success && stdout.contains(OK_LINE) {
        return None;
    }
    let telling: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .take_while(|line| !line.contains("LOG DUMP"))
        .filter(|line| !line.is_empty())
        .filter(|line| {
            ["ERROR", "Err", "error", "panicked"]
                .iter()
                .any(|word| line.contains(word))
        })
        .take(3)
        .collect();
    Some(if telling.is_empty() {
        if success {
            format!("fsx exited 0 without printing `{OK_LINE}`")
        } else {
            "fsx failed without an error message".to_owned()
        }
    } else {
        telling.join("; ")
    })
}

/// fsx stopped with SIGSTOP, and continued (SIGCONT) when dropped, also on an error.
struct Paused(Pid);

impl Paused {
    /// Stops `pid` and waits until it is really stopped: a process inside a FUSE request
    /// stops only once the request is answered, so no operation is half done. A process
    /// that has exited counts as stopped: nothing of it runs any more.
    fn stop(pid: u32) -> Result<Self> {
        let pid = Pid::from_raw(i32::try_from(pid).context("pid out of range")?);
        kill(pid, Signal::SIGSTOP).with_context(|| format!("cannot stop fsx ({pid})"))?;
        let paused = Self(pid);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let state = stat_fields(pid).and_then(|f| f.first()?.chars().next());
            match state {
                // Stopped; or exited (a zombie until the run loop reaps it: fsx may finish
                // between the loop's last look and this stop), which the loop then reports.
                Some('T' | 'Z' | 'X') | None => return Ok(paused),
                _ if Instant::now() > deadline => {
                    // Where it waits (a FUSE request the daemon does not answer shows
                    // as fuse_* frames): what the next look at this needs.
                    let wchan =
                        fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
                    let stack =
                        fs::read_to_string(format!("/proc/{pid}/stack")).unwrap_or_default();
                    anyhow::bail!(
                        "fsx ({pid}) did not stop within 30 s: state {}, waiting in {wchan:?}; \
                         kernel stack:\n{stack}",
                        state.unwrap_or('?')
                    )
                }
                _ => thread::sleep(Duration::from_micros(200)),
            }
        }
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        let _ = kill(self.0, Signal::SIGCONT);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_that_stays_the_same_is_a_stall() {
        let t0 = Instant::now();
        let mut stall = Stall::new(t0);
        let s = Duration::from_secs(1);
        assert_eq!(stall.observe(Some(5), t0), Duration::ZERO);
        assert_eq!(stall.observe(Some(5), t0 + 30 * s), 30 * s);
        assert_eq!(stall.observe(Some(6), t0 + 31 * s), Duration::ZERO);
        assert_eq!(stall.observe(Some(6), t0 + 92 * s), 61 * s);
        assert!(cpu_ticks(std::process::id()).is_some());
        assert!(thread_stacks(std::process::id()).contains("thread "));
    }

    #[test]
    fn an_fsx_that_has_just_exited_counts_as_paused() {
        // A zombie (exited, not reaped): what a cycle met when fsx finished under it.
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("spawn true");
        let zombie = format!("/proc/{}/stat", child.id());
        let deadline = Instant::now() + Duration::from_secs(10);
        while !fs::read_to_string(&zombie)
            .unwrap_or_default()
            .contains(") Z ")
        {
            assert!(Instant::now() < deadline, "never a zombie");
            thread::sleep(Duration::from_millis(5));
        }
        let started = Instant::now();
        drop(Paused::stop(child.id()).expect("an exited process is no error"));
        assert!(started.elapsed() < Duration::from_secs(5));
        child.wait().expect("reap");
    }

    #[test]
    fn success_needs_the_ok_line_and_status_zero() {
        assert_eq!(verdict(true, "All operations completed A-OK!\n", ""), None);
        assert_eq!(
            verdict(true, "", "").unwrap(),
            "fsx exited 0 without printing `All operations completed A-OK!`"
        );
        assert_eq!(
            verdict(false, "All operations completed A-OK!\n", "").unwrap(),
            "fsx failed without an error message"
        );
    }

    #[test]
    fn a_miscompare_is_reported_by_its_first_lines() {
        let stderr = "\
[ERROR fsx] miscompare: offset= 0x1f3a, size = 0x8c2
[ERROR fsx] OFFSET  GOOD  BAD  RANGE
[ERROR fsx] 0x1f3a  0x2c  0x00 0x8c2
[ERROR fsx] Step# (mod 256) for a misdirected write may be 0
[ERROR fsx] Using seed 42
[ERROR fsx] LOG DUMP
[ERROR fsx]     1 WRITE    0x0 .. 0xfff (0x1000 bytes)
";
        assert_eq!(
            verdict(false, "", stderr).unwrap(),
            "[ERROR fsx] miscompare: offset= 0x1f3a, size = 0x8c2; [ERROR fsx] OFFSET  GOOD  \
             BAD  RANGE; [ERROR fsx] 0x1f3a  0x2c  0x00 0x8c2"
        );
    }

    #[test]
    fn a_panic_is_reported() {
        let stderr = "\nthread 'main' panicked at src/main.rs:1395:31:\ncalled `Result::unwrap()` \
                      on an `Err` value: Os { code: 107, kind: NotConnected }\n";
        assert_eq!(
            verdict(false, "", stderr).unwrap(),
            "thread 'main' panicked at src/main.rs:1395:31:; called `Result::unwrap()` on an \
             `Err` value: Os { code: 107, kind: NotConnected }"
        );
    }
}
