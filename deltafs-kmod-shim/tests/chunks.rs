//! Chunk-granular copy-up (`deltafs::chunks`), on a store without reflink (a plain
//! directory of the scratch filesystem, ext4 here) and for base files on another
//! filesystem than the store. Needs root.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use common::Fixture;
use deltafs::{ChunkPolicy, FreezeOpts, OpKind, SnapshotId, StatsSnapshot, View};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// Where the 1 GiB file holds data (1 MiB each, a pattern that differs per MiB); the
/// rest is a hole.
const ISLANDS: [u64; 3] = [0, 512 * MIB, GIB - MIB];

fn pattern(at: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| ((at + i) / 4096 % 251) as u8 + 1)
        .collect()
}

/// Writes the sparse 1 GiB file `name` into the view and freezes until it is frozen
/// (closed files only: the kernel's `RELEASE` comes after `close` returns).
fn frozen_gib(view: &View, name: &str) -> SnapshotId {
    let path = view.mountpoint().join(name);
    let f = File::create(&path).unwrap();
    for at in ISLANDS {
        f.write_all_at(&pattern(at, MIB as usize), at).unwrap();
    }
    f.set_len(GIB).unwrap();
    drop(f);
    common::freeze_closed(view).id
}

/// The bytes `[at, at + len)` of `path`.
fn read_at(path: &Path, at: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, at)
        .unwrap();
    buf
}

/// The 1 GiB file as frozen, checked at the edges of every island and in the hole, with
/// `writes` applied.
fn check_gib(path: &Path, writes: &[(u64, u8)]) {
    assert_eq!(fs::metadata(path).unwrap().len(), GIB, "{}", path.display());
    let mut spots: Vec<u64> = ISLANDS
        .iter()
        .flat_map(|&at| [at, at + MIB - 4096])
        .chain([MIB, 100 * MIB, GIB - 2 * MIB])
        .collect();
    spots.extend(writes.iter().map(|&(at, _)| at - at % 4096));
    for at in spots {
        let mut want = if ISLANDS.iter().any(|&i| (i..i + MIB).contains(&at)) {
            pattern(at, 4096)
        } else {
            vec![0; 4096]
        };
        for &(w, byte) in writes {
            if (at..at + 4096).contains(&w) {
                want[(w - at) as usize] = byte;
            }
        }
        assert_eq!(read_at(path, at, 4096), want, "{} at {at}", path.display());
    }
}

fn stats_delta(before: &StatsSnapshot, after: &StatsSnapshot) -> (u64, u64, u64) {
    (
        after.copy_ups_copy - before.copy_ups_copy,
        after.copy_ups_chunked - before.copy_ups_chunked,
        after.copy_up_bytes - before.copy_up_bytes,
    )
}

