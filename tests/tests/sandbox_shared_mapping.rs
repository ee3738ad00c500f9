//! Processes sharing a writable `MAP_SHARED` file mapping come back sharing it: after a
//! rollback and in a branch (forked from their templates), and restored from a dump
//! (the template killed), each maps the node's file again, shared, so writes through
//! the mapping reach the file and the other process. Needs root, cgroups, FUSE, the
//! store.

use std::fs;
use std::thread;
use std::time::Duration;

use deltabox_tests::memory::SHARED_MAPPING;
use deltabox_tests::procs::{At, ProcSandbox};
use deltabox_tests::sandbox::id_of;
use deltabox_tests::templates::{
    kill9, session_template_state, templates_running, wait_dump, wait_dump_backlog,
};
use deltabox_tests::wait_until;

/// The counter in the shared file of sandbox `id`, and what the reader last saw, read
/// by one process one right after the other (two execs would be apart by as long as an
/// exec takes under load, while the writer counts on); `None` while either file is not
/// written yet.
fn shared_and_seen_if_any(sb: &ProcSandbox, id: &str) -> Option<(u64, u64)> {
    let out = sb.api.sh(
        id,
        "python3 -c 'import struct\ntry:\n    \
         print(struct.unpack(\"Q\", open(\"/tmp/shared\", \"rb\").read(8))[0], open(\"/tmp/seen\").read())\n\
         except (OSError, struct.error):\n    pass'",
    );
    match out.split_whitespace().collect::<Vec<_>>().as_slice() {
        [written, seen] => Some((written.parse().ok()?, seen.parse().ok()?)),
        _ => None,
    }
}

/// The same, read again while a file is being rewritten (up to 1 s).
fn shared_and_seen(sb: &ProcSandbox, id: &str) -> (u64, u64) {
    for _ in 0..20 {
        if let Some(both) = shared_and_seen_if_any(sb, id) {
            return both;
        }
        thread::sleep(Duration::from_millis(50));
    }
    panic!("{id}: no counter in /tmp/shared and /tmp/seen")
}

/// Checkpoints `id` once the writer has counted to `min` (20 is a second of running: a
/// writer wrongly restarted from 0 is then told apart from one resumed).
fn checkpoint_writer(sb: &ProcSandbox, id: &str, label: &str, min: u64) -> (String, At) {
    sb.checkpoint_counter(id, label, min, || {
        shared_and_seen_if_any(sb, id).map(|(written, _)| written)
    })
}

/// Waits (up to 30 s) until the writer of `id` has counted `steps` past `at`; returns
/// the counter and what the reader saw.
fn writer_run_on(sb: &ProcSandbox, id: &str, at: At, steps: u64) -> (u64, u64) {
    let mut both = (0, 0);
    assert!(
        wait_until(Duration::from_secs(30), || {
            both = shared_and_seen(sb, id);
            both.0 >= at.after + steps
        }),
        "{id}: the writer is at {both:?} 30 s after {at:?}"
    );
    both
}

/// After a restore to a node where the writer was at `at` (and before it, at `later`):
/// both run, the writer counts on from the node's value, and the reader follows it.
fn assert_shared_follows(sb: &ProcSandbox, id: &str, at: At, later: Option<u64>) {
    // Half a second of running: the bounds below are made for it.
    thread::sleep(Duration::from_millis(500));
    let (w1, r1) = shared_and_seen(sb, id);
    let (mut w2, mut r2) = (w1, r1);
    assert!(
        wait_until(Duration::from_secs(10), || {
            (w2, r2) = shared_and_seen(sb, id);
            w2 > w1 && r2 > r1
        }),
        "{id}: not running: {w1}/{r1} then {w2}/{r2} 10 s later"
    );
    // Not below the value read before the checkpoint (the one read after it is no lower
    // bound: under load that read can take longer than the restored writer gets to run
    // in half a second).
    assert!(
        w1 >= at.before && w1 < at.after + 40,
        "{id}: the writer at {w1}, resumed from {at:?}"
    );
    assert!(
        w2.abs_diff(r2) <= 3,
        "{id}: the reader sees {r2}, the writer wrote {w2}"
    );
    if let Some(later) = later {
        assert!(w1 < later, "{id}: {w1}, not back from {later}");
    }
}

/// Whether process `pid` maps `/tmp/shared` shared and writable.
fn maps_shared(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap_or_default()
        .lines()
        .any(|l| l.contains(" rw-s ") && l.ends_with("/tmp/shared"))
}

