//! The continuous verification against a real PostgreSQL: a trail written by
//! the writer's own insert and signed by a real key, then tampered with in
//! SQL the way someone with database access would.

use std::time::Duration;

use deadpool_postgres::Pool;
use nox_audit_model::chain::{ACTIONS_CHAIN, ADMIN_CHAIN};
use nox_audit_model::{ActionRecord, AdminAction, AdminActionType};
use nox_testkit::TestDb;

use super::*;
use crate::checkpoints::Checkpointer;
use crate::writer::{InsertTarget, insert};
use crate::{PoolOptions, build_pool};

/// A database with a chained trail and the key that signs its checkpoints.
struct Trail {
    db: TestDb,
    pool: Pool,
    signer: Checkpointer,
    _dir: tempfile::TempDir,
}

impl Trail {
    /// `rows` requests and two admin actions, checkpointed.
    async fn new(rows: usize) -> Trail {
        let db = TestDb::new().await;
        let pool = build_pool(db.config.clone(), &PoolOptions::default()).expect("pool");
        let dir = tempfile::tempdir().expect("tempdir");
        let signer =
            Checkpointer::open(&dir.path().join("key"), &dir.path().join("cp")).expect("key");
        let trail = Trail {
            db,
            pool,
            signer,
            _dir: dir,
        };
        trail.append(rows).await;
        let mut client = trail.db.client().await;
        for _ in 0..2 {
            let action = AdminAction::new(AdminActionType::UserCreate, None);
            crate::admin_actions::record_alone(&mut client, &action)
                .await
                .expect("admin action");
        }
        trail.checkpoint().await;
        trail
    }

    async fn append(&self, rows: usize) {
        let records: Vec<ActionRecord> = (0..rows)
            .map(|i| {
                let mut record = ActionRecord::arrived(
                    uuid::Uuid::now_v7(),
                    time::OffsetDateTime::now_utc(),
                    "GET",
                    "/things",
                );
                record.route = "/things".into();
                record.action_type = "api_call".into();
                record.action_category = "general".into();
                record.status_code = 200;
                record.success = true;
                record.user_agent = Some(format!("agent {i}"));
                record
            })
            .collect();
        insert(&self.pool, &[], &records, InsertTarget::Direct)
            .await
            .expect("rows");
    }

    /// Signs each chain's head, as the server does every interval.
    async fn checkpoint(&self) {
        self.signer
            .checkpoint_heads(&self.db.client().await, "interval", false)
            .await
            .expect("checkpoint");
    }

    fn verifier(&self) -> Verifier {
        Verifier::new(self.pool.clone(), self.signer.public_key())
    }

    async fn sql(&self, statement: &str) {
        self.db
            .client()
            .await
            .batch_execute(statement)
            .await
            .unwrap_or_else(|e| panic!("{statement}: {e}"));
    }

    /// A pass that ran: each chain's result.
    async fn pass(&self) -> Vec<ChainVerification> {
        match self.verifier().run_once().await.expect("a pass") {
            Pass::Ran(chains) => chains,
            Pass::Skipped => panic!("skipped, with no other verifier"),
        }
    }

    async fn status(&self) -> VerificationStatus {
        VerificationStatus::read(&self.db.client().await)
            .await
            .expect("status")
    }
}

fn chain<'a>(chains: &'a [ChainVerification], name: &str) -> &'a ChainVerification {
    chains
        .iter()
        .find(|c| c.chain == name)
        .unwrap_or_else(|| panic!("no {name} in {chains:?}"))
}

/// `(outcome, from_seq, to_seq, first_bad_seq, problem_kind)` of a chain.
fn result(
    chains: &[ChainVerification],
    name: &str,
) -> (Outcome, i64, i64, Option<i64>, Option<String>) {
    let c = chain(chains, name);
    (
        c.outcome,
        c.from_seq,
        c.to_seq,
        c.first_bad_seq,
        c.problem_kind.clone(),
    )
}

