//! Names, descriptions and record helpers for the audit trail's metrics
//! (`nox_audit_*`); a service's own families are its own (Nox's HTTP, run,
//! sandbox, rate-limit, shed and build families are in `nox-api`). Everything is
//! recorded through the `metrics` facade; this crate never installs a
//! recorder, so a service embedding the audit crates decides where metrics
//! go (Nox's server binary installs a Prometheus recorder).
//!
//! Labels are bounded: routes are templates (`unmatched` otherwise), and
//! user ids are capped by [`AuditMetrics`].
//!
//! [`describe`] registers the HELP text (and the series that must read 0
//! from the start); [`AuditMetrics::record`] counts one audited request
//! (`nox-audit-store`'s sink calls it for every record submitted); the
//! `record_*` and `set_*` functions are the writer's and (`*verif*`) the
//! continuous verification's. [`FAMILIES`]
//! lists every family with its type, and [`SECONDS_BUCKETS`] and
//! [`BATCH_ROWS_BUCKETS`] are the buckets Nox gives its histograms.
//!
//! ```
//! use metrics_exporter_prometheus::PrometheusBuilder;
//! use nox_audit_metrics::{AUDIT_ACTIONS_TOTAL, AuditMetrics, AuditedAction};
//!
//! // A recorder with no HTTP listener; a service would install it globally
//! // (`metrics::set_global_recorder`) and serve `handle.render()` itself.
//! let recorder = PrometheusBuilder::new().build_recorder();
//! let handle = recorder.handle();
//! metrics::with_local_recorder(&recorder, || {
//!     nox_audit_metrics::describe();
//!     // Handles resolve against the recorder in place when first used.
//!     let audit = AuditMetrics::new(100);
//!     audit.record(AuditedAction {
//!         user_id: None,
//!         action_type: "file_read",
//!         route: "/files/{name}",
//!         status: 200,
//!         success: true,
//!         seconds: 0.004,
//!         quota_violation: None,
//!     });
//! });
//!
//! let text = handle.render();
//! assert!(text.contains(&format!("# TYPE {AUDIT_ACTIONS_TOTAL} counter")));
//! let series = |status: &str| {
//!     text.lines()
//!         .find(|line| line.starts_with("nox_audit_actions_total{") && line.contains(status))
//!         .unwrap_or_else(|| panic!("no {status} series in {text}"))
//! };
//! let success = series(r#"status="success""#);
//! assert!(success.contains(r#"user_id="anonymous""#), "{success}");
//! assert!(success.contains(r#"action_type="file_read""#), "{success}");
//! assert!(success.ends_with(" 1"), "{success}");
//! // Both outcomes' series exist once an action type is seen.
//! assert!(series(r#"status="error""#).ends_with(" 0"));
//! // The dropped counter exists, at 0, before anything is dropped.
//! assert!(text.contains("nox_audit_dropped_total 0"));
//! ```

use std::collections::HashMap;
use std::sync::Mutex;

use metrics::{
    Counter, Histogram, Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge,
    histogram,
};
use uuid::Uuid;

pub const AUDIT_ACTIONS_TOTAL: &str = "nox_audit_actions_total";
pub const AUDIT_RESPONSE_TIME_SECONDS: &str = "nox_audit_response_time_seconds";
pub const AUDIT_ERRORS_TOTAL: &str = "nox_audit_errors_total";
pub const AUDIT_QUOTA_VIOLATIONS_TOTAL: &str = "nox_audit_quota_violations_total";
pub const AUDIT_SESSIONS_TOTAL: &str = "nox_audit_sessions_total";
pub const AUDIT_QUEUE_DEPTH: &str = "nox_audit_queue_depth";
pub const AUDIT_ROWS_WRITTEN_TOTAL: &str = "nox_audit_rows_written_total";
pub const AUDIT_WRITE_BATCH_ROWS: &str = "nox_audit_write_batch_rows";
pub const AUDIT_WRITE_DURATION_SECONDS: &str = "nox_audit_write_duration_seconds";
pub const AUDIT_WRITE_FAILURES_TOTAL: &str = "nox_audit_write_failures_total";
pub const AUDIT_SPOOL_ROWS: &str = "nox_audit_spool_rows";
pub const AUDIT_DROPPED_TOTAL: &str = "nox_audit_dropped_total";
pub const AUDIT_ROWS_REDUCED_TOTAL: &str = "nox_audit_rows_reduced_total";
pub const AUDIT_REJECTED_TOTAL: &str = "nox_audit_rejected_total";
pub const AUDIT_VERIFY_RUNS_TOTAL: &str = "nox_audit_verify_runs_total";
pub const AUDIT_VERIFY_FAILURES_TOTAL: &str = "nox_audit_verify_failures_total";
pub const AUDIT_VERIFY_LAST_SUCCESS: &str = "nox_audit_verify_last_success_timestamp_seconds";
pub const AUDIT_VERIFY_INTERVAL: &str = "nox_audit_verify_interval_seconds";
pub const AUDIT_STREAMS_OPEN: &str = "nox_audit_streams_open";
pub const AUDIT_STREAM_LAGGED_TOTAL: &str = "nox_audit_stream_lagged_total";
pub const AUDIT_READ_FALLBACK_TOTAL: &str = "nox_audit_read_fallback_total";
pub const AUDIT_ROLLUP_LAG_SECONDS: &str = "nox_audit_rollup_lag_seconds";

