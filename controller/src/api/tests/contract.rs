//! The OpenAPI contract: `controller/api/openapi.yaml` lists exactly the routes the
//! router serves, and the answers carry exactly the documented fields (the sandbox
//! routes over the in-memory fake, driven through a script that reaches each one).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use serde_json::{Value, json};
use tower::ServiceExt;

use super::Harness;
use crate::api::server::{metrics_router, served_routes};
use crate::api::{ErrorKind, routes};

/// Per array in a schema (`Schema.field`), whether some answer had it non-empty: an
/// array only ever seen empty checked nothing of its items.
type Coverage = BTreeMap<String, bool>;

fn openapi() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("api/openapi.yaml");
    let text = fs::read_to_string(&path).unwrap();
    serde_norway::from_str(&text).unwrap()
}

fn documented_operations(spec: &Value) -> BTreeSet<(String, String)> {
    let mut ops = BTreeSet::new();
    for (path, item) in spec["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            ops.insert((method.to_uppercase(), path.clone()));
        }
    }
    ops
}

#[test]
fn router_serves_exactly_the_documented_routes() {
    let spec = openapi();
    let documented = documented_operations(&spec);
    let mut served: BTreeSet<(String, String)> = served_routes()
        .into_iter()
        .map(|(m, p)| (m.to_string(), p.to_owned()))
        .collect();
    // Served by the metrics router, on the TCP listener.
    served.insert(("GET".into(), routes::METRICS.to_owned()));
    assert_eq!(served, documented, "openapi.yaml and the router disagree");

    let kinds: BTreeSet<&str> =
        spec["components"]["schemas"]["Error"]["properties"]["kind"]["enum"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k.as_str().unwrap())
            .collect();
    let ours: BTreeSet<&str> = ErrorKind::all_names().into_iter().collect();
    assert_eq!(
        kinds, ours,
        "error kinds in openapi.yaml and ErrorKind disagree"
    );
}

