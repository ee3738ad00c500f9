//! DeltaCR dumps: a template's state written to disk, incrementally against its
//! parent's dump, and the fallback restore that rebuilds a checkpoint from its dump
//! when its template is gone, by forking an older template; a dump made against the
//! parent's live template reads only the pages written since.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use deltabox_controller::cr::dump::{Dump, DumpOptions, dump_template, dump_template_against};
use deltabox_controller::cr::{self, Template};
use deltabox_tests::cr::{CrEnv, PY_REPL, Proc};
use deltabox_tests::{require_root, scratch_dir};
use nix::unistd::Pid;

/// The dumps directory of one test, removed when it ends.
struct Dumps(PathBuf);

impl Drop for Dumps {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Defines `h()`: a hash of the object graph `g` (pickled).
const HASH_FN: &str =
    "import hashlib, pickle, os; h = lambda: hashlib.sha256(pickle.dumps(g)).hexdigest()";

/// A 64 MiB object graph: 64 Ki dicts, each with a 1 KiB random bytes value.
const GRAPH: &str = "g = [{'i': i, 's': str(i) * 3, 'b': os.urandom(1000), 'l': [i, i + 1]} for i in range(64 * 1024)]";

fn dump(template: &Template, root: &Path, name: &str, parent: Option<&str>) -> Dump {
    let t = Instant::now();
    let stats = dump_template(
        template,
        &DumpOptions {
            root: root.to_path_buf(),
            name: name.to_owned(),
            parent: parent.map(str::to_owned),
            root_prefix: None,
        },
    )
    .unwrap_or_else(|e| panic!("dumping {name}: {e}"));
    eprintln!(
        "dump {name}: {} private pages, {} written, {} zero, {:.1} ms (call {:.1} ms)",
        stats.pages,
        stats.written,
        stats.zero,
        stats.ms,
        t.elapsed().as_secs_f64() * 1e3
    );
    Dump::open(root, name).unwrap()
}

/// A template of `p`, killed with the test.
fn template(env: &CrEnv, p: &Proc) -> Template {
    let t = cr::checkpoint(Pid::from_raw(p.pid), &env.checkpoint_opts()).unwrap();
    env.track(t.pid().as_raw());
    t
}

/// 1 MiB of the graph rewritten in place.
const REWRITE: &str = "for i in range(0, 65536, 64): g[i]['b'] = os.urandom(1000)";
/// 8 MiB of new objects.
const GROW: &str = "g2 = [os.urandom(4000) for _ in range(2048)]";

fn python(env: &CrEnv) -> Proc {
    let mut cmd = Command::new("python3");
    cmd.args(["-c", PY_REPL]);
    let mut p = env.spawn(cmd);
    assert_eq!(p.ask(HASH_FN), "None");
    p
}

#[test]
fn a_killed_template_is_restored_from_its_incremental_dump() {
    require_root();
    let env = CrEnv::new("dump");
    let dumps = Dumps(scratch_dir("cr-dump"));
    let mut p = python(&env);
    assert_eq!(p.ask(GRAPH), "None");
    let h1 = p.ask("h()");
    let t1 = template(&env, &p);
    let d1 = dump(&t1, &dumps.0, "n1", None);

    // A small change, a new 8 MiB of objects, some garbage freed.
    assert_eq!(p.ask(REWRITE), "None");
    assert_eq!(p.ask(GROW), "None");
    assert_eq!(p.ask("del g[60000:]"), "None");
    assert_eq!(p.ask("x = 7"), "None");
    let h2 = p.ask("h()");
    assert_ne!(h1, h2);
    let t2 = template(&env, &p);
    let d2 = dump(&t2, &dumps.0, "n2", Some("n1"));

    // Incremental: the second dump stores only what changed.
    let (b1, b2) = (d1.own_bytes(), d2.own_bytes());
    eprintln!("pages files: n1 {} KiB, n2 {} KiB", b1 >> 10, b2 >> 10);
    assert!(b1 >= 64 << 20, "the first dump holds the graph: {b1} bytes");
    assert!(
        b2 < b1 / 2,
        "the second dump holds only changed pages: {b2} of {b1} bytes"
    );
    assert!(d2.manifest().chain.len() >= 2, "{:?}", d2.manifest().chain);

    // The node's template is gone (kill -9 from the host).
    let t2_pid = t2.pid().as_raw();
    // SAFETY: kill(2) takes plain integers.
    unsafe { libc::kill(t2_pid, libc::SIGKILL) };
    assert!(
        (0..500).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(2));
            !t2.is_alive()
        }),
        "template {t2_pid} still alive"
    );
    drop(t2);

    // Roll back to n2 from its dump, forking n1's template.
    // SAFETY: kill(2) takes plain integers.
    unsafe { libc::kill(p.pid, libc::SIGKILL) };
    let t = Instant::now();
    let restored = t1
        .restore_from_dump(&d2, Some(&d1), &env.restore_opts())
        .unwrap_or_else(|e| panic!("fallback restore of n2 from n1's template: {e}"));
    eprintln!(
        "fallback restore: {:.1} ms (memory {:.1} ms, fork {:.1} ms)",
        t.elapsed().as_secs_f64() * 1e3,
        restored.timings.memory.as_secs_f64() * 1e3,
        restored.timings.fork.as_secs_f64() * 1e3
    );
    let delta = d2.manifest().stats.written * 4096;
    let memory_ms = restored.timings.memory.as_secs_f64() * 1e3;
    eprintln!(
        "fallback: {} MiB of delta (n2's own pages) applied in {memory_ms:.1} ms: {:.1} ms per 64 MiB",
        delta >> 20,
        memory_ms * (64u64 << 20) as f64 / delta as f64
    );
    let mut r = env.adopt(restored);
    assert_eq!(r.ask("h()"), h2);
    assert_eq!(r.ask("(x, len(g), len(g2))"), "(7, 60000, 2048)");
    // It keeps working: allocate, compute, free.
    assert_eq!(r.ask("g3 = [str(i) * 10 for i in range(200000)]"), "None");
    assert_eq!(r.ask("sum(len(s) for s in g3)"), "10888900");
    assert_eq!(r.ask("del g3"), "None");
    assert_eq!(r.ask("h()"), h2);

    // And back to n1 from its own template, and to n2 again from the dump.
    let mut r1 = env.adopt(cr::rollback(&t1, Pid::from_raw(r.pid), &env.restore_opts()).unwrap());
    assert_eq!(r1.ask("h()"), h1);
    // SAFETY: kill(2) takes plain integers.
    unsafe { libc::kill(r1.pid, libc::SIGKILL) };
    let mut r2 = env.adopt(
        t1.restore_from_dump(&d2, None, &env.restore_opts())
            .unwrap(),
    );
    assert_eq!(r2.ask("h()"), h2);
}

