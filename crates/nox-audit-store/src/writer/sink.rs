//! The sending side of the writer: [`AuditSink`], what it reports
//! ([`SinkStatus`]) and how the writer is set up ([`AuditMode`],
//! [`WriterConfig`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration as StdDuration;

use time::{Duration, OffsetDateTime};
use tokio::sync::{mpsc, oneshot};

use nox_audit_metrics::{AuditMetrics, AuditedAction};
use nox_audit_model::ActionRecord;

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
    pub(super) queue_capacity: AtomicU64,
    pub(super) database_up: AtomicBool,
    /// Set while neither the database nor the spool can take records.
    pub(super) down: AtomicBool,
    pub(super) rows_written: AtomicU64,
    pub(super) spool_rows: AtomicU64,
    pub(super) spool_files: AtomicU64,
    pub(super) sessions_opened: AtomicU64,
    pub(super) rows_reduced: AtomicU64,
    pub(super) rejected_rows: AtomicU64,
    pub(super) rejected_files: AtomicU64,
    pub(super) last_write_at: Mutex<Option<OffsetDateTime>>,
    pub(super) last_error: Mutex<Option<String>>,
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
    pub(super) fn set_error(&self, error: Option<String>) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = error;
    }
}

pub(super) type Ack = oneshot::Sender<Result<(), SinkError>>;

#[derive(Debug)]
pub(super) enum Message {
    Record(Box<ActionRecord>, Option<Ack>),
    /// Drain everything queued before it, replay the spool, stop.
    Shutdown(oneshot::Sender<()>),
}

/// The sending side; cheap to clone, one per worker is fine.
#[derive(Debug, Clone)]
pub struct AuditSink {
    pub(super) sender: mpsc::Sender<Message>,
    pub(super) status: Arc<SinkStatus>,
    pub(super) metrics: Arc<AuditMetrics>,
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
