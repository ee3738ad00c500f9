//! `deltabox rollback SANDBOX NODE [--files-only | --processes-only]
//! [--warm-up | --no-warm-up]`.

use anyhow::Context as _;
use deltabox_controller::api::client::{ApiRequest, Client};
use deltabox_controller::api::sandbox_render;
use deltabox_controller::api::sandbox_types::{RollbackMode, RollbackRequest};

use crate::args::RollbackArgs;

pub async fn run(args: &RollbackArgs, client: &Client) -> anyhow::Result<()> {
    let mode = match (args.files_only, args.processes_only) {
        (true, _) => RollbackMode::FilesOnly,
        (_, true) => RollbackMode::ProcessesOnly,
        _ => RollbackMode::All,
    };
    let req = RollbackRequest {
        node: args.node.clone(),
        mode,
        warm_up: match (args.warm_up, args.no_warm_up) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        },
    };
    let sandbox = args.sandbox.clone();
    if args.json {
        return super::print_json(client, &ApiRequest::Rollback { sandbox, req }).await;
    }
    let result = client
        .rollback(&sandbox, &req)
        .await
        .with_context(|| format!("cannot roll sandbox {sandbox} back to {}", args.node))?;
    super::print(&sandbox_render::rollback_text(&result))
}