/// Every audit family, with its type. (A service exports its own families
/// beside these: Nox's are in `nox_api::metrics`.)
pub const FAMILIES: &[(&str, &str)] = &[
    (AUDIT_ACTIONS_TOTAL, "counter"),
    (AUDIT_RESPONSE_TIME_SECONDS, "histogram"),
    (AUDIT_ERRORS_TOTAL, "counter"),
    (AUDIT_QUOTA_VIOLATIONS_TOTAL, "counter"),
    (AUDIT_SESSIONS_TOTAL, "counter"),
    (AUDIT_QUEUE_DEPTH, "gauge"),
    (AUDIT_ROWS_WRITTEN_TOTAL, "counter"),
    (AUDIT_WRITE_BATCH_ROWS, "histogram"),
    (AUDIT_WRITE_DURATION_SECONDS, "histogram"),
    (AUDIT_WRITE_FAILURES_TOTAL, "counter"),
    (AUDIT_SPOOL_ROWS, "gauge"),
    (AUDIT_DROPPED_TOTAL, "counter"),
    (AUDIT_ROWS_REDUCED_TOTAL, "counter"),
    (AUDIT_REJECTED_TOTAL, "counter"),
    (AUDIT_VERIFY_RUNS_TOTAL, "counter"),
    (AUDIT_VERIFY_FAILURES_TOTAL, "counter"),
    (AUDIT_VERIFY_LAST_SUCCESS, "gauge"),
    (AUDIT_VERIFY_INTERVAL, "gauge"),
    (AUDIT_STREAMS_OPEN, "gauge"),
    (AUDIT_STREAM_LAGGED_TOTAL, "counter"),
    (AUDIT_READ_FALLBACK_TOTAL, "counter"),
    (AUDIT_ROLLUP_LAG_SECONDS, "gauge"),
];

/// The outcomes `nox_audit_verify_runs_total` counts passes by.
pub const VERIFY_OUTCOMES: [&str; 4] = ["ok", "failed", "error", "skipped"];

/// Buckets for durations in seconds (audit writes; Nox uses them for HTTP and
/// runs too).
pub const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0,
];
/// Buckets for rows per audit batch.
pub const BATCH_ROWS_BUCKETS: &[f64] =
    &[1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0];

