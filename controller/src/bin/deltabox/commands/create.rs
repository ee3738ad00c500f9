//! `deltabox create [--rootfs DIR] [--memory SIZE] [--cpus N] [--pids N] [--auto-checkpoint]`.

use anyhow::Context as _;
use deltabox_controller::api::client::{ApiRequest, Client};
use deltabox_controller::api::sandbox_types::{CreateSandbox, LimitsSpec};

use crate::args::CreateArgs;

pub async fn run(args: &CreateArgs, client: &Client) -> anyhow::Result<()> {
    // The daemon resolves the path in its own working directory: send it absolute.
    let rootfs = match &args.rootfs {
        Some(dir) => Some(
            std::path::absolute(dir)
                .with_context(|| format!("cannot make {} absolute", dir.display()))?
                .display()
                .to_string(),
        ),
        None => None,
    };
    let req = CreateSandbox {
        rootfs,
        limits: LimitsSpec {
            memory_bytes: args.memory,
            cpus: args.cpus,
            pids: args.pids,
        },
        auto_checkpoint: args.auto_checkpoint,
    };
    if args.json {
        return super::print_json(client, &ApiRequest::CreateSandbox(req)).await;
    }
    let sandbox = client
        .create_sandbox(&req)
        .await
        .context("cannot create a sandbox")?;
    super::print(&format!("{}\n", sandbox.id))
}
