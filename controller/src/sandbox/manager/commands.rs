//! One-shot commands and persistent sessions in a sandbox.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::output::collect;
use super::{Live, LiveSession};
use crate::api::sandbox_types::{ExecRequest, ExecResult, SessionRun, SessionRunResult};
use crate::cr::pidfd::Pidfd;
use crate::sandbox::error::SandboxError;
use crate::sandbox::ops::ExecSink;
use crate::sandbox::runtime::{ExitStatus, SpawnRequest};
use crate::sandbox::session::{self, SessionIo, SessionKind};
use crate::tree::ids::SessionId;
use crate::tree::records::unix_ms_now;

/// Default timeout of a command or a session call.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a session's interpreter gets to start.
const SESSION_START: Duration = Duration::from_secs(30);
/// How long output is still read after a timed-out command was killed.
const KILL_GRACE: Duration = Duration::from_secs(2);

/// glibc's malloc asks for transparent huge pages (`madvise(MADV_HUGEPAGE)`) on the
/// memory it maps and on its heap: a checkpoint forks a process, and the fork copies a
/// page table entry per 4 KiB page but one entry per 2 MiB huge page (docs/deltacr.md,
/// "Huge pages"). The host's THP mode is often `madvise`, where nothing else would.
const HUGE_PAGES_TUNABLE: (&str, &str) = ("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1");

