//! `deltabox status [SANDBOX]`.

use anyhow::Context as _;
use deltabox_controller::api::client::{ApiRequest, Client};
use deltabox_controller::api::{render, sandbox_render};

use crate::args::StatusArgs;

pub async fn run(args: &StatusArgs, client: &Client) -> anyhow::Result<()> {
    if let Some(sandbox) = &args.sandbox {
        let sandbox = sandbox.clone();
        if args.json {
            return super::print_json(client, &ApiRequest::GetSandbox { sandbox }).await;
        }
        let info = client
            .sandbox(&sandbox)
            .await
            .with_context(|| format!("cannot get sandbox {sandbox}"))?;
        return super::print(&sandbox_render::sandbox_text(
            &info,
            sandbox_render::now_ms(),
        ));
    }
    if args.json {
        return super::print_json(client, &ApiRequest::Status).await;
    }
    let status = client
        .status()
        .await
        .context("cannot get the daemon's status")?;
    super::print(&render::status_text(&status))
}
