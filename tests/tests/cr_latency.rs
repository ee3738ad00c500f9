//! DeltaCR latency of a process holding 256 MiB of touched memory, with 4 KiB pages
//! and with transparent huge pages: checkpoint (pause and whole call) and rollback
//! (template fork, waiting for the old process's exit, whole call), median of 9
//! after one warm-up, each operation 100 ms after the previous one. A measurement,
//! not a pass/fail test: run it alone, in release mode, and read its output:
//!
//!     cargo test --release -p deltabox-tests --test cr_latency -- --ignored --nocapture

use std::time::Duration;

use deltabox_controller::cr;
use deltabox_tests::cr::CrEnv;
use deltabox_tests::require_root;
use nix::unistd::Pid;

const RUNS: usize = 9;

/// Pause before each checkpoint and each rollback.
const GAP: Duration = Duration::from_millis(100);

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn measure(mib: usize, thp: bool) {
    let env = CrEnv::new(if thp { "latency-thp" } else { "latency-4k" });
    let mut args = vec!["serve", "--alloc"];
    let mib_s = mib.to_string();
    args.push(&mib_s);
    if thp {
        args.push("--thp");
    }
    let mut current = env.spawn_target(&args);
    let sum = current.ask("sum");
    let mut cols: [Vec<f64>; 5] = Default::default();
    let mut previous: Option<cr::Template> = None;
    for run in 0..=RUNS {
        // Operations spaced as an agent's are, not back to back (kernel fast paths
        // such as the RCU-sync state of cgroup locks would flatter the figures).
        std::thread::sleep(GAP);
        current.wait_blocked_in(libc::SYS_read);
        let template = cr::checkpoint(Pid::from_raw(current.pid), &env.checkpoint_opts()).unwrap();
        env.track(template.pid().as_raw());
        std::thread::sleep(GAP);
        let restored =
            cr::rollback(&template, Pid::from_raw(current.pid), &env.restore_opts()).unwrap();
        let (c, r) = (template.timings(), restored.timings);
        current = env.adopt(restored);
        assert_eq!(current.ask("sum"), sum);
        if let Some(old) = previous.replace(template) {
            old.destroy().unwrap();
        }
        if run == 0 {
            continue; // warm-up
        }
        for (col, v) in cols
            .iter_mut()
            .zip([c.paused, c.total, r.kill, r.fork, r.total])
        {
            col.push(ms(v));
        }
    }
    let [paused, ck_total, kill, fork, rb_total] = cols.map(median);
    println!(
        "{mib} MiB {}: checkpoint pause {paused:.2} ms, checkpoint {ck_total:.2} ms; \
         rollback {rb_total:.2} ms (template fork {fork:.2}, then waiting for the old \
         process's exit {kill:.2}); median of {RUNS}",
        if thp { "THP" } else { "4 KiB pages" }
    );
}

#[test]
#[ignore = "a measurement: run with --ignored --nocapture, in release mode"]
fn checkpoint_and_rollback_latency_256_mib() {
    require_root();
    measure(256, false);
    measure(256, true);
}

/// Checkpoint and rollback of one process over `generations` rollbacks, each rollback
/// the restored process's own (the next process is a fork of a template of the one
/// before): medians of the first and the last ten. `keep`: every template stays alive
/// (a tree whose nodes all keep their templates), else each is destroyed once the next
/// one exists.
fn measure_generations(generations: usize, keep: bool) {
    let env = CrEnv::new(if keep { "gen-keep" } else { "gen-drop" });
    let mut current = env.spawn_target(&["serve", "--alloc", "64"]);
    let sum = current.ask("sum");
    let mut kept = Vec::new();
    let mut previous: Option<cr::Template> = None;
    let mut rows = Vec::new();
    for _ in 0..generations {
        std::thread::sleep(GAP / 5);
        current.wait_blocked_in(libc::SYS_read);
        let template = cr::checkpoint(Pid::from_raw(current.pid), &env.checkpoint_opts()).unwrap();
        env.track(template.pid().as_raw());
        let restored =
            cr::rollback(&template, Pid::from_raw(current.pid), &env.restore_opts()).unwrap();
        rows.push((ms(template.timings().total), ms(restored.timings.fork)));
        current = env.adopt(restored);
        assert_eq!(current.ask("sum"), sum);
        if keep {
            kept.push(template);
        } else if let Some(old) = previous.replace(template) {
            old.destroy().unwrap();
        }
    }
    let first = &rows[..10];
    let last = &rows[rows.len() - 10..];
    let med = |s: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| median(s.iter().map(f).collect());
    println!(
        "64 MiB, {generations} generations, templates {}: checkpoint {:.2} -> {:.2} ms, \
         template fork {:.2} -> {:.2} ms (medians of the first and the last ten)",
        if keep {
            "all kept"
        } else {
            "each dropped after the next"
        },
        med(first, |r| r.0),
        med(last, |r| r.0),
        med(first, |r| r.1),
        med(last, |r| r.1),
    );
    for t in kept {
        t.destroy().unwrap();
    }
}

/// Each rollback makes the session a fork of a fork: the kernel links a fork's
/// memory areas to every anon_vma of its ancestry, so the fork cost grows with the
/// number of generations while their templates live.
#[test]
#[ignore = "a measurement: run with --ignored --nocapture, in release mode"]
fn checkpoint_and_rollback_over_generations() {
    require_root();
    measure_generations(80, true);
    measure_generations(80, false);
}

/// The fix-up of a restore (root, registers, fd table, cwd; no fork, no exit to wait
/// for) of a small process with fds 0-2 and two files open: median and P90 of 200
/// branches of one template, each 10 ms after the last.
#[test]
#[ignore = "a measurement: run with --ignored --nocapture, in release mode"]
fn restore_fixup_of_a_process_with_files() {
    require_root();
    let env = CrEnv::new("latency-fixup");
    let dir = deltabox_tests::scratch_dir("cr-fixup");
    let mut p = env.spawn_target(&["serve"]);
    for name in ["a", "b"] {
        let path = dir.join(name);
        std::fs::write(&path, "0123456789").unwrap();
        assert!(
            p.ask(&format!("open {}", path.display()))
                .starts_with("fd=")
        );
    }
    assert_eq!(p.ask("read"), "data=0123");
    let template = cr::checkpoint(Pid::from_raw(p.pid), &env.checkpoint_opts()).unwrap();
    env.track(template.pid().as_raw());
    let mut fixups = Vec::new();
    for _ in 0..200 {
        std::thread::sleep(Duration::from_millis(10));
        let restored = template.restore(&env.restore_opts()).unwrap();
        fixups.push(ms(restored.timings.fixup));
        let pidfd = cr::pidfd::Pidfd::open(restored.pid()).unwrap();
        let mut b = env.adopt(restored);
        assert_eq!(b.ask("read"), "data=4567");
        pidfd.kill_and_wait(Duration::from_secs(5)).unwrap();
    }
    fixups.sort_by(f64::total_cmp);
    println!(
        "restore fix-up, fds 0-2 + 2 files: median {:.3} ms, P90 {:.3} ms (200 restores)",
        fixups[100], fixups[180]
    );
    let _ = std::fs::remove_dir_all(&dir);
}
