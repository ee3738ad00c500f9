//! Reading a one-shot command's stdout and stderr: both pipes read together (a command
//! that fills one pipe while the reader waits on the other would deadlock), each
//! capped, until both close or a deadline passes. What is read goes to a sink as it
//! comes: a buffer for the collected `exec`, the client's stream for the streamed one.

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::sandbox::ops::{ExecSink, OutputStream};

/// Bytes kept per stream; the rest is read and dropped.
pub const OUTPUT_CAP: usize = 8 << 20;

/// How a read went.
#[derive(Debug, Default)]
pub struct Collected {
    /// Bytes handed to the sink from stdout (at most [`OUTPUT_CAP`]).
    pub stdout_bytes: usize,
    /// Bytes handed to the sink from stderr (at most [`OUTPUT_CAP`]).
    pub stderr_bytes: usize,
    /// Something was dropped: output beyond the cap, or a chunk the sink did not take
    /// before the deadline.
    pub truncated: bool,
    /// The deadline passed before both pipes closed.
    pub timed_out: bool,
}

/// The sink of the collected `exec`: both streams in memory.
#[derive(Debug, Default)]
pub struct Buffers {
    /// stdout, up to the cap.
    pub stdout: Vec<u8>,
    /// stderr, up to the cap.
    pub stderr: Vec<u8>,
}

impl ExecSink for Buffers {
    fn output(&mut self, stream: OutputStream, bytes: &[u8], _until: Instant) -> bool {
        match stream {
            OutputStream::Stdout => self.stdout.extend_from_slice(bytes),
            OutputStream::Stderr => self.stderr.extend_from_slice(bytes),
        }
        true
    }
}

/// How long output is still read after the command exited: what it wrote just before
/// is in the pipes, but a background process it left may hold them open forever.
/// Time spent waiting for the sink does not count: a slow consumer must not lose the
/// last pipeful.
const EXIT_DRAIN: Duration = Duration::from_millis(200);

