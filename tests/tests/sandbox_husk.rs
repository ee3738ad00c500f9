//! A tree whose init died takes every template with it (as a reboot does): a restarted
//! daemon re-creates the tree and revives its sandboxes from their head's dumps, in
//! fresh processes (`cr::husk`), and every node stays restorable.

use std::fs;
use std::thread;
use std::time::Duration;

use deltabox_controller::cr::pidfd::Pidfd;
use deltabox_tests::cli::{json, run, session};
use deltabox_tests::daemon::TestDaemon;
use deltabox_tests::require_root;
use deltabox_tests::sandbox::id_of;
use deltabox_tests::templates::{template_pids_under, wait_dump};
use nix::unistd::Pid;

/// How many processes of the daemon's sandboxes run `sleep 1000` (waiting up to 3 s).
fn sleepers(daemon: &TestDaemon) -> usize {
    let count = || {
        fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter(|e| {
                let cg = fs::read_to_string(e.path().join("cgroup")).unwrap_or_default();
                let cmd = fs::read(e.path().join("cmdline")).unwrap_or_default();
                cg.contains(
                    &*daemon
                        .sandbox_cgroup()
                        .file_name()
                        .unwrap()
                        .to_string_lossy(),
                ) && cg.contains("/work")
                    && cmd == b"sleep\x001000\x00"
            })
            .count()
    };
    let mut n = count();
    for _ in 0..60 {
        if n == 1 {
            break;
        }
        thread::sleep(Duration::from_millis(50));
        n = count();
    }
    n
}

/// The parent (host pid) of `pid`.
fn ppid(pid: i64) -> i32 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

const PY_STATE: &str = "import hashlib
data = bytes(range(256)) * 65536
digest = hashlib.sha256(data).hexdigest()
x = 41";
const PY_SHOW: &str = "print(x, hashlib.sha256(data).hexdigest() == digest, len(data))";
const SH_SHOW: &str = "echo \"$A $B $(pwd)\"; greet";

