//! The eBPF write tracker counts what a watched cgroup writes, per inode, and nothing
//! else; advancing the epoch restarts the counts.

use std::{fs, os::unix::fs::MetadataExt as _, path::Path, process::Command};

use deltabox_controller::bpf::{InodeRecord, LoadOptions, PinnedTracker, WriteTracker};
use deltabox_tests::{cgroup::TestCgroup, pins::TestPins, require_root, scratch_dir, unique};

const PAGE: u64 = 4096;

/// Writes `pages` pages to `file`, one 4 KiB `write()` each (order-0 folios, so one
/// dirtied folio per page).
fn dd(file: &Path, pages: u64) -> Command {
    let mut cmd = Command::new("dd");
    cmd.arg("if=/dev/zero")
        .arg(format!("of={}", file.display()))
        .arg(format!("bs={PAGE}"))
        .arg(format!("count={pages}"))
        .arg("status=none");
    cmd
}

fn record_of<'a>(stats: &'a [InodeRecord], file: &Path) -> Option<&'a InodeRecord> {
    let ino = fs::metadata(file).expect("stat written file").ino();
    stats.iter().find(|r| r.ino == ino)
}

#[test]
fn counts_writes_bytes_and_dirtied_pages_of_a_watched_cgroup() {
    require_root();
    let pins = TestPins::new("counts");
    let tracker = pins.load();
    let cg = TestCgroup::new(&unique("counts"));
    let dir = scratch_dir("counts");
    assert_eq!(tracker.watch(cg.id()).unwrap(), 0);

    let inside = dir.join("inside.bin");
    let outside = dir.join("outside.bin");
    const N: u64 = 64;
    cg.run(&mut dd(&inside, N));
    // The test process itself is in no watched cgroup.
    let out = dd(&outside, N).output().unwrap();
    assert!(out.status.success());

    let stats = tracker.inode_stats(Some(cg.id())).unwrap();
    let rec = record_of(&stats, &inside)
        .unwrap_or_else(|| panic!("no record for inside.bin in {stats:?}"));
    assert_eq!(rec.writes, N, "{rec:?}");
    assert_eq!(rec.bytes, N * PAGE, "{rec:?}");
    assert_eq!(rec.pages_dirtied, N, "{rec:?}");
    assert_eq!(rec.name, "inside.bin");
    assert_eq!(rec.cgroup_id, cg.id());
    assert!(
        record_of(&stats, &outside).is_none(),
        "unwatched writer counted: {stats:?}"
    );
    let all = tracker.inode_stats(None).unwrap();
    assert!(
        record_of(&all, &outside).is_none(),
        "unwatched writer counted: {all:?}"
    );

    let counters = tracker.counters().unwrap();
    assert!(
        counters.write_syscalls >= N && counters.dirtied_folios >= N,
        "{counters:?}"
    );
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn advancing_the_epoch_restarts_the_counts() {
    require_root();
    let pins = TestPins::new("epoch");
    let tracker = pins.load();
    let cg = TestCgroup::new(&unique("epoch"));
    let dir = scratch_dir("epoch");
    tracker.watch(cg.id()).unwrap();
    let file = dir.join("f.bin");
    cg.run(&mut dd(&file, 8));
    assert_eq!(
        record_of(&tracker.inode_stats(Some(cg.id())).unwrap(), &file)
            .unwrap()
            .writes,
        8
    );

    assert_eq!(tracker.advance_epoch(cg.id()).unwrap(), 1);
    let after = tracker.inode_stats(Some(cg.id())).unwrap();
    assert!(after.is_empty(), "counts survived the epoch: {after:?}");

    // Appending 3 pages: only these count in the new epoch.
    let mut append = dd(&file, 3);
    append.arg("oflag=append").arg("conv=notrunc");
    cg.run(&mut append);
    let stats = tracker.inode_stats(Some(cg.id())).unwrap();
    let rec = record_of(&stats, &file).unwrap();
    assert_eq!(
        (rec.epoch, rec.writes, rec.bytes, rec.pages_dirtied),
        (1, 3, 3 * PAGE, 3)
    );

    // Unknown cgroup ids are refused, not silently empty.
    assert!(tracker.advance_epoch(u64::MAX).is_err());
    assert!(tracker.inode_stats(Some(u64::MAX)).is_err());
    assert!(tracker.unwatch(cg.id()).unwrap());
    assert!(!tracker.unwatch(cg.id()).unwrap());
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn writes_of_several_syscalls_and_pipes() {
    require_root();
    let pins = TestPins::new("syscalls");
    let tracker = pins.load();
    let cg = TestCgroup::new(&unique("syscalls"));
    let dir = scratch_dir("syscalls");
    tracker.watch(cg.id()).unwrap();
    let file = dir.join("py.bin");
    // write, pwrite64, writev, pwritev: 4 syscalls, 4 + 5 + 6 + 7 = 22 bytes; the
    // print to stdout (a pipe) must not count.
    let script = format!(
        "import os\nfd = os.open('{}', os.O_WRONLY | os.O_CREAT | os.O_TRUNC)\n\
         os.write(fd, b'aaaa')\nos.pwrite(fd, b'bbbbb', 100)\n\
         os.writev(fd, [b'ccc', b'ddd'])\nos.pwritev(fd, [b'eeee', b'fff'], 200)\n\
         os.close(fd)\nprint('done')\n",
        file.display()
    );
    let out = cg.run(Command::new("python3").arg("-c").arg(script));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "done");
    let stats = tracker.inode_stats(Some(cg.id())).unwrap();
    let rec = record_of(&stats, &file).unwrap_or_else(|| panic!("no record in {stats:?}"));
    assert_eq!((rec.writes, rec.bytes), (4, 22), "{rec:?}");
    let _ = fs::remove_dir_all(&dir);
}

/// Captures the programs' aya-log records.
#[derive(Default, Clone)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl log::Log for Captured {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        self.0
            .lock()
            .unwrap()
            .push(format!("{} {}", record.level(), record.args()));
    }
    fn flush(&self) {}
}

