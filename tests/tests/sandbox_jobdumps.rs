//! A node's other processes (here a background pipeline `python3 job.py | cat > log` of
//! a bash session) are dumped like its sessions: a node whose job template was killed
//! from inside the sandbox, or whose templates the pool evicted, or whose job template
//! was killed while the daemon was down, is restored from the dumps (forking another
//! template of the job's program run, or into a fresh process, a husk, when none is
//! left: its only template killed, the tree's init killed) — the job's memory
//! (a random buffer, hashed on every line it prints) is the checkpoint's, it runs on
//! from its counter, and its pipe to `cat` carries its lines again (a shared file
//! mapping restored from its dump: `sandbox_shared_mapping`). Rollback, branch and a
//! daemon's revival all take that path. Needs root, cgroups, FUSE, the store.

use std::fs;
use std::thread;
use std::time::{Duration, Instant};

use deltabox_controller::cr::pidfd::Pidfd;
use deltabox_tests::daemon::TestDaemon;
use deltabox_tests::require_root;
use deltabox_tests::sandbox::{Http, id_of};
use deltabox_tests::templates::{
    kill9, ns_pid, templates_running, wait_dump_backlog, wait_standbys_forked,
};
use nix::unistd::Pid;
use serde_json::{Value, json};

/// Prints `<counter> <phase> <hash of its 8 MiB random buffer>` every 0.1 s, and its pid
/// to `/tmp/job.pid`; SIGUSR1 draws a new buffer and bumps the phase.
const JOB: &str = r#"cat > /tmp/job.py <<'EOF'
import hashlib, os, signal, time
buf = bytearray(os.urandom(8 << 20))
phase = 0
def turn(*_):
    global buf, phase
    buf = bytearray(os.urandom(8 << 20))
    phase += 1
signal.signal(signal.SIGUSR1, turn)
i = 0
while True:
    i += 1
    # Each time: a restored job has another pid.
    open('/tmp/job.pid', 'w').write(str(os.getpid()))
    print(i, phase, hashlib.sha256(buf).hexdigest()[:16], flush=True)
    time.sleep(0.1)
EOF"#;

/// A sandbox of a test daemon, with its tree and a bash session running the job.
struct Sb {
    daemon: TestDaemon,
    api: Http,
    id: String,
    tree: String,
    sh: String,
}

/// One line of the job: counter, phase, hash.
#[derive(Debug, Clone, PartialEq)]
struct Line {
    count: u64,
    phase: u64,
    hash: String,
}

impl Sb {
    /// A sandbox with a bash session running the job.
    fn start(test: &str, flags: &[&str]) -> Self {
        let sb = Self::bare(test, flags);
        // The log exists before the job starts: `run` returns once bash has forked the
        // background pipeline, maybe before `cat` has opened (created) `/tmp/log`, and
        // the first `tail` would find no file (seen under load with two tests at once).
        sb.api.sh(&sb.id, &format!("{JOB}\ntouch /tmp/log"));
        sb.api.run(
            &sb.id,
            &sb.sh,
            "python3 /tmp/job.py 2>/tmp/job.err | cat > /tmp/log &",
        );
        sb.wait_line("the job's first lines", |l| l.count >= 3);
        sb
    }

    /// A sandbox with an idle bash session.
    fn bare(test: &str, flags: &[&str]) -> Self {
        require_root();
        let daemon = TestDaemon::start(test, flags);
        let api = Http::new(daemon.socket());
        let id = id_of(&api.create(&json!({})));
        let tree = api.sandbox(&id)["tree"].as_str().unwrap().to_owned();
        let sh = api.session(&id, "bash");
        Self {
            daemon,
            api,
            id,
            tree,
            sh,
        }
    }

    /// The job's last line in `/tmp/log`, if there is a whole one.
    fn last(&self) -> Option<Line> {
        self.last_in(&self.id)
    }

    /// The same in sandbox `id` (a branch).
    fn last_in(&self, id: &str) -> Option<Line> {
        let out = self.api.sh(id, "tail -n 1 /tmp/log");
        let parts: Vec<&str> = out.split_whitespace().collect();
        match parts.as_slice() {
            [count, phase, hash] if out.ends_with('\n') && hash.len() == 16 => Some(Line {
                count: count.parse().ok()?,
                phase: phase.parse().ok()?,
                hash: (*hash).to_owned(),
            }),
            _ => None,
        }
    }

