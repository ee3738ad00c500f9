//! `deltabox branch NODE [--count N]`.

use anyhow::Context as _;
use deltabox_controller::api::client::{ApiRequest, Client};
use deltabox_controller::api::sandbox_render;
use deltabox_controller::api::sandbox_types::BranchRequest;

use crate::args::BranchArgs;

pub async fn run(args: &BranchArgs, client: &Client) -> anyhow::Result<()> {
    let req = BranchRequest { count: args.count };
    let node = args.node.clone();
    if args.json {
        return super::print_json(client, &ApiRequest::Branch { node, req }).await;
    }
    let result = client
        .branch(&node, &req)
        .await
        .with_context(|| format!("cannot branch from node {node}"))?;
    // The ids alone on stdout, one per line, for `for sb in $(deltabox branch ...)`.
    let ids: String = result
        .sandboxes
        .iter()
        .map(|s| format!("{}\n", s.id))
        .collect();
    super::print(&ids)?;
    super::print_err(&sandbox_render::branch_timings(&result));
    Ok(())
}