fn ok(from: i64, to: i64) -> (Outcome, i64, i64, Option<i64>, Option<String>) {
    (Outcome::Ok, from, to, None, None)
}

fn failed(
    from: i64,
    to: i64,
    seq: i64,
    kind: &str,
) -> (Outcome, i64, i64, Option<i64>, Option<String>) {
    (Outcome::Failed, from, to, Some(seq), Some(kind.to_owned()))
}

#[tokio::test]
async fn a_clean_trail_verifies_and_later_passes_start_at_the_verified_checkpoint() {
    let trail = Trail::new(30).await;
    let first = trail.pass().await;
    assert_eq!(result(&first, ACTIONS_CHAIN), ok(1, 30), "{first:?}");
    assert_eq!(result(&first, ADMIN_CHAIN), ok(1, 2));
    assert_eq!(
        first.iter().map(|c| c.chain.as_str()).collect::<Vec<_>>(),
        CHAINS
    );

    trail.append(20).await;
    trail.checkpoint().await; // at 50
    trail.append(5).await;
    let second = trail.pass().await;
    assert_eq!(
        result(&second, ACTIONS_CHAIN),
        ok(31, 55),
        "after the checkpoint at 30 the first pass verified"
    );
    assert_eq!(result(&second, ADMIN_CHAIN), ok(3, 2), "nothing new");
    let third = trail.pass().await;
    assert_eq!(
        result(&third, ACTIONS_CHAIN),
        ok(51, 55),
        "after the newest checkpoint at or below 55"
    );

    let status = trail.status().await;
    assert_eq!(status.outcome(), "ok");
    assert_eq!(status.chains, third, "each chain's newest result");
    assert_eq!(status.last_run_at(), Some(third[1].finished_at));
    let client = trail.db.client().await;
    let success = last_success_at(&client).await.expect("read");
    assert_eq!(success, Some(third[0].finished_at), "the older of the two");
}

/// The counters a pass recorded, from a recorder of the test's own.
async fn counted_round(verifier: &Verifier) -> String {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    // The test's runtime has one thread: everything the round records
    // happens on it.
    let _local = metrics::set_default_local_recorder(&recorder);
    nox_audit_metrics::verification_started(&CHAINS, 300.0);
    verifier.round(false).await;
    handle.render()
}

fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in {text}"))
}

#[tokio::test]
async fn an_edited_row_fails_at_its_seq_is_counted_and_stays_failed_until_repaired() {
    let trail = Trail::new(30).await;
    assert_eq!(result(&trail.pass().await, ACTIONS_CHAIN), ok(1, 30));
    trail.append(20).await;
    trail
        .sql("UPDATE audit_actions SET user_agent = 'x' WHERE seq = 40")
        .await;

    let text = counted_round(&trail.verifier()).await;
    assert_eq!(
        sample(
            &text,
            "nox_audit_verify_failures_total{chain=\"audit_actions\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(
            &text,
            "nox_audit_verify_failures_total{chain=\"audit_admin_actions\"}"
        ),
        0.0
    );
    assert_eq!(
        sample(&text, "nox_audit_verify_runs_total{outcome=\"failed\"}"),
        1.0
    );
    assert_eq!(
        sample(&text, "nox_audit_verify_runs_total{outcome=\"ok\"}"),
        0.0
    );
    let status = trail.status().await;
    assert_eq!(status.outcome(), "failed");
    assert_eq!(
        result(&status.chains, ACTIONS_CHAIN),
        failed(31, 39, 40, "hash_mismatch")
    );
    assert!(
        chain(&status.chains, ACTIONS_CHAIN)
            .problem
            .as_deref()
            .is_some_and(|p| p.contains("does not match its hash")),
        "{status:?}"
    );
    assert_eq!(result(&status.chains, ADMIN_CHAIN), ok(3, 2));

    // Newer rows and a newer checkpoint do not move the start past the
    // damage: every pass re-checks from the last good checkpoint.
    trail.checkpoint().await;
    trail.append(5).await;
    for _ in 0..2 {
        assert_eq!(
            result(&trail.pass().await, ACTIONS_CHAIN),
            failed(31, 39, 40, "hash_mismatch")
        );
    }
    // Repaired, it verifies again.
    trail
        .sql("UPDATE audit_actions SET user_agent = 'agent 9' WHERE seq = 40")
        .await;
    assert_eq!(result(&trail.pass().await, ACTIONS_CHAIN), ok(31, 55));
    let text = counted_round(&trail.verifier()).await;
    assert_eq!(
        sample(&text, "nox_audit_verify_runs_total{outcome=\"ok\"}"),
        1.0
    );
    assert!(
        sample(&text, "nox_audit_verify_last_success_timestamp_seconds")
            > (time::OffsetDateTime::now_utc() - time::Duration::days(1)).unix_timestamp() as f64
    );
}

