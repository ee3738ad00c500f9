//! `deltabox inode-stats [--cgroup CGROUP_PATH]`.

use anyhow::Context as _;
use deltabox_controller::api::client::{ApiRequest, Client};
use deltabox_controller::api::render;

use crate::args::InodeStatsArgs;

pub async fn run(args: &InodeStatsArgs, client: &Client) -> anyhow::Result<()> {
    let cgroup = args.cgroup.clone();
    if args.json {
        return super::print_json(client, &ApiRequest::InodeStats { cgroup }).await;
    }
    let stats = client
        .inode_stats(cgroup.as_deref())
        .await
        .context("cannot read the inode stats")?;
    super::print(&render::inode_stats_table(&stats.stats))
}