#[test]
fn a_dump_restores_an_older_node_from_a_newer_template() {
    require_root();
    let env = CrEnv::new("dump-back");
    let dumps = Dumps(scratch_dir("cr-dump-back"));
    let mut p = python(&env);
    assert_eq!(p.ask(GRAPH), "None");
    assert_eq!(p.ask("y = 1"), "None");
    let h1 = p.ask("h()");
    let t1 = template(&env, &p);
    let d1 = dump(&t1, &dumps.0, "m1", None);
    t1.destroy().unwrap();

    // Memory the older node never had: mappings to remove, a heap to shrink.
    assert_eq!(
        p.ask("big = [bytearray(300000) for _ in range(40)]"),
        "None"
    );
    assert_eq!(p.ask("g = g[:1000]"), "None");
    assert_eq!(p.ask("y = 2"), "None");
    let t2 = template(&env, &p);
    // SAFETY: kill(2) takes plain integers.
    unsafe { libc::kill(p.pid, libc::SIGKILL) };
    let mut r = env.adopt(
        t2.restore_from_dump(&d1, None, &env.restore_opts())
            .unwrap(),
    );
    assert_eq!(
        r.ask("(y, len(g), 'big' in globals())"),
        "(1, 65536, False)"
    );
    assert_eq!(r.ask("h()"), h1);
    assert_eq!(r.ask("z = [x['i'] for x in g][-1]"), "None");
    assert_eq!(r.ask("z"), "65535");
}

#[test]
fn a_dump_against_the_parent_template_skips_unwritten_pages_and_equals_a_full_read() {
    require_root();
    let env = CrEnv::new("dump-frames");
    let dumps = Dumps(scratch_dir("cr-dump-frames"));
    let mut p = python(&env);
    assert_eq!(p.ask(GRAPH), "None");
    let t1 = template(&env, &p);
    let d1 = dump(&t1, &dumps.0, "f1", None);

    // 1 MiB rewritten in place, 8 MiB new; the rest of the 64 MiB graph untouched
    // (no h() before the checkpoint: pickling it would write every refcount).
    assert_eq!(p.ask(REWRITE), "None");
    assert_eq!(p.ask(GROW), "None");
    let t2 = template(&env, &p);
    let h2 = p.ask("h()");
    let opts = |name: &str| DumpOptions {
        root: dumps.0.clone(),
        name: name.to_owned(),
        parent: Some("f1".to_owned()),
        root_prefix: None,
    };
    let full = dump(&t2, &dumps.0, "f2-read", Some("f1"));
    let stats = dump_template_against(&t2, &opts("f2-frames"), Some(&t1)).unwrap();
    eprintln!(
        "dump against the parent template: {} private pages, {} unchanged (unread), {} written, {:.1} ms",
        stats.pages, stats.unchanged, stats.written, stats.ms
    );
    let framed = Dump::open(&dumps.0, "f2-frames").unwrap();

    // Most of the graph was not read, and the dump says the same as one that read it.
    let read = full.manifest().stats.clone();
    assert_eq!(read.unchanged, 0, "{read:?}");
    assert!(
        stats.unchanged > stats.pages / 2,
        "pages known by their frame: {stats:?}"
    );
    assert_eq!((stats.pages, stats.written), (read.pages, read.written));
    let hashes = |d: &Dump| -> Vec<(u64, u64)> {
        d.sorted_pages()
            .into_iter()
            .map(|(at, r)| (at, r.hash))
            .collect()
    };
    assert_eq!(hashes(&framed), hashes(&full));

    // A base that is not the parent dump's template shares no frame with t2 where the
    // parent dump has a page: a fresh process's template changes nothing.
    let mut other = python(&env);
    assert_eq!(other.ask("x = 1"), "None");
    let t3 = template(&env, &other);
    let stats3 = dump_template_against(&t2, &opts("f2-other"), Some(&t3)).unwrap();
    assert_eq!(stats3.unchanged, 0, "{stats3:?}");
    assert_eq!(
        hashes(&Dump::open(&dumps.0, "f2-other").unwrap()),
        hashes(&full)
    );

    // The fallback restores the node from the dump made against the frames.
    // SAFETY: kill(2) takes plain integers.
    unsafe { libc::kill(p.pid, libc::SIGKILL) };
    let mut r = env.adopt(
        t1.restore_from_dump(&framed, Some(&d1), &env.restore_opts())
            .unwrap_or_else(|e| panic!("fallback restore from f2-frames: {e}")),
    );
    assert_eq!(r.ask("h()"), h2);
    assert_eq!(r.ask("len(g2)"), "2048");
}
