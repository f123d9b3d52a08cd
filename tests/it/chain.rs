//! The tamper-evident hash chains: an untouched trail verifies (also after a
//! retention drop, a replay and two servers writing at once); each kind of
//! tampering done directly in SQL is caught and named by its seq.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nox_audit_model::ActionRecord;
use nox_audit_model::chain::{ACTIONS_CHAIN, ADMIN_CHAIN, GENESIS};
use nox_audit_store::checkpoints::{Checkpoint, Checkpointer, read_public_key};
use nox_audit_store::pool::{PoolOptions, build_pool};
use nox_audit_store::sessions::SessionRow;
use nox_audit_store::verify::{ChainSummary, Problem, VerifyError, VerifyOptions, action_from_row};
use nox_audit_store::writer::{InsertTarget, insert};
use nox_testkit::{TEST_ADMIN_TOKEN, TestApp, send, spawn_app, spawn_app_on, spawn_app_with};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const ADMIN: &str = TEST_ADMIN_TOKEN;

/// An app with some history (requests of two users, admin actions),
/// stopped so its shutdown checkpoint is written.
async fn populated() -> TestApp {
    let app = spawn_app().await;
    for name in ["alice", "bob"] {
        let user = app.new_user(name).await;
        for i in 0..8 {
            send(
                app.request(Method::PUT, &format!("/write?path=f{i}.txt"), &user.token)
                    .body("x"),
            )
            .await;
            app.get_as("/ls?path=.", &user.token).await;
        }
    }
    app.stop().await;
    app
}

fn checkpoint_file(app: &TestApp) -> PathBuf {
    app.data_dir.path().join("checkpoints/checkpoints.log")
}

async fn verify(app: &TestApp, options: &VerifyOptions) -> Result<Vec<ChainSummary>, VerifyError> {
    let mut client = app.db.client().await;
    nox_audit_store::verify::verify(&mut client, options).await
}

/// Verifies and expects the first problem at `chain`/`seq`.
async fn expect_broken(app: &TestApp, options: &VerifyOptions, chain: &str, seq: i64) -> Problem {
    match verify(app, options).await {
        Err(VerifyError::Broken {
            chain: found,
            seq: at,
            problem,
        }) => {
            assert_eq!((found, at), (chain, seq), "{problem}");
            problem
        }
        other => panic!("expected a broken chain at {chain} seq {seq}, got {other:?}"),
    }
}

async fn sql(app: &TestApp, statement: &str) {
    app.db
        .client()
        .await
        .batch_execute(statement)
        .await
        .unwrap_or_else(|e| panic!("{statement}: {e}"));
}