#[test]
fn a_tree_whose_init_died_is_rebuilt_from_its_dumps() {
    require_root();
    let mut daemon = TestDaemon::start("husk", &[]);
    let sb = id_of(&json(&daemon, &["create"]));
    let py = session(&daemon, &sb, "python");
    let sh = session(&daemon, &sb, "bash");
    run(&daemon, &sb, &py, PY_STATE);
    run(
        &daemon,
        &sb,
        &sh,
        "A=hello; B=$((6 * 7)); cd /tmp; greet() { echo hi from a function; }",
    );
    let n1 = id_of(&json(&daemon, &["checkpoint", &sb]));
    run(&daemon, &sb, &py, "x = 42");
    run(&daemon, &sb, &sh, "A=world; cd /workspace; sleep 1000 &");
    let n2 = id_of(&json(&daemon, &["checkpoint", &sb]));
    for node in [&n1, &n2] {
        for session in [&py, &sh] {
            wait_dump(&daemon, node, session);
        }
    }
    assert_eq!(run(&daemon, &sb, &py, PY_SHOW), "42 True 16777216\n");

    // The tree's init is the parent of its sessions (they are its children, spawned or
    // restored with CLONE_PARENT); held by pidfd from here on.
    let session_pid = json(&daemon, &["status", &sb])["sessions"][0]["pid"]
        .as_i64()
        .unwrap();
    let init = Pidfd::open(Pid::from_raw(ppid(session_pid))).unwrap();
    assert_eq!(
        fs::read_to_string(format!("/proc/{}/status", init.pid()))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("NSpid:"))
            .and_then(|f| f.split_whitespace().last().map(str::to_owned)),
        Some("1".to_owned()),
        "pid {} is not the tree's pid 1",
        init.pid()
    );

    // The daemon and the tree's init die: every template and session with the init's pid
    // namespace.
    daemon.kill();
    init.kill_and_wait(Duration::from_secs(10)).unwrap();
    daemon.restart(&[]);

    let status = json(&daemon, &["status", &sb]);
    assert_eq!(status["head"], n2.as_str(), "{status}");
    assert_eq!(
        status["sessions"].as_array().map(Vec::len),
        Some(2),
        "both sessions revived: {status}\n{}",
        daemon.log()
    );
    let log = daemon.log();
    assert!(
        log.contains("re-created with a new init")
            && log
                .matches("restored from its dump into a fresh process")
                .count()
                >= 2,
        "{log}"
    );
    assert_eq!(run(&daemon, &sb, &py, PY_SHOW), "42 True 16777216\n");
    assert_eq!(
        run(&daemon, &sb, &sh, SH_SHOW),
        "world 42 /workspace\nhi from a function\n"
    );
    // The background job too (dumped like the sessions, restored into a fresh process).
    assert_eq!(sleepers(&daemon), 1, "{}", daemon.log());
    // They keep working.
    assert_eq!(
        run(
            &daemon,
            &sb,
            &py,
            "y = [str(i) for i in range(100000)]; print(len(y))"
        ),
        "100000\n"
    );
    assert_eq!(
        run(&daemon, &sb, &sh, "ls / > /dev/null && echo $((B + 1))"),
        "43\n"
    );

    // An older node restores (from its dumps too: its templates died with the init).
    json(&daemon, &["rollback", &sb, &n1]);
    assert_eq!(run(&daemon, &sb, &py, PY_SHOW), "41 True 16777216\n");
    assert_eq!(
        run(&daemon, &sb, &sh, SH_SHOW),
        "hello 42 /tmp\nhi from a function\n"
    );
    // And the head again, now from the templates its revival made.
    json(&daemon, &["rollback", &sb, &n2]);
    assert_eq!(run(&daemon, &sb, &py, PY_SHOW), "42 True 16777216\n");
    // Its job from its dump again, its pipe found through the re-made session's dump.
    assert_eq!(sleepers(&daemon), 1, "{}", daemon.log());
    let tree = json(&daemon, &["tree", &sb]);
    for node in tree["nodes"].as_array().unwrap() {
        for session in node["sessions"].as_array().unwrap() {
            assert_eq!(session["template"], "live", "{tree}");
        }
    }

    // Within a running tree too: every template killed from the host, a rollback
    // restores from the dumps into fresh processes (no template of python or bash is
    // left to fork).
    let templates: Vec<Pidfd> = template_pids_under(daemon.sandbox_cgroup())
        .into_iter()
        .filter_map(|pid| Pidfd::open(Pid::from_raw(pid)).ok())
        .collect();
    assert!(templates.len() >= 4, "{} templates", templates.len());
    for template in &templates {
        template.kill_and_wait(Duration::from_secs(10)).unwrap();
    }
    let before = daemon.log().matches("into a fresh process").count();
    json(&daemon, &["rollback", &sb, &n1]);
    assert_eq!(run(&daemon, &sb, &py, PY_SHOW), "41 True 16777216\n");
    assert_eq!(
        run(&daemon, &sb, &sh, SH_SHOW),
        "hello 42 /tmp\nhi from a function\n"
    );
    assert_eq!(
        daemon.log().matches("into a fresh process").count(),
        before + 2,
        "{}",
        daemon.log()
    );

    // A branch of n2 with every template dead again: its sessions and its job come
    // back in the new sandbox, each in a fresh process of that sandbox.
    for pid in template_pids_under(daemon.sandbox_cgroup()) {
        if let Ok(template) = Pidfd::open(Pid::from_raw(pid)) {
            template.kill_and_wait(Duration::from_secs(10)).unwrap();
        }
    }
    let before = daemon.log().matches("into a fresh process").count();
    let branched = json(&daemon, &["branch", &n2]);
    let branch = id_of(&branched["sandboxes"][0]);
    assert_eq!(run(&daemon, &branch, &py, PY_SHOW), "42 True 16777216\n");
    assert_eq!(
        run(&daemon, &branch, &sh, SH_SHOW),
        "world 42 /workspace\nhi from a function\n"
    );
    assert_eq!(
        daemon.log().matches("into a fresh process").count(),
        before + 3,
        "{}",
        daemon.log()
    );
    // The original sandbox is untouched by its branch.
    assert_eq!(run(&daemon, &sb, &py, PY_SHOW), "41 True 16777216\n");

    // A clean stop (as at a shutdown before a reboot) ends the tree; the next daemon
    // re-creates it and the sandbox comes back at its head, n1, from its dumps.
    let (status, err) = daemon.stop();
    assert!(status.success(), "{err}");
    daemon.restart(&[]);
    let status = json(&daemon, &["status", &sb]);
    assert_eq!(status["head"], n1.as_str(), "{status}");
    assert_eq!(run(&daemon, &sb, &py, PY_SHOW), "41 True 16777216\n");
    assert_eq!(
        run(&daemon, &sb, &sh, SH_SHOW),
        "hello 42 /tmp\nhi from a function\n"
    );

    let (status, err) = daemon.stop();
    assert!(status.success(), "{err}");
}
