//! What a checkpoint writes to the store (its write amplification), and stores written by
//! older builds (format version 1, JSON) re-mounting after a restart. Needs root.

mod common;

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use common::Fixture;
use deltafs::persist::{self, json};
use deltafs::{FreezeOpts, SnapshotId};

fn layer_dir(fx: &Fixture, id: SnapshotId) -> PathBuf {
    fx.store_dir().join("layers").join(id.to_string())
}

/// Bytes of a layer's metadata files on disk.
fn metadata_size(fx: &Fixture, id: SnapshotId) -> u64 {
    persist::METADATA_FILES
        .iter()
        .filter_map(|name| fs::metadata(layer_dir(fx, id).join(name)).ok())
        .map(|m| m.len())
        .sum()
}

/// A checkpoint of 100 changed files (each rewritten, so each has a new backing file and
/// new times) in a state of 3 000 files writes at most 4 KiB, whatever the state size;
/// a restarted daemon mounts it.
#[test]
fn a_freeze_of_100_changed_files_writes_at_most_4_kib() {
    require_root!();
    let mut fx = Fixture::new();
    let (view, m) = fx.live();
    for d in 0..30 {
        fs::create_dir(m.join(format!("d{d}"))).unwrap();
        for f in 0..100 {
            fs::write(m.join(format!("d{d}/f{f}")), b"0123456789").unwrap();
        }
    }
    // Closed files are kept live only while the kernel has not processed their release.
    std::thread::sleep(Duration::from_millis(100));
    let first = view.freeze(&FreezeOpts::default()).unwrap();
    let first_bytes = fx.store().flush().unwrap();
    assert!(first_bytes > 4096 * 10, "{first_bytes}");

    for i in 0..100 {
        fs::write(
            m.join(format!("d{}/f{}", i % 30, i / 30)),
            format!("changed {i}"),
        )
        .unwrap();
    }
    std::thread::sleep(Duration::from_millis(100));
    let second = view.freeze(&FreezeOpts::default()).unwrap();
    assert!(second.changes >= 100, "{second:?}");
    assert_eq!(second.kept_live, 0, "{second:?}");
    assert_eq!(second.copies.bytes_copied, 0, "{second:?}");
    let written = fx.store().flush().unwrap();
    assert!(
        written <= 4096,
        "a freeze of 100 changed files wrote {written} bytes of metadata: {second:?}"
    );
    assert_eq!(metadata_size(&fx, second.id), written);
    eprintln!(
        "freeze of 100 changed files over 3 000: {written} bytes of metadata (first freeze of \
         3 000 new files: {first_bytes})"
    );
    view.unmount().unwrap();

    fx.reopen();
    let after = fx.mount("after", Some(second.id));
    let m = after.mountpoint();
    for i in 0..100 {
        let path = m.join(format!("d{}/f{}", i % 30, i / 30));
        assert_eq!(fs::read_to_string(&path).unwrap(), format!("changed {i}"));
    }
    assert_eq!(fs::read(m.join("d29/f99")).unwrap(), b"0123456789");
    after.switch(first.id).unwrap();
    assert_eq!(fs::read(m.join("d0/f0")).unwrap(), b"0123456789");
    after.unmount().unwrap();
}

