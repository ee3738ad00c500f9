//! A test daemon's templates and dumps as the host sees them: the template processes
//! in a tree's cgroups, the dump directories the daemon writes, and the waits for them.
//! Template cgroups are named `tpl-<pid>-<nanoseconds in hex>-<seq>`; dumps are
//! `<data dir>/dumps/<node>-<session>`.

use std::fs;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

use crate::daemon::TestDaemon;
use crate::sandbox::{Http, id_of};

/// The dump directory of a node's session (written or not).
pub fn dump_dir(daemon: &TestDaemon, node: &str, session: &str) -> PathBuf {
    daemon
        .data_dir()
        .join("dumps")
        .join(format!("{node}-{session}"))
}

/// The dump of a node's session, once the daemon has written it (up to 120 s).
pub fn wait_dump(daemon: &TestDaemon, node: &str, session: &str) -> PathBuf {
    let dir = dump_dir(daemon, node, session);
    let deadline = Instant::now() + Duration::from_secs(120);
    while !dir.join("manifest.json").is_file() {
        assert!(
            Instant::now() < deadline,
            "no dump {} after 120 s: {}",
            dir.display(),
            daemon.log()
        );
        thread::sleep(Duration::from_millis(50));
    }
    dir
}

/// Waits until the daemon has written every queued dump (`GET /v1/stats`'s
/// `pool.dump_backlog` is 0); fails after 120 s.
pub fn wait_dump_backlog(api: &Http) {
    wait_pool_zero(api, "dump_backlog", "dumps still queued");
}

/// Waits until no standby fork is still to come (`GET /v1/stats`'s
/// `pool.standbys_pending` is 0): a daemon killed during a standby's fork loses the
/// template it forks (docs/deltacr.md, "Standby forks"). Fails after 120 s.
pub fn wait_standbys_forked(api: &Http) {
    wait_pool_zero(api, "standbys_pending", "standby forks still to come");
}

/// Waits until `GET /v1/stats`'s `pool.<field>` is 0; fails after 120 s, saying `what`.
fn wait_pool_zero(api: &Http, field: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let stats = api.get("/v1/stats").expect(200, "stats");
        if stats["pool"][field] == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "{what} after 120 s: {stats}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// The live templates of `tree` whose command line (`/proc/<pid>/cmdline`, NUL
/// separated) `is` accepts, as host pids, oldest first (none if the tree's templates
/// cgroup is gone: the tree was removed).
pub fn templates_running(daemon: &TestDaemon, tree: &str, is: impl Fn(&[u8]) -> bool) -> Vec<i32> {
    let dir = daemon.sandbox_cgroup().join(tree).join("templates");
    let mut found: Vec<(u128, i32)> = Vec::new();
    for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(nanos) = name
            .split('-')
            .nth(2)
            .and_then(|n| u128::from_str_radix(n, 16).ok())
        else {
            continue;
        };
        let procs = fs::read_to_string(e.path().join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            let cmd = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if is(&cmd) {
                found.push((nanos, pid));
            }
        }
    }
    found.sort_unstable();
    found.into_iter().map(|(_, pid)| pid).collect()
}

/// Every live template of `tree` (host pids), oldest first.
pub fn templates(daemon: &TestDaemon, tree: &str) -> Vec<i32> {
    templates_running(daemon, tree, |_| true)
}

/// The pids in every template cgroup (`…/templates/tpl-*`) anywhere under `dir`, e.g.
/// all trees of a daemon (a missing `dir` has none).
pub fn template_pids_under(dir: &Path) -> Vec<i32> {
    let mut pids = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return pids;
    };
    for e in entries.flatten() {
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let path = e.path();
        if e.file_name().to_string_lossy().starts_with("tpl-") {
            pids.extend(
                fs::read_to_string(path.join("cgroup.procs"))
                    .unwrap_or_default()
                    .lines()
                    .filter_map(|l| l.parse::<i32>().ok()),
            );
        }
        pids.extend(template_pids_under(&path));
    }
    pids
}

/// SIGKILLs `pid` (by pid, from the host) and waits until it is gone or a zombie.
pub fn kill9(pid: i32) {
    // An error is ESRCH (gone already): the wait below says so too.
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    for _ in 0..1000 {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.is_empty() || stat.contains(") Z ") {
            return;
        }
        thread::sleep(Duration::from_millis(5));
    }
    panic!("template {pid} did not die");
}

/// `node` as the tree listing of `sandbox` gives it.
pub fn tree_node(api: &Http, sandbox: &str, node: &str) -> Value {
    let tree = api
        .get(&format!("/v1/sandboxes/{sandbox}/tree"))
        .expect(200, "tree");
    let nodes = tree["nodes"].as_array().cloned().unwrap_or_default();
    nodes
        .into_iter()
        .find(|n| id_of(n) == node)
        .unwrap_or_else(|| panic!("node {node} in {tree}"))
}

/// The template state (`live`, `dumped`, …) the tree listing of `sandbox` gives the
/// first session of `node`.
pub fn session_template_state(api: &Http, sandbox: &str, node: &str) -> String {
    tree_node(api, sandbox, node)["sessions"][0]["template"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Host pid `pid` as its own (the sandbox's) pid namespace numbers it (the last
/// `NSpid:` field).
pub fn ns_pid(pid: i32) -> String {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .and_then(|l| l.split_whitespace().last())
        .unwrap_or_else(|| panic!("no NSpid in /proc/{pid}/status"))
        .to_owned()
}
