//! Usage counters of the calendar UTC hour and day, per user.
//!
//! A user with an hour or day request limit is counted through leases
//! ([`crate::lease`]): blocks of requests reserved in `quota_usage` in one
//! atomic statement and spent here in memory, so servers sharing a database
//! admit together at most the limit, and exactly it while requests keep
//! coming. A user without such a limit is counted in memory only. Either
//! way the remaining counts (requests counted in memory, CPU) are flushed to
//! `quota_usage` about once a second (and at shutdown) as deltas, with the
//! lease units given back; each flush reads back the database's totals, so
//! servers see each other's counts within about a second.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use nox_audit_model::Clock;
use time::{OffsetDateTime, Time};
use uuid::Uuid;

use crate::lease::{self, Granted, Lease};
use crate::limits::{Limits, Violation};

/// How long a user's overrides are trusted before they are read again.
const OVERRIDES_TTL: Duration = Duration::from_secs(5);
/// How long a request waits for another request's lease of the same user
/// before it counts in memory (the lease itself times out sooner).
const LEASE_WAIT: Duration = Duration::from_secs(5);
/// Leases one request tries before it counts in memory (more than one only
/// when a window ends or the user is reset meanwhile).
const LEASE_ATTEMPTS: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
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
    /// The database's total as last seen (other servers' counts and every
    /// server's unspent lease units included), plus `unflushed_requests`.
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
    /// Units leased for the current windows and not spent yet (a window's
    /// end gives them back).
    lease: Option<Lease>,
    /// One lease round trip at a time per user: requests that find no units
    /// queue here, and most find the units the one before them leased.
    gate: Arc<tokio::sync::Mutex<()>>,
    /// When the database last granted nothing: requests are refused here
    /// until `EXHAUSTED_RECHECK` later.
    exhausted_at: Option<Instant>,
    /// When a lease last failed: requests count in memory until
    /// `RETRY_AFTER_FAILURE` later.
    lease_failed_at: Option<Instant>,
    /// Bumped by a reset: a lease taken before it is not installed.
    epoch: u64,
    /// The limits the last request was counted under: the flush gives the
    /// lease back when the database has nothing left under them.
    limits: Limits,
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
            lease: None,
            gate: Arc::default(),
            exhausted_at: None,
            lease_failed_at: None,
            epoch: 0,
            limits: Limits::default(),
            overrides: Limits::default(),
            overrides_read: None,
            overrides_read_started: None,
        }
    }

    /// Requests used in the current hour and day: the totals without this
    /// server's unspent units (other servers' are in, at most a block each).
    fn used(&self) -> (u64, u64) {
        let held = self.lease.map_or(0, |lease| lease.units);
        (
            self.hour.requests.saturating_sub(held),
            self.day.requests.saturating_sub(held),
        )
    }

    /// The window that refuses a request: the first one used up, or (with
    /// `tightest`) else the limited one with the least left.
    fn violation(&self, limits: &Limits, now: OffsetDateTime, tightest: bool) -> Option<Violation> {
        let (hour_used, day_used) = self.used();
        [
            (
                "req_hour",
                hour_used,
                limits.req_hour,
                Kind::Hour,
                self.hour.start,
            ),
            (
                "req_day",
                day_used,
                limits.req_day,
                Kind::Day,
                self.day.start,
            ),
        ]
        .into_iter()
        .filter_map(|(quota_type, used, limit, kind, start)| {
            limit.map(|limit| (quota_type, used, limit, kind, start))
        })
        .filter(|(_, used, limit, _, _)| tightest || used >= limit)
        .min_by_key(|(_, used, limit, _, _)| limit.saturating_sub(*used))
        .map(|(quota_type, used, limit, kind, start)| Violation {
            quota_type,
            current_usage: used,
            limit,
            retry_after_secs: Some(seconds_until(now, kind.end(start))),
        })
    }

    /// Counts a request in memory if the windows as known here allow it:
    /// exact within this server, flushed as a delta.
    fn count_in_memory(&mut self, limits: &Limits, now: OffsetDateTime) -> Result<(), Violation> {
        if let Some(violation) = self.violation(limits, now, false) {
            return Err(violation);
        }
        for window in [&mut self.hour, &mut self.day] {
            window.requests += 1;
            window.unflushed_requests += 1;
        }
        Ok(())
    }

    /// Takes the lease's unspent units out, to be given back: `out` gets
    /// their negative deltas, and the windows they were counted in here
    /// lose them at once (so [`Entry::used`] does not move).
    fn release(&mut self, user: Uuid, out: &mut Vec<Pending>) {
        let Some(lease) = self.lease.take() else {
            return;
        };
        if lease.units == 0 {
            return;
        }
        for (kind, start, window) in [
            (Kind::Hour, lease.hour_start, &mut self.hour),
            (Kind::Day, lease.day_start, &mut self.day),
        ] {
            if window.start == start {
                window.requests = window.requests.saturating_sub(lease.units);
            }
            out.push(Pending::given_back(user, kind, start, lease.units));
        }
    }
}

