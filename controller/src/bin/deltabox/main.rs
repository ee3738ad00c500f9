//! `deltabox`: the CLI of DeltaBox, a thin client of deltaboxd's API. Arguments are
//! in `args`, one handler per subcommand in `commands/`, the client in the library.

mod args;
mod commands;

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use deltabox_controller::api::{
    self,
    client::{Client, ClientError},
};

use args::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            let causes = err.chain().map(ToString::to_string);
            eprintln!("deltabox: {}", api::join_causes(causes));
            ExitCode::from(exit_code(&err))
        }
    }
}

/// Runs the command; the exit code is 0 but for `exec` and `session run`, which exit
/// with the command's.
fn run(cli: Cli) -> anyhow::Result<u8> {
    // One or two requests per run: a current-thread runtime is all it takes.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    let client = Client::new(cli.socket);
    runtime.block_on(async {
        let done = match &cli.command {
            Command::Exec(args) => return commands::exec::run(args, &client).await,
            Command::Session(args) => return commands::session::run(args, &client).await,
            Command::Create(args) => commands::create::run(args, &client).await,
            Command::Ls(args) => commands::ls::run(args, &client).await,
            Command::Status(args) => commands::status::run(args, &client).await,
            Command::Checkpoint(args) => commands::checkpoint::run(args, &client).await,
            Command::Rollback(args) => commands::rollback::run(args, &client).await,
            Command::Branch(args) => commands::branch::run(args, &client).await,
            Command::Tree(args) => commands::tree::run(args, &client).await,
            Command::Diff(args) => commands::diff::run(args, &client).await,
            Command::Rm(args) => commands::rm::run(args, &client).await,
            Command::Gc(args) => commands::gc::run(args, &client).await,
            Command::Watch(args) => commands::watch::run(args, &client).await,
            Command::Unwatch(args) => commands::unwatch::run(args, &client).await,
            Command::Epoch(args) => commands::epoch::run(args, &client).await,
            Command::InodeStats(args) => commands::inode_stats::run(args, &client).await,
            Command::Stats(args) => commands::stats::run(args, &client).await,
        };
        done.map(|()| 0)
    })
}

/// Exit codes of failures, documented in `--help` and docs/cli.md (clap exits with 2
/// itself).
fn exit_code(err: &anyhow::Error) -> u8 {
    err.downcast_ref::<ClientError>()
        .map_or(1, ClientError::exit_code)
}
