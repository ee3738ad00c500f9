//! DeltaCR and threads: a pthread program (built here with gcc from `cr_threads.c`)
//! checkpointed while its threads run, restored by rollback and as branches — every
//! thread back with its registers, XSAVE area, TLS and signal mask, mutexes, condition
//! variables, `pthread_kill` and `pthread_join` working, counters continuing from the
//! checkpoint's values — and a Python program with threads through a real sandbox
//! session.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use deltabox_controller::cr::{self, Template};
use deltabox_tests::cr::{CrEnv, Proc, field};
use deltabox_tests::{require_root, unique};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::Pid;

/// Threads of the C program besides the main one: 4 workers, a spinner, a sleeper, a
/// waiter.
const C_THREADS: usize = 7;

/// A directory removed when the test ends.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(unique(name));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create the build directory");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Builds the C target into `dir` and returns the binary.
fn build_c_target(dir: &Path) -> PathBuf {
    let src = dir.join("cr_threads.c");
    fs::write(&src, include_str!("cr_threads.c")).unwrap();
    let bin = dir.join("cr-threads");
    let out = Command::new("gcc")
        .args(["-O2", "-pthread", "-Wall", "-o"])
        .arg(&bin)
        .arg(&src)
        .output()
        .expect("run gcc (the test needs it)");
    assert!(
        out.status.success(),
        "gcc failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    bin
}

fn counters(line: &str) -> Vec<u64> {
    (0..4)
        .map(|i| field(line, &format!("c{i}")).parse().unwrap())
        .collect()
}

fn num(line: &str, key: &str) -> u64 {
    field(line, key).parse().unwrap()
}

fn task_count(pid: i32) -> usize {
    fs::read_dir(format!("/proc/{pid}/task")).unwrap().count()
}

/// Waits for `pid`, a child of the test (DeltaCR forks with `CLONE_PARENT`), to exit;
/// returns its exit code.
fn exit_code(pid: i32) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match waitpid(
            Pid::from_raw(pid),
            Some(nix::sys::wait::WaitPidFlag::WNOHANG),
        ) {
            Ok(WaitStatus::Exited(_, code)) => return code,
            Ok(WaitStatus::StillAlive) if Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(5));
            }
            other => panic!("pid {pid}: {other:?}"),
        }
    }
}

/// The program's whole life after a checkpoint taken with the mutex held at `held`:
/// the counters are exactly the checkpoint's, every thread runs again, the invariant
/// holds, `pthread_kill` reaches each worker, and everything joins.
fn check_restored(p: &mut Proc, held: &str) {
    assert_eq!(task_count(p.pid), C_THREADS + 1, "threads of pid {}", p.pid);
    let peek = p.ask("peek");
    assert_eq!(counters(&peek), counters(held), "{peek} vs {held}");
    assert_eq!(num(&peek, "shared"), num(held, "shared"));
    assert_eq!(p.ask("release"), "released");
    let spins = {
        let first = p.ask("snap");
        let line = p.line();
        assert_eq!(num(&first, "shared"), num(&first, "sum"), "{first}");
        num(&line, "spins")
    };
    thread::sleep(Duration::from_millis(150));
    let snap = p.ask("snap");
    let rates = p.line();
    assert_eq!(num(&snap, "shared"), num(&snap, "sum"), "{snap}");
    for (now, then) in counters(&snap).iter().zip(counters(held)) {
        assert!(*now > then, "a worker did not run again: {snap} vs {held}");
    }
    assert!(
        num(&rates, "spins") > spins,
        "the spinner is stuck: {rates}"
    );
    assert!(num(&rates, "sleeps") > 0, "{rates}");
    // Every worker's pd->tid is its new tid: pthread_kill reaches it.
    let killed = p.ask("kill");
    assert!(killed.starts_with("killed"), "{killed}");
    // gettid() in every thread: new tids, all in this process.
    let tids = p.ask("tids");
    for tid in tids.split_whitespace().skip(2) {
        let tid: i32 = tid.parse().unwrap();
        assert!(
            Path::new(&format!("/proc/{}/task/{tid}", p.pid)).exists(),
            "{tids}"
        );
    }
    let joined = p.ask("exit");
    assert_eq!(field(&joined, "ok"), "4", "{joined}");
    assert_eq!(field(&joined, "spins_ok"), "1", "{joined}");
    assert_eq!(field(&joined, "waiter"), "7", "{joined}");
    assert_eq!(field(&joined, "sum_ok"), "1", "{joined}");
    assert_eq!(exit_code(p.pid), 42);
}

