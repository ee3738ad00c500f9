//! DESIGN.md invariants 1 (a checkpoint never changes after it is taken) and 2 (branches
//! never see each other), plus restart, garbage collection and the cost of a freeze.
//! Each test fails if the property is broken. Needs root.

mod common;

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;

use common::Fixture;
use common::mmap::SharedMap;
use deltafs::{FreezeOpts, MappedFiles};

const PAGE: usize = 4096;

fn freeze(view: &deltafs::View) -> deltafs::FreezeReport {
    view.freeze(&FreezeOpts::default()).unwrap()
}

/// Writes through every kind of handle opened before a checkpoint — a plain fd, an
/// `O_APPEND` fd, a `MAP_SHARED` mapping whose fd is closed, dirty pages never written
/// back, an fd on a file copied up from the base — then rolls back: the checkpoint's
/// content is intact, seen by the rolled-back view and by a branch from the checkpoint.
#[test]
fn old_handles_never_write_into_a_checkpoint() {
    require_root!();
    let fx = Fixture::new();
    let (view, m) = fx.live();

    let plain = common::create_rw(&m.join("plain"));
    plain.write_all_at(b"AAAA", 0).unwrap();
    let mut append = OpenOptions::new()
        .append(true)
        .create(true)
        .open(m.join("append"))
        .unwrap();
    append.write_all(b"AAAA").unwrap();
    let mapped_fd = common::create_rw(&m.join("mapped"));
    mapped_fd.set_len(PAGE as u64).unwrap();
    let mut mapped = SharedMap::new(&mapped_fd, PAGE);
    mapped.write(0, b"AAAA");
    mapped.sync();
    drop(mapped_fd); // the mapping outlives its fd
    let dirty_fd = common::create_rw(&m.join("dirty"));
    dirty_fd.set_len(PAGE as u64).unwrap();
    let mut dirty = SharedMap::new(&dirty_fd, PAGE);
    dirty.write(0, b"AAAA"); // no msync: dirty in the page cache at the freeze
    drop(dirty_fd);
    let base_fd = OpenOptions::new()
        .write(true)
        .open(m.join("etc/hostname"))
        .unwrap();
    base_fd.write_all_at(b"AAAA", 0).unwrap();

    let report = freeze(&view);
    let checkpoint = report.id;
    assert!(report.kept_live >= 5, "{report:?}");

    // After the checkpoint, every old handle writes.
    plain.write_all_at(b"BBBB", 0).unwrap();
    append.write_all(b"BBBB").unwrap();
    mapped.write(0, b"BBBB");
    mapped.sync();
    dirty.write(0, b"BBBB");
    base_fd.write_all_at(b"BBBB", 0).unwrap();
    assert_eq!(fs::read(m.join("plain")).unwrap(), b"BBBB");
    assert_eq!(fs::read(m.join("append")).unwrap(), b"AAAABBBB");
    assert_eq!(&fs::read(m.join("mapped")).unwrap()[..4], b"BBBB");
    assert_eq!(&fs::read(m.join("dirty")).unwrap()[..4], b"BBBB");

    let expect_checkpoint = |dir: &std::path::Path| {
        assert_eq!(fs::read(dir.join("plain")).unwrap(), b"AAAA");
        assert_eq!(fs::read(dir.join("append")).unwrap(), b"AAAA");
        assert_eq!(&fs::read(dir.join("mapped")).unwrap()[..4], b"AAAA");
        assert_eq!(&fs::read(dir.join("dirty")).unwrap()[..4], b"AAAA");
        assert_eq!(fs::read(dir.join("etc/hostname")).unwrap(), b"AAAA-host\n");
    };
    // A branch from the checkpoint sees it intact.
    let branch = fx.mount("branch", Some(checkpoint));
    expect_checkpoint(branch.mountpoint());

    // Roll back while the old handles are still open; they keep writing, elsewhere.
    let switched = view.switch(checkpoint).unwrap();
    assert!(switched.retired >= 2, "{switched:?}");
    expect_checkpoint(&m);
    // gc removes the writable layer the switch left behind; the old handles keep their
    // files open and go on working.
    let gc = fx.store().gc().unwrap();
    assert!(!gc.removed.is_empty(), "{gc:?}");
    plain.write_all_at(b"CCCC", 0).unwrap();
    // ftruncate and fchmod through an old fd act on the state it was opened in.
    plain.set_len(2).unwrap();
    assert_eq!(plain.metadata().unwrap().len(), 2);
    plain
        .set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .unwrap();
    append.write_all(b"CCCC").unwrap();
    mapped.write(0, b"CCCC");
    mapped.sync();
    dirty.write(0, b"CCCC");
    base_fd.write_all_at(b"CCCC", 0).unwrap();
    dirty.sync();
    expect_checkpoint(&m);
    expect_checkpoint(branch.mountpoint());

    // New writes after the rollback work, and the checkpoint still holds.
    fs::write(m.join("plain"), b"DDDD").unwrap();
    assert_eq!(fs::read(m.join("plain")).unwrap(), b"DDDD");
    view.switch(checkpoint).unwrap();
    expect_checkpoint(&m);

    drop((plain, append, base_fd, mapped, dirty));
    branch.unmount().unwrap();
    view.unmount().unwrap();
}

