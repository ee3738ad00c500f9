//! `deltabox session start|run|stop`.

use std::io::Read as _;

use anyhow::Context as _;
use deltabox_controller::api::client::{ApiRequest, Client};
use deltabox_controller::api::sandbox_types::{SessionRun, SessionStart};

use crate::args::{SessionArgs, SessionCommand, SessionKind};

/// Runs a session subcommand; `run` exits with the code's status (0 with `--json`).
pub async fn run(args: &SessionArgs, client: &Client) -> anyhow::Result<u8> {
    match &args.command {
        SessionCommand::Start(a) => {
            let kind = match a.kind {
                SessionKind::Bash => "bash",
                SessionKind::Python => "python",
            };
            let req = SessionStart { kind: kind.into() };
            let sandbox = a.sandbox.clone();
            if a.json {
                super::print_json(client, &ApiRequest::SessionStart { sandbox, req }).await?;
                return Ok(0);
            }
            let session = client
                .session_start(&sandbox, &req)
                .await
                .with_context(|| format!("cannot start a {kind} session in sandbox {sandbox}"))?;
            super::print(&format!("{}\n", session.id))?;
            Ok(0)
        }
        SessionCommand::Run(a) => {
            let code = if a.code == "-" {
                let mut code = String::new();
                std::io::stdin()
                    .read_to_string(&mut code)
                    .context("cannot read the code from stdin")?;
                code
            } else {
                a.code.clone()
            };
            let req = SessionRun {
                code,
                timeout_ms: a.timeout,
            };
            let (sandbox, session) = (a.sandbox.clone(), a.session.clone());
            if a.json {
                let request = ApiRequest::SessionRun {
                    sandbox,
                    session,
                    req,
                };
                super::print_json(client, &request).await?;
                return Ok(0);
            }
            let result = client
                .session_run(&sandbox, &session, &req)
                .await
                .with_context(|| format!("cannot run code in session {session} of {sandbox}"))?;
            super::print(&result.stdout)?;
            super::print_err(&result.stderr);
            if result.truncated {
                super::print_err("deltabox: output beyond the daemon's cap was dropped\n");
            }
            if result.timed_out {
                super::print_err("deltabox: interrupted by the timeout\n");
                return Ok(super::exec::TIMED_OUT);
            }
            Ok((result.status & 0xff) as u8)
        }
        SessionCommand::Stop(a) => {
            let (sandbox, session) = (a.sandbox.clone(), a.session.clone());
            if a.json {
                super::print_json(client, &ApiRequest::SessionStop { sandbox, session }).await?;
                return Ok(0);
            }
            let stopped = client
                .session_stop(&sandbox, &session)
                .await
                .with_context(|| format!("cannot stop session {session} of {sandbox}"))?;
            super::print(&format!(
                "stopped {} session {}\n",
                stopped.kind, stopped.id
            ))?;
            Ok(0)
        }
    }
}
