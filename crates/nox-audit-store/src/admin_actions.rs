//! Writing `audit_admin_actions` rows.

use nox_audit_model::AdminAction;
use tokio_postgres::GenericClient;

/// Inserts the record through `client`, which should be the transaction that
/// makes the change, so the change and its record commit or fail together.
pub async fn record<C: GenericClient>(
    client: &C,
    action: &AdminAction,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "INSERT INTO audit_admin_actions
                (id, admin_user_id, target_user_id, admin_action_type,
                 old_values, new_values, justification)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[
                &action.id,
                &action.admin_user_id,
                &action.target_user_id,
                &action.action_type.as_str(),
                &action.old_values,
                &action.new_values,
                &action.justification,
            ],
        )
        .await?;
    Ok(())
}
