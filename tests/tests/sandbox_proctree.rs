//! Every process of a sandbox, not only its sessions: a background job of a bash
//! session, a `subprocess.Popen` child of a python session, and a pipeline of two
//! background processes are checkpointed with the sandbox and come back, their state
//! restored (counters they keep in memory carry on from the checkpoint; bytes unread in
//! a pipe are there again, byte for byte), on rollback and in a branch; processes
//! started after the checkpoint do not survive a rollback; a socket is refused with an
//! error naming the process and fd; removing the sandbox and its nodes leaves no
//! template. Needs root, cgroups, FUSE, the store.

use std::fs;
use std::thread;
use std::time::Duration;

use deltabox_tests::procs::{At, ProcSandbox};
use deltabox_tests::sandbox::{Http, id_of};
use deltabox_tests::templates::wait_dump_backlog;
use deltabox_tests::wait_until;
use serde_json::json;

/// Waits (up to 10 s) until the counter in `file` of `box_id` is past `from`: it runs.
fn assert_counter_runs(sb: &ProcSandbox, box_id: &str, file: &str, from: u64) {
    let mut now = from;
    assert!(
        wait_until(Duration::from_secs(10), || {
            now = sb.number(box_id, file);
            now > from
        }),
        "{file} in {box_id}: the counter does not run (still {now} 10 s after {from})"
    );
}

/// Waits (up to 30 s) until the counter in `file` of `box_id` has run `steps` past
/// `at` (a rollback must then take it back by at least that much); returns its value.
fn counter_run_on(sb: &ProcSandbox, box_id: &str, file: &str, at: At, steps: u64) -> u64 {
    let mut now = 0;
    assert!(
        wait_until(Duration::from_secs(30), || {
            now = sb.number(box_id, file);
            now >= at.after + steps
        }),
        "{file} in {box_id}: the counter is at {now} 30 s after {at:?}"
    );
    now
}

/// A counter kept in a background process's memory, written to `file` every 50 ms.
fn counter(file: &str) -> String {
    format!("( i=0; while :; do i=$((i+1)); echo $i > {file}; sleep 0.05; done ) >/dev/null 2>&1 &")
}

/// Checkpoints `box_id` once the counter in `file` has counted to 20 (a second of
/// running: a counter wrongly restarted from 0 is then told apart from one resumed).
fn checkpoint_counter(sb: &ProcSandbox, box_id: &str, file: &str, label: &str) -> (String, At) {
    sb.checkpoint_counter(box_id, label, 20, || sb.number_if_any(box_id, file))
}

/// After a rollback or branch to a checkpoint taken when the counter in `file` was
/// `at`: it runs again, from there, not from 0 and not from `later`, where it was
/// before the rollback.
fn assert_counter_resumed(sb: &ProcSandbox, box_id: &str, file: &str, at: At, later: Option<u64>) {
    // Half a second of running: the bounds below are made for it.
    thread::sleep(Duration::from_millis(500));
    let v1 = sb.number(box_id, file);
    assert_counter_runs(sb, box_id, file, v1);
    // Not below the value read before the checkpoint: the counter only grows, and the
    // restored file and memory hold the node's value (the value read after the
    // checkpoint is no lower bound: under load that read can take longer than the
    // restored counter gets to run in half a second).
    assert!(
        v1 >= at.before && v1 < at.after + 40,
        "{file} in {box_id}: {v1} half a second after resuming from {at:?}"
    );
    if let Some(later) = later {
        assert!(
            v1 < later,
            "{file} in {box_id}: {v1}, not back from {later}"
        );
    }
}

