//! What a streaming replica can say about its own freshness, for a service
//! that sends reads there: how stale its data may be ([`replica_lag`]) and
//! how far it has the actions chain ([`replayed_head`]).

use nox_audit_model::chain::ACTIONS_CHAIN;

use crate::error::QueryError;

/// Milliseconds the data this connection sees may be behind the primary:
/// - 0 on a server that is not in recovery (a primary, or a promoted
///   replica);
/// - 0 on a replica whose WAL receiver is running and that has replayed all
///   the WAL it received: an idle replica is current, however old its last
///   replayed transaction;
/// - otherwise `now() - pg_last_xact_replay_timestamp()`: the replica holds
///   every commit up to that transaction, so no change it lacks is older
///   than this (an upper bound, exact only if the primary's and replica's
///   clocks agree);
/// - `None` when that is unknown (nothing replayed since the replica
///   started): treat it as too stale.
///
/// WAL the primary has committed but not yet sent is not seen: in the
/// first case the bound leaves out the network's own delay (milliseconds on
/// a healthy link).
pub async fn replica_lag(client: &tokio_postgres::Client) -> Result<Option<i64>, QueryError> {
    let row = client
        .query_one(
            "SELECT CASE
               WHEN NOT pg_is_in_recovery() THEN 0
               WHEN pg_last_wal_replay_lsn() >= pg_last_wal_receive_lsn()
                    AND EXISTS (SELECT 1 FROM pg_stat_wal_receiver) THEN 0
               ELSE greatest(0, (extract(epoch FROM clock_timestamp() - pg_last_xact_replay_timestamp()) * 1000)::bigint)
             END",
            &[],
        )
        .await?;
    Ok(row.try_get(0)?)
}

/// The newest `seq` of the actions chain this database shows: on a replica,
/// as far as it has replayed. Every row up to it is visible to any later
/// snapshot of this connection (replay only moves forward).
pub async fn replayed_head(client: &tokio_postgres::Client) -> Result<i64, QueryError> {
    let row = client
        .query_one(
            "SELECT seq FROM audit_chain_heads WHERE chain = $1",
            &[&ACTIONS_CHAIN],
        )
        .await?;
    Ok(row.try_get(0)?)
}
