//! How far the actions chain is committed, known as soon as any server on
//! the database commits: live readers (the audit stream) wait on it.
//!
//! Migration 0010's trigger announces every move of a chain's head with
//! `NOTIFY nox_audit_commit, '<chain> <first seq> <last seq>'`, delivered
//! only when the writing transaction commits. A [`CommitFeed`] keeps one
//! connection of its own (outside the pool: a pooled connection's
//! notifications are discarded) listening on that channel, and also reads
//! the head every `poll_every`, so a notification lost with a dropped
//! connection only delays readers. The rows up to the published head are
//! all committed, because `seq` is assigned in commit order.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use nox_audit_model::chain::ACTIONS_CHAIN;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_postgres::{AsyncMessage, NoTls};

/// The channel migration 0010's trigger notifies.
pub const COMMIT_CHANNEL: &str = "nox_audit_commit";

/// The newest committed `seq` of the actions chain, followed in the
/// background. Clones share one connection; the last one dropped stops it.
#[derive(Debug, Clone)]
pub struct CommitFeed {
    head: watch::Receiver<Option<i64>>,
    task: Arc<StopOnDrop>,
}

#[derive(Debug)]
struct StopOnDrop(JoinHandle<()>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl CommitFeed {
    /// Connects with `pg_config` (and reconnects, backing off up to 5 s,
    /// whenever the connection fails). Call on a Tokio runtime.
    pub fn start(pg_config: tokio_postgres::Config, poll_every: Duration) -> CommitFeed {
        let (sender, head) = watch::channel(None);
        let task = tokio::spawn(follow(pg_config, poll_every, sender));
        CommitFeed {
            head,
            task: Arc::new(StopOnDrop(task)),
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
        self.task.0.abort();
    }

    /// Whether [`CommitFeed::close`] was called (or the task ended).
    pub fn is_closed(&self) -> bool {
        self.head.has_changed().is_err()
    }
}

async fn follow(
    pg_config: tokio_postgres::Config,
    poll_every: Duration,
    head: watch::Sender<Option<i64>>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match listen(&pg_config, poll_every, &head).await {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(error) => {
                tracing::warn!(%error, "the audit commit feed lost its connection; reconnecting")
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
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

/// One connection's life: `LISTEN`, then the head read now and every
/// `poll_every` while notifications raise it in between. Returns when the
/// connection fails.
async fn listen(
    pg_config: &tokio_postgres::Config,
    poll_every: Duration,
    head: &watch::Sender<Option<i64>>,
) -> Result<(), tokio_postgres::Error> {
    let (client, mut connection) = pg_config.connect(NoTls).await?;
    let notices = head.clone();
    let mut driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(note)) => {
                    if let Some(seq) = announced_seq(note.payload()) {
                        advance(&notices, seq);
                    }
                }
                Ok(_) => {}
                Err(error) => return Err(error),
            }
        }
        Ok(())
    });
    // Listening first, then reading: no commit falls between the two.
    let reads = async {
        client
            .batch_execute(&format!("LISTEN {COMMIT_CHANNEL}"))
            .await?;
        let statement = client
            .prepare("SELECT seq FROM audit_chain_heads WHERE chain = $1")
            .await?;
        let mut every = tokio::time::interval(poll_every);
        loop {
            every.tick().await;
            let row = client.query_opt(&statement, &[&ACTIONS_CHAIN]).await?;
            advance(head, row.map_or(0, |row| row.get(0)));
        }
    };
    tokio::select! {
        result = reads => result,
        ended = &mut driver => match ended {
            Ok(result) => result,
            Err(_) => Ok(()),
        },
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