#[test]
fn a_bash_background_job_comes_back_and_later_ones_are_gone() {
    let sb = ProcSandbox::new("ptbash");
    let (api, id) = (&sb.api, sb.id.as_str());
    let sh = api.session(id, "bash");
    api.run(id, &sh, &format!("x=42; {}", counter("/tmp/cnt")));
    api.run(id, &sh, "sleep 1000 &");
    assert_eq!(sb.count(id, "sleep 1000", 1), 1, "{:?}", sb.procs(id));
    let (node, at) = checkpoint_counter(&sb, id, "/tmp/cnt", "jobs");
    // The job and the counter are templates of the node, with the session.
    // (and the counter's `sleep 0.05`, if it was running)
    let made = sb.templates().len();
    assert!(
        (3..=4).contains(&made),
        "{made} templates of {:?}",
        sb.procs(id)
    );

    // Started after the checkpoint: must not survive the rollback.
    api.run(id, &sh, "sleep 1234 & x=7");
    api.exec(
        id,
        &["sh", "-c", "sleep 1235 >/dev/null 2>&1 &"],
        Some(10_000),
    );
    // Two seconds' worth of counting.
    let later = counter_run_on(&sb, id, "/tmp/cnt", at, 40);
    assert!(
        later > at.after + 10,
        "the counter ran: {at:?} then {later}"
    );
    assert_eq!(sb.count(id, "sleep 1234", 1), 1);
    assert_eq!(sb.count(id, "sleep 1235", 1), 1);
    let sleeper_before: Vec<i32> = sb
        .procs(id)
        .into_iter()
        .filter(|(_, c)| c == "sleep 1000")
        .map(|(p, _)| p)
        .collect();

    api.rollback(id, &node);
    assert_eq!(sb.count(id, "sleep 1234", 0), 0, "{:?}", sb.procs(id));
    assert_eq!(sb.count(id, "sleep 1235", 0), 0, "{:?}", sb.procs(id));
    assert_eq!(sb.count(id, "sleep 1000", 1), 1, "{:?}", sb.procs(id));
    let sleeper_after = sb
        .procs(id)
        .into_iter()
        .find(|(_, c)| c == "sleep 1000")
        .unwrap()
        .0;
    assert!(!sleeper_before.contains(&sleeper_after), "a new process");
    // Its stdout and stderr are the restored session's (new) pipes, as they were the
    // session's at the checkpoint; its stdin, /dev/null.
    let session_pid = api.sandbox(id)["sessions"][0]["pid"].as_i64().unwrap();
    let link = |pid: i64, fd: i32| fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap();
    for fd in [1, 2] {
        assert_eq!(
            link(i64::from(sleeper_after), fd),
            link(session_pid, fd),
            "fd {fd} of the restored job"
        );
    }
    let stdin = link(i64::from(sleeper_after), 0);
    assert!(
        stdin.ends_with(format!("{id}/dev/null")),
        "{}",
        stdin.display()
    );
    assert_counter_resumed(&sb, id, "/tmp/cnt", at, Some(later));
    // The session keeps working, at its checkpoint's state.
    assert_eq!(api.run(id, &sh, "echo $x"), "42\n");
    assert_eq!(api.run(id, &sh, "echo ok; sleep 0.01 & wait $!"), "ok\n");
    // bash's job table still lists the jobs, with their checkpoint pids; the restored
    // ones are not bash's children any more (docs/deltacr.md): `wait` returns at once
    // and the job runs on.
    assert!(api.run(id, &sh, "jobs").contains("sleep 1000 &"));
    assert_eq!(api.run(id, &sh, "wait; echo waited $?"), "waited 0\n");
    assert_eq!(sb.count(id, "sleep 1000", 1), 1, "{:?}", sb.procs(id));

    // Again: the node's templates stay.
    api.run(id, &sh, "x=8");
    api.rollback(id, &node);
    assert_eq!(sb.count(id, "sleep 1000", 1), 1, "{:?}", sb.procs(id));
    assert_counter_resumed(&sb, id, "/tmp/cnt", at, None);
    assert_eq!(api.run(id, &sh, "echo $x"), "42\n");

    // Removing the sandbox and the node leaves no template.
    api.delete(&format!("/v1/sandboxes/{id}"))
        .expect(200, "remove the sandbox");
    api.delete(&format!("/v1/nodes/{node}"))
        .expect(200, "remove the node");
    assert!(
        sb.templates().is_empty(),
        "templates left: {:?}",
        sb.templates()
    );
}

/// A `Popen` child writing fixed-width lines to a pipe the session reads with
/// `os.read` (no buffering in the reader): unread bytes at the checkpoint are there
/// again after the rollback, exactly, and the child, with a counter in memory, runs on.
const POPEN: &str = r#"import os, subprocess, sys
child = subprocess.Popen([sys.executable, "-c", """
import sys, time
for i in range(100):
    sys.stdout.write("%05d\\n" % i)
sys.stdout.flush()
n = 0
while True:
    n += 1
    open("/tmp/child", "w").write(str(n))
    time.sleep(0.05)
"""], stdout=subprocess.PIPE)
fd = child.stdout.fileno()
first = os.read(fd, 60)
print(first.decode().split())"#;

