//! `deltabox tree SANDBOX|NODE`.

use anyhow::Context as _;
use deltabox_controller::api::client::{ApiRequest, Client, ClientError};

use crate::args::TreeArgs;

pub async fn run(args: &TreeArgs, client: &Client) -> anyhow::Result<()> {
    let id = args.id.clone();
    let as_sandbox = ApiRequest::SandboxTree {
        sandbox: id.clone(),
    };
    let as_node = ApiRequest::NodeTree { node: id.clone() };
    // A sandbox id first; if no sandbox has it, a node id.
    let is_unknown_sandbox = |err: &ClientError| matches!(err, ClientError::Api { kind, .. } if kind == "unknown_sandbox");
    if args.json {
        return match super::print_json(client, &as_sandbox).await {
            Err(err) if err.downcast_ref().is_some_and(is_unknown_sandbox) => {
                super::print_json(client, &as_node).await
            }
            other => other,
        };
    }
    let view = match client.sandbox_tree(&id).await {
        Err(err) if is_unknown_sandbox(&err) => client.node_tree(&id).await,
        other => other,
    }
    .with_context(|| format!("cannot get the tree of {id}"))?;
    let mut text = view.text;
    if !text.ends_with('\n') {
        text.push('\n');
    }
    super::print(&text)
}
