//! Filling the audit tables with realistic synthetic rows, for the query and
//! export benchmarks (`nox-migrate seed --rows N`).
//!
//! Rows go through the writer's own insert path (binary `COPY`, chained),
//! each batch rolled up after it, so a seeded database verifies and its
//! daily summaries match its rows.

use std::net::{IpAddr, Ipv4Addr};

use deadpool_postgres::Pool;
use nox_audit_model::ActionRecord;
use nox_audit_model::chain::to_micros;
use serde_json::json;
use time::{Duration, OffsetDateTime};
use uuid::Uuid;

use crate::rollup;
use crate::writer::{InsertError, InsertTarget, insert};

/// Rows per transaction.
pub const BATCH_ROWS: usize = 10_000;

/// (endpoint, method, action type, category), as the API would record them.
const ENDPOINTS: [(&str, &str, &str, &str); 10] = [
    ("/ls", "GET", "file_read", "filesystem"),
    ("/cat", "GET", "file_read", "filesystem"),
    ("/download", "GET", "file_read", "filesystem"),
    ("/write", "PUT", "file_write", "filesystem"),
    ("/delete", "DELETE", "file_delete", "filesystem"),
    ("/run", "POST", "code_exec", "execution"),
    ("/run", "POST", "code_exec", "execution"),
    ("/me", "GET", "auth", "auth"),
    ("/quotas/my/usage", "GET", "quota_check", "quota"),
    ("/admin/audit/logs", "GET", "admin_read", "admin"),
];

const ERRORS: [&str; 4] = [
    "path not found",
    "quota exceeded: requests_hour",
    "command timed out after 30 s",
    "permission denied",
];

/// SplitMix64: a tiny, well-mixed generator; seeding needs no more.
#[derive(Debug)]
struct Mix(u64);

impl Mix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Row `i` of `rows`: one of `users`, one session per user and day, a few
/// percent of failures. Rows arrive in time order, evenly over the `days`
/// days before `now`, as a live server would have chained them.
fn synthetic(
    i: u64,
    rows: u64,
    mix: &mut Mix,
    users: &[Uuid],
    now: OffsetDateTime,
    days: i64,
) -> ActionRecord {
    let span = days as u64 * 86_400_000_000;
    let back =
        Duration::microseconds((span - (i as u128 * span as u128 / rows as u128) as u64) as i64);
    let at = to_micros(now - back);
    let user = mix.below(users.len() as u64) as usize;
    let (endpoint, method, action_type, category) = ENDPOINTS[mix.below(10) as usize];
    let status: i16 = match i {
        _ if i.is_multiple_of(50) => 404,
        _ if i.is_multiple_of(97) => 429,
        _ if i.is_multiple_of(211) => 500,
        _ => 200,
    };
    let nanos = at.unix_timestamp_nanos();
    let id = Uuid::new_v7(uuid::Timestamp::from_unix(
        uuid::NoContext,
        (nanos / 1_000_000_000) as u64,
        (nanos % 1_000_000_000) as u32,
    ));
    let day = at.date().to_julian_day() as u128;
    let mut record =
        ActionRecord::arrived(Uuid::from_u64_pair(i, mix.next()), at, method, endpoint);
    record.id = id;
    record.route = endpoint.to_owned();
    record.user_id = Some(users[user]);
    record.session_id = Some(Uuid::from_u128(
        users[user].as_u128() ^ day.wrapping_mul(0x9E37_79B9),
    ));
    record.action_type = action_type.to_owned();
    record.action_category = category.to_owned();
    record.status_code = status;
    record.success = status < 400;
    record.client_ip = Some(IpAddr::V4(Ipv4Addr::new(
        10,
        user as u8,
        (i % 250) as u8,
        (i % 199 + 1) as u8,
    )));
    record.user_agent = Some(format!("nox-client/1.{}", i % 7));
    record.request_size = 200 + (i % 4096) as i64;
    record.response_size = 300 + (i % 65_536) as i64;
    record.response_time_ms = 0.2 + (i % 1000) as f64 / 97.0;
    record.cpu_time_ms = Some(0.05 + (i % 100) as f64 / 100.0);
    match category {
        "filesystem" => {
            record.file_path = Some(format!("data/dir_{}/file_{}.csv", i % 40, i % 5000));
            record.file_size_bytes = Some((i % 1_048_576) as i64);
            if action_type != "file_read" {
                record.files_affected = Some(1);
            }
        }
        "execution" => {
            record.cpu_time_ms = Some((i % 5000) as f64 / 3.0);
            record.memory_peak_mb = Some(4.0 + (i % 512) as f64 / 8.0);
            record.command_type = Some(["bash", "python", "node"][(i % 3) as usize].to_owned());
            record.command_text = Some(format!("python3 jobs/job_{}.py --run {i}", i % 1000));
            record.exit_code = Some(i32::from(i.is_multiple_of(11)));
            record.stdout_size = Some((i % 20_000) as i64);
            record.stderr_size = Some((i % 300) as i64);
        }
        _ => {}
    }
    if status == 429 {
        record.quota_violation = true;
        record.quota_consumed = Some(json!({"requests_hour": 1}));
        record.quota_remaining = Some(json!({"requests_hour": 0}));
    }
    if i.is_multiple_of(5) {
        record.metadata = Some(json!({"batch": i % 100, "source": "seed"}));
    }
    if status >= 400 {
        record.error_details = Some(ERRORS[(i % 4) as usize].to_owned());
    }
    record
}

/// Creates the monthly partitions the rows fall in (so they do not all land
/// in the default partition), then inserts `rows` rows for `users`, spread
/// over the `days` days before `now`. `progress` gets the rows written so
/// far after each batch.
pub async fn seed(
    pool: &Pool,
    rows: u64,
    days: i64,
    users: &[Uuid],
    now: OffsetDateTime,
    mut progress: impl FnMut(u64),
) -> Result<(), InsertError> {
    let oldest = (now - Duration::days(days)).date();
    let months = (now.year() - oldest.year()) * 12 + i32::from(u8::from(now.month()))
        - i32::from(u8::from(oldest.month()))
        + 2;
    pool.get()
        .await?
        .execute(
            "SELECT audit_ensure_partitions($1, $2)",
            &[&oldest, &months],
        )
        .await?;
    let mut mix = Mix(0x5EED);
    let mut done = 0;
    while done < rows {
        let end = (done + BATCH_ROWS as u64).min(rows);
        let records: Vec<ActionRecord> = (done..end)
            .map(|i| synthetic(i + 1, rows, &mut mix, users, now, days))
            .collect();
        insert(pool, &[], &records, InsertTarget::Direct).await?;
        let client = pool.get().await?;
        rollup::step(&**client, None).await?;
        done = end;
        progress(done);
    }
    Ok(())
}
