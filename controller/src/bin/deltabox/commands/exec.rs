//! `deltabox exec SANDBOX [--cwd DIR] [--env K=V]... [--timeout S] -- CMD ARGS...`.

use anyhow::Context as _;
use deltabox_controller::api::client::{ApiRequest, Client};
use deltabox_controller::api::sandbox_types::{ExecRequest, ExecResult};

use crate::args::ExecArgs;

/// What `timeout(1)` exits with when it killed the command.
pub const TIMED_OUT: u8 = 124;

/// Runs the command; the exit code is the command's (0 with `--json`).
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
    let result = client
        .exec(&sandbox, &req)
        .await
        .with_context(|| format!("cannot run {:?} in sandbox {sandbox}", args.argv[0]))?;
    super::print(&result.stdout)?;
    super::print_err(&result.stderr);
    if result.truncated {
        super::print_err("deltabox: output beyond the daemon's cap was dropped\n");
    }
    if result.timed_out {
        let secs = args.timeout.map_or(600.0, |ms| ms as f64 / 1000.0);
        super::print_err(&format!("deltabox: killed after the timeout of {secs} s\n"));
    }
    Ok(exit_code(&result))
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
