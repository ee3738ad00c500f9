//! `cargo xtask build-and-load`: build, then load and attach the eBPF programs on this
//! kernel with `deltaboxd load` (which prints what it attached), or detach them with
//! `deltaboxd unload`.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context as _, Result};

use crate::util::{display, run_cmd, step};
use crate::{build, setup};

/// Options of `cargo xtask build-and-load`.
#[derive(clap::Args, Debug, Default)]
pub struct Options {
    /// Detach and unpin the programs instead of loading them
    #[arg(long)]
    pub unload: bool,
    /// bpffs directory to pin programs and maps in (deltaboxd's default otherwise)
    #[arg(long, value_name = "DIR")]
    pub pin_dir: Option<PathBuf>,
    /// Build with the release profile
    #[arg(long)]
    pub release: bool,
}

pub fn run(options: &Options) -> Result<()> {
    setup::run(&setup::Options { quiet: true })?;
    let dir = build::build(options.release, true)?;
    let deltaboxd = dir.join("deltaboxd");
    let mut cmd = Command::new(&deltaboxd);
    cmd.arg(if options.unload { "unload" } else { "load" });
    if let Some(pin_dir) = &options.pin_dir {
        cmd.arg("--pin-dir").arg(pin_dir);
    }
    step(display(&cmd));
    run_cmd(&mut cmd).with_context(|| {
        format!(
            "{} the eBPF programs failed",
            if options.unload {
                "unloading"
            } else {
                "loading"
            }
        )
    })
}
