//! `deltabox exec SANDBOX [--cwd DIR] [--env K=V]... [--timeout S] -- CMD ARGS...`.

use std::io::Write as _;

use anyhow::Context as _;
use deltabox_controller::api::client::{ApiRequest, Client};
use deltabox_controller::api::sandbox_types::{ExecRequest, ExecResult};

use crate::args::ExecArgs;

/// What `timeout(1)` exits with when it killed the command.
pub const TIMED_OUT: u8 = 124;

/// Runs the command, its output streamed to ours as it comes; the exit code is the
/// command's (0 with `--json`, which prints the collected result at the end).
pub async fn run(args: &ExecArgs, client: &Client) -> anyhow::Result<u8> {
    let req = ExecRequest {
        argv: args.argv.clone(),
        env: args.env.iter().cloned().collect(),
        cwd: args.cwd.clone(),
        stdin: None,
        timeout_ms: args.timeout,
    };
    let sandbox = args.sandbox.clone();
    if args.json {
        super::print_json(client, &ApiRequest::Exec { sandbox, req }).await?;
        return Ok(0);
    }
    let context = || format!("cannot run {:?} in sandbox {sandbox}", args.argv[0]);
    let events = client
        .exec_stream(&sandbox, &req)
        .await
        .with_context(context)?;
    let mut write_failed = None;
    let result = events
        .finish(|is_err, bytes| {
            if is_err {
                write_err(bytes);
            } else if write_failed.is_none()
                && let Err(err) = write_out(bytes)
            {
                // Keep reading: the command is not stopped by a closed stdout of ours.
                write_failed = Some(err);
            }
        })
        .await
        .with_context(context)?;
    if let Some(err) = write_failed {
        return Err(err).context("cannot write to stdout");
    }
    if result.truncated {
        super::print_err("deltabox: output beyond the daemon's cap was dropped\n");
    }
    if result.timed_out {
        let secs = args.timeout.map_or(600.0, |ms| ms as f64 / 1000.0);
        super::print_err(&format!("deltabox: killed after the timeout of {secs} s\n"));
    }
    Ok(exit_code(&result))
}

/// Writes to stdout at once; a closed pipe (`| head`) is not an error.
fn write_out(bytes: &[u8]) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

/// Writes to stderr at once, best effort (a closed stderr has nowhere to report to).
fn write_err(bytes: &[u8]) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(bytes).and_then(|()| err.flush());
}

/// The shell's convention: the exit code, 128+N for signal N, 124 for a timeout.
pub fn exit_code(result: &ExecResult) -> u8 {
    if result.timed_out {
        return TIMED_OUT;
    }
    match (result.exit_code, result.signal) {
        // Exit codes are 0..=255 on Linux; the mask keeps an odd value in range.
        (Some(code), _) => (code & 0xff) as u8,
        (None, Some(signal)) => (128 + (signal & 0x7f)) as u8,
        (None, None) => 1,
    }
}
