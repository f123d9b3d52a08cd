//! The audit writer: a bounded queue in front of one task that writes records
//! to PostgreSQL in batches (one transaction per batch: binary `COPY`, or for
//! a small batch an `INSERT` that lets the transaction go in one round trip).
//!
//! Nothing is ever dropped. A full queue makes senders wait. When PostgreSQL
//! cannot take a batch, the batch goes to the fsynced [`Spool`] and is
//! replayed, idempotently by id, once PostgreSQL is back. Only when neither
//! can take a batch do its senders get an error (and the sink reports itself
//! down, so callers can refuse mutations up front).
//!
//! Each batch's rows join the actions hash chain inside the batch's
//! transaction, under the chain head's lock (see [`crate::chain`]).

use std::collections::HashSet;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration as StdDuration, Instant};

use deadpool_postgres::Pool;
use time::{Duration, OffsetDateTime};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::{join, try_join};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};

use nox_audit_metrics::{AuditMetrics, AuditedAction};
use nox_audit_model::chain::ACTIONS_CHAIN;
use nox_audit_model::{ACTION_COLUMNS, ActionRecord, Clock};
use uuid::Uuid;

use crate::chain;
use crate::sessions::{SessionRow, SessionTracker};
use crate::spool::Spool;

/// How records reach the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditMode {
    /// The response waits until its record is committed (or spooled).
    Durable,
    /// The response does not wait; the record is queued.
    Buffered,
    /// No records at all (for benchmarks).
    Off,
}

impl std::str::FromStr for AuditMode {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "durable" => Ok(AuditMode::Durable),
            "buffered" => Ok(AuditMode::Buffered),
            "off" => Ok(AuditMode::Off),
            other => Err(format!(
                "unknown audit mode {other:?}: use durable, buffered or off"
            )),
        }
    }
}

impl AuditMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AuditMode::Durable => "durable",
            AuditMode::Buffered => "buffered",
            AuditMode::Off => "off",
        }
    }
}

#[derive(Debug, Clone)]
pub struct WriterConfig {
    pub queue_capacity: usize,
    pub max_batch: usize,
    pub session_idle: Duration,
    /// How often the writer retries the spool and sweeps idle sessions.
    pub tick: StdDuration,
    /// Distinct `user_id` metric labels before the rest become `other`
    /// (0: every value is `all`).
    pub max_user_labels: usize,
    /// Whether rows join the hash chain. Always on in Nox; off only to
    /// measure what the chain costs (`verify` reports unchained rows).
    pub chained: bool,
    /// How long the writer waits, once a record arrives, for more to join
    /// its batch (unless a full batch is already queued). Zero for durable
    /// mode, where every request waits for its batch; in buffered mode
    /// nobody waits, and larger batches spread each transaction's fixed
    /// cost over more rows.
    pub linger: StdDuration,
}

impl Default for WriterConfig {
    fn default() -> Self {
        WriterConfig {
            queue_capacity: 10_000,
            max_batch: 1_000,
            session_idle: Duration::minutes(30),
            tick: StdDuration::from_secs(1),
            max_user_labels: 1000,
            chained: true,
            linger: StdDuration::ZERO,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("the audit trail can take no records: the database and the spool both failed")]
    Unavailable,
    #[error("the audit writer has stopped")]
    Stopped,
}

/// What the writer reports about itself (`/admin/audit/status`).
#[derive(Debug, Default)]
pub struct SinkStatus {
    queue_capacity: AtomicU64,
    database_up: AtomicBool,
    /// Set while neither the database nor the spool can take records.
    down: AtomicBool,
    rows_written: AtomicU64,
    spool_rows: AtomicU64,
    spool_files: AtomicU64,
    sessions_opened: AtomicU64,
    rows_reduced: AtomicU64,
    rejected_rows: AtomicU64,
    rejected_files: AtomicU64,
    last_write_at: Mutex<Option<OffsetDateTime>>,
    last_error: Mutex<Option<String>>,
}

impl SinkStatus {
    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }
    pub fn database_up(&self) -> bool {
        self.database_up.load(Ordering::Relaxed)
    }
    pub fn rows_written(&self) -> u64 {
        self.rows_written.load(Ordering::Relaxed)
    }
    pub fn spool_rows(&self) -> u64 {
        self.spool_rows.load(Ordering::Relaxed)
    }
    pub fn spool_files(&self) -> u64 {
        self.spool_files.load(Ordering::Relaxed)
    }
    pub fn sessions_opened(&self) -> u64 {
        self.sessions_opened.load(Ordering::Relaxed)
    }
    /// Rows written in minimal form since the start (their content refused).
    pub fn rows_reduced(&self) -> u64 {
        self.rows_reduced.load(Ordering::Relaxed)
    }
    /// Rows put into `audit-spool/rejected/` since the start.
    pub fn rejected_rows(&self) -> u64 {
        self.rejected_rows.load(Ordering::Relaxed)
    }
    /// Files in `audit-spool/rejected/`.
    pub fn rejected_files(&self) -> u64 {
        self.rejected_files.load(Ordering::Relaxed)
    }
    pub fn last_write_at(&self) -> Option<OffsetDateTime> {
        *self.last_write_at.lock().unwrap_or_else(|p| p.into_inner())
    }
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
    fn set_error(&self, error: Option<String>) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = error;
    }
}

type Ack = oneshot::Sender<Result<(), SinkError>>;

#[derive(Debug)]
enum Message {
    Record(Box<ActionRecord>, Option<Ack>),
    /// Drain everything queued before it, replay the spool, stop.
    Shutdown(oneshot::Sender<()>),
}

