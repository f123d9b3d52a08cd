//! Dropping whole months of `audit_actions` (`nox-migrate retention`),
//! leaving a signed checkpoint at the boundary so the rest still verifies.

use nox_audit_model::chain::ACTIONS_CHAIN;
use nox_audit_model::{AdminAction, AdminActionType};
use serde_json::json;
use time::Date;
use time::macros::format_description;
use tokio_postgres::Client;

use crate::checkpoints::{self, CheckpointError, Checkpointer};
use crate::rollup;

/// What a retention run dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    pub partitions: Vec<String>,
    pub rows: i64,
    /// The newest seq dropped, where the boundary checkpoint was signed.
    pub boundary_seq: Option<i64>,
}

#[derive(Debug, thiserror::Error)]
pub enum RetentionError {
    #[error("database: {0}")]
    Database(#[from] tokio_postgres::Error),
    #[error("checkpoint: {0}")]
    Checkpoint(#[from] CheckpointError),
    #[error(
        "rows up to seq {boundary} are in the months to drop, but seq {kept} is kept: a late row \
         joined the chain after newer months; choose an earlier date"
    )]
    Interleaved { boundary: i64, kept: i64 },
}

/// The first day after the month a partition `audit_actions_yYYYYmMM`
/// holds, or `None` for any other table.
fn month_end(partition: &str) -> Option<Date> {
    let month = partition.strip_prefix("audit_actions_y")?;
    let first = Date::parse(
        &format!("{}-{}-01", month.get(..4)?, month.get(5..7)?),
        format_description!("[year]-[month]-[day]"),
    )
    .ok()?;
    let next = first.replace_day(28).ok()? + time::Duration::days(4);
    next.replace_day(1).ok()
}

/// Drops every monthly partition that ends on or before `before`, in one
/// transaction with the actions chain locked: signs a checkpoint at the
/// newest dropped seq and records a `retention_drop` admin action.
pub async fn drop_months_before(
    client: &mut Client,
    before: Date,
    checkpointer: &Checkpointer,
) -> Result<Dropped, RetentionError> {
    let tx = client.transaction().await?;
    // The table before the head, as every writer takes them (no batch can
    // hold the table waiting for the head while this holds the head
    // waiting to drop a partition). Reads go on.
    tx.batch_execute("LOCK TABLE audit_actions IN SHARE ROW EXCLUSIVE MODE")
        .await?;
    checkpoints::lock_head(&tx, ACTIONS_CHAIN).await?;
    // The rows to drop are in the rollups before they go.
    tx.batch_execute("SELECT 1 FROM audit_rollup_state FOR UPDATE")
        .await?;
    rollup::step(&tx, None).await?;
    let partitions: Vec<String> = tx
        .query(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = 'audit_actions'::regclass ORDER BY 1",
            &[],
        )
        .await?
        .iter()
        .map(|row| row.get::<_, String>(0))
        .filter(|name| month_end(name).is_some_and(|end| end <= before))
        .collect();
    if partitions.is_empty() {
        return Ok(Dropped {
            partitions,
            rows: 0,
            boundary_seq: None,
        });
    }
    let list = partitions
        .iter()
        .map(|p| format!("'{p}'::regclass"))
        .collect::<Vec<_>>()
        .join(", ");
    let stats = tx
        .query_one(
            &format!("SELECT count(*), max(seq) FROM audit_actions WHERE tableoid IN ({list})"),
            &[],
        )
        .await?;
    let (rows, boundary): (i64, Option<i64>) = (stats.get(0), stats.get(1));
    if let Some(boundary) = boundary {
        let kept: Option<i64> = tx
            .query_one(
                &format!("SELECT min(seq) FROM audit_actions WHERE tableoid NOT IN ({list})"),
                &[],
            )
            .await?
            .get(0);
        if let Some(kept) = kept.filter(|kept| *kept < boundary) {
            return Err(RetentionError::Interleaved { boundary, kept });
        }
        let row_hash = checkpoints::hash32(
            tx.query_one(
                "SELECT row_hash FROM audit_actions WHERE seq = $1",
                &[&boundary],
            )
            .await?
            .get(0),
        );
        checkpointer
            .sign(&tx, ACTIONS_CHAIN, boundary, row_hash, "retention")
            .await?;
    }
    for partition in &partitions {
        tx.batch_execute(&format!("DROP TABLE \"{partition}\""))
            .await?;
    }
    let action = AdminAction::new(AdminActionType::RetentionDrop, None).new_values(json!({
        "before": before.to_string(),
        "partitions": partitions,
        "rows": rows,
        "boundary_seq": boundary,
    }));
    crate::admin_actions::record(&tx, &action).await?;
    tx.commit().await?;
    Ok(Dropped {
        partitions,
        rows,
        boundary_seq: boundary,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::date;

    #[test]
    fn month_ends_come_from_partition_names() {
        assert_eq!(
            month_end("audit_actions_y2026m01"),
            Some(date!(2026 - 02 - 01))
        );
        assert_eq!(
            month_end("audit_actions_y2026m12"),
            Some(date!(2027 - 01 - 01))
        );
        assert_eq!(month_end("audit_actions_default"), None);
        assert_eq!(month_end("audit_actions_y20x6m01"), None);
    }
}
