//! Audit sessions: one per (user, token) across every server on the
//! database, until it has been idle too long.
//!
//! The database decides (migration 0013): at most one session per (user,
//! token) is active there, and `audit_sessions_open` finds or opens it,
//! judging idleness on the `last_activity` stored there (the greatest any
//! server wrote). The writer's [`SessionTracker`] remembers the sessions it
//! met, so records of known sessions need no database call; a batch asks
//! for all its unknown keys in one call ([`SessionTracker::assign_all`]).
//!
//! Idleness is judged on the records' own timestamps and on the injected
//! clock, never on when a batch happens to be written. A session's row is
//! written when it opens or ends and when its last activity has moved by
//! more than a coarse step ([`SessionTracker::step`]), or has been quiet for
//! that long: not in every batch. Ending one is conditional in the database
//! (only if its last activity there is older than the idle timeout), so one
//! server never ends a session another keeps alive.

use std::collections::HashMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};
use uuid::Uuid;

use nox_audit_model::ActionRecord;

/// The coarsest step by which a session's stored last activity may lag.
const MAX_STEP: Duration = Duration::seconds(60);

/// A session's row in `audit_sessions`, or a change to it, as the writer
/// writes (and spools) it.
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
    /// Set when this writer judged the session idle (`is_active` false):
    /// it ends in the database only if its last activity there is before
    /// this instant (now, or a new record's time, less the idle timeout).
    /// Rows spooled before shared sessions have none (see
    /// [`SessionRow::end_before`]).
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub idle_before: Option<OffsetDateTime>,
}

impl SessionRow {
    /// The instant before which the session's stored last activity must lie
    /// for this change to end it: none for a session kept open. A row of an
    /// older writer that ended it in its memory ends it if no server wrote
    /// later activity.
    pub fn end_before(&self) -> Option<OffsetDateTime> {
        if self.is_active {
            return None;
        }
        Some(
            self.idle_before
                .unwrap_or(self.last_activity + Duration::microseconds(1)),
        )
    }
}

/// What a writer asks the database for a (user, token) it does not know.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionRequest {
    /// The id a session opened for it gets.
    pub new_id: Uuid,
    pub user_id: Uuid,
    pub session_token_hash: String,
    pub client_ip: Option<IpAddr>,
    pub user_agent: Option<String>,
    /// The time of the record that needs it.
    pub at: OffsetDateTime,
}

/// The database's answer to a [`SessionRequest`].
#[derive(Debug, Clone, PartialEq)]
pub struct FoundSession {
    pub user_id: Uuid,
    pub session_token_hash: String,
    pub id: Uuid,
    pub started_at: OffsetDateTime,
    pub last_activity: OffsetDateTime,
    /// Whether this request opened it.
    pub opened: bool,
}

/// A session this writer knows, with the last activity it wrote.
#[derive(Debug)]
struct Known {
    row: SessionRow,
    written: OffsetDateTime,
}

type Key = (Uuid, String);

#[derive(Debug)]
pub struct SessionTracker {
    idle: Duration,
    step: Duration,
    known: HashMap<Key, Known>,
    /// Sessions changed since the last [`SessionTracker::take_changes`].
    changed: HashMap<Uuid, SessionRow>,
    /// Sessions this writer opened in the database:
    /// `nox_audit_sessions_total`.
    opened: u64,
}

impl SessionTracker {
    pub fn new(idle: Duration) -> Self {
        SessionTracker {
            idle,
            step: MAX_STEP.min(idle / 30),
            known: HashMap::new(),
            changed: HashMap::new(),
            opened: 0,
        }
    }

    /// How far a session's stored last activity may lag behind this
    /// writer's: 1/30 of the idle timeout, at most 60 s.
    pub fn step(&self) -> Duration {
        self.step
    }

    /// Sets `session_id` on every authenticated record that has none, in
    /// order. The keys this tracker does not know (or knows as idle at a
    /// record's time) are sent to `find` together, one call per pass: one
    /// pass unless a key's records span an idle gap. If `find` fails, the
    /// records still waiting keep no session (a spooled record gets its
    /// session when it is replayed).
    pub async fn assign_all<E, F>(
        &mut self,
        records: &mut [ActionRecord],
        mut find: impl FnMut(Vec<SessionRequest>) -> F,
    ) -> Result<(), E>
    where
        F: Future<Output = Result<Vec<FoundSession>, E>>,
    {
        // Each pass settles at least the first waiting record of each key.
        for _ in 0..=records.len() {
            let mut requests: HashMap<Key, SessionRequest> = HashMap::new();
            for record in records.iter_mut() {
                let Some(key) = key_of(record) else { continue };
                // A key's later records wait for the answer, in order.
                if record.session_id.is_some() || requests.contains_key(&key) {
                    continue;
                }
                if let Some(request) = self.assign(record) {
                    requests.insert(key, request);
                }
            }
            if requests.is_empty() {
                break;
            }
            let found = find(requests.values().cloned().collect()).await?;
            for session in found {
                let key = (session.user_id, session.session_token_hash.clone());
                if let Some(request) = requests.remove(&key) {
                    self.adopt(session, request);
                }
            }
        }
        Ok(())
    }