/// The environment every command starts with (the request's entries override it).
fn default_env() -> Vec<(String, String)> {
    [
        (
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        ),
        ("HOME", "/root"),
        ("LANG", "C.UTF-8"),
        ("TERM", "dumb"),
        ("USER", "root"),
        (HUGE_PAGES_TUNABLE.0, HUGE_PAGES_TUNABLE.1),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

fn merged_env(extra: impl IntoIterator<Item = (String, String)>) -> Vec<(String, String)> {
    let mut env = default_env();
    for (k, v) in extra {
        env.retain(|(key, _)| key != &k);
        env.push((k, v));
    }
    env
}

/// `/workspace` if the sandbox has one, else `/`.
fn default_cwd(live: &Live) -> PathBuf {
    let has_workspace = live
        .view
        .as_ref()
        .is_some_and(|v| v.mountpoint().join("workspace").is_dir());
    PathBuf::from(if has_workspace { "/workspace" } else { "/" })
}

fn timeout_of(ms: Option<u64>) -> Result<Duration, SandboxError> {
    match ms {
        None => Ok(DEFAULT_TIMEOUT),
        Some(0) => Err(SandboxError::Invalid {
            message: "timeout_ms must be positive".to_owned(),
        }),
        Some(ms) => Ok(Duration::from_millis(ms)),
    }
}

/// The command running now in each sandbox (calls on one sandbox are serialised, so
/// there is at most one), by sandbox id: `remove` stops it rather than wait for the
/// sandbox's lock for as long as the command may run. Kept apart from [`Live`], which
/// is behind that very lock.
static RUNNING: Mutex<BTreeMap<String, Running>> = Mutex::new(BTreeMap::new());

/// A command [`RUNNING`] knows about.
#[derive(Default)]
struct Running {
    /// Its process group (a pidfd of its leader: see [`LiveSession`]), once spawned.
    group: Option<Arc<Pidfd>>,
    /// Its sandbox is being removed.
    removed: bool,
}

fn running() -> std::sync::MutexGuard<'static, BTreeMap<String, Running>> {
    RUNNING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Marks the command running in `sandbox` (if any) as stopped by the sandbox's removal
/// and kills its process group; its `exec` then fails with `unknown_sandbox`. Returns
/// whether there was one.
pub(super) fn stop_for_removal(sandbox: &str) -> bool {
    let mut running = running();
    let Some(entry) = running.get_mut(sandbox) else {
        return false;
    };
    // Killed once: the caller may ask again while the command winds down.
    if !entry.removed
        && let Some(group) = &entry.group
    {
        let _ = group.signal_process_group(libc::SIGKILL);
    }
    entry.removed = true;
    true
}

/// An entry of [`RUNNING`], removed on drop.
struct Registered(String);

impl Registered {
    fn new(sandbox: String) -> Self {
        running().insert(sandbox.clone(), Running::default());
        Self(sandbox)
    }

    /// Records the command's process group; false if the sandbox is being removed
    /// (then the group was killed).
    fn spawned(&self, group: &Arc<Pidfd>) -> bool {
        let mut running = running();
        let entry = running.entry(self.0.clone()).or_default();
        entry.group = Some(Arc::clone(group));
        if entry.removed {
            let _ = group.signal_process_group(libc::SIGKILL);
        }
        !entry.removed
    }

    fn removed(&self) -> bool {
        running().get(&self.0).is_some_and(|r| r.removed)
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        running().remove(&self.0);
    }
}

/// Runs a one-shot command to its end (or its timeout), handing its output to `sink`
/// as it is read. The result's `stdout` and `stderr` are empty: they went to the sink.
pub(super) fn exec(
    live: &Live,
    req: &ExecRequest,
    sink: &mut dyn ExecSink,
) -> Result<ExecResult, SandboxError> {
    let start = Instant::now();
    if req.argv.is_empty() || req.argv[0].is_empty() {
        return Err(SandboxError::Invalid {
            message: "argv is empty: give the command to run".to_owned(),
        });
    }
    let timeout = timeout_of(req.timeout_ms)?;
    let name = live.name();
    let removed = || SandboxError::UnknownSandbox { id: name.clone() };
    let cwd = req
        .cwd
        .as_ref()
        .map_or_else(|| default_cwd(live), PathBuf::from);
    let registered = Registered::new(name.clone());
    let spawned = live
        .tree
        .runtime
        .spawn(
            &name,
            &SpawnRequest {
                argv: req.argv.clone(),
                env: merged_env(req.env.clone()),
                cwd,
                stdin: req.stdin.is_some(),
            },
        )
        .map_err(|e| SandboxError::Invalid {
            message: format!("sandbox {name}: cannot start {:?}: {e}", req.argv[0]),
        })?;
    // The command leads its process group; it is killed through the leader's pidfd, so
    // that a leader already reaped (its pid reused) never redirects the kill.
    let group = Arc::new(Pidfd::from_fd(spawned.host_pid, spawned.pidfd));
    if !registered.spawned(&group) {
        let _ = live
            .tree
            .runtime
            .wait_exit(spawned.ns_pid, Some(Duration::from_secs(10)));
        return Err(removed());
    }
    sink.started();
    let feeder = match (spawned.stdin, &req.stdin) {
        (Some(mut pipe), Some(data)) => {
            let data = data.clone().into_bytes();
            // A command that never reads its stdin must not block the collection.
            Some(std::thread::spawn(move || {
                let _ = pipe.write_all(&data);
            }))
        }
        _ => None,
    };
    let collected = collect(
        spawned.stdout,
        spawned.stderr,
        Some(group.as_fd()),
        start + timeout,
        KILL_GRACE,
        &|| {
            let _ = group.signal_process_group(libc::SIGKILL);
        },
        sink,
    )
    .map_err(|e| SandboxError::internal(format!("sandbox {name}: reading output"), e))?;
    if collected.timed_out {
        let _ = group.signal_process_group(libc::SIGKILL);
    }
    let status = live
        .tree
        .runtime
        .wait_exit(spawned.ns_pid, Some(Duration::from_secs(10)))
        .map_err(|e| {
            SandboxError::internal(format!("sandbox {name}: waiting for the command"), e)
        })?;
    if let Some(feeder) = feeder {
        let _ = feeder.join();
    }
    if registered.removed() {
        return Err(removed());
    }
    let (exit_code, signal) = match status {
        Some(ExitStatus::Code(c)) => (Some(c), None),
        Some(ExitStatus::Signal(s)) => (None, Some(s)),
        None => (None, None),
    };
    Ok(ExecResult {
        exit_code,
        signal,
        stdout: String::new(),
        stderr: String::new(),
        timed_out: collected.timed_out,
        truncated: collected.truncated,
        duration_ms: start.elapsed().as_secs_f64() * 1e3,
        node: None,
    })
}

/// Starts a session's interpreter and waits until it is ready.
pub(super) fn start_session(live: &Live, kind: SessionKind) -> Result<LiveSession, SandboxError> {
    let name = live.name();
    let id = SessionId::new();
    let spawned = live
        .tree
        .runtime
        .spawn(
            &name,
            &SpawnRequest {
                argv: kind.argv(),
                env: merged_env(kind.env()),
                cwd: default_cwd(live),
                stdin: true,
            },
        )
        .map_err(|e| SandboxError::Session {
            sandbox: name.clone(),
            session: id.to_string(),
            message: format!("cannot start {kind}: {e}"),
        })?;
    let Some(stdin) = spawned.stdin else {
        return Err(SandboxError::internal(
            format!("sandbox {name}"),
            "the runtime gave a session no stdin pipe",
        ));
    };
    let mut session = LiveSession {
        id,
        kind,
        pid: spawned.host_pid,
        group: Pidfd::open(spawned.host_pid).ok(),
        io: SessionIo {
            stdin,
            stdout: spawned.stdout,
            stderr: spawned.stderr,
        },
        started_ms: unix_ms_now(),
        generation: 0,
    };
    session::wait_ready(&mut session.io, kind, SESSION_START).map_err(|e| {
        SandboxError::Session {
            sandbox: name.clone(),
            session: id.to_string(),
            message: format!("{kind} did not start: {e}"),
        }
    })?;
    Ok(session)
}

/// The session of `live` whose id starts with `prefix`.
pub(super) fn resolve_session(live: &Live, prefix: &str) -> Result<SessionId, SandboxError> {
    let wanted = prefix.replace('-', "").to_ascii_lowercase();
    let matches: Vec<SessionId> = live
        .sessions
        .keys()
        .filter(|id| {
            !wanted.is_empty()
                && (id.to_string().replace('-', "").starts_with(&wanted) || id.short() == prefix)
        })
        .copied()
        .collect();
    match matches.as_slice() {
        [one] => Ok(*one),
        [] => Err(SandboxError::UnknownSession {
            sandbox: live.name(),
            id: prefix.to_owned(),
        }),
        many => Err(SandboxError::Ambiguous {
            what: "session",
            prefix: prefix.to_owned(),
            candidates: many.iter().map(ToString::to_string).collect(),
        }),
    }
}

/// Runs code in a session. A session that exited or hung is an error (the caller drops
/// it).
pub(super) fn run(
    live: &mut Live,
    sid: SessionId,
    req: &SessionRun,
) -> Result<SessionRunResult, SandboxError> {
    let timeout = timeout_of(req.timeout_ms)?;
    let name = live.name();
    let Some(session) = live.sessions.get_mut(&sid) else {
        return Err(SandboxError::UnknownSession {
            sandbox: name,
            id: sid.to_string(),
        });
    };
    let group = session.group.as_ref();
    let interrupt = || match group {
        Some(group) => group
            .signal_process_group(libc::SIGINT)
            .map_err(std::io::Error::other),
        None => Err(std::io::Error::from_raw_os_error(libc::ESRCH)),
    };
    let out = session::run(
        &mut session.io,
        session.kind,
        &req.code,
        timeout,
        &interrupt,
    )
    .map_err(|e| session_error(&name, sid, e))?;
    Ok(SessionRunResult {
        stdout: out.stdout,
        stderr: out.stderr,
        status: out.status,
        timed_out: out.timed_out,
        truncated: out.truncated,
        duration_ms: out.duration_ms,
        node: None,
    })
}

fn session_error(sandbox: &str, sid: SessionId, e: session::SessionError) -> SandboxError {
    if let session::SessionError::InvalidCode { .. } = e {
        return SandboxError::Invalid {
            message: e.to_string(),
        };
    }
    SandboxError::Session {
        sandbox: sandbox.to_owned(),
        session: sid.to_string(),
        message: e.to_string(),
    }
}
