//! Shared fixture of the DeltaFS root tests: a store (on the xfs store set-up provides at
//! `/var/lib/deltabox/store` when it exists, else in a temporary directory), a base tree,
//! mount points, and guards that unmount and remove everything even when a test fails.
//!
//! `DELTAFS_TEST_STORE=plain` puts every fixture's store in the temporary directory
//! instead (ext4 here: no `FICLONE`) with [`small_chunks`]: every copy-up is then chunk
//! by chunk, so the tests run against chunk-granular copy-up.

#![allow(dead_code)]

pub mod mmap;

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use deltafs::{ChunkPolicy, FreezeOpts, FreezeReport, SnapshotId, Store, View};
use nix::mount::{MntFlags, umount2};

/// Where set-up puts the xfs (reflink) store, if it did.
const XFS_STORE: &str = "/var/lib/deltabox/store";

/// Why these tests cannot run here, if they cannot.
pub fn skip_reason() -> Option<&'static str> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root (mounting FUSE, passthrough needs CAP_SYS_ADMIN)");
    }
    if !Path::new("/dev/fuse").exists() {
        return Some("/dev/fuse is missing");
    }
    None
}

/// Returns from the test (after saying why) when it cannot run here.
#[macro_export]
macro_rules! require_root {
    () => {
        if let Some(why) = common::skip_reason() {
            eprintln!("skipped: {why}");
            return;
        }
    };
}

/// A directory removed (after detaching any mount under it) when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new_in(parent: &Path, prefix: &str) -> Self {
        fs::create_dir_all(parent).unwrap();
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(parent)
            .unwrap()
            .keep();
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // Mount points inside are detached first so removal cannot descend into a mount.
        if let Ok(entries) = fs::read_dir(&self.0) {
            for entry in entries.flatten() {
                let _ = umount2(&entry.path(), MntFlags::MNT_DETACH);
            }
        }
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The chunk policy of the plain-store fixtures: 4 KiB chunks, every copy-up chunk by
/// chunk however small the file, and no completion at half, so small test files stay
/// chunked copies of several chunks.
pub fn small_chunks() -> ChunkPolicy {
    ChunkPolicy {
        chunk: 4096,
        min_size: 0,
        complete_at_half: false,
    }
}

/// Whether `DELTAFS_TEST_STORE=plain` asks for plain-store fixtures.
pub fn plain_requested() -> bool {
    std::env::var("DELTAFS_TEST_STORE").is_ok_and(|v| v == "plain")
}

/// A store, a base tree and a scratch directory for mount points.
pub struct Fixture {
    store: Option<Store>,
    /// `Some`: the store is a plain directory of the scratch filesystem, opened with this
    /// policy.
    plain: Option<ChunkPolicy>,
    pub base: PathBuf,
    // Dropped after `store` (fields drop in order): views hold nothing of these.
    scratch: TempDir,
    store_dir: TempDir,
}

impl Fixture {
    /// A fresh store and a base holding `etc/hostname`, `usr/bin/tool` and `big` (a plain
    /// store when `DELTAFS_TEST_STORE=plain`).
    pub fn new() -> Self {
        Self::with_plain(plain_requested().then(small_chunks))
    }

    /// A fresh fixture whose store is a plain directory of the scratch filesystem (which
    /// must not clone: checked), opened with `policy`.
    pub fn plain(policy: ChunkPolicy) -> Self {
        let fixture = Self::with_plain(Some(policy));
        assert!(
            !fixture.store().reflink(),
            "the scratch filesystem under {} clones: no plain store here",
            std::env::temp_dir().display()
        );
        fixture
    }

    fn with_plain(plain: Option<ChunkPolicy>) -> Self {
        let scratch = TempDir::new_in(&std::env::temp_dir(), "deltafs-test-");
        let store_parent = if plain.is_none() && Path::new(XFS_STORE).is_dir() {
            PathBuf::from(XFS_STORE)
        } else {
            scratch.path().join("stores")
        };
        let store_dir = TempDir::new_in(&store_parent, "test-");
        let base = scratch.path().join("base");
        fs::create_dir_all(base.join("etc")).unwrap();
        fs::create_dir_all(base.join("usr/bin")).unwrap();
        fs::write(base.join("etc/hostname"), b"base-host\n").unwrap();
        fs::write(base.join("usr/bin/tool"), b"#!/bin/sh\necho tool\n").unwrap();
        fs::write(base.join("big"), vec![7u8; 1 << 20]).unwrap();
        let store = Some(open_store(store_dir.path(), plain));
        Self {
            store,
            plain,
            base,
            scratch,
            store_dir,
        }
    }

    /// A new empty mount point.
    pub fn mountpoint(&self, name: &str) -> PathBuf {
        let path = self.scratch.path().join(name);
        fs::create_dir_all(&path).unwrap();
        path
    }

    pub fn store(&self) -> &Store {
        self.store.as_ref().unwrap()
    }

    /// Mounts the tests' usual view, `live`, of the base; returns it and its mount point.
    pub fn live(&self) -> (View, PathBuf) {
        let view = self.mount("live", None);
        let m = view.mountpoint().to_owned();
        (view, m)
    }

    /// Mounts a view at `name` from `from`.
    pub fn mount(&self, name: &str, from: Option<SnapshotId>) -> View {
        self.store()
            .mount(&self.base, &self.mountpoint(name), from)
            .unwrap()
    }

    pub fn store_dir(&self) -> &Path {
        self.store_dir.path()
    }

    /// Reopens the store (as a restarted daemon would): drops the current one first.
    pub fn reopen(&mut self) {
        // Release the lock before taking it again.
        self.store = None;
        self.store = Some(open_store(self.store_dir.path(), self.plain));
    }
}

fn open_store(dir: &Path, plain: Option<ChunkPolicy>) -> Store {
    match plain {
        Some(policy) => Store::open_with(dir, policy).unwrap(),
        None => Store::open(dir).unwrap(),
    }
}

/// Opens `path` for reading and writing, created empty (truncated if it was there).
pub fn create_rw(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()))
}

/// Writes `bytes` at `at` into the existing file `path` through a fd of its own, closed
/// before returning.
pub fn write_at(path: &Path, at: u64, bytes: &[u8]) {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {} for writing: {e}", path.display()));
    f.write_all_at(bytes, at).unwrap_or_else(|e| {
        panic!(
            "write {} bytes at {at} of {}: {e}",
            bytes.len(),
            path.display()
        )
    });
}

/// Freezes `view` until it keeps no file live, and returns that freeze's report: the
/// kernel's `RELEASE` of a file just closed reaches the daemon after `close` returns, and
/// a freeze keeps a file it still sees open live (not frozen). Polled, up to 5 s, for
/// the tests that need their closed files frozen.
pub fn freeze_closed(view: &View) -> FreezeReport {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let report = view.freeze(&FreezeOpts::default()).unwrap();
        if report.kept_live == 0 {
            return report;
        }
        assert!(
            Instant::now() < deadline,
            "{} still keeps {} closed files live after 5 s",
            view.mountpoint().display(),
            report.kept_live
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A file of `view` (at `path`, holding `content`) that the daemon serves rather than
/// passthrough: written and frozen, then opened for writing while a reader has it open
/// (the copy-up under an open reader). Returns the reader and the writer.
pub fn daemon_served(view: &View, path: &Path, content: &[u8]) -> (File, File) {
    fs::write(path, content).unwrap();
    view.freeze(&FreezeOpts::default()).unwrap(); // now a frozen layer's file
    let reader = File::open(path).unwrap();
    let writer = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    (reader, writer)
}
