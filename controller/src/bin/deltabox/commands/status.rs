//! `deltabox status`.

use anyhow::Context as _;
use deltabox_controller::api::client::{ApiRequest, Client};
use deltabox_controller::api::render;

use crate::args::StatusArgs;

pub async fn run(args: &StatusArgs, client: &Client) -> anyhow::Result<()> {
    if args.json {
        return super::print_json(client, &ApiRequest::Status).await;
    }
    let status = client
        .status()
        .await
        .context("cannot get the daemon's status")?;
    super::print(&render::status_text(&status))
}