fn within(at: Option<Instant>, span: Duration) -> bool {
    at.is_some_and(|at| at.elapsed() < span)
}

fn within_ttl(at: Option<Instant>) -> bool {
    within(at, OVERRIDES_TTL)
}

/// Counts that still have to reach a window's row: deltas counted here,
/// or (negative requests) lease units given back.
#[derive(Debug, Clone, Copy)]
struct Pending {
    user: Uuid,
    kind: Kind,
    start: OffsetDateTime,
    requests: i64,
    cpu_ms: u64,
}

impl Pending {
    fn given_back(user: Uuid, kind: Kind, start: OffsetDateTime, units: u64) -> Pending {
        Pending {
            user,
            kind,
            start,
            requests: -(units.min(i64::MAX as u64) as i64),
            cpu_ms: 0,
        }
    }

    /// Rows are written in this order by flushes, and locked hour before
    /// day by leases: no two of them deadlock.
    fn row_order(&self) -> (Uuid, Kind, OffsetDateTime) {
        (self.user, self.kind, self.start)
    }
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

/// The counters, shared with the lease tasks, which install what they were
/// granted even when the request that asked is gone.
#[derive(Debug)]
struct Ledger {
    clock: Arc<dyn Clock>,
    users: Mutex<HashMap<Uuid, Entry>>,
    /// Counts of windows that closed before they were flushed, and lease
    /// units to give back. Locked after `users`, never before.
    closed: Mutex<Vec<Pending>>,
}

/// What a request does next about its quota.
enum Step {
    Done(Result<(), Violation>),
    /// Admitted from the lease, whose units run low: the request starts the
    /// next lease in the background, with the user's turn.
    AdmittedRefilling(LeaseRequest, tokio::sync::OwnedMutexGuard<()>),
    Lease(LeaseRequest),
}

#[derive(Debug, Clone)]
struct LeaseRequest {
    gate: Arc<tokio::sync::Mutex<()>>,
    hour_start: OffsetDateTime,
    day_start: OffsetDateTime,
    wanted: u64,
    epoch: u64,
    /// Asked by a waiting request, which takes one unit (else a refill).
    for_request: bool,
}

/// The next lease for `entry`'s windows, sized by what is left as last seen.
fn lease_request(entry: &Entry, limits: &Limits, for_request: bool) -> LeaseRequest {
    let room = lease::room(limits, entry.hour.requests, entry.day.requests);
    LeaseRequest {
        gate: Arc::clone(&entry.gate),
        hour_start: entry.hour.start,
        day_start: entry.day.start,
        wanted: lease::block_size(room.unwrap_or(u64::MAX)),
        epoch: entry.epoch,
        for_request,
    }
}

/// How a lease ended for the request that asked.
enum Outcome {
    /// Granted: one unit is the asking request's.
    Admitted,
    /// Nothing for this request (refused, failed, or the windows changed):
    /// it steps again.
    Again,
}

impl Ledger {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Entry>> {
        self.users.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn closed(&self) -> std::sync::MutexGuard<'_, Vec<Pending>> {
        self.closed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Moves windows that ended into the flush queue, with the lease's
    /// unspent units.
    fn roll(&self, entry: &mut Entry, user: Uuid, now: OffsetDateTime) {
        let (hour, day) = (Kind::Hour.start(now), Kind::Day.start(now));
        if entry.hour.start == hour && entry.day.start == day {
            return;
        }
        let mut closed = self.closed();
        entry.release(user, &mut closed);
        entry.exhausted_at = None;
        for (kind, window, start) in [
            (Kind::Hour, &mut entry.hour, hour),
            (Kind::Day, &mut entry.day, day),
        ] {
            if window.start != start {
                if window.unflushed_requests > 0 || window.unflushed_cpu_ms > 0 {
                    closed.push(Pending {
                        user,
                        kind,
                        start: window.start,
                        requests: window.unflushed_requests as i64,
                        cpu_ms: window.unflushed_cpu_ms,
                    });
                }
                *window = Window::new(start);
            }
        }
    }

