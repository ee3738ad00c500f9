//! The background thread that writes dumps, off the checkpoint's critical path.
//!
//! One worker per dumps directory, made on first use and kept for the process's life
//! (a registry, so that the dumps a tree listing reports can be found by name). Jobs
//! run one at a time in submission order, so a node's dump finds its parent's
//! complete. The thread runs at the lowest CPU priority (`SCHED_IDLE`): on a busy
//! machine the checkpoints and commands of sandboxes go first. A job starts, and each
//! of its reads of a template's memory goes on, only once no checkpoint, rollback or
//! branch is running or has just ended ([`crate::foreground`]): the checkpoint that
//! queued it gets its answer first, and a rollback right after it runs alone.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use super::Dump;
use crate::cr::sched;
use crate::foreground;

/// When dumps are written (`deltaboxd --dump-policy`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DumpPolicy {
    /// After every checkpoint, in the background (the default).
    #[default]
    Eager,
    /// When the template pool evicts a template, before it is destroyed: no disk
    /// writes for nodes whose templates stay; a template that dies otherwise (killed,
    /// out of memory) before its eviction takes its node's processes with it.
    OnEvict,
    /// Never (templates are the only copy, and the pool cannot evict any).
    Off,
}

impl DumpPolicy {
    /// Its name (`eager`, `on-evict`, `off`), as the flag spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Eager => "eager",
            Self::OnEvict => "on-evict",
            Self::Off => "off",
        }
    }
}

impl std::fmt::Display for DumpPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for DumpPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Self::Eager, Self::OnEvict, Self::Off]
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| format!("dump policy {s:?}: use eager, on-evict or off"))
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// A dump-writing thread and its backlog.
pub struct DumpWorker {
    root: PathBuf,
    tx: Mutex<Sender<Job>>,
    backlog: Arc<(Mutex<usize>, Condvar)>,
}

impl std::fmt::Debug for DumpWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DumpWorker")
            .field("root", &self.root)
            .field("backlog", &self.backlog())
            .finish()
    }
}

fn registry() -> &'static Mutex<HashMap<PathBuf, Arc<DumpWorker>>> {
    static WORKERS: OnceLock<Mutex<HashMap<PathBuf, Arc<DumpWorker>>>> = OnceLock::new();
    WORKERS.get_or_init(Default::default)
}

impl DumpWorker {
    /// The worker of the dumps directory `root` (created, with its thread, on first
    /// use).
    pub fn for_root(root: &Path) -> Arc<Self> {
        let mut workers = registry().lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(w) = workers.get(root) {
            return Arc::clone(w);
        }
        // Dumps an earlier process left half-written (it died mid-dump) are no dumps.
        if let Ok(entries) = std::fs::read_dir(root) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(".tmp-") {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let (tx, rx) = channel::<Job>();
        let backlog = Arc::new((Mutex::new(0usize), Condvar::new()));
        let counter = Arc::clone(&backlog);
        let spawned = std::thread::Builder::new()
            .name("deltacr-dump".to_owned())
            .spawn(move || {
                lowest_priority();
                for job in rx {
                    foreground::yield_to_operations(foreground::BACKGROUND_WAIT);
                    job();
                    let (count, cv) = &*counter;
                    let mut n = count.lock().unwrap_or_else(PoisonError::into_inner);
                    *n = n.saturating_sub(1);
                    cv.notify_all();
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("cannot start the dump thread: {e}");
        }
        let worker = Arc::new(Self {
            root: root.to_path_buf(),
            tx: Mutex::new(tx),
            backlog,
        });
        workers.insert(root.to_path_buf(), Arc::clone(&worker));
        worker
    }

    /// The dumps directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Queues `job`.
    pub fn submit(&self, job: impl FnOnce() + Send + 'static) {
        let (count, _) = &*self.backlog;
        *count.lock().unwrap_or_else(PoisonError::into_inner) += 1;
        let sent = self
            .tx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .send(Box::new(job));
        if sent.is_err() {
            let mut n = count.lock().unwrap_or_else(PoisonError::into_inner);
            *n = n.saturating_sub(1);
        }
    }

    /// Jobs queued or running.
    pub fn backlog(&self) -> usize {
        *self
            .backlog
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits up to `timeout` until no job is queued or running; `true` if so.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let (count, cv) = &*self.backlog;
        let mut n = count.lock().unwrap_or_else(PoisonError::into_inner);
        while *n > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            n = cv
                .wait_timeout(n, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }
}

/// Whether a complete dump named `name` exists under any worker's directory (node ids
/// are unique, so the name finds at most one).
pub fn dumped(name: &str) -> bool {
    let roots: Vec<PathBuf> = registry()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .keys()
        .cloned()
        .collect();
    roots.iter().any(|root| Dump::exists(root, name))
}

/// Runs `f` with the calling thread at normal priority (`SCHED_OTHER`) if it is at
/// `SCHED_IDLE` (the dump thread), then puts it back: `f` holds something a restore
/// waits for (a template under ptrace), which must not wait for an idle CPU.
pub(crate) fn at_normal_priority<T>(f: impl FnOnce() -> T) -> T {
    let idle = sched::is_idle();
    if idle {
        let _ = sched::set_idle(false);
    }
    let out = f();
    if idle {
        lowest_priority();
    }
    out
}

/// Puts the calling thread in `SCHED_IDLE`: the tasks of its cgroup (the daemon's) go
/// first; those of other cgroups need [`foreground`] too.
fn lowest_priority() {
    if let Err(e) = sched::set_idle(true) {
        tracing::debug!("dump thread: SCHED_IDLE refused: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_run_in_order_and_the_backlog_drains() {
        let dir = tempfile::tempdir().unwrap();
        let worker = DumpWorker::for_root(dir.path());
        assert!(Arc::ptr_eq(&worker, &DumpWorker::for_root(dir.path())));
        let seen = Arc::new(Mutex::new(Vec::new()));
        for i in 0..5 {
            let seen = Arc::clone(&seen);
            worker.submit(move || seen.lock().unwrap().push(i));
        }
        assert!(worker.wait_idle(Duration::from_secs(10)));
        assert_eq!(worker.backlog(), 0);
        assert_eq!(*seen.lock().unwrap(), vec![0, 1, 2, 3, 4]);
        assert!(!dumped("no-such-dump"));
    }

    #[test]
    fn a_job_waits_for_the_state_operation_running() {
        let dir = tempfile::tempdir().unwrap();
        let worker = DumpWorker::for_root(dir.path());
        let ran = Arc::new(Mutex::new(None));
        let operation = foreground::begin();
        let held = Instant::now();
        let seen = Arc::clone(&ran);
        worker.submit(move || *seen.lock().unwrap() = Some(Instant::now()));
        std::thread::sleep(Duration::from_millis(30));
        drop(operation);
        let ended = Instant::now();
        assert!(worker.wait_idle(Duration::from_secs(10)));
        let at = ran.lock().unwrap().expect("the job ran");
        // After the operation, or (a slow machine) once it had waited its longest.
        assert!(
            at >= ended || at - held >= foreground::BACKGROUND_WAIT,
            "ran {:?} into the operation",
            at - held
        );
    }

    #[test]
    fn policies_parse_as_the_flag_spells_them() {
        for p in [DumpPolicy::Eager, DumpPolicy::OnEvict, DumpPolicy::Off] {
            assert_eq!(p.as_str().parse::<DumpPolicy>(), Ok(p));
        }
        assert!(
            "lazy"
                .parse::<DumpPolicy>()
                .unwrap_err()
                .contains("on-evict")
        );
    }
}
