//! `nox-migrate` as a user runs it: a real process against a real database.

use std::process::{Command, Output};

use nox_testkit::TestDb;

fn nox_migrate(db: &TestDb, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nox-migrate"))
        .args(args)
        .env("DATABASE_URL", db.url())
        .env("RUST_LOG", "warn")
        .output()
        .expect("run nox-migrate")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test]
async fn up_twice_applies_once_then_nothing() {
    let db = TestDb::empty().await;
    let first = nox_migrate(&db, &["up"]);
    assert!(first.status.success(), "{first:?}");
    assert!(
        stdout(&first).contains("applied 0001 identity"),
        "{}",
        stdout(&first)
    );

    let second = nox_migrate(&db, &["up"]);
    assert!(second.status.success(), "{second:?}");
    assert!(
        stdout(&second).contains("nothing to apply"),
        "{}",
        stdout(&second)
    );
    assert_eq!(
        db.scalar("SELECT count(*) FROM schema_migrations").await,
        nox_api::migrations::MIGRATIONS.len() as i64
    );

    let status = nox_migrate(&db, &["status"]);
    assert!(status.status.success(), "{status:?}");
    let text = stdout(&status);
    for migration in nox_api::migrations::MIGRATIONS {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{:04} ", migration.version)))
            .unwrap_or_else(|| panic!("no line for {}: {text}", migration.name));
        assert!(line.contains(" applied "), "{line}");
    }
}

#[tokio::test]
async fn status_before_up_shows_pending() {
    let db = TestDb::empty().await;
    let status = nox_migrate(&db, &["status"]);
    assert!(status.status.success(), "{status:?}");
    assert!(stdout(&status).contains(" pending "), "{}", stdout(&status));
}

