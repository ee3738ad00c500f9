//! The tree survives the controller: SIGKILL `deltaboxd` between and during operations,
//! start it again, and every acknowledged node is still there and restores correctly;
//! the sandbox comes back at its head node; nothing half-made or orphaned remains.

use std::fs;
use std::path::Path;
use std::thread;
use std::time::Duration;

use deltabox_tests::cgroup::pids_under;
use deltabox_tests::cli::{json, run, session};
use deltabox_tests::daemon::TestDaemon;
use deltabox_tests::sandbox::{Http, id_of};
use deltabox_tests::templates::{template_pids_under, wait_standbys_forked};
use deltabox_tests::{require_root, wait_until};

fn step(i: u32) -> String {
    format!("x = {i}\nopen('/workspace/f', 'w').write('{i}')")
}

const SHOW: &str = "print(x, open('/workspace/f').read())";

/// Mount points under `dir`.
fn mounts_under(dir: &Path) -> Vec<String> {
    let prefix = dir.display().to_string();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
        .filter(|m| m.starts_with(&prefix))
        .collect()
}

/// cgroup directories under `dir` (itself excluded).
fn cgroups_under(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                found.push(e.path().display().to_string());
                found.extend(cgroups_under(&e.path()));
            }
        }
    }
    found
}

fn alive(pid: i64) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[test]
fn a_killed_daemon_comes_back_with_every_acknowledged_node() {
    require_root();
    let mut daemon = TestDaemon::start("restart", &[]);
    let sb = id_of(&json(&daemon, &["create"]));
    let py = session(&daemon, &sb, "python");
    run(&daemon, &sb, &py, &step(1));
    let n1 = id_of(&json(&daemon, &["checkpoint", &sb, "--label", "one"]));
    run(&daemon, &sb, &py, &step(2));
    let n2 = id_of(&json(&daemon, &["checkpoint", &sb, "--label", "two"]));
    // Not acknowledged by any checkpoint: lost with the daemon's view.
    run(&daemon, &sb, &py, &step(3));
    let old_pid = json(&daemon, &["status", &sb])["sessions"][0]["pid"]
        .as_i64()
        .unwrap();

    // Between operations.
    daemon.kill();
    daemon.restart(&[]);
    let status = json(&daemon, &["status", &sb]);
    assert_eq!(status["head"], n2.as_str(), "{status}");
    assert_eq!(status["sessions"][0]["id"], py.as_str(), "{status}");
    assert!(
        !alive(old_pid),
        "the session of the dead daemon's view still runs"
    );
    assert_eq!(
        run(&daemon, &sb, &py, SHOW),
        "2 2\n",
        "back at the head node"
    );
    json(&daemon, &["rollback", &sb, &n1]);
    assert_eq!(
        run(&daemon, &sb, &py, SHOW),
        "1 1\n",
        "the first node restores"
    );
    let branched = json(&daemon, &["branch", &n2]);
    let branch = id_of(&branched["sandboxes"][0]);
    let bpy = json(&daemon, &["status", &branch])["sessions"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        run(&daemon, &branch, &bpy, SHOW),
        "2 2\n",
        "a branch of node two"
    );

    // During an operation: a command that runs for a while.
    let socket = daemon.socket().to_owned();
    let sb2 = sb.clone();
    let long = thread::spawn(move || {
        deltabox_tests::daemon::cli(&socket, &["exec", &sb2, "--", "sleep", "5"])
    });
    // Killed once the command runs in the sandbox.
    let running = || {
        pids_under(daemon.sandbox_cgroup()).into_iter().any(|pid| {
            fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == b"sleep\x005\x00")
        })
    };
    assert!(
        wait_until(Duration::from_secs(30), running),
        "`sleep 5` never ran in {sb}"
    );
    daemon.kill();
    let _ = long.join();
    daemon.restart(&[]);
    let status = json(&daemon, &["status", &sb]);
    assert_eq!(status["head"], n1.as_str(), "{status}");
    assert_eq!(run(&daemon, &sb, &py, SHOW), "1 1\n");
    json(&daemon, &["rollback", &sb, &n2]);
    assert_eq!(run(&daemon, &sb, &py, SHOW), "2 2\n");
    let tree = json(&daemon, &["tree", &sb]);
    let nodes: Vec<&str> = tree["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        nodes,
        [n1.as_str(), n2.as_str()],
        "every acknowledged node, nothing else"
    );

    // No layer but those of the nodes and of the live views remains after gc.
    json(&daemon, &["gc"]);
    let sandboxes = json(&daemon, &["ls"])["sandboxes"]
        .as_array()
        .unwrap()
        .len();
    let layers = fs::read_dir(daemon.data_dir().join("store/layers"))
        .unwrap()
        .count();
    // One per node, and at most one writable layer per live sandbox (made when first
    // written): none left by the dead daemons' views.
    assert!(
        (nodes.len()..=nodes.len() + sandboxes).contains(&layers),
        "{layers} layers for {} nodes and {sandboxes} sandboxes",
        nodes.len()
    );

    // A clean stop leaves no process, mount or cgroup.
    let (status, err) = daemon.stop();
    assert!(status.success(), "{err}");
    assert_eq!(mounts_under(&daemon.run_dir()), Vec::<String>::new());
    assert_eq!(cgroups_under(daemon.sandbox_cgroup()), Vec::<String>::new());
}

