//! DeltaCR templates never run: ptrace-stopped while held, group-stopped and in a
//! frozen cgroup always, so that neither a SIGCONT nor a thaw alone sets one running.

use std::fs;
use std::thread::sleep;
use std::time::Duration;

use deltabox_controller::cr::{self, procfs};
use deltabox_tests::cr::{CrEnv, field, read_u64};
use deltabox_tests::require_root;
use nix::unistd::Pid;

fn cpu_ticks(pid: i32) -> u64 {
    let st = procfs::stat(pid).unwrap();
    st.utime + st.stime
}

/// The template is stopped, frozen, alone in its cgroup. Right after a detach it is
/// briefly runnable inside the kernel, on its way into the stop (it never reaches user
/// mode: the stop is pending before it is woken), so the state is polled.
fn assert_held(template: &cr::Template) {
    let pid = template.pid().as_raw();
    let mut st = procfs::stat(pid).unwrap();
    for _ in 0..1000 {
        if st.state == 'T' {
            break;
        }
        sleep(Duration::from_millis(1));
        st = procfs::stat(pid).unwrap();
    }
    assert_eq!(st.state, 'T', "template {pid} is not stopped: {st:?}");
    let freeze = fs::read_to_string(template.cgroup_path().join("cgroup.freeze")).unwrap();
    assert_eq!(freeze.trim(), "1", "template cgroup not frozen");
    let procs = fs::read_to_string(template.cgroup_path().join("cgroup.procs")).unwrap();
    assert_eq!(procs.trim(), pid.to_string());
}

#[test]
fn the_template_never_runs() {
    require_root();
    let env = CrEnv::new("never-runs");
    let mut p = env.spawn_target(&["ticker", "5"]);
    let addr = u64::from_str_radix(field(&p.line(), "addr").trim_start_matches("0x"), 16).unwrap();
    for _ in 0..3 {
        p.line();
    }
    let template = cr::checkpoint(Pid::from_raw(p.pid), &env.checkpoint_opts()).unwrap();
    let tpid = template.pid().as_raw();
    env.track(tpid);
    let at_checkpoint = read_u64(tpid, addr);
    let ticks = cpu_ticks(tpid);
    assert_held(&template);
    // The original keeps ticking past the checkpoint.
    let mut last = 0;
    for _ in 0..20 {
        last = field(&p.line(), "tick").parse().unwrap();
    }
    assert!(last > at_checkpoint + 10, "{last} vs {at_checkpoint}");
    sleep(Duration::from_millis(200));
    assert_eq!(read_u64(tpid, addr), at_checkpoint);
    assert_eq!(cpu_ticks(tpid), ticks);
    assert_held(&template);

    // A SIGCONT ends the group-stop, not the freeze: still no tick.
    // SAFETY: kill(2) takes plain integers.
    unsafe { libc::kill(tpid, libc::SIGCONT) };
    sleep(Duration::from_millis(200));
    assert_eq!(read_u64(tpid, addr), at_checkpoint);
    assert_eq!(cpu_ticks(tpid), ticks);

    // Restoring thaws it only under ptrace, puts it back in group-stop, freezes it.
    let mut branch = env.adopt(template.restore(&env.restore_opts()).unwrap());
    let first: u64 = field(&branch.line(), "tick").parse().unwrap();
    assert!(
        first == at_checkpoint || first == at_checkpoint + 1,
        "the branch went on from {first}, the checkpoint was at {at_checkpoint}"
    );
    let second: u64 = field(&branch.line(), "tick").parse().unwrap();
    assert_eq!(second, first + 1);
    sleep(Duration::from_millis(100));
    assert_eq!(read_u64(tpid, addr), at_checkpoint);
    assert_held(&template);

    // A thaw alone does not set it running either: it is group-stopped again.
    fs::write(template.cgroup_path().join("cgroup.freeze"), "0").unwrap();
    sleep(Duration::from_millis(200));
    assert_eq!(read_u64(tpid, addr), at_checkpoint);
    assert_eq!(procfs::stat(tpid).unwrap().state, 'T');
    fs::write(template.cgroup_path().join("cgroup.freeze"), "1").unwrap();

    // And it still restores, again and again.
    let mut again = env.adopt(template.restore(&env.restore_opts()).unwrap());
    let first_again: u64 = field(&again.line(), "tick").parse().unwrap();
    assert_eq!(first_again, first);
    assert_eq!(read_u64(tpid, addr), at_checkpoint);
    assert_eq!(cpu_ticks(tpid), ticks);
    assert_held(&template);
}

#[test]
fn destroying_a_template_leaves_no_process_and_no_cgroup() {
    require_root();
    let env = CrEnv::new("destroy");
    let mut p = env.spawn_target(&["serve"]);
    assert_eq!(p.ask("inc"), "n=1");
    let template = cr::checkpoint(Pid::from_raw(p.pid), &env.checkpoint_opts()).unwrap();
    let tpid = template.pid().as_raw();
    env.track(tpid);
    let cgroup = template.cgroup_path().to_path_buf();
    assert!(cgroup.exists());
    template.destroy().unwrap();
    assert!(!cgroup.exists(), "{} left behind", cgroup.display());
    assert!(
        !std::path::Path::new(&format!("/proc/{tpid}")).exists(),
        "template {tpid} left behind"
    );

    // Dropping a template does the same.
    let template = cr::checkpoint(Pid::from_raw(p.pid), &env.checkpoint_opts()).unwrap();
    let tpid = template.pid().as_raw();
    env.track(tpid);
    let cgroup = template.cgroup_path().to_path_buf();
    drop(template);
    assert!(!cgroup.exists(), "{} left behind", cgroup.display());
    assert!(!std::path::Path::new(&format!("/proc/{tpid}")).exists());
    // The original never noticed.
    assert_eq!(p.ask("inc"), "n=2");
}
