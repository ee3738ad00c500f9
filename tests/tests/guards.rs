//! The test support itself: a test's cgroup guard removes its tree even with many
//! processes and a child cgroup in it, and `wait_until` waits for its condition and no
//! longer than its bound. Needs root and cgroup v2.

use std::{
    fs,
    process::Command,
    time::{Duration, Instant},
};

use deltabox_tests::{
    cgroup::{TestCgroup, pids_under},
    require_root, unique, wait_until,
};

/// Whether `pid` has exited (gone, or a zombie left for this process to reap).
fn exited(pid: i32) -> bool {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.is_empty() || stat.contains(") Z ")
}

#[test]
fn a_test_cgroup_is_removed_with_its_processes_and_child_cgroups() {
    require_root();
    let cg = TestCgroup::new(&unique("guard"));
    let path = cg.path().to_path_buf();
    // 64 background sleepers under a shell, and one more in a child cgroup.
    let mut shell =
        cg.spawn(Command::new("sh").args(["-c", "for i in $(seq 64); do sleep 600 & done; wait"]));
    let sub = path.join("sub");
    fs::create_dir(&sub).unwrap();
    let mut nested = cg.spawn(Command::new("sleep").arg("601"));
    fs::write(sub.join("cgroup.procs"), nested.id().to_string()).unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || pids_under(&path).len() == 66),
        "{} holds {:?}, not the shell and 65 sleepers",
        path.display(),
        pids_under(&path)
    );
    let pids = pids_under(&path);

    drop(cg);
    assert!(!path.exists(), "{} left behind", path.display());
    let running: Vec<i32> = pids.into_iter().filter(|&p| !exited(p)).collect();
    assert!(running.is_empty(), "still running: {running:?}");
    for child in [&mut shell, &mut nested] {
        let status = child.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL),
            "pid {}",
            child.id()
        );
    }
}

#[test]
fn wait_until_waits_for_the_condition_and_gives_up_at_its_bound() {
    let mut calls = 0;
    assert!(wait_until(Duration::from_secs(10), || {
        calls += 1;
        calls == 3
    }));
    assert_eq!(calls, 3, "polled past the condition");

    let start = Instant::now();
    assert!(!wait_until(Duration::from_millis(100), || false));
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(100) && waited < Duration::from_secs(5),
        "gave up after {waited:?}"
    );
}
