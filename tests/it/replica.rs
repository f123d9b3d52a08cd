//! The read replica (`NOX_DATABASE_READ_URL`) against a real streaming
//! replica that the harness starts (`pg_basebackup -R`): the audit reads
//! are served there and say so; with the replica stopped or lagging past
//! `NOX_READ_MAX_LAG_MS` they go to the primary, counted; the live stream
//! passes over no record a lagging replica lacks. Without the PostgreSQL
//! binaries these tests print why and skip.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use nox_testkit::{Replicated, TEST_ADMIN_TOKEN, TestApp, spawn_app_on};
use reqwest::StatusCode;
use serde_json::Value;
use tokio::time::Instant;

use crate::audit_stream::Events;

const ADMIN: &str = TEST_ADMIN_TOKEN;
const PATIENCE: Duration = Duration::from_secs(60);

/// Every audit read endpoint that may be served by the replica.
const READS: &[&str] = &[
    "/admin/audit/logs",
    "/admin/stats",
    "/admin/audit/users",
    "/admin/audit/daily-summaries",
    "/admin/audit/admin-actions",
    "/admin/audit/export?format=csv",
];

/// This process's metrics recorder, installed before any app is built: the
/// fallback counter is read from it.
fn recorder() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::set_global_recorder(recorder).expect("the only recorder of this process");
        handle
    })
}

/// `nox_audit_read_fallback_total{reason}` (every app of this process).
fn fallbacks(reason: &str) -> u64 {
    let series = format!("nox_audit_read_fallback_total{{reason=\"{reason}\"}} ");
    recorder()
        .render()
        .lines()
        .find_map(|line| line.strip_prefix(&series))
        .map_or(0, |value| value.trim().parse().expect("a count"))
}

/// An app on the replicated database, reading from its replica.
async fn spawn(replicated: &Replicated, max_lag_ms: u64) -> TestApp {
    recorder();
    let url = replicated.replica_url();
    spawn_app_on(Arc::clone(&replicated.db), |config| {
        config.storage.database_read_url = Some(url.parse().expect("any text"));
        config.storage.read_max_lag_ms = max_lag_ms;
    })
    .await
}

/// A read's answer: which server gave it, its lag header, and its body.
struct Read {
    source: String,
    lag_ms: i64,
    body: String,
}

async fn read(app: &TestApp, path: &str) -> Read {
    let response = app.get_as(path, ADMIN).await;
    assert_eq!(response.status(), StatusCode::OK, "{path}");
    let header = |name: &str| response.headers()[name].to_str().expect("ASCII").to_owned();
    let source = header("x-nox-read-source");
    let lag_ms = header("x-nox-replica-lag-ms").parse().expect("whole ms");
    assert!(lag_ms >= 0, "{path}: lag {lag_ms}");
    if source == "primary" {
        assert_eq!(lag_ms, 0, "{path}: the primary is current");
    } else {
        assert_eq!(source, "replica", "{path}");
    }
    let body = response.text().await.expect("a body");
    Read {
        source,
        lag_ms,
        body,
    }
}

