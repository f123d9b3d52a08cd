//! The writer task: batches the queue, writes each batch (or spools it),
//! replays the spool, and keeps what PostgreSQL refuses.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use deadpool_postgres::Pool;
use time::{Duration, OffsetDateTime};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use nox_audit_metrics::AuditMetrics;
use nox_audit_model::{ActionRecord, Clock};

use super::insert::{HeadCache, InsertError, InsertTarget, insert_batch};
use super::sessions::open_sessions;
use super::sink::{Ack, AuditSink, Message, SinkError, SinkStatus, WriterConfig};
use crate::rollup::{RollupTask, RollupTrigger};
use crate::sessions::{SessionRow, SessionTracker};
use crate::spool::Spool;

/// Owns the writer task.
#[derive(Debug)]
pub struct AuditWriter {
    sink: AuditSink,
    task: JoinHandle<()>,
    rollup: RollupTask,
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
        let rollup = RollupTask::start(pool.clone());
        let task = Task {
            rollup: rollup.trigger(),
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
            rollup,
        }
    }

    pub fn sink(&self) -> AuditSink {
        self.sink.clone()
    }

    /// Writes everything queued so far, replays the spool if the database is
    /// reachable, brings the rollups up to date, and stops the tasks.
    pub async fn shutdown(self) {
        let (done, finished) = oneshot::channel();
        if self.sink.sender.send(Message::Shutdown(done)).await.is_ok() {
            let _ = finished.await;
        }
        let _ = self.task.await;
        self.rollup.shutdown().await;
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
    rollup: RollupTrigger,
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
                self.replay_spool().await;
                // What the sessions' rows lag behind, replayed rows'
                // included, is written before this server goes.
                self.sessions.end_idle(self.clock.now());
                self.sessions.flush();
                self.write_batch(Vec::new()).await;
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
        for (record, ack) in batch {
            records.push(*record);
            acks.extend(ack);
        }
        let found = self.assign_sessions(&mut records).await;
        let sessions = self.sessions.take_changes();
        if records.is_empty() && sessions.is_empty() {
            return;
        }
        self.report_sessions_opened();
        nox_audit_metrics::set_queue_depth(self.receiver.len());
        let started = std::time::Instant::now();
        let target = if self.config.chained {
            InsertTarget::Direct
        } else {
            InsertTarget::Unchained
        };
        // The database that could not find the sessions takes no batch
        // either: spooled at once, the records get their sessions on replay.
        let written = match found {
            Ok(()) => {
                self.insert_separating_refused(&sessions, &records, target)
                    .await
            }
            Err(error) => Err(error),
        };
        let result = match written {
            Ok(refused) => {
                nox_audit_metrics::record_batch_written(
                    records.len(),
                    started.elapsed().as_secs_f64(),
                );
                self.rollup.rows_committed();
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

    /// Gives `records` their sessions: known ones from memory, the rest
    /// found or opened in the database in one call (see
    /// [`SessionTracker::assign_all`]). Errors when the database is
    /// unreachable; records it refuses to open a session for (a bug if
    /// reached: the values are the server's own) go without one.
    async fn assign_sessions(&mut self, records: &mut [ActionRecord]) -> Result<(), InsertError> {
        let (pool, idle) = (&self.pool, self.config.session_idle);
        let found = self
            .sessions
            .assign_all(records, |requests| open_sessions(pool, idle, requests))
            .await;
        match found {
            Err(error) if error.is_content_refused() => {
                tracing::error!(%error, "audit sessions refused by the database; the rows go without");
                Ok(())
            }
            found => found,
        }
    }

    /// Adds the sessions opened since the last report to
    /// `nox_audit_sessions_total` and the status.
    fn report_sessions_opened(&self) {
        let opened = self.sessions.opened();
        let before = self.status.sessions_opened.swap(opened, Ordering::Relaxed);
        nox_audit_metrics::record_sessions_opened(opened.saturating_sub(before));
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
            let mut batch = match tokio::task::spawn_blocking(move || Spool::read(&read_path)).await
            {
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
            // Records spooled without a session (the database was away when
            // their batch was written) get theirs now.
            if let Err(error) = self.assign_sessions(&mut batch.actions).await {
                tracing::debug!(%error, "spool replay postponed: the database is still unreachable");
                return;
            }
            self.report_sessions_opened();
            let changes = self.sessions.take_changes();
            let mut sessions = std::mem::take(&mut batch.sessions);
            sessions.extend(changes.iter().cloned());
            let written = self
                .insert_separating_refused(&sessions, &batch.actions, InsertTarget::Idempotent)
                .await;
            if written.is_err() {
                self.sessions.restore_changes(changes);
            }
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
                    self.rollup.rows_committed();
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
