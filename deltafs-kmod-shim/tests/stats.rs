//! `Store::stats` and `Store::written_by_snapshot` against a real mount: each counter
//! moves by exactly what an operation makes the kernel send or DeltaFS do. Needs root.

mod common;

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, PermissionsExt};

use common::Fixture;
use deltafs::{FreezeOpts, OpKind, StatsSnapshot};

const PAGE: usize = 4096;

fn count(s: &StatsSnapshot, kind: OpKind) -> u64 {
    s.op(kind).count
}

/// Requests the kernel always sends (no cache answers them) move by exactly one each.
#[test]
fn each_request_is_counted_once() {
    require_root!();
    let fx = Fixture::new();
    let view = fx.mount("ops", None);
    let m = view.mountpoint().to_owned();
    let store = fx.store();

    let before = store.stats();
    let file = File::create(m.join("a")).unwrap();
    let after_create = store.stats();
    assert_eq!(
        count(&after_create, OpKind::Create) - count(&before, OpKind::Create),
        1
    );
    file.sync_all().unwrap();
    let after_fsync = store.stats();
    assert_eq!(
        count(&after_fsync, OpKind::Fsync) - count(&after_create, OpKind::Fsync),
        1
    );
    fs::set_permissions(m.join("a"), fs::Permissions::from_mode(0o600)).unwrap();
    let after_chmod = store.stats();
    assert_eq!(
        count(&after_chmod, OpKind::Setattr) - count(&after_fsync, OpKind::Setattr),
        1
    );
    drop(file);
    fs::rename(m.join("a"), m.join("b")).unwrap();
    let after_rename = store.stats();
    assert_eq!(
        count(&after_rename, OpKind::Rename) - count(&after_chmod, OpKind::Rename),
        1
    );
    fs::remove_file(m.join("b")).unwrap();
    let after_unlink = store.stats();
    assert_eq!(
        count(&after_unlink, OpKind::Unlink) - count(&after_rename, OpKind::Unlink),
        1
    );
    let names = fs::read_dir(&m).unwrap().count();
    let after_readdir = store.stats();
    assert!(
        count(&after_readdir, OpKind::Readdir) > count(&after_unlink, OpKind::Readdir),
        "a listing of {names} entries sent no READDIR"
    );
    // Timed requests are a sample of the counted ones, and every timed one is in a bucket.
    // A request is counted when it starts and timed when its handler returns, after the
    // kernel has its reply: the last ones may still be finishing, so wait for them.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let settled = loop {
        let now = store.stats();
        if now.ops.iter().all(|op| op.count == 0 || op.timed >= 1)
            || std::time::Instant::now() > deadline
        {
            break now;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    for op in &settled.ops {
        assert!(op.timed <= op.count, "{op:?}");
        assert_eq!(op.buckets.iter().sum::<u64>(), op.timed, "{op:?}");
        assert!(op.count == 0 || op.timed >= 1, "{op:?}");
    }
}

/// N writes through a daemon-served handle are N `WRITE` requests; the open for writing
/// of a frozen 1 MiB file is one copy-up (by reflink when the store clones, else chunk by
/// chunk: nothing copied at the open, the writes copy at most the chunk they touch).
#[test]
fn n_daemon_served_writes_are_n_write_requests_after_one_copy_up() {
    require_root!();
    let fx = Fixture::new();
    let view = fx.mount("writes", None);
    let m = view.mountpoint().to_owned();
    let store = fx.store();
    fs::write(m.join("frozen"), vec![1u8; 1 << 20]).unwrap();
    // The kernel sends RELEASE after `close` returns: until it arrives the file is open,
    // and a freeze keeps it with the live view (no copy-up needed later). Freeze until
    // the file is frozen.
    let mut tries = 0;
    while view.freeze(&FreezeOpts::default()).unwrap().kept_live > 0 {
        tries += 1;
        assert!(tries < 50, "the file stays open in the daemon");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }

    // A reader first: the inode is then daemon-served, and so is the writer that follows.
    let reader = File::open(m.join("frozen")).unwrap();
    let before = store.stats();
    let writer = OpenOptions::new()
        .write(true)
        .open(m.join("frozen"))
        .unwrap();
    let after_open = store.stats();
    assert_eq!(
        count(&after_open, OpKind::Open) - count(&before, OpKind::Open),
        1
    );
    assert_eq!(after_open.copy_ups() - before.copy_ups(), 1);
    if store.reflink() {
        assert_eq!(after_open.copy_ups_reflink - before.copy_ups_reflink, 1);
        assert_eq!(after_open.copy_up_bytes, before.copy_up_bytes);
        assert_eq!(
            after_open.copy_up_cloned_bytes - before.copy_up_cloned_bytes,
            1 << 20
        );
    } else {
        assert_eq!(after_open.copy_ups_copy - before.copy_ups_copy, 1);
        assert_eq!(after_open.copy_ups_chunked - before.copy_ups_chunked, 1);
        assert_eq!(after_open.copy_up_bytes, before.copy_up_bytes);
    }

    const N: u64 = 17;
    for i in 0..N {
        writer.write_all_at(&[b'x'; PAGE], i * PAGE as u64).unwrap();
    }
    let after_writes = store.stats();
    assert_eq!(
        count(&after_writes, OpKind::Write) - count(&after_open, OpKind::Write),
        N
    );
    let mut buf = [0u8; PAGE];
    reader.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [b'x'; PAGE], "the reader follows the copy-up");
    drop((reader, writer));

    // What the next freeze wrote: the epoch's copy-up and the metadata.
    let report = view.freeze(&FreezeOpts::default()).unwrap();
    let written = store.written_by_snapshot(report.id).unwrap().unwrap();
    assert_eq!(written.copy_ups, 1);
    // The writes cover [0, 17 pages): they copied at most the one chunk they cut into.
    let copied = after_writes.copy_up_bytes - before.copy_up_bytes;
    assert_eq!(
        copied,
        after_writes.chunk_copy_bytes - before.chunk_copy_bytes
    );
    if store.reflink() {
        assert_eq!(copied, 0);
    } else {
        assert!(copied <= store.chunk_policy().chunk, "{copied} bytes");
    }
    assert_eq!(written.copy_up_bytes, copied);
    assert!(written.metadata_bytes > 0, "{written:?}");
    assert!(
        written.metadata_bytes < 4096,
        "one changed file: {written:?}"
    );
    assert_eq!(
        written.total_bytes(),
        copied + written.freeze_copy_bytes + written.metadata_bytes
    );
}