/// Two background processes sharing a writable `MAP_SHARED` mapping of one file
/// ([`SHARED_MAPPING`]): after a rollback, and in a branch, both map the node's file
/// again and share its pages: the reader follows the writer, which resumes from the
/// checkpoint.
#[test]
fn two_processes_sharing_a_file_mapping_share_it_again() {
    let sb = ProcSandbox::new("ptshm");
    let (api, id) = (&sb.api, sb.id.as_str());
    let py = api.session(id, "python");
    api.run(id, &py, SHARED_MAPPING);
    let (node, at) = checkpoint_writer(&sb, id, "shared", 20);
    // Two seconds' worth of counting.
    let (later, seen) = writer_run_on(&sb, id, at, 40);
    assert!(
        later > at.after + 10 && seen.abs_diff(later) <= 3,
        "{at:?} {later} {seen}"
    );

    api.rollback(id, &node);
    assert_shared_follows(&sb, id, at, Some(later));
    // Each maps the file again, shared and writable; the templates hold no page of it.
    let mapped = sb.procs(id).iter().filter(|(p, _)| maps_shared(*p)).count();
    assert_eq!(mapped, 2, "{:?}", sb.procs(id));
    assert!(!sb.templates().iter().any(|p| maps_shared(*p)));

    let branch = id_of(&api.branch(&node, 1)[0]);
    assert_shared_follows(&sb, &branch, at, None);
    // Apart: the branch's writer writes its own file.
    let (mine, _) = shared_and_seen(&sb, id);
    let (theirs, _) = shared_and_seen(&sb, &branch);
    assert!(mine > theirs + 5, "the sandbox {mine}, the branch {theirs}");
}

/// The writer of the shared mapping, its template killed after its dump, comes back
/// from the dump (a fork of the parent node's writer template): it maps the node's file
/// again, shared, counts on from the node's value, and the reader follows it.
#[test]
fn a_writer_of_a_shared_mapping_comes_back_from_its_dump() {
    let sb = ProcSandbox::new("jobshm");
    let (api, id) = (&sb.api, sb.id.as_str());
    let py = api.session(id, "python");
    api.run(id, &py, SHARED_MAPPING);
    // The writer's template here is the base its dump at n2 is applied to.
    let (_n1, one) = checkpoint_writer(&sb, id, "one", 20);
    // n2 ten steps later: its writer is told apart from n1's.
    let (n2, at) = checkpoint_writer(&sb, id, "two", one.after + 10);
    wait_dump_backlog(api);
    let writers = templates_running(&sb.daemon, &sb.tree, |cmd| {
        String::from_utf8_lossy(cmd).contains("struct.pack_into")
    });
    assert_eq!(writers.len(), 2, "{writers:?}");
    kill9(writers[1]);
    // The live writer goes on: a second's worth of counting.
    let (later, _) = writer_run_on(&sb, id, at, 20);
    assert!(later > at.after + 10, "{at:?} {later}");

    api.rollback(id, &n2);
    assert!(
        sb.daemon.log().contains("process restored from its dump"),
        "{}",
        sb.daemon.log()
    );
    assert_shared_follows(&sb, id, at, Some(later));
    // The restored writer maps the file shared and writable (the templates, also in
    // the sandbox's pid namespace, do not).
    let writer_maps = api.sh(
        id,
        "grep -l pack_into /proc/[0-9]*/cmdline 2>/dev/null | sed 's,cmdline,maps,' | xargs cat 2>/dev/null; true",
    );
    assert!(
        writer_maps
            .lines()
            .any(|l| l.contains(" rw-s ") && l.ends_with("/tmp/shared")),
        "{writer_maps}"
    );
}

/// A python session with a writable shared file mapping, restored from its dump (its
/// template killed): the fallback forks the parent node's template, makes its memory
/// the dump's and maps the file again, shared.
#[test]
fn a_shared_file_mapping_comes_back_from_a_dump() {
    let sb = ProcSandbox::new("ptshmdump");
    let (api, id) = (&sb.api, sb.id.as_str());
    let py = api.session(id, "python");
    api.run(
        id,
        &py,
        "import mmap\nopen('/tmp/m', 'wb').write(b'a' * 4096)\n\
         f = open('/tmp/m', 'r+b')\nm = mmap.mmap(f.fileno(), 4096)\nm[0:1] = b'1'\nx = 1",
    );
    let _n1 = api.checkpoint(id, "one");
    api.run(id, &py, "m[0:1] = b'2'\nx = 2");
    let n2 = api.checkpoint(id, "two");
    // n2's dump on disk, then its template killed (the newest template).
    wait_dump(&sb.daemon, &n2, &py);
    let newest = sb.templates().into_iter().max().expect("two templates");
    kill9(newest);
    // Until the daemon has seen the template go.
    assert!(
        wait_until(Duration::from_secs(10), || session_template_state(
            api, id, &n2
        ) == "dumped"),
        "{n2}: still {} 10 s after its template was killed",
        session_template_state(api, id, &n2)
    );
    api.run(id, &py, "m[0:1] = b'3'\nx = 3");
    assert_eq!(session_template_state(api, id, &n2), "dumped");

    api.rollback(id, &n2);
    assert!(
        sb.daemon.log().contains("restored from its dump"),
        "{}",
        sb.daemon.log()
    );
    assert_eq!(api.run(id, &py, "print(x, m[0:1])"), "2 b'2'\n");
    // Shared with the file again: a write through the mapping is in the file.
    api.run(id, &py, "m[1:2] = b'Z'\nm.flush()");
    assert_eq!(
        api.sh(id, "head -c 2 /tmp/m"),
        "2Z",
        "the mapping is the file's"
    );
}
