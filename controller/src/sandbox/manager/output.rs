//! Collecting a one-shot command's stdout and stderr: both pipes read together (a
//! command that fills one pipe while the reader waits on the other would deadlock),
//! each capped, until both close or a deadline passes.

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

/// Bytes kept per stream; the rest is read and dropped.
pub const OUTPUT_CAP: usize = 8 << 20;

/// What was read.
#[derive(Debug, Default)]
pub struct Collected {
    /// stdout, up to the cap.
    pub stdout: Vec<u8>,
    /// stderr, up to the cap.
    pub stderr: Vec<u8>,
    /// Something beyond the cap was dropped.
    pub truncated: bool,
    /// The deadline passed before both pipes closed.
    pub timed_out: bool,
}

/// How long output is still read after the command exited: what it wrote just before
/// is in the pipes, but a background process it left may hold them open forever.
const EXIT_DRAIN: Duration = Duration::from_millis(200);

/// Reads `stdout` and `stderr` until both reach end of file, or the command (`exited`:
/// its pidfd, readable once it has exited) has exited and [`EXIT_DRAIN`] has passed, or
/// `deadline` passes; after that, `on_timeout` runs once (it kills the command) and
/// reading goes on for at most `grace`.
pub fn collect(
    stdout: File,
    stderr: File,
    exited: Option<BorrowedFd<'_>>,
    deadline: Instant,
    grace: Duration,
    on_timeout: &dyn Fn(),
) -> std::io::Result<Collected> {
    let mut out = Collected::default();
    let mut streams = [Some(stdout), Some(stderr)];
    let mut watch_exit = exited;
    let mut hard_deadline = None;
    let mut chunk = vec![0u8; 64 << 10];
    while streams.iter().any(Option::is_some) {
        let now = Instant::now();
        let limit = hard_deadline.unwrap_or(deadline);
        if now >= limit {
            if hard_deadline.is_some() {
                break;
            }
            out.timed_out = true;
            on_timeout();
            hard_deadline = Some(now + grace);
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
            if hard_deadline.is_none() {
                hard_deadline = Some(Instant::now() + EXIT_DRAIN);
            }
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
                    let buf = if i == 0 {
                        &mut out.stdout
                    } else {
                        &mut out.stderr
                    };
                    let room = OUTPUT_CAP.saturating_sub(buf.len());
                    buf.extend_from_slice(&chunk[..n.min(room)]);
                    if n > room {
                        out.truncated = true;
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

    fn run(script: &str, timeout: Duration) -> Collected {
        run_watching(script, timeout, false)
    }

    fn run_watching(script: &str, timeout: Duration, watch: bool) -> Collected {
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
        )
        .unwrap();
        child.wait().unwrap();
        out
    }

    use std::os::unix::process::CommandExt;

    #[test]
    fn both_streams_are_collected_without_deadlock() {
        // 1 MiB on stderr while stdout is still open: a sequential reader would block.
        let out = run(
            "head -c 1048576 /dev/zero >&2; echo done",
            Duration::from_secs(30),
        );
        assert_eq!(out.stderr.len(), 1 << 20);
        assert_eq!(out.stdout, b"done\n");
        assert!(!out.timed_out && !out.truncated);
    }

    #[test]
    fn a_background_child_holding_the_pipes_does_not_hold_the_result() {
        let start = Instant::now();
        let out = run_watching("echo hi; sleep 30 & exit 0", Duration::from_secs(20), true);
        assert_eq!(out.stdout, b"hi\n");
        assert!(!out.timed_out, "the command itself exited");
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn the_deadline_kills_and_returns() {
        let start = Instant::now();
        let out = run("echo started; sleep 30", Duration::from_millis(300));
        assert!(out.timed_out);
        assert_eq!(out.stdout, b"started\n");
        assert!(start.elapsed() < Duration::from_secs(10));
    }
}
