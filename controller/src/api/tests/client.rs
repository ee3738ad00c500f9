//! The client against the router served on a temporary Unix socket.

use super::Harness;
use crate::api::client::{ApiRequest, Client, ClientError};
use crate::api::server::api_router;

async fn serve_on_temp_socket(h: &Harness) -> (tempfile::TempDir, Client) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let router = api_router(h.service.clone());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    (dir, Client::new(path))
}

#[tokio::test]
async fn client_round_trips() {
    let h = Harness::new();
    let (_dir, client) = serve_on_temp_socket(&h).await;
    let id = h.id_of("deltabox/demo");

    let watched = client.watch("deltabox/demo").await.unwrap();
    assert_eq!((watched.id, watched.epoch), (id, 1));
    h.tracker.record_write(id, 3, "file with space", 7);
    let stats = client
        .inode_stats(Some(&h.root().join("deltabox/demo").display().to_string()))
        .await
        .unwrap();
    assert_eq!(stats.stats.len(), 1);
    assert_eq!(stats.stats[0].record.name, "file with space");
    assert_eq!(
        client.advance_epoch("deltabox/demo").await.unwrap().epoch,
        2
    );
    assert_eq!(client.cgroups().await.unwrap().watched.len(), 1);
    let status = client.status().await.unwrap();
    assert_eq!(status.counters.write_syscalls, 1);
    assert_eq!(client.unwatch("deltabox/demo").await.unwrap().epoch, 2);

    // `--json` prints the daemon's bytes as they came.
    let (code, raw) = client.send(&ApiRequest::Cgroups).await.unwrap();
    assert_eq!(code, 200);
    assert_eq!(&raw[..], br#"{"watched":[]}"#);

    match client.unwatch("deltabox/demo").await.unwrap_err() {
        ClientError::Api {
            status,
            kind,
            message,
        } => {
            assert_eq!((status, kind.as_str()), (404, "not_watched"));
            assert!(message.contains("is not watched"), "{message}");
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn client_names_a_missing_or_dead_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    let err = Client::new(&path).status().await.unwrap_err();
    assert!(matches!(err, ClientError::NotRunning { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "deltaboxd is not running (no socket at {}): start it with `deltaboxd serve`",
            path.display()
        )
    );
    // A socket file nobody listens on: what a killed daemon leaves.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let err = Client::new(&path).status().await.unwrap_err();
    assert!(matches!(err, ClientError::StaleSocket { .. }), "{err:?}");
}

#[tokio::test]
async fn client_drives_every_sandbox_route() {
    use crate::api::sandbox_types::{
        BranchRequest, CheckpointRequest, CreateSandbox, ExecRequest, RollbackMode,
        RollbackRequest, SessionRun, SessionStart,
    };

    let h = Harness::new();
    let (_dir, client) = serve_on_temp_socket(&h).await;
    let sb = client
        .create_sandbox(&CreateSandbox::default())
        .await
        .unwrap();
    assert_eq!(
        client.list_sandboxes().await.unwrap().sandboxes,
        std::slice::from_ref(&sb)
    );
    assert_eq!(client.sandbox(&sb.id[..4]).await.unwrap().id, sb.id);
    let exec = |argv: &[&str]| ExecRequest {
        argv: argv.iter().map(|a| (*a).to_owned()).collect(),
        timeout_ms: Some(5000),
        ..ExecRequest::default()
    };
    let out = client.exec(&sb.id, &exec(&["echo", "a b"])).await.unwrap();
    assert_eq!(out.stdout, "a b\n");
    let kind = SessionStart {
        kind: "bash".into(),
    };
    let session = client.session_start(&sb.id, &kind).await.unwrap();
    let run = SessionRun {
        code: "x=1".into(),
        timeout_ms: None,
    };
    let ran = client.session_run(&sb.id, &session.id, &run).await.unwrap();
    assert_eq!(ran.stdout, "x=1\n");
    let first = client
        .checkpoint(&sb.id, &CheckpointRequest::default())
        .await
        .unwrap();
    client
        .exec(&sb.id, &exec(&["touch", "/x y"]))
        .await
        .unwrap();
    let label = CheckpointRequest {
        label: Some("with x".into()),
    };
    let second = client.checkpoint(&sb.id, &label).await.unwrap();
    let diff = client.diff(&first.id, &second.id).await.unwrap();
    assert_eq!(diff.changes[0].path, "/x y");
    let back = RollbackRequest {
        node: first.id.clone(),
        mode: RollbackMode::ProcessesOnly,
        warm_up: None,
    };
    assert_eq!(client.rollback(&sb.id, &back).await.unwrap().node, first.id);
    let branch = client
        .branch(&second.id, &BranchRequest { count: 3 })
        .await
        .unwrap();
    assert_eq!(branch.sandboxes.len(), 3);
    let tree = client.sandbox_tree(&sb.id).await.unwrap();
    assert_eq!(tree, client.node_tree(&first.id).await.unwrap());
    assert_eq!(tree.nodes.len(), 2);
    assert_eq!(
        client.session_stop(&sb.id, &session.id).await.unwrap(),
        session
    );

    // Errors carry the daemon's status, kind and message; the daemon keeps serving.
    match client.remove_node(&first.id).await.unwrap_err() {
        ClientError::Api {
            status,
            kind,
            message,
        } => {
            assert_eq!((status, kind.as_str()), (409, "node_in_use"));
            assert!(message.contains(&sb.id), "{message}");
        }
        other => panic!("unexpected {other:?}"),
    }
    let err = client.sandbox("nope").await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Api { status: 404, kind, .. } if kind == "unknown_sandbox"),
        "{err:?}"
    );
    assert_eq!(err.to_string(), "unknown sandbox \"nope\"");
    assert_eq!(err.exit_code(), 5);

    for s in std::iter::once(&sb).chain(&branch.sandboxes) {
        let removed = client.remove_sandbox(&s.id).await.unwrap();
        assert_eq!(removed.sandboxes, std::slice::from_ref(&s.id));
    }
    let removed = client.remove_node(&first.id).await.unwrap();
    assert_eq!(removed.nodes, [first.id, second.id]);
    assert_eq!(client.gc().await.unwrap().layers_removed, 2);
    let (status, raw) = client.send(&ApiRequest::ListSandboxes).await.unwrap();
    assert_eq!((status, &raw[..]), (200, &br#"{"sandboxes":[]}"#[..]));
}

#[tokio::test]
async fn client_reports_disabled_sandboxes() {
    let h = Harness::without_sandboxes();
    let (_dir, client) = serve_on_temp_socket(&h).await;
    let err = client.list_sandboxes().await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Api { status: 503, kind, .. } if kind == "sandboxes_disabled"),
        "{err:?}"
    );
    assert_eq!(err.exit_code(), 6);
}
