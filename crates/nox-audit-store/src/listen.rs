//! A connection of its own that `LISTEN`s, and comes back after it is lost.
//!
//! Notifications reach only the session that listens (a pooled
//! connection's are discarded), so a listener keeps one connection outside
//! any pool. [`spawn`] connects, `LISTEN`s on its channels and hands the
//! connection to a session, which reads the notifications (and may use the
//! client, e.g. to poll). When the connection fails it connects again,
//! after 100 ms, doubling up to 5 s while attempts keep failing.
//! Notifications sent while no connection listens are lost: a session
//! starts by catching up on what it follows, since it cannot know what it
//! missed.

use std::future::Future;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_postgres::{AsyncMessage, Client, NoTls, Notification};

const FIRST_RETRY: Duration = Duration::from_millis(100);
const LONGEST_RETRY: Duration = Duration::from_secs(5);

/// One listening connection, handed to the session.
#[derive(Debug)]
pub struct Connection {
    pub client: Client,
    /// The channels' notifications, in commit order; closed with the
    /// connection.
    pub notices: mpsc::UnboundedReceiver<Notification>,
    /// 1 for the first connection that listened, 2 after a reconnect, …
    pub number: u64,
}

/// The background task; stopped by [`Listener::close`] or when dropped.
#[derive(Debug)]
pub struct Listener(JoinHandle<()>);

impl Listener {
    pub fn close(&self) {
        self.0.abort();
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Listens on `channels` (trusted identifiers) with `pg_config`, running
/// `session` on each connection until the connection or the session fails.
/// `what` names the listener in logs. Call on a Tokio runtime.
pub fn spawn<S, F>(
    pg_config: tokio_postgres::Config,
    channels: &[&str],
    what: &'static str,
    mut session: S,
) -> Listener
where
    S: FnMut(Connection) -> F + Send + 'static,
    F: Future<Output = Result<(), tokio_postgres::Error>> + Send,
{
    let listen: String = channels.iter().map(|c| format!("LISTEN {c};")).collect();
    Listener(tokio::spawn(async move {
        let mut connections = 0;
        let mut retry = FIRST_RETRY;
        loop {
            let mut listened = false;
            let result = connect(
                &pg_config,
                &listen,
                connections + 1,
                &mut listened,
                &mut session,
            )
            .await;
            if listened {
                connections += 1;
                retry = FIRST_RETRY;
            }
            match result {
                Ok(()) => tracing::warn!(
                    listener = what,
                    "the listening connection closed; reconnecting"
                ),
                Err(error) => {
                    tracing::warn!(listener = what, %error, "the listening connection failed; reconnecting")
                }
            }
            tokio::time::sleep(retry).await;
            retry = (retry * 2).min(LONGEST_RETRY);
        }
    }))
}

/// One connection's life: connect, `LISTEN`, then the session while the
/// connection delivers notifications. Sets `listened` once `LISTEN` is done.
async fn connect<S, F>(
    pg_config: &tokio_postgres::Config,
    listen: &str,
    number: u64,
    listened: &mut bool,
    session: &mut S,
) -> Result<(), tokio_postgres::Error>
where
    S: FnMut(Connection) -> F,
    F: Future<Output = Result<(), tokio_postgres::Error>>,
{
    let (client, mut connection) = pg_config.connect(NoTls).await?;
    let (sender, notices) = mpsc::unbounded_channel();
    // Unbounded: the session may be waiting on the client, whose answers
    // only come while this forwards (notices are small and few per commit).
    let driver = async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            if let AsyncMessage::Notification(note) = message? {
                // The session has ended: it is being replaced anyway.
                let _ = sender.send(note);
            }
        }
        Ok(())
    };
    let work = async {
        client.batch_execute(listen).await?;
        *listened = true;
        session(Connection {
            client,
            notices,
            number,
        })
        .await
    };
    tokio::select! {
        result = work => result,
        result = driver => result,
    }
}