/// The sending side; cheap to clone, one per worker is fine.
#[derive(Debug, Clone)]
pub struct AuditSink {
    sender: mpsc::Sender<Message>,
    status: Arc<SinkStatus>,
    metrics: Arc<AuditMetrics>,
}

impl AuditSink {
    /// Queues a record, waiting for room. With `wait_commit`, returns only
    /// once the record is committed or spooled. The record is made
    /// storable first ([`ActionRecord::make_storable`]): whatever a client
    /// sent, its row can be written. Once this future has been polled, the
    /// record is queued even if the future is dropped (a caller whose client
    /// went away cannot lose it).
    pub async fn submit(
        &self,
        mut record: ActionRecord,
        wait_commit: bool,
    ) -> Result<(), SinkError> {
        record.make_storable();
        record_metrics(&record, &self.metrics);
        let (ack, done) = match wait_commit {
            true => {
                let (ack, done) = oneshot::channel();
                (Some(ack), Some(done))
            }
            false => (None, None),
        };
        self.enqueue(Message::Record(Box::new(record), ack)).await?;
        match done {
            Some(done) => done.await.map_err(|_| SinkError::Stopped)?,
            None => Ok(()),
        }
    }

    /// Queues `record` from code that cannot wait (a drop): at once when the
    /// queue has room, so it is in the writer's hands even if the runtime
    /// stops next (shutdown drains the queue); else from a task that waits
    /// for room.
    pub fn submit_detached(&self, mut record: ActionRecord) -> Result<(), SinkError> {
        record.make_storable();
        record_metrics(&record, &self.metrics);
        match self
            .sender
            .try_send(Message::Record(Box::new(record), None))
        {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(SinkError::Stopped),
            Err(mpsc::error::TrySendError::Full(message)) => {
                let runtime =
                    tokio::runtime::Handle::try_current().map_err(|_| SinkError::Stopped)?;
                let sender = self.sender.clone();
                runtime.spawn(async move {
                    if sender.send(message).await.is_err() {
                        tracing::error!("an audit record could not be queued: the writer stopped");
                    }
                });
                Ok(())
            }
        }
    }

    /// Queues a message at once, or when the queue is full, from a task of
    /// its own that waits for room and outlives the caller.
    async fn enqueue(&self, message: Message) -> Result<(), SinkError> {
        match self.sender.try_send(message) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(SinkError::Stopped),
            Err(mpsc::error::TrySendError::Full(message)) => {
                let sender = self.sender.clone();
                tokio::spawn(async move { sender.send(message).await })
                    .await
                    .map_err(|_| SinkError::Stopped)?
                    .map_err(|_| SinkError::Stopped)
            }
        }
    }

    pub fn status(&self) -> &SinkStatus {
        &self.status
    }

    /// Records waiting in the queue.
    pub fn queue_depth(&self) -> u64 {
        self.status.queue_capacity.load(Ordering::Relaxed) - self.sender.capacity() as u64
    }
}

/// What one record adds to the audit metrics.
fn record_metrics(record: &ActionRecord, metrics: &AuditMetrics) {
    let quota_type = record
        .quota_violation
        .then(|| {
            record
                .quota_consumed
                .as_ref()
                .and_then(|facts| facts.get("quota_type"))
                .and_then(|value| value.as_str())
        })
        .flatten();
    metrics.record(AuditedAction {
        user_id: record.user_id,
        action_type: &record.action_type,
        route: &record.route,
        status: record.status_code as u16,
        success: record.success,
        seconds: record.response_time_ms / 1000.0,
        quota_violation: quota_type.or(record.quota_violation.then_some("unknown")),
    });
}

/// Owns the writer task.
#[derive(Debug)]
pub struct AuditWriter {
    sink: AuditSink,
    task: JoinHandle<()>,
}

impl AuditWriter {
    /// Starts the writer task on the current Tokio runtime.
    pub fn start(
        pool: Pool,
        spool: Spool,
        clock: Arc<dyn Clock>,
        config: WriterConfig,
    ) -> AuditWriter {
        let (sender, receiver) = mpsc::channel(config.queue_capacity);
        let status = Arc::new(SinkStatus::default());
        status
            .queue_capacity
            .store(config.queue_capacity as u64, Ordering::Relaxed);
        status.database_up.store(true, Ordering::Relaxed);
        if let Ok(files) = spool.rejected_files() {
            status.rejected_files.store(files, Ordering::Relaxed);
        }
        if let Ok(rows) = spool.count_actions() {
            status.spool_rows.store(rows, Ordering::Relaxed);
            status.spool_files.store(
                spool.pending().map_or(0, |p| p.len() as u64),
                Ordering::Relaxed,
            );
        }
        let task = Task {
            pool,
            spool,
            clock,
            sessions: SessionTracker::new(config.session_idle),
            config,
            status: Arc::clone(&status),
            receiver,
            head: HeadCache::default(),
        };
        nox_audit_metrics::set_spool_rows(status.spool_rows());
        let metrics = Arc::new(AuditMetrics::new(task.config.max_user_labels));
        AuditWriter {
            sink: AuditSink {
                sender,
                status,
                metrics,
            },
            task: tokio::spawn(task.run()),
        }
    }

    pub fn sink(&self) -> AuditSink {
        self.sink.clone()
    }

    /// Writes everything queued so far, replays the spool if the database is
    /// reachable, and stops the task.
    pub async fn shutdown(self) {
        let (done, finished) = oneshot::channel();
        if self.sink.sender.send(Message::Shutdown(done)).await.is_ok() {
            let _ = finished.await;
        }
        let _ = self.task.await;
    }
}

