//! The quota tables' SQL beyond the book's counters: an admin's overrides,
//! and the totals over every user.

use tokio_postgres::GenericClient;
use uuid::Uuid;

use crate::limits::Limits;

/// Stores `user`'s overrides (`None`: the tier's limit), in the caller's
/// transaction (the one that records the admin action).
pub async fn save_overrides<C: GenericClient>(
    client: &C,
    user: Uuid,
    overrides: &Limits,
) -> Result<(), tokio_postgres::Error> {
    let as_i64 = |v: Option<u64>| v.map(|v| v.min(i64::MAX as u64) as i64);
    client
        .execute(
            "INSERT INTO user_quotas (user_id, req_hour, req_day, cpu_seconds, mem_mb, storage_mb, files_max)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (user_id) DO UPDATE SET req_hour = $2, req_day = $3, cpu_seconds = $4,
                 mem_mb = $5, storage_mb = $6, files_max = $7, updated_at = now()",
            &[
                &user,
                &as_i64(overrides.req_hour),
                &as_i64(overrides.req_day),
                &as_i64(overrides.cpu_seconds),
                &as_i64(overrides.mem_mb),
                &as_i64(overrides.storage_mb),
                &as_i64(overrides.files_max),
            ],
        )
        .await?;
    Ok(())
}

/// What every user together used in the current UTC hour and day, as
/// written to `quota_usage` (flush the book first to include this server's
/// latest counts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageTotals {
    pub requests_this_hour: i64,
    pub requests_today: i64,
    pub cpu_ms_today: i64,
}

pub async fn usage_totals<C: GenericClient>(
    client: &C,
) -> Result<UsageTotals, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT (SELECT coalesce(sum(requests), 0)::bigint FROM quota_usage
                      WHERE window_kind = 'hour' AND window_start = date_trunc('hour', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'),
                    (SELECT coalesce(sum(requests), 0)::bigint FROM quota_usage
                      WHERE window_kind = 'day' AND window_start = date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'),
                    (SELECT coalesce(sum(cpu_ms), 0)::bigint FROM quota_usage
                      WHERE window_kind = 'day' AND window_start = date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC')",
            &[],
        )
        .await?;
    Ok(UsageTotals {
        requests_this_hour: row.get(0),
        requests_today: row.get(1),
        cpu_ms_today: row.get(2),
    })
}