/// Registers HELP text for every family, and the series that must exist
/// before anything happens (the dropped counter, which stays 0 by design).
pub fn describe() {
    describe_counter!(
        AUDIT_ACTIONS_TOTAL,
        "Audited requests by user (bounded), action type and outcome."
    );
    describe_histogram!(
        AUDIT_RESPONSE_TIME_SECONDS,
        Unit::Seconds,
        "Response time of audited requests by route template."
    );
    describe_counter!(
        AUDIT_ERRORS_TOTAL,
        "Audited requests answered with a status of 400 or more."
    );
    describe_counter!(
        AUDIT_QUOTA_VIOLATIONS_TOTAL,
        "Audited quota and rate-limit refusals by user (bounded) and quota type."
    );
    describe_counter!(
        AUDIT_SESSIONS_TOTAL,
        "Audit sessions this server opened (found open by another server: not counted)."
    );
    describe_gauge!(AUDIT_QUEUE_DEPTH, "Audit records waiting for the writer.");
    describe_counter!(
        AUDIT_ROWS_WRITTEN_TOTAL,
        "Audit rows committed to the database (replays included)."
    );
    describe_histogram!(AUDIT_WRITE_BATCH_ROWS, "Rows per audit batch written.");
    describe_histogram!(
        AUDIT_WRITE_DURATION_SECONDS,
        Unit::Seconds,
        "Time to write one audit batch."
    );
    describe_counter!(
        AUDIT_WRITE_FAILURES_TOTAL,
        "Audit batches the database refused (they went to the spool)."
    );
    describe_gauge!(
        AUDIT_SPOOL_ROWS,
        "Audit rows waiting in the spool for the database."
    );
    describe_counter!(
        AUDIT_ROWS_REDUCED_TOTAL,
        "Audit rows the database refused for their content, written in their minimal form."
    );
    describe_counter!(
        AUDIT_REJECTED_TOTAL,
        "Audit rows that could not be written even in minimal form (kept in audit-spool/rejected/)."
    );
    describe_counter!(
        AUDIT_DROPPED_TOTAL,
        "Audit records lost: buffered records neither the database nor the spool could take. Must stay 0."
    );
    describe_counter!(
        AUDIT_VERIFY_RUNS_TOTAL,
        "Continuous verification passes by outcome: ok, failed (a chain does not verify), error, skipped (another server held the lock)."
    );
    describe_counter!(
        AUDIT_VERIFY_FAILURES_TOTAL,
        "Continuous verification passes that found the chain broken, by chain."
    );
    describe_gauge!(
        AUDIT_VERIFY_LAST_SUCCESS,
        Unit::Seconds,
        "Unix time when every chain last verified, whichever server verified it (0: not yet)."
    );
    describe_gauge!(
        AUDIT_VERIFY_INTERVAL,
        Unit::Seconds,
        "Seconds between this server's verification passes (absent when it does not verify)."
    );
    describe_gauge!(AUDIT_STREAMS_OPEN, "Live audit streams open.");
    describe_gauge!(
        AUDIT_ROLLUP_LAG_SECONDS,
        Unit::Seconds,
        "How far the daily rollups trail the committed audit rows (0: caught up), as this server last read it."
    );
    describe_counter!(
        AUDIT_STREAM_LAGGED_TOTAL,
        "Live audit streams cut off because their client stopped reading."
    );
    describe_counter!(
        AUDIT_READ_FALLBACK_TOTAL,
        "Audit reads meant for the read replica that the primary served, by reason: unavailable (no connection, or it failed) or lagging (behind by more than the allowed lag)."
    );
    counter!(AUDIT_DROPPED_TOTAL).absolute(0);
    counter!(AUDIT_REJECTED_TOTAL).absolute(0);
    counter!(AUDIT_ROWS_REDUCED_TOTAL).absolute(0);
    counter!(AUDIT_WRITE_FAILURES_TOTAL).absolute(0);
    counter!(AUDIT_SESSIONS_TOTAL).absolute(0);
    counter!(AUDIT_ROWS_WRITTEN_TOTAL).absolute(0);
    gauge!(AUDIT_QUEUE_DEPTH).set(0.0);
    gauge!(AUDIT_SPOOL_ROWS).set(0.0);
    gauge!(AUDIT_STREAMS_OPEN).set(0.0);
    counter!(AUDIT_STREAM_LAGGED_TOTAL).absolute(0);
    for reason in ReadFallback::ALL {
        counter!(AUDIT_READ_FALLBACK_TOTAL, "reason" => reason.as_str()).absolute(0);
    }
}

/// The per-record audit series, with their handles resolved once per label
/// set: resolving a handle hashes its labels into the recorder's registry,
/// which costs more than the increment itself, on every request.
///
/// The `user_id` label is bounded: the first `max_users` users seen keep
/// their id, later ones share `other`; with `max_users = 0` every value is
/// `all`. Handles are resolved against the recorder installed when they are
/// first used, so install the recorder before recording anything.
#[derive(Debug)]
pub struct AuditMetrics {
    max_users: usize,
    series: Mutex<Series>,
}

#[derive(Debug, Default)]
struct Series {
    users: HashMap<Uuid, UserSeries>,
    anonymous: Option<UserSeries>,
    /// Users past the bound (`other`), or everyone when it is 0 (`all`).
    shared: Option<UserSeries>,
    /// By route template.
    response_times: HashMap<String, Histogram>,
    /// By route template, then status code.
    errors: HashMap<String, HashMap<u16, Counter>>,
}

