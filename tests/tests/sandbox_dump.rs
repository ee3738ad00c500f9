//! Templates are a cache: every checkpoint is dumped in the background, and a node
//! whose template was killed (`kill -9` from the host, by pid) — also across a SIGKILL
//! of the daemon — is restored from its dump, its Python objects equal.

use std::fs;
use std::path::Path;
use std::time::Instant;

use deltabox_tests::memory::PySandbox;
use deltabox_tests::sandbox::{Http, id_of};
use deltabox_tests::templates::{
    kill9, ns_pid, session_template_state, templates, wait_dump, wait_standbys_forked,
};
use serde_json::json;

/// A 64 MiB object graph `g` and `h()`, a hash of it.
const SETUP: &str = "import hashlib, pickle, os
h = lambda: hashlib.sha256(pickle.dumps(g)).hexdigest()
g = [{'i': i, 's': str(i) * 3, 'b': os.urandom(1000), 'l': [i, i + 1]} for i in range(64 * 1024)]
x = 1";

fn own_pages(dump: &Path) -> u64 {
    fs::metadata(dump.join("pages")).unwrap().len()
}

#[test]
fn a_node_whose_template_was_killed_is_restored_from_its_dump() {
    let PySandbox {
        mut daemon,
        api,
        sandbox: sb,
        tree,
        session: py,
    } = PySandbox::start("sbdump", &[], SETUP);
    let h1 = api.run(&sb, &py, "print(h())");
    let n1 = api.checkpoint(&sb, "one");
    api.run(
        &sb,
        &py,
        "for i in range(0, 65536, 64): g[i]['b'] = os.urandom(1000)\nx = 2",
    );
    let h2 = api.run(&sb, &py, "print(h())");
    assert_ne!(h1, h2);
    let n2 = api.checkpoint(&sb, "two");
    let d1 = wait_dump(&daemon, &n1, &py);
    let d2 = wait_dump(&daemon, &n2, &py);
    let (b1, b2) = (own_pages(&d1), own_pages(&d2));
    eprintln!("dump sizes: n1 {} KiB, n2 {} KiB", b1 >> 10, b2 >> 10);
    assert!(b1 >= 64 << 20, "n1's dump holds the graph: {b1} bytes");
    assert!(
        b2 < b1 / 4,
        "n2's dump holds only what changed: {b2} of {b1} bytes"
    );

    // kill -9 of n2's template, from the host.
    let tpls = templates(&daemon, &tree);
    assert_eq!(tpls.len(), 2, "{tpls:?}");
    kill9(tpls[1]);
    api.run(&sb, &py, "x = 3\ng = None");
    let t = Instant::now();
    let rolled = api.rollback(&sb, &n2);
    eprintln!(
        "rollback from the dump: {:.1} ms (daemon: {})",
        t.elapsed().as_secs_f64() * 1e3,
        rolled["timings"]
    );
    assert!(
        rolled["timings"]["fallback_ms"].as_f64() > Some(0.0),
        "a restore from the dump times its memory phase: {rolled}"
    );
    assert_eq!(api.run(&sb, &py, "print(h())"), h2);
    assert_eq!(api.run(&sb, &py, "print(x, len(g))"), "2 65536\n");
    // The restored session became n2's template again: the next restore is a fork.
    assert_eq!(session_template_state(&api, &sb, &n2), "live");
    api.run(&sb, &py, "g3 = [str(i) * 10 for i in range(200000)]");
    assert_eq!(
        api.run(&sb, &py, "print(sum(len(s) for s in g3))"),
        "10888900\n"
    );
    // n1's template is alive: the ordinary rollback.
    api.rollback(&sb, &n1);
    assert_eq!(
        api.run(&sb, &py, "print(h(), x)"),
        format!("{} 1\n", h1.trim())
    );

    // The daemon SIGKILLed, then n3's template: the sandbox comes back at n3 from the
    // dump, forking the adopted n1 template (n3's parent).
    api.run(&sb, &py, "g[7]['s'] = 'seven'\nx = 4");
    let h3 = api.run(&sb, &py, "print(h())");
    let n3 = api.checkpoint(&sb, "three");
    wait_dump(&daemon, &n3, &py);
    // Not during a standby's fork, which the daemon's death would kill with its template.
    wait_standbys_forked(&api);
    daemon.kill();
    // Live templates: n1's, n2's re-made one and n3's.
    let tpls = templates(&daemon, &tree);
    assert_eq!(tpls.len(), 3, "{tpls:?}");
    kill9(tpls[2]);
    daemon.restart(&[]);
    let api = Http::new(daemon.socket());
    // Revived from n3's dump, the session became n3's template again.
    assert_eq!(session_template_state(&api, &sb, &n3), "live");
    assert_eq!(session_template_state(&api, &sb, &n2), "live");
    assert_eq!(session_template_state(&api, &sb, &n1), "live");
    assert_eq!(
        api.run(&sb, &py, "print(h(), x)"),
        format!("{} 4\n", h3.trim())
    );
    // A branch of n3, whose template is gone again: its session is rebuilt from the
    // dump too, and becomes n3's template.
    let before = templates(&daemon, &tree);
    kill9(*before.last().unwrap());
    // `tree` sees the template's process gone at once.
    assert_eq!(session_template_state(&api, &sb, &n3), "dumped");
    let branch = id_of(&api.branch(&n3, 1)[0]);
    assert_eq!(session_template_state(&api, &sb, &n3), "live");
    assert_eq!(
        templates(&daemon, &tree).len(),
        before.len(),
        "the branch re-made n3's template"
    );
    assert_eq!(
        api.run(&branch, &py, "print(h(), x)"),
        format!("{} 4\n", h3.trim())
    );
    // n1's template killed from inside the sandbox (templates live in the tree's pid
    // namespace): n1 has no ancestor, so the other live template of the session (n2's,
    // re-made) is forked and made n1 from n1's dump.
    let n1_template = templates(&daemon, &tree)[0];
    api.sh(&sb, &format!("kill -9 {}", ns_pid(n1_template)));
    let t = Instant::now();
    api.rollback(&sb, &n1);
    eprintln!(
        "rollback to n1 from its dump through n2's template: {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    assert_eq!(
        api.run(&sb, &py, "print(h(), x)"),
        format!("{} 1\n", h1.trim())
    );
    api.run(&sb, &py, "x = 5");
    api.rollback(&sb, &n2);
    assert_eq!(
        api.run(&sb, &py, "print(h(), x)"),
        format!("{} 2\n", h2.trim())
    );
}

