//! The streamed `exec` against a real `deltaboxd`: events in order and as they happen
//! (the first chunk before the command exits), the exit event (auto-checkpoint node
//! included), an error event when the sandbox is removed under the command, the 8 MiB
//! cap, output that is not UTF-8, back-pressure from a client that does not read, plain
//! errors before the command starts, and `deltabox exec` streaming to its stdout.

use std::io::{BufRead as _, BufReader, Read as _};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use deltabox_controller::api::client::{Client, ClientError, ExecEvents};
use deltabox_controller::api::sandbox_types::{
    CreateSandbox, ExecEvent, ExecExit, ExecRequest, StreamError,
};
use deltabox_tests::daemon::{TestDaemon, binary};
use deltabox_tests::require_root;

/// A daemon, a client of it and a runtime to drive the client.
struct Fixture {
    daemon: TestDaemon,
    client: Client,
    rt: tokio::runtime::Runtime,
}

impl Fixture {
    fn new(test: &str) -> Self {
        require_root();
        let daemon = TestDaemon::start(test, &[]);
        let client = Client::new(daemon.socket());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        Self { daemon, client, rt }
    }

    fn sandbox(&self, auto_checkpoint: bool) -> String {
        let req = CreateSandbox {
            auto_checkpoint,
            ..CreateSandbox::default()
        };
        self.rt
            .block_on(self.client.create_sandbox(&req))
            .expect("create a sandbox")
            .id
    }

    fn stream(&self, sandbox: &str, script: &str) -> ExecEvents {
        self.rt
            .block_on(self.client.exec_stream(sandbox, &sh(script)))
            .unwrap_or_else(|e| panic!("streamed exec of {script:?}: {e}"))
    }

    /// Every event of a streamed `sh -c script`, each with when it arrived.
    fn events(&self, sandbox: &str, script: &str) -> (Vec<(ExecEvent, Instant)>, Instant) {
        let start = Instant::now();
        let mut events = self.stream(sandbox, script);
        let mut all = Vec::new();
        while let Some(event) = self.rt.block_on(events.next()).expect("next event") {
            all.push((event, Instant::now()));
        }
        (all, start)
    }
}

fn sh(script: &str) -> ExecRequest {
    ExecRequest {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        timeout_ms: Some(60_000),
        ..ExecRequest::default()
    }
}

/// stdout and stderr gathered from the output events, and the last event.
fn gather(events: &[(ExecEvent, Instant)]) -> (Vec<u8>, Vec<u8>, &ExecEvent) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    for (event, _) in events {
        match event {
            ExecEvent::Stdout(c) => out.extend(c.bytes().expect("valid base64")),
            ExecEvent::Stderr(c) => err.extend(c.bytes().expect("valid base64")),
            ExecEvent::Exit(_) | ExecEvent::Error(_) => {}
        }
    }
    let last = &events.last().expect("at least the last event").0;
    (out, err, last)
}

fn exit_of(event: &ExecEvent) -> &ExecExit {
    match event {
        ExecEvent::Exit(exit) => exit,
        other => panic!("expected the exit event, got {other:?}"),
    }
}

#[test]
fn events_come_in_order_as_they_happen() {
    let f = Fixture::new("st-order");
    let sb = f.sandbox(false);
    let (events, start) = f.events(
        &sb,
        "echo one; sleep 0.3; echo err >&2; sleep 2; echo two; exit 3",
    );
    let kinds: Vec<String> = events
        .iter()
        .map(|(e, _)| match e {
            ExecEvent::Stdout(c) => format!("out:{}", c.data.as_deref().unwrap_or("?")),
            ExecEvent::Stderr(c) => format!("err:{}", c.data.as_deref().unwrap_or("?")),
            ExecEvent::Exit(_) => "exit".to_owned(),
            ExecEvent::Error(e) => format!("error:{}", e.message),
        })
        .collect();
    assert_eq!(kinds, ["out:one\n", "err:err\n", "out:two\n", "exit"]);
    let exit = exit_of(&events[3].0);
    assert_eq!((exit.exit_code, exit.signal), (Some(3), None));
    assert!(!exit.timed_out && !exit.truncated && exit.node.is_none());
    // The first chunk came while the command still had two seconds to sleep.
    let first = events[0].1 - start;
    let last = events[3].1 - start;
    assert!(
        first < Duration::from_millis(1500),
        "the first chunk took {first:?}"
    );
    assert!(
        last - first >= Duration::from_millis(1800),
        "first chunk at {first:?}, exit at {last:?}: the output was not streamed"
    );
    assert!(exit.duration_ms >= 2000.0, "{exit:?}");
}

