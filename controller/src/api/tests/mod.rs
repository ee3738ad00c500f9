//! The API against a fake tracker and a fake cgroup tree: behaviour, error shapes,
//! metrics coverage; the OpenAPI contract, the client and the sandbox endpoints (over
//! an in-memory fake of the sandbox operations) in submodules. No root needed.

mod client;
mod contract;
mod fake_sandboxes;
mod sandbox_errors;
mod sandboxes;
mod stats;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

use self::fake_sandboxes::FakeSandboxes;
use super::fake::{FakeFaults, FakeTracker};
use super::server::{api_router, metrics_router};
use super::service::{ApiService, DaemonInfo, ServedSandboxes};
use super::{ErrorKind, routes};
use crate::bpf::{CowFaultCounter, Origin, WriteTracker};
use crate::cgroup::CgroupFs;
use crate::metrics::Metrics;

/// A fake cgroup tree, a fake tracker and a service over both.
pub(crate) struct Harness {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) tracker: Arc<FakeTracker>,
    pub(crate) faults: Arc<FakeFaults>,
    pub(crate) sandboxes: Arc<FakeSandboxes>,
    pub(crate) service: Arc<ApiService>,
}

impl Harness {
    /// With sandbox operations (the fake).
    pub(crate) fn new() -> Self {
        Self::build(true)
    }

    /// Without sandbox operations: the sandbox routes answer 503.
    pub(crate) fn without_sandboxes() -> Self {
        Self::build(false)
    }

    fn build(with_sandboxes: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        for sub in ["", "deltabox", "deltabox/demo", "deltabox/other"] {
            let d = dir.path().join(sub);
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("cgroup.procs"), "").unwrap();
        }
        fs::create_dir(dir.path().join("plain")).unwrap();
        let cgroups = CgroupFs::at(dir.path()).unwrap();
        let tracker = Arc::new(FakeTracker::default());
        let info = DaemonInfo {
            socket: PathBuf::from("/run/deltabox/api.sock"),
            metrics_addr: "127.0.0.1:9477".into(),
            pin_dir: PathBuf::from("/sys/fs/bpf/fake"),
            origin: Origin::Loaded,
            started: Instant::now(),
        };
        let sandboxes = Arc::new(FakeSandboxes::default());
        let mut service = ApiService::new(
            tracker.clone() as Arc<dyn WriteTracker>,
            cgroups,
            Metrics::new().unwrap(),
            info,
        );
        let faults = Arc::new(FakeFaults::default());
        if with_sandboxes {
            service = service
                .with_cow_faults(faults.clone() as Arc<dyn CowFaultCounter>, false)
                .with_sandboxes(sandboxes.clone() as Arc<dyn ServedSandboxes>);
        }
        Self {
            dir,
            tracker,
            faults,
            sandboxes,
            service: Arc::new(service),
        }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().canonicalize().unwrap()
    }

    fn id_of(&self, rel: &str) -> u64 {
        fs::metadata(self.dir.path().join(rel)).unwrap().ino()
    }

    async fn request(&self, method: Method, uri: &str, body: Option<&str>) -> (StatusCode, Value) {
        let (status, bytes) = self.raw(method, uri, body, "application/json").await;
        let value = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            panic!("{uri}: not JSON ({e}): {}", String::from_utf8_lossy(&bytes))
        });
        (status, value)
    }

    async fn raw(
        &self,
        method: Method,
        uri: &str,
        body: Option<&str>,
        content_type: &str,
    ) -> (StatusCode, Vec<u8>) {
        let mut req = Request::builder().method(method).uri(uri);
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, content_type);
        }
        let req = req
            .body(Body::from(body.unwrap_or_default().to_owned()))
            .unwrap();
        let response = api_router(self.service.clone()).oneshot(req).await.unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, bytes.to_vec())
    }

    async fn post(&self, uri: &str, path: &str) -> (StatusCode, Value) {
        let body = json!({ "path": path }).to_string();
        self.request(Method::POST, uri, Some(&body)).await
    }
}

fn assert_error(got: &(StatusCode, Value), status: StatusCode, kind: ErrorKind, needle: &str) {
    assert_error_kind(got, status, kind.as_str(), needle);
}

/// The answer is an error of this status and kind whose message contains `needle`.
fn assert_error_kind(got: &(StatusCode, Value), status: StatusCode, kind: &str, needle: &str) {
    let (got_status, body) = got;
    assert_eq!(*got_status, status, "{body}");
    assert_eq!(body["kind"], kind, "{body}");
    let message = body["error"].as_str().unwrap();
    assert!(message.contains(needle), "{message:?} lacks {needle:?}");
    assert_eq!(body.as_object().unwrap().len(), 2, "{body}");
}

