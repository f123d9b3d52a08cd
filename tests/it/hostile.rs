//! The audit trail against hostile content: whatever a client sends, its
//! request gets its row (marked where a value had to be altered), the rows
//! batched with it land too, and nothing is left in the spool.

use std::collections::HashMap;
use std::path::Path;

use nox_audit_model::ActionRecord;
use nox_audit_model::storable::{MAX_COMMAND_TEXT_CHARS, sha256_hex};
use nox_audit_store::verify::{VerifyOptions, verify};
use nox_audit_store::{AuditMode, Spool, WriterConfig};
use nox_testkit::{TEST_ADMIN_TOKEN, TestApp, TestDb, spawn_app_with};
use reqwest::header::{HeaderValue, USER_AGENT};
use reqwest::{Method, RequestBuilder};
use serde_json::{Value, json};
use time::OffsetDateTime;
use uuid::Uuid;

const ADMIN: &str = TEST_ADMIN_TOKEN;

/// Sends a request tagged with a fresh request id; returns the id and status.
async fn tagged(request: RequestBuilder) -> (Uuid, u16) {
    let id = Uuid::now_v7();
    let response = request
        .header("X-Request-ID", id.to_string())
        .send()
        .await
        .expect("a response");
    (id, response.status().as_u16())
}

/// Each request id's rows: (count, metadata, file_path, command_text, user_agent, endpoint).
async fn rows(app: &TestApp) -> HashMap<Uuid, Vec<tokio_postgres::Row>> {
    let mut by_request: HashMap<Uuid, Vec<tokio_postgres::Row>> = HashMap::new();
    for row in app
        .db
        .client()
        .await
        .query("SELECT * FROM audit_actions", &[])
        .await
        .expect("query")
    {
        by_request
            .entry(row.get("request_id"))
            .or_default()
            .push(row);
    }
    by_request
}

fn sanitized(row: &tokio_postgres::Row) -> Vec<String> {
    let metadata: Option<Value> = row.get("metadata");
    metadata
        .as_ref()
        .and_then(|m| m["sanitized"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|field| field.as_str().map(str::to_owned))
        .collect()
}

fn spool_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir.join("audit-spool"))
        .map(|entries| {
            entries
                .flatten()
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .filter(|name| name.ends_with(".ndjson"))
                .collect()
        })
        .unwrap_or_default()
}