#[test]
fn the_exit_event_carries_the_auto_checkpoint() {
    let f = Fixture::new("st-auto");
    let sb = f.sandbox(true);
    let (events, _) = f.events(&sb, "echo hi > /workspace/f; cat /workspace/f");
    let (out, _, last) = gather(&events);
    assert_eq!(out, b"hi\n");
    let node = exit_of(last).node.as_ref().expect("auto-checkpoint node");
    let tree = f.rt.block_on(f.client.sandbox_tree(&sb)).expect("tree");
    assert!(
        tree.nodes.iter().any(|n| n.id == node.id),
        "node {} is not in the tree",
        node.id
    );
    // The collected exec gets the same: streamed and collected share the code.
    let collected =
        f.rt.block_on(f.client.exec(&sb, &sh("cat /workspace/f")))
            .expect("collected exec");
    assert_eq!(collected.stdout, "hi\n");
    assert!(collected.node.is_some());
}

#[test]
fn streamed_calls_on_one_sandbox_wait_their_turn() {
    let f = Fixture::new("st-ser");
    let sb = f.sandbox(false);
    // Both at once; each records when its command printed first and when it ended.
    let run = |tag: &'static str| {
        let (client, sb) = (f.client.clone(), sb.clone());
        async move {
            let mut events = client
                .exec_stream(&sb, &sh(&format!("echo {tag}; sleep 1; echo {tag}")))
                .await
                .expect("streamed exec");
            let (mut first, mut exit) = (None, None);
            while let Some(event) = events.next().await.expect("event") {
                match event {
                    ExecEvent::Stdout(_) => {
                        first.get_or_insert_with(Instant::now);
                    }
                    ExecEvent::Exit(_) => exit = Some(Instant::now()),
                    other => panic!("{tag}: {other:?}"),
                }
            }
            (first.expect("output"), exit.expect("exit"))
        }
    };
    let ((a_first, a_exit), (b_first, b_exit)) =
        f.rt.block_on(async { tokio::join!(run("a"), run("b")) });
    assert!(
        b_first >= a_exit || a_first >= b_exit,
        "the two commands overlapped: a {a_first:?}..{a_exit:?}, b {b_first:?}..{b_exit:?}"
    );
}

#[test]
fn removing_the_sandbox_ends_the_stream_with_an_error() {
    let f = Fixture::new("st-rm");
    let sb = f.sandbox(false);
    const UNKNOWN: &str = "deltabox_api_errors_total{code=\"unknown_sandbox\"}";
    let errors_before = f.daemon.metric(UNKNOWN);
    let mut events = f.stream(&sb, "echo started; sleep 60");
    let first = f.rt.block_on(events.next()).expect("first event");
    assert!(
        matches!(&first, Some(ExecEvent::Stdout(c)) if c.data.as_deref() == Some("started\n")),
        "{first:?}"
    );
    let start = Instant::now();
    let removed = f.rt.block_on(f.client.remove_sandbox(&sb)).expect("remove");
    assert_eq!(removed.sandboxes, std::slice::from_ref(&sb));
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "remove waited {:?} for the command",
        start.elapsed()
    );
    let last = f.rt.block_on(events.next()).expect("last event");
    match last {
        Some(ExecEvent::Error(StreamError { code, message, .. })) => {
            assert_eq!(code, "unknown_sandbox");
            assert!(message.contains(&sb), "{message:?} does not name {sb}");
        }
        other => panic!("expected an error event, got {other:?}"),
    }
    assert!(f.rt.block_on(events.next()).expect("end").is_none());
    assert_eq!(
        f.daemon.metric(UNKNOWN),
        errors_before + 1.0,
        "the error event of a 200 stream is counted by its code"
    );
    // The daemon still serves, the sandbox is gone.
    let list = f.rt.block_on(f.client.list_sandboxes()).expect("list");
    assert!(list.sandboxes.iter().all(|s| s.id != sb));
}

