//! The read endpoints: status, checkpoints, statistics, per-user activity,
//! daily rollups, admin actions, the audit metrics and the rows themselves.
//! The statistics, activity, rollups, admin actions and rows are read
//! where `reads.rs` says (a replica, or the primary); the status and
//! checkpoints always from the primary.
//! (The handlers carry no doc comments: utoipa would put them in the
//! OpenAPI document, whose text embedders keep stable.)

use std::collections::HashMap;

use actix_web::{HttpRequest, HttpResponse, get, web};
use nox_audit_query::{ActivityQuery, LogsQuery, checkpoint_limit};
use nox_audit_store::rollup::RollupState;
use nox_audit_store::verify::{Outcome, VerificationStatus};
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::AuditApi;
use crate::authorize::{Access, Authenticated};
use crate::error::{ErrorBody, WebError};
use crate::query_params::QueryParams;

#[utoipa::path(responses((status = 200, description = "The audit pipeline's state"), (status = 403, body = ErrorBody)), security(("bearer" = [])), tag = "admin-audit")]
#[get("/admin/audit/status")]
pub async fn status(
    _: Authenticated,
    request: HttpRequest,
    api: web::Data<AuditApi>,
) -> actix_web::Result<HttpResponse> {
    api.authorize.authorize(&request, Access::Read)?;
    let sink = api.sink.status();
    let (chains, verification, rollup) = match api.pool.get().await {
        Ok(client) => (
            nox_audit_query::chain_state(&client).await.ok(),
            VerificationStatus::read(&client).await.ok(),
            RollupState::read(&**client).await.ok(),
        ),
        Err(_) => (None, None, None),
    };
    let connected = chains.is_some();
    let chains = chains.unwrap_or_default();
    let verified = verification.as_ref().map(VerificationStatus::outcome);
    let healthy = connected
        && !sink.is_down()
        && sink.database_up()
        && sink.rejected_files() == 0
        && verified != Some(Outcome::Failed.as_str());
    Ok(HttpResponse::Ok().json(json!({
        "audit_system": if healthy { "active" } else { "degraded" },
        "version": api.version,
        "mode": api.mode.as_str(),
        "database_status": if connected { "connected" } else { "disconnected" },
        "queue_depth": api.sink.queue_depth(),
        "spool_rows": sink.spool_rows(),
        "spool_files": sink.spool_files(),
        // Rows the database refused for their content: written in minimal
        // form, or kept in audit-spool/rejected/ when even that failed.
        "rows_reduced": sink.rows_reduced(),
        "rejected_rows": sink.rejected_rows(),
        "rejected_files": sink.rejected_files(),
        "rows_written": sink.rows_written(),
        "last_write_at": nox_audit_export::rfc3339_json(sink.last_write_at()),
        "last_error": sink.last_error(),
        "chains": chains.heads,
        "last_checkpoint_at": nox_audit_export::rfc3339_json(chains.last_checkpoint_at),
        "verification": verification_json(api.verification_interval, verification.as_ref()),
        "streams_open": api.streams.open_count(),
        "rollup": rollup_json(rollup.as_ref()),
    })))
}

/// How far the daily rollups trail the committed rows (null when the
/// database cannot be read): `lag_ms` 0 when none is missing, else the
/// time since they last held every committed row.
fn rollup_json(state: Option<&RollupState>) -> Value {
    let Some(state) = state else {
        return Value::Null;
    };
    json!({
        "rolled_seq": state.rolled_seq,
        "head_seq": state.head_seq,
        "rows_behind": state.rows_behind(),
        "lag_ms": state.lag.whole_milliseconds() as i64,
        "caught_up_at": nox_audit_export::rfc3339_json(Some(state.caught_up_at)),
    })
}

