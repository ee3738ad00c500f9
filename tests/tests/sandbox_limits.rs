//! Sandbox limits through a real `deltaboxd`: a memory hog is OOM-killed inside its
//! sandbox while the daemon and another sandbox keep working; a pids limit stops a
//! fork bomb and the sandbox runs commands afterwards; branches keep the limits of the
//! sandbox their node was taken in. (On this host memory and pids are cgroup v1
//! controllers: docs/sandbox-runtime.md.)

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use deltabox_tests::daemon::TestDaemon;
use deltabox_tests::require_root;
use deltabox_tests::sandbox::{Http, id_of};
use serde_json::{Value, json};

const MIB: u64 = 1 << 20;

/// Allocates (and touches) 16 MiB at a time up to 1 GiB, then says it survived.
const HOG: &str = "chunks = []\n\
                   for _ in range(64):\n    chunks.append(b'\\x01' * (16 << 20))\n\
                   print('survived', len(chunks))";

/// Forks children that sleep until it has 100 or a fork fails; prints how many it got
/// and the errno, then kills and reaps them.
const FORKS: &str = r#"import os, time
kids = []
err = 0
try:
    for _ in range(100):
        pid = os.fork()
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        kids.append(pid)
except OSError as e:
    err = e.errno
for k in kids:
    os.kill(k, 9)
for k in kids:
    os.waitpid(k, 0)
print(len(kids), err)"#;

/// Asserts an `exec` result is a process killed by the OOM killer (SIGKILL, or a
/// nonzero exit if a wrapper reported it), not one that got its memory.
fn assert_oom_killed(out: &Value, what: &str) {
    let killed = out["signal"] == 9 || out["exit_code"].as_i64().is_some_and(|c| c != 0);
    assert!(killed, "{what}: the memory hog was not killed: {out}");
    assert!(
        !out["stdout"].as_str().unwrap_or("").contains("survived"),
        "{what}: the memory hog got 1 GiB under a 64 MiB limit: {out}"
    );
    assert_eq!(out["timed_out"], false, "{what}: {out}");
}

/// Runs [`FORKS`] in `sandbox` and returns how many children it got.
fn forks_allowed(http: &Http, sandbox: &str) -> u64 {
    let out = http.exec(sandbox, &["python3", "-c", FORKS], Some(60_000));
    assert_eq!(out["exit_code"], 0, "fork probe in {sandbox}: {out}");
    parse_forks(out["stdout"].as_str().unwrap_or(""), sandbox)
}

fn parse_forks(stdout: &str, sandbox: &str) -> u64 {
    let mut words = stdout.split_whitespace();
    let kids: u64 = words.next().and_then(|w| w.parse().ok()).unwrap_or(999);
    let errno: i32 = words.next().and_then(|w| w.parse().ok()).unwrap_or(-1);
    assert_eq!(
        errno,
        libc::EAGAIN,
        "fork probe in {sandbox}: forks did not fail with EAGAIN: {stdout:?}"
    );
    kids
}

/// Asserts the limits a sandbox reports.
fn assert_limits(info: &Value, memory: u64, pids: u64) {
    assert_eq!(
        info["limits"],
        json!({"memory_bytes": memory, "pids": pids}),
        "limits of {info}"
    );
}

