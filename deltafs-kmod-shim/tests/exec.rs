//! Running a program from DeltaFS: while it runs, the file cannot be opened for writing
//! nor truncated (`ETXTBSY`, as on ext4), whether it lives in the writable layer, a frozen
//! layer or the base, and a refused open leaves it whole. Needs root.
//!
//! pjdfstest's `open::etxtbsy` failed now and then (about one run in 30) because an
//! `O_RDONLY | O_TRUNC` open, which the kernel checks only after the daemon answered it,
//! was truncated by the daemon first: the running copy of `sleep` then died of `SIGBUS`
//! and the kernel's check, coming after, let the open through. Here the file's contents
//! and the process are checked, so the test fails every time without the fix.

mod common;

use std::fs::{self, OpenOptions};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::Fixture;

/// The host's `sleep` binary: a real ELF program to copy into the mount.
fn sleep_binary() -> PathBuf {
    ["/usr/bin/sleep", "/bin/sleep"]
        .iter()
        .map(PathBuf::from)
        .find(|path| path.is_file())
        .expect("no sleep binary on this host")
}

/// A process killed (by pid) and reaped when dropped, also when the test fails.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `path 30`; `spawn` returns once the `execve` succeeded.
fn run(path: &Path) -> Running {
    Running(
        Command::new(path)
            .arg("30")
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", path.display())),
    )
}

/// The error kind of an open of `path` with `custom` flags, access mode `access`.
fn open_error(path: &Path, access: i32, custom: i32) -> Option<std::io::Error> {
    let mut options = OpenOptions::new();
    match access {
        libc::O_WRONLY => options.write(true),
        libc::O_RDWR => options.read(true).write(true),
        _ => options.read(true),
    };
    options.custom_flags(custom).open(path).err()
}

/// Every way to write to the running program `path` fails with `ETXTBSY` and changes
/// nothing: its bytes are still `original` and the process still runs.
fn assert_text_busy(path: &Path, original: &[u8], running: &mut Running, what: &str) {
    for (access, custom, name) in [
        (libc::O_WRONLY, 0, "O_WRONLY"),
        (libc::O_RDWR, 0, "O_RDWR"),
        (libc::O_RDONLY, libc::O_TRUNC, "O_RDONLY|O_TRUNC"),
        (libc::O_WRONLY, libc::O_TRUNC, "O_WRONLY|O_TRUNC"),
    ] {
        let err = open_error(path, access, custom)
            .unwrap_or_else(|| panic!("{what}: open({name}) of the running program succeeded"));
        assert_eq!(
            err.raw_os_error(),
            Some(libc::ETXTBSY),
            "{what}: open({name}): {err}"
        );
        assert!(
            fs::read(path).unwrap() == original,
            "{what}: the refused open({name}) changed the running program ({} bytes left of {})",
            fs::metadata(path).unwrap().len(),
            original.len()
        );
    }
    let err = nix::unistd::truncate(path, 0).unwrap_err();
    assert_eq!(err, nix::errno::Errno::ETXTBSY, "{what}: truncate");
    assert!(fs::read(path).unwrap() == original, "{what}: truncate");
    // A truncated program dies (SIGBUS) at its next page fault; give it the time to.
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        running.0.try_wait().unwrap().is_none(),
        "{what}: the program died while it was refused writers"
    );
}

/// Once the program is gone the file is writable again (the daemon learns it from the
/// `RELEASE` of the exec's handle, which the kernel sends asynchronously).
fn assert_writable_after_exit(path: &Path, running: Running, what: &str) {
    drop(running);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match open_error(path, libc::O_RDONLY, libc::O_TRUNC) {
            None => break,
            Some(err) if err.raw_os_error() == Some(libc::ETXTBSY) => {
                assert!(
                    Instant::now() < deadline,
                    "{what}: still ETXTBSY 5 s after the program exited"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            Some(err) => panic!("{what}: open(O_RDONLY|O_TRUNC) after exit: {err}"),
        }
    }
    assert_eq!(
        fs::metadata(path).unwrap().len(),
        0,
        "{what}: not truncated"
    );
}

#[test]
fn a_running_program_cannot_be_written_or_truncated() {
    require_root!();
    let program = fs::read(sleep_binary()).unwrap();
    let fx = Fixture::new();
    // One copy in the base (never written: the view copies it up).
    let base_copy = fx.base.join("usr/bin/sleep-copy");
    fs::write(&base_copy, &program).unwrap();
    fs::set_permissions(&base_copy, fs::Permissions::from_mode(0o755)).unwrap();
    let view = fx.mount("m", None);
    let m = view.mountpoint().to_owned();

    // In the writable layer (passthrough), written as pjdfstest does it.
    let fresh = m.join("fresh");
    std::io::copy(
        &mut fs::File::open(sleep_binary()).unwrap(),
        &mut fs::File::create(&fresh).unwrap(),
    )
    .unwrap();
    fs::set_permissions(&fresh, fs::Permissions::from_mode(0o755)).unwrap();
    let mut running = run(&fresh);
    assert_text_busy(&fresh, &program, &mut running, "writable layer");
    assert_writable_after_exit(&fresh, running, "writable layer");

    // In a frozen layer (daemon-served; a write would copy it up).
    let frozen = m.join("frozen");
    fs::write(&frozen, &program).unwrap();
    fs::set_permissions(&frozen, fs::Permissions::from_mode(0o755)).unwrap();
    view.freeze(&Default::default()).unwrap();
    let mut running = run(&frozen);
    assert_text_busy(&frozen, &program, &mut running, "frozen layer");
    assert_writable_after_exit(&frozen, running, "frozen layer");

    // In the base.
    let in_base = m.join("usr/bin/sleep-copy");
    let mut running = run(&in_base);
    assert_text_busy(&in_base, &program, &mut running, "base");
    assert_writable_after_exit(&in_base, running, "base");
    assert_eq!(fs::read(&base_copy).unwrap(), program, "the base changed");

    // Reading and running it at the same time is fine.
    fs::write(&fresh, &program).unwrap();
    let running = run(&fresh);
    assert_eq!(fs::read(&fresh).unwrap(), program);
    let reader = OpenOptions::new().read(true).open(&fresh);
    assert!(reader.is_ok(), "a plain read-only open failed");
    drop(reader);
    drop(running);
}
