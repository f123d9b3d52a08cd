//! Writer ingest, with and without the hash chain, against two ceilings
//! measured in the same run: `psql`'s `\copy` of the same rows into the same
//! schema (indexes and rollup trigger on), and one raw binary COPY of them
//! through the driver (no writer, no sessions, no chain).
//!
//! `cargo bench -p nox-audit-store --bench ingest` (uses DATABASE_URL, else
//! 127.0.0.1:5432, else a throwaway cluster; see nox-testkit). `NOX_BENCH_ROWS`
//! sets the row count (default 200000); `NOX_BENCH_RUNS` the runs (default 3).

use std::time::Instant;

mod common;

use common::{median, records};
use nox_audit_model::ACTION_COLUMNS;
use nox_audit_store::writer::{InsertTarget, insert};
use nox_audit_store::{PoolOptions, Spool, WriterConfig, build_pool};
use nox_testkit::TestDb;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let rows: usize = std::env::var("NOX_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let runs: usize = std::env::var("NOX_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let (mut psql_rates, mut copy_rates, mut chained_rates, mut unchained_rates) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 1..=runs {
        // Raw COPY: one statement, no writer, no sessions, no chain.
        let db = TestDb::new().await;
        let pool = build_pool(db.config.clone(), &PoolOptions::default()).expect("pool");
        let batch = records(rows);
        let started = Instant::now();
        insert(&pool, &[], &batch, InsertTarget::Unchained)
            .await
            .expect("copy");
        let copy_rate = rows as f64 / started.elapsed().as_secs_f64();
        copy_rates.push(copy_rate);
        drop(pool);
        let psql = psql_copy_rate(&db, rows).await;
        psql_rates.push(psql);
        drop(db);

        let unchained = writer_rate(rows, false).await;
        let chained = writer_rate(rows, true).await;
        unchained_rates.push(unchained);
        chained_rates.push(chained);
        println!(
            "run {run}: psql \\copy {psql:>9.0} rows/s | raw COPY {copy_rate:>9.0} | writer unchained {unchained:>9.0} | writer chained {chained:>9.0} | chained/psql {:.2} | chained/COPY {:.2} | chained/unchained {:.2}",
            chained / psql,
            chained / copy_rate,
            chained / unchained
        );
    }
    let (psql, copy, chained, unchained) = (
        median(psql_rates),
        median(copy_rates),
        median(chained_rates),
        median(unchained_rates),
    );
    println!(
        "median of {runs} runs, {rows} rows, {} columns: psql \\copy {psql:.0} rows/s, raw COPY {copy:.0}, writer unchained {unchained:.0}, writer chained {chained:.0}; chained/psql {:.2}, chained/COPY {:.2}, chained/unchained {:.2}",
        ACTION_COLUMNS.len(),
        chained / psql,
        chained / copy,
        chained / unchained
    );
}

/// `psql`'s `\copy … FROM` of the same rows (read back from `db` as CSV)
/// into a fresh database: the ceiling an operator would measure by hand.
async fn psql_copy_rate(db: &TestDb, rows: usize) -> f64 {
    let file = tempfile::NamedTempFile::new().expect("temp file");
    let path = file.path().display().to_string();
    // A partitioned table copies out only through a query.
    psql(
        db,
        &format!("\\copy (SELECT * FROM audit_actions) TO '{path}' CSV"),
    );
    let fresh = TestDb::new().await;
    let started = Instant::now();
    psql(&fresh, &format!("\\copy audit_actions FROM '{path}' CSV"));
    rows as f64 / started.elapsed().as_secs_f64()
}

fn psql(db: &TestDb, command: &str) {
    let status = std::process::Command::new("psql")
        .args([
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            &db.url(),
            "-c",
            command,
        ])
        .status()
        .expect("psql (the PostgreSQL client) must be installed");
    assert!(status.success(), "psql {command}: {status}");
}

/// The writer: queue, batches of 1000, sessions, one COPY per batch, with
/// or without the hash chain. Rows per second, on a fresh database.
async fn writer_rate(rows: usize, chained: bool) -> f64 {
    let db = TestDb::new().await;
    let spool_dir = tempfile::tempdir().expect("tempdir");
    let writer = db.audit_writer(
        Spool::open(spool_dir.path()).expect("spool"),
        WriterConfig {
            chained,
            ..WriterConfig::default()
        },
    );
    let sink = writer.sink();
    let batch = records(rows);
    let started = Instant::now();
    for record in batch {
        sink.submit(record, false).await.expect("queued");
    }
    writer.shutdown().await;
    let rate = rows as f64 / started.elapsed().as_secs_f64();
    let client = db.client().await;
    let row = client
        .query_one("SELECT count(*), count(seq) FROM audit_actions", &[])
        .await
        .expect("count");
    let (written, with_seq): (i64, i64) = (row.get(0), row.get(1));
    assert_eq!(written as usize, rows, "every row written");
    assert_eq!(with_seq as usize, if chained { rows } else { 0 });
    rate
}