#[test]
fn a_memory_hog_is_oom_killed_inside_while_others_keep_working() {
    require_root();
    let daemon = TestDaemon::start("l-mem", &[]);
    let http = Http::new(daemon.socket());
    let limited = http.create(&json!({"limits": {"memory_bytes": 64 * MIB}}));
    assert_limits_memory(&limited, 64 * MIB);
    let limited = id_of(&limited);
    let other = id_of(&http.create(&json!({})));
    // Below the limit is fine.
    let out = http.exec(
        &limited,
        &["python3", "-c", "b = b'x' * (24 << 20)\nprint(len(b))"],
        Some(60_000),
    );
    assert_eq!(out["stdout"], format!("{}\n", 24 * MIB), "{out}");

    // The other sandbox keeps answering while the hog runs.
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (http, other, done) = (http.clone(), other.clone(), Arc::clone(&done));
        thread::spawn(move || {
            let mut answered = 0;
            while !done.load(Ordering::SeqCst) {
                assert_eq!(http.sh(&other, "echo ok"), "ok\n");
                answered += 1;
            }
            answered
        })
    };
    let out = http.exec(&limited, &["python3", "-c", HOG], Some(60_000));
    done.store(true, Ordering::SeqCst);
    let answered = watcher
        .join()
        .expect("the other sandbox failed while the hog ran");
    assert!(answered >= 1, "the other sandbox never answered");
    assert_oom_killed(&out, "exec in a 64 MiB sandbox");

    // Everything still works: the limited sandbox, the other one, the daemon.
    assert_eq!(http.sh(&limited, "echo still here"), "still here\n");
    assert_eq!(http.sh(&other, "echo ok"), "ok\n");
    let s = http.session(&limited, "python");
    assert_eq!(http.run(&limited, &s, "print(6 * 7)"), "42\n");
    assert_eq!(http.get("/v1/status").status, 200);
    // A session the OOM killer kills ends its call with `limits_exceeded`, and is gone.
    http.run_reply(&limited, &s, HOG).expect_error(
        422,
        "limits_exceeded",
        &[&limited, "memory", &s],
        "a session run past the memory limit",
    );
    let info = http.sandbox(&limited);
    assert_eq!(
        info["sessions"],
        json!([]),
        "the killed session is listed: {info}"
    );
    let s = http.session(&limited, "python");
    assert_eq!(http.run(&limited, &s, "print(6 * 7)"), "42\n");
    // The other sandbox has no limit: the same hog survives there.
    let out = http.exec(&other, &["python3", "-c", HOG], Some(60_000));
    assert!(
        out["stdout"].as_str().unwrap_or("").contains("survived 64"),
        "without a limit the hog should get its 1 GiB: {out}"
    );
}

fn assert_limits_memory(info: &Value, memory: u64) {
    assert_eq!(
        info["limits"],
        json!({ "memory_bytes": memory }),
        "limits of {info}"
    );
}

#[test]
fn a_pids_limit_stops_a_fork_bomb_and_the_sandbox_recovers() {
    require_root();
    let daemon = TestDaemon::start("l-pids", &[]);
    let http = Http::new(daemon.socket());
    let info = http.create(&json!({"limits": {"pids": 32}}));
    assert_eq!(info["limits"], json!({"pids": 32}));
    let sb = id_of(&info);
    let other = id_of(&http.create(&json!({})));

    let kids = forks_allowed(&http, &sb);
    assert!(
        (8..32).contains(&kids),
        "with pids.max 32 a process got {kids} children"
    );

    // A node from before the bomb: rolling back to it is how the sandbox gets rid of
    // the processes the bomb leaves running.
    let before = http.checkpoint(&sb, "before the bomb");
    let start = Instant::now();
    // `exec` returns once bash itself has exited; the bomb goes on in the background,
    // held by pids.max.
    let out = http.exec(&sb, &["bash", "-c", ":(){ :|:& };:"], Some(5_000));
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(60),
        "the fork bomb's exec took {took:?}: {out}"
    );
    thread::sleep(Duration::from_millis(500));
    // The host and other sandboxes were never short of pids.
    assert_eq!(http.sh(&other, "echo ok"), "ok\n");

    // The rollback kills everything the bomb left (frozen first, so nothing forks
    // meanwhile); then the sandbox runs commands again and its limit still holds.
    http.rollback(&sb, &before);
    let reply = http.post(
        &format!("/v1/sandboxes/{sb}/exec"),
        &json!({"argv": ["echo", "ok"]}),
    );
    assert_eq!(
        reply.body["stdout"], "ok\n",
        "the sandbox does not run commands after rolling the fork bomb back: {}",
        reply.text
    );
    let again = forks_allowed(&http, &sb);
    assert_eq!(
        again, kids,
        "the bomb left processes behind, or the limit moved"
    );
    let s = http.session(&sb, "bash");
    assert_eq!(http.run(&sb, &s, "echo $((6*7))"), "42\n");
}

