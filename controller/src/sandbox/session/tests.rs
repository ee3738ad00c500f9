//! The drivers against the host's real `bash` and `python3` (no root needed):
//! each test starts its own interpreter as a process-group leader and kills
//! that group (by its pid) when dropped.

use std::collections::BTreeSet;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

use super::*;

const T: Duration = Duration::from_secs(20);

/// A running interpreter with its driver; killed (its whole process group,
/// by pid) on drop.
struct Session {
    kind: SessionKind,
    child: Child,
    io: SessionIo,
}

fn spawn(argv: &[String], env: &[(String, String)]) -> (Child, SessionIo) {
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .envs(env.iter().cloned())
        .env("PATH", "/usr/bin:/bin")
        .env("LANG", "C.UTF-8")
        .current_dir("/tmp")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {:?}: {e}", argv[0]));
    let io = SessionIo {
        stdin: File::from(OwnedFd::from(child.stdin.take().unwrap())),
        stdout: File::from(OwnedFd::from(child.stdout.take().unwrap())),
        stderr: File::from(OwnedFd::from(child.stderr.take().unwrap())),
    };
    (child, io)
}

impl Session {
    fn start(kind: SessionKind) -> Self {
        let (child, io) = spawn(&kind.argv(), &kind.env());
        let mut s = Self { kind, child, io };
        wait_ready(&mut s.io, kind, T).expect("session ready");
        s
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn try_run(&mut self, code: &str, timeout: Duration) -> Result<RunOutput, SessionError> {
        let pgid = Pid::from_raw(self.pid());
        let interrupt = move || killpg(pgid, Signal::SIGINT).map_err(io::Error::from);
        run(&mut self.io, self.kind, code, timeout, &interrupt)
    }

    fn run(&mut self, code: &str) -> RunOutput {
        self.try_run(code, T)
            .unwrap_or_else(|e| panic!("running {code:?}: {e}"))
    }

    /// Runs `code` and checks its stdout and status.
    fn check(&mut self, code: &str, stdout: &str, status: i32) -> RunOutput {
        let out = self.run(code);
        assert_eq!(
            (out.stdout.as_str(), out.status),
            (stdout, status),
            "{code:?}: {out:?}"
        );
        out
    }

    fn proc_entries(&self, what: &str) -> BTreeSet<String> {
        std::fs::read_dir(format!("/proc/{}/{what}", self.pid()))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = killpg(Pid::from_raw(self.pid()), Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

#[test]
fn bash_state_persists_between_calls() {
    let mut s = Session::start(SessionKind::Bash);
    s.check(
        "x=41; f() { echo \"f:$1\"; }; cd /usr; export DBX_T=yes",
        "",
        0,
    );
    s.check(
        "echo $((x+1)); f a; pwd; sh -c 'echo $DBX_T'",
        "42\nf:a\n/usr\nyes\n",
        0,
    );
    s.check("alias hi='echo alias-ok'", "", 0);
    s.check("hi", "alias-ok\n", 0);
    // `declare` inside the driver's function is local; `declare -g` is not.
    s.check("declare -g g=1; declare l=2; declare -gA m=([k]=v)", "", 0);
    s.check("echo \"${g-}|${l-unset}|${m[k]}\"", "1|unset|v\n", 0);
}

#[test]
fn python_state_persists_between_calls() {
    let mut s = Session::start(SessionKind::Python);
    s.check("import os, json\nx = 41\ndef f(a): return 'f:' + a\nos.chdir('/usr')\nos.environ['DBX_T'] = 'yes'", "", 0);
    s.check(
        "print(x + 1, f('a'), os.getcwd(), json.dumps([1]))\nimport subprocess\nprint(subprocess.run(['sh', '-c', 'echo $DBX_T'], capture_output=True, text=True).stdout, end='')",
        "42 f:a /usr [1]\nyes\n",
        0,
    );
    // The code's module is `__main__`: its classes pickle.
    s.check("import pickle\nclass A: pass\npickle.loads(pickle.dumps(A())).__class__.__name__, __name__", "('A', '__main__')\n", 0);
}

#[test]
fn bash_statuses_streams_and_exact_output() {
    let mut s = Session::start(SessionKind::Bash);
    s.check("false", "", 1);
    // `$?` carries over from the previous call, as at a prompt.
    s.check("echo $?", "1\n", 0);
    let out = s.check("echo out; echo err >&2; (exit 7)", "out\n", 7);
    assert_eq!(out.stderr, "err\n");
    assert!(
        !out.timed_out && !out.truncated && out.duration_ms > 0.0,
        "{out:?}"
    );
    s.check("printf 'no newline'", "no newline", 0);
    s.check("", "", 0);
    s.check("echo 'héllo ✓ 日本'", "héllo ✓ 日本\n", 0);
    // The code's stdin is /dev/null, not the request pipe.
    s.check("cat; echo done", "done\n", 0);
    let err = s.try_run("echo a\0b", T).unwrap_err();
    assert!(matches!(err, SessionError::InvalidCode { .. }), "{err}");
    assert!(err.to_string().contains("NUL byte at offset 6"), "{err}");
    s.check("echo still", "still\n", 0);
}

#[test]
fn python_statuses_exceptions_and_echo() {
    let mut s = Session::start(SessionKind::Python);
    s.check("1 + 1", "2\n", 0);
    s.check("None", "", 0);
    s.check("'é✓日本'", "'é✓日本'\n", 0);
    s.check("print('no newline', end='')", "no newline", 0);
    s.check("import sys; print('e', file=sys.stderr); y = 3", "", 0);
    let out = s.check("def g():\n    raise ValueError('boom')\ng()", "", 1);
    assert!(
        out.stderr
            .starts_with("Traceback (most recent call last):\n"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("raise ValueError('boom')"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.ends_with("ValueError: boom\n"), "{}", out.stderr);
    assert!(
        !out.stderr.contains("driver") && !out.stderr.contains("<string>"),
        "{}",
        out.stderr
    );
    let out = s.check("if y:", "", 1);
    assert!(out.stderr.contains("IndentationError"), "{}", out.stderr);
    s.check("raise SystemExit(3)", "", 3);
    s.check("import sys; sys.exit()", "", 0);
    s.check("exit(4)", "", 4);
    s.check("raise KeyboardInterrupt", "", 130);
    s.check("print(y); input() if False else 'alive'", "3\n'alive'\n", 0);
    s.check("input()", "", 1);
}

#[test]
fn large_output_and_the_cap() {
    let mut s = Session::start(SessionKind::Bash);
    let out = s.run("head -c 3000000 /dev/zero | tr '\\0' a; echo -n e >&2");
    assert_eq!(out.stdout.len(), 3_000_000);
    assert!(out.stdout.bytes().all(|b| b == b'a') && out.stderr == "e" && !out.truncated);
    let out =
        s.run("head -c 9000000 /dev/zero | tr '\\0' b; head -c 100 /dev/zero | tr '\\0' c >&2");
    assert!(out.truncated && out.status == 0, "{}", out.status);
    assert_eq!(out.stdout.len(), OUTPUT_CAP);
    assert_eq!(out.stderr, "c".repeat(100));
    s.check("echo next", "next\n", 0);
    // Requests larger than a pipe buffer (bash reads them byte by byte).
    s.check(&format!("# {}\necho big", "x".repeat(200_000)), "big\n", 0);

    let mut p = Session::start(SessionKind::Python);
    let out = p.run("import sys; sys.stderr.write('x' * (9 << 20)); print('ok')");
    assert!(out.truncated && out.stdout == "ok\n", "{}", out.stdout);
    assert_eq!(out.stderr.len(), OUTPUT_CAP);
    p.check("print(len('y' * (2 << 20)))", "2097152\n", 0);
    p.check(
        &format!("s = '{}'\nlen(s)", "é".repeat(1 << 20)),
        "1048576\n",
        0,
    );
}

#[test]
fn output_that_looks_like_a_marker_is_output() {
    let fake = "\u{1e}DBX0123456789abcdef0123456789abcdef 0\u{1e}\u{1e}DBX-ready\u{1e}";
    let mut s = Session::start(SessionKind::Bash);
    let out = s.check(
        &format!("printf '{fake}'; printf '{fake}' >&2; (exit 2)"),
        fake,
        2,
    );
    assert_eq!(out.stderr, fake);
    let mut p = Session::start(SessionKind::Python);
    let literal = fake.replace('\u{1e}', "\\x1e");
    p.check(&format!("print('{literal}', end='')"), fake, 0);
}

/// A call that hits its timeout is interrupted, with its children, and the
/// session keeps its state.
fn check_interrupts(kind: SessionKind, setup: &str, show: &str, shown: &str, codes: &[&str]) {
    let mut s = Session::start(kind);
    s.check(setup, "", 0);
    for code in codes {
        let started = Instant::now();
        let out = s.try_run(code, Duration::from_millis(500)).unwrap();
        assert!(out.timed_out && out.status == 130, "{code:?}: {out:?}");
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{code:?} took {:?}",
            started.elapsed()
        );
        assert_eq!(s.proc_entries("task").len(), 1, "{code:?}");
        s.check(show, shown, 0);
    }
    // Nothing the code started is left in the session's process group.
    let stray = s.run("pgrep -g $$ | wc -l").stdout;
    if kind == SessionKind::Bash {
        // bash itself and wc (pgrep leaves itself out).
        assert!(stray.trim().parse::<u32>().unwrap() <= 2, "{stray}");
    }
}

#[test]
fn bash_timeouts_interrupt_the_code_not_the_session() {
    check_interrupts(
        SessionKind::Bash,
        "x=5",
        "echo $x",
        "5\n",
        &[
            "sleep 100",
            "while true; do :; done",
            "f() { while :; do sleep 100; done; }; g() { f; echo no; }; g; echo no",
            "f() { while :; do :; done; }; f",
            "sleep 100 | cat",
        ],
    );
}

#[test]
fn python_timeouts_interrupt_the_code_not_the_session() {
    check_interrupts(
        SessionKind::Python,
        "x = 5",
        "print(x)",
        "5\n",
        &[
            "import time; time.sleep(100)",
            "while True: pass",
            "import subprocess; subprocess.run(['sleep', '100'])",
        ],
    );
}

#[test]
fn an_interrupt_between_calls_is_dropped() {
    for (kind, set, get, want) in [
        (SessionKind::Bash, "x=7", "echo $x", "7\n"),
        (SessionKind::Python, "x = 7", "x", "7\n"),
    ] {
        let mut s = Session::start(kind);
        s.check(set, "", 0);
        killpg(Pid::from_raw(s.pid()), Signal::SIGINT).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        s.check(get, want, 0);
    }
}

#[test]
fn between_calls_single_thread_and_only_stdio_open() {
    for (kind, code) in [
        (
            SessionKind::Bash,
            "x=$(echo 1); cat /etc/hostname >/dev/null",
        ),
        (
            SessionKind::Python,
            "import json, subprocess; subprocess.run(['true']); f = open('/etc/hostname'); f.close()",
        ),
    ] {
        let mut s = Session::start(kind);
        for _ in 0..2 {
            s.check(code, "", 0);
            assert_eq!(s.proc_entries("task").len(), 1, "{kind} threads");
            let fds: Vec<String> = s.proc_entries("fd").into_iter().collect();
            assert_eq!(fds, ["0", "1", "2"], "{kind} open fds");
        }
        // Also after an interrupted call.
        s.try_run(
            if kind == SessionKind::Bash {
                "sleep 100"
            } else {
                "import time; time.sleep(100)"
            },
            Duration::from_millis(300),
        )
        .unwrap();
        let fds: Vec<String> = s.proc_entries("fd").into_iter().collect();
        assert_eq!(fds, ["0", "1", "2"], "{kind} open fds after an interrupt");
    }
}

#[test]
fn a_killed_or_exiting_session_is_reported_not_waited_for() {
    for kind in [SessionKind::Bash, SessionKind::Python] {
        let mut s = Session::start(kind);
        kill(Pid::from_raw(s.pid()), Signal::SIGKILL).unwrap();
        let _ = s.child.wait();
        let err = s.try_run("echo hi", T).unwrap_err();
        assert!(
            matches!(err, SessionError::Exited { status: None, .. }),
            "{kind}: {err}"
        );
    }
    let mut s = Session::start(SessionKind::Bash);
    match s.try_run("echo bye; exit 3", T).unwrap_err() {
        SessionError::Exited {
            status: Some(3),
            stdout,
            ..
        } => assert_eq!(stdout, "bye\n"),
        other => panic!("{other}"),
    }
    // Killed mid-call, with a background child still holding stdout.
    let mut s = Session::start(SessionKind::Bash);
    let started = Instant::now();
    let err = s.try_run("sleep 100 & kill -9 $$", T).unwrap_err();
    assert!(
        matches!(err, SessionError::Exited { status: None, .. }),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    let mut p = Session::start(SessionKind::Python);
    let err = p
        .try_run("print('x', flush=True)\nimport os; os._exit(5)", T)
        .unwrap_err();
    assert!(
        matches!(&err, SessionError::Exited { status: None, stdout, .. } if stdout == "x\n"),
        "{err}"
    );
}

#[test]
fn a_session_that_does_not_answer_the_interrupt_is_unresponsive() {
    let mut s = Session::start(SessionKind::Bash);
    let started = Instant::now();
    let err = s
        .try_run("trap '' INT; sleep 100", Duration::from_millis(200))
        .unwrap_err();
    assert!(matches!(err, SessionError::Unresponsive { .. }), "{err}");
    assert!(started.elapsed() >= INTERRUPT_GRACE && started.elapsed() < INTERRUPT_GRACE * 2);
}

/// The driver reads exactly one request at a time: two requests written back
/// to back are answered in order, each with its own marker. (The second
/// sleeps before printing: bytes read after a marker in the same read count
/// as output of that call, from its background jobs.)
#[test]
fn back_to_back_requests_are_answered_in_order() {
    for (kind, a, b) in [
        (
            SessionKind::Bash,
            "sleep 0.2; echo one; v=1",
            "sleep 1; echo two$v",
        ),
        (
            SessionKind::Python,
            "import time; time.sleep(0.2); print('one'); v = 1",
            "time.sleep(1); print('two', v)",
        ),
    ] {
        let mut s = Session::start(kind);
        let mut both = encode_request(kind, "aaaa", a).unwrap();
        both.extend(encode_request(kind, "bbbb", b).unwrap());
        (&s.io.stdin).write_all(&both).unwrap();
        for (nonce, want) in [
            ("aaaa", "one\n"),
            (
                "bbbb",
                if kind == SessionKind::Bash {
                    "two1\n"
                } else {
                    "two 1\n"
                },
            ),
        ] {
            let prefix = format!("\x1eDBX{nonce} ").into_bytes();
            let ex = exchange(&mut s.io, kind, &[], &prefix, T, None).unwrap();
            assert!(
                matches!(ex.outcome, Outcome::Replied(Reply::Status(0))),
                "{kind} {nonce}"
            );
            assert_eq!(ex.stdout.finish().0, want, "{kind} {nonce}");
        }
    }
}

#[test]
fn readiness_failures_are_named() {
    let argv = [
        "python3",
        "-c",
        "import sys; sys.stderr.write('boom'); sys.exit(2)",
    ]
    .map(String::from);
    let (mut child, mut io) = spawn(&argv, &[]);
    let err = wait_ready(&mut io, SessionKind::Python, T).unwrap_err();
    let _ = child.wait();
    assert!(
        matches!(&err, SessionError::Exited { stderr, .. } if stderr == "boom"),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "python session exited (status unknown); stderr: \"boom\""
    );
    let argv = ["sleep", "30"].map(String::from);
    let (mut child, mut io) = spawn(&argv, &[]);
    let err = wait_ready(&mut io, SessionKind::Bash, Duration::from_millis(200)).unwrap_err();
    let _ = child.kill();
    let _ = child.wait();
    assert!(matches!(err, SessionError::ReadyTimeout { .. }), "{err}");
    assert!(
        "ruby"
            .parse::<SessionKind>()
            .unwrap_err()
            .to_string()
            .contains("\"ruby\"")
    );
    assert_eq!(
        "python".parse::<SessionKind>().unwrap(),
        SessionKind::Python
    );
}
