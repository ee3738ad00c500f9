//! A controller SIGKILLed in the middle of checkpoints or restores: no template ever
//! runs (each is dead, or stopped in its frozen cgroup with its memory unchanged), no
//! half-restored process survives, and the checkpointed process is either untouched
//! or, if the crash hit while its registers were the injection's, killed — never left
//! running corrupted.

use std::fs::{self, File};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use deltabox_controller::cr::procfs;
use deltabox_tests::cr::{CrEnv, LINE_TIMEOUT, Lines, Proc, field, read_u64, target_bin};
use deltabox_tests::require_root;

fn controller_bin() -> PathBuf {
    target_bin().with_file_name("cr-controller")
}

/// Starts the controller; it is tracked by `env` (killed on drop).
fn controller(env: &CrEnv, args: &[&str]) -> (Child, Lines) {
    let mut child = Command::new(controller_bin())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn cr-controller");
    env.track(child.id() as i32);
    let out = Lines::new(File::from(OwnedFd::from(child.stdout.take().unwrap())));
    (child, out)
}

fn sigkill(child: &mut Child) {
    // SAFETY: kill(2) takes plain integers.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    let _ = child.wait();
}

fn ticker(env: &CrEnv) -> (Proc, u64) {
    let mut p = env.spawn_target(&["ticker", "5"]);
    let addr = u64::from_str_radix(field(&p.line(), "addr").trim_start_matches("0x"), 16).unwrap();
    p.line();
    (p, addr)
}

fn alive(pid: i32) -> bool {
    procfs::stat(pid).is_ok_and(|st| st.state != 'Z' && st.state != 'X')
}

/// A template that survived the crash is stopped, frozen, and never moves again.
fn assert_template_held(tpid: i32, cgroup: &Path, addr: u64, at_checkpoint: Option<u64>) {
    if !alive(tpid) {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while procfs::stat(tpid).map(|s| s.state).unwrap_or('T') != 'T' && Instant::now() < deadline {
        sleep(Duration::from_millis(1));
    }
    if !alive(tpid) {
        return;
    }
    assert_eq!(procfs::stat(tpid).unwrap().state, 'T', "template {tpid}");
    let freeze = fs::read_to_string(cgroup.join("cgroup.freeze")).unwrap();
    assert_eq!(freeze.trim(), "1", "template {tpid}: cgroup thawed");
    let counter = read_u64(tpid, addr);
    if let Some(expected) = at_checkpoint {
        assert_eq!(counter, expected, "template {tpid} ran");
    }
    let st = procfs::stat(tpid).unwrap();
    sleep(Duration::from_millis(100));
    assert_eq!(read_u64(tpid, addr), counter, "template {tpid} ran");
    let st2 = procfs::stat(tpid).unwrap();
    assert_eq!(
        (st.utime, st.stime),
        (st2.utime, st2.stime),
        "template {tpid} ran"
    );
}

/// The checkpointed process is either dead by SIGKILL (the crash hit its injection
/// window) or alive and ticking on from where it was.
fn assert_untouched_or_killed(p: &mut Proc) -> bool {
    let mut last: Option<u64> = None;
    for _ in 0..3 {
        match p.out.next_line(LINE_TIMEOUT) {
            Ok(line) => {
                let n: u64 = field(&line, "tick").parse().unwrap();
                if let Some(prev) = last {
                    assert_eq!(n, prev + 1, "pid {} skipped a tick", p.pid);
                }
                last = Some(n);
            }
            Err(_) => {
                let mut status = 0;
                // SAFETY: `status` is a valid c_int for waitpid to fill.
                unsafe { libc::waitpid(p.pid, &mut status, libc::__WALL) };
                assert!(
                    libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL,
                    "pid {} died of status {status:#x}, not of the crash's SIGKILL",
                    p.pid
                );
                return false;
            }
        }
    }
    true
}

#[test]
fn a_controller_killed_mid_checkpoint_leaves_no_template_running() {
    require_root();
    let mut killed = 0;
    for (round, delay_ms) in [0u64, 1, 2, 3, 5, 8, 13, 21].into_iter().enumerate() {
        let env = CrEnv::new(&format!("crash-checkpoint-{round}"));
        let (mut p, addr) = ticker(&env);
        let templates = env.checkpoint_opts().template_cgroups;
        let (mut ctl, mut out) = controller(
            &env,
            &[
                "checkpoints",
                &p.pid.to_string(),
                &templates.display().to_string(),
                "30",
            ],
        );
        // The first template, to be sure the controller is at work.
        let line = out.next_line(LINE_TIMEOUT).unwrap();
        env.track(field(&line, "template").parse().unwrap());
        sleep(Duration::from_millis(delay_ms));
        sigkill(&mut ctl);

        for entry in fs::read_dir(&templates).unwrap().flatten() {
            if !entry.file_type().unwrap().is_dir() {
                continue;
            }
            let procs = fs::read_to_string(entry.path().join("cgroup.procs")).unwrap();
            for tpid in procs.split_whitespace().map(|s| s.parse::<i32>().unwrap()) {
                env.track(tpid);
                assert_template_held(tpid, &entry.path(), addr, None);
            }
        }
        if !assert_untouched_or_killed(&mut p) {
            killed += 1;
        }
    }
    eprintln!("checkpointed process killed by the crash in {killed} of 8 rounds");
}

#[test]
fn a_controller_killed_mid_restore_leaves_no_template_or_half_restored_process_running() {
    require_root();
    for (round, delay_ms) in [0u64, 1, 2, 3, 5, 8, 13, 21].into_iter().enumerate() {
        let env = CrEnv::new(&format!("crash-restore-{round}"));
        let (mut p, addr) = ticker(&env);
        let templates = env.checkpoint_opts().template_cgroups;
        let (mut ctl, mut out) = controller(
            &env,
            &[
                "restores",
                &p.pid.to_string(),
                &templates.display().to_string(),
                &env.session().display().to_string(),
            ],
        );
        let line = out.next_line(LINE_TIMEOUT).unwrap();
        let tpid: i32 = field(&line, "template").parse().unwrap();
        let cgroup = PathBuf::from(field(&line, "cgroup"));
        env.track(tpid);
        let at_checkpoint = read_u64(tpid, addr);
        sleep(Duration::from_millis(delay_ms));
        sigkill(&mut ctl);

        assert_template_held(tpid, &cgroup, addr, Some(at_checkpoint));
        // Restored processes die with the controller: half-restored ones by
        // PTRACE_O_EXITKILL, whole ones at their next write to the dead controller's
        // pipe. Only the original is left in the session.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let procs = fs::read_to_string(env.session().join("cgroup.procs")).unwrap();
            let pids: Vec<&str> = procs.split_whitespace().collect();
            if pids == [p.pid.to_string()] {
                break;
            }
            assert!(Instant::now() < deadline, "session still holds {pids:?}");
            sleep(Duration::from_millis(5));
        }
        assert!(
            assert_untouched_or_killed(&mut p),
            "the original was killed"
        );
    }
}
