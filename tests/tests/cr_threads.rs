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

use deltabox_controller::cr::{self, CrError, Template};
use deltabox_tests::cr::{CrEnv, Proc, field};
use deltabox_tests::daemon::TestDaemon;
use deltabox_tests::sandbox::{Http, id_of};
use deltabox_tests::{require_root, unique};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::Pid;
use serde_json::json;

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
    // Every thread runs again: polled, since on two loaded CPUs a thread may wait a
    // while for its turn.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        thread::sleep(Duration::from_millis(20));
        let snap = p.ask("snap");
        let rates = p.line();
        assert_eq!(num(&snap, "shared"), num(&snap, "sum"), "{snap}");
        let all_ran = counters(&snap)
            .iter()
            .zip(counters(held))
            .all(|(now, then)| *now > then)
            && num(&rates, "spins") > spins
            && num(&rates, "sleeps") > 0;
        if all_ran {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a thread did not run again in 10 s: {snap} {rates} vs {held}"
        );
    }
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
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let snap = p.ask("snap");
        p.line();
        if num(&snap, "shared") > num(&held, "shared") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the original's workers are stuck: {snap}"
        );
        thread::sleep(Duration::from_millis(10));
    }

    let restored = cr::rollback(&template, Pid::from_raw(p.pid), &env.restore_opts()).unwrap();
    eprintln!(
        "{} threads: checkpoint pause {:?}, whole checkpoint {:?}; rollback {:?}",
        C_THREADS + 1,
        template.timings().paused,
        template.timings().total,
        restored.timings.total
    );
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

/// The Python program of [`python_threads_come_back_in_rollbacks_and_branches`]:
/// counters under a lock, a sleeper (`time.sleep`), a consumer blocked in
/// `queue.Queue.get`, a waiter blocked in `threading.Event.wait`, and a spinner in pure
/// Python, all started and running.
const PY_START: &str = "\
import threading, time, queue
lock = threading.Lock()
counts = [0, 0, 0]
shared = [0]
stop = threading.Event()
ev = threading.Event()
q = queue.Queue()
results = queue.Queue()
def counter(i):
    while not stop.is_set():
        with lock:
            counts[i] += 1
            shared[0] += 1
        time.sleep(0.001)
def sleeper():
    n = 0
    while not stop.is_set():
        time.sleep(0.02)
        n += 1
    results.put(('sleeper', n))
def consumer():
    while True:
        item = q.get()
        if item is None:
            break
        results.put(('item', item * 2))
def event_waiter():
    ev.wait()
    results.put(('event', 1))
def spinner():
    x = 0
    while not stop.is_set():
        x += 1
    results.put(('spin', x))
threads = [threading.Thread(target=counter, args=(i,), name='counter%d' % i) for i in range(3)]
threads += [threading.Thread(target=f, name=f.__name__) for f in (sleeper, consumer, event_waiter, spinner)]
for t in threads:
    t.start()
time.sleep(0.1)
print(len(threading.enumerate()))";

/// Run in a restored session: the counters are exactly the checkpoint's (the lock was
/// held), then every thread works and ends.
const PY_CHECK: &str = "\
import time as _t
_ok = [counts == held, shared[0] == sum(counts), marker]
_names = sorted(t.name for t in threading.enumerate())
lock.release()
_end = _t.time() + 10
while True:
    with lock:
        _moved = all(c > h for c, h in zip(counts, held))
        _inv = shared[0] == sum(counts)
    if _moved or _t.time() > _end:
        break
    _t.sleep(0.02)
_ok += [_moved, _inv]
q.put(5)
_ok.append(results.get(timeout=10) == ('item', 10))
ev.set()
_ok.append(results.get(timeout=10) == ('event', 1))
stop.set()
q.put(None)
for t in threads:
    t.join(timeout=10)
_ok.append(not any(t.is_alive() for t in threads))
_rest = dict(results.get() for _ in range(2))
_ok.append(_rest['sleeper'] > 0 and _rest['spin'] > 0)
_ok.append([t.name for t in threading.enumerate()] == ['MainThread'])
print(_names)
print(_ok)";

const PY_NAMES: &str = "['MainThread', 'consumer', 'counter0', 'counter1', 'counter2', \
                        'event_waiter', 'sleeper', 'spinner']";

fn py_check(http: &Http, sandbox: &str, session: &str, what: &str) {
    let out = http.run(sandbox, session, PY_CHECK);
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some(PY_NAMES), "{what}: {out}");
    assert_eq!(
        lines.next(),
        Some("[True, True, True, True, True, True, True, True, True, True]"),
        "{what}: {out}"
    );
}

