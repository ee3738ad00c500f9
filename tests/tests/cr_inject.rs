//! Syscall injection ([`deltabox_controller::cr::inject`]): each injected syscall is one
//! single-step of a `syscall` instruction, so the step's trap must be told apart from a
//! `SIGTRAP` someone sends, every signal that arrives meanwhile must be deferred (not
//! lost, not delivered), and the trap flag must be gone once the tracee runs again.
//! A batch runs many syscalls from a loop in an executable scratch page for one stop:
//! the same results, the same deferral, and it stops at the first call that fails.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use deltabox_controller::cr::inject::{Batch, InjectError, Injection, SCRATCH_LEN, SyscallSite};
use deltabox_controller::cr::procfs;
use deltabox_controller::cr::ptrace::{Tracee, cr_options};
use deltabox_tests::cr::{CrEnv, Proc};
use deltabox_tests::require_root;
use nix::unistd::Pid;

/// x86 `EFLAGS.TF`: single-step.
const TRAP_FLAG: u64 = 0x100;

/// A `cr-target serve` of `env` that answered once, seized (stopped), and the
/// `syscall` instruction of its vdso.
fn seized_target(env: &CrEnv) -> (Proc, Tracee, SyscallSite) {
    let mut p = env.spawn_target(&["serve"]);
    assert_eq!(p.ask("inc"), "n=1");
    let (tracee, _) = Tracee::seize_stopped(Pid::from_raw(p.pid), cr_options()).expect("seize");
    let maps = procfs::maps(p.pid).expect("maps");
    let site = SyscallSite::find(&tracee, procfs::vdso(&maps)).expect("syscall site");
    (p, tracee, site)
}

#[test]
fn injected_syscalls_under_a_signal_storm_return_their_results_and_defer_the_signals() {
    require_root();
    let env = CrEnv::new("inject");
    let (mut p, mut tracee, site) = seized_target(&env);
    let pid = Pid::from_raw(p.pid);
    let ppid = procfs::status(p.pid).expect("status").ppid;
    let stop = AtomicBool::new(false);
    let sent = std::thread::scope(|scope| {
        // Signals sent while the injections run, each several times.
        let sender = scope.spawn(|| storm(pid, &stop));
        let mut inj = Injection::begin(&mut tracee, site).expect("begin");
        for i in 0..2000 {
            let got = inj
                .syscall("getppid", libc::SYS_getppid, &[])
                .unwrap_or_else(|e| panic!("injection {i}: {e}"));
            assert_eq!(got, ppid as u64, "injection {i} returned another value");
        }
        stop.store(true, Ordering::Relaxed);
        let sent = sender.join().expect("sender");
        drain_signals(&mut inj, p.pid);
        inj.finish(false).expect("finish");
        sent
    });
    assert!(sent > 0, "no signal was sent during the injections");
    let regs = tracee.regs().expect("regs");
    assert_eq!(
        regs.eflags & TRAP_FLAG,
        0,
        "trap flag left set: {:#x}",
        regs.eflags
    );
    let deferred = tracee.take_deferred_signals();
    assert!(
        deferred.contains(&libc::SIGTRAP) && deferred.contains(&libc::SIGUSR1),
        "signals sent during the injections were not deferred: {deferred:?}"
    );
    // Dropped, as a template's are: the process runs on as if nothing happened.
    tracee.detach(0).expect("detach");
    assert_eq!(p.ask("inc"), "n=2");
    assert_eq!(p.ask("get"), "n=2");
}

/// The signal sender of the tests: `SIGTRAP` (a user one, not a trap of the injection)
/// and `SIGUSR1` to `pid` every 200 µs until `stop` (at most 200 rounds); how many rounds.
fn storm(pid: Pid, stop: &AtomicBool) -> u32 {
    let mut sent = 0u32;
    while !stop.load(Ordering::Relaxed) && sent < 200 {
        for sig in [libc::SIGTRAP, libc::SIGUSR1] {
            // SAFETY: kill(2) takes plain integers and touches no memory.
            unsafe { libc::kill(pid.as_raw(), sig) };
        }
        sent += 1;
        std::thread::sleep(Duration::from_micros(200));
    }
    sent
}