/// Every documented operation reaches a handler (not the unknown-route or
/// wrong-method fallbacks), and its JSON answers match the documented schemas.
#[tokio::test]
async fn answers_match_the_documented_schemas() {
    let spec = openapi();
    let h = Harness::new();
    let id = h.id_of("deltabox/demo");
    h.post(routes::WATCH, "deltabox/demo").await;
    h.tracker.record_write(id, 9, "x", 3);
    let mut coverage = Coverage::new();
    let mut checked = BTreeSet::new();

    for (method, path) in documented_operations(&spec) {
        if path.starts_with("/v1/sandboxes") || path.starts_with("/v1/nodes") {
            continue;
        }
        if path == routes::DIFF || path == routes::GC {
            continue;
        }
        checked.insert((method.clone(), path.clone()));
        let method: Method = method.parse().unwrap();
        if path == routes::METRICS {
            let req = Request::get(routes::METRICS).body(Body::empty()).unwrap();
            let response = metrics_router(h.service.clone())
                .oneshot(req)
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            continue;
        }
        let body = (method == Method::POST).then_some(r#"{"path": "deltabox/demo"}"#);
        let (status, value) = h.request(method.clone(), &path, body).await;
        assert_eq!(status, StatusCode::OK, "{method} {path}: {value}");
        let at = format!("{method} {path}");
        check_answer(&spec, &method, &path, status, &value, &at, &mut coverage);
    }
    for (method, template, status, value) in sandbox_script(&h).await {
        let at = format!("{method} {template}");
        check_answer(&spec, &method, template, status, &value, &at, &mut coverage);
        checked.insert((method.to_string(), template.to_owned()));
    }
    assert_eq!(
        checked,
        documented_operations(&spec),
        "operations never exercised"
    );

    // An error answer against the Error schema.
    let (_, err) = h.post(routes::UNWATCH, "deltabox/other").await;
    let schema = json!({"$ref": "#/components/schemas/Error"});
    check_schema(&spec, &schema, &err, "error", "Error", &mut coverage);

    let empty: Vec<&String> = coverage
        .iter()
        .filter(|(_, v)| !**v)
        .map(|(k, _)| k)
        .collect();
    assert!(empty.is_empty(), "arrays never seen non-empty: {empty:?}");
}

/// Request bodies with every field set serialise to exactly the documented
/// properties, of the documented types.
#[test]
fn request_bodies_match_the_documented_schemas() {
    use crate::api::sandbox_types::{
        BranchRequest, CheckpointRequest, CreateSandbox, ExecRequest, LimitsSpec, RollbackMode,
        RollbackRequest, SessionRun, SessionStart,
    };
    use crate::api::types::CgroupRequest;

    let spec = openapi();
    let full = [
        ("CgroupRequest", json!(CgroupRequest { path: "a".into() })),
        (
            "CreateSandbox",
            json!(CreateSandbox {
                rootfs: Some("/r".into()),
                limits: LimitsSpec {
                    memory_bytes: Some(1),
                    cpus: Some(1.5),
                    pids: Some(2),
                },
                auto_checkpoint: true,
            }),
        ),
        (
            "ExecRequest",
            json!(ExecRequest {
                argv: vec!["ls".into()],
                env: [("K".to_owned(), "V".to_owned())].into(),
                cwd: Some("/".into()),
                stdin: Some("in".into()),
                timeout_ms: Some(1),
            }),
        ),
        (
            "SessionStart",
            json!(SessionStart {
                kind: "bash".into()
            }),
        ),
        (
            "SessionRun",
            json!(SessionRun {
                code: "x".into(),
                timeout_ms: Some(1),
            }),
        ),
        (
            "CheckpointRequest",
            json!(CheckpointRequest {
                label: Some("l".into()),
            }),
        ),
        (
            "RollbackRequest",
            json!(RollbackRequest {
                node: "n".into(),
                mode: RollbackMode::ProcessesOnly,
                warm_up: Some(true),
            }),
        ),
        ("BranchRequest", json!(BranchRequest { count: 2 })),
    ];
    let mut coverage = Coverage::new();
    for (name, value) in full {
        let schema = &spec["components"]["schemas"][name];
        let documented: BTreeSet<&String> =
            schema["properties"].as_object().unwrap().keys().collect();
        let sent: BTreeSet<&String> = value.as_object().unwrap().keys().collect();
        assert_eq!(
            sent, documented,
            "{name}: fields and documented properties differ"
        );
        check_schema(&spec, schema, &value, name, name, &mut coverage);
    }
}

/// The answer's status is documented for the operation, with a schema it matches.
fn check_answer(
    spec: &Value,
    method: &Method,
    template: &str,
    status: StatusCode,
    value: &Value,
    at: &str,
    coverage: &mut Coverage,
) {
    let op = &spec["paths"][template][method.as_str().to_lowercase()];
    let response = &op["responses"][status.as_str()];
    assert!(
        response.is_object(),
        "{at}: status {status} is not documented"
    );
    let schema = &response["content"]["application/json"]["schema"];
    check_schema(spec, schema, value, at, at, coverage);
}

/// Drives every sandbox route through the fake, in an order where each answer has
/// its optional fields and non-empty arrays; returns (method, template, status, body).
async fn sandbox_script(h: &Harness) -> Vec<(Method, &'static str, StatusCode, Value)> {
    let mut out = Vec::new();
    let (get, post, delete) = (Method::GET, Method::POST, Method::DELETE);
    macro_rules! call {
        ($method:expr, $template:expr, [$($v:expr),*], $body:expr) => {{
            let uri = routes::fill($template, &[$($v),*]);
            let body: Option<Value> = $body;
            let body = body.map(|b| b.to_string());
            let (status, value) = h.request($method.clone(), &uri, body.as_deref()).await;
            assert!(status.is_success(), "{} {uri}: {value}", $method);
            out.push(($method.clone(), $template, status, value.clone()));
            value
        }};
    }
    let str_of = |v: &Value, key: &str| v[key].as_str().unwrap().to_owned();

    let create = json!({"rootfs": "/srv/root", "auto_checkpoint": true,
                        "limits": {"memory_bytes": 1 << 30, "cpus": 0.5, "pids": 64}});
    let sb = call!(post, routes::SANDBOXES, [], Some(create));
    let a = str_of(&sb, "id");
    let session = call!(
        post,
        routes::SANDBOX_SESSIONS,
        [&a],
        Some(json!({"kind": "bash"}))
    );
    let sid = str_of(&session, "id");
    let touch = json!({"argv": ["touch", "/f"], "env": {"K": "V"}, "cwd": "/", "stdin": "", "timeout_ms": 1000});
    let exec = call!(post, routes::SANDBOX_EXEC, [&a], Some(touch));
    let first = str_of(&exec["node"], "id");
    call!(get, routes::SANDBOXES, [], None);
    let run = json!({"code": "echo hi", "timeout_ms": 1000});
    call!(post, routes::SANDBOX_SESSION_RUN, [&a, &sid], Some(run));
    let labelled = call!(
        post,
        routes::SANDBOX_CHECKPOINT,
        [&a],
        Some(json!({"label": "l"}))
    );
    let second = str_of(&labelled, "id");
    let later = call!(
        post,
        routes::SANDBOX_EXEC,
        [&a],
        Some(json!({"argv": ["touch", "/g"]}))
    );
    let third = str_of(&later["node"], "id");
    call!(get, routes::SANDBOX, [&a], None);
    let diff = format!("{}?from={first}&to={third}", routes::DIFF);
    let (status, value) = h.request(get.clone(), &diff, None).await;
    out.push((get.clone(), routes::DIFF, status, value));
    let rollback = json!({"node": first, "mode": "all"});
    call!(post, routes::SANDBOX_ROLLBACK, [&a], Some(rollback));
    let branch = call!(
        post,
        routes::NODE_BRANCH,
        [&second],
        Some(json!({"count": 2}))
    );
    call!(get, routes::SANDBOX_TREE, [&a], None);
    call!(get, routes::NODE_TREE, [&second], None);
    call!(delete, routes::SANDBOX_SESSION, [&a, &sid], None);
    let mut all = vec![a];
    for s in branch["sandboxes"].as_array().unwrap() {
        all.push(str_of(s, "id"));
    }
    for id in &all {
        call!(delete, routes::SANDBOX, [id], None);
    }
    call!(delete, routes::NODE, [&first], None);
    call!(post, routes::GC, [], None);
    out
}

/// A small JSON-schema check: `$ref`, object properties (required and no others),
/// arrays, scalars and enums. Enough for this contract.
fn check_schema(
    spec: &Value,
    schema: &Value,
    value: &Value,
    at: &str,
    name: &str,
    coverage: &mut Coverage,
) {
    if let Some(reference) = schema["$ref"].as_str() {
        let pointer = reference.trim_start_matches('#');
        let target = spec
            .pointer(pointer)
            .unwrap_or_else(|| panic!("{at}: bad $ref {reference}"));
        let name = reference.rsplit('/').next().unwrap_or(reference);
        return check_schema(spec, target, value, at, name, coverage);
    }
    match schema["type"]
        .as_str()
        .unwrap_or_else(|| panic!("{at}: schema without type"))
    {
        "object" => {
            let object = value
                .as_object()
                .unwrap_or_else(|| panic!("{at}: not an object: {value}"));
            if schema["properties"].is_null() {
                // A map: every value against `additionalProperties`.
                let values = &schema["additionalProperties"];
                assert!(values.is_object(), "{at}: object schema without properties");
                for (key, field) in object {
                    let (at, name) = (format!("{at}.{key}"), format!("{name}.*"));
                    check_schema(spec, values, field, &at, &name, coverage);
                }
                return;
            }
            let properties = schema["properties"].as_object().unwrap();
            for key in object.keys() {
                assert!(
                    properties.contains_key(key),
                    "{at}: undocumented field {key}"
                );
            }
            for required in schema["required"].as_array().into_iter().flatten() {
                let key = required.as_str().unwrap();
                assert!(
                    object.contains_key(key),
                    "{at}: missing documented field {key}"
                );
            }
            for (key, field) in object {
                let (at, name) = (format!("{at}.{key}"), format!("{name}.{key}"));
                check_schema(spec, &properties[key], field, &at, &name, coverage);
            }
        }
        "array" => {
            let items = value
                .as_array()
                .unwrap_or_else(|| panic!("{at}: not an array"));
            *coverage.entry(name.to_owned()).or_default() |= !items.is_empty();
            for (i, item) in items.iter().enumerate() {
                let (at, name) = (format!("{at}[{i}]"), format!("{name}[]"));
                check_schema(spec, &schema["items"], item, &at, &name, coverage);
            }
        }
        "string" => {
            let s = value
                .as_str()
                .unwrap_or_else(|| panic!("{at}: not a string: {value}"));
            if let Some(allowed) = schema["enum"].as_array() {
                assert!(allowed.iter().any(|a| a == s), "{at}: {s} not in enum");
            }
        }
        "integer" => assert!(
            value.is_u64() || value.is_i64(),
            "{at}: not an integer: {value}"
        ),
        "number" => assert!(value.is_number(), "{at}: not a number: {value}"),
        "boolean" => assert!(value.is_boolean(), "{at}: not a boolean"),
        other => panic!("{at}: unsupported schema type {other}"),
    }
}
