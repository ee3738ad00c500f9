//! Sandboxes whose memory the tests can check: a test daemon with one sandbox and a
//! python session holding data with a known hash (a restore must give the same hash
//! back), and a python workload whose two processes share a file mapping.

use crate::daemon::TestDaemon;
use crate::procs::ProcSandbox;
use crate::sandbox::Http;

/// Python defining `b`, `mib` MiB of random bytes, and `h()`, their sha256 in hex.
pub fn random_buffer(mib: u32) -> String {
    format!(
        "import hashlib, os\nb = bytearray(os.urandom({mib} << 20))\nh = lambda: hashlib.sha256(b).hexdigest()"
    )
}

/// A test daemon with one sandbox and its python session, set up by some code.
pub struct PySandbox {
    /// The daemon (stopped when this is dropped).
    pub daemon: TestDaemon,
    /// A client of its API.
    pub api: Http,
    /// The sandbox.
    pub sandbox: String,
    /// The sandbox's tree (its cgroup under [`TestDaemon::sandbox_cgroup`]).
    pub tree: String,
    /// The python session.
    pub session: String,
}

impl PySandbox {
    /// Starts a daemon with `flags`, creates a sandbox and a python session in it, and
    /// runs `setup` there (e.g. [`random_buffer`]).
    pub fn start(test: &str, flags: &[&str], setup: &str) -> Self {
        let ProcSandbox {
            daemon,
            api,
            id: sandbox,
            tree,
        } = ProcSandbox::with_flags(test, flags);
        let session = api.session(&sandbox, "python");
        api.run(&sandbox, &session, setup);
        Self {
            daemon,
            api,
            sandbox,
            tree,
            session,
        }
    }
}

/// Python (run in a python session) starting two `Popen` children that share a
/// writable `MAP_SHARED` mapping of `/tmp/shared`: the writer counts in its first 8
/// bytes every 50 ms, the reader copies what it sees there to `/tmp/seen`.
pub const SHARED_MAPPING: &str = r#"import mmap, struct, subprocess, sys
open("/tmp/shared", "wb").write(bytes(4096))
WRITER = """
import mmap, struct, time
f = open("/tmp/shared", "r+b")
m = mmap.mmap(f.fileno(), 4096)
n = 0
while True:
    n += 1
    struct.pack_into("Q", m, 0, n)
    time.sleep(0.05)
"""
READER = """
import mmap, struct, time
f = open("/tmp/shared", "r+b")
m = mmap.mmap(f.fileno(), 4096)
while True:
    open("/tmp/seen", "w").write(str(struct.unpack_from("Q", m, 0)[0]))
    time.sleep(0.05)
"""
procs = [subprocess.Popen([sys.executable, "-c", c]) for c in (WRITER, READER)]"#;
