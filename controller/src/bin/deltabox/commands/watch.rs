//! `deltabox watch CGROUP_PATH`.

use anyhow::Context as _;
use deltabox_controller::api::client::{ApiRequest, Client};

use crate::args::CgroupArgs;

pub async fn run(args: &CgroupArgs, client: &Client) -> anyhow::Result<()> {
    let path = args.cgroup.clone();
    if args.json {
        return super::print_json(client, &ApiRequest::Watch { path }).await;
    }
    let w = client
        .watch(&path)
        .await
        .with_context(|| format!("cannot watch {path}"))?;
    super::print(&format!(
        "watching {} (id {}, epoch {})\n",
        w.path, w.id, w.epoch
    ))
}