/// Reads `stdout` and `stderr` into `sink` until both reach end of file, or the command
/// (`exited`: its pidfd, readable once it has exited) has exited and [`EXIT_DRAIN`] has
/// passed, or `deadline` passes; after that, `on_timeout` runs once (it kills the
/// command) and reading goes on for at most `grace`.
pub fn collect(
    stdout: File,
    stderr: File,
    exited: Option<BorrowedFd<'_>>,
    deadline: Instant,
    grace: Duration,
    on_timeout: &dyn Fn(),
    sink: &mut dyn ExecSink,
) -> std::io::Result<Collected> {
    let mut out = Collected::default();
    let mut streams = [Some(stdout), Some(stderr)];
    let mut watch_exit = exited;
    // After the timeout: the end of the grace period.
    let mut grace_end: Option<Instant> = None;
    // After the command exited: the end of the drain.
    let mut drain_end: Option<Instant> = None;
    let mut chunk = vec![0u8; 64 << 10];
    while streams.iter().any(Option::is_some) {
        let now = Instant::now();
        let sink_limit = grace_end.unwrap_or(deadline);
        let limit = drain_end.map_or(sink_limit, |d| d.min(sink_limit));
        if now >= limit {
            // Past the grace period, or the command has exited: no timeout to declare.
            if grace_end.is_some() || drain_end.is_some() {
                break;
            }
            out.timed_out = true;
            on_timeout();
            grace_end = Some(now + grace);
            continue;
        }
        let wait = (limit - now).as_millis().min(i32::MAX as u128) as i32;
        let open: Vec<usize> = (0..streams.len())
            .filter(|&i| streams[i].is_some())
            .collect();
        let (ready, has_exited): (Vec<(usize, PollFlags)>, bool) = {
            let mut fds: Vec<PollFd<'_>> = open
                .iter()
                .filter_map(|&i| streams[i].as_ref())
                .map(|f| PollFd::new(f.as_fd(), PollFlags::POLLIN))
                .collect();
            if let Some(pidfd) = watch_exit {
                fds.push(PollFd::new(pidfd, PollFlags::POLLIN));
            }
            match poll(
                &mut fds,
                PollTimeout::try_from(wait).unwrap_or(PollTimeout::MAX),
            ) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
            let has_exited = watch_exit.is_some()
                && fds
                    .last()
                    .and_then(PollFd::revents)
                    .is_some_and(|r| !r.is_empty());
            let ready = open
                .iter()
                .zip(&fds)
                .map(|(&i, p)| (i, p.revents().unwrap_or(PollFlags::empty())))
                .collect();
            (ready, has_exited)
        };
        if has_exited {
            watch_exit = None;
            drain_end = Some(Instant::now() + EXIT_DRAIN);
        }
        for (i, revents) in ready {
            if revents.is_empty() {
                continue;
            }
            let Some(file) = streams[i].as_mut() else {
                continue;
            };
            match file.read(&mut chunk) {
                Ok(0) => streams[i] = None,
                Ok(n) => {
                    let (stream, sent) = if i == 0 {
                        (OutputStream::Stdout, &mut out.stdout_bytes)
                    } else {
                        (OutputStream::Stderr, &mut out.stderr_bytes)
                    };
                    let room = OUTPUT_CAP.saturating_sub(*sent);
                    let take = n.min(room);
                    if n > room {
                        out.truncated = true;
                    }
                    if take > 0 {
                        let asked = Instant::now();
                        if sink.output(stream, &chunk[..take], sink_limit) {
                            *sent += take;
                        } else {
                            out.truncated = true;
                        }
                        if let Some(end) = drain_end.as_mut() {
                            *end += asked.elapsed();
                        }
                    }
                }
                Err(e)
                    if e.kind() == ErrorKind::Interrupted || e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    fn run(script: &str, timeout: Duration) -> (Collected, Buffers) {
        run_watching(script, timeout, false)
    }

    fn run_watching(script: &str, timeout: Duration, watch: bool) -> (Collected, Buffers) {
        let mut buffers = Buffers::default();
        let out = run_into(script, timeout, watch, &mut buffers);
        (out, buffers)
    }

    fn run_into(
        script: &str,
        timeout: Duration,
        watch: bool,
        sink: &mut dyn ExecSink,
    ) -> Collected {
        let mut child = Command::new("sh")
            .args(["-c", script])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let stdout = File::from(std::os::fd::OwnedFd::from(child.stdout.take().unwrap()));
        let stderr = File::from(std::os::fd::OwnedFd::from(child.stderr.take().unwrap()));
        let pidfd = crate::cr::pidfd::Pidfd::open(nix::unistd::Pid::from_raw(pid)).unwrap();
        let out = collect(
            stdout,
            stderr,
            watch.then(|| pidfd.as_fd()),
            Instant::now() + timeout,
            Duration::from_secs(2),
            &|| {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            },
            sink,
        )
        .unwrap();
        child.wait().unwrap();
        out
    }

    use std::os::unix::process::CommandExt;

    #[test]
    fn both_streams_are_collected_without_deadlock() {
        // 1 MiB on stderr while stdout is still open: a sequential reader would block.
        let (out, buf) = run(
            "head -c 1048576 /dev/zero >&2; echo done",
            Duration::from_secs(30),
        );
        assert_eq!(buf.stderr.len(), 1 << 20);
        assert_eq!(out.stderr_bytes, 1 << 20);
        assert_eq!(buf.stdout, b"done\n");
        assert!(!out.timed_out && !out.truncated);
    }

    #[test]
    fn a_background_child_holding_the_pipes_does_not_hold_the_result() {
        let start = Instant::now();
        let (out, buf) = run_watching("echo hi; sleep 30 & exit 0", Duration::from_secs(20), true);
        assert_eq!(buf.stdout, b"hi\n");
        assert!(!out.timed_out, "the command itself exited");
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn the_deadline_kills_and_returns() {
        let start = Instant::now();
        let (out, buf) = run("echo started; sleep 30", Duration::from_millis(300));
        assert!(out.timed_out);
        assert_eq!(buf.stdout, b"started\n");
        assert!(start.elapsed() < Duration::from_secs(10));
    }

    /// A sink that takes each chunk only after a pause, recording when it came.
    struct Slow {
        pause: Duration,
        got: Vec<(OutputStream, Vec<u8>, Instant)>,
    }

    impl ExecSink for Slow {
        fn output(&mut self, stream: OutputStream, bytes: &[u8], until: Instant) -> bool {
            std::thread::sleep(
                self.pause
                    .min(until.saturating_duration_since(Instant::now())),
            );
            self.got.push((stream, bytes.to_vec(), Instant::now()));
            Instant::now() < until
        }
    }

    #[test]
    fn output_reaches_the_sink_while_the_command_runs() {
        let start = Instant::now();
        let mut sink = Slow {
            pause: Duration::ZERO,
            got: Vec::new(),
        };
        let out = run_into(
            "echo one; sleep 1; echo two >&2",
            Duration::from_secs(20),
            true,
            &mut sink,
        );
        assert!(!out.timed_out && !out.truncated);
        let streams: Vec<_> = sink.got.iter().map(|(s, b, _)| (*s, b.clone())).collect();
        assert_eq!(
            streams,
            [
                (OutputStream::Stdout, b"one\n".to_vec()),
                (OutputStream::Stderr, b"two\n".to_vec())
            ]
        );
        assert!(
            sink.got[0].2 - start < Duration::from_millis(900),
            "first chunk late"
        );
    }

    #[test]
    fn a_slow_sink_loses_nothing_after_the_exit() {
        // 256 KiB (four pipefuls) into a sink that takes 300 ms per chunk: the command
        // blocks on its writes, then exits with a full pipe that must still be read.
        let mut sink = Slow {
            pause: Duration::from_millis(300),
            got: Vec::new(),
        };
        let out = run_into(
            "head -c 262144 /dev/zero",
            Duration::from_secs(60),
            true,
            &mut sink,
        );
        let total: usize = sink.got.iter().map(|(_, b, _)| b.len()).sum();
        assert_eq!(total, 262_144);
        assert_eq!(out.stdout_bytes, 262_144);
        assert!(!out.truncated && !out.timed_out);
    }

    #[test]
    fn output_beyond_the_cap_is_dropped() {
        let (out, buf) = run(
            &format!("head -c {} /dev/zero; echo tail >&2", OUTPUT_CAP + 4096),
            Duration::from_secs(60),
        );
        assert_eq!(buf.stdout.len(), OUTPUT_CAP);
        assert_eq!(buf.stderr, b"tail\n");
        assert!(out.truncated && !out.timed_out);
    }
}
