//! DeltaCR rollback: a process checkpointed into a template comes back, again and
//! again, with its memory, registers, interrupted syscall, cwd and umask.

use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use deltabox_controller::cr::{self, inject};
use deltabox_tests::cr::{CrEnv, PY_REPL, field};
use deltabox_tests::{require_root, scratch_dir};
use nix::unistd::Pid;

fn pid(raw: i32) -> Pid {
    Pid::from_raw(raw)
}

#[test]
fn rollback_restores_memory_and_continues_twice_from_one_template() {
    require_root();
    let env = CrEnv::new("counter");
    let mut p = env.spawn_target(&["serve", "--alloc", "64"]);
    for i in 1..=5 {
        assert_eq!(p.ask("inc"), format!("n={i}"));
    }
    let sum = p.ask("sum");
    // The target is blocked in read(0): the checkpoint interrupts that read.
    p.wait_blocked_in(libc::SYS_read);
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", p.pid)).unwrap();
    let template = cr::checkpoint(pid(p.pid), &env.checkpoint_opts()).unwrap();
    env.track(template.pid().as_raw());
    let state = template.state();
    assert_eq!(state.interrupted_syscall, Some(libc::SYS_read));
    assert_eq!(state.regs.rax as i64, -inject::ERESTARTSYS);
    // The original goes on, its read restarted, and changes its memory.
    for i in 6..=8 {
        assert_eq!(p.ask("inc"), format!("n={i}"));
    }
    assert_eq!(p.ask("write 7"), "ok");
    assert_ne!(p.ask("sum"), sum);

    let restored = cr::rollback(&template, pid(p.pid), &env.restore_opts()).unwrap();
    assert!(
        !std::path::Path::new(&format!("/proc/{}", p.pid)).exists() || {
            let stat = std::fs::read_to_string(format!("/proc/{}/stat", p.pid)).unwrap_or_default();
            stat.contains(") Z")
        }
    );
    let mut r = env.adopt(restored);
    // The same address space as at the checkpoint: no scratch page left behind.
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{}/maps", r.pid)).unwrap(),
        maps
    );
    assert_eq!(r.ask("get"), "n=5");
    assert_eq!(r.ask("sum"), sum);
    assert_eq!(r.ask("inc"), "n=6");
    assert_eq!(r.ask("write 9"), "ok");
    // Its parent is the original's parent (the clone is CLONE_PARENT all the way).
    let line = r.ask("pid");
    assert_eq!(field(&line, "pid"), r.pid.to_string());
    assert_eq!(field(&line, "ppid"), std::process::id().to_string());

    // Again from the same template: memory as at the checkpoint, not as left by `r`.
    let restored = cr::rollback(&template, pid(r.pid), &env.restore_opts()).unwrap();
    let mut r2 = env.adopt(restored);
    assert_eq!(r2.ask("get"), "n=5");
    assert_eq!(r2.ask("sum"), sum);
    assert_eq!(r2.ask("inc"), "n=6");
    // The restored process is in the session cgroup.
    let cg = std::fs::read_to_string(format!("/proc/{}/cgroup", r2.pid)).unwrap();
    assert!(
        cg.trim_end().ends_with("/session"),
        "restored pid {} is in {cg}",
        r2.pid
    );
    template.destroy().unwrap();
}

#[test]
fn a_raw_read_survives_checkpoint_and_restore_with_its_vector_registers() {
    require_root();
    let env = CrEnv::new("xmm");
    let mut p = env.spawn_target(&["serve"]);
    assert_eq!(p.ask("inc"), "n=1");
    // Loads xmm15 and blocks in a raw read(0) syscall.
    p.send("xmm");
    p.wait_blocked_in(libc::SYS_read);
    let template = cr::checkpoint(pid(p.pid), &env.checkpoint_opts()).unwrap();
    env.track(template.pid().as_raw());
    assert_eq!(template.state().interrupted_syscall, Some(libc::SYS_read));

    let mut branch = env.adopt(template.restore(&env.restore_opts()).unwrap());
    branch.send("hello");
    assert_eq!(branch.line(), "xmm=1122334455667788 ret=6");
    assert_eq!(branch.ask("get"), "n=1");
    // The original's read was restarted too.
    p.send("hi");
    assert_eq!(p.line(), "xmm=1122334455667788 ret=3");
    assert_eq!(p.ask("get"), "n=1");
}

#[test]
fn a_process_in_nanosleep_sleeps_to_its_deadline_after_checkpoint_and_restore() {
    require_root();
    let env = CrEnv::new("sleep");
    let mut p = env.spawn_target(&["sleep", "3000"]);
    assert_eq!(p.line(), "start");
    std::thread::sleep(Duration::from_millis(300));
    p.wait_blocked_in(libc::SYS_clock_nanosleep);
    let template = cr::checkpoint(pid(p.pid), &env.checkpoint_opts()).unwrap();
    env.track(template.pid().as_raw());
    let state = template.state();
    assert!(
        matches!(
            state.interrupted_syscall,
            Some(libc::SYS_clock_nanosleep | libc::SYS_nanosleep)
        ),
        "{:?}",
        state.interrupted_syscall
    );
    // A relative nanosleep restarts through restart_syscall and its restart_block.
    assert_eq!(state.regs.rax as i64, -inject::ERESTART_RESTARTBLOCK);
    std::thread::sleep(Duration::from_millis(100));
    let mut branch = env.adopt(template.restore(&env.restore_opts()).unwrap());

    for (who, proc_) in [("original", &mut p), ("branch", &mut branch)] {
        let line = proc_.line();
        let ms: u64 = field(&line, "elapsed_ms").parse().unwrap_or_else(|_| {
            panic!("{who}: {line:?}");
        });
        assert!(
            (3000..5000).contains(&ms),
            "{who} woke after {ms} ms, not at its 3000 ms deadline"
        );
    }
}

