//! Audit sessions: one per (user, token) until it has been idle too long.
//!
//! The writer owns the tracker (one task, no locks) and assigns each record
//! its session before writing. Idleness is judged on the records' own
//! timestamps and on the injected clock, never on when a batch happens to be
//! written. Changed sessions are persisted once per batch.

use std::collections::HashMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};
use uuid::Uuid;

use nox_audit_model::ActionRecord;

/// A row of `audit_sessions`, as upserted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionRow {
    pub id: Uuid,
    pub user_id: Uuid,
    pub session_token_hash: String,
    pub client_ip: Option<IpAddr>,
    pub user_agent: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub last_activity: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub ended_at: Option<OffsetDateTime>,
    pub is_active: bool,
}

#[derive(Debug)]
pub struct SessionTracker {
    idle: Duration,
    open: HashMap<(Uuid, String), SessionRow>,
    /// Sessions changed since the last [`SessionTracker::take_changes`].
    changed: HashMap<Uuid, SessionRow>,
    /// Sessions opened since the tracker started: `nox_audit_sessions_total`.
    opened: u64,
}

impl SessionTracker {
    pub fn new(idle: Duration) -> Self {
        SessionTracker {
            idle,
            open: HashMap::new(),
            changed: HashMap::new(),
            opened: 0,
        }
    }

    /// Sets `record.session_id` for an authenticated record.
    pub fn assign(&mut self, record: &mut ActionRecord) {
        let (Some(user_id), Some(token_hash)) = (record.user_id, &record.session_token_hash) else {
            return;
        };
        let key = (user_id, token_hash.clone());
        let at = record.timestamp;
        if let Some(session) = self.open.get_mut(&key) {
            if at - session.last_activity <= self.idle {
                session.last_activity = session.last_activity.max(at);
                record.session_id = Some(session.id);
                self.changed.insert(session.id, session.clone());
                return;
            }
            let mut ended = session.clone();
            ended.ended_at = Some(ended.last_activity);
            ended.is_active = false;
            self.changed.insert(ended.id, ended);
        }
        let session = SessionRow {
            id: Uuid::now_v7(),
            user_id,
            session_token_hash: token_hash.clone(),
            client_ip: record.client_ip,
            user_agent: record.user_agent.clone(),
            started_at: at,
            last_activity: at,
            ended_at: None,
            is_active: true,
        };
        self.opened += 1;
        record.session_id = Some(session.id);
        self.changed.insert(session.id, session.clone());
        self.open.insert(key, session);
    }

    /// Ends the sessions idle at `now`, and forgets them.
    pub fn end_idle(&mut self, now: OffsetDateTime) {
        let idle = self.idle;
        let changed = &mut self.changed;
        self.open.retain(|_, session| {
            if now - session.last_activity > idle {
                let mut ended = session.clone();
                ended.ended_at = Some(ended.last_activity);
                ended.is_active = false;
                changed.insert(ended.id, ended);
                false
            } else {
                true
            }
        });
    }

    /// The session rows to persist.
    pub fn take_changes(&mut self) -> Vec<SessionRow> {
        self.changed.drain().map(|(_, row)| row).collect()
    }

    /// Puts rows back after a failed write, unless newer versions exist.
    pub fn restore_changes(&mut self, rows: Vec<SessionRow>) {
        for row in rows {
            self.changed.entry(row.id).or_insert(row);
        }
    }

    pub fn opened(&self) -> u64 {
        self.opened
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(user: Uuid, token: &str, at: OffsetDateTime) -> ActionRecord {
        ActionRecord {
            user_id: Some(user),
            session_token_hash: Some(token.into()),
            ..ActionRecord::arrived(Uuid::new_v4(), at, "GET", "/me")
        }
    }

    #[test]
    fn one_session_per_user_and_token_until_idle() {
        let mut tracker = SessionTracker::new(Duration::minutes(30));
        let user = Uuid::new_v4();
        let t0 = OffsetDateTime::now_utc();
        let mut a = record(user, "aaaa", t0);
        let mut b = record(user, "aaaa", t0 + Duration::minutes(29));
        let mut other_token = record(user, "bbbb", t0);
        let mut late = record(user, "aaaa", t0 + Duration::minutes(60));
        for r in [&mut a, &mut b, &mut other_token, &mut late] {
            tracker.assign(r);
        }
        assert_eq!(a.session_id, b.session_id);
        assert_ne!(a.session_id, other_token.session_id);
        assert_ne!(
            b.session_id, late.session_id,
            "29 idle minutes later... then 31"
        );
        let changes = tracker.take_changes();
        let first = changes
            .iter()
            .find(|s| Some(s.id) == a.session_id)
            .expect("first");
        assert!(!first.is_active);
        assert_eq!(first.ended_at, Some(t0 + Duration::minutes(29)));
        assert_eq!(tracker.opened(), 3);
    }

    #[test]
    fn anonymous_records_get_no_session() {
        let mut tracker = SessionTracker::new(Duration::minutes(30));
        let mut anonymous = record(Uuid::new_v4(), "x", OffsetDateTime::now_utc());
        anonymous.user_id = None;
        tracker.assign(&mut anonymous);
        assert_eq!(anonymous.session_id, None);
        assert!(tracker.take_changes().is_empty());
    }

    #[test]
    fn idle_sessions_are_ended_by_the_sweep() {
        let mut tracker = SessionTracker::new(Duration::minutes(30));
        let t0 = OffsetDateTime::now_utc();
        let mut r = record(Uuid::new_v4(), "aaaa", t0);
        tracker.assign(&mut r);
        tracker.take_changes();
        tracker.end_idle(t0 + Duration::minutes(10));
        assert!(tracker.take_changes().is_empty());
        tracker.end_idle(t0 + Duration::minutes(31));
        let ended = tracker.take_changes();
        assert_eq!(ended.len(), 1);
        assert!(!ended[0].is_active);
    }
}
