//! Persistent sessions: a `bash` or `python3` interpreter the agent sends code
//! to, one call at a time, whose state (variables, functions, imports, cwd,
//! env) lives on between calls and is part of every checkpoint.
//!
//! The daemon starts [`SessionKind::argv`] in a sandbox with three pipes and
//! drives it with [`wait_ready`] once, then [`run`] per call. The driver
//! script inside the interpreter reads exactly one request's bytes at a time
//! and holds no file but fds 0-2 between calls, so DeltaCR can fork it into a
//! template while it waits, and a restored copy continues on fresh pipes (the
//! daemon swaps the [`SessionIo`]). Protocol and limits: `docs/sessions.md`.

mod capture;
mod poll;

use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::str::FromStr;
use std::time::{Duration, Instant};

use capture::{Capture, Reply};
use poll::{Interest, PollFd};

/// The bash driver (run with `bash -c`).
const BASH_DRIVER: &str = include_str!("driver.sh");
/// The python driver (run with `python3 -c`).
const PYTHON_DRIVER: &str = include_str!("driver.py");

/// Each output stream of a call keeps at most this much; the rest is read and
/// dropped, and [`RunOutput::truncated`] is set.
pub const OUTPUT_CAP: usize = 8 << 20;
/// How long [`run`] keeps waiting for the end of a call after interrupting it.
pub const INTERRUPT_GRACE: Duration = Duration::from_secs(5);
/// How long the other stream may take to end once one pipe showed that the
/// interpreter is gone (a background child of the code may hold it open).
const EXIT_DRAIN: Duration = Duration::from_millis(200);
/// Bytes of stderr quoted in an error message.
const ERROR_TAIL: usize = 500;
/// Bytes read per read(2).
const READ_CHUNK: usize = 64 << 10;
/// Bytes written per write(2): no more than `PIPE_BUF`, so that a write to a
/// pipe that poll(2) found writable does not block.
const WRITE_CHUNK: usize = 4096;

/// Which interpreter a session runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionKind {
    /// GNU bash, 4.4 or newer.
    Bash,
    /// CPython 3.8 or newer.
    Python,
}

impl SessionKind {
    /// The command line that starts the interpreter with its driver. `python3`
    /// is looked up in the sandbox's `PATH`; bash is `/bin/bash`.
    pub fn argv(&self) -> Vec<String> {
        let argv: &[&str] = match self {
            // `$0` is "bash" so that error messages read like bash's own.
            Self::Bash => &[
                "/bin/bash",
                "--norc",
                "--noprofile",
                "-c",
                BASH_DRIVER,
                "bash",
            ],
            Self::Python => &["python3", "-u", "-c", PYTHON_DRIVER],
        };
        argv.iter().map(|s| s.to_string()).collect()
    }

    /// Environment the driver needs on top of the caller's (`PATH`, `HOME`,
    /// `LANG`). It must also be started with SIGINT not ignored (the bash
    /// driver refuses to start otherwise), as its own process group leader.
    pub fn env(&self) -> Vec<(String, String)> {
        let env: &[(&str, &str)] = match self {
            // A non-interactive bash would source $BASH_ENV despite --norc.
            Self::Bash => &[("BASH_ENV", "")],
            // The code's text output is UTF-8 whatever the locale.
            Self::Python => &[("PYTHONIOENCODING", "utf-8")],
        };
        env.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The name used on the command line and in the API.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Bash => "bash",
            Self::Python => "python",
        }
    }
}

impl fmt::Display for SessionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SessionKind {
    type Err = SessionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "bash" => Ok(Self::Bash),
            "python" => Ok(Self::Python),
            other => Err(SessionError::UnknownKind {
                kind: other.to_string(),
            }),
        }
    }
}

/// The daemon's ends of a session's pipes: it writes requests to `stdin` and
/// reads `stdout` and `stderr`. A restored session has new ones.
#[derive(Debug)]
pub struct SessionIo {
    /// Write end of the interpreter's fd 0.
    pub stdin: File,
    /// Read end of the interpreter's fd 1.
    pub stdout: File,
    /// Read end of the interpreter's fd 2.
    pub stderr: File,
}

