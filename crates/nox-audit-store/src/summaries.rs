//! Rebuilding and checking the daily rollups against the raw rows.

use time::Date;
use tokio_postgres::Client;
use uuid::Uuid;

use crate::rollup;

/// The stored columns a recomputation must reproduce exactly.
const COLUMNS: &str = "summary_date, user_id, total_actions, successful_actions, failed_actions, \
     file_operations, code_executions, admin_actions, quota_violations, total_cpu_us, \
     total_memory_kb, files_created, files_deleted, sum_response_time_us, \
     max_response_time_ms, unique_sessions, first_activity, last_activity";

/// Recomputes the rollups of the UTC days `from..=to` from `audit_actions`,
/// replacing what is stored. Idempotent. Blocks audit inserts and rollup
/// steps meanwhile, and first rolls up every row after the watermark (so
/// days outside the range lose nothing when the watermark reaches the
/// head); returns the number of summary rows written.
pub async fn rebuild(
    client: &mut Client,
    from: Date,
    to: Date,
) -> Result<u64, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.batch_execute(
        "LOCK TABLE audit_actions IN SHARE MODE;
         SELECT 1 FROM audit_rollup_state FOR UPDATE;",
    )
    .await?;
    rollup::step(&tx, None).await?;
    tx.execute(
        "DELETE FROM audit_daily_summaries WHERE summary_date BETWEEN $1 AND $2",
        &[&from, &to],
    )
    .await?;
    tx.execute(
        "DELETE FROM audit_daily_sessions WHERE summary_date BETWEEN $1 AND $2",
        &[&from, &to],
    )
    .await?;
    tx.execute(
        "INSERT INTO audit_daily_sessions (summary_date, user_id, session_id)
         SELECT DISTINCT (\"timestamp\" AT TIME ZONE 'UTC')::date, user_id, session_id
         FROM audit_actions
         WHERE \"timestamp\" >= $1::date::timestamp AT TIME ZONE 'UTC'
           AND \"timestamp\" < ($2::date + 1)::timestamp AT TIME ZONE 'UTC'
           AND session_id IS NOT NULL AND user_id IS NOT NULL",
        &[&from, &to],
    )
    .await?;
    let written = tx
        .execute(
            &format!(
                "INSERT INTO audit_daily_summaries ({COLUMNS})
                 SELECT * FROM audit_daily_summaries_recomputed($1, $2, NULL)"
            ),
            &[&from, &to],
        )
        .await?;
    tx.commit().await?;
    Ok(written)
}

/// A (date, user) whose stored rollup differs from the recomputation (or
/// exists on one side only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    pub summary_date: Date,
    pub user_id: Option<Uuid>,
}

/// Compares the stored rollups of `from..=to` with a recomputation of the
/// rows they hold (those up to the rollup watermark, in the same snapshot),
/// so the answer is exact whatever the rollups' lag; run
/// [`rollup::catch_up`] first to check every committed row.
pub async fn check(
    client: &Client,
    from: Date,
    to: Date,
) -> Result<Vec<Mismatch>, tokio_postgres::Error> {
    let rows = client
        .query(
            &format!(
                "WITH stored AS (
                     SELECT {COLUMNS} FROM audit_daily_summaries WHERE summary_date BETWEEN $1 AND $2
                 ), recomputed AS (
                     SELECT * FROM audit_daily_summaries_recomputed(
                         $1, $2, (SELECT rolled_seq FROM audit_rollup_state))
                 ), differences AS (
                     (SELECT * FROM stored EXCEPT SELECT * FROM recomputed)
                     UNION
                     (SELECT * FROM recomputed EXCEPT SELECT * FROM stored)
                 )
                 SELECT DISTINCT summary_date, user_id FROM differences
                 ORDER BY summary_date, user_id NULLS FIRST"
            ),
            &[&from, &to],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| Mismatch {
            summary_date: row.get(0),
            user_id: row.get(1),
        })
        .collect())
}

/// The UTC days that hold audit rows or summaries: the default range.
pub async fn date_range(client: &Client) -> Result<Option<(Date, Date)>, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT least((SELECT min((\"timestamp\" AT TIME ZONE 'UTC')::date) FROM audit_actions),
                          (SELECT min(summary_date) FROM audit_daily_summaries)),
                    greatest((SELECT max((\"timestamp\" AT TIME ZONE 'UTC')::date) FROM audit_actions),
                             (SELECT max(summary_date) FROM audit_daily_summaries))",
            &[],
        )
        .await?;
    let from: Option<Date> = row.get(0);
    let to: Option<Date> = row.get(1);
    Ok(from.zip(to))
}
