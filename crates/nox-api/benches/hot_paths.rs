//! The audit model's hot paths, per call, each beside a reference measured
//! in the same run: building a request's record, encoding it for the spool,
//! classifying a route, hashing a row into the chain, and a user's rate
//! limit shared by three servers against one server's.
//!
//! `cargo bench -p nox-api --bench hot_paths` (plain harness: no
//! dependency; medians of `NOX_BENCH_RUNS` runs, default 5).

use std::hint::black_box;
use std::time::Instant;

use nox_api::taxonomy::NOX_TAXONOMY;
use nox_audit_model::ActionRecord;
use nox_audit_model::chain::GENESIS;
use nox_audit_model::taxonomy::FILE_READ;
use serde_json::json;
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// Nanoseconds per call of `f`, median of `runs` timed loops.
fn per_call(runs: usize, iterations: u32, mut f: impl FnMut()) -> f64 {
    let mut samples: Vec<f64> = (0..runs)
        .map(|_| {
            let started = Instant::now();
            for _ in 0..iterations {
                f();
            }
            started.elapsed().as_nanos() as f64 / f64::from(iterations)
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn record() -> ActionRecord {
    let mut record = ActionRecord::arrived(
        Uuid::now_v7(),
        time::OffsetDateTime::now_utc(),
        "GET",
        "/ls",
    );
    record.route = "/ls".into();
    record.set_outcome(FILE_READ, 200);
    record.user_id = Some(Uuid::now_v7());
    record.session_id = Some(Uuid::now_v7());
    record.client_ip = Some("127.0.0.1".parse().expect("ip"));
    record.user_agent = Some("curl/8.5.0".into());
    record.file_path = Some("notes/today.txt".into());
    record.file_size_bytes = Some(1234);
    record.response_time_ms = 0.412;
    record.cpu_time_ms = Some(0.081);
    record.metadata = Some(json!({"entries": 12}));
    record
}

fn main() {
    let runs: usize = std::env::var("NOX_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let built = record();
    let encoding_len = built.canonical(1).bytes().len();
    let spool_line = serde_json::to_vec(&built).expect("json");
    let rate = nox_quota::Rate {
        per_minute: 1_000_000_000,
        burst: 1_000_000,
    };
    let off = nox_quota::Rate {
        per_minute: 0,
        burst: 0,
    };
    let (alone, shared) = (
        nox_quota::RateLimits::new(rate, off),
        nox_quota::RateLimits::new(rate, off),
    );
    shared.set_servers(3);
    let users: Vec<Uuid> = (0..1000).map(|_| Uuid::now_v7()).collect();
    let mut next_user = users.iter().cycle();
    let mut next_shared_user = users.iter().cycle();
    let rows = [
        (
            "build a record (arrived + outcome + details)",
            per_call(runs, 200_000, || {
                black_box(record());
            }),
            "clone a built record",
            per_call(runs, 200_000, || {
                black_box(built.clone());
            }),
        ),
        (
            "encode a record for the spool (serde_json)",
            per_call(runs, 200_000, || {
                black_box(serde_json::to_vec(black_box(&built)).expect("json"));
            }),
            "copy the encoded line",
            per_call(runs, 200_000, || {
                black_box(black_box(&spool_line).clone());
            }),
        ),
        (
            "classify GET /admin/audit/logs (matched route)",
            per_call(runs, 1_000_000, || {
                black_box(
                    NOX_TAXONOMY.classify(black_box("GET"), black_box(Some("/admin/audit/logs"))),
                );
            }),
            "compare the route with one string",
            per_call(runs, 1_000_000, || {
                black_box(black_box("/admin/audit/logs") == black_box("/admin/audit/export"));
            }),
        ),
        (
            "chain a row (canonical encoding + SHA-256 link)",
            per_call(runs, 200_000, || {
                black_box(black_box(&built).canonical(7).link(&GENESIS));
            }),
            "SHA-256 of as many bytes",
            per_call(runs, 200_000, || {
                let mut hasher = Sha256::new();
                hasher.update(GENESIS);
                hasher.update(black_box(&spool_line[..encoding_len.min(spool_line.len())]));
                black_box(hasher.finalize());
            }),
        ),
        (
            "a user's rate limit, shared by 3 servers",
            per_call(runs, 1_000_000, || {
                let user = *next_shared_user.next().expect("cycles");
                black_box(shared.check_user(black_box(user)).is_ok());
            }),
            "the same on one server alone",
            per_call(runs, 1_000_000, || {
                let user = *next_user.next().expect("cycles");
                black_box(alone.check_user(black_box(user)).is_ok());
            }),
        ),
    ];
    println!(
        "{:<50} {:>10}   {:<36} {:>10}",
        "hot path", "ns/call", "reference", "ns/call"
    );
    for (name, nanos, reference, reference_nanos) in rows {
        println!("{name:<50} {nanos:>10.0}   {reference:<36} {reference_nanos:>10.0}");
    }
    println!(
        "(canonical encoding of the record: {encoding_len} bytes; spool line: {} bytes)",
        spool_line.len()
    );
}
