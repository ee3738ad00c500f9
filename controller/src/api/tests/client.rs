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
