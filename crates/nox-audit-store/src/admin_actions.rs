//! Writing `audit_admin_actions` rows, each appended to the admin chain.

use nox_audit_model::AdminAction;
use nox_audit_model::chain::ADMIN_CHAIN;
use tokio_postgres::Transaction;

use crate::checkpoints;

/// Inserts the record through `tx`, which should be the transaction that
/// makes the change, so the change and its record commit or fail together.
/// The admin chain's head stays locked until `tx` ends.
pub async fn record(
    tx: &Transaction<'_>,
    action: &AdminAction,
) -> Result<(), tokio_postgres::Error> {
    let (seq, prev) = checkpoints::lock_head(tx, ADMIN_CHAIN).await?;
    let seq = seq + 1;
    let row_hash = action.canonical(seq).link(&prev);
    tx.execute(
        "INSERT INTO audit_admin_actions
            (id, \"timestamp\", admin_user_id, target_user_id, admin_action_type,
             old_values, new_values, justification, seq, row_hash)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        &[
            &action.id,
            &action.timestamp,
            &action.admin_user_id,
            &action.target_user_id,
            &action.action_type.as_str(),
            &action.old_values,
            &action.new_values,
            &action.justification,
            &seq,
            &row_hash.as_slice(),
        ],
    )
    .await?;
    checkpoints::set_head(tx, ADMIN_CHAIN, seq, &row_hash).await
}

/// Records an action that has no change of its own to commit with it (an
/// export, a quota reset done in memory), in a transaction of its own.
pub async fn record_alone(
    client: &mut tokio_postgres::Client,
    action: &AdminAction,
) -> Result<(), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    record(&tx, action).await?;
    tx.commit().await
}