/// Dumps go with their nodes: `rm --node` deletes the dumps of the subtree it removes
/// (and keeps the others), and `gc` sweeps dumps whose node is gone.
#[test]
fn removed_nodes_take_their_dumps_and_gc_sweeps_orphans() {
    let PySandbox {
        daemon,
        api,
        sandbox,
        session,
        ..
    } = PySandbox::start("dump-rm", &[], "x = 1");
    let first = api.checkpoint(&sandbox, "first");
    api.run(&sandbox, &session, "x = 2");
    let second = api.checkpoint(&sandbox, "second");
    let kept = wait_dump(&daemon, &first, &session);
    let doomed = wait_dump(&daemon, &second, &session);
    api.rollback(&sandbox, &first);
    api.delete(&format!("/v1/nodes/{second}"))
        .expect(200, "remove the second node");
    assert!(!doomed.exists(), "{} outlived its node", doomed.display());
    assert!(
        kept.join("manifest.json").is_file(),
        "the first node's dump went too"
    );

    // A dump whose node is not in the tree (as one finished after its node was removed).
    let orphan = daemon.data_dir().join("dumps").join(format!(
        "{}-{session}",
        "01a202de-0000-7000-8000-000000000000"
    ));
    fs::create_dir_all(&orphan).unwrap();
    fs::write(orphan.join("manifest.json"), "{}").unwrap();
    let gc = api.post("/v1/gc", &json!({})).expect(200, "gc");
    assert_eq!(gc["dumps_removed"], 1, "{gc}");
    assert!(!orphan.exists(), "gc left {}", orphan.display());
    assert!(
        kept.join("manifest.json").is_file(),
        "gc removed a live node's dump"
    );
    // The node whose dump stayed still restores.
    api.run(&sandbox, &session, "x = 3");
    api.rollback(&sandbox, &first);
    assert_eq!(api.run(&sandbox, &session, "print(x)"), "1\n");
}