#[test]
fn batches_under_a_signal_storm_return_every_result_and_stop_at_the_first_failure() {
    require_root();
    let env = CrEnv::new("inject-batch");
    let (mut p, mut tracee, site) = seized_target(&env);
    let pid = Pid::from_raw(p.pid);
    let ppid = procfs::status(p.pid).expect("status").ppid;
    let cwd = procfs::cwd(p.pid).expect("cwd");
    let umask_before = umask_of(p.pid);
    let stop = AtomicBool::new(false);
    let sent = std::thread::scope(|scope| {
        let sender = scope.spawn(|| storm(pid, &stop));
        let mut inj = Injection::begin(&mut tracee, site).expect("begin");
        let scratch = inj.mmap_scratch_exec(SCRATCH_LEN).expect("scratch");
        for round in 0..200 {
            // 150 calls: more than one run's table holds.
            let mut batch = Batch::new(scratch);
            let buf = batch.space(256);
            batch.call("getcwd", libc::SYS_getcwd, &[buf, 256]);
            for _ in 0..149 {
                batch.call("getppid", libc::SYS_getppid, &[]);
            }
            let (results, data) = inj
                .run_batch(&batch)
                .unwrap_or_else(|e| panic!("batch {round}: {e}"));
            assert_eq!(results.len(), 150);
            assert!(
                results[1..].iter().all(|&r| r == ppid as u64),
                "batch {round}: {results:?}"
            );
            let at = batch.offset(buf);
            let end = data[at..].iter().position(|&b| b == 0).unwrap();
            assert_eq!(
                std::str::from_utf8(&data[at..at + end]).unwrap(),
                cwd.to_str().unwrap(),
                "batch {round}: getcwd"
            );
        }
        // A call that fails ends the batch: the umask after it is not set.
        let mut batch = Batch::new(scratch);
        batch.call("getppid", libc::SYS_getppid, &[]);
        batch.call("close", libc::SYS_close, &[u64::MAX]);
        batch.call("umask", libc::SYS_umask, &[0o077]);
        match inj.run_batch(&batch) {
            Err(InjectError::Syscall { name, source, .. }) => {
                assert_eq!(name, "close");
                assert_eq!(source.raw_os_error(), Some(libc::EBADF));
            }
            other => panic!("a failing close gave {other:?}"),
        }
        // Batched or one by one, the failure names its call; an error a call tolerates
        // does not end the batch.
        for batched in [true, false] {
            let failed = inj.run_calls(&batch, batched).expect_err("close of fd -1");
            assert_eq!(failed.index, Some(1), "batched: {batched}");
            let mut batch = Batch::new(scratch);
            batch.call_tolerating("close", libc::SYS_close, &[u64::MAX], libc::EBADF);
            batch.call("getppid", libc::SYS_getppid, &[]);
            let (results, _) = inj
                .run_calls(&batch, batched)
                .unwrap_or_else(|e| panic!("a tolerated EBADF (batched: {batched}): {e:?}"));
            let ebadf = -i64::from(libc::EBADF) as u64;
            assert_eq!(results, [ebadf, ppid as u64], "batched: {batched}");
        }
        stop.store(true, Ordering::Relaxed);
        let sent = sender.join().expect("sender");
        drain_signals(&mut inj, p.pid);
        inj.syscall("munmap", libc::SYS_munmap, &[scratch, SCRATCH_LEN])
            .expect("munmap");
        inj.finish(false).expect("finish");
        sent
    });
    assert!(sent > 0, "no signal was sent during the batches");
    let deferred = tracee.take_deferred_signals();
    assert!(
        deferred.contains(&libc::SIGTRAP) && deferred.contains(&libc::SIGUSR1),
        "signals sent during the batches were not deferred: {deferred:?}"
    );
    assert_eq!(
        umask_of(p.pid),
        umask_before,
        "a call after the failure ran"
    );
    tracee.detach(0).expect("detach");
    assert_eq!(p.ask("inc"), "n=2");
    assert_eq!(p.ask("get"), "n=2");
}

/// Once the storm is over: runs injected `getppid`s until no signal is pending for
/// `pid`, so that each one the storm sent has been reported, and deferred, before the
/// detach (one still pending then would be delivered: SIGUSR1 would kill the target).
/// A stop reports one signal, and the step's own trap can come first.
fn drain_signals(inj: &mut Injection<'_>, pid: i32) {
    for _ in 0..1000 {
        let st = procfs::status(pid).expect("status");
        if st.sig_pending | st.shared_pending == 0 {
            return;
        }
        inj.syscall("getppid", libc::SYS_getppid, &[])
            .expect("getppid");
    }
    panic!("signals still pending for pid {pid} after 1000 injected syscalls");
}

/// `Umask:` of `/proc/<pid>/status`.
fn umask_of(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Umask:"))
        .unwrap()
        .trim()
        .to_owned()
}

/// The cost of one injected syscall (`getppid`, a no-op for the kernel): the ptrace
/// round trip every step of a checkpoint and restore pays.
/// `cargo test --release -p deltabox-tests --test cr_inject -- --ignored --nocapture`
#[test]
#[ignore = "a measurement: run by hand"]
fn measure_one_injected_syscall() {
    require_root();
    let env = CrEnv::new("inject-measure");
    let (_p, mut tracee, site) = seized_target(&env);
    let mut inj = Injection::begin(&mut tracee, site).expect("begin");
    let mut rounds = Vec::new();
    for _ in 0..9 {
        let start = std::time::Instant::now();
        for _ in 0..1000 {
            inj.syscall("getppid", libc::SYS_getppid, &[])
                .expect("getppid");
        }
        rounds.push(start.elapsed().as_secs_f64() * 1e6 / 1000.0);
    }
    let scratch = inj.mmap_scratch_exec(SCRATCH_LEN).expect("scratch");
    let mut batched = Vec::new();
    for _ in 0..9 {
        let mut batch = Batch::new(scratch);
        for _ in 0..20 {
            batch.call("getppid", libc::SYS_getppid, &[]);
        }
        let start = std::time::Instant::now();
        for _ in 0..100 {
            inj.run_batch(&batch).expect("batch");
        }
        batched.push(start.elapsed().as_secs_f64() * 1e6 / 100.0);
    }
    inj.finish(false).expect("finish");
    tracee.detach(0).expect("detach");
    rounds.sort_by(f64::total_cmp);
    batched.sort_by(f64::total_cmp);
    println!(
        "one injected syscall: median {:.1} us (min {:.1}, max {:.1}; 9 rounds of 1000)",
        rounds[4], rounds[0], rounds[8]
    );
    println!(
        "a batch of 20: median {:.1} us (min {:.1}, max {:.1}; 9 rounds of 100)",
        batched[4], batched[0], batched[8]
    );
}
