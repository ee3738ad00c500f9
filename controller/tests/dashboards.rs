//! The Grafana dashboard and the daemon's metrics cannot drift apart: every metric a
//! panel queries is defined, and every defined metric is on a panel.

use std::collections::BTreeSet;

use deltabox_controller::metrics::Metrics;

const DASHBOARD: &str = include_str!("../../dashboards/grafana/deltabox.json");

/// `deltabox_*` identifiers in a PromQL expression, histogram series suffixes removed.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(start) = rest.find("deltabox_") {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        names.push(base.to_string());
        rest = &tail[end..];
    }
    names
}

fn queried() -> BTreeSet<String> {
    let dashboard: serde_json::Value = serde_json::from_str(DASHBOARD).expect("dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    panels
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .flat_map(|t| metric_names(t["expr"].as_str().unwrap_or_default()))
        .collect()
}

#[test]
fn every_queried_metric_is_defined_and_every_metric_is_shown() {
    let defined: BTreeSet<String> = Metrics::new()
        .expect("metrics")
        .names()
        .into_iter()
        .collect();
    let queried = queried();
    let undefined: Vec<_> = queried.difference(&defined).collect();
    assert!(
        undefined.is_empty(),
        "dashboard queries undefined metrics: {undefined:?}"
    );
    let unshown: Vec<_> = defined.difference(&queried).collect();
    assert!(
        unshown.is_empty(),
        "metrics on no dashboard panel: {unshown:?}"
    );
}

#[test]
fn extracts_names_from_promql() {
    assert_eq!(
        metric_names("histogram_quantile(0.99, rate(deltabox_x_seconds_bucket[5m])) + deltabox_y"),
        ["deltabox_x_seconds", "deltabox_y"]
    );
}

#[test]
fn panels_are_well_formed_and_do_not_overlap() {
    let dashboard: serde_json::Value = serde_json::from_str(DASHBOARD).expect("dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    let mut cells: BTreeSet<(u64, u64)> = BTreeSet::new();
    for p in panels {
        let title = p["title"].as_str().expect("every panel has a title");
        assert!(
            ids.insert(p["id"].as_u64().expect("numeric id")),
            "{title}: duplicate id"
        );
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        let pos = &p["gridPos"];
        let [x, y, w, h] = ["x", "y", "w", "h"].map(|k| pos[k].as_u64().expect("gridPos"));
        assert!(w > 0 && h > 0 && x + w <= 24, "{title}: gridPos {pos}");
        // Grid cells, so two panels drawn over each other fail.
        for cx in x..x + w {
            for cy in y..y + h {
                assert!(
                    cells.insert((cx, cy)),
                    "{title} overlaps another panel at {cx},{cy}"
                );
            }
        }
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no query");
        let mut refs = BTreeSet::new();
        for t in targets {
            assert!(
                refs.insert(t["refId"].as_str().expect("refId")),
                "{title}: refId twice"
            );
            assert!(
                t["expr"].as_str().is_some_and(|e| e.contains("deltabox_")),
                "{title}: no deltabox metric in {t}"
            );
        }
    }
}