#[tokio::test]
async fn watch_epoch_unwatch_cycle() {
    let h = Harness::new();
    let demo = h.root().join("deltabox/demo");
    let id = h.id_of("deltabox/demo");

    let (status, body) = h.post(routes::WATCH, "deltabox/demo").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!({"path": demo.display().to_string(), "id": id, "epoch": 1})
    );
    // Watching again changes nothing; an absolute path names the same cgroup.
    let (_, again) = h.post(routes::WATCH, &demo.display().to_string()).await;
    assert_eq!(again, body);

    let (_, list) = h.request(Method::GET, routes::CGROUPS, None).await;
    assert_eq!(list, json!({"watched": [body]}));

    h.tracker.record_write(id, 12, "b.txt", 10);
    h.tracker.record_write(id, 11, "a.txt", 5000);
    h.tracker.record_write(id, 12, "b.txt", 10);
    let (status, stats) = h.request(Method::GET, routes::INODE_STATS, None).await;
    assert_eq!(status, StatusCode::OK);
    let rows = stats["stats"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["ino"], 11, "sorted by inode");
    assert_eq!(rows[0]["pages_dirtied"], 2);
    assert_eq!(rows[1]["writes"], 2);
    assert_eq!(rows[1]["bytes"], 20);
    assert_eq!(rows[1]["cgroup_path"], demo.display().to_string());

    let (status, advanced) = h.post(routes::EPOCH, "deltabox/demo").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(advanced["epoch"], 2);
    let uri = format!("{}?cgroup=deltabox%2Fdemo", routes::INODE_STATS);
    let (_, stats) = h.request(Method::GET, &uri, None).await;
    assert_eq!(stats, json!({"stats": []}), "counts restart at zero");

    let (status, gone) = h.post(routes::UNWATCH, "deltabox/demo").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(gone["epoch"], 2);
    let (_, list) = h.request(Method::GET, routes::CGROUPS, None).await;
    assert_eq!(list, json!({"watched": []}));
}

#[tokio::test]
async fn cgroup_errors_name_the_path() {
    let h = Harness::new();
    let missing = h.root().join("deltabox/nope");
    for route in [routes::WATCH, routes::UNWATCH, routes::EPOCH] {
        let got = h.post(route, "deltabox/nope").await;
        let needle = format!("no cgroup v2 directory at {}", missing.display());
        assert_error(
            &got,
            StatusCode::NOT_FOUND,
            ErrorKind::CgroupNotFound,
            &needle,
        );
    }
    let got = h.post(routes::WATCH, "../..").await;
    assert_error(
        &got,
        StatusCode::BAD_REQUEST,
        ErrorKind::InvalidCgroupPath,
        "outside the cgroup2 mount",
    );
    let got = h.post(routes::WATCH, "plain").await;
    assert_error(
        &got,
        StatusCode::NOT_FOUND,
        ErrorKind::NotACgroup,
        "plain is not a cgroup v2 directory",
    );
    let got = h.post(routes::WATCH, "").await;
    assert_error(
        &got,
        StatusCode::BAD_REQUEST,
        ErrorKind::InvalidCgroupPath,
        "empty cgroup path",
    );

    let other = h.root().join("deltabox/other").display().to_string();
    for route in [routes::UNWATCH, routes::EPOCH] {
        let got = h.post(route, "deltabox/other").await;
        assert_error(
            &got,
            StatusCode::NOT_FOUND,
            ErrorKind::NotWatched,
            &format!("cgroup {other} (id"),
        );
    }
    let uri = format!("{}?cgroup=deltabox/other", routes::INODE_STATS);
    let got = h.request(Method::GET, &uri, None).await;
    assert_error(
        &got,
        StatusCode::NOT_FOUND,
        ErrorKind::NotWatched,
        "is not watched",
    );
}

