//! The shipped Grafana dashboard and Prometheus alert rules refer only to
//! metrics Nox exports.

use std::collections::BTreeSet;

use serde_json::Value;

fn read(name: &str) -> Value {
    let path = format!("{}/../deploy/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    // The alert rules are YAML written in its JSON form, so JSON parses both.
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The `nox_*` metric names an expression uses, histogram suffixes removed.
fn metric_names(expr: &str) -> BTreeSet<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|word| word.starts_with("nox_"))
        .map(|word| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| word.strip_suffix(suffix))
                .unwrap_or(word)
                .to_owned()
        })
        .collect()
}

fn check(exprs: &[String]) {
    let known: BTreeSet<&str> = nox_audit_metrics::FAMILIES
        .iter()
        .map(|(name, _)| *name)
        .collect();
    assert!(!exprs.is_empty());
    for expr in exprs {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "no Nox metric in {expr}");
        for name in names {
            assert!(
                known.contains(name.as_str()),
                "{name} (in {expr}) is not a Nox metric"
            );
        }
    }
}

#[test]
fn the_dashboard_uses_only_exported_metrics() {
    let dashboard = read("grafana-dashboard.json");
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|panel| panel["targets"].as_array().cloned().unwrap_or_default())
        .map(|target| target["expr"].as_str().expect("expr").to_owned())
        .collect();
    check(&exprs);
}

#[test]
fn the_alert_rules_use_only_exported_metrics_and_cover_the_essentials() {
    let rules = read("prometheus-alerts.yml");
    let rules: Vec<Value> = rules["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|group| group["rules"].as_array().cloned().unwrap_or_default())
        .collect();
    let exprs: Vec<String> = rules
        .iter()
        .map(|r| r["expr"].as_str().expect("expr").to_owned())
        .collect();
    check(&exprs);
    let watched: BTreeSet<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();
    for essential in [
        "nox_audit_write_failures_total",
        "nox_audit_spool_rows",
        "nox_audit_dropped_total",
        "nox_http_requests_total",
        "nox_quota_violations_total",
    ] {
        assert!(watched.contains(essential), "no alert on {essential}");
    }
}