/// Hostile values in every field a request controls, sent at once with
/// good requests by other users, so they share batches.
async fn hostile_values_land_marked_with_their_batch_mates(mode: AuditMode) {
    let app = spawn_app_with(|config| config.audit_mode = mode).await;
    let alice = app.new_user("alice").await;
    let bob = app.new_user("bob").await;
    let long_command = "x".repeat(12_000);
    let big_stdin = "s".repeat(1024 * 1024 + 1);
    let agent_bytes = HeaderValue::from_bytes(b"agent \xff\xfe").expect("obs-text is allowed");
    let long_agent = "a".repeat(600);
    let hostile: Vec<(&str, RequestBuilder)> = vec![
        (
            "nul path",
            app.request(Method::GET, "/ls?path=%00", &alice.token),
        ),
        (
            "invalid utf-8 path",
            app.request(Method::GET, "/cat?path=%ff%fe", &alice.token),
        ),
        (
            "invalid utf-8 agent",
            app.request(Method::GET, "/me", &alice.token)
                .header(USER_AGENT, agent_bytes),
        ),
        (
            "long agent",
            app.request(Method::GET, "/me", &alice.token)
                .header(USER_AGENT, long_agent.as_str()),
        ),
        (
            "nul command",
            app.request(Method::POST, "/run", &alice.token)
                .json(&json!({"command": "echo a\u{0}b"})),
        ),
        (
            "long command",
            app.request(Method::POST, "/run", &alice.token)
                .json(&json!({"command": long_command})),
        ),
        (
            "big stdin",
            app.request(Method::POST, "/run", &alice.token)
                .json(&json!({"command": "cat", "stdin": big_stdin})),
        ),
        (
            "nul query",
            app.request(Method::GET, "/admin/audit/logs?search=%00", ADMIN),
        ),
        (
            "invalid justification",
            app.request(Method::PATCH, &format!("/admin/users/{}", bob.id), ADMIN)
                .header(
                    "X-Nox-Justification",
                    HeaderValue::from_bytes(b"why \xff").expect("obs-text"),
                )
                .json(&json!({"tier": "free"})),
        ),
        (
            "long justification",
            app.request(Method::PATCH, &format!("/admin/users/{}", bob.id), ADMIN)
                .header("X-Nox-Justification", "j".repeat(5000))
                .json(&json!({"tier": "free"})),
        ),
        (
            "unknown method",
            app.request(
                Method::from_bytes(b"FROBNICATEFROBNICATE").expect("method"),
                "/ls",
                &alice.token,
            ),
        ),
        (
            "encoded route",
            app.request(Method::GET, "/m%65", &alice.token),
        ),
    ];
    let labels: Vec<&str> = hostile.iter().map(|(label, _)| *label).collect();
    let good = (0..20).map(|i| {
        let token = if i % 2 == 0 { &alice.token } else { &bob.token };
        app.request(Method::GET, "/me", token)
    });
    let sent = futures_util::future::join_all(
        hostile
            .into_iter()
            .map(|(_, request)| request)
            .chain(good)
            .map(tagged),
    )
    .await;
    if mode == AuditMode::Buffered {
        app.stop().await;
    }
    for ((_, status), label) in sent.iter().zip(&labels) {
        assert!(*status < 500, "{label}: answered {status}");
    }
    let rows = rows(&app).await;
    for (index, (id, status)) in sent.iter().enumerate() {
        let label = labels.get(index).copied().unwrap_or("good request");
        let found = rows.get(id).map_or(0, Vec::len);
        assert_eq!(found, 1, "{label} ({status}): {found} rows");
        let row = &rows[id][0];
        assert_eq!(row.get::<_, i16>("status_code") as u16, *status, "{label}");
    }
    let row = |label: &str| &rows[&sent[labels.iter().position(|l| *l == label).unwrap()].0][0];

    let nul_path = row("nul path");
    assert_eq!(
        nul_path.get::<_, Option<String>>("file_path").as_deref(),
        Some("\u{FFFD}")
    );
    assert_eq!(sanitized(nul_path), ["file_path"]);
    let invalid_path = row("invalid utf-8 path");
    assert_eq!(sanitized(invalid_path), ["file_path"]);
    assert_eq!(invalid_path.get::<_, i16>("status_code"), 400);
    assert_eq!(sanitized(row("invalid utf-8 agent")), ["user_agent"]);
    assert_eq!(
        row("invalid utf-8 agent")
            .get::<_, Option<String>>("user_agent")
            .as_deref(),
        Some("agent \u{FFFD}\u{FFFD}")
    );
    let long_agent_row = row("long agent");
    assert_eq!(sanitized(long_agent_row), ["user_agent"]);
    let metadata: Value = long_agent_row.get("metadata");
    assert_eq!(metadata["original"]["user_agent"]["bytes"], 600);
    assert_eq!(
        metadata["original"]["user_agent"]["sha256"],
        sha256_hex(long_agent.as_bytes())
    );
    let nul_command = row("nul command");
    assert_eq!(
        nul_command
            .get::<_, Option<String>>("command_text")
            .as_deref(),
        Some("echo a\u{FFFD}b")
    );
    assert_eq!(sanitized(nul_command), ["command_text"]);
    let long = row("long command");
    let stored: String = long.get("command_text");
    assert_eq!(stored.chars().count(), MAX_COMMAND_TEXT_CHARS);
    let metadata: Value = long.get("metadata");
    assert_eq!(metadata["original"]["command_text"]["bytes"], 12_000);
    assert_eq!(
        metadata["original"]["command_text"]["sha256"],
        sha256_hex(long_command.as_bytes())
    );
    let stdin: Value = row("big stdin").get("metadata");
    assert_eq!(stdin["stdin"]["bytes"], big_stdin.len());
    assert_eq!(stdin["stdin"]["sha256"], sha256_hex(big_stdin.as_bytes()));
    assert_eq!(row("nul query").get::<_, i16>("status_code"), 400);
    assert_eq!(
        row("unknown method").get::<_, String>("http_method").len(),
        16
    );
    let encoded = row("encoded route");
    assert_eq!(encoded.get::<_, String>("endpoint"), "/me");
    assert_eq!(encoded.get::<_, String>("route"), "/me");
    let metadata: Value = encoded.get("metadata");
    assert_eq!(metadata["raw_endpoint"], "/m%65");

    assert_eq!(
        spool_files(app.data_dir.path()),
        Vec::<String>::new(),
        "the spool is empty"
    );
    let mut client = app.db.client().await;
    verify(&mut client, &VerifyOptions::default())
        .await
        .expect("the chain verifies");
}