/// An `O_TRUNC` open of a frozen file is a copy-up that copies nothing.
#[test]
fn a_truncating_open_copies_nothing() {
    require_root!();
    let fx = Fixture::new();
    let view = fx.mount("trunc", None);
    let store = fx.store();
    let before = store.stats();
    fs::write(view.mountpoint().join("big"), b"new").unwrap(); // `big` is the base's 1 MiB
    let after = store.stats();
    assert_eq!(after.copy_ups_empty - before.copy_ups_empty, 1);
    assert_eq!(after.copy_ups(), before.copy_ups() + 1);
    assert_eq!(after.copy_up_bytes, before.copy_up_bytes);
}

/// Freezes and switches are counted; a view's chain is its writable layer plus each
/// frozen layer below it.
#[test]
fn freezes_switches_and_chain_length() {
    require_root!();
    let fx = Fixture::new();
    let view = fx.mount("chain", None);
    let store = fx.store();
    assert_eq!(store.stats().view_layers, [1]);
    let first = view.freeze(&FreezeOpts::default()).unwrap().id;
    view.freeze(&FreezeOpts::default()).unwrap();
    view.freeze(&FreezeOpts::default()).unwrap();
    let s = store.stats();
    assert_eq!((s.freezes, s.switches), (3, 0));
    assert_eq!(s.view_layers, [4]);
    view.switch(first).unwrap();
    let s = store.stats();
    assert_eq!(s.switches, 1);
    assert_eq!(s.view_layers, [2]);
    let branch = fx.mount("branch", Some(first));
    let mut layers = store.stats().view_layers;
    layers.sort_unstable();
    assert_eq!(layers, [2, 2]);
    drop(branch);
    drop(view);
    assert!(store.written_by_snapshot(first).unwrap().is_some());
}

/// What timing a request costs next to a cheap request (the figures behind
/// `stats::TIME_EVERY`). `cargo test -p deltafs --release --test stats -- --ignored
/// --nocapture`.
#[test]
#[ignore]
fn measure_the_cost_of_timing() {
    require_root!();
    let fx = Fixture::new();
    let view = fx.mount("measure", None);
    let path = view.mountpoint().join("f");
    fs::write(&path, b"x").unwrap();
    const N: u32 = 20_000;
    let clock = std::time::Instant::now();
    let mut sink = 0u128;
    for _ in 0..N {
        sink += std::time::Instant::now().elapsed().as_nanos();
    }
    let pair_ns = clock.elapsed().as_nanos() as f64 / f64::from(N);
    let before = fx.store().stats();
    let start = std::time::Instant::now();
    for _ in 0..N {
        // One OPEN and one RELEASE each, never answered by a kernel cache.
        drop(File::open(&path).unwrap());
    }
    let per_request_ns = start.elapsed().as_nanos() as f64 / f64::from(2 * N);
    let after = fx.store().stats();
    let open = after.op(OpKind::Open);
    let daemon_ns = (open.sum_ns - before.op(OpKind::Open).sum_ns) as f64
        / (open.timed - before.op(OpKind::Open).timed).max(1) as f64;
    println!(
        "clock pair {pair_ns:.0} ns ({sink}); a request end to end {per_request_ns:.0} ns \
         ({:.2} % of it); OPEN in the daemon {daemon_ns:.0} ns",
        100.0 * pair_ns / per_request_ns
    );
}