#[test]
fn cwd_and_umask_come_back() {
    require_root();
    let env = CrEnv::new("cwd");
    let dir = scratch_dir("cr-cwd");
    let mut cmd = Command::new(deltabox_tests::cr::target_bin());
    cmd.arg("serve").current_dir(&dir);
    // SAFETY: umask is async-signal-safe and cannot fail.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0o027);
            Ok(())
        });
    }
    let mut p = env.spawn(cmd);
    assert_eq!(p.ask("umask"), "umask=27");
    let template = cr::checkpoint(pid(p.pid), &env.checkpoint_opts()).unwrap();
    env.track(template.pid().as_raw());
    assert_eq!(template.state().status.umask, 0o027);
    assert_eq!(template.state().cwd, dir.canonicalize().unwrap());
    let mut r = env.adopt(cr::rollback(&template, pid(p.pid), &env.restore_opts()).unwrap());
    assert_eq!(r.ask("umask"), "umask=27");
    assert_eq!(
        r.ask("cwd"),
        format!("cwd={}", dir.canonicalize().unwrap().display())
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_python_session_rolls_back_to_its_objects() {
    require_root();
    let env = CrEnv::new("python");
    let mut cmd = Command::new("python3");
    cmd.args(["-c", PY_REPL]);
    let mut p = env.spawn(cmd);
    assert_eq!(p.ask("x = 41"), "None");
    assert_eq!(p.ask("d = {i: str(i) for i in range(100000)}"), "None");
    let template = cr::checkpoint(pid(p.pid), &env.checkpoint_opts()).unwrap();
    env.track(template.pid().as_raw());
    assert_eq!(p.ask("x = x + 100"), "None");
    assert_eq!(p.ask("del d[5]"), "None");
    assert_eq!(p.ask("(x, len(d))"), "(141, 99999)");

    for _ in 0..2 {
        let mut r = env.adopt(cr::rollback(&template, pid(p.pid), &env.restore_opts()).unwrap());
        assert_eq!(r.ask("(x, len(d), d[5])"), "(41, 100000, '5')");
        assert_eq!(r.ask("x = x + 1"), "None");
        assert_eq!(r.ask("x"), "42");
        p = r;
    }
}

#[test]
fn a_pending_blocked_signal_is_pending_again_after_rollback() {
    require_root();
    let env = CrEnv::new("pending");
    let mut p = env.spawn_target(&["serve"]);
    assert_eq!(p.ask("block"), "ok");
    // SAFETY: kill(2) takes plain integers.
    unsafe { libc::kill(p.pid, libc::SIGUSR1) };
    assert_eq!(p.ask("pending"), "usr1_pending=1");
    p.wait_blocked_in(libc::SYS_read);
    let template = cr::checkpoint(pid(p.pid), &env.checkpoint_opts()).unwrap();
    env.track(template.pid().as_raw());
    let status = &template.state().status;
    assert_ne!(
        status.shared_pending & (1 << (libc::SIGUSR1 - 1)),
        0,
        "{status:?}"
    );
    // Fork does not carry pending signals: DeltaCR sends it again. The read the
    // checkpoint interrupted is restarted all the same (the signal stays blocked).
    let mut r = env.adopt(cr::rollback(&template, pid(p.pid), &env.restore_opts()).unwrap());
    assert_eq!(r.ask("pending"), "usr1_pending=1");
    assert_eq!(r.ask("inc"), "n=1");
}

#[test]
fn a_process_under_a_seccomp_filter_that_kills_on_clone3_is_checkpointed() {
    require_root();
    let env = CrEnv::new("seccomp");
    // The filter kills the process on clone3, which is DeltaCR's injected fork: the
    // filter must be suspended while the process is traced.
    let mut p = env.spawn_target(&["serve", "--seccomp"]);
    assert_eq!(p.ask("inc"), "n=1");
    p.wait_blocked_in(libc::SYS_read);
    let template = cr::checkpoint(pid(p.pid), &env.checkpoint_opts()).unwrap();
    env.track(template.pid().as_raw());
    assert_eq!(p.ask("inc"), "n=2");
    let mut r = env.adopt(cr::rollback(&template, pid(p.pid), &env.restore_opts()).unwrap());
    assert_eq!(r.ask("inc"), "n=2");
    // The filter is back in force in the restored process.
    let status = std::fs::read_to_string(format!("/proc/{}/status", r.pid)).unwrap();
    assert!(status.contains("Seccomp:\t2"), "{status}");
    assert!(status.contains("Seccomp_filters:\t1"), "{status}");
}