#[tokio::test]
async fn hostile_values_land_marked_in_durable_mode() {
    hostile_values_land_marked_with_their_batch_mates(AuditMode::Durable).await;
}

#[tokio::test]
async fn hostile_values_land_marked_in_buffered_mode() {
    hostile_values_land_marked_with_their_batch_mates(AuditMode::Buffered).await;
}

#[tokio::test]
async fn the_endpoint_filter_matches_the_routed_path() {
    let app = spawn_app_with(|_| {}).await;
    let alice = app.new_user("alice").await;
    let (id, _) = tagged(
        app.request(Method::POST, "/r%75n", &alice.token)
            .json(&json!({"command": ""})),
    )
    .await;
    let page: Value = app
        .get_as("/admin/audit/logs?endpoint=/run&page_size=1000", ADMIN)
        .await
        .json()
        .await
        .expect("json");
    let found = page["logs"]
        .as_array()
        .expect("logs")
        .iter()
        .any(|log| log["request_id"] == id.to_string());
    assert!(found, "{page}");
}

fn record(endpoint: &str) -> ActionRecord {
    ActionRecord::arrived(Uuid::now_v7(), OffsetDateTime::now_utc(), "GET", endpoint)
}

/// A constraint the test adds makes PostgreSQL refuse rows whose file path
/// is `refuse-me`, as it would refuse content nothing foresaw.
async fn refuse_marked_rows(db: &TestDb) {
    db.client()
        .await
        .batch_execute(
            "ALTER TABLE audit_actions ADD CONSTRAINT test_refuses
                 CHECK (file_path IS DISTINCT FROM 'refuse-me')",
        )
        .await
        .expect("constraint");
}

#[tokio::test]
async fn a_batch_with_one_refused_row_writes_the_rest_and_a_minimal_row() {
    let db = TestDb::new().await;
    refuse_marked_rows(&db).await;
    let spool_dir = tempfile::tempdir().expect("tempdir");
    let writer = db.audit_writer(
        Spool::open(spool_dir.path()).expect("spool"),
        WriterConfig {
            // One batch: everything is queued before the writer wakes.
            linger: std::time::Duration::from_millis(500),
            ..WriterConfig::default()
        },
    );
    let sink = writer.sink();
    let mut refused_id = None;
    for i in 0..1000 {
        let mut record = record("/batch");
        record.file_path = Some(if i == 617 {
            "refuse-me".into()
        } else {
            format!("f{i}")
        });
        if i == 617 {
            refused_id = Some(record.id);
        }
        sink.submit(record, false).await.expect("queued");
    }
    writer.shutdown().await;
    assert_eq!(
        db.scalar("SELECT count(*) FROM audit_actions WHERE endpoint = '/batch'")
            .await,
        999
    );
    let minimal = db
        .client()
        .await
        .query_one(
            "SELECT endpoint, file_path, metadata FROM audit_actions WHERE id = $1",
            &[&refused_id.expect("refused id")],
        )
        .await
        .expect("the refused request still has its row");
    assert_eq!(minimal.get::<_, String>("endpoint"), "");
    assert_eq!(minimal.get::<_, Option<String>>("file_path"), None);
    let metadata: Value = minimal.get("metadata");
    assert_eq!(metadata["write_error"]["sqlstate"], "23514", "{metadata}");
    assert_eq!(
        std::fs::read_dir(spool_dir.path()).expect("spool").count(),
        0
    );
    let mut client = db.client().await;
    let chains = verify(&mut client, &VerifyOptions::default())
        .await
        .expect("the chain verifies");
    assert_eq!(chains[0].last_seq, 1000, "{chains:?}");
}