/// The case: a 1-byte write into a frozen 1 GiB file on a store without reflink
/// copies at most one chunk; every view, the snapshot, a branch, a restart and a squash
/// all show the right bytes.
#[test]
fn a_one_byte_write_into_a_frozen_gib_copies_one_chunk() {
    require_root!();
    let mut fx = Fixture::plain(ChunkPolicy::default());
    let chunk = fx.store().chunk_policy().chunk;
    let (view, m) = fx.live();
    let frozen = frozen_gib(&view, "gib");
    fx.store().flush().unwrap();
    let disk_before = fx.store().disk_usage();

    let before = fx.store().stats();
    let at = 512 * MIB + 300_001;
    common::write_at(&m.join("gib"), at, b"!");
    let after = fx.store().stats();
    let (copies, chunked, bytes) = stats_delta(&before, &after);
    assert_eq!((copies, chunked), (1, 1), "{after:?}");
    assert!(bytes <= chunk, "a 1-byte write copied {bytes} bytes");
    assert!(bytes > 0, "the chunk held data: it had to be copied");
    let grown = fx.store().disk_usage() - disk_before;
    assert!(grown <= chunk + 64 * 1024, "the store grew {grown} bytes");
    eprintln!("1-byte write into a frozen 1 GiB file: {bytes} bytes copied, store grew {grown}");
    check_gib(&m.join("gib"), &[(at, b'!')]);
    // `st_blocks` counts the data below too (3 MiB), not only the chunk this layer holds.
    let blocks = std::os::unix::fs::MetadataExt::blocks(&fs::metadata(m.join("gib")).unwrap());
    assert!(blocks * 512 >= 3 * MIB, "{blocks} blocks");
    assert!(
        blocks * 512 <= 3 * MIB + 2 * chunk + 64 * 1024,
        "{blocks} blocks"
    );

    // Invariant 1: the snapshot is unchanged; invariant 2: a branch does not see it.
    let branch = fx.mount("branch", Some(frozen));
    check_gib(&branch.mountpoint().join("gib"), &[]);
    // A write in the branch stays there.
    common::write_at(&branch.mountpoint().join("gib"), at, b"?");
    check_gib(&branch.mountpoint().join("gib"), &[(at, b'?')]);
    check_gib(&m.join("gib"), &[(at, b'!')]);

    // Freeze, write again on top (a chain of two), roll back, roll forward.
    let one = view.freeze(&FreezeOpts::default()).unwrap().id;
    // The diff sees the chunk-granular copy as a content change, and nothing else.
    let changes = fx.store().diff(Some(frozen), one).unwrap();
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert_eq!(changes[0].path, Path::new("/gib"));
    assert!(changes[0].changed.content, "{changes:?}");
    let at2 = 3;
    common::write_at(&m.join("gib"), at2, b"#");
    check_gib(&m.join("gib"), &[(at, b'!'), (at2, b'#')]);
    let two = view.freeze(&FreezeOpts::default()).unwrap().id;
    view.switch(one).unwrap();
    check_gib(&m.join("gib"), &[(at, b'!')]);
    view.switch(frozen).unwrap();
    check_gib(&m.join("gib"), &[]);
    view.switch(two).unwrap();
    check_gib(&m.join("gib"), &[(at, b'!'), (at2, b'#')]);
    branch.unmount().unwrap();
    view.unmount().unwrap();

    // After a restart every snapshot reads the same (the records are in layer.bin).
    fx.reopen();
    for (id, writes) in [
        (frozen, vec![]),
        (one, vec![(at, b'!')]),
        (two, vec![(at, b'!'), (at2, b'#')]),
    ] {
        let v = fx.mount("again", Some(id));
        check_gib(&v.mountpoint().join("gib"), &writes);
        v.unmount().unwrap();
    }

    // Squash `one` into `two`: `two` keeps its bytes, and the chain's files survive gc.
    fx.store().drop_snapshot(one).unwrap();
    let report = fx.store().squash(two).unwrap();
    assert_eq!(report.merged, [one], "{report:?}");
    fx.store().gc().unwrap();
    for (id, writes) in [(frozen, vec![]), (two, vec![(at, b'!'), (at2, b'#')])] {
        let v = fx.mount("squashed", Some(id));
        check_gib(&v.mountpoint().join("gib"), &writes);
        v.unmount().unwrap();
    }
    fx.reopen();
    let v = fx.mount("restarted", Some(two));
    check_gib(&v.mountpoint().join("gib"), &[(at, b'!'), (at2, b'#')]);
    v.unmount().unwrap();
}

