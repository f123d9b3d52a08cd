//! Usage counters of the calendar UTC hour and day, per user.
//!
//! Checks and increments happen together under one lock, so within a
//! server they are exact: N concurrent requests against R remaining admit
//! exactly R. Counters live in memory and are flushed to `quota_usage` about
//! once a second (and at shutdown) as deltas; each flush reads back the
//! database's totals, so servers sharing a database see each other's counts
//! within about a second.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use nox_audit_model::Clock;
use time::{OffsetDateTime, Time};
use uuid::Uuid;

use crate::limits::{Limits, Violation};

/// How long a user's overrides are trusted before they are read again.
const OVERRIDES_TTL: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Hour,
    Day,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Hour => "hour",
            Kind::Day => "day",
        }
    }

    fn start(self, now: OffsetDateTime) -> OffsetDateTime {
        let now = now.to_offset(time::UtcOffset::UTC);
        match self {
            Kind::Hour => {
                now.replace_time(Time::from_hms(now.hour(), 0, 0).unwrap_or(Time::MIDNIGHT))
            }
            Kind::Day => now.replace_time(Time::MIDNIGHT),
        }
    }

    fn end(self, start: OffsetDateTime) -> OffsetDateTime {
        match self {
            Kind::Hour => start + time::Duration::HOUR,
            Kind::Day => start + time::Duration::DAY,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Window {
    start: OffsetDateTime,
    requests: u64,
    cpu_ms: u64,
    unflushed_requests: u64,
    unflushed_cpu_ms: u64,
}

impl Window {
    fn new(start: OffsetDateTime) -> Window {
        Window {
            start,
            requests: 0,
            cpu_ms: 0,
            unflushed_requests: 0,
            unflushed_cpu_ms: 0,
        }
    }
}

#[derive(Debug)]
struct Entry {
    hour: Window,
    day: Window,
    overrides: Limits,
    /// When `overrides` were read; `None`: never, or to be read again.
    overrides_read: Option<Instant>,
    /// When a request began reading them again. One request at a time
    /// does; the others use the current ones meanwhile, instead of each
    /// waiting for a read of its own (a busy user would otherwise send a
    /// burst of reads to the database every `OVERRIDES_TTL`).
    overrides_read_started: Option<Instant>,
}

impl Entry {
    fn new(now: OffsetDateTime, hour_counts: (u64, u64), day_counts: (u64, u64)) -> Self {
        Entry {
            hour: Window {
                requests: hour_counts.0,
                cpu_ms: hour_counts.1,
                ..Window::new(Kind::Hour.start(now))
            },
            day: Window {
                requests: day_counts.0,
                cpu_ms: day_counts.1,
                ..Window::new(Kind::Day.start(now))
            },
            overrides: Limits::default(),
            overrides_read: None,
            overrides_read_started: None,
        }
    }
}

fn within_ttl(at: Option<Instant>) -> bool {
    at.is_some_and(|at| at.elapsed() < OVERRIDES_TTL)
}

/// A window's counts that still have to reach the database.
#[derive(Debug, Clone, Copy)]
struct Pending {
    user: Uuid,
    kind: Kind,
    start: OffsetDateTime,
    requests: u64,
    cpu_ms: u64,
}

/// A user's usage of the current windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowUsage {
    pub req_hour: u64,
    pub req_day: u64,
    pub cpu_ms_day: u64,
    pub hour_resets_at: OffsetDateTime,
    pub day_resets_at: OffsetDateTime,
}

#[derive(Debug)]
pub struct QuotaBook {
    pool: Pool,
    /// The runtime the book was made on. Its database work runs there, so
    /// its connections never belong to an HTTP worker's runtime, which dies
    /// at shutdown before the last flush.
    runtime: tokio::runtime::Handle,
    clock: Arc<dyn Clock>,
    users: Mutex<HashMap<Uuid, Entry>>,
    /// Counts of windows that closed before they were flushed.
    closed: Mutex<Vec<Pending>>,
    /// Bumped by [`QuotaBook::install_overrides`]: a read that began before
    /// an override changed must not install what it read.
    overrides_generation: AtomicU64,
}

fn seconds_until(now: OffsetDateTime, at: OffsetDateTime) -> u64 {
    (at - now).whole_seconds().max(1) as u64
}

impl QuotaBook {
    pub fn new(pool: Pool, clock: Arc<dyn Clock>) -> Self {
        QuotaBook {
            pool,
            runtime: tokio::runtime::Handle::current(),
            clock,
            users: Mutex::new(HashMap::new()),
            closed: Mutex::new(Vec::new()),
            overrides_generation: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Entry>> {
        self.users.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads the user's overrides (when stale) and, on first use, the
    /// current windows' counts. If the database is unreachable, the user
    /// counts from zero in memory rather than being refused, and known
    /// overrides stay in force; the read is tried again `OVERRIDES_TTL`
    /// later.
    pub async fn load(&self, user: Uuid) {
        {
            let mut users = self.lock();
            if let Some(entry) = users.get_mut(&user) {
                if within_ttl(entry.overrides_read) || within_ttl(entry.overrides_read_started) {
                    return;
                }
                entry.overrides_read_started = Some(Instant::now());
            }
        }
        let generation = self.overrides_generation.load(Ordering::SeqCst);
        let now = self.clock.now();
        let loaded = self
            .read(user, Kind::Hour.start(now), Kind::Day.start(now))
            .await;
        let current = self.overrides_generation.load(Ordering::SeqCst) == generation;
        let mut users = self.lock();
        match loaded {
            Ok((overrides, hour_counts, day_counts)) => {
                let entry = users
                    .entry(user)
                    .or_insert_with(|| Entry::new(now, hour_counts, day_counts));
                entry.overrides_read_started = None;
                // Unless an override changed while this read was under way:
                // then they are read again by the next request.
                if current {
                    entry.overrides = overrides;
                    entry.overrides_read = Some(Instant::now());
                }
            }
            Err(error) => {
                tracing::warn!(%error, "quota state could not be read; counting in memory");
                let entry = users
                    .entry(user)
                    .or_insert_with(|| Entry::new(now, (0, 0), (0, 0)));
                // Tried again `OVERRIDES_TTL` from now, not by every request
                // meanwhile (unless an override changed).
                entry.overrides_read_started = current.then(Instant::now);
            }
        }
    }

    /// Reads the user's overrides from the database now, installs them and
    /// returns them; unlike [`QuotaBook::load`], a failure is the caller's.
    pub async fn read_overrides(&self, user: Uuid) -> Result<Limits, String> {
        let generation = self.overrides_generation.load(Ordering::SeqCst);
        let now = self.clock.now();
        let (overrides, hour_counts, day_counts) = self
            .read(user, Kind::Hour.start(now), Kind::Day.start(now))
            .await?;
        if self.overrides_generation.load(Ordering::SeqCst) == generation {
            let mut users = self.lock();
            let entry = users
                .entry(user)
                .or_insert_with(|| Entry::new(now, hour_counts, day_counts));
            entry.overrides = overrides;
            entry.overrides_read = Some(Instant::now());
            entry.overrides_read_started = None;
        }
        Ok(overrides)
    }

    /// Runs database work on the book's own runtime.
    async fn on_own_runtime<T: Send + 'static>(
        &self,
        work: impl std::future::Future<Output = Result<T, String>> + Send + 'static,
    ) -> Result<T, String> {
        self.runtime
            .spawn(work)
            .await
            .map_err(|e| format!("quota task failed: {e}"))?
    }

    async fn read(
        &self,
        user: Uuid,
        hour_start: OffsetDateTime,
        day_start: OffsetDateTime,
    ) -> Result<(Limits, (u64, u64), (u64, u64)), String> {
        let pool = self.pool.clone();
        self.on_own_runtime(read(pool, user, hour_start, day_start))
            .await
    }

    async fn write(&self, pending: &[Pending]) -> Result<Vec<(u64, u64)>, String> {
        let pool = self.pool.clone();
        self.on_own_runtime(write(pool, pending.to_vec())).await
    }

    /// The user's overrides as last read ([`QuotaBook::load`] first).
    pub fn overrides(&self, user: Uuid) -> Limits {
        self.lock()
            .get(&user)
            .map(|e| e.overrides)
            .unwrap_or_default()
    }

    /// Moves windows that ended into the flush queue.
    fn roll(&self, entry: &mut Entry, user: Uuid, now: OffsetDateTime) {
        for (kind, window) in [(Kind::Hour, &mut entry.hour), (Kind::Day, &mut entry.day)] {
            let start = kind.start(now);
            if window.start != start {
                if window.unflushed_requests > 0 || window.unflushed_cpu_ms > 0 {
                    self.closed
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(Pending {
                            user,
                            kind,
                            start: window.start,
                            requests: window.unflushed_requests,
                            cpu_ms: window.unflushed_cpu_ms,
                        });
                }
                *window = Window::new(start);
            }
        }
    }

    /// Counts one request if the hour and day quotas allow it, atomically.
    pub fn try_count_request(&self, user: Uuid, limits: &Limits) -> Result<(), Violation> {
        let now = self.clock.now();
        let mut users = self.lock();
        let entry = users
            .entry(user)
            .or_insert_with(|| Entry::new(now, (0, 0), (0, 0)));
        self.roll(entry, user, now);
        for (quota_type, window, limit, kind) in [
            ("req_hour", &entry.hour, limits.req_hour, Kind::Hour),
            ("req_day", &entry.day, limits.req_day, Kind::Day),
        ] {
            if let Some(limit) = limit
                && window.requests >= limit
            {
                return Err(Violation {
                    quota_type,
                    current_usage: window.requests,
                    limit,
                    retry_after_secs: Some(seconds_until(now, kind.end(window.start))),
                });
            }
        }
        for window in [&mut entry.hour, &mut entry.day] {
            window.requests += 1;
            window.unflushed_requests += 1;
        }
        Ok(())
    }

    /// Refuses a run while the day's CPU quota is spent.
    pub fn check_cpu(&self, user: Uuid, limits: &Limits) -> Result<(), Violation> {
        let Some(limit_seconds) = limits.cpu_seconds else {
            return Ok(());
        };
        let now = self.clock.now();
        let mut users = self.lock();
        let Some(entry) = users.get_mut(&user) else {
            return Ok(());
        };
        self.roll(entry, user, now);
        let used_seconds = entry.day.cpu_ms / 1000;
        if entry.day.cpu_ms >= limit_seconds.saturating_mul(1000) {
            return Err(Violation {
                quota_type: "cpu_seconds",
                current_usage: used_seconds,
                limit: limit_seconds,
                retry_after_secs: Some(seconds_until(now, Kind::Day.end(entry.day.start))),
            });
        }
        Ok(())
    }

    /// Charges a run's measured CPU to the day (and hour).
    pub fn charge_cpu(&self, user: Uuid, cpu_ms: u64) {
        let now = self.clock.now();
        let mut users = self.lock();
        if let Some(entry) = users.get_mut(&user) {
            self.roll(entry, user, now);
            for window in [&mut entry.hour, &mut entry.day] {
                window.cpu_ms += cpu_ms;
                window.unflushed_cpu_ms += cpu_ms;
            }
        }
    }

    pub fn usage(&self, user: Uuid) -> WindowUsage {
        let now = self.clock.now();
        let mut users = self.lock();
        let (hour_start, day_start) = (Kind::Hour.start(now), Kind::Day.start(now));
        let (req_hour, req_day, cpu_ms_day) = match users.get_mut(&user) {
            Some(entry) => {
                self.roll(entry, user, now);
                (entry.hour.requests, entry.day.requests, entry.day.cpu_ms)
            }
            None => (0, 0, 0),
        };
        WindowUsage {
            req_hour,
            req_day,
            cpu_ms_day,
            hour_resets_at: Kind::Hour.end(hour_start),
            day_resets_at: Kind::Day.end(day_start),
        }
    }

    /// Writes the counts not yet in the database, and reads back the totals
    /// (which include other servers' counts).
    pub async fn flush(&self) -> Result<(), String> {
        let mut pending =
            std::mem::take(&mut *self.closed.lock().unwrap_or_else(|p| p.into_inner()));
        {
            let users = self.lock();
            for (user, entry) in users.iter() {
                for (kind, window) in [(Kind::Hour, &entry.hour), (Kind::Day, &entry.day)] {
                    if window.unflushed_requests > 0 || window.unflushed_cpu_ms > 0 {
                        pending.push(Pending {
                            user: *user,
                            kind,
                            start: window.start,
                            requests: window.unflushed_requests,
                            cpu_ms: window.unflushed_cpu_ms,
                        });
                    }
                }
            }
        }
        if pending.is_empty() {
            return Ok(());
        }
        let result = self.write(&pending).await;
        let totals = match result {
            Ok(totals) => totals,
            Err(error) => {
                // Closed windows are retried next time; open ones still
                // hold their unflushed counts.
                let mut closed = self.closed.lock().unwrap_or_else(|p| p.into_inner());
                closed.extend(pending.into_iter().filter(|p| {
                    self.lock().get(&p.user).is_none_or(|e| {
                        let window = if p.kind == Kind::Hour {
                            &e.hour
                        } else {
                            &e.day
                        };
                        window.start != p.start
                    })
                }));
                return Err(error);
            }
        };
        let mut users = self.lock();
        for (sent, (total_requests, total_cpu)) in pending.iter().zip(totals) {
            let Some(entry) = users.get_mut(&sent.user) else {
                continue;
            };
            let window = if sent.kind == Kind::Hour {
                &mut entry.hour
            } else {
                &mut entry.day
            };
            if window.start != sent.start {
                continue;
            }
            window.unflushed_requests -= sent.requests.min(window.unflushed_requests);
            window.unflushed_cpu_ms -= sent.cpu_ms.min(window.unflushed_cpu_ms);
            // The database's total plus what arrived since the snapshot.
            window.requests = total_requests + window.unflushed_requests;
            window.cpu_ms = total_cpu + window.unflushed_cpu_ms;
        }
        Ok(())
    }

    /// Clears the user's current windows, here and in the database.
    pub async fn reset(&self, user: Uuid) -> Result<(), String> {
        let now = self.clock.now();
        let pool = self.pool.clone();
        let (hour, day) = (Kind::Hour.start(now), Kind::Day.start(now));
        self.on_own_runtime(async move {
            let client = pool.get().await.map_err(|e| e.to_string())?;
            client
                .execute(
                    "DELETE FROM quota_usage WHERE user_id = $1 AND
                        ((window_kind = 'hour' AND window_start = $2) OR (window_kind = 'day' AND window_start = $3))",
                    &[&user, &hour, &day],
                )
                .await
                .map_err(|e| e.to_string())?;
            Ok(())
        })
        .await?;
        if let Some(entry) = self.lock().get_mut(&user) {
            entry.hour = Window::new(Kind::Hour.start(now));
            entry.day = Window::new(Kind::Day.start(now));
        }
        Ok(())
    }

    /// Closes the book's connections (after the last flush), so stopping
    /// the database does not cut them off mid-flight.
    pub fn close(&self) {
        self.pool.close();
    }

    /// Puts overrides just committed to the database in force at once (a
    /// read under way, which may predate them, is not installed). Merely
    /// forgetting them would not do: requests arriving while one of them
    /// re-reads use the overrides in memory.
    pub fn install_overrides(&self, user: Uuid, overrides: Limits) {
        self.overrides_generation.fetch_add(1, Ordering::SeqCst);
        if let Some(entry) = self.lock().get_mut(&user) {
            entry.overrides = overrides;
            entry.overrides_read = Some(Instant::now());
            entry.overrides_read_started = None;
        }
    }

    /// Has every user's overrides read again at their next request (when
    /// changes may have been missed); a read under way is not installed.
    pub fn expire_overrides(&self) {
        self.overrides_generation.fetch_add(1, Ordering::SeqCst);
        for entry in self.lock().values_mut() {
            entry.overrides_read = None;
            entry.overrides_read_started = None;
        }
    }
}

async fn read(
    pool: Pool,
    user: Uuid,
    hour_start: OffsetDateTime,
    day_start: OffsetDateTime,
) -> Result<(Limits, (u64, u64), (u64, u64)), String> {
    let client = pool.get().await.map_err(|e| e.to_string())?;
    let overrides = client
        .query_opt(
            "SELECT req_hour, req_day, cpu_seconds, mem_mb, storage_mb, files_max
                 FROM user_quotas WHERE user_id = $1",
            &[&user],
        )
        .await
        .map_err(|e| e.to_string())?
        .map(|row| {
            let get = |i: usize| row.get::<_, Option<i64>>(i).map(|v| v.max(0) as u64);
            Limits {
                req_hour: get(0),
                req_day: get(1),
                cpu_seconds: get(2),
                mem_mb: get(3),
                storage_mb: get(4),
                files_max: get(5),
            }
        })
        .unwrap_or_default();
    let rows = client
        .query(
            "SELECT window_kind, requests, cpu_ms FROM quota_usage
                 WHERE user_id = $1 AND ((window_kind = 'hour' AND window_start = $2)
                                      OR (window_kind = 'day' AND window_start = $3))",
            &[&user, &hour_start, &day_start],
        )
        .await
        .map_err(|e| e.to_string())?;
    let (mut hour, mut day) = ((0, 0), (0, 0));
    for row in rows {
        let counts = (
            row.get::<_, i64>(1).max(0) as u64,
            row.get::<_, i64>(2).max(0) as u64,
        );
        if row.get::<_, String>(0) == "hour" {
            hour = counts;
        } else {
            day = counts;
        }
    }
    Ok((overrides, hour, day))
}

async fn write(pool: Pool, pending: Vec<Pending>) -> Result<Vec<(u64, u64)>, String> {
    let mut client = pool.get().await.map_err(|e| e.to_string())?;
    let tx = client.transaction().await.map_err(|e| e.to_string())?;
    let mut totals = Vec::with_capacity(pending.len());
    for p in &pending {
        let row = tx
            .query_one(
                "INSERT INTO quota_usage (user_id, window_kind, window_start, requests, cpu_ms)
                     VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (user_id, window_kind, window_start) DO UPDATE SET
                        requests = quota_usage.requests + EXCLUDED.requests,
                        cpu_ms = quota_usage.cpu_ms + EXCLUDED.cpu_ms
                     RETURNING requests, cpu_ms",
                &[
                    &p.user,
                    &p.kind.name(),
                    &p.start,
                    &(p.requests as i64),
                    &(p.cpu_ms as i64),
                ],
            )
            .await
            .map_err(|e| e.to_string())?;
        totals.push((
            row.get::<_, i64>(0).max(0) as u64,
            row.get::<_, i64>(1).max(0) as u64,
        ));
    }
    tx.commit().await.map_err(|e| e.to_string())?;
    Ok(totals)
}