#[tokio::test]
async fn a_bad_spool_file_does_not_block_the_ones_after_it() {
    let db = TestDb::new().await;
    refuse_marked_rows(&db).await;
    let spool_dir = tempfile::tempdir().expect("tempdir");
    let spool = Spool::open(spool_dir.path()).expect("spool");
    // Oldest first: an unreadable file, rows with a NUL (as an older version
    // spooled them), a row refused whatever its form, then a good file.
    let unreadable = spool_dir.path().join(format!("{}.ndjson", Uuid::now_v7()));
    std::fs::write(&unreadable, b"{ not json\n").expect("write");
    let mut nul = record("/spooled-nul");
    nul.file_path = Some("a\0b".into());
    spool.append(&[], &[nul.clone()]).expect("spool nul");
    let mut refused = record("/spooled-refused");
    refused.file_path = Some("refuse-me".into());
    spool
        .append(&[], &[refused.clone()])
        .expect("spool refused");
    let good: Vec<ActionRecord> = (0..5).map(|_| record("/spooled-good")).collect();
    spool.append(&[], &good).expect("spool good");

    let writer = db.audit_writer(spool.clone(), WriterConfig::default());
    let status = writer.sink();
    writer.shutdown().await;
    assert_eq!(
        db.scalar("SELECT count(*) FROM audit_actions WHERE endpoint = '/spooled-good'")
            .await,
        5
    );
    let path: Option<String> = db
        .client()
        .await
        .query_one(
            "SELECT file_path FROM audit_actions WHERE id = $1",
            &[&nul.id],
        )
        .await
        .expect("the NUL row")
        .get(0);
    assert_eq!(path.as_deref(), Some("a\u{FFFD}b"));
    assert_eq!(
        db.scalar(&format!(
            "SELECT count(*) FROM audit_actions WHERE id = '{}' AND metadata ? 'write_error'",
            refused.id
        ))
        .await,
        1
    );
    assert_eq!(
        spool.pending().expect("pending"),
        Vec::<std::path::PathBuf>::new()
    );
    assert_eq!(
        spool.rejected_files().expect("rejected"),
        1,
        "the unreadable file"
    );
    assert_eq!(status.status().rejected_files(), 1);
    assert_eq!(status.status().rows_reduced(), 1);
    let mut client = db.client().await;
    verify(&mut client, &VerifyOptions::default())
        .await
        .expect("the chain verifies");
}

/// Arbitrary bytes as the audit layer would decode them from a client (NUL
/// included), sometimes repeated past every column's limit.
fn hostile_text() -> impl proptest::strategy::Strategy<Value = String> {
    use proptest::prelude::*;
    (proptest::collection::vec(any::<u8>(), 0..200), 1usize..90).prop_map(|(bytes, times)| {
        let (text, _) = nox_audit_model::storable::text_from_bytes(&bytes);
        if times > 60 { text.repeat(times) } else { text }
    })
}

/// A record with hostile text in every text field and JSON value.
fn hostile_record() -> impl proptest::strategy::Strategy<Value = ActionRecord> {
    use proptest::prelude::*;
    let texts = proptest::collection::vec(hostile_text(), 14);
    (texts, any::<bool>()).prop_map(|(t, signed_in)| {
        let mut record =
            ActionRecord::arrived(Uuid::now_v7(), OffsetDateTime::now_utc(), &t[0], &t[1]);
        record.route = t[2].clone();
        record.action_type = t[3].clone();
        record.action_category = t[4].clone();
        record.user_agent = Some(t[5].clone());
        record.file_path = Some(t[6].clone());
        record.command_type = Some(t[7].clone());
        record.command_text = Some(t[8].clone());
        record.error_details = Some(t[9].clone());
        record.metadata = Some(json!({ t[10].clone(): [t[11].clone()] }));
        record.quota_consumed = Some(json!({ "quota_type": t[12].clone() }));
        record.quota_remaining = Some(Value::String(t[13].clone()));
        if signed_in {
            record.user_id = Some(Uuid::now_v7());
            record.session_token_hash = Some(t[13].chars().take(80).collect());
        }
        record
    })
}

