//! How far the actions chain is committed, known as soon as any server on
//! the database commits: live readers (the audit stream) wait on it.
//!
//! Migration 0010's trigger announces every move of a chain's head with
//! `NOTIFY nox_audit_commit, '<chain> <first seq> <last seq>'`, delivered
//! only when the writing transaction commits. A [`CommitFeed`] listens on
//! that channel with a connection of its own ([`crate::listen`]), and also
//! reads the head every `poll_every`, so a notification lost with a dropped
//! connection only delays readers. The rows up to the published head are
//! all committed, because `seq` is assigned in commit order.

use std::sync::Arc;
use std::time::Duration;

use nox_audit_model::chain::ACTIONS_CHAIN;
use tokio::sync::watch;

use crate::listen::{self, Connection, Listener};

/// The channel migration 0010's trigger notifies.
pub const COMMIT_CHANNEL: &str = "nox_audit_commit";

/// The newest committed `seq` of the actions chain, followed in the
/// background. Clones share one connection; the last one dropped stops it.
#[derive(Debug, Clone)]
pub struct CommitFeed {
    head: watch::Receiver<Option<i64>>,
    listener: Arc<Listener>,
}

impl CommitFeed {
    /// Connects with `pg_config` (and reconnects, backing off up to 5 s,
    /// whenever the connection fails). Call on a Tokio runtime.
    pub fn start(pg_config: tokio_postgres::Config, poll_every: Duration) -> CommitFeed {
        let (sender, head) = watch::channel(None);
        let listener = listen::spawn(
            pg_config,
            &[COMMIT_CHANNEL],
            "audit commit feed",
            move |connection| follow(connection, poll_every, sender.clone()),
        );
        CommitFeed {
            head,
            listener: Arc::new(listener),
        }
    }

    /// The newest committed `seq` seen (0: an empty chain); `None` until the
    /// feed has reached the database once.
    pub fn head(&self) -> Option<i64> {
        *self.head.borrow()
    }

    /// A receiver that wakes when the head moves, and fails once the feed
    /// is closed.
    pub fn subscribe(&self) -> watch::Receiver<Option<i64>> {
        self.head.clone()
    }

    /// Stops following (for every clone): receivers' `changed()` fail, so
    /// live readers end. For shutdown.
    pub fn close(&self) {
        self.listener.close();
    }

    /// Whether [`CommitFeed::close`] was called (or the task ended).
    pub fn is_closed(&self) -> bool {
        self.head.has_changed().is_err()
    }
}

/// Raises the published head to `seq` (it never goes back: a head read
/// late must not undo a newer notification).
fn advance(head: &watch::Sender<Option<i64>>, seq: i64) {
    head.send_if_modified(|known| match *known {
        Some(current) if current >= seq => false,
        _ => {
            *known = Some(seq);
            true
        }
    });
}

/// The last `seq` of a notification about the actions chain.
fn announced_seq(payload: &str) -> Option<i64> {
    let mut parts = payload.split(' ');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(chain), Some(_first), Some(last), None) if chain == ACTIONS_CHAIN => {
            last.parse().ok()
        }
        _ => None,
    }
}

/// One connection's life (already listening): the head read now and every
/// `poll_every`, raised by notifications in between. Returns when the
/// connection fails.
async fn follow(
    connection: Connection,
    poll_every: Duration,
    head: watch::Sender<Option<i64>>,
) -> Result<(), tokio_postgres::Error> {
    let Connection {
        client,
        mut notices,
        ..
    } = connection;
    let statement = client
        .prepare("SELECT seq FROM audit_chain_heads WHERE chain = $1")
        .await?;
    let mut every = tokio::time::interval(poll_every);
    loop {
        tokio::select! {
            _ = every.tick() => {
                let row = client.query_opt(&statement, &[&ACTIONS_CHAIN]).await?;
                advance(&head, row.map_or(0, |row| row.get(0)));
            }
            Some(note) = notices.recv() => {
                if let Some(seq) = announced_seq(note.payload()) {
                    advance(&head, seq);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_actions_chain_s_announcements_count() {
        assert_eq!(announced_seq("audit_actions 5 9"), Some(9));
        assert_eq!(announced_seq("audit_admin_actions 5 9"), None);
        for hostile in [
            "",
            "audit_actions",
            "audit_actions 5",
            "audit_actions 5 x",
            "audit_actions 5 9 1",
        ] {
            assert_eq!(announced_seq(hostile), None, "{hostile:?}");
        }
    }

    /// Commits `n` records through a writer, as any server would.
    async fn commit(db: &nox_testkit::TestDb, n: usize) {
        let dir = tempfile::tempdir().unwrap();
        // (Not the testkit's writer: that one is of another build of this
        // crate.)
        let pool = crate::build_pool(db.config.clone(), &crate::PoolOptions::default()).unwrap();
        let writer = crate::AuditWriter::start(
            pool,
            crate::Spool::open(dir.path()).unwrap(),
            Arc::new(nox_audit_model::SystemClock),
            crate::WriterConfig::default(),
        );
        for _ in 0..n {
            let record = nox_audit_model::ActionRecord::arrived(
                uuid::Uuid::now_v7(),
                time::OffsetDateTime::now_utc(),
                "GET",
                "/",
            );
            writer.sink().submit(record, true).await.unwrap();
        }
        writer.shutdown().await;
    }

    async fn wait_for(feed: &CommitFeed, seq: i64) {
        let mut head = feed.subscribe();
        let reached = head.wait_for(|head| head.is_some_and(|head| head >= seq));
        tokio::time::timeout(Duration::from_secs(30), reached)
            .await
            .unwrap_or_else(|_| panic!("the feed never reached {seq}: {:?}", feed.head()))
            .unwrap();
    }

    #[tokio::test]
    async fn commits_are_announced_and_a_lost_connection_only_delays() {
        let db = nox_testkit::TestDb::new().await;
        let mut pg_config = db.config.clone();
        pg_config.application_name("commit-feed-test");
        // Polling once an hour: only a notification can move the head.
        let feed = CommitFeed::start(pg_config.clone(), Duration::from_secs(3600));
        wait_for(&feed, 0).await;
        commit(&db, 3).await;
        wait_for(&feed, 3).await;

        // The feed's connection dies; what commits meanwhile is found when
        // it reconnects (and reads the head).
        let client = db.client().await;
        let killed: i64 = client
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                 WHERE application_name = 'commit-feed-test'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(killed, 1);
        commit(&db, 2).await;
        wait_for(&feed, 5).await;

        // Closing ends every receiver.
        let mut receiver = feed.subscribe();
        feed.close();
        tokio::time::timeout(Duration::from_secs(30), async {
            while receiver.changed().await.is_ok() {}
        })
        .await
        .expect("receivers see the feed close");
        assert!(feed.is_closed());
    }

    #[test]
    fn the_head_never_goes_back() {
        let (sender, receiver) = watch::channel(None);
        advance(&sender, 7);
        advance(&sender, 3);
        assert_eq!(*receiver.borrow(), Some(7));
        advance(&sender, 8);
        assert_eq!(*receiver.borrow(), Some(8));
    }
}
