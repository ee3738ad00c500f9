//! deltaboxd and the deltabox CLI end to end: counts reach the user, start and stop
//! leave nothing behind, bad input gets a clear error and a distinct exit code.

use std::{
    fs,
    io::{Read as _, Write as _},
    os::unix::{fs::MetadataExt as _, net::UnixStream},
    process::Command,
};

use deltabox_tests::{
    cgroup::TestCgroup,
    daemon::{TestDaemon, as_nobody, binary, cli},
    require_root, scratch_dir, unique,
};

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}
fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn json(out: &std::process::Output) -> serde_json::Value {
    assert!(out.status.success(), "deltabox failed: {}", stderr(out));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("bad JSON ({e}): {}", stdout(out)))
}

#[test]
fn counts_reach_the_cli_and_the_metrics() {
    require_root();
    let daemon = TestDaemon::start("e2e", &[]);
    let cg = TestCgroup::new(&unique("e2e"));
    let path = cg.path().to_str().unwrap();
    let watched = json(&daemon.cli(&["watch", path, "--json"]));
    assert_eq!(watched["id"], cg.id());
    assert_eq!(watched["epoch"], 0);

    let dir = scratch_dir("e2e");
    let file = dir.join("e2e.bin");
    cg.run(Command::new("dd").args([
        "if=/dev/zero",
        &format!("of={}", file.display()),
        "bs=4096",
        "count=10",
        "status=none",
    ]));
    let stats = json(&daemon.cli(&["inode-stats", "--cgroup", path, "--json"]));
    let ino = fs::metadata(&file).unwrap().ino();
    let rec = stats["stats"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["ino"] == ino)
        .unwrap_or_else(|| panic!("no record for {ino}: {stats}"));
    assert_eq!(
        (
            rec["writes"].as_u64(),
            rec["bytes"].as_u64(),
            rec["pages_dirtied"].as_u64()
        ),
        (Some(10), Some(40960), Some(10))
    );
    assert_eq!(rec["cgroup_path"], path);
    assert_eq!(rec["name"], "e2e.bin");

    // The text table names the file too.
    let table = daemon.cli(&["inode-stats", "--cgroup", path]);
    assert!(
        table.status.success() && stdout(&table).contains("e2e.bin"),
        "{}",
        stdout(&table)
    );

    let status = json(&daemon.cli(&["status", "--json"]));
    assert_eq!(status["pid"], daemon.pid());
    assert_eq!(status["bpf"]["origin"], "loaded");
    // One entry per attached tracepoint.
    assert_eq!(
        status["bpf"]["programs"].as_array().unwrap().len(),
        deltabox_controller::bpf::loader::ATTACHMENTS.len()
    );

    let mut conn = std::net::TcpStream::connect(("127.0.0.1", daemon.metrics_port())).unwrap();
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    conn.read_to_string(&mut body).unwrap();
    assert!(body.contains("deltabox_watched_cgroups 1"), "{body}");

    let epoch = json(&daemon.cli(&["epoch", path, "--json"]));
    assert_eq!(epoch["epoch"], 1);
    let after = json(&daemon.cli(&["inode-stats", "--cgroup", path, "--json"]));
    assert_eq!(after["stats"].as_array().unwrap().len(), 0, "{after}");
    json(&daemon.cli(&["unwatch", path, "--json"]));
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn start_and_stop_leave_no_socket_pins_or_process() {
    require_root();
    let mut daemon = TestDaemon::start("stop", &["--unload-on-exit"]);
    let socket = daemon.socket().to_path_buf();
    let pins = daemon.pin_dir().to_path_buf();
    let pid = daemon.pid();
    assert!(socket.exists() && pins.exists());
    let (status, err) = daemon.stop();
    assert!(status.success(), "deltaboxd exit {status}: {err}");
    assert!(!socket.exists(), "socket left behind");
    assert!(!pins.exists(), "pins left behind with --unload-on-exit");
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "daemon still running"
    );

    // Without --unload-on-exit the programs stay pinned, and the next daemon adopts them.
    let mut first = TestDaemon::start("adopt", &[]);
    let pins = first.pin_dir().to_path_buf();
    first.stop();
    assert!(pins.exists(), "programs were not left pinned");
    let second = TestDaemon::start("adopt", &["--adopt-only"]);
    let status = json(&second.cli(&["status", "--json"]));
    assert_eq!(status["bpf"]["origin"], "adopted");
}

#[test]
fn a_socket_owned_by_a_running_daemon_is_not_taken() {
    require_root();
    let daemon = TestDaemon::start("taken", &[]);
    let out = Command::new(binary("deltaboxd"))
        .args(["serve", "--socket"])
        .arg(daemon.socket())
        .args(["--metrics-addr", "127.0.0.1:0", "--pin-dir"])
        .arg(daemon.pin_dir())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(75), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&daemon.pid().to_string()) && err.contains(daemon.socket().to_str().unwrap()),
        "{err}"
    );
    // The first daemon still answers.
    json(&daemon.cli(&["status", "--json"]));
}