struct Task {
    pool: Pool,
    spool: Spool,
    clock: Arc<dyn Clock>,
    sessions: SessionTracker,
    config: WriterConfig,
    status: Arc<SinkStatus>,
    receiver: mpsc::Receiver<Message>,
    head: HeadCache,
}

impl Task {
    async fn run(mut self) {
        ensure_partitions(&self.pool, self.clock.now()).await;
        let mut tick = tokio::time::interval(self.config.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_partition_check = self.clock.now();
        loop {
            let first = tokio::select! {
                message = self.receiver.recv() => message,
                _ = tick.tick() => {
                    self.sessions.end_idle(self.clock.now());
                    self.write_batch(Vec::new()).await;
                    self.replay_spool().await;
                    let now = self.clock.now();
                    if now - last_partition_check > Duration::hours(1) {
                        ensure_partitions(&self.pool, now).await;
                        last_partition_check = now;
                    }
                    continue;
                }
            };
            let Some(first) = first else { break };
            if !self.config.linger.is_zero()
                && matches!(first, Message::Record(..))
                && self.receiver.len() + 1 < self.config.max_batch
            {
                tokio::time::sleep(self.config.linger).await;
            }
            let mut batch = Vec::with_capacity(self.config.max_batch);
            let mut shutdown = None;
            match first {
                Message::Record(record, ack) => batch.push((record, ack)),
                Message::Shutdown(done) => shutdown = Some(done),
            }
            while shutdown.is_none() && batch.len() < self.config.max_batch {
                match self.receiver.try_recv() {
                    Ok(Message::Record(record, ack)) => batch.push((record, ack)),
                    Ok(Message::Shutdown(done)) => shutdown = Some(done),
                    Err(_) => break,
                }
            }
            self.write_batch(batch).await;
            if let Some(done) = shutdown {
                // Records queued after the shutdown request (a dropped
                // request's, a full queue's late sender) are written too.
                self.receiver.close();
                let mut late = Vec::new();
                while let Some(message) = self.receiver.recv().await {
                    match message {
                        Message::Record(record, ack) => late.push((record, ack)),
                        Message::Shutdown(other) => drop(other.send(())),
                    }
                    if late.len() == self.config.max_batch {
                        self.write_batch(std::mem::take(&mut late)).await;
                    }
                }
                self.write_batch(late).await;
                self.sessions.end_idle(self.clock.now());
                self.write_batch(Vec::new()).await;
                self.replay_spool().await;
                let _ = done.send(());
                break;
            }
        }
    }

    /// Writes one batch (and any changed sessions) to the database, or else
    /// to the spool, and answers every waiting sender.
    async fn write_batch(&mut self, batch: Vec<(Box<ActionRecord>, Option<Ack>)>) {
        let mut records = Vec::with_capacity(batch.len());
        let mut acks = Vec::new();
        for (mut record, ack) in batch {
            self.sessions.assign(&mut record);
            records.push(*record);
            acks.extend(ack);
        }
        let sessions = self.sessions.take_changes();
        if records.is_empty() && sessions.is_empty() {
            return;
        }
        let opened = self.sessions.opened();
        let before = self.status.sessions_opened.swap(opened, Ordering::Relaxed);
        nox_audit_metrics::record_sessions_opened(opened.saturating_sub(before));
        nox_audit_metrics::set_queue_depth(self.receiver.len());
        let started = std::time::Instant::now();
        let target = if self.config.chained {
            InsertTarget::Direct
        } else {
            InsertTarget::Unchained
        };
        let result = match self
            .insert_separating_refused(&sessions, &records, target)
            .await
        {
            Ok(refused) => {
                nox_audit_metrics::record_batch_written(
                    records.len(),
                    started.elapsed().as_secs_f64(),
                );
                self.status.database_up.store(true, Ordering::Relaxed);
                self.status.down.store(false, Ordering::Relaxed);
                self.status
                    .rows_written
                    .fetch_add(records.len() as u64, Ordering::Relaxed);
                *self
                    .status
                    .last_write_at
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(OffsetDateTime::now_utc());
                self.keep_rejected(refused, false).await
            }
            Err(error) => {
                nox_audit_metrics::record_write_failure();
                tracing::warn!(%error, rows = records.len(), "audit batch not written to the database; spooling it");
                self.status.database_up.store(false, Ordering::Relaxed);
                self.status.set_error(Some(format!("database: {error}")));
                // Nobody waits for a buffered record, so no request can fail
                // in its place: if the spool refuses it too, it is lost.
                let unanswered = records.len().saturating_sub(acks.len());
                let spooled = self.spool_batch(sessions, records).await;
                if spooled.is_err() && unanswered > 0 {
                    tracing::error!(
                        rows = unanswered,
                        "audit records lost: neither the database nor the spool took them"
                    );
                    nox_audit_metrics::record_dropped(unanswered);
                }
                spooled
            }
        };
        for ack in acks {
            let _ = ack.send(match &result {
                Ok(()) => Ok(()),
                Err(()) => Err(SinkError::Unavailable),
            });
        }
    }

    async fn spool_batch(
        &mut self,
        sessions: Vec<SessionRow>,
        records: Vec<ActionRecord>,
    ) -> Result<(), ()> {
        let spool = self.spool.clone();
        let count = records.len() as u64;
        let kept_sessions = sessions.clone();
        let written = tokio::task::spawn_blocking(move || spool.append(&sessions, &records)).await;
        match written {
            Ok(Ok(path)) => {
                tracing::info!(file = %path.display(), rows = count, "audit batch spooled");
                self.status.down.store(false, Ordering::Relaxed);
                self.status.spool_rows.fetch_add(count, Ordering::Relaxed);
                self.status.spool_files.fetch_add(1, Ordering::Relaxed);
                nox_audit_metrics::set_spool_rows(self.status.spool_rows());
                Ok(())
            }
            Ok(Err(error)) => {
                tracing::error!(%error, rows = count, "audit batch could not be spooled either");
                self.fail_both(kept_sessions, format!("spool: {error}"));
                Err(())
            }
            Err(error) => {
                tracing::error!(%error, "the spool task failed");
                self.fail_both(kept_sessions, format!("spool: {error}"));
                Err(())
            }
        }
    }

    fn fail_both(&mut self, sessions: Vec<SessionRow>, error: String) {
        self.status.down.store(true, Ordering::Relaxed);
        self.status.set_error(Some(error));
        // The records were refused (their requests fail); keep the sessions.
        self.sessions.restore_changes(sessions);
    }

    /// Replays spool files, oldest first, until the database fails. A file
    /// that cannot be read, and rows refused even in minimal form, go to
    /// `rejected/`: neither blocks the files after it.
    async fn replay_spool(&mut self) {
        let Ok(files) = self.spool.pending() else {
            return;
        };
        for path in files {
            let read_path = path.clone();
            let batch = match tokio::task::spawn_blocking(move || Spool::read(&read_path)).await {
                Ok(Ok(mut batch)) => {
                    // Files spooled by an older version may hold values
                    // PostgreSQL refuses.
                    batch
                        .actions
                        .iter_mut()
                        .for_each(ActionRecord::make_storable);
                    batch
                }
                Ok(Err(error)) => {
                    tracing::error!(file = %path.display(), %error, "unreadable spool file moved to rejected/");
                    self.status
                        .set_error(Some(format!("spool file {}: {error}", path.display())));
                    if self.spool.reject_file(&path).is_ok() {
                        self.status.rejected_files.fetch_add(1, Ordering::Relaxed);
                        self.status
                            .spool_files
                            .fetch_sub(1.min(self.status.spool_files()), Ordering::Relaxed);
                        // Its rows are unknown: counted as one, so the alert fires.
                        nox_audit_metrics::record_rows_rejected(1);
                    }
                    continue;
                }
                Err(_) => return,
            };
            let written = self
                .insert_separating_refused(
                    &batch.sessions,
                    &batch.actions,
                    InsertTarget::Idempotent,
                )
                .await;
            match written {
                Ok(refused) => {
                    if self.keep_rejected(refused, true).await.is_err() {
                        return;
                    }
                    if let Err(error) = self.spool.remove(&path) {
                        tracing::error!(file = %path.display(), %error, "replayed spool file could not be removed");
                        return;
                    }
                    let rows = batch.actions.len() as u64;
                    tracing::info!(file = %path.display(), rows, "audit spool file replayed");
                    self.status.database_up.store(true, Ordering::Relaxed);
                    self.status.rows_written.fetch_add(rows, Ordering::Relaxed);
                    nox_audit_metrics::record_rows_replayed(rows as usize);
                    self.status
                        .spool_rows
                        .fetch_sub(rows.min(self.status.spool_rows()), Ordering::Relaxed);
                    self.status
                        .spool_files
                        .fetch_sub(1.min(self.status.spool_files()), Ordering::Relaxed);
                    nox_audit_metrics::set_spool_rows(self.status.spool_rows());
                }
                Err(error) => {
                    tracing::debug!(%error, "spool replay postponed: the database is still unreachable");
                    return;
                }
            }
        }
    }

    /// Writes a batch; when PostgreSQL refuses it for its content (one bad
    /// value would fail every row with it), writes the sessions alone and
    /// the rows in ever smaller parts, each refused row in its minimal form
    /// ([`ActionRecord::minimal`]), in the batch's order. Errors only when
    /// the database itself fails (the caller spools the whole batch; a
    /// replay skips what was written). Returns what was refused.
    async fn insert_separating_refused(
        &mut self,
        sessions: &[SessionRow],
        records: &[ActionRecord],
        target: InsertTarget,
    ) -> Result<Refused, InsertError> {
        let error = match insert_batch(&self.pool, sessions, records, target, &mut self.head).await
        {
            Ok(()) => return Ok(Refused::default()),
            Err(error) if !error.is_content_refused() => return Err(error),
            Err(error) => error,
        };
        tracing::warn!(%error, rows = records.len(), "PostgreSQL refused an audit batch for its content; finding the rows it refuses");
        let mut refused = Refused::default();
        if !sessions.is_empty() {
            match insert_batch(&self.pool, sessions, &[], target, &mut self.head).await {
                Ok(()) => {}
                Err(error) if error.is_content_refused() => {
                    // Derived from rows already made storable: a bug if
                    // reached. The rows still go in; their sessions do not.
                    tracing::error!(%error, sessions = sessions.len(), "audit sessions refused by the database");
                }
                Err(error) => return Err(error),
            }
        }
        // Parts still to write, the next one last.
        let mut parts = vec![records];
        if records.len() > 1 {
            let (first, second) = records.split_at(records.len() / 2);
            parts = vec![second, first];
        }
        while let Some(part) = parts.pop() {
            let error = match insert_batch(&self.pool, &[], part, target, &mut self.head).await {
                Ok(()) => continue,
                Err(error) if !error.is_content_refused() => return Err(error),
                Err(error) => error,
            };
            if part.len() > 1 {
                let (first, second) = part.split_at(part.len() / 2);
                parts.push(second);
                parts.push(first);
                continue;
            }
            let minimal = part[0].minimal(error.describe());
            match insert_batch(&self.pool, &[], &[minimal], target, &mut self.head).await {
                Ok(()) => refused.reduced += 1,
                Err(error) if error.is_content_refused() => {
                    tracing::error!(%error, id = %part[0].id, "audit row refused even in minimal form");
                    refused.rejected.push(part[0].clone());
                }
                Err(error) => return Err(error),
            }
        }
        Ok(refused)
    }

    /// Counts the rows written in minimal form and keeps the rejected ones
    /// in `rejected/`; errors if they could not be kept.
    /// `replayed`: the rows come from a spool file, which stays (and is
    /// retried) if they cannot be kept; otherwise they would be lost.
    async fn keep_rejected(&mut self, refused: Refused, replayed: bool) -> Result<(), ()> {
        if refused.reduced > 0 {
            tracing::warn!(rows = refused.reduced, "audit rows written in minimal form");
            self.status
                .rows_reduced
                .fetch_add(refused.reduced as u64, Ordering::Relaxed);
            nox_audit_metrics::record_rows_reduced(refused.reduced);
        }
        if refused.rejected.is_empty() {
            return Ok(());
        }
        let rows = refused.rejected.len();
        let spool = self.spool.clone();
        let kept = tokio::task::spawn_blocking(move || spool.reject_rows(&refused.rejected)).await;
        match kept {
            Ok(Ok(path)) => {
                tracing::error!(file = %path.display(), rows, "audit rows kept in the spool's rejected/ directory");
                self.status
                    .rejected_rows
                    .fetch_add(rows as u64, Ordering::Relaxed);
                self.status.rejected_files.fetch_add(1, Ordering::Relaxed);
                self.status
                    .set_error(Some(format!("{rows} audit rows rejected by the database")));
                nox_audit_metrics::record_rows_rejected(rows);
                Ok(())
            }
            Ok(Err(error)) => {
                tracing::error!(%error, rows, replayed, "rejected audit rows could not be kept");
                if !replayed {
                    nox_audit_metrics::record_dropped(rows);
                }
                self.status
                    .set_error(Some(format!("rejected rows: {error}")));
                Err(())
            }
            Err(error) => {
                tracing::error!(%error, "the task keeping rejected rows failed");
                Err(())
            }
        }
    }
}

/// What PostgreSQL refused of a batch.
#[derive(Debug, Default)]
struct Refused {
    /// Rows written in minimal form.
    reduced: usize,
    /// Rows refused even so.
    rejected: Vec<ActionRecord>,
}

/// Creates this month's and next month's partitions.
async fn ensure_partitions(pool: &Pool, now: OffsetDateTime) {
    let result = async {
        let client = pool.get().await.map_err(|e| e.to_string())?;
        client
            .execute("SELECT audit_ensure_partitions($1, 2)", &[&now.date()])
            .await
            .map_err(|e| e.to_string())
    }
    .await;
    if let Err(error) = result {
        tracing::warn!(%error, "could not create the audit partitions (rows go to the default partition)");
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsertTarget {
    /// Every record is new.
    Direct,
    /// A replay, which may repeat rows already written: those are skipped,
    /// and only the new ones join the chain.
    Idempotent,
    /// Every record is new and none joins the chain (no `seq`; `verify`
    /// reports such rows). Only for measuring what the chain costs.
    Unchained,
}

const COLUMN_TYPES: &[Type] = &[
    Type::UUID,
    Type::TIMESTAMPTZ,
    Type::UUID,
    Type::UUID,
    Type::UUID,
    Type::VARCHAR,
    Type::TEXT,
    Type::VARCHAR,
    Type::TEXT,
    Type::TEXT,
    Type::INET,
    Type::TEXT,
    Type::INT8,
    Type::INT8,
    Type::INT2,
    Type::BOOL,
    Type::FLOAT8,
    Type::FLOAT8,
    Type::FLOAT8,
    Type::TEXT,
    Type::INT8,
    Type::INT4,
    Type::TEXT,
    Type::TEXT,
    Type::INT4,
    Type::INT8,
    Type::INT8,
    Type::BOOL,
    Type::JSONB,
    Type::JSONB,
    Type::JSONB,
    Type::TEXT,
    // The chain's columns: seq, row_hash.
    Type::INT8,
    Type::BYTEA,
];

/// [`ACTION_COLUMNS`] plus the chain's columns, quoted, in [`row_values`]'
/// and [`ActionColumns`]' order.
fn quoted_columns() -> String {
    ACTION_COLUMNS
        .iter()
        .chain(&["seq", "row_hash"])
        .map(|c| format!("\"{c}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The `COPY` statement for the rows (batches that read the head first).
static COPY_ACTIONS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "COPY audit_actions ({}) FROM STDIN BINARY",
        quoted_columns()
    )
});

/// The `INSERT` of a batch's rows as one array per column (the one-round-trip
/// path: unlike `COPY`, it needs no answer before its rows are sent).
static INSERT_ACTIONS: LazyLock<String> = LazyLock::new(|| {
    let arrays = COLUMN_TYPES
        .iter()
        .enumerate()
        .map(|(i, column_type)| format!("${}::{}[]", i + 1, column_type.name()))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "INSERT INTO audit_actions ({}) SELECT * FROM unnest({arrays})",
        quoted_columns()
    )
});

/// Moves the actions chain's head from where this writer left it, or fails
/// with [`HEAD_MOVED`] (migration 0007). Parameters: chain, expected seq and
/// hash, new seq and hash.
const ADVANCE_HEAD: &str = "SELECT audit_chain_advance($1, $2, $3, $4, $5)";

/// The SQLSTATE `audit_chain_advance` raises when another writer moved the
/// head first.
const HEAD_MOVED: &str = "NX001";

/// The largest batch written in one round trip; larger ones use `COPY`,
/// whose per-row cost is lower.
const ONE_ROUND_TRIP_MAX_ROWS: usize = 64;

/// A chain's newest `(seq, row_hash)`.
type ChainHead = (i64, [u8; 32]);

const UPSERT_SESSIONS: &str = "INSERT INTO audit_sessions
        (id, user_id, session_token_hash, client_ip, user_agent,
         started_at, last_activity, ended_at, is_active)
     SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::inet[], $5::text[],
                          $6::timestamptz[], $7::timestamptz[], $8::timestamptz[], $9::bool[])
     ON CONFLICT (id) DO UPDATE SET
        last_activity = greatest(audit_sessions.last_activity, EXCLUDED.last_activity),
        ended_at = coalesce(audit_sessions.ended_at, EXCLUDED.ended_at),
        is_active = audit_sessions.is_active AND EXCLUDED.is_active";

/// Writes sessions and records in one transaction, appending the records to
/// the actions chain in the order given.
///
/// A durable request waits for this transaction, so it is built for few
/// round trips: statements are prepared once per connection (deadpool's
/// cache); `BEGIN`, the session upsert, the head lock and the start of the
/// `COPY` travel together, and so do the end of the `COPY`, the head update
/// and `COMMIT`. Two round trips per batch (a replay adds one, to read which
/// rows exist).
pub async fn insert(
    pool: &Pool,
    sessions: &[SessionRow],
    records: &[ActionRecord],
    target: InsertTarget,
) -> Result<(), InsertError> {
    insert_reading_head(pool, sessions, records, target)
        .await
        .map(drop)
}

/// [`insert`], returning the chain head the batch left (`None` when it
/// appended no row).
async fn insert_reading_head(
    pool: &Pool,
    sessions: &[SessionRow],
    records: &[ActionRecord],
    target: InsertTarget,
) -> Result<Option<ChainHead>, InsertError> {
    let mut connection = CloseUnlessCommitted(Some(pool.get().await?));
    let head = insert_in_transaction(connection.client(), sessions, records, target).await?;
    connection.transaction_ended();
    Ok(head)
}

/// What the writer knows of the actions chain's head.
#[derive(Debug, Default)]
struct HeadCache {
    /// The head as this writer's last batch left it, if that batch surely
    /// committed.
    known: Option<ChainHead>,
    /// Until then another server is taken to be appending too, and batches
    /// read the head (each one-round-trip attempt would mostly fail).
    contended_until: Option<Instant>,
}

/// How long a head moved by another server keeps batches on the reading path.
const HEAD_CONTENDED_FOR: StdDuration = StdDuration::from_secs(10);

/// The writer's [`insert`]: given the head its previous batch left, a small
/// batch of new rows goes in one round trip, its links computed from that
/// head and the head's move guarded in the transaction; if another server
/// moved the head meanwhile, the batch is rolled back and written again the
/// reading way, which every batch then takes for [`HEAD_CONTENDED_FOR`].
/// Any failure forgets the head.
async fn insert_batch(
    pool: &Pool,
    sessions: &[SessionRow],
    records: &[ActionRecord],
    target: InsertTarget,
    cache: &mut HeadCache,
) -> Result<(), InsertError> {
    let mut known = cache.known.take();
    let one_round_trip = target == InsertTarget::Direct
        && !records.is_empty()
        && records.len() <= ONE_ROUND_TRIP_MAX_ROWS
        && cache
            .contended_until
            .is_none_or(|until| Instant::now() >= until);
    let mut written = None;
    if let Some(head) = known.filter(|_| one_round_trip) {
        match insert_after_known_head(pool, sessions, records, head).await {
            Err(error) if error.is_head_moved() => {
                tracing::debug!("another server moved the audit chain's head; reading it");
                known = None;
                cache.contended_until = Some(Instant::now() + HEAD_CONTENDED_FOR);
            }
            result => written = Some(result.map(Some)),
        }
    }
    let head = match written {
        Some(result) => result?,
        None => insert_reading_head(pool, sessions, records, target).await?,
    };
    // A batch without rows leaves the head where it was.
    cache.known = head.or(known);
    Ok(())
}

/// One round trip: `BEGIN`, the session upsert, the guarded head move, the
/// rows as arrays and `COMMIT` travel together.
async fn insert_after_known_head(
    pool: &Pool,
    sessions: &[SessionRow],
    records: &[ActionRecord],
    head: ChainHead,
) -> Result<ChainHead, InsertError> {
    let mut connection = CloseUnlessCommitted(Some(pool.get().await?));
    let client = connection.client();
    let (upsert, advance, insert) = try_join!(
        client.prepare_cached(UPSERT_SESSIONS),
        client.prepare_cached(ADVANCE_HEAD),
        client.prepare_cached(&INSERT_ACTIONS),
    )?;
    let records: Vec<&ActionRecord> = records.iter().collect();
    let links = chain_links(&records, head);
    let new_head = *links.last().expect("a batch of at least one row");
    let columns = ActionColumns::new(&records, &links);
    let (expected_hash, new_hash) = (head.1.as_slice(), new_head.1.as_slice());
    let column_params = columns.params();
    let advance_params: [&(dyn ToSql + Sync); 5] = [
        &ACTIONS_CHAIN,
        &head.0,
        &expected_hash,
        &new_head.0,
        &new_hash,
    ];
    // `biased`: polled in order, so the statements go out in this order.
    // Every reply is awaited: a failed statement makes PostgreSQL answer the
    // COMMIT with a rollback, after which the connection is idle and can go
    // back to the pool (a moved head is routine with several servers).
    let (begin, upsert, advance, insert, commit) = join!(
        biased;
        client.batch_execute("BEGIN"),
        upsert_sessions(client, &upsert, sessions),
        client.execute(&advance, &advance_params),
        client.execute(&insert, &column_params),
        client.batch_execute("COMMIT"),
    );
    if commit.is_ok() {
        connection.transaction_ended();
    }
    // The first failure in statement order is the cause; the later ones
    // only say the transaction was aborted.
    begin?;
    upsert?;
    advance?;
    insert?;
    commit?;
    Ok(new_head)
}

/// Runs [`UPSERT_SESSIONS`] for `sessions` (nothing when there are none).
async fn upsert_sessions(
    client: &deadpool_postgres::Object,
    upsert: &tokio_postgres::Statement,
    sessions: &[SessionRow],
) -> Result<u64, tokio_postgres::Error> {
    if sessions.is_empty() {
        return Ok(0);
    }
    client
        .execute(upsert, &SessionColumns::new(sessions).params())
        .await
}

/// Each record's `(seq, row_hash)` on the chain after `head`, in order.
fn chain_links(records: &[&ActionRecord], head: ChainHead) -> Vec<ChainHead> {
    let (mut seq, mut prev) = head;
    records
        .iter()
        .map(|record| {
            seq += 1;
            prev = record.canonical(seq).link(&prev);
            (seq, prev)
        })
        .collect()
}

/// A pooled connection on which [`insert`] began a transaction with a plain
/// `BEGIN` (so it can share a round trip). Dropped before its transaction
/// ended, after an error or with a cancelled future, the connection is
/// closed instead of going back to the pool mid-transaction, and PostgreSQL
/// rolls the transaction back.
struct CloseUnlessCommitted(Option<deadpool_postgres::Object>);

impl CloseUnlessCommitted {
    fn client(&self) -> &deadpool_postgres::Object {
        self.0.as_ref().expect("present until dropped")
    }