#[tokio::test]
async fn deleted_rows_are_missing_even_the_starting_checkpoints_own() {
    let trail = Trail::new(30).await;
    trail.pass().await;
    trail.append(20).await;
    trail.sql("DELETE FROM audit_actions WHERE seq = 35").await;
    assert_eq!(
        result(&trail.pass().await, ACTIONS_CHAIN),
        failed(31, 34, 35, "missing")
    );
    // The row the pass starts after, which it does not recompute.
    trail.sql("DELETE FROM audit_actions WHERE seq = 30").await;
    assert_eq!(
        result(&trail.pass().await, ACTIONS_CHAIN),
        failed(31, 30, 30, "missing")
    );
}

#[tokio::test]
async fn a_row_without_a_seq_is_unchained_with_no_first_bad_seq() {
    let trail = Trail::new(30).await;
    trail.pass().await;
    trail.append(5).await;
    trail
        .sql("UPDATE audit_actions SET seq = NULL WHERE seq = 33")
        .await;
    let chains = trail.pass().await;
    assert_eq!(
        result(&chains, ACTIONS_CHAIN),
        (Outcome::Failed, 31, 30, None, Some("unchained".to_owned()))
    );
    assert!(
        chain(&chains, ACTIONS_CHAIN)
            .problem
            .as_deref()
            .is_some_and(|p| p.contains("has no seq")),
        "{chains:?}"
    );
}

#[tokio::test]
async fn deleting_the_newest_rows_and_rewinding_the_head_is_caught_at_the_start() {
    let trail = Trail::new(30).await;
    trail.pass().await;
    trail.append(10).await;
    trail.checkpoint().await; // at 40
    trail.pass().await;
    // The forger drops 36 to 40 and rewinds the head to 35.
    trail
        .sql(
            "DELETE FROM audit_actions WHERE seq > 35;
             UPDATE audit_chain_heads SET seq = 35,
                 row_hash = (SELECT row_hash FROM audit_actions WHERE seq = 35)
             WHERE chain = 'audit_actions'",
        )
        .await;
    assert_eq!(
        result(&trail.pass().await, ACTIONS_CHAIN),
        failed(41, 40, 40, "missing"),
        "the row of the checkpoint the pass starts after is gone"
    );
}

#[tokio::test]
async fn a_checkpoint_signed_with_another_key_is_refused() {
    let trail = Trail::new(30).await;
    trail.pass().await;
    trail.append(10).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let forger = Checkpointer::open(&dir.path().join("key"), &dir.path().join("cp")).expect("key");
    let client = trail.db.client().await;
    let hash = crate::checkpoints::hash32(
        client
            .query_one("SELECT row_hash FROM audit_actions WHERE seq = 30", &[])
            .await
            .expect("hash")
            .get(0),
    );
    forger
        .sign(&client, ACTIONS_CHAIN, 30, hash, "interval")
        .await
        .expect("forged");
    assert_eq!(
        result(&trail.pass().await, ACTIONS_CHAIN),
        failed(31, 30, 30, "bad_signature")
    );
}