#[test]
fn output_beyond_the_cap_is_dropped_and_flagged() {
    let f = Fixture::new("st-cap");
    let sb = f.sandbox(false);
    let (events, _) = f.events(&sb, "head -c 9437184 /dev/zero | tr '\\0' a; echo done >&2");
    let (out, err, last) = gather(&events);
    assert_eq!(out.len(), 8 << 20);
    assert!(out.iter().all(|&b| b == b'a'));
    assert_eq!(err, b"done\n");
    let exit = exit_of(last);
    assert!(exit.truncated && !exit.timed_out, "{exit:?}");
    assert_eq!(exit.exit_code, Some(0));
}

#[test]
fn output_that_is_not_utf8_arrives_intact() {
    let f = Fixture::new("st-bin");
    let sb = f.sandbox(false);
    let (events, _) = f.events(
        &sb,
        r"printf 'a\377\376b'; sleep 0.2; printf '\342\202\254\n'",
    );
    let (out, _, last) = gather(&events);
    assert_eq!(out, b"a\xff\xfeb\xe2\x82\xac\n");
    assert!(
        events
            .iter()
            .any(|(e, _)| matches!(e, ExecEvent::Stdout(c) if c.data_b64.is_some())),
        "no data_b64 event: {events:?}"
    );
    assert!(
        events
            .iter()
            .any(|(e, _)| matches!(e, ExecEvent::Stdout(c) if c.data.as_deref() == Some("€\n"))),
        "UTF-8 text after the binary bytes is text again: {events:?}"
    );
    assert_eq!(exit_of(last).exit_code, Some(0));
}

#[test]
fn a_client_that_does_not_read_holds_the_command() {
    let f = Fixture::new("st-slow");
    let sb = f.sandbox(false);
    // 6 MB (under the cap), more than every buffer on the way can hold; then the time
    // the writes were done, on the host's clock (the sandbox shares it).
    let mut events = f.stream(
        &sb,
        "head -c 6000000 /dev/zero; date +%s.%N >&2; echo done >&2",
    );
    let paused_at = now_secs();
    std::thread::sleep(Duration::from_secs(3));
    let mut stderr = Vec::new();
    let mut stdout_bytes = 0usize;
    while let Some(event) = f.rt.block_on(events.next()).expect("event") {
        match event {
            ExecEvent::Stdout(c) => stdout_bytes += c.bytes().expect("base64").len(),
            ExecEvent::Stderr(c) => stderr.extend(c.bytes().expect("base64")),
            ExecEvent::Exit(exit) => assert!(!exit.truncated && !exit.timed_out, "{exit:?}"),
            ExecEvent::Error(e) => panic!("error event: {e:?}"),
        }
    }
    assert_eq!(stdout_bytes, 6_000_000);
    let stderr = String::from_utf8(stderr).expect("text");
    let written_at: f64 = stderr
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("no timestamp in {stderr:?}"));
    assert!(
        written_at - paused_at >= 2.5,
        "the writes ended {:.2} s after the client paused: the daemon buffered them",
        written_at - paused_at
    );
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

