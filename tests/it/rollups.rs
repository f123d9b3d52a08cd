//! The writer, the spool and the daily rollups, driven directly.

use nox_audit_model::{ActionKind, ActionRecord};
use nox_audit_store::rollup::{self, RollupState};
use nox_audit_store::summaries;
use nox_audit_store::writer::{InsertTarget, insert};
use nox_audit_store::{PoolOptions, Spool, WriterConfig, build_pool};
use nox_testkit::TestDb;
use time::{Date, Duration, Time};
use uuid::Uuid;

/// A small deterministic generator (xorshift), so a failure reproduces.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const DAY0: Date = time::macros::date!(2026 - 03 - 10);

fn random_record(random: &mut Random, users: &[Uuid]) -> ActionRecord {
    const KINDS: [(&str, &str); 6] = [
        ("file_read", "filesystem"),
        ("file_write", "filesystem"),
        ("file_delete", "filesystem"),
        ("code_exec", "execution"),
        ("admin_read", "admin"),
        ("api_call", "general"),
    ];
    const STATUSES: [u16; 6] = [200, 201, 204, 400, 404, 429];
    // A quarter anonymous; the rest spread over the users and two tokens each.
    let user = match random.below(users.len() as u64 + 2) {
        i if (i as usize) < users.len() => Some(users[i as usize]),
        _ => None,
    };
    let (action_type, category) = KINDS[random.below(KINDS.len() as u64) as usize];
    let status = STATUSES[random.below(STATUSES.len() as u64) as usize];
    let timestamp = DAY0.with_time(Time::MIDNIGHT).assume_utc()
        + Duration::seconds(random.below(4 * 86_400) as i64)
        + Duration::microseconds(random.below(1_000_000) as i64);
    let response_us = random.below(5_000_000);
    let mut record = ActionRecord {
        user_id: user,
        route: "/x".into(),
        response_time_ms: response_us as f64 / 1000.0,
        cpu_time_ms: (random.below(4) > 0).then(|| random.below(2_000_000) as f64 / 1000.0),
        memory_peak_mb: (action_type == "code_exec").then(|| random.below(4096) as f64 / 1024.0),
        files_affected: (action_type == "file_delete").then(|| random.below(5) as i32),
        session_token_hash: user.map(|_| format!("{:016x}", random.below(2))),
        ..ActionRecord::arrived(Uuid::new_v4(), timestamp, "GET", "/x")
    };
    record.set_outcome(
        ActionKind {
            action_type,
            category,
        },
        status,
    );
    record.quota_violation = status == 429;
    record
}

#[tokio::test]
async fn rollups_equal_a_recomputation_after_10000_random_records() {
    let db = TestDb::new().await;
    let spool_dir = tempfile::tempdir().expect("tempdir");
    let writer = db.audit_writer(
        Spool::open(spool_dir.path()).expect("spool"),
        WriterConfig::default(),
    );
    let sink = writer.sink();
    let users: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
    let mut random = Random(0x9e37_79b9_7f4a_7c15);
    for _ in 0..10_000 {
        sink.submit(random_record(&mut random, &users), false)
            .await
            .expect("queued");
    }
    writer.shutdown().await;

    assert_eq!(
        db.scalar("SELECT count(*) FROM audit_actions").await,
        10_000
    );
    assert_eq!(
        db.scalar("SELECT sum(total_actions)::bigint FROM audit_daily_summaries")
            .await,
        10_000
    );
    // Anonymous requests share one row per day.
    assert_eq!(
        db.scalar("SELECT count(*) FROM audit_daily_summaries WHERE user_id IS NULL")
            .await,
        4
    );
    let client = db.client().await;
    let mismatches = summaries::check(&client, DAY0, DAY0 + Duration::days(3))
        .await
        .expect("check");
    assert!(mismatches.is_empty(), "{mismatches:?}");

    // The average is a true mean.
    let row = client
        .query_one(
            "SELECT s.avg_response_time_ms, (SELECT avg(response_time_ms) FROM audit_actions a
                 WHERE a.user_id = s.user_id AND (a.timestamp AT TIME ZONE 'UTC')::date = s.summary_date)
             FROM audit_daily_summaries s WHERE user_id IS NOT NULL LIMIT 1",
            &[],
        )
        .await
        .expect("row");
    let (stored, mean): (f64, f64) = (row.get(0), row.get(1));
    assert!((stored - mean).abs() < 1e-9, "{stored} vs {mean}");

    // A corrupted summary is caught, and a rebuild repairs it.
    client
        .execute(
            "UPDATE audit_daily_summaries SET total_actions = total_actions + 1
             WHERE summary_date = $1 AND user_id IS NULL",
            &[&(DAY0 + Duration::days(2))],
        )
        .await
        .expect("corrupt");
    let mismatches = summaries::check(&client, DAY0, DAY0 + Duration::days(3))
        .await
        .expect("check");
    assert_eq!(mismatches.len(), 1);
    assert_eq!(mismatches[0].summary_date, DAY0 + Duration::days(2));
    assert_eq!(mismatches[0].user_id, None);
    let mut client = client;
    summaries::rebuild(&mut client, DAY0, DAY0 + Duration::days(3))
        .await
        .expect("rebuild");
    summaries::rebuild(&mut client, DAY0, DAY0 + Duration::days(3))
        .await
        .expect("rebuild again");
    assert!(
        summaries::check(&client, DAY0, DAY0 + Duration::days(3))
            .await
            .expect("check")
            .is_empty()
    );
}

