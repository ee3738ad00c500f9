//! `Store::diff` between snapshots (consecutive, not, across a branch point, from the
//! base, with itself, errors) and `Store::snapshot_bytes`, through a mounted view. Every
//! expected list is written out in full: a missing or extra change fails. Needs root.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};

use common::Fixture;
use deltafs::{Change, ChangeKind, Changed, FileType, FreezeOpts, SnapshotId, StoreError, View};

fn freeze(view: &View) -> SnapshotId {
    view.freeze(&FreezeOpts::default()).unwrap().id
}

/// The diff, checked to be sorted by path.
fn diff(fx: &Fixture, from: Option<SnapshotId>, to: SnapshotId) -> Vec<Change> {
    let changes = fx.store().diff(from, to).unwrap();
    let paths: Vec<_> = changes
        .iter()
        .map(|c| c.path.as_os_str().to_owned())
        .collect();
    assert!(paths.is_sorted(), "not sorted: {paths:?}");
    changes
}

fn added(path: &str, file_type: FileType) -> Change {
    Change {
        path: path.into(),
        kind: ChangeKind::Added,
        file_type,
        changed: Changed::default(),
    }
}

fn removed(path: &str, file_type: FileType) -> Change {
    Change {
        kind: ChangeKind::Removed,
        ..added(path, file_type)
    }
}

fn modified(path: &str, file_type: FileType, changed: Changed) -> Change {
    Change {
        kind: ChangeKind::Modified,
        changed,
        ..added(path, file_type)
    }
}

const CONTENT: Changed = Changed {
    content: true,
    mode: false,
    owner: false,
    target: false,
    xattrs: false,
};

fn only(f: impl FnOnce(&mut Changed)) -> Changed {
    let mut changed = Changed::default();
    f(&mut changed);
    changed
}

