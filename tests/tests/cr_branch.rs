//! DeltaCR branches: N processes from one template, none sharing an open file
//! description or memory with another or with the template.

use std::fs;

use deltabox_controller::cr;
use deltabox_tests::cr::{CrEnv, field};
use deltabox_tests::{require_root, scratch_dir};
use nix::unistd::Pid;

fn fdinfo_pos(pid: i32, fd: i32) -> u64 {
    let text = fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("pos:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn branches_do_not_share_file_offsets() {
    require_root();
    let env = CrEnv::new("offsets");
    let dir = scratch_dir("cr-offsets");
    let file = dir.join("data");
    fs::write(&file, "aaaabbbbccccddddeeee").unwrap();
    let mut p = env.spawn_target(&["serve"]);
    assert_eq!(p.ask(&format!("open {}", file.display())), "fd=3");
    assert_eq!(p.ask("read"), "data=aaaa");

    let template = cr::checkpoint(Pid::from_raw(p.pid), &env.checkpoint_opts()).unwrap();
    env.track(template.pid().as_raw());
    // The template holds no fd: nothing it could share.
    let held = fs::read_dir(format!("/proc/{}/fd", template.pid()))
        .unwrap()
        .count();
    assert_eq!(held, 0, "the template holds {held} fds");

    let mut a = env.adopt(template.restore(&env.restore_opts()).unwrap());
    let mut b = env.adopt(template.restore(&env.restore_opts()).unwrap());
    assert_eq!(a.ask("read"), "data=bbbb");
    assert_eq!(a.ask("read"), "data=cccc");
    assert_eq!(b.ask("read"), "data=bbbb");
    assert_eq!(a.ask("read"), "data=dddd");
    assert_eq!(b.ask("read"), "data=cccc");
    // The original's offset moved with none of them.
    assert_eq!(p.ask("read"), "data=bbbb");
    assert_eq!(fdinfo_pos(a.pid, 3), 16);
    assert_eq!(fdinfo_pos(b.pid, 3), 12);
    assert_eq!(fdinfo_pos(p.pid, 3), 8);
    // Same path, own open file descriptions; stdio on fresh pipes.
    for fd in [0, 1] {
        let link = |pid: i32| fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap();
        assert_ne!(link(a.pid), link(b.pid), "fd {fd}");
        assert_ne!(link(a.pid), link(p.pid), "fd {fd}");
    }
    assert_eq!(
        fs::read_link(format!("/proc/{}/fd/3", a.pid)).unwrap(),
        file.canonicalize().unwrap()
    );
    let _ = fs::remove_dir_all(&dir);
}

/// The fd table's rebuild is one planned batch: a table with a gap, close-on-exec
/// flags and paths too long for the scratch page together (it maps a larger one, and
/// unmaps it) comes back fd for fd in each branch.
#[test]
fn a_table_with_a_gap_and_long_paths_comes_back_in_each_branch() {
    require_root();
    let env = CrEnv::new("fd-plan");
    let dir = scratch_dir("cr-fd-plan");
    let mut deep = dir.clone();
    for level in 0..8 {
        deep.push(format!("{level}{}", "d".repeat(200)));
    }
    fs::create_dir_all(&deep).unwrap();
    let names = ["a", "b", "c"];
    for name in names {
        fs::write(deep.join(name), format!("{name}{name}{name}{name}1234abcd")).unwrap();
    }
    let mut p = env.spawn_target(&["serve"]);
    for (fd, name) in (3..).zip(names) {
        let path = deep.join(name);
        assert_eq!(
            p.ask(&format!("open {}", path.display())),
            format!("fd={fd}")
        );
    }
    assert_eq!(p.ask("close 4"), "ok");
    assert_eq!(p.ask("read"), "data=cccc");

    let template = cr::checkpoint(Pid::from_raw(p.pid), &env.checkpoint_opts()).unwrap();
    env.track(template.pid().as_raw());
    for _ in 0..2 {
        let mut b = env.adopt(template.restore(&env.restore_opts()).unwrap());
        assert_eq!(b.ask("read"), "data=1234");
        let fds: Vec<String> = fs::read_dir(format!("/proc/{}/fd", b.pid))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        let mut fds: Vec<i32> = fds.iter().map(|f| f.parse().unwrap()).collect();
        fds.sort();
        assert_eq!(fds, [0, 1, 2, 3, 5], "the restored table");
        for (fd, name) in [(3, "a"), (5, "c")] {
            let link = fs::read_link(format!("/proc/{}/fd/{fd}", b.pid)).unwrap();
            assert_eq!(link, deep.join(name).canonicalize().unwrap(), "fd {fd}");
            let info = fs::read_to_string(format!("/proc/{}/fdinfo/{fd}", b.pid)).unwrap();
            let flags = info.lines().find_map(|l| l.strip_prefix("flags:")).unwrap();
            let flags = u32::from_str_radix(flags.trim(), 8).unwrap();
            assert_ne!(
                flags & libc::O_CLOEXEC as u32,
                0,
                "fd {fd}: flags {flags:o}"
            );
        }
        assert_eq!(fdinfo_pos(b.pid, 5), 8);
        // Neither scratch area is left: the process maps nothing executable and
        // writable.
        let maps = fs::read_to_string(format!("/proc/{}/maps", b.pid)).unwrap();
        assert!(
            !maps
                .lines()
                .any(|l| l.split_whitespace().nth(1) == Some("rwxp")),
            "a scratch area is left:\n{maps}"
        );
        assert_eq!(b.ask("inc"), "n=1");
    }
    assert_eq!(p.ask("read"), "data=1234");
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn branches_have_independent_memory() {
    require_root();
    let env = CrEnv::new("branches");
    let mut p = env.spawn_target(&["serve", "--alloc", "16"]);
    assert_eq!(p.ask("inc"), "n=1");
    let sum = p.ask("sum");
    let template = cr::checkpoint(Pid::from_raw(p.pid), &env.checkpoint_opts()).unwrap();
    env.track(template.pid().as_raw());

    let mut branches: Vec<_> = (0..5)
        .map(|_| env.adopt(template.restore(&env.restore_opts()).unwrap()))
        .collect();
    for (i, b) in branches.iter_mut().enumerate() {
        for _ in 0..i {
            b.ask("inc");
        }
        assert_eq!(b.ask(&format!("write {i}")), "ok");
    }
    for (i, b) in branches.iter_mut().enumerate() {
        assert_eq!(b.ask("get"), format!("n={}", 1 + i));
        let line = b.ask("pid");
        assert_eq!(field(&line, "pid"), b.pid.to_string());
    }
    // Writes in the branches reached neither the original nor the template.
    assert_eq!(p.ask("sum"), sum);
    let mut fresh = env.adopt(template.restore(&env.restore_opts()).unwrap());
    assert_eq!(fresh.ask("sum"), sum);
    assert_eq!(fresh.ask("get"), "n=1");
}