#[test]
fn a_popen_child_and_its_pipe_come_back() {
    let sb = ProcSandbox::new("ptpopen");
    let (api, id) = (&sb.api, sb.id.as_str());
    let py = api.session(id, "python");
    let first = api.run(id, &py, POPEN);
    assert!(first.contains("'00009'"), "{first}");
    let (node, at) = checkpoint_counter(&sb, id, "/tmp/child", "popen");

    // Read more after the checkpoint, then go back: the bytes read are unread again.
    let more = api.run(id, &py, "print(len(os.read(fd, 300)))");
    assert_eq!(more, "300\n");
    let later = counter_run_on(&sb, id, "/tmp/child", at, 20);
    api.run(id, &py, "late = subprocess.Popen(['sleep', '1236'])");
    assert_eq!(sb.count(id, "sleep 1236", 1), 1, "{:?}", sb.procs(id));

    api.rollback(id, &node);
    assert_eq!(sb.count(id, "sleep 1236", 0), 0, "{:?}", sb.procs(id));
    let expected: String = (10..100).map(|i| format!("{i:05}\n")).collect();
    let rest = api.run(
        id,
        &py,
        "import select\nbuf = b''\nwhile select.select([fd], [], [], 0)[0] and len(buf) < 540:\n    buf += os.read(fd, 540 - len(buf))\nprint(buf.decode(), end='')",
    );
    assert_eq!(rest, expected, "the pipe's unread bytes after the rollback");
    assert_counter_resumed(&sb, id, "/tmp/child", at, Some(later));
    // The restored child is not the session's child any more (it hangs under the
    // tree's init, with a new pid): `poll()` gets ECHILD, which Popen reports as an
    // exit with status 0 (docs/deltacr.md).
    assert_eq!(api.run(id, &py, "print(child.poll())"), "0\n");
}

#[test]
fn a_pipeline_of_background_processes_comes_back_and_branches_are_isolated() {
    let sb = ProcSandbox::new("ptpipe");
    let (api, id) = (&sb.api, sb.id.as_str());
    let sh = api.session(id, "bash");
    // producer | consumer, both in the background: the consumer writes what it reads.
    api.run(
        id,
        &sh,
        "( i=0; while :; do i=$((i+1)); echo $i; sleep 0.05; done ) | \
         ( while read v; do echo $v > /tmp/last; done ) >/dev/null 2>&1 &",
    );
    let (node, at) = checkpoint_counter(&sb, id, "/tmp/last", "pipeline");
    let later = counter_run_on(&sb, id, "/tmp/last", at, 40);
    assert!(later > at.after + 10, "{at:?} then {later}");

    api.rollback(id, &node);
    assert_counter_resumed(&sb, id, "/tmp/last", at, Some(later));

    // A branch gets its own copy of the pipeline; the two run apart.
    let branch = id_of(&api.branch(&node, 1)[0]);
    assert_counter_resumed(&sb, &branch, "/tmp/last", at, None);
    let mine: Vec<i32> = sb.procs(id).into_iter().map(|(p, _)| p).collect();
    let theirs: Vec<i32> = sb.procs(&branch).into_iter().map(|(p, _)| p).collect();
    assert!(theirs.len() >= 3, "the branch's processes: {theirs:?}");
    assert!(mine.iter().all(|p| !theirs.contains(p)));
    api.exec(
        &branch,
        &["sh", "-c", "echo 1000000 > /tmp/last"],
        Some(10_000),
    );
    thread::sleep(Duration::from_millis(300));
    let own = sb.number(id, "/tmp/last");
    assert!(own < 100_000, "the branch's file leaked: {own}");
    // Killing the branch's processes leaves the sandbox's running.
    api.delete(&format!("/v1/sandboxes/{branch}"))
        .expect(200, "remove the branch");
    let a = sb.number(id, "/tmp/last");
    assert_counter_runs(&sb, id, "/tmp/last", a);
}