#[tokio::test]
async fn retention_past_the_start_needs_its_boundary_checkpoint_like_a_first_pass() {
    let trail = Trail::new(30).await;
    trail.pass().await;
    trail.append(20).await;
    let client = trail.db.client().await;
    let boundary = crate::checkpoints::hash32(
        client
            .query_one("SELECT row_hash FROM audit_actions WHERE seq = 40", &[])
            .await
            .expect("hash")
            .get(0),
    );
    trail.sql("DELETE FROM audit_actions WHERE seq <= 40").await;
    assert_eq!(
        result(&trail.pass().await, ACTIONS_CHAIN),
        failed(31, 30, 41, "no_start")
    );
    // What retention leaves: a signed checkpoint at the newest row dropped.
    trail
        .signer
        .sign(&client, ACTIONS_CHAIN, 40, boundary, "retention")
        .await
        .expect("boundary");
    assert_eq!(result(&trail.pass().await, ACTIONS_CHAIN), ok(41, 50));
    // A first pass (no earlier result) starts there too.
    trail.sql("DELETE FROM audit_verifications").await;
    assert_eq!(result(&trail.pass().await, ACTIONS_CHAIN), ok(41, 50));
}

#[tokio::test]
async fn one_pass_at_a_time_across_verifiers() {
    let trail = Trail::new(10).await;
    let other_server = Verifier::new(
        build_pool(trail.db.config.clone(), &PoolOptions::default()).expect("pool"),
        trail.signer.public_key(),
    );
    let count = async || {
        trail
            .db
            .scalar("SELECT count(*) FROM audit_verifications")
            .await
    };

    // Someone holds the lock: the pass is skipped and records nothing.
    let holder = trail.db.client().await;
    holder
        .execute("SELECT pg_advisory_lock($1)", &[&VERIFY_LOCK_KEY])
        .await
        .expect("lock");
    assert_eq!(other_server.run_once().await.expect("pass"), Pass::Skipped);
    assert_eq!(count().await, 0);
    holder
        .execute("SELECT pg_advisory_unlock($1)", &[&VERIFY_LOCK_KEY])
        .await
        .expect("unlock");

    // Two at once: the first is held up inside its pass (the results table
    // locked), the second finds the lock taken.
    let mut blocker = trail.db.client().await;
    let blocking = blocker.transaction().await.expect("begin");
    blocking
        .batch_execute("LOCK TABLE audit_verifications IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock table");
    let first = trail.verifier();
    let running = tokio::spawn(async move { first.run_once().await });
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while trail
        .db
        .scalar(
            "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database
             WHERE d.datname = current_database() AND NOT l.granted
               AND l.relation = 'audit_verifications'::regclass",
        )
        .await
        == 0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the first pass never waited"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(other_server.run_once().await.expect("pass"), Pass::Skipped);
    blocking.rollback().await.expect("release");
    let ran = running.await.expect("task").expect("pass");
    assert_eq!(ran.outcome(), Some(Outcome::Ok), "{ran:?}");
    assert_eq!(count().await, 2);
    // The lock is released at the end: the other server's turn.
    assert_eq!(
        other_server.run_once().await.expect("pass").outcome(),
        Some(Outcome::Ok)
    );
    assert_eq!(count().await, 4);
}