    /// Admits or refuses a request from memory when it can, else says which
    /// lease to ask for.
    fn step(&self, user: Uuid, limits: &Limits) -> Step {
        let now = self.clock.now();
        let mut users = self.lock();
        let entry = users
            .entry(user)
            .or_insert_with(|| Entry::new(now, (0, 0), (0, 0)));
        self.roll(entry, user, now);
        if entry.limits != *limits {
            // Units leased under other limits (a tier or an override just
            // changed) must not outrun lower ones: they go back, and the
            // next lease is asked for under these.
            entry.release(user, &mut self.closed());
            entry.exhausted_at = None;
        }
        entry.limits = *limits;
        if limits.req_hour.is_none() && limits.req_day.is_none() {
            return Step::Done(entry.count_in_memory(limits, now));
        }
        if let Some(lease) = entry.lease.as_mut()
            && lease.spend()
        {
            if lease.wants_refill()
                && !within(entry.exhausted_at, lease::EXHAUSTED_RECHECK)
                && !within(entry.lease_failed_at, lease::RETRY_AFTER_FAILURE)
                && let Ok(turn) = Arc::clone(&entry.gate).try_lock_owned()
            {
                return Step::AdmittedRefilling(lease_request(entry, limits, false), turn);
            }
            return Step::Done(Ok(()));
        }
        if within(entry.exhausted_at, lease::EXHAUSTED_RECHECK)
            && let Some(violation) = entry.violation(limits, now, true)
        {
            return Step::Done(Err(violation));
        }
        if within(entry.lease_failed_at, lease::RETRY_AFTER_FAILURE) {
            return Step::Done(entry.count_in_memory(limits, now));
        }
        Step::Lease(lease_request(entry, limits, true))
    }

    fn count_in_memory(&self, user: Uuid, limits: &Limits) -> Result<(), Violation> {
        let now = self.clock.now();
        let mut users = self.lock();
        let entry = users
            .entry(user)
            .or_insert_with(|| Entry::new(now, (0, 0), (0, 0)));
        self.roll(entry, user, now);
        entry.count_in_memory(limits, now)
    }

