//! Support for DeltaBox's root integration tests: guards that undo what a test set
//! up even when it fails (a cgroup, a bpf pin directory, a child process), and helpers
//! to run a workload inside a cgroup.
//!
//! Every test needs root, bpffs, tracefs, cgroup v2 and the kernel features DESIGN.md
//! lists; `cargo xtask setup` checks them. A missing feature fails the test with a
//! message naming it: nothing here skips silently.

pub mod cgroup;
pub mod cli;
pub mod cr;
pub mod daemon;
pub mod memory;
pub mod nodestate;
pub mod pins;
pub mod procs;
pub mod prometheus;
pub mod sandbox;
pub mod templates;
pub mod tree;

use std::{
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

/// A directory for the test's files on the disk-backed filesystem of `target/`
/// (page-cache dirtying is what the tests count; tmpfs has no writeback).
pub fn scratch_dir(test: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/tmp/deltabox-tests")
        .join(format!("{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// Panics with a clear message unless running as root.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the integration tests need root (eBPF, cgroups, bpffs): run them with `cargo xtask test` as root"
    );
}

/// A unique name for test objects: the test's name and this process's pid.
pub fn unique(test: &str) -> String {
    format!("deltabox-test-{test}-{}", std::process::id())
}

/// Polls `cond` every 10 ms until it holds (true) or `timeout` has passed (false): what
/// a test waits for, instead of a fixed sleep that is too short on a loaded machine and
/// too long on an idle one. The caller asserts on the result with its own message.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
}