    /// Sets `record.session_id` from a known session, or says what to ask
    /// the database.
    fn assign(&mut self, record: &mut ActionRecord) -> Option<SessionRequest> {
        let key = key_of(record)?;
        let at = record.timestamp;
        if let Some(known) = self.known.get_mut(&key) {
            let session = &mut known.row;
            if at - session.last_activity <= self.idle {
                session.last_activity = session.last_activity.max(at);
                record.session_id = Some(session.id);
                if session.last_activity - known.written > self.step {
                    known.written = session.last_activity;
                    self.changed.insert(session.id, session.clone());
                }
                return None;
            }
            // Idle here; the database ends it unless another server kept it
            // alive, and answers the request below with the session to use.
            let known = self.known.remove(&key).expect("just found");
            self.changed
                .insert(known.row.id, ended(known.row, at - self.idle));
        }
        Some(SessionRequest {
            new_id: Uuid::now_v7(),
            user_id: key.0,
            session_token_hash: key.1,
            client_ip: record.client_ip,
            user_agent: record.user_agent.clone(),
            at,
        })
    }

    fn adopt(&mut self, session: FoundSession, request: SessionRequest) {
        self.opened += u64::from(session.opened);
        let row = SessionRow {
            id: session.id,
            user_id: session.user_id,
            session_token_hash: session.session_token_hash,
            client_ip: request.client_ip,
            user_agent: request.user_agent,
            started_at: session.started_at,
            last_activity: session.last_activity,
            ended_at: None,
            is_active: true,
            idle_before: None,
        };
        let key = (row.user_id, row.session_token_hash.clone());
        self.known.insert(
            key,
            Known {
                written: row.last_activity,
                row,
            },
        );
    }

    /// The sweep at `now`: asks the database to end the sessions idle here
    /// (and forgets them), and writes the last activity of those quiet for a
    /// step, so that what the database judges idle is exact.
    pub fn end_idle(&mut self, now: OffsetDateTime) {
        let (idle, step) = (self.idle, self.step);
        let changed = &mut self.changed;
        self.known.retain(|_, known| {
            let last = known.row.last_activity;
            if now - last > idle {
                changed.insert(known.row.id, ended(known.row.clone(), now - idle));
                return false;
            }
            if last > known.written && now - last >= step {
                known.written = last;
                changed.insert(known.row.id, known.row.clone());
            }
            true
        });
    }

    /// Writes every session's last activity (at shutdown).
    pub fn flush(&mut self) {
        for known in self.known.values_mut() {
            if known.row.last_activity > known.written {
                known.written = known.row.last_activity;
                self.changed.insert(known.row.id, known.row.clone());
            }
        }
    }

    /// The session rows to write.
    pub fn take_changes(&mut self) -> Vec<SessionRow> {
        self.changed.drain().map(|(_, row)| row).collect()
    }

    /// Puts rows back after a failed write, unless newer versions exist.
    pub fn restore_changes(&mut self, rows: Vec<SessionRow>) {
        for row in rows {
            self.changed.entry(row.id).or_insert(row);
        }
    }

    /// Sessions this writer opened in the database since it started.
    pub fn opened(&self) -> u64 {
        self.opened
    }
}

/// A record's (user, token) when it was authenticated.
fn key_of(record: &ActionRecord) -> Option<Key> {
    Some((record.user_id?, record.session_token_hash.clone()?))
}

