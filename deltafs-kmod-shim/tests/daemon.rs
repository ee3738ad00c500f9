//! The `deltafs` binary as harnesses drive it, and faults: the stdin protocol, SIGTERM,
//! a daemon killed with SIGKILL (the mount answers `ENOTCONN`, no hang, and a restarted
//! daemon re-mounts the snapshots from disk), and a full store during a copy-up. Needs
//! root.

mod common;

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use common::{Fixture, TempDir};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// A `deltafs mount` child; killed and its mount detached if the test fails.
struct Daemon {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    mountpoint: PathBuf,
}

impl Daemon {
    fn start(store: &Path, base: &Path, mountpoint: &Path, from: Option<&str>) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_deltafs"));
        cmd.args(["mount", "--store"])
            .arg(store)
            .arg("--base")
            .arg(base)
            .arg(mountpoint);
        if let Some(from) = from {
            cmd.args(["--from", from]);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut daemon = Self {
            child,
            stdin,
            stdout,
            mountpoint: mountpoint.to_owned(),
        };
        assert_eq!(daemon.line(), format!("mounted {}", mountpoint.display()));
        daemon
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        line.trim_end().to_owned()
    }

    fn send(&mut self, command: &str) -> String {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{command}").unwrap();
        stdin.flush().unwrap();
        self.line()
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = umount2(&self.mountpoint, MntFlags::MNT_DETACH);
    }
}

fn is_mounted(path: &Path) -> bool {
    let path = fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(path.to_str().unwrap()))
}

#[test]
fn the_stdin_protocol_and_sigterm() {
    require_root!();
    let fx = Fixture::new();
    let store = TempDir::new_in(&fx.store_dir().join(".."), "cli-");
    let mnt = fx.mountpoint("cli");
    let mut d = Daemon::start(store.path(), &fx.base, &mnt, None);
    fs::write(mnt.join("f"), b"one").unwrap();
    let frozen = d.send("freeze");
    let id = frozen.strip_prefix("frozen ").expect(&frozen).to_owned();
    fs::write(mnt.join("f"), b"two").unwrap();
    assert_eq!(d.send(&format!("switch {id}")), format!("switched {id}"));
    assert_eq!(fs::read(mnt.join("f")).unwrap(), b"one");
    assert!(d.send("switch nonsense").starts_with("error "));
    assert!(d.send("bogus").starts_with("error "));
    let branch = fx.mountpoint("cli-branch");
    assert_eq!(
        d.send(&format!("branch {id} {}", branch.display())),
        format!("branched {}", branch.display())
    );
    assert_eq!(fs::read(branch.join("f")).unwrap(), b"one");
    assert!(d.send("sync").starts_with("synced "));
    // One `<kind>=<count>/<mean µs>` per request kind; the writes above created `f`.
    let stats = d.send("stats");
    let kinds: Vec<&str> = stats
        .strip_prefix("stats ")
        .expect(&stats)
        .split(' ')
        .collect();
    assert_eq!(kinds.len(), deltafs::OpKind::ALL.len(), "{stats}");
    let create = kinds
        .iter()
        .find(|k| k.starts_with("create="))
        .expect(&stats);
    let count: u64 = create["create=".len()..]
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(count >= 1, "{stats}");
    assert_eq!(d.send("quit"), "unmounted");
    assert!(d.child.wait().unwrap().success());
    assert!(!is_mounted(&mnt) && !is_mounted(&branch));

    // SIGTERM unmounts cleanly too.
    let mut d = Daemon::start(store.path(), &fx.base, &mnt, Some(&id));
    assert_eq!(fs::read(mnt.join("f")).unwrap(), b"one");
    kill(d.pid(), Signal::SIGTERM).unwrap();
    assert_eq!(d.line(), "unmounted");
    assert!(d.child.wait().unwrap().success());
    assert!(!is_mounted(&mnt));
}

