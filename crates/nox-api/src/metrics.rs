//! Nox's own metric families (HTTP, runs, workspaces, quota and rate-limit
//! refusals, shedding, admin changes applied, build info), their descriptions and record helpers,
//! and the HTTP metrics middleware. The audit families are
//! `nox-audit-metrics`'; [`describe`] registers both. Like that crate, this
//! never installs a recorder: the server binary does.

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};

pub const HTTP_REQUESTS_TOTAL: &str = "nox_http_requests_total";
pub const HTTP_REQUEST_DURATION_SECONDS: &str = "nox_http_request_duration_seconds";
pub const RUN_TOTAL: &str = "nox_run_total";
pub const RUN_DURATION_SECONDS: &str = "nox_run_duration_seconds";
pub const RUN_CPU_SECONDS: &str = "nox_run_cpu_seconds";
pub const SANDBOX_FILES: &str = "nox_sandbox_files";
pub const SANDBOX_BYTES: &str = "nox_sandbox_bytes";
pub const QUOTA_VIOLATIONS_TOTAL: &str = "nox_quota_violations_total";
pub const RATE_LIMITED_TOTAL: &str = "nox_rate_limited_total";
pub const HTTP_SHED_TOTAL: &str = "nox_http_shed_total";
pub const BUILD_INFO: &str = "nox_build_info";
pub const SERVERS_LIVE: &str = "nox_servers_live";
pub const ADMIN_CHANGES_APPLIED_TOTAL: &str = "nox_admin_changes_applied_total";
pub const ADMIN_CHANGES_RECONNECTS_TOTAL: &str = "nox_admin_changes_reconnects_total";

/// Nox's own families, with their type (the audit families:
/// [`nox_audit_metrics::FAMILIES`]; both: [`families`]).
pub const FAMILIES: &[(&str, &str)] = &[
    (HTTP_REQUESTS_TOTAL, "counter"),
    (HTTP_REQUEST_DURATION_SECONDS, "histogram"),
    (RUN_TOTAL, "counter"),
    (RUN_DURATION_SECONDS, "histogram"),
    (RUN_CPU_SECONDS, "histogram"),
    (SANDBOX_FILES, "gauge"),
    (SANDBOX_BYTES, "gauge"),
    (QUOTA_VIOLATIONS_TOTAL, "counter"),
    (RATE_LIMITED_TOTAL, "counter"),
    (HTTP_SHED_TOTAL, "counter"),
    (BUILD_INFO, "gauge"),
    (SERVERS_LIVE, "gauge"),
    (ADMIN_CHANGES_APPLIED_TOTAL, "counter"),
    (ADMIN_CHANGES_RECONNECTS_TOTAL, "counter"),
];

/// Every family `/metrics` serves: the audit families, then Nox's.
pub fn families() -> impl Iterator<Item = &'static (&'static str, &'static str)> {
    nox_audit_metrics::FAMILIES.iter().chain(FAMILIES)
}

/// Registers HELP text for every family, the audit ones included, and the
/// series that must exist before anything happens.
pub fn describe() {
    nox_audit_metrics::describe();
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
    describe_gauge!(
        SERVERS_LIVE,
        "Nox servers sharing the database, seen by the last heartbeat (this one included)."
    );
    describe_counter!(
        ADMIN_CHANGES_APPLIED_TOTAL,
        "Admin changes announced by any server and applied here, by kind (token, user, quota)."
    );
    describe_counter!(
        ADMIN_CHANGES_RECONNECTS_TOTAL,
        "Times the admin-change listener connected again (each drops every cached token and quota override)."
    );
    counter!(HTTP_SHED_TOTAL).absolute(0);
    for kind in crate::admin_changes::KINDS {
        counter!(ADMIN_CHANGES_APPLIED_TOTAL, "kind" => kind).absolute(0);
    }
    counter!(ADMIN_CHANGES_RECONNECTS_TOTAL).absolute(0);
    gauge!(BUILD_INFO, "version" => crate::VERSION).set(1.0);
}

/// One HTTP request.
pub fn record_http(route: &str, method: &str, status: u16, seconds: f64) {
    let (route, method) = (route.to_owned(), method.to_owned());
    counter!(HTTP_REQUESTS_TOTAL, "route" => route.clone(), "method" => method.clone(), "status" => status.to_string()).increment(1);
    histogram!(HTTP_REQUEST_DURATION_SECONDS, "route" => route, "method" => method).record(seconds);
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
pub fn set_servers_live(servers: u32) {
    gauge!(SERVERS_LIVE).set(f64::from(servers));
}

pub fn record_shed() {
    counter!(HTTP_SHED_TOTAL).increment(1);
}

/// An admin change notice applied; `kind` is one of
/// [`crate::admin_changes::KINDS`].
pub fn record_admin_change(kind: &'static str) {
    counter!(ADMIN_CHANGES_APPLIED_TOTAL, "kind" => kind).increment(1);
}

pub fn record_admin_changes_reconnect() {
    counter!(ADMIN_CHANGES_RECONNECTS_TOTAL).increment(1);
}

/// Counts every request by route template (never the raw path).
pub async fn record_http_metrics(
    request: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let started = std::time::Instant::now();
    let method = request.method().as_str().to_owned();
    let response = next.call(request).await?;
    let route = response
        .request()
        .match_pattern()
        .unwrap_or_else(|| "unmatched".to_owned());
    record_http(
        &route,
        &method,
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Prometheus naming: `_total` is a counter's suffix, and every counter
    /// has it; no family is both Nox's and the audit crate's.
    #[test]
    fn only_counters_are_called_total_and_names_are_unique() {
        let mut seen = std::collections::BTreeSet::new();
        for (name, kind) in families() {
            assert_eq!(
                name.ends_with("_total"),
                *kind == "counter",
                "{name} is a {kind}"
            );
            assert!(seen.insert(*name), "{name} twice");
        }
    }
}