/// Rolling back to the checkpoint just taken, with the sandbox quiesced in between (so
/// open files did not change): open handles stay connected to the view, as if the
/// rollback had not touched them; a file changed after the checkpoint does not.
#[test]
fn a_rollback_to_the_last_checkpoint_keeps_unchanged_open_files_connected() {
    require_root!();
    let fx = Fixture::new();
    let (view, m) = fx.live();
    let open = |name: &str| common::create_rw(&m.join(name));
    let (quiet, busy) = (open("quiet"), open("busy"));
    quiet.write_all_at(b"AAAA", 0).unwrap();
    busy.write_all_at(b"AAAA", 0).unwrap();
    let checkpoint = freeze(&view).id;
    busy.write_all_at(b"BBBB", 0).unwrap();
    let report = view.switch(checkpoint).unwrap();
    assert_eq!(report.retired, 1, "{report:?}");
    // Unchanged: the old fd writes what the path shows.
    quiet.write_all_at(b"CCCC", 0).unwrap();
    assert_eq!(fs::read(m.join("quiet")).unwrap(), b"CCCC");
    // Changed after the checkpoint: rolled back; the old fd keeps its own state.
    assert_eq!(fs::read(m.join("busy")).unwrap(), b"AAAA");
    busy.write_all_at(b"DDDD", 0).unwrap();
    assert_eq!(fs::read(m.join("busy")).unwrap(), b"AAAA");
    // The checkpoint itself never moved.
    let branch = fx.mount("branch", Some(checkpoint));
    assert_eq!(
        fs::read(branch.mountpoint().join("quiet")).unwrap(),
        b"AAAA"
    );
    assert_eq!(fs::read(branch.mountpoint().join("busy")).unwrap(), b"AAAA");
    drop((quiet, busy));
    branch.unmount().unwrap();
    view.unmount().unwrap();
}

/// A file open for reading from the base (daemon-served) while another open writes it
/// (copy-up): the reader sees the writer's data, and the checkpoint before keeps the old.
#[test]
fn copy_up_under_an_open_reader_and_old_readers_after_switch() {
    require_root!();
    let fx = Fixture::new();
    let (view, m) = fx.live();
    let checkpoint = freeze(&view).id;

    let reader = fs::File::open(m.join("etc/hostname")).unwrap();
    let mut buf = [0u8; 9];
    reader.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"base-host");
    let writer = OpenOptions::new()
        .write(true)
        .open(m.join("etc/hostname"))
        .unwrap();
    writer.write_all_at(b"new", 0).unwrap();
    reader.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"newe-host");
    drop(writer);

    view.switch(checkpoint).unwrap();
    assert_eq!(fs::read(m.join("etc/hostname")).unwrap(), b"base-host\n");
    drop(reader);
    view.unmount().unwrap();
}