#[test]
fn a_full_counter_map_is_counted_and_logged_not_silent() {
    require_root();
    let pins = TestPins::new("full");
    let tracker = PinnedTracker::load_with(
        pins.dir(),
        LoadOptions {
            inode_stats_capacity: 2,
            ..LoadOptions::default()
        },
    )
    .unwrap();
    let captured = Captured::default();
    let mut logger = tracker.logger_with(captured.clone()).unwrap();
    let cg = TestCgroup::new(&unique("full"));
    let dir = scratch_dir("full");
    tracker.watch(cg.id()).unwrap();
    for i in 0..4 {
        cg.run(&mut dd(&dir.join(format!("f{i}")), 1));
    }
    assert_eq!(tracker.inode_stats(Some(cg.id())).unwrap().len(), 2);
    assert!(tracker.counters().unwrap().stats_full >= 2);
    logger.flush();
    let lines = captured.0.lock().unwrap().clone();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("WARN") && l.contains("inode stats map full")),
        "no warning reached userspace: {lines:?}"
    );
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn stores_through_a_shared_mapping_count_as_dirtied_pages() {
    require_root();
    let pins = TestPins::new("mmap");
    let tracker = pins.load();
    let cg = TestCgroup::new(&unique("mmap"));
    let dir = scratch_dir("mmap");
    tracker.watch(cg.id()).unwrap();
    let file = dir.join("mapped.bin");
    // ftruncate then store one byte into each of 5 pages: no write syscall, 5 dirtied.
    let script = format!(
        "import mmap, os\nfd = os.open('{}', os.O_RDWR | os.O_CREAT | os.O_TRUNC)\n\
         os.ftruncate(fd, 5 * 4096)\nm = mmap.mmap(fd, 5 * 4096)\n\
         for i in range(5):\n    m[i * 4096] = 1\nm.close()\nos.close(fd)\n",
        file.display()
    );
    cg.run(Command::new("python3").arg("-c").arg(script));
    let stats = tracker.inode_stats(Some(cg.id())).unwrap();
    let rec = record_of(&stats, &file).unwrap_or_else(|| panic!("no record in {stats:?}"));
    assert_eq!(
        (rec.writes, rec.bytes, rec.pages_dirtied),
        (0, 0, 5),
        "{rec:?}"
    );
    let _ = fs::remove_dir_all(&dir);
}
