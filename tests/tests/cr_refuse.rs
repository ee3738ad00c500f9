//! DeltaCR refuses, with an error naming the process, what it cannot restore yet —
//! and leaves the process untouched. (Multi-threaded processes are no longer refused:
//! `cr_threads`.)

use std::fs;

use deltabox_controller::cr::{self, CrError, fdtable::FdError};
use deltabox_tests::cr::CrEnv;
use deltabox_tests::require_root;
use nix::unistd::Pid;

fn no_template_left(env_templates: &std::path::Path) {
    let left: Vec<_> = fs::read_dir(env_templates)
        .unwrap()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .collect();
    assert!(left.is_empty(), "template cgroups left: {left:?}");
}

#[test]
fn a_pipe_beyond_stdio_is_refused_naming_the_fd() {
    require_root();
    let env = CrEnv::new("pipe");
    let mut p = env.spawn_target(&["pipe"]);
    assert_eq!(p.line(), "ready");
    let err = cr::checkpoint(Pid::from_raw(p.pid), &env.checkpoint_opts()).unwrap_err();
    assert!(
        matches!(&err, CrError::Fd(FdError::Unsupported { pid, fd: 3, .. }) if *pid == p.pid),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("pid {} (cr-target): fd 3", p.pid)),
        "{msg}"
    );
    no_template_left(&env.checkpoint_opts().template_cgroups);
}

#[test]
fn a_writable_shared_mapping_is_refused() {
    require_root();
    let env = CrEnv::new("shm");
    let mut p = env.spawn_target(&["shm"]);
    assert_eq!(p.line(), "ready");
    let err = cr::checkpoint(Pid::from_raw(p.pid), &env.checkpoint_opts()).unwrap_err();
    assert!(
        matches!(&err, CrError::SharedWritableMapping { pid, .. } if *pid == p.pid),
        "{err:?}"
    );
    no_template_left(&env.checkpoint_opts().template_cgroups);
}

#[test]
fn a_process_in_a_frozen_cgroup_is_refused() {
    require_root();
    let env = CrEnv::new("frozen");
    let mut p = env.spawn_target(&["serve"]);
    assert_eq!(p.ask("inc"), "n=1");
    // Right after the write, before the process has reached the freezer's trap (a
    // check of `cgroup.events` would miss it and the injection would hang).
    fs::write(env.session().join("cgroup.freeze"), "1").unwrap();
    let err = cr::checkpoint(Pid::from_raw(p.pid), &env.checkpoint_opts()).unwrap_err();
    assert!(
        matches!(&err, CrError::Frozen { pid, .. } if *pid == p.pid),
        "{err:?}"
    );
    fs::write(env.session().join("cgroup.freeze"), "0").unwrap();
    no_template_left(&env.checkpoint_opts().template_cgroups);
    assert_eq!(p.ask("inc"), "n=2");
}