/// Property: whatever bytes a record's text fields hold, it is written in
/// full through the real writer (no row reduced or rejected), and the chain
/// verifies. Cases come from a fixed seed, so a failure repeats.
#[tokio::test]
async fn records_of_arbitrary_bytes_all_land_in_full() {
    use proptest::strategy::{Strategy, ValueTree};
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::deterministic_rng(RngAlgorithm::ChaCha),
    );
    let strategy = hostile_record();
    let records: Vec<ActionRecord> = (0..300)
        .map(|_| strategy.new_tree(&mut runner).expect("a case").current())
        .collect();
    let db = TestDb::new().await;
    let spool_dir = tempfile::tempdir().expect("tempdir");
    let spool = Spool::open(spool_dir.path()).expect("spool");
    let writer = db.audit_writer(spool.clone(), WriterConfig::default());
    let sink = writer.sink();
    for (i, record) in records.iter().enumerate() {
        // Some wait for their commit (small batches), most do not.
        sink.submit(record.clone(), i % 7 == 0)
            .await
            .unwrap_or_else(|error| panic!("case {i}: {error}"));
    }
    writer.shutdown().await;
    assert_eq!(sink.status().rows_reduced(), 0, "every row written in full");
    assert_eq!(sink.status().rejected_rows(), 0);
    assert_eq!(
        spool.pending().expect("pending"),
        Vec::<std::path::PathBuf>::new()
    );
    let ids: Vec<Uuid> = records.iter().map(|r| r.id).collect();
    let stored = db
        .client()
        .await
        .query_one(
            "SELECT count(*) FROM audit_actions WHERE id = ANY($1)",
            &[&ids],
        )
        .await
        .expect("count")
        .get::<_, i64>(0);
    assert_eq!(stored, records.len() as i64);
    let mut client = db.client().await;
    verify(&mut client, &VerifyOptions::default())
        .await
        .expect("the chain verifies");
}

/// A handler that panics is answered 500 and recorded as such, not as a
/// client that went away (the panic used to take the connection down).
#[actix_web::test]
async fn a_panicking_handler_is_answered_and_recorded_as_500() {
    use actix_web::{App, test, web};
    use nox_audit_actix::{Audit, AuditConfig};
    let db = TestDb::new().await;
    let spool_dir = tempfile::tempdir().expect("tempdir");
    let writer = db.audit_writer(
        Spool::open(spool_dir.path()).expect("spool"),
        WriterConfig::default(),
    );
    let app = test::init_service(
        App::new()
            .route(
                "/boom",
                web::get().to(|| async {
                    panic!("a bug");
                    #[allow(unreachable_code)]
                    ""
                }),
            )
            .wrap(Audit::new(AuditConfig::default(), writer.sink())),
    )
    .await;
    let request_id = Uuid::now_v7();
    // The error that actix then answers with.
    let error = test::try_call_service(
        &app,
        test::TestRequest::get()
            .uri("/boom")
            .insert_header(("X-Request-ID", request_id.to_string()))
            .to_request(),
    )
    .await
    .expect_err("the panic becomes an error response");
    let response = error.error_response();
    assert_eq!(response.status(), 500);
    let body = actix_web::body::to_bytes(response.into_body())
        .await
        .expect("body");
    let body: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(body["code"], "internal");
    writer.shutdown().await;
    let row = db
        .client()
        .await
        .query_one(
            "SELECT status_code, error_details FROM audit_actions WHERE request_id = $1",
            &[&request_id],
        )
        .await
        .expect("one row");
    assert_eq!(row.get::<_, i16>(0), 500);
    assert_eq!(
        row.get::<_, Option<String>>(1).as_deref(),
        Some("the request handler panicked")
    );
}