/// A chunk-granular file written through every path the daemon serves (writes, a
/// `MAP_SHARED` mapping, truncate down and up, punch hole) reads like the same steps on a
/// plain file, `SEEK_DATA`/`SEEK_HOLE` answer as on it, and its checkpoints keep their
/// bytes.
#[test]
fn partial_files_read_like_plain_ones_through_every_path() {
    require_root!();
    let fx = Fixture::plain(common::small_chunks());
    let (view, m) = fx.live();
    let reference = fx.mountpoint("reference-dir").join("f");
    let original = pattern(0, 64 * 1024 + 100);
    fs::write(m.join("f"), &original).unwrap();
    fs::write(&reference, &original).unwrap();
    // Kept live (the kernel's RELEASE comes after `close` returns), then frozen.
    let first = view.freeze(&FreezeOpts::default()).unwrap().id;
    let frozen = common::freeze_closed(&view).id;

    let both = |f: &dyn Fn(&File)| {
        for path in [&m.join("f"), &reference] {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .unwrap();
            f(&file);
        }
        assert_eq!(
            fs::read(m.join("f")).unwrap(),
            fs::read(&reference).unwrap()
        );
    };
    let before = fx.store().stats();
    both(&|f| f.write_all_at(b"abc", 5000).unwrap());
    let after = fx.store().stats();
    assert_eq!(stats_delta(&before, &after).1, 1, "a chunked copy-up");
    both(&|f| f.write_all_at(&[9; 10_000], 20_000).unwrap());
    both(&|f| {
        let mut map = common::mmap::SharedMap::new(f, 16384);
        map.write(12_000, b"mapped");
        map.sync();
    });
    both(&|f| f.set_len(30_000).unwrap());
    both(&|f| f.set_len(50_000).unwrap());
    both(&|f| {
        nix::fcntl::fallocate(
            f,
            nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
            1000,
            6000,
        )
        .unwrap()
    });
    both(&|f| {
        let mut f = f;
        f.write_all(b"head").unwrap();
    });
    // SEEK_DATA/SEEK_HOLE find what the plain file shows: data where bytes were written
    // (here or below), the hole the truncate down and up left, none past the end.
    let f = File::open(m.join("f")).unwrap();
    let r = File::open(&reference).unwrap();
    use nix::unistd::{Whence, lseek};
    for (off, whence) in [
        (100, Whence::SeekData),
        (100, Whence::SeekHole),
        (31_000, Whence::SeekHole),
        (40_000, Whence::SeekData),
        (40_000, Whence::SeekHole),
        (50_000, Whence::SeekData),
    ] {
        assert_eq!(
            lseek(&f, off, whence),
            lseek(&r, off, whence),
            "{whence:?} from {off}"
        );
    }
    assert_eq!(
        lseek(&f, 40_000, Whence::SeekData),
        Err(nix::errno::Errno::ENXIO)
    );
    drop(f);

    // The checkpoints are untouched.
    view.switch(frozen).unwrap();
    assert_eq!(fs::read(m.join("f")).unwrap(), original);
    view.switch(first).unwrap();
    assert_eq!(fs::read(m.join("f")).unwrap(), original);
    view.unmount().unwrap();
}

/// A chunk-granular copy that comes to hold half of its file is completed: the rest is
/// copied, and its next open is passthrough (its reads no longer reach the daemon).
#[test]
fn a_mostly_rewritten_file_is_completed_and_goes_passthrough() {
    require_root!();
    let fx = Fixture::plain(ChunkPolicy {
        chunk: 4096,
        min_size: 0,
        ..ChunkPolicy::default()
    });
    let (view, m) = fx.live();
    let original = pattern(0, 256 * 1024);
    fs::write(m.join("f"), &original).unwrap();
    let frozen = common::freeze_closed(&view).id;

    let f = OpenOptions::new().write(true).open(m.join("f")).unwrap();
    f.write_all_at(&[1; 4096], 0).unwrap();
    let partial = fx.store().stats();
    assert_eq!(partial.partial_completions, 0);
    f.write_all_at(&[2; 128 * 1024], 8192).unwrap();
    let done = fx.store().stats();
    assert_eq!(done.partial_completions, 1, "{done:?}");
    drop(f);
    std::thread::sleep(std::time::Duration::from_millis(50));
    let mut want = original.clone();
    want[..4096].fill(1);
    want[8192..8192 + 128 * 1024].fill(2);
    let reads = fx.store().stats().op(OpKind::Read).count;
    assert_eq!(fs::read(m.join("f")).unwrap(), want);
    let after = fx.store().stats().op(OpKind::Read).count;
    assert_eq!(after, reads, "a completed file is read through passthrough");
    view.switch(frozen).unwrap();
    assert_eq!(fs::read(m.join("f")).unwrap(), original);
    view.unmount().unwrap();
}