#[tokio::test]
async fn an_untouched_trail_verifies_with_its_external_checkpoints_and_key() {
    let app = populated().await;
    let options = VerifyOptions {
        external_checkpoints: Checkpoint::read_log(&checkpoint_file(&app)).expect("log"),
        public_key: Some(
            read_public_key(&app.data_dir.path().join("checkpoints/public-key")).expect("key"),
        ),
        ..VerifyOptions::default()
    };
    assert_eq!(
        options.external_checkpoints.len(),
        2,
        "one per chain at shutdown"
    );
    let chains = verify(&app, &options).await.expect("verifies");
    let rows: i64 = app
        .db
        .client()
        .await
        .query_one("SELECT count(*) FROM audit_actions", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(chains[0].chain, ACTIONS_CHAIN);
    assert_eq!((chains[0].first_seq, chains[0].last_seq), (1, rows));
    assert_eq!(
        chains[0].checkpoints, 1,
        "the log file repeats the database's checkpoint: counted once"
    );
    assert_eq!(chains[1].chain, ADMIN_CHAIN);
    assert!(chains[1].last_seq >= 3, "bootstrap and two user creations");
    // --from-seq starts in the middle.
    let partial = VerifyOptions {
        from_seq: Some(rows / 2),
        ..VerifyOptions::default()
    };
    assert_eq!(
        verify(&app, &partial).await.expect("verifies")[0].first_seq,
        rows / 2
    );
}

#[tokio::test]
async fn an_edited_field_is_caught_at_its_row() {
    let app = populated().await;
    sql(
        &app,
        "UPDATE audit_actions SET response_size = response_size + 1 WHERE seq = 5",
    )
    .await;
    let problem = expect_broken(&app, &VerifyOptions::default(), ACTIONS_CHAIN, 5).await;
    assert_eq!(problem, Problem::HashMismatch);
}

#[tokio::test]
async fn an_edited_admin_action_is_caught_in_its_own_chain() {
    let app = populated().await;
    sql(
        &app,
        "UPDATE audit_admin_actions SET justification = 'routine' WHERE seq = 2",
    )
    .await;
    let problem = expect_broken(&app, &VerifyOptions::default(), ADMIN_CHAIN, 2).await;
    assert_eq!(problem, Problem::HashMismatch);
}

#[tokio::test]
async fn a_deleted_middle_row_is_caught_as_missing() {
    let app = populated().await;
    sql(&app, "DELETE FROM audit_actions WHERE seq = 7").await;
    let problem = expect_broken(&app, &VerifyOptions::default(), ACTIONS_CHAIN, 7).await;
    assert_eq!(problem, Problem::Missing);
}

/// Inserts a copy of row 4 under a new id, with `chain_columns` as its
/// seq and row_hash.
async fn forge_row(app: &TestApp, id: uuid::Uuid, chain_columns: &str) {
    // Every column but the id, in table order (which the declaration is).
    let rest = nox_audit_model::ACTION_COLUMNS[1..]
        .iter()
        .map(|c| format!("\"{c}\""))
        .collect::<Vec<_>>()
        .join(", ");
    sql(
        app,
        &format!(
            "INSERT INTO audit_actions SELECT '{id}', {rest}, {chain_columns}
             FROM audit_actions WHERE seq = 4"
        ),
    )
    .await;
}

#[tokio::test]
async fn inserted_rows_are_caught() {
    let app = populated().await;
    let forged = uuid::Uuid::now_v7();
    forge_row(&app, forged, "seq, row_hash").await;
    let problem = expect_broken(&app, &VerifyOptions::default(), ACTIONS_CHAIN, 4).await;
    assert!(
        matches!(problem, Problem::Duplicate | Problem::HashMismatch),
        "{problem}"
    );
    sql(
        &app,
        &format!("DELETE FROM audit_actions WHERE id = '{forged}'"),
    )
    .await;
    verify(&app, &VerifyOptions::default())
        .await
        .expect("whole again");
    let unchained = uuid::Uuid::now_v7();
    forge_row(&app, unchained, "NULL, NULL").await;
    let problem = expect_broken(&app, &VerifyOptions::default(), ACTIONS_CHAIN, 0).await;
    assert_eq!(
        problem,
        Problem::Unchained {
            id: unchained.to_string()
        }
    );
}

#[tokio::test]
async fn two_swapped_rows_are_caught() {
    let app = populated().await;
    sql(
        &app,
        "UPDATE audit_actions SET seq = CASE seq WHEN 5 THEN 6 ELSE 5 END WHERE seq IN (5, 6)",
    )
    .await;
    let problem = expect_broken(&app, &VerifyOptions::default(), ACTIONS_CHAIN, 5).await;
    assert_eq!(problem, Problem::HashMismatch);
}

#[tokio::test]
async fn deleting_the_newest_rows_is_caught_by_the_external_checkpoints() {
    let app = populated().await;
    let last: i64 = app
        .db
        .client()
        .await
        .query_one("SELECT max(seq) FROM audit_actions", &[])
        .await
        .expect("max")
        .get(0);
    let cut = last - 10;
    sql(
        &app,
        &format!("DELETE FROM audit_actions WHERE seq > {cut}"),
    )
    .await;
    // The database's own shutdown checkpoint gives it away.
    let problem = expect_broken(&app, &VerifyOptions::default(), ACTIONS_CHAIN, last).await;
    assert_eq!(problem, Problem::Truncated { chain_end: cut });
    // Without it, the head still does.
    sql(&app, "DELETE FROM audit_checkpoints").await;
    let problem = expect_broken(&app, &VerifyOptions::default(), ACTIONS_CHAIN, cut).await;
    assert_eq!(problem, Problem::HeadMismatch { head_seq: last });
    // A careful forger also rewinds the head; the checkpoint file kept
    // elsewhere still knows.
    sql(
        &app,
        &format!(
            "UPDATE audit_chain_heads SET seq = {cut},
                 row_hash = (SELECT row_hash FROM audit_actions WHERE seq = {cut})
             WHERE chain = 'audit_actions'"
        ),
    )
    .await;
    verify(&app, &VerifyOptions::default())
        .await
        .expect("without outside evidence, a clean truncation cannot be seen");
    let options = VerifyOptions {
        external_checkpoints: Checkpoint::read_log(&checkpoint_file(&app)).expect("log"),
        ..VerifyOptions::default()
    };
    let problem = expect_broken(&app, &options, ACTIONS_CHAIN, last).await;
    assert_eq!(problem, Problem::Truncated { chain_end: cut });
}

#[tokio::test]
async fn a_chain_recomputed_without_the_key_is_caught_by_the_signatures() {
    let app = populated().await;
    let real_key =
        read_public_key(&app.data_dir.path().join("checkpoints/public-key")).expect("key");
    // The forger edits row 3, recomputes every hash from there, moves the
    // head, and re-signs the database's checkpoints with a key of their own.
    let client = app.db.client().await;
    client
        .batch_execute("UPDATE audit_actions SET response_size = 1 WHERE seq = 3")
        .await
        .expect("edit");
    let columns = nox_audit_model::ACTION_COLUMNS
        .iter()
        .map(|c| format!("\"{c}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let rows = client
        .query(
            &format!("SELECT seq, row_hash, {columns} FROM audit_actions ORDER BY seq"),
            &[],
        )
        .await
        .expect("rows");
    let mut prev = GENESIS;
    for row in &rows {
        let seq: i64 = row.get(0);
        let record: ActionRecord = action_from_row(row, 2);
        prev = record.canonical(seq).link(&prev);
        client
            .execute(
                "UPDATE audit_actions SET row_hash = $2 WHERE seq = $1",
                &[&seq, &prev.as_slice()],
            )
            .await
            .expect("rehash");
    }
    let last = rows.len() as i64;
    client
        .execute(
            "UPDATE audit_chain_heads SET row_hash = $1 WHERE chain = 'audit_actions'",
            &[&prev.as_slice()],
        )
        .await
        .expect("head");
    client
        .batch_execute("DELETE FROM audit_checkpoints")
        .await
        .expect("drop checkpoints");
    let forger_dir = tempfile::tempdir().expect("dir");
    let forger = Checkpointer::open(
        &forger_dir.path().join("key"),
        &forger_dir.path().join("cp"),
    )
    .expect("forger's key");
    forger
        .sign(&client, ACTIONS_CHAIN, last, prev, "shutdown")
        .await
        .expect("forged checkpoint");
    verify(&app, &VerifyOptions::default())
        .await
        .expect("trusting the database's own key, the forgery holds");
    let options = VerifyOptions {
        public_key: Some(real_key),
        ..VerifyOptions::default()
    };
    let problem = expect_broken(&app, &options, ACTIONS_CHAIN, last).await;
    assert_eq!(problem, Problem::BadSignature);
    // The checkpoint file kept elsewhere also contradicts the forgery.
    let options = VerifyOptions {
        external_checkpoints: Checkpoint::read_log(&checkpoint_file(&app)).expect("log"),
        public_key: Some(real_key),
        ..VerifyOptions::default()
    };
    assert!(verify(&app, &options).await.is_err());
}

/// Records whose arrival was `days_ago` days back.
fn records_at(days_ago: i64, count: usize) -> Vec<ActionRecord> {
    let at = time::OffsetDateTime::now_utc() - time::Duration::days(days_ago);
    (0..count)
        .map(|i| {
            let mut record = ActionRecord::arrived(
                uuid::Uuid::now_v7(),
                at + time::Duration::seconds(i as i64),
                "GET",
                "/seeded",
            );
            record.route = "/seeded".into();
            record.action_type = "api_call".into();
            record.action_category = "general".into();
            record.status_code = 200;
            record.success = true;
            record.metadata = Some(json!({"i": i, "nested": {"b": 1, "a": [1.5, null]}}));
            record
        })
        .collect()
}

#[tokio::test]
async fn a_failed_batch_leaves_nothing_and_the_next_one_gets_a_clean_connection() {
    let db = nox_testkit::TestDb::new().await;
    // One connection, so the batch after the failure would reuse it if it
    // went back to the pool still inside the failed transaction.
    let options = PoolOptions {
        max_size: 1,
        ..PoolOptions::default()
    };
    let pool = build_pool(db.config.clone(), &options).expect("pool");
    let first = records_at(0, 3);
    insert(&pool, &[], &first, InsertTarget::Direct)
        .await
        .expect("first batch");
    // A session the schema refuses fails the batch's first round trip
    // (BEGIN, head lock, session changes, COPY start); a repeated id fails
    // the last (COPY end, head update, COMMIT).
    let now = time::OffsetDateTime::now_utc();
    let bad_session = SessionRow {
        id: uuid::Uuid::now_v7(),
        user_id: uuid::Uuid::now_v7(),
        session_token_hash: "f".repeat(65),
        client_ip: None,
        user_agent: None,
        started_at: now,
        last_activity: now,
        ended_at: None,
        is_active: true,
        idle_before: None,
    };
    insert(
        &pool,
        &[bad_session],
        &records_at(0, 2),
        InsertTarget::Direct,
    )
    .await
    .expect_err("a session hash longer than the schema allows");
    let mut repeated = records_at(0, 2);
    repeated.push(first[0].clone());
    insert(&pool, &[], &repeated, InsertTarget::Direct)
        .await
        .expect_err("a repeated id");
    let next = records_at(0, 4);
    insert(&pool, &[], &next, InsertTarget::Direct)
        .await
        .expect("the batch after a failure");

    let mut client = db.client().await;
    let (count, newest): (i64, i64) = client
        .query_one("SELECT count(*), max(seq) FROM audit_actions", &[])
        .await
        .map(|row| (row.get(0), row.get(1)))
        .expect("rows");
    assert_eq!((count, newest), (7, 7), "nothing of the failed batches");
    let chains = nox_audit_store::verify::verify(&mut client, &VerifyOptions::default())
        .await
        .expect("the chain continues where the first batch ended");
    assert_eq!((chains[0].chain, chains[0].last_seq), (ACTIONS_CHAIN, 7));
}

/// A record with every optional column filled and a session to open, so
/// reading it back checks each column's place.
fn detailed_record(i: usize) -> ActionRecord {
    let mut record = records_at(0, 1).remove(0);
    let at = record.timestamp;
    record.timestamp = at.replace_microsecond(at.microsecond()).expect("valid");
    record.user_id = Some(uuid::Uuid::now_v7());
    record.session_token_hash = Some(format!("{i:016x}"));
    record.client_ip = Some("203.0.113.7".parse().expect("ip"));
    record.user_agent = Some(format!("agent {i}"));
    record.request_size = 100 + i as i64;
    record.response_size = 200 + i as i64;
    record.status_code = 403;
    record.success = false;
    record.response_time_ms = 1.234 + i as f64;
    record.cpu_time_ms = Some(0.5);
    record.memory_peak_mb = Some(12.25);
    record.file_path = Some(format!("dir/f{i}.txt"));
    record.file_size_bytes = Some(42);
    record.files_affected = Some(3);
    record.command_type = Some("bash".into());
    record.command_text = Some("echo hi".into());
    record.exit_code = Some(7);
    record.stdout_size = Some(11);
    record.stderr_size = Some(13);
    record.quota_violation = true;
    record.quota_consumed = Some(json!({"quota_type": "storage", "used": i}));
    record.quota_remaining = Some(json!({"remaining": 0}));
    record.error_details = Some("denied".into());
    record
}

#[tokio::test]
async fn small_batches_skip_reading_the_head_and_notice_another_writer() {
    let db = nox_testkit::TestDb::new().await;
    // Counts calls of the guarded head move (the one-round-trip path).
    db.client()
        .await
        .batch_execute(
            "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET track_functions = ''pl''',
                                        current_database()); END $$",
        )
        .await
        .expect("track function calls");
    let spool_dir = tempfile::tempdir().expect("tempdir");
    let writer = db.audit_writer(
        nox_audit_store::Spool::open(spool_dir.path()).expect("spool"),
        nox_audit_store::WriterConfig::default(),
    );
    let sink = writer.sink();
    let mut submitted = Vec::new();
    // One record per batch: each waits for its commit.
    for i in 0..8 {
        if i == 5 {
            // Another server appends to the chain: the writer's head is
            // stale now.
            let other = build_pool(db.config.clone(), &PoolOptions::default()).expect("pool");
            insert(&other, &[], &records_at(0, 2), InsertTarget::Direct)
                .await
                .expect("the other server's batch");
        }
        let record = detailed_record(i);
        submitted.push(record.clone());
        sink.submit(record, true).await.expect("committed");
    }
    writer.shutdown().await;

    let mut client = db.client().await;
    let chains = nox_audit_store::verify::verify(&mut client, &VerifyOptions::default())
        .await
        .expect("one valid chain, the other server's rows included");
    assert_eq!((chains[0].chain, chains[0].last_seq), (ACTIONS_CHAIN, 10));
    let columns = nox_audit_model::ACTION_COLUMNS
        .iter()
        .map(|c| format!("\"{c}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let ids: Vec<uuid::Uuid> = submitted.iter().map(|r| r.id).collect();
    let rows = client
        .query(
            &format!("SELECT {columns} FROM audit_actions WHERE id = ANY($1) ORDER BY seq"),
            &[&ids],
        )
        .await
        .expect("rows");
    assert_eq!(rows.len(), submitted.len());
    for (row, expected) in rows.iter().zip(&submitted) {
        let mut read = action_from_row(row, 0);
        assert!(read.session_id.is_some(), "the writer opened a session");
        read.session_id = None;
        read.session_token_hash = expected.session_token_hash.clone();
        assert_eq!(&read, expected, "every column as written");
    }
    // Batches 2 to 5 went in one round trip; the 6th tried, found the head
    // moved (a call that raised, which PostgreSQL may not count) and was
    // written the reading way, like the two after it: another server is
    // writing too.
    // (Backends report their counts when they exit or idle, within a second.)
    let count_calls = async || {
        db.scalar(
            "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_user_functions
             WHERE funcname = 'audit_chain_advance'",
        )
        .await
    };
    for _ in 0..50 {
        if count_calls().await >= 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let calls = count_calls().await;
    assert!(
        (4..=5).contains(&calls),
        "audit_chain_advance ran {calls} times"
    );
}

#[tokio::test]
async fn a_retention_drop_and_a_replay_keep_the_trail_verifiable() {
    let app = spawn_app().await;
    let pool = app.state.pool.clone();
    let client = app.db.client().await;
    client
        .execute(
            "SELECT audit_ensure_partitions(((now() - interval '100 days') AT TIME ZONE 'UTC')::date, 4)",
            &[],
        )
        .await
        .expect("old partitions");
    let old = records_at(100, 30);
    insert(&pool, &[], &old, InsertTarget::Direct)
        .await
        .expect("old rows");
    let recent = records_at(0, 20);
    insert(&pool, &[], &recent[..10], InsertTarget::Direct)
        .await
        .expect("recent rows");
    // A replay repeats rows already written: only the new ones are chained.
    insert(&pool, &[], &recent, InsertTarget::Idempotent)
        .await
        .expect("replay");
    let count: i64 = client
        .query_one("SELECT count(*) FROM audit_actions", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(count, 50, "the replay added only the 10 new rows");
    verify(&app, &VerifyOptions::default())
        .await
        .expect("verifies after the replay");

    let checkpointer = Checkpointer::open(
        &app.data_dir.path().join("audit-signing.key"),
        &app.data_dir.path().join("checkpoints"),
    )
    .expect("the server's key");
    let before = (time::OffsetDateTime::now_utc() - time::Duration::days(40)).date();
    let mut client = app.db.client().await;
    let dropped =
        nox_audit_store::retention::drop_months_before(&mut client, before, &checkpointer)
            .await
            .expect("retention");
    assert!(!dropped.partitions.is_empty());
    assert_eq!(dropped.rows, 30);
    assert_eq!(dropped.boundary_seq, Some(30));
    let chains = verify(&app, &VerifyOptions::default())
        .await
        .expect("verifies after the drop");
    assert_eq!((chains[0].first_seq, chains[0].last_seq), (31, 50));
    let recorded: i64 = client
        .query_one(
            "SELECT count(*) FROM audit_admin_actions WHERE admin_action_type = 'retention_drop'
             AND (new_values->>'rows')::int = 30",
            &[],
        )
        .await
        .expect("admin action")
        .get(0);
    assert_eq!(recorded, 1);
    // Without the boundary checkpoint, the start of the chain is unproven.
    client
        .batch_execute("DELETE FROM audit_checkpoints WHERE reason = 'retention'")
        .await
        .expect("delete");
    let problem = expect_broken(&app, &VerifyOptions::default(), ACTIONS_CHAIN, 31).await;
    assert_eq!(problem, Problem::NoStart);
}

#[tokio::test]
async fn two_servers_writing_at_once_make_one_valid_chain() {
    let first = spawn_app().await;
    let second = spawn_app_on(Arc::clone(&first.db), |_| {}).await;
    let alice = first.new_user("alice").await;
    let mut requests = Vec::new();
    for i in 0..200 {
        let app = if i % 2 == 0 { &first } else { &second };
        requests.push(app.get_as("/ls?path=.", &alice.token));
    }
    for response in futures_util::future::join_all(requests).await {
        assert_eq!(response.status(), StatusCode::OK);
    }
    first.stop().await;
    second.stop().await;
    let chains = verify(&first, &VerifyOptions::default())
        .await
        .expect("one valid chain");
    let rows: i64 = first
        .db
        .client()
        .await
        .query_one("SELECT count(*) FROM audit_actions", &[])
        .await
        .expect("count")
        .get(0);
    assert!(rows >= 201);
    assert_eq!(chains[0].last_seq, rows, "every row is on the chain once");
}

#[tokio::test]
async fn status_and_checkpoints_show_the_chain_heads_and_signatures() {
    let app = spawn_app_with(|config| config.audit_checkpoint_secs = 1).await;
    app.get_as("/me", ADMIN).await;
    // The interval checkpoint needs a second; poll for it.
    let mut listed = Value::Null;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        listed = app
            .get_as("/admin/audit/checkpoints", ADMIN)
            .await
            .json()
            .await
            .expect("json");
        if listed["checkpoints"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["chain"] == ACTIONS_CHAIN))
        {
            break;
        }
    }
    let checkpoints = listed["checkpoints"].as_array().expect("checkpoints");
    let newest = checkpoints
        .iter()
        .find(|c| c["chain"] == ACTIONS_CHAIN)
        .unwrap_or_else(|| panic!("an interval checkpoint: {listed}"));
    assert_eq!(newest["reason"], "interval");
    assert_eq!(newest["public_key"], listed["public_key"]);
    assert_eq!(newest["signature"].as_str().expect("hex").len(), 128);
    assert_eq!(newest["row_hash"].as_str().expect("hex").len(), 64);
    assert!(
        newest["timestamp"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "RFC 3339 UTC: {newest}"
    );
    let status: Value = app
        .get_as("/admin/audit/status", ADMIN)
        .await
        .json()
        .await
        .expect("json");
    assert!(
        status["chains"][ACTIONS_CHAIN]["seq"]
            .as_i64()
            .expect("seq")
            >= 1
    );
    assert_eq!(
        status["chains"][ACTIONS_CHAIN]["row_hash"]
            .as_str()
            .expect("hash")
            .len(),
        64
    );
    assert!(status["last_checkpoint_at"].is_string(), "{status}");
    assert_eq!(
        app.get_as("/admin/audit/checkpoints?limit=0", ADMIN)
            .await
            .status(),
        StatusCode::BAD_REQUEST
    );
}