/// `st_dev` as `/proc/<pid>/maps` prints it (`major:minor` in hex).
fn maps_dev(dev: u64) -> String {
    let major = (dev >> 8) & 0xfff;
    let minor = (dev & 0xff) | ((dev >> 12) & 0xfff00);
    format!("{major:02x}:{minor:02x}")
}

/// After a restart, templates map nothing through the dead daemon's views, and a revived
/// session keeps working once the page cache is dropped: its program and libraries are
/// read from the backing files, not from a FUSE connection that is gone (before the fix,
/// the first call after `drop_caches` died of SIGBUS).
#[test]
fn revived_sessions_outlive_the_page_cache_of_dead_views() {
    require_root();
    use std::os::unix::fs::MetadataExt;
    let mut daemon = TestDaemon::start("rebind", &[]);
    let sb = id_of(&json(&daemon, &["create"]));
    let py = session(&daemon, &sb, "python");
    run(&daemon, &sb, &py, "import json, decimal\nx = 41");
    let node = id_of(&json(&daemon, &["checkpoint", &sb]));
    let session_pid = json(&daemon, &["status", &sb])["sessions"][0]["pid"]
        .as_i64()
        .unwrap();
    let view_dev = maps_dev(
        fs::metadata(format!("/proc/{session_pid}/root"))
            .unwrap()
            .dev(),
    );
    let templates = template_pids_under(daemon.sandbox_cgroup());
    assert_eq!(templates.len(), 1, "one session, one template");
    let on_view = |pid: i32| -> Vec<String> {
        fs::read_to_string(format!("/proc/{pid}/maps"))
            .unwrap()
            .lines()
            .filter(|l| l.split_whitespace().nth(3) == Some(view_dev.as_str()))
            .map(str::to_owned)
            .collect()
    };
    assert!(
        !on_view(templates[0]).is_empty(),
        "the template maps its libraries through the view ({view_dev})"
    );

    // Not during a standby's fork, which the daemon's death would kill with the template.
    wait_standbys_forked(&Http::new(daemon.socket()));
    daemon.kill();
    daemon.restart(&[]);
    assert_eq!(
        on_view(templates[0]),
        Vec::<String>::new(),
        "mappings left on the dead view"
    );
    fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    let code = "import unicodedata, fractions\n\
                print(x + 1, json.dumps(decimal.Decimal('1.5').as_integer_ratio()), \
                fractions.Fraction(3, 4) * 2, unicodedata.name('é'))";
    let expected = "42 [3, 2] 3/2 LATIN SMALL LETTER E WITH ACUTE\n";
    assert_eq!(
        run(&daemon, &sb, &py, code),
        expected,
        "the revived session"
    );
    // Its rollbacks and branches fork the rebound template too.
    json(&daemon, &["rollback", &sb, &node]);
    fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    assert_eq!(run(&daemon, &sb, &py, code), expected, "after a rollback");
    let (status, err) = daemon.stop();
    assert!(status.success(), "{err}");
}