/// Many freeze-and-write cycles on one file (a chain that would grow by one link per
/// cycle) read right in every snapshot, also after a restart: chains are flattened.
#[test]
fn long_chains_are_flattened_and_stay_right() {
    require_root!();
    let mut fx = Fixture::plain(common::small_chunks());
    let (view, m) = fx.live();
    let mut want = pattern(0, 1 << 20);
    fs::write(m.join("f"), &want).unwrap();
    let mut snapshots = vec![(common::freeze_closed(&view).id, want.clone())];
    for i in 0..12u64 {
        let at = i * 70_001 % (1 << 20);
        common::write_at(&m.join("f"), at, &[i as u8 + 100; 10]);
        want[at as usize..at as usize + 10].fill(i as u8 + 100);
        snapshots.push((common::freeze_closed(&view).id, want.clone()));
    }
    assert_eq!(fs::read(m.join("f")).unwrap(), want);
    view.unmount().unwrap();
    fx.reopen();
    for (id, content) in &snapshots {
        let v = fx.mount("again", Some(*id));
        assert_eq!(&fs::read(v.mountpoint().join("f")).unwrap(), content);
        v.unmount().unwrap();
    }
}

/// A base file on another filesystem than the store cannot be cloned even on a reflink
/// store: it is copied up chunk by chunk too.
#[test]
fn a_base_file_on_another_filesystem_is_copied_by_chunks() {
    require_root!();
    let fx = Fixture::new();
    let base_dev = std::os::unix::fs::MetadataExt::dev(&fs::metadata(&fx.base).unwrap());
    let store_dev = std::os::unix::fs::MetadataExt::dev(&fs::metadata(fx.store_dir()).unwrap());
    if base_dev == store_dev && fx.store().reflink() {
        eprintln!("skipped: the base and the store share a filesystem that clones");
        return;
    }
    let (view, m) = fx.live();
    let before = fx.store().stats();
    common::write_at(&m.join("big"), 777_777, b"x");
    let after = fx.store().stats();
    let (copies, chunked, bytes) = stats_delta(&before, &after);
    assert_eq!((copies, chunked), (1, 1), "{after:?}");
    assert!(
        bytes <= fx.store().chunk_policy().chunk,
        "{bytes} bytes copied"
    );
    let mut want = vec![7u8; 1 << 20];
    want[777_777] = b'x';
    assert_eq!(fs::read(m.join("big")).unwrap(), want);
    assert_eq!(fs::read(fx.base.join("big")).unwrap(), vec![7u8; 1 << 20]);
    view.unmount().unwrap();
}

/// Truncating a chunk-granular copy to 0 leaves nothing below to read: its record goes,
/// and its next open is passthrough.
#[test]
fn a_chunk_granular_copy_truncated_to_zero_goes_passthrough() {
    require_root!();
    let fx = Fixture::plain(common::small_chunks());
    let (view, m) = fx.live();
    let f = OpenOptions::new().write(true).open(m.join("big")).unwrap();
    f.write_all_at(b"x", 10).unwrap();
    f.set_len(0).unwrap();
    f.write_all_at(b"tail", 100).unwrap();
    drop(f);
    std::thread::sleep(std::time::Duration::from_millis(50));
    let reads = fx.store().stats().op(OpKind::Read).count;
    let mut want = vec![0u8; 104];
    want[100..].copy_from_slice(b"tail");
    assert_eq!(fs::read(m.join("big")).unwrap(), want);
    assert_eq!(
        fx.store().stats().op(OpKind::Read).count,
        reads,
        "read through passthrough"
    );
    view.unmount().unwrap();
}
