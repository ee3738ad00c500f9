//! The eBPF copy-on-write fault counter counts the write faults on present pages that a
//! fault-watched cgroup's processes take, records the pages per process, and counts
//! nothing of other cgroups; advancing the fault epoch restarts the counts.

use std::process::Command;

use deltabox_controller::bpf::{CowFaultCounter, PinnedFaults, ProcessPages};
use deltabox_tests::{cgroup::TestCgroup, pins::TestPins, require_root, unique};

/// Python: maps `n` private anonymous pages, writes each (now present and its own),
/// forks, and the child writes each page again: `n` copy-on-write faults in the child.
/// Prints `<child pid> <first page address>`.
const FORK_AND_WRITE: &str = r#"
import ctypes, mmap, os, sys
n = int(sys.argv[1])
m = mmap.mmap(-1, n * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
base = ctypes.addressof(ctypes.c_char.from_buffer(m))
for i in range(n):
    m[i * 4096] = 1
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.read(r, 1)
    for i in range(n):
        m[i * 4096] = 2
    os._exit(0)
os.write(w, b"x")
os.waitpid(pid, 0)
print(pid, base)
"#;

fn fork_and_write(n: u64) -> Command {
    let mut cmd = Command::new("python3");
    cmd.arg("-c").arg(FORK_AND_WRITE).arg(n.to_string());
    cmd
}

/// (child pid, first page) printed by [`FORK_AND_WRITE`].
fn parse(stdout: &[u8]) -> (u32, u64) {
    let text = String::from_utf8_lossy(stdout);
    let mut it = text.split_whitespace();
    let pid = it.next().and_then(|p| p.parse().ok()).expect("child pid");
    let base = it
        .next()
        .and_then(|p| p.parse().ok())
        .expect("base address");
    (pid, base)
}

fn of(pages: &[ProcessPages], tgid: u32) -> Option<&ProcessPages> {
    pages.iter().find(|p| p.tgid == tgid)
}

#[test]
fn counts_copy_on_write_faults_and_their_pages_of_a_watched_cgroup_only() {
    require_root();
    let pins = TestPins::new("cow");
    let _tracker = pins.load();
    let faults = PinnedFaults::adopt(pins.dir()).unwrap();
    let cg = TestCgroup::new(&unique("cow"));
    assert_eq!(faults.watch(cg.id()).unwrap(), 0);
    let before = faults.totals().unwrap();

    const N: u64 = 256;
    // Outside any watched cgroup first: nothing counted.
    let out = fork_and_write(N).output().unwrap();
    assert!(out.status.success());
    let (outsider, _) = parse(&out.stdout);
    assert_eq!(faults.faults(cg.id(), 0).unwrap(), 0, "outsider counted");

    let (child, base) = parse(&cg.run(&mut fork_and_write(N)).stdout);
    // Python's start-up writes to private file mappings (its .data, copied on first
    // write) count too: at least the N of the child.
    let counted = faults.faults(cg.id(), 0).unwrap();
    assert!(
        counted >= N,
        "{counted} faults counted for {N} pages written"
    );
    let pages = faults.pages(cg.id(), 0).unwrap();
    let mine = of(&pages, child).unwrap_or_else(|| panic!("no pages of child {child}: {pages:?}"));
    for i in 0..N {
        let page = base + i * 4096;
        assert!(
            mine.pages.binary_search(&page).is_ok(),
            "page {page:#x} ({i}) not recorded for {child}"
        );
    }
    assert!(mine.faults >= N, "{mine:?}");
    assert!(
        of(&pages, outsider).is_none(),
        "outsider {outsider} recorded"
    );
    let after = faults.totals().unwrap();
    assert!(
        after.cow_faults - before.cow_faults >= N,
        "{before:?} -> {after:?}"
    );
    assert_eq!(after.pages_full, before.pages_full);

    // A new epoch starts from zero; the old one stays readable until dropped.
    assert_eq!(faults.advance_epoch(cg.id()).unwrap(), 1);
    assert_eq!(faults.faults(cg.id(), 1).unwrap(), 0);
    assert_eq!(faults.faults(cg.id(), 0).unwrap(), counted);
    let (child, _) = parse(&cg.run(&mut fork_and_write(16)).stdout);
    assert!(faults.faults(cg.id(), 1).unwrap() >= 16);
    assert!(of(&faults.pages(cg.id(), 1).unwrap(), child).is_some());
    faults.drop_before(cg.id(), 1).unwrap();
    assert_eq!(faults.faults(cg.id(), 0).unwrap(), 0);
    assert!(faults.pages(cg.id(), 0).unwrap().is_empty());

    assert!(faults.unwatch(cg.id()).unwrap());
    assert!(!faults.unwatch(cg.id()).unwrap());
    assert!(faults.pages(cg.id(), 1).unwrap().is_empty());
    assert!(faults.advance_epoch(cg.id()).is_err());
}

#[test]
fn a_full_pages_map_is_counted_and_the_faults_still_are() {
    require_root();
    let pins = TestPins::new("cowfull");
    let _tracker = deltabox_controller::bpf::PinnedTracker::load_with(
        pins.dir(),
        deltabox_controller::bpf::LoadOptions {
            fault_pages_capacity: 8,
            ..Default::default()
        },
    )
    .unwrap();
    let faults = PinnedFaults::adopt(pins.dir()).unwrap();
    let cg = TestCgroup::new(&unique("cowfull"));
    faults.watch(cg.id()).unwrap();
    let before = faults.totals().unwrap();
    cg.run(&mut fork_and_write(64));
    let after = faults.totals().unwrap();
    assert!(faults.faults(cg.id(), 0).unwrap() >= 64);
    let recorded: usize = faults
        .pages(cg.id(), 0)
        .unwrap()
        .iter()
        .map(|p| p.pages.len())
        .sum();
    assert!(recorded <= 8, "{recorded} pages in a map of 8");
    assert!(
        after.pages_full - before.pages_full >= 64 - 8,
        "{before:?} -> {after:?}"
    );
}