#[test]
fn cli_errors_name_the_problem() {
    require_root();
    // Daemon down.
    let out = cli(
        std::path::Path::new("/run/deltabox-tests/none.sock"),
        &["status"],
    );
    assert_eq!(out.status.code(), Some(3));
    assert!(
        stderr(&out).contains("deltaboxd is not running") && stderr(&out).contains("none.sock"),
        "{}",
        stderr(&out)
    );

    let daemon = TestDaemon::start("badinput", &[]);
    // Unknown cgroup path.
    let out = daemon.cli(&["watch", "/sys/fs/cgroup/unified/no-such-cgroup-deltabox"]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no-such-cgroup-deltabox"),
        "{}",
        stderr(&out)
    );
    // Not watched.
    let cg = TestCgroup::new(&unique("badinput"));
    let out = daemon.cli(&["epoch", cg.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(5));
    assert!(stderr(&out).contains("not watched"), "{}", stderr(&out));
    // Not root: the socket is root's.
    let out = as_nobody(
        Command::new(binary("deltabox"))
            .arg("--socket")
            .arg(daemon.socket())
            .arg("status"),
    );
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("permission denied"),
        "{}",
        stderr(&out)
    );
    // A daemon started by a non-root user refuses.
    let out = as_nobody(Command::new(binary("deltaboxd")).args([
        "serve",
        "--socket",
        "/tmp/deltabox-nobody.sock",
    ]));
    assert_eq!(out.status.code(), Some(77), "{}", stderr(&out));
    assert!(stderr(&out).contains("root"), "{}", stderr(&out));
}

/// Sends one raw HTTP request on the API socket and returns the response.
fn raw_request(socket: &std::path::Path, request: &str) -> String {
    let mut conn = UnixStream::connect(socket).unwrap();
    conn.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    conn.read_to_string(&mut response).unwrap();
    response
}

#[test]
fn malformed_api_requests_get_json_errors() {
    require_root();
    let daemon = TestDaemon::start("malformed", &[]);
    let body = "{\"path\": 42";
    let response = raw_request(
        daemon.socket(),
        &format!(
            "POST /v1/cgroups/watch HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    );
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
    assert!(response.contains("\"kind\":\"invalid_body\""), "{response}");

    let response = raw_request(
        daemon.socket(),
        "GET /v1/nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(
        response.starts_with("HTTP/1.1 404") && response.contains("\"error\""),
        "{response}"
    );
}

#[test]
fn a_test_failing_midway_still_cleans_up() {
    require_root();
    let mut seen = None;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let daemon = TestDaemon::start("midway", &[]);
        let cg = TestCgroup::new(&unique("midway"));
        // A process left running inside the cgroup, as a failing test might leave one.
        let sleeper = cg.spawn(Command::new("sleep").arg("600"));
        seen = Some((
            daemon.socket().to_path_buf(),
            daemon.pin_dir().to_path_buf(),
            cg.path().to_path_buf(),
            daemon.pid(),
            sleeper,
        ));
        panic!("simulated failure midway");
    }));
    assert!(result.is_err());
    let (socket, pins, cgroup, pid, mut sleeper) = seen.expect("set-up ran");
    assert!(!socket.exists(), "socket left behind");
    assert!(!pins.exists(), "pins left behind");
    assert!(!cgroup.exists(), "cgroup left behind");
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Gone, or a zombie waiting to be reaped by this test process.
    assert!(
        stat.is_empty() || stat.contains(") Z "),
        "deltaboxd {pid} still running: {stat}"
    );
    // The sleeper was killed (SIGKILL through cgroup.kill), not left to run.
    let status = sleeper
        .try_wait()
        .unwrap()
        .expect("process in the cgroup still running");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );
}

/// Sends one raw HTTP request over TCP and returns the response.
fn tcp_request(port: u16, request: &str) -> String {
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    conn.read_to_string(&mut response).unwrap();
    response
}

/// `--api-tcp` serves the same API on a loopback TCP port (sandboxes included); a
/// non-loopback address is refused at start with exit 64 naming it.
#[test]
fn the_api_is_served_over_loopback_tcp_when_asked() {
    require_root();
    let port = deltabox_tests::daemon::free_port();
    let daemon = TestDaemon::start("tcp", &["--api-tcp", &format!("127.0.0.1:{port}")]);
    let status = tcp_request(
        port,
        "GET /v1/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert!(
        status.contains(daemon.socket().to_str().unwrap()),
        "the same daemon answers over TCP: {status}"
    );
    let body = r#"{"argv": ["echo", "over tcp"]}"#;
    let created = tcp_request(
        port,
        "POST /v1/sandboxes HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
    );
    assert!(created.starts_with("HTTP/1.1 201"), "{created}");
    let id = created
        .split("\"id\":\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("the new sandbox's id");
    let exec = tcp_request(
        port,
        &format!(
            "POST /v1/sandboxes/{id}/exec HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    );
    assert!(exec.contains("over tcp\\n"), "{exec}");
    // The Unix socket sees the same sandbox.
    let ls = json(&daemon.cli(&["ls", "--json"]));
    assert!(ls.to_string().contains(id), "{ls}");

    let out = Command::new(binary("deltaboxd"))
        .args(["serve", "--api-tcp", "0.0.0.0:9"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("0.0.0.0:9") && stderr(&out).contains("loopback"),
        "{}",
        stderr(&out)
    );
}
