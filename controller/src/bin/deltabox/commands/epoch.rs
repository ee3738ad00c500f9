//! `deltabox epoch CGROUP_PATH`.

use anyhow::Context as _;
use deltabox_controller::api::client::{ApiRequest, Client};

use crate::args::CgroupArgs;

pub async fn run(args: &CgroupArgs, client: &Client) -> anyhow::Result<()> {
    let path = args.cgroup.clone();
    if args.json {
        return super::print_json(client, &ApiRequest::Epoch { path }).await;
    }
    let w = client
        .advance_epoch(&path)
        .await
        .with_context(|| format!("cannot advance the epoch of {path}"))?;
    super::print(&format!(
        "{} is at epoch {} (id {}); its counts restart at zero\n",
        w.path, w.epoch, w.id
    ))
}
