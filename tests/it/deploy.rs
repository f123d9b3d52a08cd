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
    let known: BTreeSet<&str> = nox_api::metrics::families()
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
        "nox_audit_verify_failures_total",
        "nox_audit_verify_last_success_timestamp_seconds",
        "nox_audit_rollup_lag_seconds",
    ] {
        assert!(watched.contains(essential), "no alert on {essential}");
    }
}

/// `deploy/nox.service`'s `[section]`s and their `Key=value` settings, in
/// order (values of repeated keys, such as `Environment=`, all kept).
fn unit_settings(text: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut settings = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("unit line {}: not Key=value: {line}", number + 1));
        assert!(
            !section.is_empty(),
            "unit line {}: outside a section",
            number + 1
        );
        settings.push((
            section.clone(),
            key.trim().to_owned(),
            value.trim().to_owned(),
        ));
    }
    settings
}

#[test]
fn the_systemd_unit_delegates_its_cgroup_and_spares_the_launcher() {
    check_unit("nox.service", "system.slice/nox.service");
}

#[test]
fn the_template_for_several_servers_is_hardened_like_the_single_unit() {
    check_unit(
        "nox@.service",
        "system.slice/system-nox.slice/nox@%i.service",
    );
    let single = unit_settings(&read_unit("nox.service"));
    let template = unit_settings(&read_unit("nox@.service"));
    // Where an instance must differ: its port, data directory, shared
    // environment file, and the schema applied once by nox-migrate.
    let differs = [
        "ExecStart",
        "Environment",
        "EnvironmentFile",
        "StateDirectory",
    ];
    let service = |settings: &[(String, String, String)]| -> BTreeSet<(String, String)> {
        settings
            .iter()
            .filter(|(s, k, _)| s == "Service" && !differs.contains(&k.as_str()))
            .map(|(_, k, v)| (k.clone(), v.clone()))
            .collect()
    };
    assert_eq!(service(&template), service(&single));
    let template_text = read_unit("nox@.service");
    assert!(template_text.contains("ExecStart=/usr/local/bin/nox-server --no-migrate"));
    for shared in [
        "DATABASE_URL",
        "NOX_SANDBOX_DIR",
        "NOX_AUDIT_SIGNING_KEY_FILE",
    ] {
        assert!(template_text.contains(shared), "{shared} is documented");
    }
}

fn read_unit(name: &str) -> String {
    let path = format!("{}/../deploy/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// `name`'s sections, its cgroup delegation to `cgroup` under
/// /sys/fs/cgroup, no setting that breaks the launcher, and no complaint
/// from systemd's own parser where it is installed.
fn check_unit(name: &str, cgroup: &str) {
    let path = format!("deploy/{name}");
    let text = read_unit(name);
    let settings = unit_settings(&text);
    let values = |section: &str, key: &str| -> Vec<&str> {
        settings
            .iter()
            .filter(|(s, k, _)| s == section && k == key)
            .map(|(_, _, v)| v.as_str())
            .collect()
    };
    let sections: BTreeSet<&str> = settings.iter().map(|(s, _, _)| s.as_str()).collect();
    assert_eq!(
        sections,
        BTreeSet::from(["Install", "Service", "Unit"]),
        "{path}"
    );
    assert_eq!(values("Service", "Delegate"), ["yes"]);
    assert_eq!(values("Service", "ExecStart").len(), 1);
    // The parent is this unit's own cgroup: named after the file.
    let parent = format!("NOX_CGROUP_PARENT=/sys/fs/cgroup/{cgroup}");
    assert!(
        values("Service", "Environment").contains(&parent.as_str()),
        "{path}"
    );
    // Settings that would break the launcher's namespaces, mounts, cgroups
    // or setuid, or confuse the runs' /tmp.
    for breaking in [
        "NoNewPrivileges",
        "PrivateTmp",
        "ProtectControlGroups",
        "ProtectKernelTunables",
        "RestrictNamespaces",
        "SystemCallFilter",
        "PrivateDevices",
        "CapabilityBoundingSet",
        "User",
        "DynamicUser",
    ] {
        assert!(
            values("Service", breaking).is_empty(),
            "{breaking}= in {path}"
        );
    }

    // systemd's own parser, where installed: no complaint about a line of
    // the unit (its output about the host is not the unit's business).
    let dir = tempfile::tempdir().expect("tempdir");
    // A template is checked as one of its instances.
    let copy = dir.path().join(name.replace('@', "-8081"));
    let runnable = text
        .replace(values("Service", "ExecStart")[0], "/bin/true")
        .replace("EnvironmentFile=/etc/nox/nox.env", "")
        .replace("%i", "8081");
    std::fs::write(&copy, runnable).expect("copy");
    match std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
    {
        Ok(output) => {
            let said = String::from_utf8_lossy(&output.stderr).into_owned()
                + &String::from_utf8_lossy(&output.stdout);
            let about_the_unit = format!("{}:", copy.display());
            assert!(
                !said.lines().any(|line| line.starts_with(&about_the_unit)),
                "systemd-analyze verify: {said}"
            );
        }
        Err(error) => eprintln!("systemd-analyze verify skipped: {error}"),
    }
}
