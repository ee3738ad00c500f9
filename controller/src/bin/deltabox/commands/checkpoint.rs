//! `deltabox checkpoint SANDBOX [--label L]`.

use anyhow::Context as _;
use deltabox_controller::api::client::{ApiRequest, Client};
use deltabox_controller::api::sandbox_render;
use deltabox_controller::api::sandbox_types::CheckpointRequest;

use crate::args::CheckpointArgs;

pub async fn run(args: &CheckpointArgs, client: &Client) -> anyhow::Result<()> {
    let req = CheckpointRequest {
        label: args.label.clone(),
    };
    let sandbox = args.sandbox.clone();
    if args.json {
        return super::print_json(client, &ApiRequest::Checkpoint { sandbox, req }).await;
    }
    let node = client
        .checkpoint(&sandbox, &req)
        .await
        .with_context(|| format!("cannot checkpoint sandbox {sandbox}"))?;
    // The id alone on stdout, for `node=$(deltabox checkpoint ...)`.
    super::print(&format!("{}\n", node.id))?;
    super::print_err(&sandbox_render::checkpoint_timings(&node));
    Ok(())
}
