//! `deltabox stats`.

use anyhow::Context as _;
use deltabox_controller::api::client::{ApiRequest, Client};
use deltabox_controller::metrics::stats::{StatsResponse, stats_text};

use crate::args::JsonArgs;

pub async fn run(args: &JsonArgs, client: &Client) -> anyhow::Result<()> {
    if args.json {
        return super::print_json(client, &ApiRequest::Stats).await;
    }
    let stats: StatsResponse = client
        .call(&ApiRequest::Stats)
        .await
        .context("cannot get the daemon's stats")?;
    super::print(&stats_text(&stats))
}
