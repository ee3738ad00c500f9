//! `deltabox gc`.

use anyhow::Context as _;
use deltabox_controller::api::client::{ApiRequest, Client};
use deltabox_controller::api::sandbox_render;

use crate::args::JsonArgs;

pub async fn run(args: &JsonArgs, client: &Client) -> anyhow::Result<()> {
    if args.json {
        return super::print_json(client, &ApiRequest::Gc).await;
    }
    let gc = client.gc().await.context("cannot collect garbage")?;
    super::print(&sandbox_render::gc_text(&gc))
}
