//! Today's totals, the hash chains' state and the stored checkpoints.

use std::collections::BTreeMap;

use nox_audit_store::checkpoints::Checkpoint;
use serde::Serialize;
use time::OffsetDateTime;

use crate::error::QueryError;

/// Totals of the current UTC day.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TodayStats {
    pub actions_today: i64,
    pub users_today: i64,
    pub active_sessions: i64,
    /// Failed actions in percent, two decimals (0 without actions).
    pub error_rate_today: f64,
}

pub async fn today(client: &tokio_postgres::Client) -> Result<TodayStats, QueryError> {
    let row = client
        .query_one(
            "WITH today AS (
                 SELECT * FROM audit_actions
                 WHERE \"timestamp\" >= date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
             )
             SELECT (SELECT count(*) FROM today),
                    (SELECT count(DISTINCT user_id) FROM today),
                    (SELECT count(*) FILTER (WHERE NOT success) FROM today),
                    (SELECT count(*) FROM audit_sessions WHERE is_active)",
            &[],
        )
        .await?;
    let (actions, users, failed, sessions): (i64, i64, i64, i64) = (
        row.try_get(0)?,
        row.try_get(1)?,
        row.try_get(2)?,
        row.try_get(3)?,
    );
    Ok(TodayStats {
        actions_today: actions,
        users_today: users,
        active_sessions: sessions,
        error_rate_today: error_rate(failed, actions),
    })
}

fn error_rate(failed: i64, actions: i64) -> f64 {
    if actions == 0 {
        0.0
    } else {
        (failed as f64 / actions as f64 * 10_000.0).round() / 100.0
    }
}

/// A hash chain's newest row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChainHead {
    pub seq: i64,
    /// Hex.
    pub row_hash: String,
}

/// Each chain's head, and when the newest checkpoint was signed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChainState {
    pub heads: BTreeMap<String, ChainHead>,
    pub last_checkpoint_at: Option<OffsetDateTime>,
}

pub async fn chain_state(client: &tokio_postgres::Client) -> Result<ChainState, QueryError> {
    let mut heads = BTreeMap::new();
    let rows = client
        .query(
            "SELECT chain, seq, row_hash FROM audit_chain_heads ORDER BY chain",
            &[],
        )
        .await?;
    for row in rows {
        let head = ChainHead {
            seq: row.try_get(1)?,
            row_hash: hex::encode(row.try_get::<_, &[u8]>(2)?),
        };
        heads.insert(row.try_get(0)?, head);
    }
    let last_checkpoint_at = client
        .query_one("SELECT max(\"timestamp\") FROM audit_checkpoints", &[])
        .await?
        .try_get(0)?;
    Ok(ChainState {
        heads,
        last_checkpoint_at,
    })
}

/// How many checkpoints to list: 1 to 1000, default 100.
pub fn checkpoint_limit(limit: Option<i64>) -> Result<i64, QueryError> {
    let limit = limit.unwrap_or(100);
    match (1..=1000).contains(&limit) {
        true => Ok(limit),
        false => Err(QueryError::InvalidParameter(
            "limit must be 1 to 1000".into(),
        )),
    }
}

/// The newest `limit` checkpoints (see [`checkpoint_limit`]), newest first.
pub async fn checkpoints(
    client: &tokio_postgres::Client,
    limit: i64,
) -> Result<Vec<Checkpoint>, QueryError> {
    Ok(Checkpoint::newest(client, limit).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_error_rate_is_a_percentage_with_two_decimals() {
        assert_eq!(error_rate(0, 0), 0.0);
        assert_eq!(error_rate(1, 3), 33.33);
        assert_eq!(error_rate(2, 2), 100.0);
    }

    #[test]
    fn checkpoint_limits_outside_1_to_1000_are_refused() {
        assert_eq!(checkpoint_limit(None).unwrap(), 100);
        assert_eq!(checkpoint_limit(Some(1000)).unwrap(), 1000);
        for limit in [0, -1, 1001, i64::MAX, i64::MIN] {
            let error = checkpoint_limit(Some(limit)).unwrap_err();
            assert_eq!(error.to_string(), "limit must be 1 to 1000");
        }
    }
}