/// A store whose layers were written in format version 1 (`layer.json` + `delta.json`)
/// mounts after the upgrade, and new checkpoints stacked on them (written in version 2)
/// mount after a further restart.
#[test]
fn a_store_of_format_version_1_still_mounts() {
    require_root!();
    let mut fx = Fixture::new();
    let (view, m) = fx.live();
    fs::create_dir_all(m.join("proj/src")).unwrap();
    fs::write(m.join("proj/src/lib.rs"), b"v1").unwrap();
    fs::write(m.join("etc/hostname"), b"changed\n").unwrap();
    std::os::unix::fs::symlink("proj", m.join("link")).unwrap();
    let s1 = view.freeze(&FreezeOpts::default()).unwrap().id;
    fs::write(m.join("proj/src/lib.rs"), b"v2").unwrap();
    fs::remove_file(m.join("usr/bin/tool")).unwrap();
    let s2 = view.freeze(&FreezeOpts::default()).unwrap().id;
    view.unmount().unwrap();
    fx.store().flush().unwrap();

    // Rewrite both layers as an older build would have written them.
    for id in [s1, s2] {
        let dir = layer_dir(&fx, id);
        let manifest = persist::read_manifest(&dir).unwrap().unwrap().manifest;
        let record = persist::read_delta(&dir).unwrap();
        json::write_frozen(&dir, &manifest, &record).unwrap();
        fs::remove_file(dir.join(persist::LAYER_FILE)).unwrap();
        let read = persist::read_manifest(&dir).unwrap().unwrap().manifest;
        assert_eq!(read.version, json::VERSION);
    }

    fx.reopen();
    let old = fx.mount("old", Some(s2));
    let m = old.mountpoint().to_owned();
    assert_eq!(fs::read(m.join("proj/src/lib.rs")).unwrap(), b"v2");
    assert!(!m.join("usr/bin/tool").exists());
    assert_eq!(fs::read(m.join("etc/hostname")).unwrap(), b"changed\n");
    fs::write(m.join("proj/new"), b"on top").unwrap();
    let s3 = old.freeze(&FreezeOpts::default()).unwrap().id;
    old.switch(s1).unwrap();
    assert_eq!(fs::read(m.join("proj/src/lib.rs")).unwrap(), b"v1");
    assert!(m.join("usr/bin/tool").exists());
    old.unmount().unwrap();
    fx.store().flush().unwrap();
    assert!(layer_dir(&fx, s3).join(persist::LAYER_FILE).exists());

    fx.reopen();
    let mixed = fx.mount("mixed", Some(s3));
    let m = mixed.mountpoint();
    assert_eq!(fs::read(m.join("proj/new")).unwrap(), b"on top");
    assert_eq!(fs::read(m.join("proj/src/lib.rs")).unwrap(), b"v2");
    assert_eq!(
        fs::read_link(m.join("link")).unwrap(),
        std::path::Path::new("proj")
    );
    mixed.unmount().unwrap();
}

/// Hard links of every kind — a file, a FIFO, a symlink made in the view, a file and a
/// FIFO linked in the base (one copied up, the other linked again and chmodded in the
/// view) — stay one inode each, with their link counts and modes, in a branch from the
/// checkpoint and after a restart.
#[test]
fn hard_links_of_every_kind_survive_a_branch_and_a_restart() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    require_root!();
    let mut fx = Fixture::new();
    let fifo = |path: &std::path::Path, mode| {
        nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(mode)).unwrap()
    };
    fs::hard_link(fx.base.join("etc/hostname"), fx.base.join("etc/hosts")).unwrap();
    fifo(&fx.base.join("bp"), 0o644);
    fs::hard_link(fx.base.join("bp"), fx.base.join("bq")).unwrap();
    let (view, m) = fx.live();
    fs::write(m.join("a"), b"hello").unwrap();
    fs::hard_link(m.join("a"), m.join("b")).unwrap();
    fifo(&m.join("f"), 0o640);
    fs::hard_link(m.join("f"), m.join("g")).unwrap();
    std::os::unix::fs::symlink("a", m.join("s")).unwrap();
    fs::hard_link(m.join("s"), m.join("t")).unwrap();
    fs::write(m.join("etc/hostname"), b"changed\n").unwrap();
    fs::hard_link(m.join("bp"), m.join("c")).unwrap();
    fs::set_permissions(m.join("bq"), fs::Permissions::from_mode(0o600)).unwrap();
    // (names, nlink, mode) of each inode.
    let groups: [(&[&str], u64, u32); 5] = [
        (&["a", "b"], 2, 0o100644),
        (&["f", "g"], 2, 0o10640),
        (&["s", "t"], 2, 0o120777),
        (&["etc/hostname", "etc/hosts"], 2, 0o100644),
        (&["bp", "bq", "c"], 3, 0o10600),
    ];
    let check = |root: &std::path::Path, what: &str| {
        for (names, nlink, mode) in groups {
            let metas: Vec<_> = names
                .iter()
                .map(|n| fs::symlink_metadata(root.join(n)).unwrap())
                .collect();
            for (name, meta) in names.iter().zip(&metas) {
                assert_eq!(
                    meta.ino(),
                    metas[0].ino(),
                    "{what}: {name} and {}",
                    names[0]
                );
                assert_eq!((meta.nlink(), meta.mode()), (nlink, mode), "{what}: {name}");
            }
        }
        assert_eq!(
            fs::read(root.join("etc/hosts")).unwrap(),
            b"changed\n",
            "{what}"
        );
        assert_eq!(fs::read(root.join("t")).unwrap(), b"hello", "{what}");
    };
    check(&m, "live");
    let id = view.freeze(&FreezeOpts::default()).unwrap().id;
    fx.store().flush().unwrap();
    let branch = fx.mount("branch", Some(id));
    check(branch.mountpoint(), "branch");
    branch.unmount().unwrap();
    view.unmount().unwrap();
    fx.reopen();
    let again = fx.mount("again", Some(id));
    check(again.mountpoint(), "after a restart");
    again.unmount().unwrap();
}