/// A held file that the other side of a `RENAME_EXCHANGE` moved, changed after a
/// checkpoint, then rolled back: its new name shows the checkpoint, to `stat` too. Fails
/// when the exchange does not record the kernel's entry for that name (the switch then
/// left it on the retired node id: `stat` gave the held write's size and old `st_ino`).
#[test]
fn a_rollback_drops_the_entry_an_exchange_gave_a_held_file() {
    use std::os::unix::fs::MetadataExt;
    require_root!();
    let fx = Fixture::new();
    let (view, m) = fx.live();
    fs::write(m.join("a"), b"aaaa").unwrap();
    fs::write(m.join("b"), b"bbbb").unwrap();
    let held = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.join("a"))
        .unwrap();
    // `b` onto `a`: the held file is the destination, and now named `b`.
    nix::fcntl::renameat2(
        nix::fcntl::AT_FDCWD,
        &m.join("b"),
        nix::fcntl::AT_FDCWD,
        &m.join("a"),
        nix::fcntl::RenameFlags::RENAME_EXCHANGE,
    )
    .unwrap();
    let id = freeze(&view).id;
    held.write_all_at(b"XYZW", 2).unwrap();
    view.switch(id).unwrap();
    // No listing first: a `READDIRPLUS` would refresh the kernel's entries.
    let meta = fs::metadata(m.join("b")).unwrap();
    assert_eq!(meta.len(), 4, "stat of b after the rollback");
    assert_ne!(meta.ino(), held.metadata().unwrap().ino());
    assert_eq!(fs::read(m.join("b")).unwrap(), b"aaaa");
    assert_eq!(fs::read(m.join("a")).unwrap(), b"bbbb");
    drop(held);
    view.unmount().unwrap();
}

/// A `MAP_SHARED` mapping of a daemon-served file (opened for writing while a reader had
/// it open, so copied up and served by the daemon, not passthrough): its pages live in
/// the FUSE page cache until the kernel writes them back to the daemon. Written, then a
/// freeze without `msync` or `munmap`: the checkpoint has the bytes, and later writes
/// through the mapping stay out of it. Fails when the freeze does not make the kernel
/// write those pages back first.
#[test]
fn dirty_pages_of_a_daemon_served_mapping_are_in_the_checkpoint() {
    require_root!();
    let fx = Fixture::new();
    let (view, m) = fx.live();
    let (reader, writer) = common::daemon_served(&view, &m.join("shared"), &[b'.'; PAGE]);
    let mut map = SharedMap::new(&writer, PAGE);
    drop(writer); // the mapping outlives its fd
    map.write(0, b"AAAA");
    map.write(PAGE - 4, b"ZZZZ");
    let checkpoint = freeze(&view).id;
    map.write(0, b"BBBB");
    map.sync();
    assert_eq!(&fs::read(m.join("shared")).unwrap()[..4], b"BBBB");

    let expect_checkpoint = |dir: &std::path::Path| {
        let data = fs::read(dir.join("shared")).unwrap();
        assert_eq!(&data[..4], b"AAAA", "the mapping's bytes before the freeze");
        assert_eq!(&data[PAGE - 4..], b"ZZZZ");
    };
    let branch = fx.mount("branch", Some(checkpoint));
    expect_checkpoint(branch.mountpoint());
    view.switch(checkpoint).unwrap();
    expect_checkpoint(&m);
    map.write(0, b"CCCC");
    map.sync();
    expect_checkpoint(&m);
    expect_checkpoint(branch.mountpoint());
    drop((map, reader));
    branch.unmount().unwrap();
    view.unmount().unwrap();
}