#[tokio::test]
async fn replaying_the_spool_twice_inserts_nothing_twice() {
    let db = TestDb::new().await;
    let spool_dir = tempfile::tempdir().expect("tempdir");
    let spool = Spool::open(spool_dir.path()).expect("spool");
    let users = [Uuid::new_v4()];
    let mut random = Random(42);
    let records: Vec<ActionRecord> = (0..500)
        .map(|_| random_record(&mut random, &users))
        .collect();
    let file = spool.append(&[], &records).expect("spooled");
    let copy = spool_dir.path().join("copy.keep");
    std::fs::copy(&file, &copy).expect("keep a copy");

    for _ in 0..2 {
        // Put the same file back as if the first replay's deletion was lost.
        if !file.exists() {
            std::fs::copy(&copy, &file).expect("restore");
        }
        let writer = db.audit_writer(spool.clone(), WriterConfig::default());
        writer.shutdown().await;
        assert!(!file.exists(), "a replayed file is removed");
        assert_eq!(db.scalar("SELECT count(*) FROM audit_actions").await, 500);
    }
    let client = db.client().await;
    assert!(
        summaries::check(&client, DAY0, DAY0 + Duration::days(3))
            .await
            .expect("check")
            .is_empty(),
        "the skipped duplicates did not count in the rollups"
    );
}

#[tokio::test]
async fn rollups_trail_the_commits_and_the_check_is_exact_at_any_lag() {
    let db = TestDb::new().await;
    let pool = build_pool(db.config.clone(), &PoolOptions::default()).expect("pool");
    let users: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    let mut random = Random(7);
    // Committed the way the writer commits, without its rollup task.
    for _ in 0..6 {
        let records: Vec<ActionRecord> = (0..500)
            .map(|_| random_record(&mut random, &users))
            .collect();
        insert(&pool, &[], &records, InsertTarget::Direct)
            .await
            .expect("insert");
    }
    let range = (DAY0, DAY0 + Duration::days(3));
    let client = db.client().await;
    let state = RollupState::read(&client).await.expect("state");
    assert_eq!((state.rolled_seq, state.head_seq), (0, 3000));
    assert!(state.lag > Duration::ZERO);
    let rolled = "SELECT coalesce(sum(total_actions), 0)::bigint FROM audit_daily_summaries";
    assert_eq!(
        db.scalar(rolled).await,
        0,
        "nothing rolled up in the commits"
    );
    // The check compares what the rollups hold: exact while they trail.
    assert!(
        summaries::check(&client, range.0, range.1)
            .await
            .expect("check")
            .is_empty()
    );

    // A session holding the state skips every other step.
    let mut holder = db.client().await;
    let hold = holder.transaction().await.expect("transaction");
    assert_eq!(
        rollup::step(&hold, Some(1000)).await.expect("step"),
        Some(1000)
    );
    assert_eq!(
        rollup::step(&client, Some(1000)).await.expect("skipped"),
        None
    );
    hold.commit().await.expect("commit");
    assert_eq!(db.scalar(rolled).await, 1000);
    assert!(
        summaries::check(&client, range.0, range.1)
            .await
            .expect("check")
            .is_empty()
    );

    // Two sessions catching up at once add every row once.
    let other = db.client().await;
    let (first, second) = tokio::join!(rollup::catch_up(&client), rollup::catch_up(&other));
    assert_eq!(first.expect("catch up") + second.expect("catch up"), 2000);
    let state = RollupState::read(&client).await.expect("state");
    assert_eq!((state.rolled_seq, state.rows_behind()), (3000, 0));
    assert_eq!(state.lag, Duration::ZERO);
    assert_eq!(db.scalar(rolled).await, 3000);
    assert!(
        summaries::check(&client, range.0, range.1)
            .await
            .expect("check")
            .is_empty()
    );

    // A watermark set back (rows 2501-3000 counted, but marked as not) is
    // caught by the check, and a rebuild repairs the rollups.
    client
        .execute("UPDATE audit_rollup_state SET rolled_seq = 2500", &[])
        .await
        .expect("rewind");
    let mismatches = summaries::check(&client, range.0, range.1)
        .await
        .expect("check");
    assert!(!mismatches.is_empty());
    let mut client = client;
    summaries::rebuild(&mut client, range.0, range.1)
        .await
        .expect("rebuild");
    assert!(
        summaries::check(&client, range.0, range.1)
            .await
            .expect("check")
            .is_empty()
    );
    assert_eq!(db.scalar(rolled).await, 3000);
}
