//! `/metrics` of a real server process (its own recorder): every family with
//! exactly its labels, counts that match the requests made, bounded labels.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use nix::sys::signal::Signal;
use nox_testkit::TestDb;
use prometheus_parse::{Sample, Scrape, Value};

mod support;
use support::Server;

const TOKEN: &str = "metrics-test-admin-token-0123456789abcdef";

async fn scrape(base: &str, token: Option<&str>) -> (u16, String) {
    let mut request = reqwest::Client::new().get(format!("{base}/metrics"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("scrape");
    (
        response.status().as_u16(),
        response.text().await.expect("text"),
    )
}

fn parse(text: &str) -> Scrape {
    Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("valid exposition text")
}

fn labels(sample: &Sample) -> BTreeSet<String> {
    sample
        .labels
        .keys()
        .filter(|k| *k != "le")
        .cloned()
        .collect()
}

fn value(sample: &Sample) -> f64 {
    match &sample.value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
        Value::Histogram(_) | Value::Summary(_) => f64::NAN,
    }
}

fn find<'a>(scrape: &'a Scrape, name: &str, wanted: &[(&str, &str)]) -> Option<&'a Sample> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && wanted.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_complete_exact_and_bounded() {
    let db = TestDb::new().await;
    let data = tempfile::tempdir().expect("tempdir");
    let envs = [
        ("DATABASE_URL", db.url()),
        ("NOX_DATA_DIR", data.path().display().to_string()),
        ("NOX_ADMIN_TOKEN", TOKEN.to_owned()),
        ("NOX_RATE_LIMIT_PER_IP", "60".to_owned()),
        ("NOX_RATE_LIMIT_BURST_PER_IP", "3".to_owned()),
        ("NOX_RATE_LIMIT_PER_USER", "0".to_owned()),
    ];
    let mut server = Server::start_async(envs.to_vec()).await;
    let base = server.base.clone();
    let http = reqwest::Client::new();

    let created: serde_json::Value = http
        .post(format!("{base}/admin/users"))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({"name": "alice"}))
        .send()
        .await
        .expect("create")
        .json()
        .await
        .expect("json");
    let alice = created["token"].as_str().expect("token").to_owned();
    let alice_id = created["id"].as_str().expect("id").to_owned();
    let quota = http
        .put(format!("{base}/quotas/admin/users/{alice_id}/quotas"))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({"req_hour": 3}))
        .send()
        .await
        .expect("quota");
    assert_eq!(quota.status(), 200);

    let mut me = HashMap::<u16, u32>::new();
    for _ in 0..5 {
        let status = http
            .get(format!("{base}/me"))
            .bearer_auth(&alice)
            .send()
            .await
            .expect("me")
            .status()
            .as_u16();
        *me.entry(status).or_default() += 1;
    }
    assert_eq!((me.get(&200), me.get(&429)), (Some(&3), Some(&2)), "{me:?}");
    let mut anonymous = HashMap::<u16, u32>::new();
    for _ in 0..5 {
        let status = http
            .get(format!("{base}/me"))
            .send()
            .await
            .expect("me")
            .status()
            .as_u16();
        *anonymous.entry(status).or_default() += 1;
    }
    // The address's burst of 3 was charged twice already: by the admin
    // token's and alice's first requests, resolved before any token was
    // known here (the per-address limit runs before a token lookup).
    assert_eq!(
        (anonymous.get(&401), anonymous.get(&429)),
        (Some(&1), Some(&4)),
        "{anonymous:?}"
    );
    let can_run = nix::unistd::Uid::effective().is_root();
    if can_run {
        let run = http
            .post(format!("{base}/run"))
            .bearer_auth(TOKEN)
            .json(&serde_json::json!({"command": "true"}))
            .send()
            .await
            .expect("run");
        assert_eq!(run.status(), 200);
    } else {
        eprintln!("not checking the nox_run_* families: /run needs root");
    }
    // 2,000 distinct unknown paths, sent with the admin's token (not limited).
    for i in 0..2000 {
        http.get(format!("{base}/no/such/path/{i}"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("404");
    }

    let (status, text) = scrape(&base, None).await;
    assert_eq!(status, 200);
    let scrape = parse(&text);
    let expected: &[(&str, &[&str])] = &[
        ("nox_http_requests_total", &["route", "method", "status"]),
        ("nox_http_request_duration_seconds", &["route", "method"]),
        (
            "nox_audit_actions_total",
            &["user_id", "action_type", "status"],
        ),
        ("nox_audit_response_time_seconds", &["endpoint"]),
        ("nox_audit_errors_total", &["endpoint", "status_code"]),
        (
            "nox_audit_quota_violations_total",
            &["user_id", "quota_type"],
        ),
        ("nox_audit_sessions_total", &[]),
        ("nox_audit_queue_depth", &[]),
        ("nox_audit_rows_written_total", &[]),
        ("nox_audit_write_batch_rows", &[]),
        ("nox_audit_write_duration_seconds", &[]),
        ("nox_audit_write_failures_total", &[]),
        ("nox_audit_spool_rows", &[]),
        ("nox_audit_dropped_total", &[]),
        ("nox_audit_rows_reduced_total", &[]),
        ("nox_audit_rejected_total", &[]),
        ("nox_audit_verify_runs_total", &["outcome"]),
        ("nox_audit_verify_failures_total", &["chain"]),
        ("nox_audit_verify_last_success_timestamp_seconds", &[]),
        ("nox_audit_verify_interval_seconds", &[]),
        ("nox_audit_streams_open", &[]),
        ("nox_audit_stream_lagged_total", &[]),
        ("nox_audit_read_fallback_total", &["reason"]),
        ("nox_audit_rollup_lag_seconds", &[]),
        ("nox_http_shed_total", &[]),
        ("nox_sandbox_files", &[]),
        ("nox_sandbox_bytes", &[]),
        ("nox_quota_violations_total", &["quota_type"]),
        ("nox_rate_limited_total", &["scope"]),
        ("nox_build_info", &["version"]),
        ("nox_servers_live", &[]),
        ("nox_admin_changes_applied_total", &["kind"]),
        ("nox_admin_changes_reconnects_total", &[]),
    ];
    let run_families: &[(&str, &[&str])] = &[
        ("nox_run_total", &["outcome"]),
        ("nox_run_duration_seconds", &[]),
        ("nox_run_cpu_seconds", &[]),
    ];
    let expected: Vec<&(&str, &[&str])> = expected
        .iter()
        .chain(run_families.iter().filter(|_| can_run))
        .collect();
    assert_eq!(
        expected.len(),
        nox_api::metrics::families().count() - if can_run { 0 } else { 3 },
        "every family is checked"
    );
    for (name, wanted) in expected {
        let samples: Vec<&Sample> = scrape
            .samples
            .iter()
            .filter(|s| s.metric == *name)
            .collect();
        assert!(!samples.is_empty(), "{name} is missing");
        let wanted: BTreeSet<String> = wanted.iter().map(|s| s.to_string()).collect();
        for sample in samples {
            assert_eq!(labels(sample), wanted, "{name}");
        }
        assert!(scrape.docs.contains_key(*name), "{name} has no HELP");
    }
    for (family, kind) in nox_api::metrics::families() {
        // Prometheus naming: `_total` names a counter, and only a counter.
        assert_eq!(
            family.ends_with("_total"),
            *kind == "counter",
            "{family} is a {kind}"
        );
        if can_run || !family.starts_with("nox_run_") {
            assert!(
                text.contains(&format!("# TYPE {family} {kind}")),
                "{family} is not a {kind}"
            );
        }
    }

    // Counters equal what was done.
    let count =
        |name: &str, wanted: &[(&str, &str)]| find(&scrape, name, wanted).map(value).unwrap_or(0.0);
    assert_eq!(
        count(
            "nox_http_requests_total",
            &[("route", "/me"), ("status", "200")]
        ),
        3.0
    );
    assert_eq!(
        count(
            "nox_http_requests_total",
            &[("route", "/me"), ("status", "401")]
        ),
        1.0
    );
    assert_eq!(
        count(
            "nox_http_requests_total",
            &[("route", "/me"), ("status", "429")]
        ),
        6.0
    );
    assert_eq!(
        count(
            "nox_http_requests_total",
            &[("route", "unmatched"), ("status", "404")]
        ),
        2000.0
    );
    assert_eq!(count("nox_rate_limited_total", &[("scope", "ip")]), 4.0);
    assert_eq!(
        count("nox_quota_violations_total", &[("quota_type", "req_hour")]),
        2.0
    );
    assert_eq!(
        count(
            "nox_audit_quota_violations_total",
            &[("user_id", &alice_id), ("quota_type", "req_hour")]
        ),
        2.0
    );
    assert_eq!(
        count(
            "nox_audit_quota_violations_total",
            &[("user_id", "anonymous"), ("quota_type", "rate_limit_ip")]
        ),
        4.0
    );
    assert_eq!(
        count(
            "nox_audit_actions_total",
            &[
                ("user_id", &alice_id),
                ("action_type", "auth"),
                ("status", "success")
            ]
        ),
        3.0
    );
    assert_eq!(count("nox_audit_dropped_total", &[]), 0.0);
    if can_run {
        // Run CPU is a histogram: one observation per run, its `_sum` the
        // total CPU seconds.
        let cpu = find(&scrape, "nox_run_cpu_seconds", &[]).expect("nox_run_cpu_seconds");
        let Value::Histogram(buckets) = &cpu.value else {
            panic!("nox_run_cpu_seconds is not a histogram: {cpu:?}");
        };
        assert_eq!(buckets.last().map(|b| b.count), Some(1.0), "{cpu:?}");
        assert_eq!(count("nox_run_cpu_seconds_count", &[]), 1.0);
        assert!(find(&scrape, "nox_run_cpu_seconds_sum", &[]).is_some());
        assert!(!text.contains("nox_run_cpu_seconds_total"));
    }
    assert_eq!(
        count("nox_build_info", &[("version", nox_api::VERSION)]),
        1.0
    );

    // Bounded: no raw path, token or token hash in any label value.
    let unmatched_series = scrape
        .samples
        .iter()
        .filter(|s| s.labels.values().any(|v| v == "unmatched"))
        .count();
    assert!(
        unmatched_series < 10,
        "{unmatched_series} series for unmatched routes"
    );
    for sample in &scrape.samples {
        for value in sample.labels.values() {
            assert!(
                !value.contains("/no/such"),
                "raw path in {}: {value}",
                sample.metric
            );
            assert!(
                !value.contains(TOKEN) && !value.contains(&alice),
                "token in {}",
                sample.metric
            );
            assert!(
                !(value.len() == 16 && value.chars().all(|c| c.is_ascii_hexdigit())),
                "token hash in {}",
                sample.metric
            );
        }
    }

    server.signal(Signal::SIGTERM);
    assert!(server.wait_exit(Duration::from_secs(30)).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metrics_token_protects_the_endpoint() {
    let db = TestDb::new().await;
    let data = tempfile::tempdir().expect("tempdir");
    let envs = [
        ("DATABASE_URL", db.url()),
        ("NOX_DATA_DIR", data.path().display().to_string()),
        ("NOX_ADMIN_TOKEN", TOKEN.to_owned()),
        ("NOX_METRICS_TOKEN", "scrape-secret-0123456789".to_owned()),
    ];
    let mut server = Server::start_async(envs.to_vec()).await;
    let (status, body) = scrape(&server.base, None).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(scrape(&server.base, Some("wrong-secret")).await.0, 401);
    assert_eq!(
        scrape(&server.base, Some(TOKEN)).await.0,
        401,
        "a user token is not the metrics token"
    );
    let (status, text) = scrape(&server.base, Some("scrape-secret-0123456789")).await;
    assert_eq!(status, 200);
    parse(&text);
    server.signal(Signal::SIGTERM);
    assert!(server.wait_exit(Duration::from_secs(30)).success());
}
