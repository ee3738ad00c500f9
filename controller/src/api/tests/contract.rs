//! The OpenAPI contract: `controller/api/openapi.yaml` lists exactly the routes the
//! router serves, and the answers carry exactly the documented fields.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use serde_json::{Value, json};
use tower::ServiceExt;

use super::Harness;
use crate::api::server::{metrics_router, served_routes};
use crate::api::{ErrorKind, routes};

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
    let ours: BTreeSet<&str> = ErrorKind::ALL.iter().map(|k| k.as_str()).collect();
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

    for (method, path) in documented_operations(&spec) {
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
        let op = &spec["paths"][&path][method.as_str().to_lowercase()];
        let schema = &op["responses"]["200"]["content"]["application/json"]["schema"];
        check_schema(&spec, schema, &value, &format!("{method} {path}"));
    }
    // An error answer against the Error schema.
    let (_, err) = h.post(routes::UNWATCH, "deltabox/other").await;
    let schema = json!({"$ref": "#/components/schemas/Error"});
    check_schema(&spec, &schema, &err, "error");
}

/// A small JSON-schema check: `$ref`, object properties (required and no others),
/// arrays, scalars and enums. Enough for this contract.
fn check_schema(spec: &Value, schema: &Value, value: &Value, at: &str) {
    if let Some(reference) = schema["$ref"].as_str() {
        let pointer = reference.trim_start_matches('#');
        let target = spec
            .pointer(pointer)
            .unwrap_or_else(|| panic!("{at}: bad $ref {reference}"));
        return check_schema(spec, target, value, at);
    }
    match schema["type"]
        .as_str()
        .unwrap_or_else(|| panic!("{at}: schema without type"))
    {
        "object" => {
            let object = value
                .as_object()
                .unwrap_or_else(|| panic!("{at}: not an object: {value}"));
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
                check_schema(spec, &properties[key], field, &format!("{at}.{key}"));
            }
        }
        "array" => {
            let items = value
                .as_array()
                .unwrap_or_else(|| panic!("{at}: not an array"));
            assert!(!items.is_empty(), "{at}: empty array checks nothing");
            for (i, item) in items.iter().enumerate() {
                check_schema(spec, &schema["items"], item, &format!("{at}[{i}]"));
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
        "boolean" => assert!(value.is_boolean(), "{at}: not a boolean"),
        other => panic!("{at}: unsupported schema type {other}"),
    }
}
