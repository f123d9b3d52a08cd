//! What the benchmarks share: realistic audit records, and medians.

use nox_audit_model::ActionRecord;
use nox_audit_model::taxonomy::FILE_READ;
use time::{Duration, OffsetDateTime};
use uuid::Uuid;

/// `count` records of `GET /ls` by 50 users (one in seven anonymous),
/// 20 µs apart, two hours ago.
pub fn records(count: usize) -> Vec<ActionRecord> {
    let users: Vec<Uuid> = (0..50).map(|_| Uuid::new_v4()).collect();
    let start = OffsetDateTime::now_utc() - Duration::hours(2);
    (0..count)
        .map(|i| {
            let user = (i % 7 != 0).then(|| users[i % users.len()]);
            let mut record = ActionRecord {
                user_id: user,
                client_ip: Some("127.0.0.1".parse().expect("ip")),
                user_agent: Some("bench/1".into()),
                request_size: 120,
                response_size: 400,
                response_time_ms: (i % 5000) as f64 / 1000.0,
                cpu_time_ms: Some((i % 300) as f64 / 1000.0),
                file_path: Some(format!("dir/file-{}.txt", i % 100)),
                file_size_bytes: Some((i % 10_000) as i64),
                session_token_hash: user.map(|u| u.simple().to_string()[..16].to_owned()),
                route: "/ls".into(),
                ..ActionRecord::arrived(
                    Uuid::new_v4(),
                    start + Duration::microseconds(i as i64 * 20),
                    "GET",
                    "/ls",
                )
            };
            record.set_outcome(FILE_READ, if i % 20 == 0 { 404 } else { 200 });
            record
        })
        .collect()
}

pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}
