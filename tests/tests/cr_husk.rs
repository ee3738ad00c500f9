//! DeltaCR's restore into a fresh process (a *husk*): a process whose templates are all
//! gone comes back from its dump alone, in a process that never ran it.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use deltabox_controller::cr::dump::{Dump, DumpOptions, dump_template};
use deltabox_controller::cr::husk::restore_into_husk;
use deltabox_controller::cr::{self, RestoreOptions};
use deltabox_tests::cr::{CrEnv, PY_REPL, Proc};
use deltabox_tests::{require_root, scratch_dir};
use nix::unistd::Pid;

/// The test's dumps and files, removed when it ends.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn comm(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim_end()
        .to_owned()
}

/// A `sleep 1000` in the test's cgroup, once it runs `sleep` (not the test's fork
/// before its exec).
fn husk(env: &CrEnv) -> Proc {
    let mut sleeper = Command::new("sleep");
    sleeper.arg("1000");
    let husk = env.spawn(sleeper);
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    while comm(husk.pid) != "sleep" {
        assert!(
            Instant::now() < deadline,
            "pid {} never ran sleep",
            husk.pid
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    husk
}

fn cmdline(pid: i32) -> String {
    String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default())
        .replace('\0', " ")
}

/// A python3 process holding a hashed 32 MiB buffer, a file open mid-read, a SIGUSR1
/// handler and a umask is dumped; the process and its template are killed; a `sleep`
/// started afterwards becomes it: same hash, the read goes on at the offset, the
/// handler runs, the clock (the vdso, moved) works, and it keeps answering.
#[test]
fn a_dump_is_restored_into_a_fresh_process() {
    require_root();
    let env = CrEnv::new("husk");
    let scratch = Scratch(scratch_dir("cr-husk"));
    let dumps = scratch.0.join("dumps");
    std::fs::create_dir_all(&dumps).unwrap();
    let data = scratch.0.join("data");
    let text: String = (0..200).map(|i| format!("{i:04}\n")).collect();
    std::fs::write(&data, &text).unwrap();

    let mut cmd = Command::new("python3");
    cmd.args(["-u", "-c", PY_REPL]);
    let mut p: Proc = env.spawn(cmd);
    for line in [
        "import hashlib, os, signal, time",
        "buf = bytearray(os.urandom(32 << 20))",
        "h = lambda: hashlib.sha256(buf).hexdigest()",
        &format!(
            "f = open({:?}, 'rb', buffering=0)",
            data.display().to_string()
        ),
        "f.read(50)",
        "signal.signal(signal.SIGUSR1, lambda *a: print('usr1', flush=True))",
        "os.umask(0o027)",
        "x = 'kept'",
    ] {
        p.ask(line);
    }
    let hash = p.ask("h()");
    let template = cr::checkpoint(Pid::from_raw(p.pid), &env.checkpoint_opts()).unwrap();
    env.track(template.pid().as_raw());
    let stats = dump_template(
        &template,
        &DumpOptions {
            root: dumps.clone(),
            name: "n1".to_owned(),
            parent: None,
            root_prefix: None,
        },
    )
    .unwrap();
    eprintln!(
        "dump: {} private pages, {} written, {:.1} ms",
        stats.pages, stats.written, stats.ms
    );
    let dump = Dump::open(&dumps, "n1").unwrap();
    assert!(dump.manifest().mm.is_some() && dump.manifest().vdso_hash.is_some());
    assert!(dump.state().handlers.is_some());

    // Every copy of the process is gone: the template, then the process.
    template.destroy().unwrap();
    // SAFETY: kill(2) takes plain integers.
    unsafe { libc::kill(p.pid, libc::SIGKILL) };

    // A process that never ran python.
    let husk = husk(&env);
    let t = Instant::now();
    let restored = restore_into_husk(Pid::from_raw(husk.pid), &dump, &RestoreOptions::default())
        .unwrap_or_else(|e| panic!("restore into husk {}: {e}", husk.pid));
    let ms = t.elapsed().as_secs_f64() * 1e3;
    eprintln!(
        "restore into a husk: {ms:.1} ms (memory {:.1} ms, fix-up {:.1} ms), {} MiB of pages",
        restored.timings.memory.as_secs_f64() * 1e3,
        restored.timings.fixup.as_secs_f64() * 1e3,
        ((stats.pages - stats.zero) * 4096) >> 20
    );
    assert_eq!(restored.pid().as_raw(), husk.pid);
    let mut r = env.adopt(restored);
    assert_eq!(r.ask("h()"), hash);
    assert_eq!(r.ask("x"), "'kept'");
    // The read goes on at the offset.
    assert_eq!(r.ask("f.tell()"), "50");
    assert_eq!(r.ask("f.read(10)"), "b'0010\\n0011\\n'");
    // The clock, through the vdso moved to where the program has it.
    assert_eq!(
        r.ask("abs(time.time() - time.clock_gettime(time.CLOCK_REALTIME)) < 1"),
        "True"
    );
    assert_eq!(r.ask("time.monotonic() > 0"), "True");
    // The umask, the name, the command line (the memory layout).
    assert_eq!(r.ask("os.umask(0o022)"), "23");
    assert!(comm(r.pid).starts_with("python3"), "{}", comm(r.pid));
    assert!(
        cmdline(r.pid).contains("python3 -u -c"),
        "{}",
        cmdline(r.pid)
    );
    // The handler.
    // SAFETY: kill(2) takes plain integers.
    unsafe { libc::kill(r.pid, libc::SIGUSR1) };
    assert_eq!(r.line(), "usr1");
    // It keeps working: allocate (heap and mappings), import, compute, free.
    assert_eq!(
        r.ask("g = [str(i) * 10 for i in range(200000)]; big = bytearray(64 << 20)"),
        "None"
    );
    assert_eq!(r.ask("sum(len(s) for s in g) + len(big)"), "77997764");
    assert_eq!(r.ask("import json; json.dumps({'a': [1, 2]})"), "None");
    assert_eq!(r.ask("json.dumps({'a': [1, 2]})"), "'{\"a\": [1, 2]}'");
    assert_eq!(r.ask("del g, big; h()"), "None");
    assert_eq!(r.ask("h()"), hash);
}

/// Measurement (`--ignored`): restores of a python3 process holding 64 MiB of random
/// bytes from its dump into fresh processes, five rounds.
///
/// `cargo test --release -p deltabox-tests --test cr_husk -- --ignored --nocapture`
#[test]
#[ignore = "a measurement: run it by hand with --release"]
fn measure_restores_of_64_mib_into_husks() {
    require_root();
    let env = CrEnv::new("husk-64");
    let scratch = Scratch(scratch_dir("cr-husk-64"));
    let mut cmd = Command::new("python3");
    cmd.args(["-u", "-c", PY_REPL]);
    let mut p: Proc = env.spawn(cmd);
    p.ask("import hashlib, os");
    p.ask("buf = bytearray(os.urandom(64 << 20))");
    let hash = p.ask("hashlib.sha256(buf).hexdigest()");
    let template = cr::checkpoint(Pid::from_raw(p.pid), &env.checkpoint_opts()).unwrap();
    env.track(template.pid().as_raw());
    let stats = dump_template(
        &template,
        &DumpOptions {
            root: scratch.0.clone(),
            name: "n".to_owned(),
            parent: None,
            root_prefix: None,
        },
    )
    .unwrap();
    let dump = Dump::open(&scratch.0, "n").unwrap();
    template.destroy().unwrap();
    // SAFETY: kill(2) takes plain integers.
    unsafe { libc::kill(p.pid, libc::SIGKILL) };
    let stored = (stats.pages - stats.zero) * 4096;
    let mut totals = Vec::new();
    for round in 0..5 {
        let husk = husk(&env);
        let t = Instant::now();
        let restored =
            restore_into_husk(Pid::from_raw(husk.pid), &dump, &RestoreOptions::default()).unwrap();
        let ms = t.elapsed().as_secs_f64() * 1e3;
        eprintln!(
            "round {round}: {ms:.1} ms (seize {:.2} ms, memory {:.1} ms, fix-up {:.2} ms, \
             resume {:.2} ms)",
            restored.timings.fork.as_secs_f64() * 1e3,
            restored.timings.memory.as_secs_f64() * 1e3,
            restored.timings.fixup.as_secs_f64() * 1e3,
            restored.timings.resume.as_secs_f64() * 1e3,
        );
        totals.push(ms);
        let mut r = env.adopt(restored);
        assert_eq!(r.ask("hashlib.sha256(buf).hexdigest()"), hash);
        // SAFETY: kill(2) takes plain integers.
        unsafe { libc::kill(r.pid, libc::SIGKILL) };
    }
    totals.sort_by(f64::total_cmp);
    eprintln!(
        "restore into a husk of {} MiB of non-zero private pages: median {:.1} ms, min {:.1}, \
         max {:.1}",
        stored >> 20,
        totals[2],
        totals[0],
        totals[4]
    );
}

/// A python3 process with two threads (a counter sleeping in a loop, a consumer blocked
/// in `queue.Queue.get`) comes back into a husk with both threads: they run, answer,
/// and join.
#[test]
fn a_threaded_process_is_restored_into_a_fresh_process() {
    require_root();
    let env = CrEnv::new("husk-thr");
    let scratch = Scratch(scratch_dir("cr-husk-thr"));
    let mut cmd = Command::new("python3");
    cmd.args(["-u", "-c", PY_REPL]);
    let mut p: Proc = env.spawn(cmd);
    p.ask("import threading, queue, time");
    p.ask(
        r#"exec("counts = [0]\nstop = threading.Event()\nq = queue.Queue()\nout = queue.Queue()\ndef counter():\n    while not stop.is_set():\n        counts[0] += 1\n        time.sleep(0.001)\ndef consumer():\n    while True:\n        i = q.get()\n        if i is None:\n            break\n        out.put(i * 2)\nts = [threading.Thread(target=counter), threading.Thread(target=consumer)]\nfor t in ts:\n    t.start()")"#,
    );
    assert_eq!(p.ask("threading.active_count()"), "3");
    let template = cr::checkpoint(Pid::from_raw(p.pid), &env.checkpoint_opts()).unwrap();
    env.track(template.pid().as_raw());
    assert_eq!(template.state().threads.len(), 2);
    dump_template(
        &template,
        &DumpOptions {
            root: scratch.0.clone(),
            name: "t".to_owned(),
            parent: None,
            root_prefix: None,
        },
    )
    .unwrap();
    let dump = Dump::open(&scratch.0, "t").unwrap();
    template.destroy().unwrap();
    // SAFETY: kill(2) takes plain integers.
    unsafe { libc::kill(p.pid, libc::SIGKILL) };

    let husk = husk(&env);
    let restored = restore_into_husk(Pid::from_raw(husk.pid), &dump, &RestoreOptions::default())
        .unwrap_or_else(|e| panic!("restore into husk {}: {e}", husk.pid));
    let mut r = env.adopt(restored);
    let tasks = std::fs::read_dir(format!("/proc/{}/task", r.pid))
        .unwrap()
        .count();
    assert_eq!(tasks, 3);
    r.ask("c = counts[0]");
    r.ask("time.sleep(0.2)");
    assert_eq!(r.ask("counts[0] > c"), "True");
    r.ask("q.put(21)");
    assert_eq!(r.ask("out.get(timeout=5)"), "42");
    r.ask("stop.set()");
    r.ask("q.put(None)");
    assert_eq!(r.ask("[t.join(5) for t in ts]"), "[None, None]");
    assert_eq!(r.ask("any(t.is_alive() for t in ts)"), "False");
    assert_eq!(r.ask("threading.active_count()"), "1");
}

/// A dump whose vdso is not this kernel's (its recorded hash differs), or that lacks
/// the memory layout (an older controller's), is refused with an error that says so,
/// and the husk is killed, not left half made.
#[test]
fn a_dump_of_another_kernel_or_an_older_controller_is_refused() {
    require_root();
    let env = CrEnv::new("husk-refuse");
    let scratch = Scratch(scratch_dir("cr-husk-refuse"));
    let mut cmd = Command::new("python3");
    cmd.args(["-u", "-c", PY_REPL]);
    let mut p: Proc = env.spawn(cmd);
    // Started (a process still in its exec or the interpreter's start-up is no
    // checkpoint to take).
    assert_eq!(p.ask("1 + 1"), "2");
    let template = cr::checkpoint(Pid::from_raw(p.pid), &env.checkpoint_opts()).unwrap();
    env.track(template.pid().as_raw());
    dump_template(
        &template,
        &DumpOptions {
            root: scratch.0.clone(),
            name: "d".to_owned(),
            parent: None,
            root_prefix: None,
        },
    )
    .unwrap();
    let manifest = scratch.0.join("d/manifest.json");
    let original: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    let cases = [
        ("vdso_hash", serde_json::json!(1), "another [vdso]"),
        ("mm", serde_json::Value::Null, "records no memory layout"),
    ];
    for (field, value, says) in cases {
        let mut changed = original.clone();
        changed[field] = value;
        std::fs::write(&manifest, serde_json::to_vec(&changed).unwrap()).unwrap();
        let dump = Dump::open(&scratch.0, "d").unwrap();
        let husk = husk(&env);
        let pidfd = deltabox_controller::cr::pidfd::Pidfd::open(Pid::from_raw(husk.pid)).unwrap();
        let err = restore_into_husk(Pid::from_raw(husk.pid), &dump, &RestoreOptions::default())
            .expect_err("a restore of a changed dump");
        let text = err.to_string();
        assert!(text.contains(says), "{field}: {text}");
        // Seized and refused: killed.
        assert!(
            pidfd.wait_exit(std::time::Duration::from_secs(5)).unwrap(),
            "husk {} left alive",
            husk.pid
        );
    }
}