#[tokio::test]
async fn old_results_go_but_each_chains_newest_ok_result_stays() {
    let trail = Trail::new(5).await;
    trail
        .sql(
            "INSERT INTO audit_verifications
                 (started_at, finished_at, chain, from_seq, to_seq, outcome)
             SELECT now() - interval '40 days', now() - interval '40 days', chain, 1, 1, outcome
             FROM (VALUES ('audit_actions', 'failed'), ('elsewhere', 'ok'), ('elsewhere', 'ok'),
                          ('elsewhere', 'failed')) AS v (chain, outcome);
             INSERT INTO audit_verifications
                 (started_at, finished_at, chain, from_seq, to_seq, outcome)
             SELECT now(), now(), 'audit_admin_actions', 1, 0, 'error'
             FROM generate_series(1, 10005)",
        )
        .await;
    let newest_elsewhere = trail
        .db
        .scalar(
            "SELECT max(id) FROM audit_verifications WHERE chain = 'elsewhere' AND outcome = 'ok'",
        )
        .await;
    trail.pass().await;
    let left = trail
        .db
        .scalar("SELECT count(*) FROM audit_verifications")
        .await;
    assert_eq!(left, KEEP_ROWS + 1, "the newest rows and one kept ok row");
    let old: Vec<i64> = trail
        .db
        .client()
        .await
        .query(
            "SELECT id FROM audit_verifications WHERE finished_at < now() - interval '30 days'",
            &[],
        )
        .await
        .expect("old")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(old, [newest_elsewhere]);
}

#[test]
fn problem_kinds_are_distinct_snake_case() {
    let problems = [
        Problem::Unchained { id: "x".into() },
        Problem::Missing,
        Problem::Duplicate,
        Problem::HashMismatch,
        Problem::CheckpointMismatch,
        Problem::Truncated { chain_end: 1 },
        Problem::HeadMismatch { head_seq: 1 },
        Problem::BadSignature,
        Problem::NoStart,
    ];
    let kinds: std::collections::BTreeSet<&str> = problems.iter().map(Problem::kind).collect();
    assert_eq!(kinds.len(), problems.len());
    for kind in kinds {
        assert!(
            kind.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
            "{kind}"
        );
    }
}

#[test]
fn the_worst_chain_decides_a_pass_and_the_status() {
    let at = time::OffsetDateTime::UNIX_EPOCH;
    let of = |outcome| ChainVerification {
        chain: "c".into(),
        started_at: at,
        finished_at: at,
        from_seq: 1,
        to_seq: 0,
        outcome,
        first_bad_seq: None,
        problem_kind: None,
        problem: None,
    };
    assert_eq!(Pass::Skipped.outcome(), None);
    let pass = |outcomes: &[Outcome]| Pass::Ran(outcomes.iter().map(|o| of(*o)).collect());
    assert_eq!(
        pass(&[Outcome::Ok, Outcome::Failed, Outcome::Error]).outcome(),
        Some(Outcome::Failed)
    );
    assert_eq!(
        pass(&[Outcome::Ok, Outcome::Error]).outcome(),
        Some(Outcome::Error)
    );
    assert_eq!(VerificationStatus::default().outcome(), "never");
    let status = VerificationStatus {
        chains: vec![of(Outcome::Ok), of(Outcome::Error)],
    };
    assert_eq!(status.outcome(), "error");
}

#[tokio::test]
async fn an_edit_behind_the_verified_checkpoint_escapes_incremental_passes_not_a_full_one() {
    let trail = Trail::new(10).await;
    trail.pass().await;
    trail.append(5).await;
    trail.checkpoint().await;
    assert_eq!(result(&trail.pass().await, ACTIONS_CHAIN).0, Outcome::Ok);
    // Row 3 now lies behind the checkpoint the next pass starts from.
    trail
        .sql("UPDATE audit_actions SET user_agent = 'edited' WHERE seq = 3")
        .await;
    let incremental = trail.pass().await;
    assert_eq!(result(&incremental, ACTIONS_CHAIN).0, Outcome::Ok);
    assert!(chain(&incremental, ACTIONS_CHAIN).from_seq > 3);
    let full = match trail.verifier().run_full().await.expect("a pass") {
        Pass::Ran(chains) => chains,
        Pass::Skipped => panic!("skipped"),
    };
    assert_eq!(
        result(&full, ACTIONS_CHAIN),
        failed(1, 2, 3, "hash_mismatch")
    );
}
