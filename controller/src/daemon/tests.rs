//! The daemon's run loop over a fake tracker, on a temporary socket: no root needed.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;
use crate::api::client::{Client, ClientError};
use crate::api::fake::FakeTracker;

#[test]
fn metrics_address_must_be_loopback() {
    assert_eq!(
        parse_metrics_addr("127.0.0.1:9477").unwrap(),
        "127.0.0.1:9477".parse().unwrap()
    );
    assert_eq!(
        parse_metrics_addr("[::1]:9000").unwrap(),
        "[::1]:9000".parse().unwrap()
    );
    assert_eq!(
        parse_metrics_addr("localhost:1").unwrap(),
        "127.0.0.1:1".parse().unwrap()
    );
    let err = parse_metrics_addr("0.0.0.0:9477").unwrap_err();
    assert!(
        matches!(err, DaemonError::MetricsNotLoopback { .. }),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains("0.0.0.0:9477 is not a loopback address"),
        "{err}"
    );
    assert_eq!(err.exit_code(), 64);
    let err = parse_metrics_addr("10.0.0.1:80").unwrap_err();
    assert!(
        matches!(err, DaemonError::MetricsNotLoopback { .. }),
        "{err:?}"
    );
    let err = parse_metrics_addr("nonsense").unwrap_err();
    assert!(
        matches!(err, DaemonError::InvalidMetricsAddr { .. }),
        "{err:?}"
    );
}

#[test]
fn not_root_exits_77() {
    let err = DaemonError::NotRoot;
    assert_eq!(err.exit_code(), 77);
    assert_eq!(
        err.to_string(),
        "deltaboxd must run as root (it loads eBPF programs and reads cgroups)"
    );
}

#[tokio::test]
async fn serves_until_stopped_then_removes_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let cgroup_root = dir.path().join("cgroup");
    std::fs::create_dir(&cgroup_root).unwrap();
    std::fs::write(cgroup_root.join("cgroup.procs"), "").unwrap();
    let cgroups = CgroupFs::at(&cgroup_root).unwrap();
    let path = dir.path().join("run/api.sock");
    let socket = ApiSocket::claim(&path).unwrap();
    let metrics_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics_addr = metrics_listener.local_addr().unwrap();
    let tracker: Arc<dyn WriteTracker> = Arc::new(FakeTracker::default());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let stop = async move {
        let _ = stop_rx.await;
        "test"
    };
    let pin_dir = PathBuf::from("/sys/fs/bpf/fake");
    let daemon = tokio::spawn(async move {
        serve(
            socket,
            metrics_listener,
            None,
            tracker,
            cgroups,
            Origin::Adopted,
            &pin_dir,
            None,
            None,
            stop,
        )
        .await
    });

    let client = Client::new(&path);
    let status = client.status().await.unwrap();
    assert_eq!(status.bpf.origin, Origin::Adopted);
    assert_eq!(status.socket, path);
    assert_eq!(status.metrics_addr, metrics_addr.to_string());
    client.watch(".").await.unwrap();

    let mut tcp = TcpStream::connect(metrics_addr).await.unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    tcp.read_to_string(&mut text).await.unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("deltabox_watched_cgroups 1"), "{text}");
    assert!(
        text.contains("deltabox_api_requests_total{route=\"/v1/status\",status=\"200\"} 1"),
        "{text}"
    );

    stop_tx.send(()).unwrap();
    daemon.await.unwrap().unwrap();
    assert!(!path.exists(), "socket file left behind");
    let err = client.status().await.unwrap_err();
    assert!(matches!(err, ClientError::NotRunning { .. }), "{err:?}");
}