/// Two views over one snapshot never see each other's writes (invariant 2).
#[test]
fn branches_never_see_each_other() {
    require_root!();
    let fx = Fixture::new();
    let view = fx.mount("root", None);
    fs::write(view.mountpoint().join("shared"), b"origin").unwrap();
    let snapshot = freeze(&view).id;
    let a = fx.mount("a", Some(snapshot));
    let b = fx.mount("b", Some(snapshot));
    fs::write(a.mountpoint().join("shared"), b"from a").unwrap();
    fs::write(b.mountpoint().join("shared"), b"from b").unwrap();
    fs::write(a.mountpoint().join("only-a"), b"a").unwrap();
    fs::remove_file(b.mountpoint().join("etc/hostname")).unwrap();
    assert_eq!(fs::read(a.mountpoint().join("shared")).unwrap(), b"from a");
    assert_eq!(fs::read(b.mountpoint().join("shared")).unwrap(), b"from b");
    assert_eq!(
        fs::read(view.mountpoint().join("shared")).unwrap(),
        b"origin"
    );
    assert!(!b.mountpoint().join("only-a").exists());
    assert!(a.mountpoint().join("etc/hostname").exists());
    // Freezes of one branch do not move the other.
    let a1 = freeze(&a).id;
    fs::write(a.mountpoint().join("shared"), b"a again").unwrap();
    b.switch(a1).unwrap();
    assert_eq!(fs::read(b.mountpoint().join("shared")).unwrap(), b"from a");
    assert_eq!(fs::read(a.mountpoint().join("shared")).unwrap(), b"a again");
    for v in [a, b, view] {
        v.unmount().unwrap();
    }
}

/// A restarted daemon re-mounts snapshots from their on-disk metadata.
#[test]
fn snapshots_survive_a_restart() {
    require_root!();
    let mut fx = Fixture::new();
    let (view, m) = fx.live();
    fs::create_dir_all(m.join("proj/src")).unwrap();
    fs::write(m.join("proj/src/lib.rs"), b"v1").unwrap();
    fs::write(m.join("etc/hostname"), b"changed\n").unwrap();
    std::os::unix::fs::symlink("proj", m.join("link")).unwrap();
    let s1 = freeze(&view).id;
    fs::write(m.join("proj/src/lib.rs"), b"v2").unwrap();
    fs::remove_file(m.join("usr/bin/tool")).unwrap();
    let s2 = freeze(&view).id;
    view.unmount().unwrap();

    fx.reopen();
    let v2 = fx.mount("after", Some(s2));
    let m = v2.mountpoint();
    assert_eq!(fs::read(m.join("proj/src/lib.rs")).unwrap(), b"v2");
    assert!(!m.join("usr/bin/tool").exists());
    assert_eq!(fs::read(m.join("etc/hostname")).unwrap(), b"changed\n");
    v2.switch(s1).unwrap();
    assert_eq!(fs::read(m.join("proj/src/lib.rs")).unwrap(), b"v1");
    assert!(m.join("usr/bin/tool").exists());
    assert_eq!(
        fs::read_link(m.join("link")).unwrap(),
        std::path::Path::new("proj")
    );
    v2.unmount().unwrap();
}

/// Dropping every snapshot and unmounting gives back every layer directory.
#[test]
fn gc_removes_what_nothing_references() {
    require_root!();
    let fx = Fixture::new();
    let before = fx.store().disk_usage();
    let (view, m) = fx.live();
    let mut ids = Vec::new();
    for i in 0..5 {
        fs::write(m.join(format!("f{i}")), vec![i as u8; 64 << 10]).unwrap();
        ids.push(freeze(&view).id);
    }
    // Dropped snapshots under the view's state stay: the view needs their layers.
    for id in &ids {
        fx.store().drop_snapshot(*id).unwrap();
    }
    let report = fx.store().gc().unwrap();
    assert!(report.removed.is_empty(), "{report:?}");
    assert!(view.switch(ids[0]).is_err());
    view.unmount().unwrap();
    let report = fx.store().gc().unwrap();
    assert_eq!(report.kept, 0, "{report:?}");
    assert!(fx.store().snapshots().is_empty());
    assert!(
        fx.store().disk_usage() <= before,
        "{} > {before}",
        fx.store().disk_usage()
    );
}