#[derive(Debug)]
struct UserSeries {
    label: String,
    /// By action type: `[error, success]`.
    actions: HashMap<String, [Counter; 2]>,
    /// By quota type.
    quota_violations: HashMap<String, Counter>,
}

impl UserSeries {
    fn new(label: String) -> Self {
        UserSeries {
            label,
            actions: HashMap::new(),
            quota_violations: HashMap::new(),
        }
    }
}

/// What an audited request contributes to the audit families.
#[derive(Debug)]
pub struct AuditedAction<'a> {
    pub user_id: Option<Uuid>,
    pub action_type: &'a str,
    pub route: &'a str,
    pub status: u16,
    pub success: bool,
    pub seconds: f64,
    /// The quota type, when the request was a quota or rate-limit refusal.
    pub quota_violation: Option<&'a str>,
}

impl AuditMetrics {
    pub fn new(max_users: usize) -> Self {
        AuditMetrics {
            max_users,
            series: Mutex::new(Series::default()),
        }
    }

    /// The `user_id` label `user` is recorded under.
    pub fn user_label(&self, user: Option<Uuid>) -> String {
        let mut series = self.series.lock().unwrap_or_else(|p| p.into_inner());
        self.user_series(&mut series, user).label.clone()
    }

    fn user_series<'s>(&self, series: &'s mut Series, user: Option<Uuid>) -> &'s mut UserSeries {
        let Some(id) = user else {
            return series
                .anonymous
                .get_or_insert_with(|| UserSeries::new("anonymous".to_owned()));
        };
        if !series.users.contains_key(&id) && series.users.len() >= self.max_users {
            let label = if self.max_users == 0 { "all" } else { "other" };
            return series
                .shared
                .get_or_insert_with(|| UserSeries::new(label.to_owned()));
        }
        series
            .users
            .entry(id)
            .or_insert_with(|| UserSeries::new(id.to_string()))
    }

    pub fn record(&self, action: AuditedAction<'_>) {
        let mut series = self.series.lock().unwrap_or_else(|p| p.into_inner());
        let series = &mut *series;
        let user = self.user_series(series, action.user_id);
        let outcomes = match user.actions.get(action.action_type) {
            Some(outcomes) => outcomes,
            None => {
                let counter = |outcome: &'static str| counter!(AUDIT_ACTIONS_TOTAL, "user_id" => user.label.clone(), "action_type" => action.action_type.to_owned(), "status" => outcome);
                let outcomes = [counter("error"), counter("success")];
                user.actions
                    .entry(action.action_type.to_owned())
                    .or_insert(outcomes)
            }
        };
        outcomes[usize::from(action.success)].increment(1);
        if let Some(quota_type) = action.quota_violation {
            match user.quota_violations.get(quota_type) {
                Some(violations) => violations,
                None => user
                    .quota_violations
                    .entry(quota_type.to_owned())
                    .or_insert_with(|| {
                        counter!(AUDIT_QUOTA_VIOLATIONS_TOTAL, "user_id" => user.label.clone(), "quota_type" => quota_type.to_owned())
                    }),
            }
            .increment(1);
        }
        match series.response_times.get(action.route) {
            Some(histogram) => histogram,
            None => series
                .response_times
                .entry(action.route.to_owned())
                .or_insert_with(|| {
                    histogram!(AUDIT_RESPONSE_TIME_SECONDS, "endpoint" => action.route.to_owned())
                }),
        }
        .record(action.seconds);
        if action.status >= 400 {
            let by_status = match series.errors.get_mut(action.route) {
                Some(by_status) => by_status,
                None => series.errors.entry(action.route.to_owned()).or_default(),
            };
            by_status
                .entry(action.status)
                .or_insert_with(|| {
                    counter!(AUDIT_ERRORS_TOTAL, "endpoint" => action.route.to_owned(), "status_code" => action.status.to_string())
                })
                .increment(1);
        }
    }
}

pub fn record_sessions_opened(count: u64) {
    counter!(AUDIT_SESSIONS_TOTAL).increment(count);
}

pub fn record_batch_written(rows: usize, seconds: f64) {
    counter!(AUDIT_ROWS_WRITTEN_TOTAL).increment(rows as u64);
    histogram!(AUDIT_WRITE_BATCH_ROWS).record(rows as f64);
    histogram!(AUDIT_WRITE_DURATION_SECONDS).record(seconds);
}

