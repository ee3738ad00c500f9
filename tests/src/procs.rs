//! A test daemon with one sandbox, and what the host sees of that sandbox's processes:
//! those in its `work/` cgroup, its tree's templates, and numbers its background
//! processes keep writing to files.

use std::fs;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::daemon::TestDaemon;
use crate::require_root;
use crate::sandbox::{Http, id_of};

/// Where a counter kept by a sandbox's process was at a checkpoint: read just before and
/// just after it. The node's own value lies between the two; the counter runs on while
/// they are read, by as much as a read takes under load, so only `before` is a lower
/// bound of where a restored counter resumes.
#[derive(Clone, Copy, Debug)]
pub struct At {
    /// Read just before the checkpoint.
    pub before: u64,
    /// Read just after it.
    pub after: u64,
}

/// A sandbox of a test daemon, with its tree.
pub struct ProcSandbox {
    /// The daemon (stopped when this is dropped).
    pub daemon: TestDaemon,
    /// A client of its API.
    pub api: Http,
    /// The sandbox.
    pub id: String,
    /// Its tree.
    pub tree: String,
}

impl ProcSandbox {
    /// A sandbox of a daemon started with no extra flags.
    pub fn new(test: &str) -> Self {
        Self::with_flags(test, &[])
    }

    /// A sandbox of a daemon started with `flags`.
    pub fn with_flags(test: &str, flags: &[&str]) -> Self {
        require_root();
        let daemon = TestDaemon::start(test, flags);
        let api = Http::new(daemon.socket());
        let id = id_of(&api.create(&json!({})));
        let tree = api.sandbox(&id)["tree"]
            .as_str()
            .unwrap_or_else(|| panic!("no tree of sandbox {id}"))
            .to_owned();
        Self {
            daemon,
            api,
            id,
            tree,
        }
    }

    /// The tree's cgroup.
    pub fn tree_cgroup(&self) -> PathBuf {
        self.daemon.sandbox_cgroup().join(&self.tree)
    }

    /// The processes of sandbox `sb`'s `work/` cgroup (this one or a branch): host pid
    /// and command line.
    pub fn procs(&self, sb: &str) -> Vec<(i32, String)> {
        let dir = self.tree_cgroup().join(format!("sb-{sb}")).join("work");
        let listed = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        listed
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .map(|pid: i32| {
                let cmd = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
                (pid, cmd.trim().to_owned())
            })
            .collect()
    }

    /// How many processes of `sb` run `cmd` (the whole command line), once that is
    /// `want` or after 3 s (a process just forked may not have exec'd yet).
    pub fn count(&self, sb: &str, cmd: &str, want: usize) -> usize {
        let mut n = 0;
        for _ in 0..60 {
            n = self.procs(sb).iter().filter(|(_, c)| c == cmd).count();
            if n == want {
                break;
            }
            thread::sleep(Duration::from_millis(50));
        }
        n
    }

    /// The tree's templates (host pids), oldest first.
    pub fn templates(&self) -> Vec<i32> {
        crate::templates::templates(&self.daemon, &self.tree)
    }

    /// The number in file `path` of sandbox `sb` (read again while empty: the
    /// processes rewrite it, truncating first).
    pub fn number(&self, sb: &str, path: &str) -> u64 {
        let mut out = String::new();
        for _ in 0..20 {
            out = self.api.sh(sb, &format!("cat {path}"));
            if let Ok(n) = out.trim().parse() {
                return n;
            }
            thread::sleep(Duration::from_millis(20));
        }
        panic!("{path} in {sb} holds {out:?}")
    }

    /// Checkpoints sandbox `sb` once the counter `read` returns (`None` while its
    /// process has not written it yet) has counted to `min` (waited for, up to 30 s:
    /// the process was just started in the background); returns the node and where the
    /// counter was.
    pub fn checkpoint_counter(
        &self,
        sb: &str,
        label: &str,
        min: u64,
        read: impl Fn() -> Option<u64>,
    ) -> (String, At) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let value = read();
            if value.is_some_and(|n| n >= min) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{sb}: the counter is at {value:?} after 30 s, not {min}"
            );
            thread::sleep(Duration::from_millis(50));
        }
        // Read again while `None`: its file may be being rewritten (truncated first).
        let read_some = || {
            for _ in 0..20 {
                if let Some(n) = read() {
                    return n;
                }
                thread::sleep(Duration::from_millis(50));
            }
            panic!("{sb}: the counter is gone")
        };
        let before = read_some();
        let node = self.api.checkpoint(sb, label);
        let after = read_some();
        (node, At { before, after })
    }

    /// The number in file `path` of sandbox `sb`, `None` while the file is missing or
    /// holds no number (not written yet, or being rewritten).
    pub fn number_if_any(&self, sb: &str, path: &str) -> Option<u64> {
        let out = self.api.sh(sb, &format!("cat {path} 2>/dev/null; true"));
        out.trim().parse().ok()
    }
}