    /// The transaction ended (committed, or rolled back in answer to its
    /// `COMMIT`): the connection goes back to the pool.
    fn transaction_ended(&mut self) {
        self.0.take();
    }
}

impl Drop for CloseUnlessCommitted {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            drop(deadpool_postgres::Object::take(client));
        }
    }
}

async fn insert_in_transaction(
    client: &deadpool_postgres::Object,
    sessions: &[SessionRow],
    records: &[ActionRecord],
    target: InsertTarget,
) -> Result<Option<ChainHead>, InsertError> {
    let (upsert, lock_head, copy, set_head) = try_join!(
        client.prepare_cached(UPSERT_SESSIONS),
        client.prepare_cached(chain::LOCK_HEAD),
        client.prepare_cached(&COPY_ACTIONS),
        client.prepare_cached(chain::SET_HEAD),
    )?;
    let chained = target != InsertTarget::Unchained && !records.is_empty();
    // A replay must read which rows exist before it can start its COPY (the
    // connection runs one statement at a time and a COPY holds it).
    let copy_early = !records.is_empty() && target != InsertTarget::Idempotent;
    // `biased`: polled in order, so the requests go out in this order; the
    // COPY must be last, as the connection sends nothing else until its
    // rows, which need the head, have been written.
    let ((), _, head, early_sink) = try_join!(
        biased;
        client.batch_execute("BEGIN"),
        upsert_sessions(client, &upsert, sessions),
        async {
            if !chained {
                return Ok(None);
            }
            let row = client.query_one(&lock_head, &[&ACTIONS_CHAIN]).await?;
            Ok(Some(chain::head_of(&row)))
        },
        async {
            if !copy_early {
                return Ok(None);
            }
            client.copy_in(&copy).await.map(Some)
        },
    )?;
    let mut records: Vec<&ActionRecord> = records.iter().collect();
    if target == InsertTarget::Idempotent && !records.is_empty() {
        let ids: Vec<Uuid> = records.iter().map(|r| r.id).collect();
        let written: HashSet<Uuid> = client
            .query("SELECT id FROM audit_actions WHERE id = ANY($1)", &[&ids])
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect();
        records.retain(|r| !written.contains(&r.id));
    }
    let links = head.map(|head| chain_links(&records, head));
    let sink = match early_sink {
        Some(sink) => Some(sink),
        None if !records.is_empty() => Some(client.copy_in(&copy).await?),
        None => None,
    };
    let mut writer = pin!(sink.map(|sink| BinaryCopyInWriter::new(sink, COLUMN_TYPES)));
    if let Some(mut writer) = writer.as_mut().as_pin_mut() {
        for (i, record) in records.iter().enumerate() {
            let link = links.as_ref().map(|links| &links[i]);
            let seq = link.map(|(seq, _)| *seq);
            let hash = link.map(|(_, hash)| hash.as_slice());
            writer
                .as_mut()
                .write(&row_values(record, &seq, &hash))
                .await?;
        }
    }
    let new_head = links.as_ref().and_then(|links| links.last());
    // A failed statement makes PostgreSQL answer this COMMIT with a
    // rollback, and that statement's own future reports the error.
    try_join!(
        biased;
        async {
            match writer.as_mut().as_pin_mut() {
                Some(writer) => writer.finish().await.map(drop),
                None => Ok(()),
            }
        },
        async {
            match new_head {
                Some((seq, hash)) => client
                    .execute(&set_head, &[&ACTIONS_CHAIN, seq, &hash.as_slice()])
                    .await
                    .map(drop),
                None => Ok(()),
            }
        },
        client.batch_execute("COMMIT"),
    )?;
    Ok(new_head.copied())
}

