//! The database's side of the writer's audit sessions (migration 0013):
//! finding or opening a batch's unknown sessions, one call before its
//! transaction, and writing session changes inside it.

use deadpool_postgres::Pool;
use time::{Duration, OffsetDateTime};
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use super::insert::InsertError;
use crate::sessions::{FoundSession, SessionRequest, SessionRow};

/// Finds or opens the session of each requested (user, token), judging
/// idleness on its `last_activity` in the database.
const OPEN_SESSIONS: &str = "SELECT key_user_id, key_hash, session_id, session_started_at,
            session_last_activity, opened
     FROM audit_sessions_open(make_interval(secs => $1::float8), $2, $3, $4, $5, $6, $7)";

/// Writes session changes: last activity forward, ends conditional.
pub(super) const WRITE_SESSIONS: &str =
    "SELECT audit_sessions_write($1, $2, $3, $4, $5, $6, $7, $8)";

/// One round trip for all of a batch's unknown keys (autocommitted: a
/// session opened here exists even if the batch is spooled afterwards).
pub(super) async fn open_sessions(
    pool: &Pool,
    idle: Duration,
    requests: Vec<SessionRequest>,
) -> Result<Vec<FoundSession>, InsertError> {
    let client = pool.get().await?;
    let statement = client.prepare_cached(OPEN_SESSIONS).await?;
    let idle_secs = idle.as_seconds_f64();
    let new_ids: Vec<Uuid> = requests.iter().map(|r| r.new_id).collect();
    let users: Vec<Uuid> = requests.iter().map(|r| r.user_id).collect();
    let hashes: Vec<&str> = requests
        .iter()
        .map(|r| r.session_token_hash.as_str())
        .collect();
    let ips: Vec<Option<std::net::IpAddr>> = requests.iter().map(|r| r.client_ip).collect();
    let agents: Vec<Option<&str>> = requests.iter().map(|r| r.user_agent.as_deref()).collect();
    let ats: Vec<OffsetDateTime> = requests.iter().map(|r| r.at).collect();
    let rows = client
        .query(
            &statement,
            &[&idle_secs, &new_ids, &users, &hashes, &ips, &agents, &ats],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| FoundSession {
            user_id: row.get(0),
            session_token_hash: row.get(1),
            id: row.get(2),
            started_at: row.get(3),
            last_activity: row.get(4),
            opened: row.get(5),
        })
        .collect())
}

/// Runs [`WRITE_SESSIONS`] for `sessions` (nothing when there are none).
pub(super) async fn write_sessions(
    client: &deadpool_postgres::Object,
    statement: &tokio_postgres::Statement,
    sessions: &[SessionRow],
) -> Result<(), tokio_postgres::Error> {
    if sessions.is_empty() {
        return Ok(());
    }
    client
        .execute(statement, &SessionColumns::new(sessions).params())
        .await
        .map(drop)
}

/// The session rows as the column arrays `audit_sessions_write` takes.
struct SessionColumns<'a> {
    ids: Vec<Uuid>,
    users: Vec<Uuid>,
    hashes: Vec<&'a str>,
    ips: Vec<Option<std::net::IpAddr>>,
    agents: Vec<Option<&'a str>>,
    started: Vec<OffsetDateTime>,
    last: Vec<OffsetDateTime>,
    end_before: Vec<Option<OffsetDateTime>>,
}

impl<'a> SessionColumns<'a> {
    fn new(sessions: &'a [SessionRow]) -> Self {
        SessionColumns {
            ids: sessions.iter().map(|s| s.id).collect(),
            users: sessions.iter().map(|s| s.user_id).collect(),
            hashes: sessions
                .iter()
                .map(|s| s.session_token_hash.as_str())
                .collect(),
            ips: sessions.iter().map(|s| s.client_ip).collect(),
            agents: sessions.iter().map(|s| s.user_agent.as_deref()).collect(),
            started: sessions.iter().map(|s| s.started_at).collect(),
            last: sessions.iter().map(|s| s.last_activity).collect(),
            end_before: sessions.iter().map(SessionRow::end_before).collect(),
        }
    }

    fn params(&self) -> [&(dyn ToSql + Sync); 8] {
        [
            &self.ids,
            &self.users,
            &self.hashes,
            &self.ips,
            &self.agents,
            &self.started,
            &self.last,
            &self.end_before,
        ]
    }
}