#[test]
fn python_threads_come_back_in_rollbacks_and_branches() {
    require_root();
    let daemon = TestDaemon::start("crthr-py", &[]);
    let http = Http::new(daemon.socket());
    let sandbox = id_of(&http.create(&json!({})));
    let session = http.session(&sandbox, "python");
    assert_eq!(http.run(&sandbox, &session, PY_START), "8\n");
    // Checkpointed while the threads run, with the lock held: the counter threads are
    // blocked on it, the others in their waits or spinning.
    http.run(
        &sandbox,
        &session,
        "lock.acquire()\nheld = list(counts)\nmarker = True",
    );
    let node = http.checkpoint(&sandbox, "threads");
    // The original keeps running its threads.
    let out = http.run(
        &sandbox,
        &session,
        "lock.release()\nmarker = False\nend = time.time() + 10\n\
         while not all(c > h for c, h in zip(counts, held)) and time.time() < end:\n    \
         time.sleep(0.02)\n\
         with lock:\n    print(all(c > h for c, h in zip(counts, held)), len(threading.enumerate()))",
    );
    assert_eq!(out, "True 8\n");

    http.rollback(&sandbox, &node);
    py_check(&http, &sandbox, &session, "first rollback");
    http.rollback(&sandbox, &node);
    py_check(
        &http,
        &sandbox,
        &session,
        "second rollback to the same node",
    );

    let branches = http.branch(&node, 3);
    assert_eq!(branches.len(), 3);
    for b in &branches {
        let sid = id_of(b);
        let session = id_of(&http.sandbox(&sid)["sessions"][0]);
        py_check(&http, &sid, &session, &format!("branch {sid}"));
    }
}

/// Checkpoints taken while a thread creates and joins short-lived threads in a loop
/// catch threads being born and exiting: each restore has a churner that goes on (a
/// thread caught mid-exit must not leave a `pthread_join` waiting forever), and
/// everything joins.
#[test]
fn checkpoints_catch_threads_being_born_and_dying() {
    require_root();
    let dir = TempDir::new("crthr-ch");
    let bin = build_c_target(&dir.0);
    let env = CrEnv::new("threads-churn");
    let mut cmd = Command::new(&bin);
    cmd.arg("churn");
    let mut p = env.spawn(cmd);
    assert!(p.line().starts_with("ready"));
    let mut templates = Vec::new();
    for _ in 0..10 {
        thread::sleep(Duration::from_millis(7));
        let template = cr::checkpoint(Pid::from_raw(p.pid), &env.checkpoint_opts()).unwrap();
        env.track(template.pid().as_raw());
        templates.push(template);
    }
    let before = num(&p.ask("churns"), "churns");
    for template in &templates {
        let mut r = env.adopt(template.restore(&env.restore_opts()).unwrap());
        let first = num(&r.ask("churns"), "churns");
        let deadline = Instant::now() + Duration::from_secs(10);
        while num(&r.ask("churns"), "churns") <= first {
            assert!(
                Instant::now() < deadline,
                "the churner of pid {} is stuck at {first}",
                r.pid
            );
            thread::sleep(Duration::from_millis(10));
        }
        let joined = r.ask("exit");
        assert_eq!(field(&joined, "ok"), "4", "{joined}");
        assert_eq!(field(&joined, "sum_ok"), "1", "{joined}");
        assert_eq!(exit_code(r.pid), 42);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while num(&p.ask("churns"), "churns") <= before {
        assert!(Instant::now() < deadline, "the original's churner is stuck");
        thread::sleep(Duration::from_millis(10));
    }
    let joined = p.ask("exit");
    assert_eq!(field(&joined, "ok"), "4", "{joined}");
    assert_eq!(exit_code(p.pid), 42);
}

/// A process whose main thread has exited (`pthread_exit` in `main`) while another
/// runs is refused, naming it, and left running: the fork is injected into the main
/// thread.
#[test]
fn a_process_whose_main_thread_exited_is_refused_and_untouched() {
    require_root();
    let dir = TempDir::new("crthr-lx");
    let bin = build_c_target(&dir.0);
    let env = CrEnv::new("threads-lx");
    let mut cmd = Command::new(&bin);
    cmd.arg("leaderexit");
    let mut p = env.spawn(cmd);
    assert_eq!(p.line(), "ready");
    let err = cr::checkpoint(Pid::from_raw(p.pid), &env.checkpoint_opts()).unwrap_err();
    match &err {
        CrError::LeaderExited { pid, comm, threads } => {
            assert_eq!((*pid, comm.as_str(), *threads), (p.pid, "cr-threads", 2));
        }
        other => panic!("{other:?}"),
    }
    assert!(
        err.to_string()
            .contains(&format!("pid {} (cr-threads)", p.pid)),
        "{err}"
    );
    let templates = env.checkpoint_opts().template_cgroups;
    let left = fs::read_dir(&templates)
        .unwrap()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .count();
    assert_eq!(
        left,
        0,
        "a template cgroup was left in {}",
        templates.display()
    );
    // Untouched: its thread is neither stopped nor traced.
    let tid = fs::read_dir(format!("/proc/{}/task", p.pid))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|t| *t != p.pid.to_string())
        .expect("the other thread");
    let status = fs::read_to_string(format!("/proc/{}/task/{tid}/status", p.pid)).unwrap();
    assert!(status.contains("TracerPid:\t0\n"), "{status}");
    assert!(
        status.contains("State:\tS") || status.contains("State:\tR"),
        "{status}"
    );
}