#[test]
fn a_killed_daemon_leaves_enotconn_and_a_restart_remounts_its_snapshots() {
    require_root!();
    let fx = Fixture::new();
    let store = TempDir::new_in(&fx.store_dir().join(".."), "kill-");
    let mnt = fx.mountpoint("kill");
    let mut d = Daemon::start(store.path(), &fx.base, &mnt, None);
    fs::write(mnt.join("kept"), b"checkpointed").unwrap();
    let id = d.send("freeze").strip_prefix("frozen ").unwrap().to_owned();
    assert!(d.send("sync").starts_with("synced "));
    fs::write(mnt.join("lost"), b"after the checkpoint").unwrap();
    kill(d.pid(), Signal::SIGKILL).unwrap();
    d.child.wait().unwrap();
    // The mount stays until detached, answering ENOTCONN at once (no hang).
    let err = fs::metadata(mnt.join("kept")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTCONN), "{err}");
    umount2(&mnt, MntFlags::MNT_DETACH).unwrap();

    let d = Daemon::start(store.path(), &fx.base, &mnt, Some(&id));
    assert_eq!(fs::read(mnt.join("kept")).unwrap(), b"checkpointed");
    assert!(!mnt.join("lost").exists());
    drop(d);
}

/// A 512 KiB tmpfs in a temporary directory, unmounted (then removed) when dropped.
struct SmallTmpfs(TempDir);

impl SmallTmpfs {
    fn mount() -> Self {
        let dir = TempDir::new_in(&std::env::temp_dir(), "deltafs-small-");
        mount(
            Some("tmpfs"),
            dir.path(),
            Some("tmpfs"),
            MsFlags::empty(),
            Some("size=512k"),
        )
        .unwrap();
        Self(dir)
    }

    fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let _ = umount2(self.0.path(), MntFlags::MNT_DETACH);
    }
}

/// A store too small for a copy-up: the writer gets ENOSPC, the partial copy is gone,
/// the frozen data and the checkpoint are intact.
#[test]
fn enospc_during_a_copy_up_reaches_the_writer_and_spares_the_checkpoint() {
    require_root!();
    let fx = Fixture::new();
    let small = SmallTmpfs::mount();
    // Whole copies (a chunk-granular one would fit: see the test below).
    let whole = deltafs::ChunkPolicy {
        min_size: u64::MAX,
        ..deltafs::ChunkPolicy::default()
    };
    let store = deltafs::Store::open_with(small.path().join("store"), whole).unwrap();
    let mnt = fx.mountpoint("small");
    let view = store.mount(&fx.base, &mnt, None).unwrap();
    // `big` (1 MiB, in the base) cannot be copied up into 512 KiB.
    fs::write(mnt.join("small"), b"fits").unwrap();
    let id = view.freeze(&deltafs::FreezeOpts::default()).unwrap().id;
    let err = fs::OpenOptions::new()
        .write(true)
        .open(mnt.join("big"))
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    assert_eq!(fs::read(mnt.join("big")).unwrap(), vec![7u8; 1 << 20]);
    // Writes that fit still work, and the checkpoint is intact.
    fs::write(mnt.join("small"), b"still fits").unwrap();
    view.switch(id).unwrap();
    assert_eq!(fs::read(mnt.join("small")).unwrap(), b"fits");
    std::thread::sleep(Duration::from_millis(10));
    view.unmount().unwrap();
}

/// On a store too small for the whole file, a chunk-granular copy-up opens (it copies
/// nothing), a small write copies one chunk, and writing the whole file fails with
/// `ENOSPC` in the writer; the file below and the checkpoint are intact.
#[test]
fn a_chunked_copy_up_fits_where_a_whole_copy_does_not() {
    require_root!();
    let fx = Fixture::new();
    let small = SmallTmpfs::mount();
    let store = deltafs::Store::open(small.path().join("store")).unwrap();
    assert!(!store.reflink());
    let mnt = fx.mountpoint("small");
    let view = store.mount(&fx.base, &mnt, None).unwrap();
    let id = view.freeze(&deltafs::FreezeOpts::default()).unwrap().id;
    let big = fs::OpenOptions::new()
        .write(true)
        .open(mnt.join("big"))
        .unwrap();
    use std::os::unix::fs::FileExt;
    big.write_all_at(b"x", 300_000).unwrap();
    let mut want = vec![7u8; 1 << 20];
    want[300_000] = b'x';
    assert_eq!(fs::read(mnt.join("big")).unwrap(), want);
    let err = big.write_all_at(&vec![1u8; 1 << 20], 0).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    drop(big);
    view.switch(id).unwrap();
    assert_eq!(fs::read(mnt.join("big")).unwrap(), vec![7u8; 1 << 20]);
    std::thread::sleep(Duration::from_millis(10));
    view.unmount().unwrap();
}
