//! A controller process for the DeltaCR crash tests, which SIGKILL it mid-operation.
//!
//! - `cr-controller checkpoints PID TEMPLATES N`: checkpoints PID N times, printing
//!   `template=<pid> cgroup=<dir>` after each (templates are kept, never destroyed),
//!   then waits to be killed.
//! - `cr-controller restores PID TEMPLATES SESSION`: checkpoints PID once, prints the
//!   same line, then restores into SESSION and kills the restored process, forever.

use std::path::PathBuf;

use deltabox_controller::cr::{self, CheckpointOptions, RestoreOptions};
use nix::unistd::Pid;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let pid = Pid::from_raw(args.get(1).map_or(Ok(0), |s| s.parse())?);
    let opts = CheckpointOptions {
        template_cgroups: PathBuf::from(args.get(2).cloned().unwrap_or_default()),
        ..CheckpointOptions::default()
    };
    let checkpoint = || -> anyhow::Result<cr::Template> {
        let template = cr::checkpoint(pid, &opts)?;
        println!(
            "template={} cgroup={}",
            template.pid(),
            template.cgroup_path().display()
        );
        Ok(template)
    };
    match args.first().map(String::as_str) {
        Some("checkpoints") => {
            let n: usize = args.get(3).map_or(Ok(1), |s| s.parse())?;
            for _ in 0..n {
                // Kept: a crashed controller drops nothing either.
                std::mem::forget(checkpoint()?);
            }
        }
        Some("restores") => {
            let template = checkpoint()?;
            let restore = RestoreOptions {
                cgroup: Some(PathBuf::from(args.get(3).cloned().unwrap_or_default())),
                ..RestoreOptions::default()
            };
            loop {
                template.restore(&restore)?.kill()?;
            }
        }
        other => anyhow::bail!("unknown mode {other:?}"),
    }
    loop {
        std::thread::park();
    }
}