/// The threads' recorded state is kept with the node in the tree database: a
/// restarted daemon adopts the templates and revives the session at its head node
/// with every thread.
#[test]
fn python_threads_come_back_after_a_daemon_restart() {
    require_root();
    let mut daemon = TestDaemon::start("crthr-rs", &[]);
    let http = Http::new(daemon.socket());
    let sandbox = id_of(&http.create(&json!({})));
    let session = http.session(&sandbox, "python");
    assert_eq!(http.run(&sandbox, &session, PY_START), "8\n");
    http.run(
        &sandbox,
        &session,
        "lock.acquire()\nheld = list(counts)\nmarker = True",
    );
    http.checkpoint(&sandbox, "threads");
    http.run(&sandbox, &session, "lock.release()\nmarker = False");
    daemon.kill();
    daemon.restart(&[]);
    let http = Http::new(daemon.socket());
    py_check(&http, &sandbox, &session, "revived by a restarted daemon");
}

/// `SigPnd` of thread `tid` of `pid`.
fn thread_pending(pid: i32, tid: &str) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("SigPnd:"))
        .expect("SigPnd");
    u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
}

/// A signal pending for one thread, which blocks it, is pending for that thread again
/// in a restore (sent with `tgkill` to its new tid), and for no other.
#[test]
fn a_signal_pending_for_a_thread_is_pending_for_it_again() {
    require_root();
    let dir = TempDir::new("crthr-sig");
    let bin = build_c_target(&dir.0);
    let env = CrEnv::new("threads-sig");
    let mut p = env.spawn(Command::new(&bin));
    assert!(p.line().starts_with("ready"));
    // Worker 1 is the second thread after the main one (`tids` prints workers first).
    let tids = p.ask("tids");
    let worker1 = tids.split_whitespace().nth(3).unwrap().to_owned();
    assert_eq!(p.ask("usr1"), "usr1 sent");
    let usr1 = 1u64 << (libc::SIGUSR1 - 1);
    assert_ne!(thread_pending(p.pid, &worker1) & usr1, 0);
    p.wait_blocked_in(libc::SYS_read);
    let template = cr::checkpoint(Pid::from_raw(p.pid), &env.checkpoint_opts()).unwrap();
    env.track(template.pid().as_raw());
    let pending: Vec<bool> = template
        .state()
        .threads
        .iter()
        .map(|t| t.sig_pending & usr1 != 0)
        .collect();
    assert_eq!(pending.iter().filter(|p| **p).count(), 1, "{pending:?}");
    let mut r = env.adopt(template.restore(&env.restore_opts()).unwrap());
    let tids = r.ask("tids");
    let new_tids: Vec<&str> = tids.split_whitespace().skip(2).collect();
    for (i, tid) in new_tids.iter().enumerate() {
        let has = thread_pending(r.pid, tid) & usr1 != 0;
        assert_eq!(has, i == 1, "thread {i} ({tid}) of pid {}: {tids}", r.pid);
    }
    assert_eq!(thread_pending(r.pid, &r.pid.to_string()) & usr1, 0);
    let joined = r.ask("exit");
    assert_eq!(field(&joined, "ok"), "4", "{joined}");
    assert_eq!(exit_code(r.pid), 42);
}
