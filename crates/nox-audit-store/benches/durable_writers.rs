//! Durable ingest by three writers (three servers) on one database against
//! one writer, in the same run: `CLIENTS` tasks each submit a record and
//! wait for its commit, again and again, spread over the writers. Also what
//! a single primary spends: one durable batch's commit as a lone client
//! sees it (its round trip, the head lock held, the commit's WAL flush),
//! and PostgreSQL's CPU per row (its processes' CPU time, from /proc).
//!
//! `cargo bench -p nox-audit-store --bench durable_writers` (DATABASE_URL,
//! else 127.0.0.1:5432, else a throwaway cluster). `NOX_BENCH_SECONDS`
//! (default 5), `NOX_BENCH_CLIENTS` (64), `NOX_BENCH_RUNS` (3).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{median, records};
use nox_audit_store::{AuditSink, AuditWriter, Spool, WriterConfig};
use nox_testkit::TestDb;
use uuid::Uuid;

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let seconds = setting("NOX_BENCH_SECONDS", 5);
    let clients = setting("NOX_BENCH_CLIENTS", 64) as usize;
    let runs = setting("NOX_BENCH_RUNS", 3);
    let (mut one, mut three, mut lone, mut cpu_one, mut cpu_three) =
        (vec![], vec![], vec![], vec![], vec![]);
    for run in 1..=runs {
        let lone_ms = lone_commit_ms().await;
        let (rate_one, pg_one) = durable_rate(1, clients, seconds).await;
        let (rate_three, pg_three) = durable_rate(3, clients, seconds).await;
        println!(
            "run {run}: lone durable commit {lone_ms:.2} ms | 1 writer {rate_one:.0} rows/s, PostgreSQL {pg_one:.1} µs CPU/row | 3 writers {rate_three:.0} rows/s, {pg_three:.1} µs/row | 3/1 {:.2}",
            rate_three / rate_one
        );
        one.push(rate_one);
        three.push(rate_three);
        lone.push(lone_ms);
        cpu_one.push(pg_one);
        cpu_three.push(pg_three);
    }
    let (one, three) = (median(one), median(three));
    println!(
        "median of {runs} runs, {clients} clients, {seconds} s: 1 writer {one:.0} rows/s ({:.1} µs PostgreSQL CPU/row), 3 writers {three:.0} rows/s ({:.1} µs/row), 3/1 {:.2}; a lone durable commit {:.2} ms",
        median(cpu_one),
        median(cpu_three),
        three / one,
        median(lone)
    );
}

fn writer(db: &TestDb, spool: &tempfile::TempDir) -> AuditWriter {
    db.audit_writer(
        Spool::open(spool.path()).expect("spool"),
        WriterConfig::default(),
    )
}

/// One record at a time, each waiting for its commit: the median time.
async fn lone_commit_ms() -> f64 {
    let db = TestDb::new().await;
    let spool = tempfile::tempdir().expect("tempdir");
    let writer = writer(&db, &spool);
    let sink = writer.sink();
    let mut times = Vec::new();
    for record in records(300) {
        let started = Instant::now();
        sink.submit(record, true).await.expect("committed");
        times.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    writer.shutdown().await;
    median(times)
}

/// Rows per second committed by `writers` writers for `clients` durable
/// clients, and PostgreSQL's CPU per row meanwhile.
async fn durable_rate(writers: usize, clients: usize, seconds: u64) -> (f64, f64) {
    let db = TestDb::new().await;
    let spools: Vec<_> = (0..writers)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let started_writers: Vec<AuditWriter> = spools.iter().map(|s| writer(&db, s)).collect();
    let sinks: Vec<AuditSink> = started_writers.iter().map(AuditWriter::sink).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let committed = Arc::new(AtomicU64::new(0));
    // The same 50 users throughout, as a busy service has: their sessions
    // open once, not in every batch.
    let template = Arc::new(records(50));
    let cpu_before = postgres_cpu_seconds();
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|client| {
            let (sink, stop, committed, template) = (
                sinks[client % writers].clone(),
                Arc::clone(&stop),
                Arc::clone(&committed),
                Arc::clone(&template),
            );
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    for record in template.iter() {
                        let mut record = record.clone();
                        (record.id, record.request_id) = (Uuid::now_v7(), Uuid::now_v7());
                        sink.submit(record, true).await.expect("committed");
                        committed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.expect("client");
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = postgres_cpu_seconds() - cpu_before;
    for writer in started_writers {
        writer.shutdown().await;
    }
    let rows = committed.load(Ordering::Relaxed) as f64;
    let written = db.scalar("SELECT count(*) FROM audit_actions").await as f64;
    assert!(written >= rows, "every acknowledged row is there");
    (rows / elapsed, cpu * 1e6 / rows)
}

/// CPU seconds used so far by every process named `postgres` (the
/// backends of finished connections are gone: measure within one run).
fn postgres_cpu_seconds() -> f64 {
    let ticks = 100.0; // USER_HZ on Linux.
    let mut total = 0.0;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some((name, rest)) = stat.split_once(") ") else {
            continue;
        };
        if !name.ends_with("(postgres") {
            continue;
        }
        // After the name: state is field 3; utime and stime are 14 and 15.
        let fields: Vec<&str> = rest.split(' ').collect();
        let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<f64>().ok());
        total += field(14).unwrap_or(0.0) + field(15).unwrap_or(0.0);
    }
    total / ticks
}