pub fn record_rows_replayed(rows: usize) {
    counter!(AUDIT_ROWS_WRITTEN_TOTAL).increment(rows as u64);
}

pub fn record_write_failure() {
    counter!(AUDIT_WRITE_FAILURES_TOTAL).increment(1);
}

/// Records neither the database nor the spool could take, with nobody
/// waiting to be refused in their place (buffered mode).
pub fn record_dropped(rows: usize) {
    counter!(AUDIT_DROPPED_TOTAL).increment(rows as u64);
}

pub fn record_rows_reduced(rows: usize) {
    counter!(AUDIT_ROWS_REDUCED_TOTAL).increment(rows as u64);
}

pub fn record_rows_rejected(rows: usize) {
    counter!(AUDIT_REJECTED_TOTAL).increment(rows as u64);
}

pub fn set_queue_depth(depth: usize) {
    gauge!(AUDIT_QUEUE_DEPTH).set(depth as f64);
}

pub fn set_spool_rows(rows: u64) {
    gauge!(AUDIT_SPOOL_ROWS).set(rows as f64);
}

pub fn set_rollup_lag(seconds: f64) {
    gauge!(AUDIT_ROLLUP_LAG_SECONDS).set(seconds);
}

/// Why a read meant for the read replica went to the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadFallback {
    /// No connection could be had, or the replica failed to answer.
    Unavailable,
    /// The replica was behind by more than the allowed lag.
    Lagging,
}

impl ReadFallback {
    pub const ALL: [ReadFallback; 2] = [ReadFallback::Unavailable, ReadFallback::Lagging];

    /// The `reason` label.
    pub fn as_str(self) -> &'static str {
        match self {
            ReadFallback::Unavailable => "unavailable",
            ReadFallback::Lagging => "lagging",
        }
    }
}

/// A read meant for the replica went to the primary.
pub fn record_read_fallback(reason: ReadFallback) {
    counter!(AUDIT_READ_FALLBACK_TOTAL, "reason" => reason.as_str()).increment(1);
}

/// A continuous verification starts: its interval, and every series at 0
/// (`increase()` misses a series' first count), the last success unknown.
pub fn verification_started(chains: &[&str], interval_secs: f64) {
    gauge!(AUDIT_VERIFY_INTERVAL).set(interval_secs);
    gauge!(AUDIT_VERIFY_LAST_SUCCESS).set(0.0);
    for outcome in VERIFY_OUTCOMES {
        counter!(AUDIT_VERIFY_RUNS_TOTAL, "outcome" => outcome).absolute(0);
    }
    for chain in chains {
        counter!(AUDIT_VERIFY_FAILURES_TOTAL, "chain" => chain.to_string()).absolute(0);
    }
}

/// One verification pass ended (or was skipped): one of [`VERIFY_OUTCOMES`].
pub fn record_verification_run(outcome: &'static str) {
    counter!(AUDIT_VERIFY_RUNS_TOTAL, "outcome" => outcome).increment(1);
}

/// A verification pass found `chain` broken.
pub fn record_verification_failure(chain: &str) {
    counter!(AUDIT_VERIFY_FAILURES_TOTAL, "chain" => chain.to_owned()).increment(1);
}

/// When every chain last verified, in Unix seconds.
pub fn set_last_verified_at(unix_secs: f64) {
    gauge!(AUDIT_VERIFY_LAST_SUCCESS).set(unix_secs);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Prometheus naming: `_total` is a counter's suffix, and every counter
    /// has it.
    #[test]
    fn only_counters_are_called_total() {
        for (name, kind) in FAMILIES {
            assert_eq!(
                name.ends_with("_total"),
                *kind == "counter",
                "{name} is a {kind}"
            );
        }
    }

    #[test]
    fn user_labels_are_bounded() {
        let metrics = AuditMetrics::new(2);
        let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        assert_eq!(metrics.user_label(Some(a)), a.to_string());
        assert_eq!(metrics.user_label(Some(b)), b.to_string());
        assert_eq!(metrics.user_label(Some(c)), "other");
        assert_eq!(
            metrics.user_label(Some(a)),
            a.to_string(),
            "known users keep their label"
        );
        assert_eq!(metrics.user_label(None), "anonymous");
        assert_eq!(
            metrics.user_label(Some(c)),
            "other",
            "anonymous requests do not count against the bound"
        );
        assert_eq!(AuditMetrics::new(0).user_label(Some(a)), "all");
    }
}