/// Starts the C target and checkpoints it with its mutex held; returns the process,
/// the template and the `held` line.
fn checkpoint_c(env: &CrEnv, bin: &Path) -> (Proc, Template, String) {
    let mut p = env.spawn(Command::new(bin));
    assert!(p.line().starts_with("ready"));
    assert_eq!(task_count(p.pid), C_THREADS + 1);
    thread::sleep(Duration::from_millis(50));
    let held = p.ask("hold");
    // Let the workers block on the mutex and the main thread in read(0).
    thread::sleep(Duration::from_millis(50));
    p.wait_blocked_in(libc::SYS_read);
    let template = cr::checkpoint(Pid::from_raw(p.pid), &env.checkpoint_opts()).unwrap();
    env.track(template.pid().as_raw());
    let state = template.state();
    assert_eq!(state.threads.len(), C_THREADS, "{:?}", state.threads);
    for th in &state.threads {
        assert_ne!(th.regs.fs_base, 0, "thread {} has no TLS", th.tid);
        assert_ne!(
            th.extras.tid_address, 0,
            "thread {} has no &pd->tid",
            th.tid
        );
        assert_ne!(th.regs.fs_base, state.regs.fs_base);
    }
    assert_ne!(state.main_thread.tid_address, 0);
    // Odd workers block SIGUSR1: their masks were recorded.
    let usr1 = 1u64 << (libc::SIGUSR1 - 1);
    let blocking = state
        .threads
        .iter()
        .filter(|t| t.sigmask & usr1 != 0)
        .count();
    assert_eq!(blocking, 2, "{:?}", state.threads);
    // The template is one stopped task.
    assert_eq!(task_count(template.pid().as_raw()), 1);
    (p, template, held)
}

#[test]
fn a_pthread_program_gets_all_its_threads_back_after_rollback_twice() {
    require_root();
    let dir = TempDir::new("crthr-c");
    let bin = build_c_target(&dir.0);
    let env = CrEnv::new("threads-c");
    let (mut p, template, held) = checkpoint_c(&env, &bin);
    // The original is untouched by the checkpoint: its threads run on.
    assert_eq!(task_count(p.pid), C_THREADS + 1);
    assert_eq!(p.ask("release"), "released");
    let snap = p.ask("snap");
    p.line();
    assert!(num(&snap, "shared") > num(&held, "shared"), "{snap}");

    let restored = cr::rollback(&template, Pid::from_raw(p.pid), &env.restore_opts()).unwrap();
    let mut r = env.adopt(restored);
    check_restored(&mut r, &held);
    // The same node again.
    let mut r2 = env.adopt(template.restore(&env.restore_opts()).unwrap());
    check_restored(&mut r2, &held);
}

#[test]
fn pthread_branches_and_the_original_run_independently() {
    require_root();
    let dir = TempDir::new("crthr-b");
    let bin = build_c_target(&dir.0);
    let env = CrEnv::new("threads-b");
    let (mut p, template, held) = checkpoint_c(&env, &bin);
    let mut branches: Vec<Proc> = (0..3)
        .map(|_| env.adopt(template.restore(&env.restore_opts()).unwrap()))
        .collect();
    for b in &mut branches {
        check_restored(b, &held);
    }
    // The original, checkpointed while running, ends as if nothing happened.
    assert_eq!(p.ask("release"), "released");
    let joined = p.ask("exit");
    assert_eq!(field(&joined, "ok"), "4", "{joined}");
    assert_eq!(field(&joined, "sum_ok"), "1", "{joined}");
    assert_eq!(exit_code(p.pid), 42);
}
