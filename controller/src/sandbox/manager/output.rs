//! Collecting a one-shot command's stdout and stderr: both pipes read together (a
//! command that fills one pipe while the reader waits on the other would deadlock),
//! each capped, until both close or a deadline passes.

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::os::fd::AsFd;
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

/// Reads `stdout` and `stderr` until both reach end of file or `deadline` passes;
/// after that, `on_timeout` runs once (it kills the command) and reading goes on for at
/// most `grace` (a background process may hold the pipes open forever).
pub fn collect(
    stdout: File,
    stderr: File,
    deadline: Instant,
    grace: Duration,
    on_timeout: &dyn Fn(),
) -> std::io::Result<Collected> {
    let mut out = Collected::default();
    let mut streams = [Some(stdout), Some(stderr)];
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
        let ready: Vec<(usize, PollFlags)> = {
            let mut fds: Vec<PollFd<'_>> = open
                .iter()
                .filter_map(|&i| streams[i].as_ref())
                .map(|f| PollFd::new(f.as_fd(), PollFlags::POLLIN))
                .collect();
            match poll(
                &mut fds,
                PollTimeout::try_from(wait).unwrap_or(PollTimeout::MAX),
            ) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
            open.iter()
                .zip(&fds)
                .map(|(&i, p)| (i, p.revents().unwrap_or(PollFlags::empty())))
                .collect()
        };
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
        let out = collect(
            stdout,
            stderr,
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
    fn the_deadline_kills_and_returns() {
        let start = Instant::now();
        let out = run("echo started; sleep 30", Duration::from_millis(300));
        assert!(out.timed_out);
        assert_eq!(out.stdout, b"started\n");
        assert!(start.elapsed() < Duration::from_secs(10));
    }
}