/// Reads `path` until `source` serves it.
async fn read_from(app: &TestApp, path: &str, source: &str) -> Read {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let answer = read(app, path).await;
        if answer.source == source {
            return answer;
        }
        assert!(Instant::now() < deadline, "{path} never served by {source}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `sql` (one boolean) holds on `client`.
async fn until(client: &tokio_postgres::Client, sql: &str) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let holds: bool = client.query_one(sql, &[]).await.expect(sql).get(0);
        if holds {
            return;
        }
        assert!(Instant::now() < deadline, "never: {sql}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The rows of a `/logs` page.
fn rows(logs: &Read) -> Vec<Value> {
    let page: Value = serde_json::from_str(&logs.body).expect("JSON");
    page["logs"].as_array().expect("logs").clone()
}

async fn primary_head(replicated: &Replicated) -> i64 {
    replicated
        .db
        .scalar("SELECT seq FROM audit_chain_heads WHERE chain = 'audit_actions'")
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_reads_and_exports_are_served_by_the_replica() {
    let Some(replicated) = Replicated::start().await else {
        return;
    };
    // A minute of allowed lag: this machine's load never sends these reads
    // elsewhere.
    let app = spawn(&replicated, 60_000).await;
    app.new_user("alice").await;
    let replica = replicated.replica_client().await;
    // Her creation's audit row, committed before the answer, replayed.
    until(
        &replica,
        "SELECT count(*) = 1 FROM audit_actions WHERE endpoint = '/admin/users'",
    )
    .await;

    for path in READS {
        let answer = read_from(&app, path, "replica").await;
        assert!(answer.lag_ms <= 60_000, "{path}: {}", answer.lag_ms);
    }
    let logs = read_from(&app, "/admin/audit/logs?endpoint=/admin/users", "replica").await;
    assert_eq!(rows(&logs).len(), 1, "alice's creation, from the replica");
    let export = read_from(&app, "/admin/audit/export?endpoint=/admin/users", "replica").await;
    assert_eq!(export.body.lines().count(), 2, "a header and alice's row");

    // The reads' connections are the replica's, none on the primary.
    let reading = "SELECT count(*) FROM pg_stat_activity \
                   WHERE application_name = 'nox-read' AND datname = current_database()";
    let on_replica: i64 = replica.query_one(reading, &[]).await.expect("count").get(0);
    assert!(on_replica >= 1, "no read connection on the replica");
    assert_eq!(
        replicated.db.scalar(reading).await,
        0,
        "a read on the primary"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_replica_stopped_reads_go_to_the_primary_and_are_counted() {
    let Some(replicated) = Replicated::start().await else {
        return;
    };
    let app = spawn(&replicated, 60_000).await;
    read_from(&app, "/admin/audit/logs", "replica").await;

    replicated.stop_replica().await;
    let before = fallbacks("unavailable");
    // Written after the replica stopped: only the primary has it.
    let bob = app.new_user("bob").await;
    for path in READS {
        let answer = read(&app, path).await;
        assert_eq!(answer.source, "primary", "{path}");
    }
    let actions = read(
        &app,
        &format!("/admin/audit/admin-actions?target_user_id={}", bob.id),
    )
    .await;
    let actions: Value = serde_json::from_str(&actions.body).expect("JSON");
    assert_eq!(
        actions["admin_actions"].as_array().expect("a list").len(),
        1
    );
    assert!(
        fallbacks("unavailable") > before + READS.len() as u64,
        "each read that went to the primary is counted"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_replica_sends_strict_reads_to_the_primary_and_the_stream_skips_nothing() {
    let Some(replicated) = Replicated::start().await else {
        return;
    };
    let strict = spawn(&replicated, 100).await;
    let tolerant = spawn(&replicated, 3_600_000).await;
    read_from(&strict, "/admin/audit/logs", "replica").await;
    read_from(&tolerant, "/admin/audit/logs", "replica").await;

    // A live stream on the tolerant server, whose reads stay on the replica.
    let after = primary_head(&replicated).await;
    let mut events = Events::open(&tolerant, "", Some(after)).await;

    let replica = replicated.replica_client().await;
    replica
        .execute("SELECT pg_wal_replay_pause()", &[])
        .await
        .expect("pause");
    until(
        &replica,
        "SELECT pg_get_wal_replay_pause_state() = 'paused'",
    )
    .await;
    for name in ["p1", "p2", "p3"] {
        strict.new_user(name).await;
    }
    let written = primary_head(&replicated).await;
    let deadline = Instant::now() + PATIENCE;
    while tolerant.state.commit_feed.head() < Some(written) {
        assert!(
            Instant::now() < deadline,
            "the commit feed never saw {written}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The stream has read from the replica since it knew of the new rows.
    let since: time::OffsetDateTime = replica
        .query_one("SELECT clock_timestamp()", &[])
        .await
        .expect("now")
        .get(0);
    let deadline = Instant::now() + PATIENCE;
    loop {
        let polled: bool = replica
            .query_one(
                "SELECT count(*) > 0 FROM pg_stat_activity \
                 WHERE application_name = 'nox-read' AND query_start > $1",
                &[&since],
            )
            .await
            .expect("activity")
            .get(0);
        if polled {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the stream never read the replica"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Over 100 ms behind: the strict server reads from the primary, which
    // has the new users; the tolerant one from the replica, which has not.
    let lagging = fallbacks("lagging");
    let fresh = read_from(
        &strict,
        "/admin/audit/logs?endpoint=/admin/users",
        "primary",
    )
    .await;
    assert_eq!(rows(&fresh).len(), 3);
    assert!(fallbacks("lagging") > lagging);
    let stale = read(&tolerant, "/admin/audit/logs?endpoint=/admin/users").await;
    assert_eq!(stale.source, "replica");
    assert!(stale.lag_ms > 0, "a paused replica is behind");
    assert_eq!(rows(&stale).len(), 0, "the replica has not replayed them");

    replica
        .execute("SELECT pg_wal_replay_resume()", &[])
        .await
        .expect("resume");
    // Every record after `after`, once, in order, up to a head that
    // includes the rows written during the pause.
    let until_seq = primary_head(&replicated).await;
    let mut expected = after;
    while expected < until_seq {
        let event = events.next().await.expect("the stream stays open");
        assert_eq!(event.kind, "record", "{event:?}");
        expected += 1;
        assert_eq!(event.id, Some(expected), "records skipped or repeated");
    }
    strict.stop().await;
    tolerant.stop().await;
}

/// Needs no replica binaries: a "replica" that hangs up on every
/// connection. Reads go to the primary, counted, and the failure is
/// remembered: ten reads in a row do not each try it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_replica_is_set_aside_and_reads_go_to_the_primary() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("address").port();
    let attempts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = Arc::clone(&attempts);
    tokio::spawn(async move {
        while let Ok((connection, _)) = listener.accept().await {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drop(connection);
        }
    });
    recorder();
    let before = fallbacks("unavailable");
    let app = nox_testkit::spawn_app_with(|config| {
        let url = format!("postgres://nox:s3cret@127.0.0.1:{port}/nox");
        config.storage.database_read_url = Some(url.parse().expect("any text"));
    })
    .await;
    for _ in 0..10 {
        let answer = read(&app, "/admin/audit/logs").await;
        assert_eq!(answer.source, "primary");
    }
    let attempts = attempts.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        (1..10).contains(&attempts),
        "{attempts} connection attempts for 10 reads"
    );
    assert!(fallbacks("unavailable") >= before + 10);
    app.stop().await;
}
