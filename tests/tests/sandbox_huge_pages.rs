//! Sandbox memory in transparent huge pages, against a real `deltaboxd`: a python
//! session's big buffer is born in huge pages (glibc's malloc asks for them: every
//! sandbox command gets `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` and can read the host's
//! THP mode), a checkpoint and a rollback keep them (the template and the restored fork
//! map the same huge pages), and the restored bytes are the checkpoint's.
//! Needs root, the host's THP mode `madvise` or `always` (DESIGN.md), FUSE, the store.

use deltabox_tests::daemon::TestDaemon;
use deltabox_tests::require_root;
use deltabox_tests::sandbox::{Http, id_of};
use serde_json::json;

/// A 64 MiB buffer, every page written, and a way to read the process's huge pages.
const SETUP: &str = "import hashlib\n\
buf = bytearray(64 << 20)\n\
for i in range(0, len(buf), 4096): buf[i] = i // 4096 % 251\n\
def huge_kib():\n\
\x20   for line in open('/proc/self/smaps_rollup'):\n\
\x20       if line.startswith('AnonHugePages:'): return int(line.split()[1])\n\
\x20   return 0\n";
/// The buffer's hash and the process's huge pages, KiB.
const REPORT: &str = "print(hashlib.sha256(buf).hexdigest(), huge_kib())";
/// The buffer is 64 MiB; at least this much of it must be in huge pages (the first and
/// last 2 MiB may be cut by alignment).
const MIN_HUGE_KIB: u64 = 56 << 10;

fn report(http: &Http, sandbox: &str, session: &str) -> (String, u64) {
    let out = http.run(sandbox, session, REPORT);
    let mut it = out.split_whitespace();
    let hash = it.next().unwrap_or_default().to_owned();
    let huge = it.next().and_then(|k| k.parse().ok()).unwrap_or(0);
    (hash, huge)
}

#[test]
fn a_sessions_memory_is_in_huge_pages_and_stays_there_across_a_rollback() {
    require_root();
    let mode = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .expect("the host's THP settings");
    assert!(
        !mode.contains("[never]"),
        "THP is off on this host ({mode:?}): DESIGN.md expects madvise or always"
    );
    let daemon = TestDaemon::start("hugepages", &[]);
    let http = Http::new(daemon.socket());
    let sandbox = id_of(&http.create(&json!({})));
    let env = http.sh(&sandbox, "echo $GLIBC_TUNABLES");
    assert_eq!(
        env.trim(),
        "glibc.malloc.hugetlb=1",
        "the sandbox's environment"
    );

    let session = http.session(&sandbox, "python");
    http.run(&sandbox, &session, SETUP);
    let (hash, huge) = report(&http, &sandbox, &session);
    assert!(
        huge >= MIN_HUGE_KIB,
        "AnonHugePages {huge} KiB after the set-up"
    );

    let node = http.checkpoint(&sandbox, "huge");
    http.run(
        &sandbox,
        &session,
        "for i in range(0, len(buf), 4096): buf[i] = 255",
    );
    let (changed, _) = report(&http, &sandbox, &session);
    assert_ne!(changed, hash, "the writes changed nothing");

    http.rollback(&sandbox, &node);
    let session = id_of(&http.sandbox(&sandbox)["sessions"][0]);
    let (restored, huge) = report(&http, &sandbox, &session);
    assert_eq!(
        restored, hash,
        "the restored buffer differs from the checkpoint's"
    );
    assert!(
        huge >= MIN_HUGE_KIB,
        "AnonHugePages {huge} KiB after the rollback"
    );
}