fn row_values<'a>(
    r: &'a ActionRecord,
    seq: &'a Option<i64>,
    row_hash: &'a Option<&'a [u8]>,
) -> [&'a (dyn ToSql + Sync); 34] {
    [
        &r.id,
        &r.timestamp,
        &r.request_id,
        &r.session_id,
        &r.user_id,
        &r.endpoint,
        &r.route,
        &r.http_method,
        &r.action_type,
        &r.action_category,
        &r.client_ip,
        &r.user_agent,
        &r.request_size,
        &r.response_size,
        &r.status_code,
        &r.success,
        &r.response_time_ms,
        &r.cpu_time_ms,
        &r.memory_peak_mb,
        &r.file_path,
        &r.file_size_bytes,
        &r.files_affected,
        &r.command_type,
        &r.command_text,
        &r.exit_code,
        &r.stdout_size,
        &r.stderr_size,
        &r.quota_violation,
        &r.quota_consumed,
        &r.quota_remaining,
        &r.metadata,
        &r.error_details,
        seq,
        row_hash,
    ]
}

/// A batch's rows as the column arrays [`INSERT_ACTIONS`] unnests, in
/// [`row_values`]' order (the chain test of this path reads every column
/// back, so one out of place fails it).
struct ActionColumns<'a>(Vec<Box<dyn ToSql + Send + Sync + 'a>>);

