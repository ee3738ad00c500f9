//! DeltaCR: checkpoint a process into a template and roll back to it, again and again.

use deltabox_controller::cr::{self, CrError};
use deltabox_tests::cr::{CrEnv, field};
use deltabox_tests::require_root;
use nix::unistd::Pid;

#[test]
fn rollback_restores_memory_and_continues_twice_from_one_template() {
    require_root();
    let env = CrEnv::new("counter");
    let mut p = env.spawn_target(&["serve"]);
    for i in 1..=5 {
        assert_eq!(p.ask("inc"), format!("n={i}"));
    }
    // The target is blocked in read(0) here: the checkpoint interrupts that read.
    let template = cr::checkpoint(Pid::from_raw(p.pid), &env.checkpoint_opts()).unwrap();
    env.track(template.pid().as_raw());
    // The original goes on, its read restarted.
    for i in 6..=8 {
        assert_eq!(p.ask("inc"), format!("n={i}"));
    }
    let restored = cr::rollback(&template, Pid::from_raw(p.pid), &env.restore_opts()).unwrap();
    let mut r = env.adopt(restored);
    assert_eq!(r.ask("inc"), "n=6");
    assert_eq!(r.ask("inc"), "n=7");
    let restored = cr::rollback(&template, Pid::from_raw(r.pid), &env.restore_opts()).unwrap();
    let mut r2 = env.adopt(restored);
    assert_eq!(r2.ask("get"), "n=5");
    assert_eq!(r2.ask("inc"), "n=6");
    let _ = field;
    let _: Option<CrError> = None;
}
