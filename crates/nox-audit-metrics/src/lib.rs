//! Names, descriptions and record helpers for Nox's metrics. Everything is
//! recorded through the `metrics` facade; this crate never installs a
//! recorder, so a service embedding the audit crates decides where metrics
//! go (Nox's server binary installs a Prometheus recorder).
//!
//! Labels are bounded: routes are templates (`unmatched` otherwise), and
//! user ids are capped by [`AuditMetrics`].

use std::collections::HashMap;
use std::sync::Mutex;

use metrics::{
    Counter, Histogram, Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge,
    histogram,
};
use uuid::Uuid;

pub const HTTP_REQUESTS_TOTAL: &str = "nox_http_requests_total";
pub const HTTP_REQUEST_DURATION_SECONDS: &str = "nox_http_request_duration_seconds";
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
pub const RUN_TOTAL: &str = "nox_run_total";
pub const RUN_DURATION_SECONDS: &str = "nox_run_duration_seconds";
pub const RUN_CPU_SECONDS: &str = "nox_run_cpu_seconds";
pub const SANDBOX_FILES: &str = "nox_sandbox_files";
pub const SANDBOX_BYTES: &str = "nox_sandbox_bytes";
pub const QUOTA_VIOLATIONS_TOTAL: &str = "nox_quota_violations_total";
pub const RATE_LIMITED_TOTAL: &str = "nox_rate_limited_total";
pub const HTTP_SHED_TOTAL: &str = "nox_http_shed_total";
pub const BUILD_INFO: &str = "nox_build_info";

/// Every family Nox exports, with its type.
pub const FAMILIES: &[(&str, &str)] = &[
    (HTTP_REQUESTS_TOTAL, "counter"),
    (HTTP_REQUEST_DURATION_SECONDS, "histogram"),
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
    (RUN_TOTAL, "counter"),
    (RUN_DURATION_SECONDS, "histogram"),
    (RUN_CPU_SECONDS, "histogram"),
    (SANDBOX_FILES, "gauge"),
    (SANDBOX_BYTES, "gauge"),
    (QUOTA_VIOLATIONS_TOTAL, "counter"),
    (RATE_LIMITED_TOTAL, "counter"),
    (HTTP_SHED_TOTAL, "counter"),
    (BUILD_INFO, "gauge"),
];

/// Buckets for durations in seconds (HTTP, audit writes, runs).
pub const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0,
];
/// Buckets for rows per audit batch.
pub const BATCH_ROWS_BUCKETS: &[f64] =
    &[1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0];

/// Registers HELP text for every family, and the series that must exist
/// before anything happens (the dropped counter, which stays 0 by design).
pub fn describe(version: &str) {
    describe_counter!(
        HTTP_REQUESTS_TOTAL,
        "HTTP requests by route template, method and status."
    );
    describe_histogram!(
        HTTP_REQUEST_DURATION_SECONDS,
        Unit::Seconds,
        "HTTP request duration by route template and method."
    );
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
    describe_counter!(AUDIT_SESSIONS_TOTAL, "Audit sessions opened.");
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
        RUN_TOTAL,
        "POST /run executions by outcome (ok, error, timeout, limit)."
    );
    describe_histogram!(
        RUN_DURATION_SECONDS,
        Unit::Seconds,
        "Wall-clock duration of runs."
    );
    describe_histogram!(
        RUN_CPU_SECONDS,
        Unit::Seconds,
        "CPU seconds used per run (all its processes); _sum is the total, a counter."
    );
    describe_gauge!(SANDBOX_FILES, "Files in all known workspaces.");
    describe_gauge!(SANDBOX_BYTES, Unit::Bytes, "Bytes in all known workspaces.");
    describe_counter!(QUOTA_VIOLATIONS_TOTAL, "Quota refusals by quota type.");
    describe_counter!(
        RATE_LIMITED_TOTAL,
        "Rate-limit refusals by scope (user, ip)."
    );
    describe_counter!(
        HTTP_SHED_TOTAL,
        "Requests answered 503 at once because NOX_MAX_INFLIGHT requests were in flight."
    );
    describe_gauge!(BUILD_INFO, "Always 1; the version is in the label.");
    counter!(AUDIT_DROPPED_TOTAL).absolute(0);
    counter!(HTTP_SHED_TOTAL).absolute(0);
    counter!(AUDIT_REJECTED_TOTAL).absolute(0);
    counter!(AUDIT_ROWS_REDUCED_TOTAL).absolute(0);
    counter!(AUDIT_WRITE_FAILURES_TOTAL).absolute(0);
    counter!(AUDIT_SESSIONS_TOTAL).absolute(0);
    counter!(AUDIT_ROWS_WRITTEN_TOTAL).absolute(0);
    gauge!(AUDIT_QUEUE_DEPTH).set(0.0);
    gauge!(AUDIT_SPOOL_ROWS).set(0.0);
    gauge!(BUILD_INFO, "version" => version.to_owned()).set(1.0);
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

/// One HTTP request.
pub fn record_http(route: &str, method: &str, status: u16, seconds: f64) {
    let (route, method) = (route.to_owned(), method.to_owned());
    counter!(HTTP_REQUESTS_TOTAL, "route" => route.clone(), "method" => method.clone(), "status" => status.to_string()).increment(1);
    histogram!(HTTP_REQUEST_DURATION_SECONDS, "route" => route, "method" => method).record(seconds);
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

/// One run: `outcome` is `ok`, `error`, `timeout`, `limit` or `cancelled` (its client left).
pub fn record_run(outcome: &'static str, seconds: f64, cpu_seconds: f64) {
    counter!(RUN_TOTAL, "outcome" => outcome).increment(1);
    histogram!(RUN_DURATION_SECONDS).record(seconds);
    // The facade's counters hold integers: a histogram keeps fractional CPU
    // seconds in base units, its `_sum` the running total (a counter) and
    // its buckets how CPU is spread over runs.
    histogram!(RUN_CPU_SECONDS).record(cpu_seconds);
}

pub fn set_sandbox_usage(files: u64, bytes: u64) {
    gauge!(SANDBOX_FILES).set(files as f64);
    gauge!(SANDBOX_BYTES).set(bytes as f64);
}

pub fn record_quota_violation(quota_type: &'static str) {
    counter!(QUOTA_VIOLATIONS_TOTAL, "quota_type" => quota_type).increment(1);
}

/// `scope` is `user` or `ip`.
pub fn record_rate_limited(scope: &'static str) {
    counter!(RATE_LIMITED_TOTAL, "scope" => scope).increment(1);
}

/// A request shed by the in-flight cap.
pub fn record_shed() {
    counter!(HTTP_SHED_TOTAL).increment(1);
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