impl<'a> ActionColumns<'a> {
    fn new(records: &[&'a ActionRecord], links: &[ChainHead]) -> Self {
        fn column<'a, T: ToSql + Send + Sync + 'a>(
            records: &[&'a ActionRecord],
            value: impl Fn(&'a ActionRecord) -> T,
        ) -> Box<dyn ToSql + Send + Sync + 'a> {
            Box::new(records.iter().map(|r| value(r)).collect::<Vec<T>>())
        }
        ActionColumns(vec![
            column(records, |r| r.id),
            column(records, |r| r.timestamp),
            column(records, |r| r.request_id),
            column(records, |r| r.session_id),
            column(records, |r| r.user_id),
            column(records, |r| r.endpoint.as_str()),
            column(records, |r| r.route.as_str()),
            column(records, |r| r.http_method.as_str()),
            column(records, |r| r.action_type.as_str()),
            column(records, |r| r.action_category.as_str()),
            column(records, |r| r.client_ip),
            column(records, |r| r.user_agent.as_deref()),
            column(records, |r| r.request_size),
            column(records, |r| r.response_size),
            column(records, |r| r.status_code),
            column(records, |r| r.success),
            column(records, |r| r.response_time_ms),
            column(records, |r| r.cpu_time_ms),
            column(records, |r| r.memory_peak_mb),
            column(records, |r| r.file_path.as_deref()),
            column(records, |r| r.file_size_bytes),
            column(records, |r| r.files_affected),
            column(records, |r| r.command_type.as_deref()),
            column(records, |r| r.command_text.as_deref()),
            column(records, |r| r.exit_code),
            column(records, |r| r.stdout_size),
            column(records, |r| r.stderr_size),
            column(records, |r| r.quota_violation),
            column(records, |r| r.quota_consumed.as_ref()),
            column(records, |r| r.quota_remaining.as_ref()),
            column(records, |r| r.metadata.as_ref()),
            column(records, |r| r.error_details.as_deref()),
            Box::new(links.iter().map(|(seq, _)| *seq).collect::<Vec<i64>>()),
            Box::new(
                links
                    .iter()
                    .map(|(_, hash)| hash.to_vec())
                    .collect::<Vec<Vec<u8>>>(),
            ),
        ])
    }

    fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.0.iter().map(|column| &**column as _).collect()
    }
}

/// The session rows as the column arrays [`UPSERT_SESSIONS`] unnests.
struct SessionColumns<'a> {
    ids: Vec<Uuid>,
    users: Vec<Uuid>,
    hashes: Vec<&'a str>,
    ips: Vec<Option<std::net::IpAddr>>,
    agents: Vec<Option<&'a str>>,
    started: Vec<OffsetDateTime>,
    last: Vec<OffsetDateTime>,
    ended: Vec<Option<OffsetDateTime>>,
    active: Vec<bool>,
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
            ended: sessions.iter().map(|s| s.ended_at).collect(),
            active: sessions.iter().map(|s| s.is_active).collect(),
        }
    }

    fn params(&self) -> [&(dyn ToSql + Sync); 9] {
        [
            &self.ids,
            &self.users,
            &self.hashes,
            &self.ips,
            &self.agents,
            &self.started,
            &self.last,
            &self.ended,
            &self.active,
        ]
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InsertError {
    #[error("no database connection: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("{0}")]
    Database(#[from] tokio_postgres::Error),
}

impl InsertError {
    /// PostgreSQL refused the values themselves (SQLSTATE classes 22 data
    /// exception, 23 integrity constraint, 54 program limit): writing the
    /// same rows again cannot succeed, unlike a lost connection.
    pub fn is_content_refused(&self) -> bool {
        match self {
            InsertError::Database(error) => error
                .code()
                .is_some_and(|code| matches!(&code.code()[..2], "22" | "23" | "54")),
            InsertError::Pool(_) => false,
        }
    }

    /// The SQLSTATE and message, for a minimal row's `write_error` (never
    /// PostgreSQL's DETAIL, which may quote the refused row).
    fn describe(&self) -> serde_json::Value {
        match self {
            InsertError::Database(error) => match error.as_db_error() {
                Some(db) => serde_json::json!({
                    "sqlstate": db.code().code(),
                    "message": db.message().chars().take(200).collect::<String>(),
                }),
                None => serde_json::json!({ "message": "database error" }),
            },
            InsertError::Pool(_) => serde_json::json!({ "message": "no connection" }),
        }
    }

    /// Another writer moved the chain head this batch was linked to.
    fn is_head_moved(&self) -> bool {
        matches!(self, InsertError::Database(error)
            if error.code().map(|code| code.code()) == Some(HEAD_MOVED))
    }
}
