//! One handler per subcommand: `run(args, client)`.

pub mod branch;
pub mod checkpoint;
pub mod create;
pub mod diff;
pub mod epoch;
pub mod exec;
pub mod gc;
pub mod inode_stats;
pub mod ls;
pub mod rm;
pub mod rollback;
pub mod session;
pub mod stats;
pub mod status;
pub mod tree;
pub mod unwatch;
pub mod watch;

use std::io::Write as _;

use anyhow::Context as _;
use deltabox_controller::api::client::{ApiRequest, Client};

/// `--json`: sends the request and prints the daemon's JSON as it came.
async fn print_json(client: &Client, request: &ApiRequest) -> anyhow::Result<()> {
    let (_, body) = client.send(request).await?;
    let mut text = String::from_utf8_lossy(&body).into_owned();
    text.push('\n');
    print(&text)
}

/// Writes to stderr, best effort (a closed stderr has nowhere to report to).
fn print_err(text: &str) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(text.as_bytes()).and_then(|()| err.flush());
}

/// Writes to stdout; a closed pipe (`| head`) is not an error.
fn print(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("cannot write to stdout"),
    }
}