/// What one call printed and how it ended.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct RunOutput {
    /// Everything the code wrote to stdout (lossy UTF-8, at most [`OUTPUT_CAP`] bytes).
    pub stdout: String,
    /// Everything the code wrote to stderr (same cap).
    pub stderr: String,
    /// bash: `$?` of the last command; python: 0, 1 (uncaught exception),
    /// 130 (KeyboardInterrupt) or the code of `SystemExit`. 130 after a timeout.
    pub status: i32,
    /// The call hit its timeout and was interrupted.
    pub timed_out: bool,
    /// Some output was dropped at [`OUTPUT_CAP`].
    pub truncated: bool,
    /// Wall time of the call, interrupt grace included.
    pub duration_ms: f64,
}

/// Why a session call failed.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The kind named is neither `bash` nor `python`.
    #[error("unknown session kind {kind:?}: expected \"bash\" or \"python\"")]
    UnknownKind {
        /// What was asked for.
        kind: String,
    },
    /// The code cannot be sent to this interpreter.
    #[error("invalid {kind} code: {reason}")]
    InvalidCode {
        /// The interpreter.
        kind: SessionKind,
        /// What is wrong with it.
        reason: String,
    },
    /// The interpreter did not announce readiness in time.
    #[error("{kind} session not ready after {waited:?}; stderr so far: {:?}", tail(.stderr))]
    ReadyTimeout {
        /// The interpreter.
        kind: SessionKind,
        /// How long [`wait_ready`] waited.
        waited: Duration,
        /// What it wrote to stderr meanwhile.
        stderr: String,
    },
    /// The interpreter is gone (or closed its pipes): it exited, was killed,
    /// or never started. Its output until then is kept.
    #[error("{kind} session exited ({}); stderr: {:?}", exit_status(.status), tail(.stderr))]
    Exited {
        /// The interpreter.
        kind: SessionKind,
        /// Its exit status when the driver could report it (bash `exit N`,
        /// `set -e`); `None` when it died without a word (killed, `os._exit`).
        status: Option<i32>,
        /// What the last call wrote to stdout.
        stdout: String,
        /// What the last call wrote to stderr.
        stderr: String,
    },
    /// The call did not end within [`INTERRUPT_GRACE`] after its interrupt:
    /// the session should be killed.
    #[error(
        "{kind} session unresponsive: no reply {grace:?} after interrupting a call that hit its {timeout:?} timeout"
    )]
    Unresponsive {
        /// The interpreter.
        kind: SessionKind,
        /// The call's timeout.
        timeout: Duration,
        /// How long it waited after the interrupt.
        grace: Duration,
        /// What the call wrote to stdout.
        stdout: String,
        /// What the call wrote to stderr.
        stderr: String,
    },
    /// The interrupt callback failed.
    #[error("interrupting the {kind} session after its {timeout:?} timeout: {source}")]
    Interrupt {
        /// The interpreter.
        kind: SessionKind,
        /// The call's timeout.
        timeout: Duration,
        /// What the callback returned.
        #[source]
        source: io::Error,
    },
    /// Reading or writing a session pipe failed (other than its end).
    #[error("{op} the {kind} session's {pipe}: {source}")]
    Io {
        /// The interpreter.
        kind: SessionKind,
        /// `reading` or `writing`.
        op: &'static str,
        /// `stdin`, `stdout`, `stderr`.
        pipe: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// At most the last [`ERROR_TAIL`] bytes of `s` (on a character boundary):
/// error messages quote the end of stderr, not megabytes of it.
fn tail(s: &str) -> &str {
    let mut start = s.len().saturating_sub(ERROR_TAIL);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

fn exit_status(status: &Option<i32>) -> String {
    match status {
        Some(s) => format!("status {s}"),
        None => "status unknown".to_string(),
    }
}

/// Waits for the driver's readiness marker on stdout and stderr, which it
/// writes once at start. Anything before it (shell warnings) is dropped.
pub fn wait_ready(
    io: &mut SessionIo,
    kind: SessionKind,
    timeout: Duration,
) -> Result<(), SessionError> {
    let ex = exchange(io, kind, &[], b"\x1eDBX-ready", timeout, None)?;
    match ex.outcome {
        Outcome::Replied(Reply::Ready) => Ok(()),
        Outcome::TimedOut => Err(SessionError::ReadyTimeout {
            kind,
            waited: timeout,
            stderr: ex.stderr.text(),
        }),
        Outcome::Replied(Reply::Status(status) | Reply::Exit(status)) => {
            Err(exited(kind, Some(status), ex))
        }
        Outcome::Gone => Err(exited(kind, None, ex)),
    }
}

/// Runs `code` in the session and returns what it printed and its status.
/// After `timeout`, calls `interrupt` (which should send SIGINT to the
/// session's process group) and waits up to [`INTERRUPT_GRACE`] more.
pub fn run(
    io: &mut SessionIo,
    kind: SessionKind,
    code: &str,
    timeout: Duration,
    interrupt: &dyn Fn() -> io::Result<()>,
) -> Result<RunOutput, SessionError> {
    let nonce = uuid::Uuid::now_v7().simple().to_string();
    let request = encode_request(kind, &nonce, code)?;
    let prefix = format!("\x1eDBX{nonce} ").into_bytes();
    let started = Instant::now();
    let ex = exchange(io, kind, &request, &prefix, timeout, Some(interrupt))?;
    match ex.outcome {
        Outcome::Replied(Reply::Status(status)) => {
            let (stdout, out_truncated) = ex.stdout.finish();
            let (stderr, err_truncated) = ex.stderr.finish();
            Ok(RunOutput {
                stdout,
                stderr,
                status,
                timed_out: ex.interrupted,
                truncated: out_truncated || err_truncated,
                duration_ms: started.elapsed().as_secs_f64() * 1000.0,
            })
        }
        Outcome::Replied(Reply::Exit(status)) => Err(exited(kind, Some(status), ex)),
        Outcome::Replied(Reply::Ready) | Outcome::Gone => Err(exited(kind, None, ex)),
        Outcome::TimedOut => Err(SessionError::Unresponsive {
            kind,
            timeout,
            grace: INTERRUPT_GRACE,
            stdout: ex.stdout.text(),
            stderr: ex.stderr.text(),
        }),
    }
}

/// The bytes of one request: bash reads up to a NUL, python a length-prefixed
/// frame (see `docs/sessions.md`).
fn encode_request(kind: SessionKind, nonce: &str, code: &str) -> Result<Vec<u8>, SessionError> {
    let payload = format!("{nonce}\n{code}");
    match kind {
        SessionKind::Bash => {
            if let Some(offset) = code.bytes().position(|b| b == 0) {
                return Err(SessionError::InvalidCode {
                    kind,
                    reason: format!("NUL byte at offset {offset} (bash strings cannot hold one)"),
                });
            }
            let mut bytes = payload.into_bytes();
            bytes.push(0);
            Ok(bytes)
        }
        SessionKind::Python => {
            let mut bytes = format!("{}\n", payload.len()).into_bytes();
            bytes.extend_from_slice(payload.as_bytes());
            Ok(bytes)
        }
    }
}

fn exited(kind: SessionKind, status: Option<i32>, ex: Exchange) -> SessionError {
    SessionError::Exited {
        kind,
        status,
        stdout: ex.stdout.text(),
        stderr: ex.stderr.text(),
    }
}

/// How an exchange ended.
enum Outcome {
    /// A marker arrived (on stdout, or on stderr if stdout ended without one).
    Replied(Reply),
    /// A pipe ended without a marker: the interpreter is gone.
    Gone,
    /// No marker before the deadline (after the interrupt, if any).
    TimedOut,
}

/// One request and its reply.
struct Exchange {
    outcome: Outcome,
    stdout: Capture,
    stderr: Capture,
    interrupted: bool,
}

/// Writes `request` while reading stdout and stderr until both carry a marker
/// starting with `prefix`, or one pipe ends, or time runs out. With an
/// `interrupt`, the first deadline calls it and grants [`INTERRUPT_GRACE`].
fn exchange(
    io: &mut SessionIo,
    kind: SessionKind,
    request: &[u8],
    prefix: &[u8],
    timeout: Duration,
    interrupt: Option<&dyn Fn() -> io::Result<()>>,
) -> Result<Exchange, SessionError> {
    let io_err = |op, pipe, source| SessionError::Io {
        kind,
        op,
        pipe,
        source,
    };
    let mut stdout = Capture::new(prefix.to_vec(), OUTPUT_CAP);
    let mut stderr = Capture::new(prefix.to_vec(), OUTPUT_CAP);
    let mut written = 0;
    let mut deadline = Instant::now() + timeout;
    let mut interrupted = false;
    // Set when a pipe shows the interpreter gone; the rest gets EXIT_DRAIN.
    let mut gone_at: Option<Instant> = None;
    let mut buf = vec![0u8; READ_CHUNK];
    let timed_out = loop {
        if stdout.done() && stderr.done() {
            break false;
        }
        let now = Instant::now();
        if gone_at.is_some_and(|t| now >= t + EXIT_DRAIN) {
            break false;
        }
        if now >= deadline {
            match interrupt {
                Some(interrupt) if !interrupted => {
                    interrupt().map_err(|source| SessionError::Interrupt {
                        kind,
                        timeout,
                        source,
                    })?;
                    interrupted = true;
                    deadline = now + INTERRUPT_GRACE;
                    continue;
                }
                _ => break true,
            }
        }
        let until = gone_at.map_or(deadline, |t| deadline.min(t + EXIT_DRAIN));
        let want_write = written < request.len() && gone_at.is_none();
        // Which pipe each polled descriptor is: 0 stdin, 1 stdout, 2 stderr.
        let mut which = Vec::with_capacity(3);
        let mut fds = Vec::with_capacity(3);
        if gone_at.is_none() {
            // Even with nothing to write: POLLERR on stdin says the
            // interpreter is gone when its children still hold stdout.
            which.push(0);
            let interest = if want_write {
                Interest::Write
            } else {
                Interest::Errors
            };
            fds.push(PollFd::new(io.stdin.as_fd(), interest));
        }
        if !stdout.done() {
            which.push(1);
            fds.push(PollFd::new(io.stdout.as_fd(), Interest::Read));
        }
        if !stderr.done() {
            which.push(2);
            fds.push(PollFd::new(io.stderr.as_fd(), Interest::Read));
        }
        poll::poll(&mut fds, until.saturating_duration_since(now))
            .map_err(|e| io_err("polling", "pipes", e))?;
        let ready: Vec<u8> = which
            .iter()
            .zip(&fds)
            .filter(|(_, p)| p.ready)
            .map(|(w, _)| *w)
            .collect();
        if fds
            .first()
            .is_some_and(|p| p.error && p.interest != Interest::Read)
        {
            gone_at.get_or_insert_with(Instant::now);
        }
        drop(fds);
        for which in ready {
            match which {
                0 if !want_write || gone_at.is_some() => {}
                0 => {
                    let end = request.len().min(written + WRITE_CHUNK);
                    match (&io.stdin).write(&request[written..end]) {
                        Ok(n) => written += n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        // No reader left: the interpreter is gone.
                        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                            gone_at.get_or_insert_with(Instant::now);
                        }
                        Err(e) => return Err(io_err("writing", "stdin", e)),
                    }
                }
                _ => {
                    let (file, capture, pipe) = if which == 1 {
                        (&io.stdout, &mut stdout, "stdout")
                    } else {
                        (&io.stderr, &mut stderr, "stderr")
                    };
                    match (&*file).read(&mut buf) {
                        Ok(0) => {
                            capture.eof = true;
                            if capture.reply.is_none() {
                                gone_at.get_or_insert_with(Instant::now);
                            }
                        }
                        Ok(n) => capture.push(&buf[..n]),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(io_err("reading", pipe, e)),
                    }
                }
            }
        }
    };
    let exit = [stdout.reply, stderr.reply]
        .into_iter()
        .flatten()
        .find(|r| matches!(r, Reply::Exit(_)));
    let outcome = if let Some(reply) = exit {
        // An exit marker on either stream wins: the interpreter is ending.
        Outcome::Replied(reply)
    } else if timed_out {
        Outcome::TimedOut
    } else if let Some(reply) = stdout.reply.or(stderr.reply) {
        // The other stream ended without one: the code closed it, the
        // session goes on.
        Outcome::Replied(reply)
    } else {
        Outcome::Gone
    };
    Ok(Exchange {
        outcome,
        stdout,
        stderr,
        interrupted,
    })
}

#[cfg(test)]
mod tests;