#[tokio::test]
async fn two_processes_migrating_at_once_both_succeed_and_apply_once() {
    let db = TestDb::empty().await;
    let spawn = || {
        Command::new(env!("CARGO_BIN_EXE_nox-migrate"))
            .arg("up")
            .env("DATABASE_URL", db.url())
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn nox-migrate")
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (
        a.wait_with_output().expect("wait"),
        b.wait_with_output().expect("wait"),
    );
    assert!(a.status.success() && b.status.success(), "{a:?} {b:?}");
    let applied_lines = stdout(&a)
        .lines()
        .chain(stdout(&b).lines())
        .filter(|l| l.starts_with("applied "))
        .count();
    assert_eq!(applied_lines, nox_api::migrations::MIGRATIONS.len());
    assert_eq!(
        db.scalar("SELECT count(*) FROM schema_migrations").await,
        nox_api::migrations::MIGRATIONS.len() as i64
    );
}

#[tokio::test]
async fn a_tampered_checksum_fails_status_and_up() {
    let db = TestDb::new().await;
    db.client()
        .await
        .execute(
            "UPDATE schema_migrations SET checksum = 'edited' WHERE version = 1",
            &[],
        )
        .await
        .expect("tamper");
    let status = nox_migrate(&db, &["status"]);
    assert!(!status.status.success());
    assert!(
        stdout(&status).contains("checksum-mismatch"),
        "{}",
        stdout(&status)
    );

    let up = nox_migrate(&db, &["up"]);
    assert!(!up.status.success());
    let stderr = String::from_utf8_lossy(&up.stderr);
    assert!(stderr.contains("must never change"), "{stderr}");
}

#[test]
fn a_bad_database_url_is_one_clear_line_without_the_password() {
    let output = Command::new(env!("CARGO_BIN_EXE_nox-migrate"))
        .arg("up")
        .env("DATABASE_URL", "postgres://nox:hunter2@[bad")
        .output()
        .expect("run");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("DATABASE_URL is not a valid PostgreSQL URL"),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

#[tokio::test]
async fn summaries_check_catches_a_corrupted_rollup_and_rebuild_repairs_it() {
    let db = TestDb::new().await;
    let client = db.client().await;
    // Rows committed on the chain (hashes aside) and not rolled up yet, as
    // a server leaves them between two rollup steps.
    client
        .batch_execute(
            "INSERT INTO audit_actions (id, \"timestamp\", request_id, user_id, endpoint, route,
                 http_method, action_type, action_category, status_code, success, response_time_ms,
                 seq, row_hash)
             SELECT gen_random_uuid(), timestamptz '2026-05-01 10:00:00+00' + i * interval '1 hour',
                    gen_random_uuid(), CASE WHEN i % 2 = 0 THEN NULL ELSE gen_random_uuid() END,
                    '/ls', '/ls', 'GET', 'file_read', 'filesystem', 200, true, i * 1.5,
                    i, sha256(i::text::bytea)
             FROM generate_series(1, 40) AS i;
             UPDATE audit_chain_heads SET seq = 40 WHERE chain = 'audit_actions';",
        )
        .await
        .expect("seed rows");
    assert_eq!(
        db.scalar("SELECT count(*) FROM audit_daily_summaries")
            .await,
        0
    );
    // The check rolls them up first.
    let check = nox_migrate(&db, &["summaries", "check"]);
    assert!(check.status.success(), "{}", stdout(&check));
    assert!(stdout(&check).contains("match"), "{}", stdout(&check));
    assert_eq!(
        db.scalar("SELECT sum(total_actions)::bigint FROM audit_daily_summaries")
            .await,
        40,
        "the check rolled the rows up"
    );

    client
        .batch_execute(
            "UPDATE audit_daily_summaries SET sum_response_time_us = sum_response_time_us + 1
             WHERE summary_date = '2026-05-02' AND user_id IS NULL",
        )
        .await
        .expect("corrupt");
    let check = nox_migrate(&db, &["summaries", "check"]);
    assert!(!check.status.success());
    assert!(
        stdout(&check).contains("2026-05-02 anonymous"),
        "{}",
        stdout(&check)
    );

    let rebuild = nox_migrate(
        &db,
        &[
            "summaries",
            "rebuild",
            "--from",
            "2026-05-01",
            "--to",
            "2026-05-03",
        ],
    );
    assert!(rebuild.status.success(), "{rebuild:?}");
    let check = nox_migrate(&db, &["summaries", "check"]);
    assert!(check.status.success(), "{}", stdout(&check));

    // A read-only role cannot roll up what trails: it still checks what
    // the rollups hold, and says how far that goes.
    client
        .batch_execute(
            "INSERT INTO audit_actions (id, \"timestamp\", request_id, endpoint, route,
                 http_method, action_type, action_category, status_code, success, response_time_ms,
                 seq, row_hash)
             SELECT gen_random_uuid(), timestamptz '2026-05-02 10:00:00+00', gen_random_uuid(),
                    '/ls', '/ls', 'GET', 'file_read', 'filesystem', 200, true, 1, i,
                    sha256(i::text::bytea)
             FROM generate_series(41, 45) AS i;
             UPDATE audit_chain_heads SET seq = 45 WHERE chain = 'audit_actions';",
        )
        .await
        .expect("rows not rolled up");
    let read_only = Command::new(env!("CARGO_BIN_EXE_nox-migrate"))
        .args(["summaries", "check"])
        .env(
            "DATABASE_URL",
            format!("{} options='-c default_transaction_read_only=on'", db.url()),
        )
        .env("RUST_LOG", "warn")
        .output()
        .expect("run nox-migrate");
    let said = stdout(&read_only);
    assert!(read_only.status.success(), "{said}");
    assert!(said.contains("not brought up to date"), "{said}");
    assert!(
        said.contains("checked the rows up to seq 40 (5 committed since"),
        "{said}"
    );

    let bad = nox_migrate(&db, &["summaries", "rebuild", "--from", "May 1st"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("YYYY-MM-DD"));
}

#[tokio::test]
async fn seeded_rows_verify_tampering_fails_and_retention_keeps_the_rest_verifiable() {
    let db = TestDb::new().await;
    let seed = nox_migrate(
        &db,
        &["seed", "--rows", "3000", "--days", "90", "--users", "3"],
    );
    assert!(seed.status.success(), "{seed:?}");
    let verify = nox_migrate(&db, &["verify"]);
    assert!(verify.status.success(), "{}", stdout(&verify));
    assert!(
        stdout(&verify).contains("audit_actions: seq 1 to 3000 verified"),
        "{}",
        stdout(&verify)
    );
    let check = nox_migrate(&db, &["summaries", "check"]);
    assert!(check.status.success(), "{}", stdout(&check));

    // Retention needs the server's signing key.
    let data = tempfile::tempdir().expect("data dir");
    let data_dir = data.path().display().to_string();
    let before = (time::OffsetDateTime::now_utc() - time::Duration::days(35)).date();
    let retention = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_nox-migrate"))
            .args(args)
            .env("DATABASE_URL", db.url())
            .env("NOX_DATA_DIR", &data_dir)
            .env("RUST_LOG", "warn")
            .output()
            .expect("run nox-migrate")
    };
    let before_text = before.to_string();
    let refused = retention(&["retention", "--before", &before_text]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("no signing key"));
    nox_audit_store::checkpoints::Checkpointer::open(
        &data.path().join("audit-signing.key"),
        &data.path().join("checkpoints"),
    )
    .expect("the server's key");
    let dropped = retention(&["retention", "--before", &before_text]);
    assert!(dropped.status.success(), "{dropped:?}");
    assert!(
        stdout(&dropped).contains("dropped audit_actions_y"),
        "{}",
        stdout(&dropped)
    );
    let verify = nox_migrate(&db, &["verify"]);
    assert!(verify.status.success(), "{}", stdout(&verify));
    assert!(
        stdout(&verify)
            .lines()
            .any(|l| l.starts_with("audit_actions: seq ")
                && !l.starts_with("audit_actions: seq 1 to")),
        "verification starts after the dropped months: {}",
        stdout(&verify)
    );

    db.client()
        .await
        .batch_execute("UPDATE audit_actions SET endpoint = '/elsewhere' WHERE seq = 2900")
        .await
        .expect("tamper");
    let verify = nox_migrate(&db, &["verify"]);
    assert!(!verify.status.success());
    assert!(
        stdout(&verify).contains("audit_actions: seq 2900: the row does not match its hash"),
        "{}",
        stdout(&verify)
    );
}