/// The continuous verification: this server's interval (null: it does not
/// verify), and each chain's newest result, whoever verified; `outcome` is
/// the worst chain's, `never` before any result, `unknown` when the
/// database cannot be read.
fn verification_json(
    interval: Option<std::time::Duration>,
    results: Option<&VerificationStatus>,
) -> Value {
    let chains: Vec<Value> = results
        .map(|s| s.chains.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|c| {
            json!({
                "chain": c.chain,
                "from_seq": c.from_seq,
                "to_seq": c.to_seq,
                "outcome": c.outcome.as_str(),
                "first_bad_seq": c.first_bad_seq,
                "problem_kind": c.problem_kind,
                "problem": c.problem,
                "finished_at": nox_audit_export::rfc3339_json(c.finished_at),
            })
        })
        .collect();
    json!({
        "interval_secs": interval.map(|i| i.as_secs()),
        "last_run_at": nox_audit_export::rfc3339_json(results.and_then(VerificationStatus::last_run_at)),
        "outcome": results.map_or("unknown", VerificationStatus::outcome),
        "chains": chains,
    })
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CheckpointsQuery {
    /// Newest first; 1 to 1000, default 100.
    #[param(nullable, minimum = 1, maximum = 1000)]
    limit: Option<i64>,
}

#[utoipa::path(params(CheckpointsQuery), responses((status = 200, description = "The checkpoint signing key and the newest checkpoints"), (status = 403, body = ErrorBody)), security(("bearer" = [])), tag = "admin-audit")]
#[get("/admin/audit/checkpoints")]
pub async fn checkpoints(
    _: Authenticated,
    request: HttpRequest,
    api: web::Data<AuditApi>,
    query: QueryParams<CheckpointsQuery>,
) -> actix_web::Result<HttpResponse> {
    api.authorize.authorize(&request, Access::Read)?;
    let limit = checkpoint_limit(query.limit).map_err(WebError::from)?;
    let client = api.pool.get().await.map_err(WebError::from)?;
    // Serialised as stored: hex for the binary fields, RFC 3339 UTC times.
    let checkpoints = nox_audit_query::checkpoints(&client, limit)
        .await
        .map_err(WebError::from)?;
    Ok(HttpResponse::Ok().json(json!({
        "public_key": api.checkpointer.public_key_hex(),
        "checkpoints": checkpoints,
    })))
}

#[utoipa::path(responses((status = 200, description = "Today's totals (UTC day)", headers(("X-Nox-Read-Source" = String, description = "replica or primary"), ("X-Nox-Replica-Lag-Ms" = i64, description = "How stale the answer may be, in ms (0 from the primary)"))), (status = 403, body = ErrorBody)), security(("bearer" = [])), tag = "admin-audit")]
#[get("/admin/stats")]
pub async fn stats(
    _: Authenticated,
    request: HttpRequest,
    api: web::Data<AuditApi>,
) -> actix_web::Result<HttpResponse> {
    api.authorize.authorize(&request, Access::Read)?;
    let read = api.reads.connection().await?;
    let today = nox_audit_query::today(&read.client)
        .await
        .map_err(WebError::from)?;
    Ok(read.source.ok().json(to_json(&today)?))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UsersQuery {
    /// Days back from now, 1 to 365 (default 7).
    #[param(nullable, minimum = 1, maximum = 365)]
    pub days: Option<i64>,
    /// Users with fewer actions are left out (default 1).
    #[param(nullable, minimum = 0)]
    pub min_actions: Option<i64>,
}

#[utoipa::path(params(UsersQuery), responses((status = 200, description = "Activity per user, one query", headers(("X-Nox-Read-Source" = String, description = "replica or primary"), ("X-Nox-Replica-Lag-Ms" = i64, description = "How stale the answer may be, in ms (0 from the primary)"))), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)), security(("bearer" = [])), tag = "admin-audit")]
#[get("/admin/audit/users")]
pub async fn users(
    _: Authenticated,
    request: HttpRequest,
    api: web::Data<AuditApi>,
    query: QueryParams<UsersQuery>,
) -> actix_web::Result<HttpResponse> {
    api.authorize.authorize(&request, Access::Read)?;
    let query = ActivityQuery::new(query.days, query.min_actions).map_err(WebError::from)?;
    let read = api.reads.connection().await?;
    let users = nox_audit_query::user_activity(&read.client, &query, api.user_names.as_ref())
        .await
        .map_err(WebError::from)?;
    Ok(read.source.ok().json(json!({ "users": to_json(&users)? })))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SummariesQuery {
    /// Days back from today, 1 to 365 (default 30).
    #[param(nullable, minimum = 1, maximum = 365)]
    pub days: Option<i64>,
    #[param(nullable)]
    pub user_id: Option<Uuid>,
}

#[utoipa::path(params(SummariesQuery), responses((status = 200, description = "Daily rollups, newest date first", headers(("X-Nox-Read-Source" = String, description = "replica or primary"), ("X-Nox-Replica-Lag-Ms" = i64, description = "How stale the answer may be, in ms (0 from the primary)"))), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)), security(("bearer" = [])), tag = "admin-audit")]
#[get("/admin/audit/daily-summaries")]
pub async fn daily_summaries(
    _: Authenticated,
    request: HttpRequest,
    api: web::Data<AuditApi>,
    query: QueryParams<SummariesQuery>,
) -> actix_web::Result<HttpResponse> {
    api.authorize.authorize(&request, Access::Read)?;
    let query =
        nox_audit_query::SummariesQuery::new(query.days, query.user_id).map_err(WebError::from)?;
    let read = api.reads.connection().await?;
    let summaries = nox_audit_query::daily_summaries(&read.client, &query)
        .await
        .map_err(WebError::from)?;
    Ok(read
        .source
        .ok()
        .json(json!({ "summaries": to_json(&summaries)? })))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AdminActionsQuery {
    /// Days back from now, 1 to 365 (default 30).
    #[param(nullable, minimum = 1, maximum = 365)]
    pub days: Option<i64>,
    #[param(nullable)]
    pub admin_user_id: Option<Uuid>,
    #[param(nullable)]
    pub target_user_id: Option<Uuid>,
    #[param(nullable)]
    pub admin_action_type: Option<String>,
}

#[utoipa::path(params(AdminActionsQuery), responses((status = 200, description = "Admin actions, newest first", headers(("X-Nox-Read-Source" = String, description = "replica or primary"), ("X-Nox-Replica-Lag-Ms" = i64, description = "How stale the answer may be, in ms (0 from the primary)"))), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)), security(("bearer" = [])), tag = "admin-audit")]
#[get("/admin/audit/admin-actions")]
pub async fn admin_actions(
    _: Authenticated,
    request: HttpRequest,
    api: web::Data<AuditApi>,
    query: QueryParams<AdminActionsQuery>,
) -> actix_web::Result<HttpResponse> {
    api.authorize.authorize(&request, Access::Read)?;
    let QueryParams(query) = query;
    let query = nox_audit_query::AdminActionsQuery::new(
        query.days,
        query.admin_user_id,
        query.target_user_id,
        query.admin_action_type,
    )
    .map_err(WebError::from)?;
    let read = api.reads.connection().await?;
    let actions = nox_audit_query::admin_actions(&read.client, &query)
        .await
        .map_err(WebError::from)?;
    Ok(read
        .source
        .ok()
        .json(json!({ "admin_actions": to_json(&actions)? })))
}

#[utoipa::path(responses((status = 200, description = "The audit metrics (nox_audit_*) in Prometheus text", content_type = "text/plain"), (status = 403, body = ErrorBody), (status = 404, description = "This process exports no metrics")), security(("bearer" = [])), tag = "admin-audit")]
#[get("/admin/audit/metrics")]
pub async fn audit_metrics(
    _: Authenticated,
    request: HttpRequest,
    api: web::Data<AuditApi>,
) -> actix_web::Result<HttpResponse> {
    api.authorize.authorize(&request, Access::Read)?;
    let Some(handle) = &api.metrics else {
        return Err(WebError::NotFound("metrics are not exported by this process".into()).into());
    };
    Ok(HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(audit_families(&handle.render())))
}

/// The `nox_audit_*` families of a Prometheus text exposition.
fn audit_families(text: &str) -> String {
    text.lines()
        .filter(|line| {
            let name = line
                .strip_prefix("# HELP ")
                .or_else(|| line.strip_prefix("# TYPE "))
                .unwrap_or(line);
            name.starts_with("nox_audit_")
        })
        .map(|line| format!("{line}\n"))
        .collect()
}

#[utoipa::path(
    params(
        ("user_id" = Option<Uuid>, Query), ("session_id" = Option<Uuid>, Query), ("request_id" = Option<Uuid>, Query),
        ("action_type" = Option<String>, Query), ("action_category" = Option<String>, Query),
        ("endpoint" = Option<String>, Query, description = "Case-insensitive substring"),
        ("status_code" = Option<i16>, Query, minimum = 100, maximum = 599), ("success" = Option<bool>, Query), ("quota_violation" = Option<bool>, Query),
        ("client_ip" = Option<String>, Query, description = "An address or a CIDR"),
        ("start_date" = Option<String>, Query, description = "RFC 3339 or YYYY-MM-DD, inclusive"),
        ("end_date" = Option<String>, Query, description = "RFC 3339 or YYYY-MM-DD (the whole day), inclusive"),
        ("search" = Option<String>, Query, description = "Substring of error_details, command_text, file_path or metadata"),
        ("page_size" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "1 to 1000, default 50"),
        ("page" = Option<u32>, Query, minimum = 1, description = "Offset paging, for compatibility: 1 to 4294967295"),
        ("cursor" = Option<String>, Query, description = "Keyset paging: a previous next_cursor"),
        ("include_total" = Option<bool>, Query),
    ),
    responses((status = 200, description = "Audit rows, newest first", headers(("X-Nox-Read-Source" = String, description = "replica or primary"), ("X-Nox-Replica-Lag-Ms" = i64, description = "How stale the answer may be, in ms (0 from the primary)"))), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])),
    tag = "admin-audit"
)]
#[get("/admin/audit/logs")]
pub async fn logs(
    _: Authenticated,
    request: HttpRequest,
    api: web::Data<AuditApi>,
    query: web::Query<HashMap<String, String>>,
) -> actix_web::Result<HttpResponse> {
    api.authorize.authorize(&request, Access::Read)?;
    let query = LogsQuery::parse(&query).map_err(WebError::from)?;
    let read = api.reads.connection().await?;
    let page = nox_audit_query::logs(&read.client, query, api.user_names.as_ref())
        .await
        .map_err(WebError::from)?;
    Ok(read.source.ok().json(to_json(&page)?))
}

/// Through `serde_json::Value`, whose maps are sorted: the key order the
/// API has always written.
fn to_json(value: &impl serde::Serialize) -> Result<Value, WebError> {
    serde_json::to_value(value)
        .map_err(|_| WebError::Internal("a response could not be serialised"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_audit_families_are_kept() {
        let text = "# HELP nox_http_requests_total x\n# TYPE nox_http_requests_total counter\nnox_http_requests_total 3\n\
                    # HELP nox_audit_rows_total y\n# TYPE nox_audit_rows_total counter\nnox_audit_rows_total{a=\"b\"} 5\n";
        assert_eq!(
            super::audit_families(text),
            "# HELP nox_audit_rows_total y\n# TYPE nox_audit_rows_total counter\nnox_audit_rows_total{a=\"b\"} 5\n"
        );
    }
}