    /// Puts a lease's answer in force.
    fn install(
        &self,
        user: Uuid,
        asked: &LeaseRequest,
        answer: Result<Granted, String>,
    ) -> Outcome {
        let now = self.clock.now();
        let mut users = self.lock();
        let Some(entry) = users.get_mut(&user) else {
            return Outcome::Again;
        };
        self.roll(entry, user, now);
        let granted = match answer {
            Ok(granted) => granted,
            Err(error) => {
                tracing::warn!(%error, "a quota lease failed; counting this user's requests in memory for a second");
                entry.lease_failed_at = Some(Instant::now());
                return Outcome::Again;
            }
        };
        if entry.epoch != asked.epoch {
            // Reset meanwhile: whether these units predate the reset's
            // delete is unknown, so they are neither spent nor given back.
            return Outcome::Again;
        }
        // The asking request's unit, if any.
        let taken = u64::from(asked.for_request && granted.units > 0);
        if entry.hour.start != asked.hour_start || entry.day.start != asked.day_start {
            // A window ended meanwhile: the asking request counts in the
            // old windows, the other units go back.
            let back = granted.units - taken;
            if back > 0 {
                let mut closed = self.closed();
                for (kind, start) in [(Kind::Hour, asked.hour_start), (Kind::Day, asked.day_start)]
                {
                    closed.push(Pending::given_back(user, kind, start, back));
                }
            }
            return if taken > 0 {
                Outcome::Admitted
            } else {
                Outcome::Again
            };
        }
        entry.lease_failed_at = None;
        for (window, requests, cpu_ms) in [
            (&mut entry.hour, granted.hour_requests, granted.hour_cpu_ms),
            (&mut entry.day, granted.day_requests, granted.day_cpu_ms),
        ] {
            window.requests = requests + window.unflushed_requests;
            window.cpu_ms = cpu_ms + window.unflushed_cpu_ms;
        }
        if granted.units == 0 {
            entry.exhausted_at = Some(Instant::now());
            return Outcome::Again;
        }
        entry.exhausted_at = None;
        let lease = entry.lease.get_or_insert(Lease {
            hour_start: asked.hour_start,
            day_start: asked.day_start,
            units: 0,
            block: 0,
            last_used: Instant::now(),
        });
        lease.units += granted.units - taken;
        lease.block = granted.units;
        lease.last_used = Instant::now();
        if taken > 0 {
            Outcome::Admitted
        } else {
            Outcome::Again
        }
    }
}

#[derive(Debug)]
pub struct QuotaBook {
    pool: Pool,
    /// The runtime the book was made on. Its database work runs there, so
    /// its connections never belong to an HTTP worker's runtime, which dies
    /// at shutdown before the last flush.
    runtime: tokio::runtime::Handle,
    ledger: Arc<Ledger>,
    /// Bumped by [`QuotaBook::install_overrides`]: a read that began before
    /// an override changed must not install what it read.
    overrides_generation: AtomicU64,
    /// One flush at a time: two would both send the open windows' counts.
    flushing: tokio::sync::Mutex<()>,
}

fn seconds_until(now: OffsetDateTime, at: OffsetDateTime) -> u64 {
    (at - now).whole_seconds().max(1) as u64
}

impl QuotaBook {
    pub fn new(pool: Pool, clock: Arc<dyn Clock>) -> Self {
        QuotaBook {
            pool,
            runtime: tokio::runtime::Handle::current(),
            ledger: Arc::new(Ledger {
                clock,
                users: Mutex::new(HashMap::new()),
                closed: Mutex::new(Vec::new()),
            }),
            overrides_generation: AtomicU64::new(0),
            flushing: tokio::sync::Mutex::new(()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Entry>> {
        self.ledger.lock()
    }

    fn now(&self) -> OffsetDateTime {
        self.ledger.clock.now()
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
        let now = self.now();
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
        let now = self.now();
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

    /// Counts one request if the hour and day quotas allow it. With a limit
    /// on either, across every server sharing the database: from this
    /// server's lease when it has units, else from a new lease (one round
    /// trip, shared by the user's requests arriving meanwhile). If the
    /// database cannot be reached, the request is counted in memory (exact
    /// within this server) and a warning says so.
    pub async fn try_count_request(&self, user: Uuid, limits: &Limits) -> Result<(), Violation> {
        let deadline = tokio::time::Instant::now() + LEASE_WAIT;
        for _ in 0..LEASE_ATTEMPTS {
            let asked = match self.ledger.step(user, limits) {
                Step::Done(done) => return done,
                Step::AdmittedRefilling(asked, turn) => {
                    self.refill(user, *limits, asked, turn);
                    return Ok(());
                }
                Step::Lease(asked) => asked,
            };
            let Ok(turn) =
                tokio::time::timeout_at(deadline, Arc::clone(&asked.gate).lock_owned()).await
            else {
                tracing::warn!(
                    "waited too long for a quota lease; counting this request in memory"
                );
                return self.ledger.count_in_memory(user, limits);
            };
            // The lease before this request's turn may have left units, or
            // found the quota spent. (It holds the turn: no refill here.)
            let asked = match self.ledger.step(user, limits) {
                Step::Done(done) => return done,
                Step::AdmittedRefilling(..) => return Ok(()),
                Step::Lease(asked) => asked,
            };
            if let Outcome::Admitted = self.lease(user, *limits, asked, turn).await {
                return Ok(());
            }
        }
        self.ledger.count_in_memory(user, limits)
    }

    /// Takes a lease on the book's runtime and installs it there, holding
    /// `turn` until then, so a request that is dropped meanwhile neither
    /// strands the units nor lets another lease start beside this one.
    async fn lease(
        &self,
        user: Uuid,
        limits: Limits,
        asked: LeaseRequest,
        turn: tokio::sync::OwnedMutexGuard<()>,
    ) -> Outcome {
        self.start_lease(user, limits, asked, turn)
            .await
            .unwrap_or(Outcome::Again)
    }

    /// Leases the next block in the background.
    fn refill(
        &self,
        user: Uuid,
        limits: Limits,
        asked: LeaseRequest,
        turn: tokio::sync::OwnedMutexGuard<()>,
    ) {
        drop(self.start_lease(user, limits, asked, turn));
    }

    fn start_lease(
        &self,
        user: Uuid,
        limits: Limits,
        asked: LeaseRequest,
        turn: tokio::sync::OwnedMutexGuard<()>,
    ) -> tokio::task::JoinHandle<Outcome> {
        let (pool, ledger) = (self.pool.clone(), Arc::clone(&self.ledger));
        self.runtime.spawn(async move {
            let taken = lease::take(
                pool,
                user,
                asked.hour_start,
                asked.day_start,
                limits,
                asked.wanted,
            );
            let answer = tokio::time::timeout(lease::LEASE_TIMEOUT, taken)
                .await
                .unwrap_or_else(|_| Err("the lease statement timed out".into()));
            let outcome = ledger.install(user, &asked, answer);
            drop(turn);
            outcome
        })
    }

    /// Refuses a run while the day's CPU quota is spent.
    pub fn check_cpu(&self, user: Uuid, limits: &Limits) -> Result<(), Violation> {
        let Some(limit_seconds) = limits.cpu_seconds else {
            return Ok(());
        };
        let now = self.now();
        let mut users = self.lock();
        let Some(entry) = users.get_mut(&user) else {
            return Ok(());
        };
        self.ledger.roll(entry, user, now);
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
        let now = self.now();
        let mut users = self.lock();
        if let Some(entry) = users.get_mut(&user) {
            self.ledger.roll(entry, user, now);
            for window in [&mut entry.hour, &mut entry.day] {
                window.cpu_ms += cpu_ms;
                window.unflushed_cpu_ms += cpu_ms;
            }
        }
    }

    pub fn usage(&self, user: Uuid) -> WindowUsage {
        let now = self.now();
        let mut users = self.lock();
        let (hour_start, day_start) = (Kind::Hour.start(now), Kind::Day.start(now));
        let (req_hour, req_day, cpu_ms_day) = match users.get_mut(&user) {
            Some(entry) => {
                self.ledger.roll(entry, user, now);
                let (hour, day) = entry.used();
                (hour, day, entry.day.cpu_ms)
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

    /// This server's unspent lease units in the current hour and day, over
    /// all users: part of `quota_usage`'s totals, not used yet.
    pub fn unspent_leases(&self) -> (u64, u64) {
        let now = self.now();
        let (hour_start, day_start) = (Kind::Hour.start(now), Kind::Day.start(now));
        let users = self.lock();
        users
            .values()
            .filter_map(|entry| entry.lease)
            .fold((0, 0), |(hour, day), lease| {
                (
                    hour + u64::from(lease.hour_start == hour_start) * lease.units,
                    day + u64::from(lease.day_start == day_start) * lease.units,
                )
            })
    }

    /// Writes the counts not yet in the database and gives back unspent
    /// lease units that another server may need (the database has nothing
    /// left for their user) or that were not spent for `LEASE_IDLE`; reads
    /// back the totals (which include other servers' counts).
    pub async fn flush(&self) -> Result<(), String> {
        let _one_at_a_time = self.flushing.lock().await;
        self.give_back_where_nothing_is_left().await?;
        self.flush_releasing(lease::LEASE_IDLE).await
    }

    /// [`QuotaBook::flush`], giving back every unspent unit: at shutdown,
    /// once no request is served any more.
    pub async fn flush_and_release(&self) -> Result<(), String> {
        let _one_at_a_time = self.flushing.lock().await;
        // Leases under way (refills) are installed first.
        let gates: Vec<_> = self
            .lock()
            .values()
            .map(|entry| Arc::clone(&entry.gate))
            .collect();
        for gate in gates {
            let _turn = gate.lock().await;
        }
        self.flush_releasing(Duration::ZERO).await
    }

    /// Reads the totals of the users this server holds unspent units for
    /// (one statement), and releases the units of those with nothing left:
    /// requests to other servers are refused until they are back.
    async fn give_back_where_nothing_is_left(&self) -> Result<(), String> {
        let now = self.now();
        let (hour, day) = (Kind::Hour.start(now), Kind::Day.start(now));
        let holding: Vec<Uuid> = self
            .lock()
            .iter()
            .filter(|(_, entry)| {
                entry.lease.is_some_and(|lease| {
                    lease.units > 0 && lease.hour_start == hour && lease.day_start == day
                })
            })
            .map(|(user, _)| *user)
            .collect();
        if holding.is_empty() {
            return Ok(());
        }
        let pool = self.pool.clone();
        let totals = self
            .on_own_runtime(read_totals(pool, holding, hour, day))
            .await?;
        let mut users = self.lock();
        let mut closed = self.ledger.closed();
        for (user, (hour_requests, day_requests)) in totals {
            if let Some(entry) = users.get_mut(&user)
                && entry.hour.start == hour
                && entry.day.start == day
                && lease::must_give_back(&entry.limits, hour_requests, day_requests)
            {
                entry.release(user, &mut closed);
            }
        }
        Ok(())
    }

    async fn flush_releasing(&self, idle: Duration) -> Result<(), String> {
        let now = self.now();
        // Closed windows and returned units leave the book now (and come
        // back if the write fails); open windows' counts are a snapshot,
        // subtracted once written.
        let mut moved = Vec::new();
        let mut open = Vec::new();
        {
            let mut users = self.lock();
            for (user, entry) in users.iter_mut() {
                self.ledger.roll(entry, *user, now);
                if entry.lease.is_some_and(|lease| lease.is_idle(idle)) {
                    entry.release(*user, &mut moved);
                }
                for (kind, window) in [(Kind::Hour, &entry.hour), (Kind::Day, &entry.day)] {
                    if window.unflushed_requests > 0 || window.unflushed_cpu_ms > 0 {
                        open.push(Pending {
                            user: *user,
                            kind,
                            start: window.start,
                            requests: window.unflushed_requests as i64,
                            cpu_ms: window.unflushed_cpu_ms,
                        });
                    }
                }
            }
            moved.append(&mut self.ledger.closed());
        }
        if moved.is_empty() && open.is_empty() {
            return Ok(());
        }
        // In row order; a row's moved counts before its open ones, so the
        // totals read back for an open window include them.
        let mut pending: Vec<(bool, Pending)> = moved
            .iter()
            .map(|p| (false, *p))
            .chain(open.iter().map(|p| (true, *p)))
            .collect();
        pending.sort_by_key(|(is_open, p)| (p.row_order(), *is_open));
        let rows: Vec<Pending> = pending.iter().map(|(_, p)| *p).collect();
        let totals = match self.write(&rows).await {
            Ok(totals) => totals,
            Err(error) => {
                self.ledger.closed().extend(moved);
                return Err(error);
            }
        };
        let mut users = self.lock();
        for ((is_open, sent), (total_requests, total_cpu)) in pending.iter().zip(totals) {
            if !is_open {
                continue;
            }
            let Some(entry) = users.get_mut(&sent.user) else {
                continue;
            };
            let leasing = entry.lease.is_some();
            let window = if sent.kind == Kind::Hour {
                &mut entry.hour
            } else {
                &mut entry.day
            };
            if window.start != sent.start {
                continue;
            }
            let sent_requests = sent.requests.max(0) as u64;
            window.unflushed_requests -= sent_requests.min(window.unflushed_requests);
            window.unflushed_cpu_ms -= sent.cpu_ms.min(window.unflushed_cpu_ms);
            // The database's total plus what arrived since the snapshot. A
            // leasing user's request total comes from its leases, whose
            // answers may be newer than this one.
            if sent_requests > 0 || !leasing {
                window.requests = total_requests + window.unflushed_requests;
            }
            window.cpu_ms = total_cpu + window.unflushed_cpu_ms;
        }
        Ok(())
    }

    /// Clears the user's current windows, here and in the database. Units
    /// another server holds at that moment (a block at most, for a second at
    /// most) may still be spent there.
    pub async fn reset(&self, user: Uuid) -> Result<(), String> {
        let now = self.now();
        let pool = self.pool.clone();
        let (hour, day) = (Kind::Hour.start(now), Kind::Day.start(now));
        self.on_own_runtime(async move {
            let mut client = pool.get().await.map_err(|e| e.to_string())?;
            let tx = client.transaction().await.map_err(|e| e.to_string())?;
            // Locked hour before day, as leases lock them.
            let rows = "user_id = $1 AND
                ((window_kind = 'hour' AND window_start = $2) OR (window_kind = 'day' AND window_start = $3))";
            tx.execute(
                &format!("SELECT 1 FROM quota_usage WHERE {rows} ORDER BY window_kind DESC FOR UPDATE"),
                &[&user, &hour, &day],
            )
            .await
            .map_err(|e| e.to_string())?;
            tx.execute(
                &format!("DELETE FROM quota_usage WHERE {rows}"),
                &[&user, &hour, &day],
            )
            .await
            .map_err(|e| e.to_string())?;
            tx.commit().await.map_err(|e| e.to_string())?;
            Ok(())
        })
        .await?;
        let mut users = self.lock();
        if let Some(entry) = users.get_mut(&user) {
            entry.hour = Window::new(hour);
            entry.day = Window::new(day);
            entry.lease = None;
            entry.exhausted_at = None;
            entry.epoch += 1;
            // Counts queued for the cleared rows would land in new ones.
            self.ledger.closed().retain(|p| {
                p.user != user
                    || !((p.kind == Kind::Hour && p.start == hour)
                        || (p.kind == Kind::Day && p.start == day))
            });
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
            // A raised limit may leave room: ask the database again.
            entry.exhausted_at = None;
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

/// The requests totals of `users`' current windows, per user (hour, day).
async fn read_totals(
    pool: Pool,
    users: Vec<Uuid>,
    hour_start: OffsetDateTime,
    day_start: OffsetDateTime,
) -> Result<HashMap<Uuid, (u64, u64)>, String> {
    let client = pool.get().await.map_err(|e| e.to_string())?;
    let rows = client
        .query(
            "SELECT user_id, window_kind, requests FROM quota_usage
              WHERE user_id = ANY($1) AND ((window_kind = 'hour' AND window_start = $2)
                                        OR (window_kind = 'day' AND window_start = $3))",
            &[&users, &hour_start, &day_start],
        )
        .await
        .map_err(|e| e.to_string())?;
    let mut totals: HashMap<Uuid, (u64, u64)> = HashMap::new();
    for row in rows {
        let requests = row.get::<_, i64>(2).max(0) as u64;
        let user_totals = totals.entry(row.get(0)).or_default();
        if row.get::<_, String>(1) == "hour" {
            user_totals.0 = requests;
        } else {
            user_totals.1 = requests;
        }
    }
    Ok(totals)
}

async fn write(pool: Pool, pending: Vec<Pending>) -> Result<Vec<(u64, u64)>, String> {
    let mut client = pool.get().await.map_err(|e| e.to_string())?;
    let tx = client.transaction().await.map_err(|e| e.to_string())?;
    // Given-back units never take a row below zero (a reset may have
    // cleared it meanwhile).
    let statement = tx
        .prepare_cached(
            "INSERT INTO quota_usage (user_id, window_kind, window_start, requests, cpu_ms)
                 VALUES ($1, $2, $3, greatest($4::bigint, 0), $5)
                 ON CONFLICT (user_id, window_kind, window_start) DO UPDATE SET
                    requests = greatest(quota_usage.requests + $4::bigint, 0),
                    cpu_ms = quota_usage.cpu_ms + EXCLUDED.cpu_ms
                 RETURNING requests, cpu_ms",
        )
        .await
        .map_err(|e| e.to_string())?;
    let mut totals = Vec::with_capacity(pending.len());
    for p in &pending {
        let row = tx
            .query_one(
                &statement,
                &[
                    &p.user,
                    &p.kind.name(),
                    &p.start,
                    &p.requests,
                    &(p.cpu_ms.min(i64::MAX as u64) as i64),
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
