//! `deltabox diff FROM TO`.

use anyhow::Context as _;
use deltabox_controller::api::client::{ApiRequest, Client};
use deltabox_controller::api::sandbox_render;

use crate::args::DiffArgs;

pub async fn run(args: &DiffArgs, client: &Client) -> anyhow::Result<()> {
    let (from, to) = (args.from.clone(), args.to.clone());
    if args.json {
        return super::print_json(client, &ApiRequest::Diff { from, to }).await;
    }
    let diff = client
        .diff(&from, &to)
        .await
        .with_context(|| format!("cannot diff {from} and {to}"))?;
    super::print(&sandbox_render::diff_lines(&diff))
}