/// `row` judged idle: to end if its stored last activity is before
/// `idle_before`.
fn ended(row: SessionRow, idle_before: OffsetDateTime) -> SessionRow {
    SessionRow {
        ended_at: Some(row.last_activity),
        is_active: false,
        idle_before: Some(idle_before),
        ..row
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE: Duration = Duration::minutes(30);

    fn record(user: Uuid, token: &str, at: OffsetDateTime) -> ActionRecord {
        ActionRecord {
            user_id: Some(user),
            session_token_hash: Some(token.into()),
            ..ActionRecord::arrived(Uuid::new_v4(), at, "GET", "/me")
        }
    }

    /// What `audit_sessions_open` answers, in memory: the active session is
    /// kept unless idle by its last activity, else a new one opens.
    #[derive(Default)]
    struct Database {
        active: HashMap<Key, FoundSession>,
        calls: usize,
    }

    impl Database {
        fn find(&mut self, requests: Vec<SessionRequest>) -> Result<Vec<FoundSession>, ()> {
            self.calls += 1;
            Ok(requests
                .into_iter()
                .map(|request| {
                    let key = (request.user_id, request.session_token_hash.clone());
                    let session = match self.active.get_mut(&key) {
                        Some(session) if request.at - session.last_activity <= IDLE => {
                            session.last_activity = session.last_activity.max(request.at);
                            session.opened = false;
                            session
                        }
                        _ => self
                            .active
                            .entry(key)
                            .insert_entry(FoundSession {
                                user_id: request.user_id,
                                session_token_hash: request.session_token_hash,
                                id: request.new_id,
                                started_at: request.at,
                                last_activity: request.at,
                                opened: true,
                            })
                            .into_mut(),
                    };
                    session.clone()
                })
                .collect())
        }
    }

    async fn assign(
        tracker: &mut SessionTracker,
        database: &mut Database,
        records: &mut [ActionRecord],
    ) {
        tracker
            .assign_all(records, |requests| {
                std::future::ready(database.find(requests))
            })
            .await
            .expect("found");
    }

    #[tokio::test]
    async fn one_session_per_user_and_token_until_idle() {
        let (mut tracker, mut database) = (SessionTracker::new(IDLE), Database::default());
        let user = Uuid::new_v4();
        let t0 = OffsetDateTime::now_utc();
        let mut records = [
            record(user, "aaaa", t0),
            record(user, "aaaa", t0 + Duration::minutes(29)),
            record(user, "bbbb", t0),
            record(user, "aaaa", t0 + Duration::minutes(60)),
        ];
        assign(&mut tracker, &mut database, &mut records).await;
        let [a, b, other_token, late] = &records;
        assert_eq!(a.session_id, b.session_id);
        assert_ne!(a.session_id, other_token.session_id);
        assert_ne!(b.session_id, late.session_id, "29 idle minutes... then 31");
        assert_eq!(database.calls, 2, "the idle gap takes a second pass");
        let changes = tracker.take_changes();
        let first = changes
            .iter()
            .find(|s| Some(s.id) == a.session_id)
            .expect("the first session's end");
        assert_eq!(
            (first.is_active, first.last_activity, first.end_before()),
            (
                false,
                t0 + Duration::minutes(29),
                Some(t0 + Duration::minutes(30))
            ),
            "ended only if nothing later was written"
        );
        assert_eq!(tracker.opened(), 3);
    }

    #[tokio::test]
    async fn known_sessions_need_no_database_and_unknown_ones_one_call() {
        let (mut tracker, mut database) = (SessionTracker::new(IDLE), Database::default());
        let t0 = OffsetDateTime::now_utc();
        let users: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
        let mut batch: Vec<ActionRecord> = users
            .iter()
            .flat_map(|user| (0..3).map(move |i| record(*user, "aaaa", t0 + Duration::seconds(i))))
            .collect();
        assign(&mut tracker, &mut database, &mut batch).await;
        assert_eq!(database.calls, 1, "five unknown keys, one call");
        assert!(batch.iter().all(|r| r.session_id.is_some()));
        let mut later: Vec<ActionRecord> = users
            .iter()
            .map(|user| record(*user, "aaaa", t0 + Duration::seconds(10)))
            .collect();
        assign(&mut tracker, &mut database, &mut later).await;
        assert_eq!(database.calls, 1, "known keys: no call");
        assert_eq!(later[0].session_id, batch[0].session_id);
    }

    #[tokio::test]
    async fn last_activity_is_written_past_a_step_or_when_quiet() {
        let (mut tracker, mut database) = (SessionTracker::new(IDLE), Database::default());
        assert_eq!(tracker.step(), Duration::seconds(60));
        let (user, t0) = (Uuid::new_v4(), OffsetDateTime::now_utc());
        let mut batch = [record(user, "aaaa", t0)];
        assign(&mut tracker, &mut database, &mut batch).await;
        assert!(tracker.take_changes().is_empty(), "opened in the database");
        let mut batch = [record(user, "aaaa", t0 + Duration::seconds(30))];
        assign(&mut tracker, &mut database, &mut batch).await;
        assert!(tracker.take_changes().is_empty(), "within the step");
        let mut batch = [record(user, "aaaa", t0 + Duration::seconds(61))];
        assign(&mut tracker, &mut database, &mut batch).await;
        let changes = tracker.take_changes();
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].last_activity, t0 + Duration::seconds(61));
        assert_eq!(changes[0].end_before(), None);

        let mut batch = [record(user, "aaaa", t0 + Duration::seconds(70))];
        assign(&mut tracker, &mut database, &mut batch).await;
        tracker.end_idle(t0 + Duration::seconds(100));
        assert!(
            tracker.take_changes().is_empty(),
            "quiet for less than a step"
        );
        tracker.end_idle(t0 + Duration::seconds(130));
        let changes = tracker.take_changes();
        assert_eq!(changes.len(), 1, "quiet for a step: written");
        assert_eq!(changes[0].last_activity, t0 + Duration::seconds(70));
        tracker.end_idle(t0 + Duration::seconds(140));
        assert!(tracker.take_changes().is_empty(), "once");
    }

    #[tokio::test]
    async fn idle_sessions_are_ended_by_the_sweep_if_the_database_agrees() {
        let (mut tracker, mut database) = (SessionTracker::new(IDLE), Database::default());
        let t0 = OffsetDateTime::now_utc();
        let mut batch = [record(Uuid::new_v4(), "aaaa", t0)];
        assign(&mut tracker, &mut database, &mut batch).await;
        tracker.end_idle(t0 + Duration::minutes(10));
        assert!(tracker.take_changes().is_empty());
        tracker.end_idle(t0 + Duration::minutes(31));
        let ended = tracker.take_changes();
        assert_eq!(ended.len(), 1);
        assert!(!ended[0].is_active);
        assert_eq!(ended[0].end_before(), Some(t0 + Duration::minutes(1)));
        // Forgotten: the next record asks the database again.
        let mut batch = [record(
            batch[0].user_id.expect("user"),
            "aaaa",
            t0 + Duration::minutes(32),
        )];
        assign(&mut tracker, &mut database, &mut batch).await;
        assert_eq!(database.calls, 2);
    }

    #[tokio::test]
    async fn anonymous_and_assigned_records_are_left_alone() {
        let (mut tracker, mut database) = (SessionTracker::new(IDLE), Database::default());
        let now = OffsetDateTime::now_utc();
        let mut anonymous = record(Uuid::new_v4(), "x", now);
        anonymous.user_id = None;
        let spooled_with_one = ActionRecord {
            session_id: Some(Uuid::new_v4()),
            ..record(Uuid::new_v4(), "y", now)
        };
        let mut batch = [anonymous, spooled_with_one.clone()];
        assign(&mut tracker, &mut database, &mut batch).await;
        assert_eq!(batch[0].session_id, None);
        assert_eq!(batch[1], spooled_with_one);
        assert_eq!(database.calls, 0);
        assert!(tracker.take_changes().is_empty());
    }

    #[tokio::test]
    async fn without_the_database_records_keep_no_session() {
        let mut tracker = SessionTracker::new(IDLE);
        let mut batch = [record(Uuid::new_v4(), "aaaa", OffsetDateTime::now_utc())];
        let result = tracker
            .assign_all(&mut batch, |_| std::future::ready(Err("down")))
            .await;
        assert_eq!(result, Err("down"));
        assert_eq!(batch[0].session_id, None, "given at the spool's replay");
    }

    #[test]
    fn rows_spooled_before_shared_sessions_keep_their_meaning() {
        let json = r#"{"id":"00000000-0000-0000-0000-000000000001","user_id":"00000000-0000-0000-0000-000000000002","session_token_hash":"aaaa","client_ip":null,"user_agent":null,"started_at":"2026-01-01T00:00:00Z","last_activity":"2026-01-01T00:10:00Z","ended_at":"2026-01-01T00:10:00Z","is_active":false}"#;
        let row: SessionRow = serde_json::from_str(json).expect("an older writer's row");
        assert_eq!(row.idle_before, None);
        let last = row.last_activity;
        assert_eq!(row.end_before(), Some(last + Duration::microseconds(1)));
        assert_eq!(
            serde_json::from_str::<SessionRow>(&serde_json::to_string(&row).expect("json"))
                .expect("read back"),
            row
        );
    }
}