/// Writes, modifies, deletes, renames, chmods, chowns and re-targets files over three
/// checkpoints and checks every consecutive and non-consecutive diff, and from the base.
#[test]
fn diff_lists_what_changed_between_snapshots() {
    require_root!();
    let fx = Fixture::new();
    let view = fx.mount("m", None);
    let m = view.mountpoint().to_owned();

    fs::create_dir(m.join("work")).unwrap();
    fs::write(m.join("work/a.py"), b"print(1)\n").unwrap();
    symlink("a.py", m.join("work/link")).unwrap();
    let s1 = freeze(&view);
    assert_eq!(
        diff(&fx, None, s1),
        [
            added("/work", FileType::Dir),
            added("/work/a.py", FileType::File),
            added("/work/link", FileType::Symlink),
        ]
    );

    fs::write(m.join("work/a.py"), b"print(2)\n").unwrap();
    fs::set_permissions(m.join("usr/bin/tool"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::remove_file(m.join("etc/hostname")).unwrap();
    std::os::unix::fs::chown(m.join("big"), Some(1000), Some(1000)).unwrap();
    fs::remove_file(m.join("work/link")).unwrap();
    symlink("b.py", m.join("work/link")).unwrap();
    // Changed and changed back: the mode is compared by value, so not reported.
    fs::set_permissions(m.join("work"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::set_permissions(m.join("work"), fs::Permissions::from_mode(0o755)).unwrap();
    // Let the kernel's asynchronous release of a.py arrive: a file still open at a freeze
    // is kept live, which the next epoch records as a change of its data.
    std::thread::sleep(std::time::Duration::from_millis(100));
    let s2 = freeze(&view);
    let s1_s2 = [
        modified("/big", FileType::File, only(|c| c.owner = true)),
        removed("/etc/hostname", FileType::File),
        modified("/usr/bin/tool", FileType::File, only(|c| c.mode = true)),
        modified("/work/a.py", FileType::File, CONTENT),
        modified("/work/link", FileType::Symlink, only(|c| c.target = true)),
    ];
    assert_eq!(diff(&fx, Some(s1), s2), s1_s2);

    // A directory renamed: the directory itself is removed and added; a file added in it
    // is listed under the new name.
    fs::rename(m.join("work"), m.join("proj")).unwrap();
    fs::write(m.join("proj/b.txt"), b"b\n").unwrap();
    let s3 = freeze(&view);
    assert_eq!(
        diff(&fx, Some(s2), s3),
        [
            added("/proj", FileType::Dir),
            added("/proj/b.txt", FileType::File),
            removed("/work", FileType::Dir),
        ]
    );
    // Non-consecutive: changes inside the renamed directory are listed under its new
    // name (a.py's name was made before s1; the diff finds it in s1's delta).
    assert_eq!(
        diff(&fx, Some(s1), s3),
        [
            modified("/big", FileType::File, only(|c| c.owner = true)),
            removed("/etc/hostname", FileType::File),
            added("/proj", FileType::Dir),
            modified("/proj/a.py", FileType::File, CONTENT),
            added("/proj/b.txt", FileType::File),
            modified("/proj/link", FileType::Symlink, only(|c| c.target = true)),
            modified("/usr/bin/tool", FileType::File, only(|c| c.mode = true)),
            removed("/work", FileType::Dir),
        ]
    );
    // Backwards: the same paths, added and removed swapped, modifications seen in `s1`.
    let back = diff(&fx, Some(s3), s1);
    assert_eq!(
        back.iter()
            .map(|c| (c.path.to_str().unwrap(), c.kind))
            .collect::<Vec<_>>(),
        [
            ("/big", ChangeKind::Modified),
            ("/etc/hostname", ChangeKind::Added),
            ("/proj", ChangeKind::Removed),
            ("/proj/b.txt", ChangeKind::Removed),
            ("/usr/bin/tool", ChangeKind::Modified),
            ("/work", ChangeKind::Added),
            ("/work/a.py", ChangeKind::Modified),
            ("/work/link", ChangeKind::Modified),
        ]
    );
    // From the base: what the sandbox did overall.
    assert_eq!(
        diff(&fx, None, s3),
        [
            modified("/big", FileType::File, only(|c| c.owner = true)),
            removed("/etc/hostname", FileType::File),
            added("/proj", FileType::Dir),
            added("/proj/a.py", FileType::File),
            added("/proj/b.txt", FileType::File),
            added("/proj/link", FileType::Symlink),
            modified("/usr/bin/tool", FileType::File, only(|c| c.mode = true)),
        ]
    );
    for s in [s1, s2, s3] {
        assert_eq!(diff(&fx, Some(s), s), Vec::<Change>::new());
    }
    // The JSON shape other components read.
    let json = serde_json::to_value(&s1_s2[4]).unwrap();
    assert_eq!(
        json,
        serde_json::json!({
            "path": "/work/link", "kind": "modified", "file_type": "symlink",
            "changed": {"content": false, "mode": false, "owner": false, "target": true,
                        "xattrs": false},
        })
    );
    assert_eq!(
        serde_json::from_value::<Change>(json).unwrap(),
        s1_s2[4].clone()
    );
    view.unmount().unwrap();
}

/// Two views from one snapshot change different things; the diff of the two leaves goes
/// through the branch point and shows both sides.
#[test]
fn diff_across_a_branch_point() {
    require_root!();
    let fx = Fixture::new();
    let root = fx.mount("root", None);
    fs::write(root.mountpoint().join("shared"), b"0").unwrap();
    let fork = freeze(&root);
    root.unmount().unwrap();

    let left = fx.mount("left", Some(fork));
    let right = fx.mount("right", Some(fork));
    fs::write(left.mountpoint().join("x"), b"left").unwrap();
    fs::write(left.mountpoint().join("shared"), b"1").unwrap();
    let l1 = freeze(&left);
    fs::create_dir(left.mountpoint().join("only-left")).unwrap();
    let l2 = freeze(&left);
    fs::write(right.mountpoint().join("usr/bin/tool"), b"#!/bin/sh\n").unwrap();
    fs::remove_file(right.mountpoint().join("shared")).unwrap();
    let r1 = freeze(&right);

    assert_eq!(
        diff(&fx, Some(l2), r1),
        [
            removed("/only-left", FileType::Dir),
            removed("/shared", FileType::File),
            modified("/usr/bin/tool", FileType::File, CONTENT),
            removed("/x", FileType::File),
        ]
    );
    assert_eq!(
        diff(&fx, Some(r1), l1),
        [
            added("/shared", FileType::File),
            modified("/usr/bin/tool", FileType::File, CONTENT),
            added("/x", FileType::File),
        ]
    );
    // A descendant to its ancestor.
    assert_eq!(
        diff(&fx, Some(l2), fork),
        [
            removed("/only-left", FileType::Dir),
            modified("/shared", FileType::File, CONTENT),
            removed("/x", FileType::File),
        ]
    );
    left.unmount().unwrap();
    right.unmount().unwrap();
}

/// Unknown and dropped snapshots and snapshots over different bases are refused with
/// messages naming them.
#[test]
fn diff_refuses_unknown_dropped_and_foreign_snapshots() {
    require_root!();
    let fx = Fixture::new();
    let view = fx.mount("m", None);
    fs::write(view.mountpoint().join("f"), b"1").unwrap();
    let s1 = freeze(&view);
    let s2 = freeze(&view);
    let unknown = SnapshotId::of_layer(deltafs::LayerId::generate());
    for (from, to) in [(Some(unknown), s1), (Some(s1), unknown), (None, unknown)] {
        let err = fx.store().diff(from, to).unwrap_err();
        assert!(
            matches!(err, StoreError::UnknownSnapshot(id) if id == unknown),
            "{err}"
        );
        assert!(err.to_string().contains(&unknown.to_string()), "{err}");
    }
    let err = fx.store().snapshot_bytes(unknown).unwrap_err();
    assert!(
        matches!(err, StoreError::UnknownSnapshot(id) if id == unknown),
        "{err}"
    );

    fx.store().drop_snapshot(s1).unwrap();
    let err = fx.store().diff(Some(s1), s2).unwrap_err();
    assert!(matches!(err, StoreError::Dropped(id) if id == s1), "{err}");
    // Its child still diffs from the base (the dropped layer is kept for it).
    assert_eq!(diff(&fx, None, s2), [added("/f", FileType::File)]);

    let other_base = fx.base.with_file_name("other-base");
    fs::create_dir_all(&other_base).unwrap();
    let other = fx
        .store()
        .mount(&other_base, &fx.mountpoint("other"), None)
        .unwrap();
    fs::write(other.mountpoint().join("g"), b"2").unwrap();
    let o1 = freeze(&other);
    let err = fx.store().diff(Some(o1), s2).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Diff(deltafs::DiffError::DifferentBases { .. })
        ),
        "{err}"
    );
    let text = err.to_string();
    assert!(
        text.contains(&o1.to_string()) && text.contains(&s2.to_string()),
        "{text}"
    );
    other.unmount().unwrap();
    view.unmount().unwrap();
}

/// A base of many files, one changed: the diff has exactly that one entry, and it reads
/// no base directory off the changed path — the access times of a base subtree nobody
/// looked into stay as they were (and do change when it is read: checked last).
#[test]
fn diff_of_one_change_in_a_large_base_reads_only_that_path() {
    require_root!();
    let fx = Fixture::new();
    let data = fx.base.join("data");
    fs::create_dir_all(&data).unwrap();
    for i in 0..3000 {
        fs::write(data.join(format!("f{i:04}")), b"x").unwrap();
    }
    let other = ["other", "other/deep", "other/deep/er"].map(|d| fx.base.join(d));
    fs::create_dir_all(&other[2]).unwrap();
    for dir in &other {
        for i in 0..100 {
            fs::write(dir.join(format!("g{i}")), b"y").unwrap();
        }
    }
    let atimes = || {
        other.each_ref().map(|d| {
            fs::metadata(d)
                .map(|m| (m.atime(), m.atime_nsec()))
                .unwrap()
        })
    };
    let atimes_before = atimes();
    let view = fx.mount("m", None);
    let m = view.mountpoint().to_owned();
    assert_eq!(fs::read_dir(m.join("data")).unwrap().count(), 3000);
    let s1 = freeze(&view);
    fs::write(m.join("data/f1234"), b"changed").unwrap();
    let s2 = freeze(&view);

    let one = [modified("/data/f1234", FileType::File, CONTENT)];
    assert_eq!(diff(&fx, Some(s1), s2), one);
    assert_eq!(diff(&fx, None, s2), one);
    assert_eq!(diff(&fx, Some(s2), s1), one);
    assert_eq!(diff(&fx, None, s1), Vec::<Change>::new());
    view.unmount().unwrap();
    assert_eq!(
        atimes(),
        atimes_before,
        "a base directory off the path was read"
    );
    // The check can see a read (the base's filesystem records access times).
    fs::read_dir(&other[2]).unwrap().for_each(drop);
    assert_ne!(
        atimes()[2],
        atimes_before[2],
        "reads do not change atime here"
    );
}

/// A snapshot owns the bytes its epoch wrote: 1 MiB written, at least 1 MiB; an epoch
/// that only changed metadata owns little (its metadata files).
#[test]
fn snapshot_bytes_count_what_the_epoch_wrote() {
    require_root!();
    let fx = Fixture::new();
    let view = fx.mount("m", None);
    let m = view.mountpoint().to_owned();
    let mib: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    fs::write(m.join("blob"), &mib).unwrap();
    let data = freeze(&view);
    // The kernel releases the written file asynchronously: a freeze that sees it still
    // open keeps it live, moving it into the next epoch's layer (and cloning it into the
    // frozen one). Freeze until nothing is kept, so the metadata epoch starts clean.
    for _ in 0..100 {
        std::thread::sleep(std::time::Duration::from_millis(20));
        if view.freeze(&FreezeOpts::default()).unwrap().kept_live == 0 {
            break;
        }
    }
    fs::set_permissions(m.join("blob"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::create_dir(m.join("empty")).unwrap();
    let meta = freeze(&view);
    fx.store().flush().unwrap();

    let data_bytes = fx.store().snapshot_bytes(data).unwrap();
    let meta_bytes = fx.store().snapshot_bytes(meta).unwrap();
    assert!(data_bytes >= 1 << 20, "{data_bytes}");
    assert!(data_bytes < 4 << 20, "{data_bytes}");
    assert!(meta_bytes > 0, "metadata files are counted: {meta_bytes}");
    assert!(meta_bytes <= 64 << 10, "{meta_bytes}");
    // The store's whole usage includes both.
    assert!(fx.store().disk_usage() >= data_bytes + meta_bytes);
    view.unmount().unwrap();
}

/// After a restart the snapshots' indexes are rebuilt from their deltas and the base is
/// read afresh: the diff finds names through the deltas (newest first) and base paths.
/// A base file whose data changed in place is named through its directory when the
/// chain changed any entry there (rebuilding the index reads that directory; else it
/// cannot be: see docs/deltafs.md, "Diff and bytes").
#[test]
fn diff_after_a_restart_rebuilds_from_the_deltas() {
    require_root!();
    let mut fx = Fixture::new();
    let (s1, s2, s3) = {
        let view = fx.mount("m", None);
        let m = view.mountpoint().to_owned();
        fs::create_dir_all(m.join("src/deep")).unwrap();
        fs::write(m.join("src/deep/lib.rs"), b"v1").unwrap();
        let s1 = freeze(&view);
        fs::write(m.join("src/deep/lib.rs"), b"v2").unwrap();
        // In place, in a directory where something else was created in the chain.
        fs::write(m.join("usr/bin/tool"), b"#!/bin/sh\n").unwrap();
        fs::write(m.join("usr/bin/new"), b"").unwrap();
        fs::set_permissions(m.join("etc/hostname"), fs::Permissions::from_mode(0o600)).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(100));
        let s2 = freeze(&view);
        fs::remove_file(m.join("usr/bin/tool")).unwrap();
        fs::rename(m.join("big"), m.join("src/big")).unwrap();
        let s3 = freeze(&view);
        view.unmount().unwrap();
        (s1, s2, s3)
    };
    fx.reopen();
    assert_eq!(
        diff(&fx, Some(s1), s3),
        [
            removed("/big", FileType::File),
            modified("/etc/hostname", FileType::File, only(|c| c.mode = true)),
            added("/src/big", FileType::File),
            modified("/src/deep/lib.rs", FileType::File, CONTENT),
            added("/usr/bin/new", FileType::File),
            removed("/usr/bin/tool", FileType::File),
        ]
    );
    assert_eq!(
        diff(&fx, None, s2),
        [
            modified("/etc/hostname", FileType::File, only(|c| c.mode = true)),
            added("/src", FileType::Dir),
            added("/src/deep", FileType::Dir),
            added("/src/deep/lib.rs", FileType::File),
            added("/usr/bin/new", FileType::File),
            modified("/usr/bin/tool", FileType::File, CONTENT),
        ]
    );
    assert_eq!(
        diff(&fx, Some(s1), s2),
        [
            modified("/etc/hostname", FileType::File, only(|c| c.mode = true)),
            modified("/src/deep/lib.rs", FileType::File, CONTENT),
            added("/usr/bin/new", FileType::File),
            modified("/usr/bin/tool", FileType::File, CONTENT),
        ]
    );
}