/// A freeze writes O(changes) of metadata, not O(state): with 2 000 files in the state and
/// one changed, it writes at most 4 KiB.
#[test]
fn freeze_writes_little_whatever_the_state_size() {
    require_root!();
    let fx = Fixture::new();
    let (view, m) = fx.live();
    fs::create_dir(m.join("tree")).unwrap();
    for i in 0..2000 {
        fs::write(m.join(format!("tree/f{i}")), b"x").unwrap();
    }
    // Every file had a writable passthrough open, all are closed and none is mapped: the
    // lease probe keeps none of them live. (The kernel drops a passthrough backing file
    // only once our reply to its RELEASE is processed: a file closed a moment before the
    // freeze may still look in use and be kept, which is safe; let releases settle.)
    std::thread::sleep(std::time::Duration::from_millis(100));
    let first = view.freeze(&FreezeOpts::default()).unwrap();
    assert!(first.changes >= 2000);
    assert_eq!(first.kept_live, 0, "{first:?}");
    let first_bytes = fx.store().flush().unwrap();
    assert!(first_bytes > 4096 * 10, "{first_bytes}");
    fs::write(m.join("tree/f7"), b"y").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(100));
    let second = view
        .freeze(&FreezeOpts {
            mapped: MappedFiles::AllProcesses,
        })
        .unwrap();
    assert_eq!(second.kept_live, 0, "{second:?}");
    let second_bytes = fx.store().flush().unwrap();
    assert!(second_bytes <= 4096, "{second_bytes} bytes: {second:?}");
    assert_eq!(second.kept_live, 0, "{second:?}");
    let empty = view.freeze(&FreezeOpts::default()).unwrap();
    let empty_bytes = fx.store().flush().unwrap();
    assert!(empty_bytes <= 4096, "{empty_bytes} bytes: {empty:?}");
    eprintln!(
        "freeze of 1 change over 2000 files: {second_bytes} bytes, {second:?}; empty \
         freeze: {empty_bytes} bytes, {empty:?}"
    );
    view.unmount().unwrap();
}

/// On a store that can reflink, a 1-byte write into a large frozen file copies nothing:
/// the copy-up is a clone (blocks shared) and costs milliseconds.
#[test]
fn a_small_write_into_a_large_frozen_file_copies_nothing() {
    require_root!();
    let fx = Fixture::new();
    if !fx.store().reflink() {
        eprintln!("skipped: the store cannot reflink (tests/chunks.rs covers copy-ups there)");
        return;
    }
    let (view, m) = fx.live();
    let chunk = vec![0xa5u8; 1 << 20];
    let mut f = fs::File::create(m.join("large")).unwrap();
    for _ in 0..256 {
        f.write_all(&chunk).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    let checkpoint = common::freeze_closed(&view).id;
    fx.store().flush().unwrap();
    nix::unistd::sync();
    // Free space of the store's filesystem: `st_blocks` counts shared (reflinked) extents
    // once per file, so only the filesystem's own count shows what a clone allocated.
    let used = || {
        let st = nix::sys::statvfs::statvfs(fx.store_dir()).unwrap();
        (st.blocks() - st.blocks_free()) * st.fragment_size()
    };
    let before = used();
    let start = std::time::Instant::now();
    let f = OpenOptions::new()
        .write(true)
        .open(m.join("large"))
        .unwrap();
    f.write_all_at(b"!", 12345).unwrap();
    let elapsed = start.elapsed();
    f.sync_all().unwrap();
    drop(f);
    nix::unistd::sync();
    let grown = used().saturating_sub(before);
    eprintln!("1-byte write into a frozen 256 MiB file: {elapsed:?}, store grew {grown} bytes");
    // Other tests may write to the same filesystem meanwhile: far below the 256 MiB a
    // full copy takes is what counts.
    assert!(grown < 32 << 20, "the copy-up wrote {grown} bytes");
    view.switch(checkpoint).unwrap();
    let mut byte = [0u8; 1];
    fs::File::open(m.join("large"))
        .unwrap()
        .read_exact_at(&mut byte, 12345)
        .unwrap();
    assert_eq!(byte, [0xa5]);
    view.unmount().unwrap();
}