#[test]
fn a_socket_in_a_background_process_is_refused_by_name() {
    let sb = ProcSandbox::new("ptsock");
    let (api, id) = (&sb.api, sb.id.as_str());
    let sh = api.session(id, "bash");
    api.run(
        id,
        &sh,
        "python3 -c 'import socket, time; s = socket.socket(); time.sleep(1000)' \
         >/dev/null 2>&1 & echo $!",
    );
    // Until the python process holds its socket (fd 3).
    let has_socket = || {
        sb.procs(id).iter().any(|(pid, _)| {
            fs::read_link(format!("/proc/{pid}/fd/3"))
                .is_ok_and(|l| l.to_string_lossy().starts_with("socket:["))
        })
    };
    assert!(
        wait_until(Duration::from_secs(10), has_socket),
        "no socket in {:?}",
        sb.procs(id)
    );
    let reply = api.post(
        &format!("/v1/sandboxes/{id}/checkpoint"),
        &json!({ "label": "sock" }),
    );
    reply.expect_error(
        422,
        "process_not_restorable",
        &["fd 3", "socket:["],
        "checkpoint",
    );
    // Nothing half-made: no template, no node; the sandbox runs on.
    assert!(sb.templates().is_empty(), "{:?}", sb.templates());
    assert_eq!(api.run(id, &sh, "echo ok"), "ok\n");
    assert_eq!(
        sb.count(
            id,
            "python3 -c import socket, time; s = socket.socket(); time.sleep(1000)",
            1
        ),
        1
    );
}

/// A template of a background job is a child of the session that started it (a
/// template is a `CLONE_PARENT` fork of the job): bash's `wait` must not wait for it.
#[test]
fn bash_wait_is_not_held_by_the_template_of_its_job() {
    let sb = ProcSandbox::new("ptwait");
    let (api, id) = (&sb.api, sb.id.as_str());
    let sh = api.session(id, "bash");
    api.run(id, &sh, "sleep 0.5 &");
    api.checkpoint(id, "job");
    assert_eq!(sb.templates().len(), 2, "{:?}", sb.procs(id));
    let t = std::time::Instant::now();
    assert_eq!(api.run(id, &sh, "wait; echo waited $?"), "waited 0\n");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(api.run(id, &sh, "sleep 0.1 & wait $!; echo $?"), "0\n");
}

