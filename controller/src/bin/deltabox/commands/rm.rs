//! `deltabox rm SANDBOX...` and `deltabox rm --node NODE...`.

use anyhow::Context as _;
use deltabox_controller::api::client::Client;
use deltabox_controller::api::sandbox_render;
use deltabox_controller::api::sandbox_types::Removed;

use crate::args::RmArgs;

pub async fn run(args: &RmArgs, client: &Client) -> anyhow::Result<()> {
    let what = if args.node { "node" } else { "sandbox" };
    let mut all = Removed {
        nodes: Vec::new(),
        sandboxes: Vec::new(),
    };
    for id in &args.ids {
        let removed = if args.node {
            client.remove_node(id).await
        } else {
            client.remove_sandbox(id).await
        };
        let removed = match removed.with_context(|| format!("cannot remove {what} {id}")) {
            Ok(removed) => removed,
            Err(err) => {
                // What was removed before the failure is still reported.
                let some_removed = !(all.nodes.is_empty() && all.sandboxes.is_empty());
                if !args.json && some_removed {
                    super::print(&sandbox_render::removed_text(&all))?;
                }
                return Err(err);
            }
        };
        all.nodes.extend(removed.nodes);
        all.sandboxes.extend(removed.sandboxes);
    }
    if args.json {
        let mut text = serde_json::to_string(&all).context("cannot encode the JSON")?;
        text.push('\n');
        return super::print(&text);
    }
    super::print(&sandbox_render::removed_text(&all))
}
