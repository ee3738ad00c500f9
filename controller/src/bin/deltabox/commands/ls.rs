//! `deltabox ls`.

use anyhow::Context as _;
use deltabox_controller::api::client::{ApiRequest, Client};
use deltabox_controller::api::sandbox_render;

use crate::args::JsonArgs;

pub async fn run(args: &JsonArgs, client: &Client) -> anyhow::Result<()> {
    if args.json {
        return super::print_json(client, &ApiRequest::ListSandboxes).await;
    }
    let list = client
        .list_sandboxes()
        .await
        .context("cannot list the sandboxes")?;
    super::print(&sandbox_render::sandboxes_table(
        &list.sandboxes,
        sandbox_render::now_ms(),
    ))
}