    /// Polls the log until its last line satisfies `done` (up to 20 s).
    fn wait_line(&self, what: &str, done: impl Fn(&Line) -> bool) -> Line {
        self.wait_line_in(&self.id, what, done)
    }

    /// The same in sandbox `id` (a branch).
    fn wait_line_in(&self, id: &str, what: &str, done: impl Fn(&Line) -> bool) -> Line {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(line) = self.last_in(id)
                && done(&line)
            {
                return line;
            }
            assert!(
                Instant::now() < deadline,
                "{what} in {id}: the log ends with {:?}; job.err: {}",
                self.last_in(id),
                self.api.sh(id, "cat /tmp/job.err")
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Draws the job a new buffer (phase `phase`) and returns its line once it prints it.
    fn turn(&self, phase: u64) -> Line {
        self.signal("USR1");
        self.wait_line("the job's new phase", |l| l.phase == phase)
    }

    /// Sends the job `sig` (by the pid it wrote last: after a restore, once it wrote its
    /// new one).
    fn signal(&self, sig: &str) {
        self.api.sh(
            &self.id,
            &format!(
                "for i in $(seq 100); do kill -{sig} $(cat /tmp/job.pid) 2>/dev/null && exit 0; \
                 sleep 0.05; done; exit 1"
            ),
        );
    }

    /// Checkpoints; returns the node and the job's python process as the node records
    /// it (host pid).
    fn checkpoint(&self, label: &str) -> (String, i64) {
        let node = self
            .api
            .post(
                &format!("/v1/sandboxes/{}/checkpoint", self.id),
                &json!({ "label": label }),
            )
            .expect(201, "checkpoint");
        let processes = node["processes"].as_array().cloned().unwrap_or_default();
        let python = processes
            .iter()
            .find(|p| p["comm"] == "python3")
            .unwrap_or_else(|| panic!("no python3 among the node's processes: {node}"));
        assert_eq!(
            processes.len(),
            2,
            "python3 and cat, the pipeline's processes: {node}"
        );
        (id_of(&node), python["pid"].as_i64().unwrap())
    }

    /// The node `node` as `tree` lists it.
    fn listed(&self, node: &str) -> Value {
        let tree = self
            .api
            .get(&format!("/v1/sandboxes/{}/tree", self.id))
            .expect(200, "tree");
        tree["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| id_of(n) == node)
            .cloned()
            .unwrap_or_else(|| panic!("node {node} in {tree}"))
    }

    /// The template state `tree` gives node `node`'s process `comm`.
    fn process_state(&self, node: &str, comm: &str) -> String {
        let n = self.listed(node);
        n["processes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["comm"] == comm)
            .and_then(|p| p["template"].as_str())
            .unwrap_or_else(|| panic!("no {comm} in {n}"))
            .to_owned()
    }

    /// The live templates running the job (host pids), oldest first.
    fn job_templates(&self) -> Vec<i32> {
        templates_running(&self.daemon, &self.tree, |cmd| {
            cmd == b"python3\0/tmp/job.py\0"
        })
    }

    /// After a restore to a node where the job printed `at`: it prints again, with the
    /// node's phase and hash, counting on from the node's counter.
    fn assert_job_resumed(&self, at: &Line) {
        self.assert_job_resumed_in(&self.id, at);
    }

    /// The same in sandbox `id` (a branch).
    fn assert_job_resumed_in(&self, id: &str, at: &Line) {
        let first = self.wait_line_in(id, "the restored job's lines", |l| l.count > at.count);
        thread::sleep(Duration::from_millis(600));
        let later = self.wait_line_in(id, "the restored job's later lines", |l| {
            l.count > first.count
        });
        assert_eq!(
            (later.phase, &later.hash),
            (at.phase, &at.hash),
            "the job's memory is the node's: {later:?} after {at:?}"
        );
        assert!(
            later.count < at.count + 60,
            "the job counts on from the node's {}: {later:?}",
            at.count
        );
    }
}

#[test]
fn a_job_whose_template_was_killed_inside_the_sandbox_comes_back_from_its_dump() {
    let sb = Sb::start("jobdump", &[]);
    let (api, id) = (&sb.api, sb.id.as_str());
    let (n1, _) = sb.checkpoint("one");
    let at1 = sb.last().unwrap();
    let at2_phase = sb.turn(1);
    let (n2, py2) = sb.checkpoint("two");
    let at2 = sb.last().unwrap();
    assert_eq!(at2.phase, 1, "{at2:?} {at2_phase:?}");
    wait_dump_backlog(&sb.api);
    let dump = sb
        .daemon
        .data_dir()
        .join("dumps")
        .join(format!("{n2}-pid{py2}"));
    assert!(
        dump.join("manifest.json").is_file(),
        "no dump {}: {}",
        dump.display(),
        sb.daemon.log()
    );
    let pages = fs::metadata(dump.join("pages")).unwrap().len();
    eprintln!("n2's job dump: {} KiB of pages", pages >> 10);
    assert!(pages >= 8 << 20, "n2's dump holds the new buffer: {pages}");

    // n2's job template (the newer of the two) killed from inside the sandbox: templates
    // are processes of its pid namespace.
    let tpls = sb.job_templates();
    assert_eq!(tpls.len(), 2, "{tpls:?}");
    api.sh(id, &format!("kill -9 {}", ns_pid(tpls[1])));
    let deadline = Instant::now() + Duration::from_secs(10);
    while sb.process_state(&n2, "python3") != "dumped" {
        assert!(Instant::now() < deadline, "{}", sb.listed(&n2));
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(sb.process_state(&n2, "cat"), "live");

    // Mutated: a third buffer, a variable.
    sb.turn(2);
    api.run(id, &sb.sh, "x=after");
    api.rollback(id, &n2);
    assert!(
        sb.daemon.log().contains("process restored from its dump"),
        "{}",
        sb.daemon.log()
    );
    sb.assert_job_resumed(&at2);
    assert_eq!(api.run(id, &sb.sh, "echo ${x:-unset}"), "unset\n");
    // Again: still from the dump (the job's template is not re-made). The restored
    // job's phase is n2's, 1.
    sb.turn(2);
    api.rollback(id, &n2);
    sb.assert_job_resumed(&at2);
    // n1's template is alive: the ordinary fork.
    api.rollback(id, &n1);
    sb.assert_job_resumed(&at1);
    assert_ne!(at1.hash, at2.hash);
    // A branch of n2: its job from the dump too, in the branch's own files.
    let branch = id_of(&api.branch(&n2, 1)[0]);
    sb.assert_job_resumed_in(&branch, &at2);
    let log = sb.daemon.log();
    assert_eq!(
        log.matches("process restored from its dump").count(),
        3,
        "two rollbacks and a branch: {log}"
    );
    sb.assert_job_resumed(&at1);
}

/// With `--pool-max-templates 1`, nodes with a background pipeline are evicted once
/// their dumps are on disk (the newest node keeps the last live templates of each
/// program run), and a rollback to them restores the job from its dump.
#[test]
fn the_pool_evicts_nodes_with_background_jobs_and_they_come_back_from_dumps() {
    evict_and_restore("jobpool", &["--pool-max-templates", "1"]);
}

/// The same under `--dump-policy on-evict`: no dump at the checkpoints; the pool writes
/// the job's dumps (each incremental against the same process's nearest dump) just
/// before it evicts their node, and never the newest node's.
#[test]
fn on_evict_the_pool_dumps_the_jobs_it_evicts() {
    let sb = evict_and_restore(
        "jobevict",
        &["--pool-max-templates", "1", "--dump-policy", "on-evict"],
    );
    let dumps: Vec<String> = fs::read_dir(sb.daemon.data_dir().join("dumps"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let jobs = dumps.iter().filter(|d| d.contains("-pid")).count();
    // n0's and n1's python and cat; n2's never (it was not evicted); n0 was evicted
    // again after its rollback re-made its session's template only.
    assert_eq!(jobs, 4, "{dumps:?}");
}

/// Three checkpoints of the job under `flags` (a pool of one template): the two older
/// nodes are evicted with their job templates, and rollbacks restore them.
fn evict_and_restore(test: &str, flags: &[&str]) -> Sb {
    let sb = Sb::start(test, flags);
    let (api, id) = (&sb.api, sb.id.as_str());
    api.run(id, &sb.sh, "n=0");
    let (n0, _) = sb.checkpoint("n0");
    let at0 = sb.last().unwrap();
    sb.turn(1);
    api.run(id, &sb.sh, "n=1");
    let (n1, _) = sb.checkpoint("n1");
    let at1 = sb.last().unwrap();
    sb.turn(2);
    let (n2, _) = sb.checkpoint("n2");
    // The pool works on its own thread: n0 and n1 go, n2 stays.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let stats = api.get("/v1/stats").expect(200, "stats");
        let evicted = [&n0, &n1]
            .iter()
            .all(|n| sb.process_state(n, "python3") == "dumped");
        if evicted && stats["pool"]["evictions"].as_u64() >= Some(6) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "n0 and n1 not evicted: {stats} {} {}",
            sb.listed(&n0),
            sb.daemon.log()
        );
        thread::sleep(Duration::from_millis(100));
    }
    for n in [&n0, &n1] {
        let listed = sb.listed(n);
        assert_eq!(listed["sessions"][0]["template"], "dumped", "{listed}");
        assert_eq!(sb.process_state(n, "cat"), "dumped", "{listed}");
    }
    assert_eq!(sb.process_state(&n2, "python3"), "live");
    // The stats count the jobs' templates too: n0 and n1 each a session, python and
    // cat dumped; n2's three live.
    let stats = api.get("/v1/stats").expect(200, "stats");
    assert_eq!(stats["pool"]["templates_dumped"], 6, "{stats}");
    assert_eq!(stats["state"]["templates_dumped"], 6, "{stats}");
    assert_eq!(stats["state"]["templates_live"], 3, "{stats}");
    assert_eq!(stats["state"]["templates_gone"], 0, "{stats}");

    sb.signal("TERM");
    api.run(id, &sb.sh, "n=9");
    api.rollback(id, &n0);
    assert!(
        sb.daemon.log().contains("process restored from its dump"),
        "{}",
        sb.daemon.log()
    );
    sb.assert_job_resumed(&at0);
    assert_eq!(api.run(id, &sb.sh, "echo $n"), "0\n");
    api.rollback(id, &n1);
    sb.assert_job_resumed(&at1);
    assert_eq!(api.run(id, &sb.sh, "echo $n"), "1\n");
    sb
}

/// The daemon SIGKILLed, then the job's template at the head node: the restarted daemon
/// revives the sandbox at its head with the job rebuilt from its dump (forking the
/// adopted template of the parent node).
#[test]
fn a_revived_sandbox_gets_its_job_back_from_its_dump() {
    let mut sb = Sb::start("jobrevive", &[]);
    let (n1, _) = sb.checkpoint("one");
    let at1 = sb.last().unwrap();
    sb.turn(1);
    let (n2, _) = sb.checkpoint("two");
    let at2 = sb.last().unwrap();
    wait_dump_backlog(&sb.api);
    // Not during a standby's fork, which the daemon's death would kill with its template.
    wait_standbys_forked(&sb.api);
    sb.daemon.kill();
    let tpls = sb.job_templates();
    assert_eq!(tpls.len(), 2, "{tpls:?}");
    kill9(tpls[1]);
    sb.daemon.restart(&[]);
    sb.api = Http::new(sb.daemon.socket());
    assert!(
        sb.daemon.log().contains("process restored from its dump"),
        "{}",
        sb.daemon.log()
    );
    sb.assert_job_resumed(&at2);
    assert_eq!(sb.process_state(&n2, "python3"), "dumped");
    assert_eq!(sb.process_state(&n1, "python3"), "live");
    sb.api.rollback(&sb.id, &n1);
    sb.assert_job_resumed(&at1);
    sb.api.rollback(&sb.id, &n2);
    sb.assert_job_resumed(&at2);
}

/// A node with no other template of the job's program run (the only node): its job
/// template killed from inside the sandbox, the job is restored from its dump into a
/// fresh process that the tree's init starts in the sandbox, its memory, counter and
/// pipe back; again at the next rollback (such a process is not made a template).
#[test]
fn a_job_with_no_template_of_its_run_left_comes_back_in_a_fresh_process() {
    let sb = Sb::start("jobhusk", &[]);
    let (api, id) = (&sb.api, sb.id.as_str());
    sb.turn(1);
    let (n1, _) = sb.checkpoint("one");
    let at1 = sb.last().unwrap();
    wait_dump_backlog(&sb.api);
    let tpls = sb.job_templates();
    assert_eq!(tpls.len(), 1, "{tpls:?}");
    api.sh(id, &format!("kill -9 {}", ns_pid(tpls[0])));
    let deadline = Instant::now() + Duration::from_secs(10);
    while sb.process_state(&n1, "python3") != "dumped" {
        assert!(Instant::now() < deadline, "{}", sb.listed(&n1));
        thread::sleep(Duration::from_millis(50));
    }
    sb.turn(2);
    api.rollback(id, &n1);
    assert!(
        sb.daemon
            .log()
            .contains("process restored from its dump into a fresh process"),
        "{}",
        sb.daemon.log()
    );
    sb.assert_job_resumed(&at1);
    assert_eq!(sb.process_state(&n1, "python3"), "dumped");
    sb.turn(2);
    api.rollback(id, &n1);
    sb.assert_job_resumed(&at1);
}

/// The daemon and the tree's init SIGKILLed (every template dies with the init's pid
/// namespace): the restarted daemon re-creates the tree and revives the sandbox at its
/// head, the job (and `cat`) rebuilt from their dumps into fresh processes.
#[test]
fn a_job_comes_back_from_its_dump_after_the_tree_init_died() {
    let mut sb = Sb::start("jobinit", &[]);
    sb.turn(1);
    let (n1, _) = sb.checkpoint("one");
    let at1 = sb.last().unwrap();
    wait_dump_backlog(&sb.api);
    // The tree's init is the parent of the session.
    let session = sb.api.sandbox(&sb.id)["sessions"][0]["pid"]
        .as_i64()
        .unwrap();
    let stat = fs::read_to_string(format!("/proc/{session}/stat")).unwrap();
    let ppid: i32 = stat
        .rsplit(')')
        .next()
        .and_then(|rest| rest.split_whitespace().nth(1))
        .and_then(|p| p.parse().ok())
        .unwrap();
    assert_eq!(ns_pid(ppid), "1", "pid {ppid} is not the tree's init");
    let init = Pidfd::open(Pid::from_raw(ppid)).unwrap();
    sb.daemon.kill();
    init.kill_and_wait(Duration::from_secs(10)).unwrap();
    sb.daemon.restart(&[]);
    sb.api = Http::new(sb.daemon.socket());
    let log = sb.daemon.log();
    assert!(
        log.matches("process restored from its dump into a fresh process")
            .count()
            >= 2,
        "{log}"
    );
    sb.assert_job_resumed(&at1);
    assert_eq!(sb.api.run(&sb.id, &sb.sh, "echo ok"), "ok\n");
    assert_eq!(sb.process_state(&n1, "cat"), "dumped");
}

/// Under `--dump-policy off` nothing is dumped: once the job's template is killed, the
/// node lists it `none` and a rollback is refused before anything is killed, naming the
/// job by pid and name; the job runs on.
#[test]
fn a_job_with_neither_template_nor_dump_is_refused_by_name() {
    let sb = Sb::start("jobnodump", &["--dump-policy", "off"]);
    let (n1, py1) = sb.checkpoint("one");
    let tpls = sb.job_templates();
    assert_eq!(tpls.len(), 1, "{tpls:?}");
    kill9(tpls[0]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while sb.process_state(&n1, "python3") != "none" {
        assert!(Instant::now() < deadline, "{}", sb.listed(&n1));
        thread::sleep(Duration::from_millis(50));
    }
    let before = sb.last().unwrap();
    sb.api
        .post(
            &format!("/v1/sandboxes/{}/rollback", sb.id),
            &json!({ "node": n1 }),
        )
        .expect_error(
            422,
            "node_not_restorable",
            &[&n1, &py1.to_string(), "python3", "no dump"],
            "rollback",
        );
    // Nothing was killed: the job counts on.
    sb.wait_line("the job after the refusal", |l| l.count > before.count + 2);
}