#[tokio::test]
async fn malformed_requests_are_json_errors() {
    let h = Harness::new();
    let got = h
        .request(Method::POST, routes::WATCH, Some("{\"path\": "))
        .await;
    assert_error(
        &got,
        StatusCode::BAD_REQUEST,
        ErrorKind::InvalidBody,
        "invalid request body: malformed JSON",
    );
    let got = h.request(Method::POST, routes::WATCH, Some("{}")).await;
    assert_error(
        &got,
        StatusCode::BAD_REQUEST,
        ErrorKind::InvalidBody,
        "missing field `path`",
    );
    let got = h
        .request(Method::POST, routes::WATCH, Some(r#"{"path": 3}"#))
        .await;
    assert_error(
        &got,
        StatusCode::BAD_REQUEST,
        ErrorKind::InvalidBody,
        "invalid type: integer `3`",
    );
    let got = h
        .request(
            Method::POST,
            routes::WATCH,
            Some(r#"{"path": "a", "x": 1}"#),
        )
        .await;
    assert_error(
        &got,
        StatusCode::BAD_REQUEST,
        ErrorKind::InvalidBody,
        "unknown field `x`",
    );
    let (status, bytes) = h
        .raw(
            Method::POST,
            routes::WATCH,
            Some(r#"{"path":"a"}"#),
            "text/plain",
        )
        .await;
    let got = (status, serde_json::from_slice(&bytes).unwrap());
    assert_error(
        &got,
        StatusCode::BAD_REQUEST,
        ErrorKind::InvalidBody,
        "Content-Type: application/json",
    );

    let uri = format!("{}?group=x", routes::INODE_STATS);
    let got = h.request(Method::GET, &uri, None).await;
    assert_error(
        &got,
        StatusCode::BAD_REQUEST,
        ErrorKind::InvalidQuery,
        "unknown field `group`",
    );

    let got = h.request(Method::GET, "/v1/nope", None).await;
    assert_error(
        &got,
        StatusCode::NOT_FOUND,
        ErrorKind::RouteNotFound,
        "no route for GET /v1/nope",
    );
    let got = h.request(Method::GET, routes::WATCH, None).await;
    assert_error(
        &got,
        StatusCode::METHOD_NOT_ALLOWED,
        ErrorKind::MethodNotAllowed,
        "does not accept GET",
    );
}

#[tokio::test]
async fn unpinned_programs_are_a_conflict() {
    let h = Harness::new();
    h.tracker.unload();
    let got = h.request(Method::GET, routes::STATUS, None).await;
    assert_error(
        &got,
        StatusCode::CONFLICT,
        ErrorKind::BpfNotLoaded,
        "no deltabox programs are pinned",
    );
    let got = h.post(routes::WATCH, "deltabox/demo").await;
    assert_error(
        &got,
        StatusCode::CONFLICT,
        ErrorKind::BpfNotLoaded,
        "eBPF tracker failed to watch a cgroup",
    );
}

#[tokio::test]
async fn adopted_ids_are_found_by_walking_the_tree() {
    let h = Harness::new();
    // Watched before this daemon started: it never resolved these.
    let other = h.id_of("deltabox/other");
    h.tracker.watch(other).unwrap();
    h.tracker.watch(u64::MAX - 1).unwrap();
    let (_, list) = h.request(Method::GET, routes::CGROUPS, None).await;
    let paths: Vec<&str> = list["watched"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["path"].as_str().unwrap())
        .collect();
    let other_path = h.root().join("deltabox/other").display().to_string();
    // Sorted by path: `/` sorts before `<`.
    assert_eq!(
        paths,
        [other_path, format!("<unknown cgroup {}>", u64::MAX - 1)]
    );
}

#[tokio::test]
async fn status_has_daemon_bpf_and_counters() {
    let h = Harness::new();
    let id = h.id_of("deltabox/demo");
    h.post(routes::WATCH, "deltabox/demo").await;
    h.tracker.record_write(id, 5, "f", 1);
    let (status, body) = h.request(Method::GET, routes::STATUS, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["pid"], std::process::id());
    assert_eq!(body["bpf"]["origin"], "loaded");
    assert_eq!(
        body["bpf"]["programs"][0]["tracepoint"],
        "syscalls:sys_enter_write"
    );
    assert_eq!(body["counters"]["write_syscalls"], 1);
    assert_eq!(body["watched"][0]["id"], id);
}

/// Drives every code path that updates a metric, then fails for any metric that was
/// never updated: a metric nobody updates is a dashboard panel that lies.
#[tokio::test]
async fn every_metric_is_updated() {
    let h = Harness::new();
    let id = h.id_of("deltabox/demo");
    h.post(routes::WATCH, "deltabox/demo").await;
    h.tracker.record_write(id, 4, "f", 9000);
    h.request(Method::GET, routes::STATUS, None).await;
    h.post(routes::EPOCH, "deltabox/demo").await;
    h.tracker.record_write(id, 4, "f", 9000);
    let req = Request::get(routes::METRICS).body(Body::empty()).unwrap();
    let response = metrics_router(h.service.clone())
        .oneshot(req)
        .await
        .unwrap();
    let text = String::from_utf8(
        response
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    assert!(
        text.contains("deltabox_bpf_write_syscalls_total 2"),
        "{text}"
    );
    // A sandbox's writes since its last checkpoint (the fake runs every sandbox in
    // `deltabox/other`), read before the tracker fails below.
    h.request(Method::POST, routes::SANDBOXES, Some("{}")).await;
    h.tracker
        .record_write(h.id_of("deltabox/other"), 5, "g", 8192);
    h.service.refresh_metrics();
    // Tracker failures are a path too.
    h.tracker.unload();
    h.request(Method::GET, routes::CGROUPS, None).await;
    // The sandbox state operations, through the fake.
    let (_, sandbox) = h.request(Method::POST, "/v1/sandboxes", Some("{}")).await;
    let sandbox = sandbox["id"].as_str().unwrap().to_owned();
    // A session, so that the checkpoint has a template (the template gauges).
    let sessions = routes::fill(routes::SANDBOX_SESSIONS, &[&sandbox]);
    h.request(Method::POST, &sessions, Some(r#"{"kind": "bash"}"#))
        .await;
    let (_, node) = h
        .request(
            Method::POST,
            &format!("/v1/sandboxes/{sandbox}/checkpoint"),
            None,
        )
        .await;
    let node = node["id"].as_str().unwrap().to_owned();
    let rollback = format!(r#"{{"node": "{node}"}}"#);
    let (status, _) = h
        .request(
            Method::POST,
            &format!("/v1/sandboxes/{sandbox}/rollback"),
            Some(&rollback),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    // Copy-on-write faults after that rollback, then after one that warms up, each
    // counted when its period ends (the next rollback, the checkpoint).
    let work = h.id_of("deltabox/other");
    h.faults.record_faults(work, 3);
    let warm = format!(r#"{{"node": "{node}", "warm_up": true}}"#);
    let (status, rolled) = h
        .request(
            Method::POST,
            &format!("/v1/sandboxes/{sandbox}/rollback"),
            Some(&warm),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(rolled["warm_up"], true, "{rolled}");
    h.faults.record_faults(work, 2);
    h.request(
        Method::POST,
        &format!("/v1/sandboxes/{sandbox}/checkpoint"),
        None,
    )
    .await;
    h.service.cow().unwrap().wait_idle();
    let (status, _) = h
        .request(
            Method::POST,
            &format!("/v1/nodes/{node}/branch"),
            Some(r#"{"count": 2}"#),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    // A node removed (a leaf, not the head) and a gc: the squash counter.
    let (_, leaf) = h
        .request(
            Method::POST,
            &format!("/v1/sandboxes/{sandbox}/checkpoint"),
            None,
        )
        .await;
    let leaf = leaf["id"].as_str().unwrap().to_owned();
    let (status, _) = h
        .request(
            Method::POST,
            &format!("/v1/sandboxes/{sandbox}/rollback"),
            Some(&rollback),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = h
        .request(Method::DELETE, &format!("/v1/nodes/{leaf}"), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, gc) = h.request(Method::POST, "/v1/gc", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(gc["layers_squashed"].as_u64().unwrap() > 0, "{gc}");
    // The state gauges are measured at scrape time: scrape again, with nodes now.
    h.service.refresh_metrics();

    let families = h.service.metrics().registry().gather();
    assert!(!families.is_empty());
    // A labelled metric no path gave a series to is missing from `gather` altogether.
    let gathered: Vec<&str> = families.iter().map(|f| f.name()).collect();
    let unseen: Vec<String> = h
        .service
        .metrics()
        .names()
        .into_iter()
        .filter(|n| !gathered.contains(&n.as_str()))
        .collect();
    assert!(unseen.is_empty(), "metrics without a series: {unseen:?}");
    let mut never_updated = Vec::new();
    for family in &families {
        let updated = family.get_metric().iter().any(|m| {
            let counter = m.get_counter().get_value();
            let gauge = m.get_gauge().get_value();
            let histogram = m.get_histogram().get_sample_count();
            counter != 0.0 || gauge != 0.0 || histogram != 0
        });
        if !updated {
            never_updated.push(family.name().to_owned());
        }
    }
    assert!(
        never_updated.is_empty(),
        "metrics never updated: {never_updated:?}"
    );
}
