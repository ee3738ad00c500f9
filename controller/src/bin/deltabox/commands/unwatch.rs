//! `deltabox unwatch CGROUP_PATH`.

use anyhow::Context as _;
use deltabox_controller::api::client::{ApiRequest, Client};

use crate::args::CgroupArgs;

pub async fn run(args: &CgroupArgs, client: &Client) -> anyhow::Result<()> {
    let path = args.cgroup.clone();
    if args.json {
        return super::print_json(client, &ApiRequest::Unwatch { path }).await;
    }
    let w = client
        .unwatch(&path)
        .await
        .with_context(|| format!("cannot unwatch {path}"))?;
    super::print(&format!(
        "stopped watching {} (id {}, was at epoch {}); its counters are dropped\n",
        w.path, w.id, w.epoch
    ))
}
