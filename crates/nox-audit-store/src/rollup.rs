//! The daily rollups, brought up to date after commit (migration 0016):
//! a durable batch's transaction carries only its rows, and a rollup step
//! adds the rows after a watermark on the actions chain's gapless `seq` to
//! `audit_daily_summaries`. One session at a time runs a step (its state
//! row is locked; the others skip), so any number of servers share it.
//!
//! [`AuditWriter`](crate::AuditWriter) runs [`RollupTask`] beside the
//! writer: a step at most every [`INTERVAL`] after its batches commit, and
//! every [`IDLE_STEP_EVERY`] regardless (other servers' rows, a restart).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use time::OffsetDateTime;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_postgres::GenericClient;

/// The most rows one step adds, so a step after a long outage or a seeding
/// stays a short transaction.
pub const STEP_ROWS: i64 = 50_000;

/// The least time between two steps of one server while rows arrive: the
/// lag's bound under load, and what spreads a step's fixed cost.
pub const INTERVAL: Duration = Duration::from_millis(250);

/// A step is run this often even when this server wrote nothing.
pub const IDLE_STEP_EVERY: Duration = Duration::from_secs(5);

/// How long [`catch_up`] waits for steps other sessions are running, and
/// a stopping writer for its last catch-up.
const CATCH_UP_PATIENCE: Duration = Duration::from_secs(10);

/// Adds at most `max_rows` rows after the watermark (`None`: all) to the
/// rollups. `Ok(None)` when another session is running a step.
pub async fn step(
    client: &impl GenericClient,
    max_rows: Option<i64>,
) -> Result<Option<i64>, tokio_postgres::Error> {
    client
        .query_one("SELECT audit_rollup_step($1)", &[&max_rows])
        .await
        .map(|row| row.get(0))
}

/// Runs steps until the rollups hold every row committed before the call,
/// waiting (up to 10 s) while another session runs one. Returns the rows
/// this call added.
pub async fn catch_up(client: &impl GenericClient) -> Result<i64, CatchUpError> {
    let started = Instant::now();
    let mut added = 0;
    loop {
        match step(client, Some(STEP_ROWS)).await? {
            Some(rows) if rows < STEP_ROWS => return Ok(added + rows),
            Some(rows) => added += rows,
            None if started.elapsed() < CATCH_UP_PATIENCE => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            None => return Err(CatchUpError::Busy),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CatchUpError {
    #[error("database: {0}")]
    Database(#[from] tokio_postgres::Error),
    #[error("another session kept the rollup state locked for 10 s")]
    Busy,
}

/// How far the rollups have come, as one snapshot sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RollupState {
    /// Every actions row up to this seq is in the rollups.
    pub rolled_seq: i64,
    /// The actions chain's committed head.
    pub head_seq: i64,
    /// When a step last reached the head: the rollups hold every row
    /// committed before then.
    pub caught_up_at: OffsetDateTime,
    /// How stale the rollups may be (the database's clock, so a server's
    /// own clock does not skew it): zero when no committed row is missing
    /// from them, else the time since they last held every row.
    pub lag: time::Duration,
}

impl RollupState {
    pub async fn read(client: &impl GenericClient) -> Result<Self, tokio_postgres::Error> {
        let row = client
            .query_one(
                "SELECT r.rolled_seq, h.seq, r.caught_up_at,
                        CASE WHEN h.seq > r.rolled_seq
                             THEN greatest(extract(epoch FROM clock_timestamp() - r.caught_up_at), 0)
                             ELSE 0 END::float8
                 FROM audit_rollup_state r, audit_chain_heads h
                 WHERE h.chain = 'audit_actions'",
                &[],
            )
            .await?;
        Ok(RollupState {
            rolled_seq: row.get(0),
            head_seq: row.get(1),
            caught_up_at: row.get(2),
            lag: time::Duration::seconds_f64(row.get(3)),
        })
    }

    pub fn rows_behind(&self) -> i64 {
        (self.head_seq - self.rolled_seq).max(0)
    }
}

/// The background task that keeps the rollups current.
#[derive(Debug)]
pub struct RollupTask {
    due: Arc<AtomicBool>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl RollupTask {
    /// Starts the task on the current Tokio runtime.
    pub fn start(pool: Pool) -> RollupTask {
        let due = Arc::new(AtomicBool::new(true));
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(run(pool, Arc::clone(&due), stopped));
        RollupTask { due, stop, task }
    }

    /// What the writer tells when rows were committed.
    pub fn trigger(&self) -> RollupTrigger {
        RollupTrigger(Arc::clone(&self.due))
    }

    /// Stops the task after a last catch-up (a server leaves its rows
    /// rolled up).
    pub async fn shutdown(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// Tells a [`RollupTask`] that rows were committed: a step is due at its
/// next interval.
#[derive(Debug, Clone)]
pub struct RollupTrigger(Arc<AtomicBool>);

impl RollupTrigger {
    pub fn rows_committed(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

async fn run(pool: Pool, due: Arc<AtomicBool>, mut stopped: oneshot::Receiver<()>) {
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_step: Option<Instant> = None;
    let mut last_warning: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut stopped => break,
        }
        let idle_step_due = last_step.is_none_or(|at| at.elapsed() >= IDLE_STEP_EVERY);
        if !due.swap(false, Ordering::Relaxed) && !idle_step_due {
            continue;
        }
        last_step = Some(Instant::now());
        match steps_until_caught_up(&pool).await {
            // Another server's step may have read the head before this
            // server's last rows committed: try again next interval.
            Ok(false) => due.store(true, Ordering::Relaxed),
            Ok(true) => {}
            Err(error) => {
                // Each step fails alike until its cause is fixed: said once
                // a minute, and the lag still published (it grows).
                if last_warning.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
                    tracing::warn!(%error, "the audit rollups cannot advance");
                    last_warning = Some(Instant::now());
                }
                publish_lag(&pool).await;
                due.store(true, Ordering::Relaxed);
            }
        }
    }
    let result = tokio::time::timeout(CATCH_UP_PATIENCE, async {
        let object = pool.get().await.map_err(|e| e.to_string())?;
        let client: &tokio_postgres::Client = &object;
        catch_up(client).await.map_err(|e| e.to_string())
    })
    .await
    .unwrap_or_else(|_| Err("it took too long".to_owned()));
    if let Err(error) = result {
        tracing::warn!(%error, "audit rollups not caught up at shutdown (the next step will)");
    }
}

/// How often a rollup that keeps failing is logged.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// Publishes the rollups' lag, if the database can say it.
async fn publish_lag(pool: &Pool) {
    if let Ok(object) = pool.get().await {
        let client: &tokio_postgres::Client = &object;
        if let Ok(state) = RollupState::read(client).await {
            nox_audit_metrics::set_rollup_lag(state.lag.as_seconds_f64());
        }
    }
}

/// Runs steps until one reaches the head (`Ok(true)`) or finds another
/// session running one (`Ok(false)`), then publishes the lag.
async fn steps_until_caught_up(pool: &Pool) -> Result<bool, String> {
    let object = pool.get().await.map_err(|e| e.to_string())?;
    let client: &tokio_postgres::Client = &object;
    let caught_up = loop {
        match step(client, Some(STEP_ROWS))
            .await
            .map_err(|e| e.to_string())?
        {
            Some(rows) if rows < STEP_ROWS => break true,
            Some(_) => continue,
            None => break false,
        }
    };
    let state = RollupState::read(client).await.map_err(|e| e.to_string())?;
    nox_audit_metrics::set_rollup_lag(state.lag.as_seconds_f64());
    Ok(caught_up)
}
