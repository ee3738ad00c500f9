//! DeltaCR refuses, with an error naming the process, what it cannot restore yet —
//! and leaves the process untouched. (Multi-threaded processes are no longer refused:
//! `cr_threads`.)

use std::fs;

use std::os::fd::AsRawFd as _;

use deltabox_controller::cr::fdtable::{FdError, FdKind};
use deltabox_controller::cr::{self, CrError};
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
fn a_socket_beyond_stdio_is_refused_naming_the_fd() {
    require_root();
    let env = CrEnv::new("socket");
    let mut p = env.spawn_target(&["socket"]);
    assert_eq!(p.line(), "ready");
    let err = cr::checkpoint(Pid::from_raw(p.pid), &env.checkpoint_opts()).unwrap_err();
    assert!(
        matches!(&err, CrError::Fd(FdError::Unsupported { pid, fd: 3, .. }) if *pid == p.pid),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("pid {} (cr-target): fd 3 is \"socket:[", p.pid)),
        "{msg}"
    );
    no_template_left(&env.checkpoint_opts().template_cgroups);
}

/// A pipe beyond stdio is recorded by inode; a restore needs a path to a fresh pipe for
/// it (`RestoreOptions::pipes`), and is refused, naming the fd, without one.
#[test]
fn a_pipe_beyond_stdio_is_reopened_through_the_path_given_for_it() {
    require_root();
    let env = CrEnv::new("pipe");
    let mut p = env.spawn_target(&["pipe"]);
    assert_eq!(p.line(), "ready");
    let template = cr::checkpoint(Pid::from_raw(p.pid), &env.checkpoint_opts()).unwrap();
    let pipes: Vec<_> = template
        .state()
        .fds
        .iter()
        .filter(|e| e.kind == FdKind::Pipe)
        .map(|e| (e.fd, e.pipe.expect("a pipe's inode")))
        .collect();
    assert_eq!(pipes.len(), 2, "{:?}", template.state().fds);
    assert_eq!(pipes[0].1, pipes[1].1, "both ends of one pipe");
    let inode = pipes[0].1;

    let err = template.restore(&env.restore_opts()).unwrap_err();
    assert!(
        matches!(&err, CrError::Fd(FdError::PipeUnplaced { fd: 3, inode: i, .. }) if *i == inode),
        "{err:?}"
    );

    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    let fresh = fs::read_link(format!("/proc/self/fd/{}", r.as_raw_fd())).unwrap();
    let mut opts = env.restore_opts();
    opts.pipes.insert(
        inode,
        format!("/proc/{}/fd/{}", std::process::id(), r.as_raw_fd()).into(),
    );
    let restored = env.adopt(template.restore(&opts).unwrap());
    for (fd, _) in &pipes {
        let link = fs::read_link(format!("/proc/{}/fd/{fd}", restored.pid)).unwrap();
        assert_eq!(link, fresh, "fd {fd} of the restored process");
    }
    // Each end with the access mode it had.
    let mode = |pid: i32, fd: i32| {
        let info = fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap();
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .map(|f| u32::from_str_radix(f.trim(), 8).unwrap())
            .unwrap();
        flags & libc::O_ACCMODE as u32
    };
    for (fd, _) in &pipes {
        assert_eq!(
            mode(restored.pid, *fd),
            mode(p.pid, *fd),
            "fd {fd}'s access mode"
        );
    }
    drop(w);
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