#[test]
fn a_branch_keeps_the_limits_of_its_sandbox() {
    require_root();
    let daemon = TestDaemon::start("l-br", &[]);
    let http = Http::new(daemon.socket());
    let sb = id_of(&http.create(&json!({"limits": {"memory_bytes": 64 * MIB, "pids": 32}})));
    let session = http.session(&sb, "python");
    http.run(&sb, &session, "x = 7");
    let kids = forks_allowed(&http, &sb);
    let node = http.checkpoint(&sb, "limited");
    let branches = http.branch(&node, 2);
    assert_eq!(branches.len(), 2);
    for b in &branches {
        assert_limits(b, 64 * MIB, 32);
        let b = id_of(b);
        assert_limits(&http.sandbox(&b), 64 * MIB, 32);
        // Enforced for new processes…
        let got = forks_allowed(&http, &b);
        assert!(got < 32, "branch {b}: a process got {got} children");
        assert!(
            got.abs_diff(kids) <= 2,
            "branch {b}: {got} children, the original sandbox {kids}"
        );
        let out = http.exec(&b, &["python3", "-c", HOG], Some(60_000));
        assert_oom_killed(&out, &format!("exec in branch {b}"));
        // …and for the session restored from the node.
        let s = http.sandbox(&b)["sessions"][0]["id"]
            .as_str()
            .expect("the branch has the node's session")
            .to_owned();
        assert_eq!(http.run(&b, &s, "print(x)"), "7\n");
        let got = parse_forks(&http.run(&b, &s, FORKS), &b);
        assert!(got < 32, "session of branch {b}: got {got} children");
        assert_eq!(http.sh(&b, "echo ok"), "ok\n");
    }
    // The original is unchanged.
    assert_limits(&http.sandbox(&sb), 64 * MIB, 32);
    assert_eq!(http.run(&sb, &session, "print(x)"), "7\n");
}

#[test]
fn a_branch_of_a_removed_sandbox_keeps_its_limits() {
    require_root();
    let daemon = TestDaemon::start("l-brrm", &[]);
    let http = Http::new(daemon.socket());
    let sb = id_of(&http.create(&json!({"limits": {"memory_bytes": 64 * MIB, "pids": 32}})));
    let node = http.checkpoint(&sb, "limited");
    http.delete(&format!("/v1/sandboxes/{sb}"))
        .expect(200, "remove the sandbox");
    let b = http.branch(&node, 1).remove(0);
    assert_limits(&b, 64 * MIB, 32);
    let b = id_of(&b);
    let got = forks_allowed(&http, &b);
    assert!(got < 32, "branch {b}: a process got {got} children");
}

/// Two sessions (a rollback forks each on a thread of its own) come back with their
/// state from a sandbox whose pids limit a fork bomb holds full: the forks ahead of the
/// rollback may be refused while the bomb's processes exit, and the sessions are then
/// restored after them.
#[test]
fn a_rollback_out_of_a_fork_bomb_restores_every_session() {
    require_root();
    let daemon = TestDaemon::start("l-pids2", &[]);
    let http = Http::new(daemon.socket());
    let sb = id_of(&http.create(&json!({"limits": {"pids": 32}})));
    let sh = http.session(&sb, "bash");
    let py = http.session(&sb, "python");
    assert_eq!(http.run(&sb, &sh, "X=41; cd /tmp; echo $X"), "41\n");
    assert_eq!(http.run(&sb, &py, "y = [7] * 3; print(len(y))"), "3\n");
    let before = http.checkpoint(&sb, "two sessions");
    assert_eq!(http.run(&sb, &sh, "X=0; cd /"), "");
    assert_eq!(http.run(&sb, &py, "y = None"), "");
    let _ = http.exec(&sb, &["bash", "-c", ":(){ :|:& };:"], Some(5_000));
    thread::sleep(Duration::from_millis(500));

    http.rollback(&sb, &before);
    assert_eq!(http.run(&sb, &sh, "echo $((X+1)) $PWD"), "42 /tmp\n");
    assert_eq!(http.run(&sb, &py, "print(y)"), "[7, 7, 7]\n");
    // And again, with nothing in the way of the forks.
    assert_eq!(http.run(&sb, &py, "y = 1"), "");
    http.rollback(&sb, &before);
    assert_eq!(http.run(&sb, &py, "print(sum(y))"), "21\n");
    assert_eq!(http.run(&sb, &sh, "echo $X"), "41\n");
}