/// The template pool evicts nodes with other processes than sessions once their dumps
/// are written (those processes are dumped too), but keeps the newest live template of
/// each program run: over its bound, such nodes stay restorable, processes included.
#[test]
fn the_pool_evicts_nodes_with_background_processes_once_dumped() {
    let sb = ProcSandbox::with_flags("ptpool", &["--pool-max-templates", "1"]);
    let (api, id) = (&sb.api, sb.id.as_str());
    let sh = api.session(id, "bash");
    api.run(id, &sh, "sleep 1000 &");
    assert_eq!(sb.count(id, "sleep 1000", 1), 1, "{:?}", sb.procs(id));
    let nodes: Vec<String> = (0..3)
        .map(|i| {
            api.run(id, &sh, &format!("n={i}"));
            api.checkpoint(id, &format!("n{i}"))
        })
        .collect();
    // The pool works on its own thread: n0 and n1 go (a session and a job template
    // each), n2 keeps the last templates of the session and of the job.
    let mut stats = serde_json::Value::Null;
    for _ in 0..600 {
        stats = api.get("/v1/stats").expect(200, "stats");
        if stats["pool"]["evictions"] == 4 {
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(stats["pool"]["evictions"], 4, "{stats}");
    thread::sleep(Duration::from_millis(500));
    let stats = api.get("/v1/stats").expect(200, "stats");
    assert_eq!(stats["pool"]["evictions"], 4, "{stats}");
    assert_eq!(stats["pool"]["templates_live"], 2, "{stats}");
    api.run(id, &sh, "kill %1; n=9");
    assert_eq!(sb.count(id, "sleep 1000", 0), 0, "{:?}", sb.procs(id));
    api.rollback(id, &nodes[0]);
    assert_eq!(api.run(id, &sh, "echo $n"), "0\n");
    assert_eq!(sb.count(id, "sleep 1000", 1), 1, "{:?}", sb.procs(id));
}

/// After the daemon is SIGKILLed and restarted, the sandbox comes back at its head node
/// with its background job, whose template was adopted and taken off the dead view:
/// the job runs on from the checkpoint even once the page cache is dropped, and a
/// rollback forks it again.
#[test]
fn a_background_job_comes_back_after_a_daemon_restart() {
    let mut sb = ProcSandbox::new("ptrestart");
    let id = sb.id.clone();
    let sh = sb.api.session(&id, "bash");
    // A counter that also runs whatever /tmp/cmd says, once.
    sb.api.run(
        &id,
        &sh,
        "( i=0; while :; do i=$((i+1)); echo $i > /tmp/cnt; \
         if [ -f /tmp/cmd ]; then . /tmp/cmd; rm -f /tmp/cmd; fi; sleep 0.05; done ) \
         >/dev/null 2>&1 &",
    );
    let (node, at) = checkpoint_counter(&sb, &id, "/tmp/cnt", "job");
    thread::sleep(Duration::from_secs(1));

    sb.daemon.kill();
    sb.daemon.restart(&[]);
    sb.api = Http::new(sb.daemon.socket());
    assert_counter_resumed(&sb, &id, "/tmp/cnt", at, None);
    fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    // Still counting, and running bash code it never ran before (pages of bash not in
    // memory): its program is read from the backing files, not from the dead view.
    sb.api.sh(
        &id,
        "echo 'compgen -b > /tmp/out; help read >> /tmp/out; printf -v y \"%(%Y)T\" -1' > /tmp/cmd",
    );
    // The job runs /tmp/cmd, then removes it.
    assert!(
        wait_until(Duration::from_secs(10), || sb
            .api
            .sh(&id, "test -e /tmp/cmd || echo done")
            .contains("done")),
        "/tmp/cmd not run within 10 s"
    );
    let out = sb
        .api
        .sh(&id, "cat /tmp/out 2>&1; test ! -e /tmp/cmd && echo done");
    assert!(
        out.contains("compgen") && out.contains("read: read"),
        "{out}"
    );
    assert!(out.ends_with("done\n"), "{out}");
    // Still counting after drop_caches.
    let a = sb.number(&id, "/tmp/cnt");
    assert_counter_runs(&sb, &id, "/tmp/cnt", a);
    // The session and the job's subshell (a fork of it: the same command line), once
    // (polled: the subshell's fork for `sleep` has that command line until its exec).
    let shells = |sb: &ProcSandbox| {
        let mut n = 0;
        for _ in 0..60 {
            n = sb
                .procs(&id)
                .iter()
                .filter(|(_, c)| c.contains("DeltaBox bash session"))
                .count();
            if n == 2 {
                break;
            }
            thread::sleep(Duration::from_millis(50));
        }
        n
    };
    assert_eq!(shells(&sb), 2, "{:?}", sb.procs(&id));

    sb.api.rollback(&id, &node);
    fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    assert_counter_resumed(&sb, &id, "/tmp/cnt", at, None);
    assert_eq!(shells(&sb), 2, "{:?}", sb.procs(&id));
    assert_eq!(sb.api.run(&id, &sh, "echo ok"), "ok\n");
}

/// What other processes cost a checkpoint and a rollback: a bash session with 0, 4 and
/// 16 background `sleep`s (and one pipe between two of them when there are any), 15
/// checkpoints and rollbacks each; prints the daemon's medians. Not a pass/fail test:
///
///     cargo test -p deltabox-tests --test sandbox_proctree -- --ignored --nocapture measure
#[test]
#[ignore = "a measurement: run with --ignored --nocapture"]
fn measure_checkpoint_and_rollback_with_background_processes() {
    fn median(mut v: Vec<f64>) -> f64 {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }
    for jobs in [0usize, 4, 16] {
        let sb = ProcSandbox::new(&format!("ptm{jobs}"));
        let (api, id) = (&sb.api, sb.id.as_str());
        let sh = api.session(id, "bash");
        if jobs > 0 {
            api.run(id, &sh, "sleep 1000 | sleep 1001 &");
            for i in 2..jobs {
                api.run(id, &sh, &format!("sleep {} &", 1000 + i));
            }
        }
        assert!(
            wait_until(Duration::from_secs(10), || sb.procs(id).len() == jobs + 1),
            "{:?}",
            sb.procs(id)
        );
        let (mut total, mut quiesce, mut procs, mut record, mut rb_total, mut rb_procs) =
            (vec![], vec![], vec![], vec![], vec![], vec![]);
        for i in 0..15 {
            let node = api
                .post(
                    &format!("/v1/sandboxes/{id}/checkpoint"),
                    &json!({ "label": format!("m{i}") }),
                )
                .expect(201, "checkpoint");
            let t = &node["timings"];
            total.push(t["total_ms"].as_f64().unwrap());
            quiesce.push(t["quiesce_ms"].as_f64().unwrap());
            procs.push(t["processes_ms"].as_f64().unwrap());
            record.push(t["record_ms"].as_f64().unwrap());
            let rolled = api.rollback(id, &id_of(&node));
            let t = &rolled["timings"];
            rb_total.push(t["total_ms"].as_f64().unwrap());
            rb_procs.push(t["processes_ms"].as_f64().unwrap());
        }
        assert_eq!(sb.procs(id).len(), jobs + 1, "{:?}", sb.procs(id));
        eprintln!(
            "{jobs:>2} background processes: checkpoint {:.2} ms (quiesce {:.2}, processes \
             {:.2}, record {:.2}); rollback {:.2} ms (processes {:.2})",
            median(total),
            median(quiesce),
            median(procs),
            median(record),
            median(rb_total),
            median(rb_procs)
        );
    }
}

/// A node lists its other processes (`processes`, template `live`); once one's
/// template is killed (from the host, by pid) it says `dumped` (its dump was written
/// after the checkpoint), and with no other live template of the same program run to
/// rebuild it from (the node is the only one), a rollback to the node restores the
/// job from its dump into a fresh process (`cr::husk`).
#[test]
fn a_node_whose_job_template_is_gone_comes_back_into_a_fresh_process() {
    let sb = ProcSandbox::new("ptgone");
    let (api, id) = (&sb.api, sb.id.as_str());
    let sh = api.session(id, "bash");
    api.run(id, &sh, "sleep 1000 &");
    assert_eq!(sb.count(id, "sleep 1000", 1), 1, "{:?}", sb.procs(id));
    let node = api
        .post(&format!("/v1/sandboxes/{id}/checkpoint"), &json!({}))
        .expect(201, "checkpoint");
    let processes = node["processes"].as_array().cloned().unwrap_or_default();
    assert_eq!(processes.len(), 1, "{node}");
    assert_eq!(processes[0]["comm"], "sleep", "{node}");
    assert_eq!(processes[0]["template"], "live", "{node}");
    let pid = processes[0]["pid"].to_string();
    let node = id_of(&node);
    let listed = |api: &Http| {
        let tree = api
            .get(&format!("/v1/sandboxes/{id}/tree"))
            .expect(200, "tree");
        tree["nodes"][0]["processes"][0]["template"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(listed(api), "live");
    // Its dump written.
    wait_dump_backlog(api);

    // The job's template (the stopped `sleep 1000` in the templates cgroup) is killed.
    let job_template: Vec<i32> = sb
        .templates()
        .into_iter()
        .filter(|p| {
            fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default() == b"sleep\x001000\x00"
        })
        .collect();
    assert_eq!(job_template.len(), 1, "{:?}", sb.templates());
    // SAFETY: kill(2) takes plain integers.
    unsafe { libc::kill(job_template[0], libc::SIGKILL) };
    for _ in 0..100 {
        if listed(api) == "dumped" {
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(listed(api), "dumped");
    api.run(id, &sh, "x=after");
    api.post(
        &format!("/v1/sandboxes/{id}/rollback"),
        &json!({ "node": node }),
    )
    .expect(200, "rollback");
    assert_eq!(api.run(id, &sh, "echo \"[$x]\""), "[]\n");
    // The job is back (one `sleep 1000`), in a process that never ran it before.
    assert_eq!(sb.count(id, "sleep 1000", 1), 1, "{:?}", sb.procs(id));
    let log = sb.daemon.log();
    assert!(
        log.contains("process restored from its dump into a fresh process")
            && log.contains(&format!("pid={pid}")),
        "{log}"
    );
}

/// A session holding a copy of its stdout pipe beyond fd 2 is refused at the
/// checkpoint (naming the fd), not at a later restore.
#[test]
fn a_session_holding_its_stdout_beyond_fd_2_is_refused() {
    let sb = ProcSandbox::new("ptdup");
    let (api, id) = (&sb.api, sb.id.as_str());
    let py = api.session(id, "python");
    api.run(id, &py, "import os\nsaved = os.dup(1)\nprint(saved)");
    let fd = api.run(id, &py, "print(saved)");
    api.post(&format!("/v1/sandboxes/{id}/checkpoint"), &json!({}))
        .expect_error(
            422,
            "process_not_restorable",
            &[&format!("fd {}", fd.trim()), "stdio pipe"],
            "checkpoint",
        );
    api.run(id, &py, "os.close(saved)");
    api.checkpoint(id, "after");
}