#[test]
fn errors_before_the_command_starts_are_plain_answers() {
    let f = Fixture::new("st-err");
    let sb = f.sandbox(false);
    let unknown =
        f.rt.block_on(
            f.client
                .exec_stream("ffffffff-ffff-7fff-bfff-ffffffffffff", &sh("true")),
        )
        .err()
        .expect("unknown sandbox refused");
    assert!(
        matches!(&unknown, ClientError::Api { status: 404, kind, .. } if kind == "unknown_sandbox"),
        "{unknown:?}"
    );
    let empty = ExecRequest::default();
    let invalid =
        f.rt.block_on(f.client.exec_stream(&sb, &empty))
            .err()
            .expect("empty argv refused");
    assert!(
        matches!(&invalid, ClientError::Api { status: 400, kind, .. } if kind == "invalid_request"),
        "{invalid:?}"
    );
    // A command that cannot start: no stream either.
    let missing = ExecRequest {
        argv: vec!["/no/such/binary".into()],
        ..ExecRequest::default()
    };
    match f.rt.block_on(f.client.exec_stream(&sb, &missing)) {
        Err(ClientError::Api { status: 400, .. }) => {}
        Err(other) => panic!("{other:?}"),
        // The runtime may report a missing binary as the command's exit (127).
        Ok(events) => {
            let result = f.rt.block_on(events.finish(|_, _| {})).expect("exit event");
            assert_ne!(result.exit_code, Some(0), "{result:?}");
        }
    }
}

#[test]
fn the_cli_streams_to_its_stdout_and_exits_with_the_code() {
    let f = Fixture::new("st-cli");
    let sb = f.sandbox(false);
    let start = Instant::now();
    let mut child = Command::new(binary("deltabox"))
        .arg("--socket")
        .arg(f.daemon.socket())
        .args(["exec", &sb, "--", "sh", "-c"])
        .arg("echo one; echo warn >&2; sleep 2; echo two; exit 7")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn deltabox");
    let guard = ChildGuard(Some(child.id()));
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut first = String::new();
    stdout.read_line(&mut first).expect("first line");
    let first_at = start.elapsed();
    assert_eq!(first, "one\n");
    assert!(
        first_at < Duration::from_millis(1800),
        "the first line came after {first_at:?}: not streamed"
    );
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).expect("rest");
    assert_eq!(rest, "two\n");
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("stderr");
    let status = child.wait().expect("wait for deltabox");
    drop(guard);
    assert_eq!(status.code(), Some(7), "stderr: {stderr}");
    assert_eq!(stderr, "warn\n");

    // --json: one collected result.
    let out = f
        .daemon
        .cli(&["exec", &sb, "--json", "--", "sh", "-c", "echo a; exit 2"]);
    assert_eq!(out.status.code(), Some(0));
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON");
    assert_eq!(value["stdout"], "a\n");
    assert_eq!(value["exit_code"], 2);
}

#[test]
fn the_cli_fails_with_5_when_the_sandbox_is_removed_under_it() {
    let f = Fixture::new("st-clirm");
    let sb = f.sandbox(false);
    let mut child = Command::new(binary("deltabox"))
        .arg("--socket")
        .arg(f.daemon.socket())
        .args(["exec", &sb, "--", "sh", "-c", "echo started; sleep 60"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn deltabox");
    let _guard = ChildGuard(Some(child.id()));
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut first = String::new();
    stdout.read_line(&mut first).expect("first line");
    assert_eq!(first, "started\n");
    f.rt.block_on(f.client.remove_sandbox(&sb)).expect("remove");
    let out = child.wait_with_output().expect("wait for deltabox");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "stderr: {stderr}");
    assert!(
        stderr.contains("unknown sandbox") && stderr.contains(&sb),
        "stderr: {stderr}"
    );
}

/// Kills a spawned CLI by pid if the test fails before it ended.
struct ChildGuard(Option<u32>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(pid) = self.0.take()
        {
            let pid = nix::unistd::Pid::from_raw(pid as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}
