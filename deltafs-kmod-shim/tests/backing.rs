//! `Store::backing_file`: a snapshot's regular file resolved to the backing file that
//! holds its data, before and after the file changes in later snapshots, from the base
//! and from layers, after the store is reopened (as by a restarted daemon), and the
//! errors. Needs root.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::Fixture;
use deltafs::{BackingError, FreezeOpts, SnapshotId, View};

fn freeze(view: &View) -> SnapshotId {
    view.freeze(&FreezeOpts::default()).unwrap().id
}

fn content(fx: &Fixture, id: SnapshotId, path: &str) -> Vec<u8> {
    fs::read(fx.store().backing_file(id, Path::new(path)).unwrap().path).unwrap()
}

#[test]
fn backing_files_hold_each_snapshots_data() {
    require_root!();
    let mut fx = Fixture::new();
    let view = fx.mount("m", None);
    let m = view.mountpoint().to_owned();
    fs::create_dir(m.join("work")).unwrap();
    fs::write(m.join("work/a.txt"), b"one").unwrap();
    let s1 = freeze(&view);
    fs::write(m.join("work/a.txt"), b"two, longer").unwrap();
    fs::write(m.join("etc/hostname"), b"changed\n").unwrap();
    let s2 = freeze(&view);
    let ino_in_view = fs::metadata(m.join("work/a.txt")).unwrap().ino();
    let base_ino_in_view = fs::metadata(m.join("usr/bin/tool")).unwrap().ino();

    // Layer files: each snapshot's own data, and the inode number the view shows.
    assert_eq!(content(&fx, s1, "work/a.txt"), b"one");
    assert_eq!(content(&fx, s2, "/work/a.txt"), b"two, longer");
    let a = fx
        .store()
        .backing_file(s2, Path::new("work/a.txt"))
        .unwrap();
    assert_eq!(a.ino, ino_in_view);
    assert!(a.path.starts_with(fx.store_dir()), "{}", a.path.display());
    // Base files: the base's own file until a snapshot changed it.
    let tool = fx
        .store()
        .backing_file(s2, Path::new("usr/bin/tool"))
        .unwrap();
    assert_eq!(tool.path, fx.base.join("usr/bin/tool"));
    assert_eq!(tool.ino, base_ino_in_view);
    assert_eq!(content(&fx, s1, "etc/hostname"), b"base-host\n");
    assert_eq!(content(&fx, s2, "etc/hostname"), b"changed\n");

    // Writes after the freeze do not reach what s2 resolves to.
    fs::write(m.join("work/a.txt"), b"three").unwrap();
    assert_eq!(content(&fx, s2, "work/a.txt"), b"two, longer");

    // A reopened store (indexes rebuilt from disk, base not read yet) resolves the same.
    drop(view);
    fx.reopen();
    assert_eq!(content(&fx, s1, "work/a.txt"), b"one");
    assert_eq!(content(&fx, s2, "etc/hostname"), b"changed\n");
    let again = fx
        .store()
        .backing_file(s2, Path::new("usr/bin/tool"))
        .unwrap();
    assert_eq!(again, tool);
}

#[test]
fn backing_file_errors_name_the_path() {
    require_root!();
    let fx = Fixture::new();
    let view = fx.mount("m", None);
    fs::write(view.mountpoint().join("f"), b"x").unwrap();
    let s1 = freeze(&view);
    let store = fx.store();
    let missing = store.backing_file(s1, Path::new("no/such")).unwrap_err();
    assert!(
        matches!(missing, BackingError::Lookup { .. }),
        "{missing:?}"
    );
    assert!(missing.to_string().contains("no/such"), "{missing}");
    let dir = store.backing_file(s1, Path::new("usr/bin")).unwrap_err();
    assert!(matches!(dir, BackingError::NotAFile { .. }), "{dir:?}");
    let up = store.backing_file(s1, Path::new("../f")).unwrap_err();
    assert!(matches!(up, BackingError::Lookup { .. }), "{up:?}");
    let through_file = store.backing_file(s1, Path::new("f/x")).unwrap_err();
    assert!(
        matches!(through_file, BackingError::Lookup { .. }),
        "{through_file:?}"
    );
}

/// A chunk-granular copy has no single backing file: `Chunked`, naming the path (the
/// controller then leaves such a mapping on the view).
#[test]
fn a_chunk_granular_copy_has_no_backing_file() {
    require_root!();
    let fx = Fixture::plain(common::small_chunks());
    let view = fx.mount("m", None);
    let f = fs::OpenOptions::new()
        .write(true)
        .open(view.mountpoint().join("big"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"x", 5).unwrap();
    drop(f);
    let s1 = freeze(&view);
    let err = fx.store().backing_file(s1, Path::new("big")).unwrap_err();
    assert!(matches!(err, BackingError::Chunked { .. }), "{err:?}");
    assert!(err.to_string().contains("big"), "{err}");
    // An unchanged base file still resolves to the base's own.
    assert_eq!(content(&fx, s1, "usr/bin/tool"), b"#!/bin/sh\necho tool\n");
}
