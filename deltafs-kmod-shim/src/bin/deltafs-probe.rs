//! `deltafs-probe`: checks that this kernel's FUSE passthrough works the way DeltaFS needs.
//!
//! Exit codes: 0 passthrough works, 1 it does not (the message says what is missing and
//! how to get it), 2 bad arguments. Needs root. `cargo xtask setup` runs it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use deltafs::probe::{self, ProbeError, ProbeReport};

const USAGE: &str = "usage: deltafs-probe [--dir DIR] [--timeout-secs N]";

fn main() -> ExitCode {
    let (dir, timeout) = match parse_args(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(message) => {
            eprintln!("deltafs-probe: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(dir, timeout) {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("deltafs-probe: {}", chain(&err));
            eprintln!("  fix: {}", err.hint());
            ExitCode::FAILURE
        }
    }
}

fn run(dir: Option<PathBuf>, timeout: Duration) -> Result<ProbeReport, ProbeError> {
    let dir = dir.unwrap_or_else(std::env::temp_dir);
    probe::passthrough_probe_in(&dir, timeout)
}

fn parse_args(
    mut args: impl Iterator<Item = String>,
) -> Result<(Option<PathBuf>, Duration), String> {
    let mut dir = None;
    let mut timeout = probe::DEFAULT_TIMEOUT;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--dir" => dir = Some(PathBuf::from(args.next().ok_or("--dir needs a value")?)),
            "--timeout-secs" => {
                let value = args.next().ok_or("--timeout-secs needs a value")?;
                let secs = value
                    .parse()
                    .map_err(|_| format!("invalid --timeout-secs {value:?}"))?;
                timeout = Duration::from_secs(secs);
            }
            "-h" | "--help" => return Err("help requested".to_owned()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok((dir, timeout))
}

/// The error and its sources, `: `-separated.
fn chain(err: &dyn std::error::Error) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(err) = source {
        message.push_str(": ");
        message.push_str(&err.to_string());
        source = err.source();
    }
    message
}
