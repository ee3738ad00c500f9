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
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let causes = err.chain().map(ToString::to_string);
            eprintln!("deltabox: {}", api::join_causes(causes));
            ExitCode::from(exit_code(&err))
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    // One or two requests per run: a current-thread runtime is all it takes.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    let client = Client::new(cli.socket);
    runtime.block_on(async {
        match &cli.command {
            Command::Status(args) => commands::status::run(args, &client).await,
            Command::Watch(args) => commands::watch::run(args, &client).await,
            Command::Unwatch(args) => commands::unwatch::run(args, &client).await,
            Command::Epoch(args) => commands::epoch::run(args, &client).await,
            Command::InodeStats(args) => commands::inode_stats::run(args, &client).await,
        }
    })
}

/// Exit codes, documented in `--help` and docs/cli.md (clap exits with 2 itself).
fn exit_code(err: &anyhow::Error) -> u8 {
    err.downcast_ref::<ClientError>()
        .map_or(1, ClientError::exit_code)
}