/// Durable submissions from many tasks at once (small batches, each one
/// statement after the head the last one left): `records_each` records per
/// task, every `refuse_every`-th marked to be refused. Returns the ids
/// submitted and how many were marked.
async fn submit_durably_in_parallel(
    sink: &nox_audit_store::AuditSink,
    tasks: usize,
    records_each: usize,
    refuse_every: usize,
) -> (Vec<Uuid>, usize) {
    let mut set = tokio::task::JoinSet::new();
    for task in 0..tasks {
        let sink = sink.clone();
        set.spawn(async move {
            let mut ids = Vec::new();
            let mut refused = 0;
            for i in 0..records_each {
                let mut record = record("/pipelined");
                let refuse = (task * records_each + i).is_multiple_of(refuse_every);
                refused += usize::from(refuse);
                record.file_path = Some(if refuse {
                    "refuse-me".into()
                } else {
                    format!("f{i}")
                });
                ids.push(record.id);
                sink.submit(record, true).await.expect("acknowledged");
            }
            (ids, refused)
        });
    }
    let (mut ids, mut refused) = (Vec::new(), 0);
    while let Some(done) = set.join_next().await {
        let (more, marked) = done.expect("task");
        ids.extend(more);
        refused += marked;
    }
    (ids, refused)
}

/// Nothing was left in the spool, and the actions chain verifies up to
/// `last_seq`.
async fn assert_spool_empty_and_chain_whole(db: &TestDb, spool: &Path, last_seq: i64) {
    assert_eq!(std::fs::read_dir(spool).expect("spool").count(), 0);
    let mut client = db.client().await;
    let chains = verify(&mut client, &VerifyOptions::default())
        .await
        .expect("the chain verifies");
    assert_eq!(chains[0].last_seq, last_seq, "{chains:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_rows_among_concurrent_durable_batches_leave_one_row_each_and_a_gapless_chain() {
    let db = TestDb::new().await;
    refuse_marked_rows(&db).await;
    let spool_dir = tempfile::tempdir().expect("tempdir");
    let writer = db.audit_writer(
        Spool::open(spool_dir.path()).expect("spool"),
        WriterConfig::default(),
    );
    let (ids, refused) = submit_durably_in_parallel(&writer.sink(), 32, 25, 37).await;
    writer.shutdown().await;
    let client = db.client().await;
    let rows = client
        .query(
            "SELECT coalesce(metadata ? 'write_error', false) FROM audit_actions WHERE id = ANY($1)",
            &[&ids],
        )
        .await
        .expect("rows");
    assert_eq!(rows.len(), 800, "one row per acknowledged record");
    let minimal = rows.iter().filter(|row| row.get::<_, bool>(0)).count();
    assert_eq!(minimal, refused, "each refused record in minimal form");
    assert_spool_empty_and_chain_whole(&db, spool_dir.path(), 800).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_lost_mid_batch_again_and_again_loses_and_doubles_nothing() {
    let db = TestDb::new().await;
    let spool_dir = tempfile::tempdir().expect("tempdir");
    let writer = db.audit_writer(
        Spool::open(spool_dir.path()).expect("spool"),
        WriterConfig::default(),
    );
    // Kills the connection batches are written on, again and again (a
    // batch may commit without its answer arriving).
    let killer_db = db.client().await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = std::sync::Arc::clone(&stop);
    let killer = tokio::spawn(async move {
        let mut killed = 0;
        while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
            let row = killer_db
                .query_one(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                     WHERE datname = current_database() AND pid <> pg_backend_pid()
                       AND state = 'active' AND query LIKE 'WITH inserted%'",
                    &[],
                )
                .await
                .expect("terminate");
            killed += row.get::<_, i64>(0);
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        killed
    });
    let (ids, _) = submit_durably_in_parallel(&writer.sink(), 32, 25, usize::MAX).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let killed = killer.await.expect("killer");
    assert!(
        killed > 0,
        "no batch was killed mid-statement: the test tested nothing"
    );
    writer.shutdown().await;
    let client = db.client().await;
    let distinct = client
        .query_one(
            "SELECT count(DISTINCT id), count(*) FROM audit_actions WHERE id = ANY($1)",
            &[&ids],
        )
        .await
        .expect("count");
    assert_eq!(
        (distinct.get::<_, i64>(0), distinct.get::<_, i64>(1)),
        (800, 800),
        "every acknowledged record once"
    );
    assert_spool_empty_and_chain_whole(&db, spool_dir.path(), 800).await;
}
