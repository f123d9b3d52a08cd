//! The admin audit API (admins and auditors): status, statistics, per-user
//! activity, daily rollups, admin actions and the audit metrics. Every call
//! is itself audited (`admin_read`).

use actix_web::{HttpResponse, get, web};
use nox_audit_store::chain::Checkpoint;
use nox_auth::Role;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use time::OffsetDateTime;
use tokio_postgres::Row;
use uuid::Uuid;

use crate::auth::Authenticated;
use crate::error::{ApiError, ErrorBody, refuse_nul};
use crate::state::AppState;
use crate::timestamp_json;

pub fn routes(config: &mut web::ServiceConfig) {
    config
        .service(crate::audit_logs::logs)
        .service(crate::export::export)
        .service(status)
        .service(checkpoints)
        .service(stats)
        .service(users)
        .service(daily_summaries)
        .service(admin_actions)
        .service(audit_metrics);
}

fn days_back(days: Option<i64>, default: i64) -> Result<i32, ApiError> {
    let days = days.unwrap_or(default);
    if (1..=365).contains(&days) {
        Ok(days as i32)
    } else {
        Err(ApiError::InvalidParameter("days must be 1 to 365".into()))
    }
}

#[utoipa::path(responses((status = 200, description = "The audit pipeline's state"), (status = 403, body = ErrorBody)), security(("bearer" = [])), tag = "admin-audit")]
#[get("/admin/audit/status")]
pub async fn status(
    caller: Authenticated,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Auditor)?;
    let sink = state.audit.status();
    let mut chains = Map::new();
    let mut last_checkpoint_at = None;
    let connected = match state.pool.get().await {
        Ok(client) => match chain_state(&client).await {
            Ok((heads, last)) => {
                chains = heads;
                last_checkpoint_at = last;
                true
            }
            Err(_) => false,
        },
        Err(_) => false,
    };
    let healthy = connected && !sink.is_down() && sink.database_up() && sink.rejected_files() == 0;
    Ok(HttpResponse::Ok().json(json!({
        "audit_system": if healthy { "active" } else { "degraded" },
        "version": crate::VERSION,
        "mode": state.audit_config.mode.as_str(),
        "database_status": if connected { "connected" } else { "disconnected" },
        "queue_depth": state.audit.queue_depth(),
        "spool_rows": sink.spool_rows(),
        "spool_files": sink.spool_files(),
        // Rows the database refused for their content: written in minimal
        // form, or kept in audit-spool/rejected/ when even that failed.
        "rows_reduced": sink.rows_reduced(),
        "rejected_rows": sink.rejected_rows(),
        "rejected_files": sink.rejected_files(),
        "rows_written": sink.rows_written(),
        "last_write_at": timestamp_json(sink.last_write_at()),
        "last_error": sink.last_error(),
        "chains": Value::Object(chains),
        "last_checkpoint_at": timestamp_json(last_checkpoint_at),
    })))
}

/// Each chain's head, and the time of the newest checkpoint.
async fn chain_state(
    client: &deadpool_postgres::Client,
) -> Result<(Map<String, Value>, Option<OffsetDateTime>), tokio_postgres::Error> {
    let heads = client
        .query("SELECT chain, seq, row_hash FROM audit_chain_heads ORDER BY chain", &[])
        .await?
        .iter()
        .map(|row| {
            let head = json!({"seq": row.get::<_, i64>(1), "row_hash": hex::encode(row.get::<_, &[u8]>(2))});
            (row.get::<_, String>(0), head)
        })
        .collect();
    let last = client
        .query_one("SELECT max(\"timestamp\") FROM audit_checkpoints", &[])
        .await?
        .get(0);
    Ok((heads, last))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct CheckpointsQuery {
    /// Newest first; 1 to 1000, default 100.
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
}

#[utoipa::path(params(CheckpointsQuery), responses((status = 200, description = "The checkpoint signing key and the newest checkpoints"), (status = 403, body = ErrorBody)), security(("bearer" = [])), tag = "admin-audit")]
#[get("/admin/audit/checkpoints")]
pub async fn checkpoints(
    caller: Authenticated,
    state: web::Data<AppState>,
    query: web::Query<CheckpointsQuery>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Auditor)?;
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::InvalidParameter("limit must be 1 to 1000".into()));
    }
    let client = state.pool.get().await?;
    // Serialised as stored: hex for the binary fields, RFC 3339 UTC times.
    let checkpoints = Checkpoint::newest(&**client, limit)
        .await
        .map_err(ApiError::internal)?;
    Ok(HttpResponse::Ok().json(json!({
        "public_key": state.checkpointer.public_key_hex(),
        "checkpoints": checkpoints,
    })))
}

#[utoipa::path(responses((status = 200, description = "Today's totals (UTC day)"), (status = 403, body = ErrorBody)), security(("bearer" = [])), tag = "admin-audit")]
#[get("/admin/stats")]
pub async fn stats(
    caller: Authenticated,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Auditor)?;
    let client = state.pool.get().await?;
    let row = client
        .query_one(
            "WITH today AS (
                 SELECT * FROM audit_actions
                 WHERE \"timestamp\" >= date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
             )
             SELECT (SELECT count(*) FROM today),
                    (SELECT count(DISTINCT user_id) FROM today),
                    (SELECT count(*) FILTER (WHERE NOT success) FROM today),
                    (SELECT count(*) FROM audit_sessions WHERE is_active)",
            &[],
        )
        .await
        .map_err(ApiError::internal)?;
    let (actions, users_today, failed, sessions): (i64, i64, i64, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    let error_rate = if actions == 0 {
        0.0
    } else {
        (failed as f64 / actions as f64 * 10_000.0).round() / 100.0
    };
    Ok(HttpResponse::Ok().json(json!({
        "actions_today": actions,
        "users_today": users_today,
        "active_sessions": sessions,
        "error_rate_today": error_rate,
    })))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct UsersQuery {
    /// Days back from now, 1 to 365 (default 7).
    #[param(minimum = 1, maximum = 365)]
    pub days: Option<i64>,
    /// Users with fewer actions are left out (default 1).
    #[param(minimum = 0)]
    pub min_actions: Option<i64>,
}

#[utoipa::path(params(UsersQuery), responses((status = 200, description = "Activity per user, one query"), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)), security(("bearer" = [])), tag = "admin-audit")]
#[get("/admin/audit/users")]
pub async fn users(
    caller: Authenticated,
    state: web::Data<AppState>,
    query: web::Query<UsersQuery>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Auditor)?;
    let days = days_back(query.days, 7)?;
    let min_actions = query.min_actions.unwrap_or(1);
    if min_actions < 0 {
        return Err(ApiError::InvalidParameter(
            "min_actions must be 0 or more".into(),
        ));
    }
    let client = state.pool.get().await?;
    let rows = client
        .query(
            "WITH recent AS (
                 SELECT * FROM audit_actions
                 WHERE user_id IS NOT NULL AND \"timestamp\" >= now() - make_interval(days => $1)
             ), per_user AS (
                 SELECT user_id,
                        count(*) AS total_actions,
                        count(*) FILTER (WHERE success) AS successful_actions,
                        count(*) FILTER (WHERE NOT success) AS failed_actions,
                        count(*) FILTER (WHERE action_category = 'filesystem') AS file_operations,
                        count(*) FILTER (WHERE action_category = 'execution') AS code_executions,
                        count(*) FILTER (WHERE action_category = 'admin') AS admin_actions,
                        count(*) FILTER (WHERE quota_violation) AS quota_violations,
                        min(\"timestamp\") AS first_activity,
                        max(\"timestamp\") AS last_activity,
                        avg(response_time_ms) AS avg_response_time_ms,
                        coalesce(sum(cpu_time_ms), 0) AS total_cpu_ms,
                        count(DISTINCT session_id) AS unique_sessions
                 FROM recent GROUP BY user_id
             ), endpoints AS (
                 SELECT user_id, endpoint, count(*) AS n,
                        row_number() OVER (PARTITION BY user_id ORDER BY count(*) DESC, endpoint) AS rank
                 FROM recent GROUP BY user_id, endpoint
             )
             SELECT p.*, u.name,
                    coalesce((SELECT jsonb_agg(jsonb_build_object('endpoint', e.endpoint, 'count', e.n) ORDER BY e.rank)
                              FROM endpoints e WHERE e.user_id = p.user_id AND e.rank <= 5), '[]'::jsonb) AS top_endpoints
             FROM per_user p LEFT JOIN users u ON u.id = p.user_id
             WHERE p.total_actions >= $2
             ORDER BY p.total_actions DESC, p.user_id",
            &[&days, &min_actions],
        )
        .await
        .map_err(ApiError::internal)?;
    let users: Vec<Value> = rows
        .iter()
        .map(|row| {
            json!({
                "user_id": row.get::<_, Uuid>("user_id"),
                "name": row.get::<_, Option<String>>("name"),
                "total_actions": row.get::<_, i64>("total_actions"),
                "successful_actions": row.get::<_, i64>("successful_actions"),
                "failed_actions": row.get::<_, i64>("failed_actions"),
                "file_operations": row.get::<_, i64>("file_operations"),
                "code_executions": row.get::<_, i64>("code_executions"),
                "admin_actions": row.get::<_, i64>("admin_actions"),
                "quota_violations": row.get::<_, i64>("quota_violations"),
                "first_activity": timestamp_json(row.get::<_, Option<OffsetDateTime>>("first_activity")),
                "last_activity": timestamp_json(row.get::<_, Option<OffsetDateTime>>("last_activity")),
                "avg_response_time_ms": row.get::<_, Option<f64>>("avg_response_time_ms"),
                "total_cpu_ms": row.get::<_, f64>("total_cpu_ms"),
                "unique_sessions": row.get::<_, i64>("unique_sessions"),
                "top_endpoints": row.get::<_, Value>("top_endpoints"),
            })
        })
        .collect();
    Ok(HttpResponse::Ok().json(json!({ "users": users })))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct SummariesQuery {
    /// Days back from today, 1 to 365 (default 30).
    #[param(minimum = 1, maximum = 365)]
    pub days: Option<i64>,
    pub user_id: Option<Uuid>,
}

#[utoipa::path(params(SummariesQuery), responses((status = 200, description = "Daily rollups, newest date first"), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)), security(("bearer" = [])), tag = "admin-audit")]
#[get("/admin/audit/daily-summaries")]
pub async fn daily_summaries(
    caller: Authenticated,
    state: web::Data<AppState>,
    query: web::Query<SummariesQuery>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Auditor)?;
    let days = days_back(query.days, 30)?;
    let client = state.pool.get().await?;
    let rows = client
        .query(
            "SELECT * FROM audit_daily_summaries
             WHERE summary_date >= (now() AT TIME ZONE 'UTC')::date - $1::int
               AND ($2::uuid IS NULL OR user_id = $2)
             ORDER BY summary_date DESC, total_actions DESC, user_id NULLS FIRST",
            &[&days, &query.user_id],
        )
        .await
        .map_err(ApiError::internal)?;
    let summaries: Vec<Value> = rows.iter().map(summary_json).collect();
    Ok(HttpResponse::Ok().json(json!({ "summaries": summaries })))
}

fn summary_json(row: &Row) -> Value {
    let int = |name: &str| row.get::<_, i64>(name);
    let float = |name: &str| row.get::<_, Option<f64>>(name);
    json!({
        "summary_date": row.get::<_, time::Date>("summary_date").to_string(),
        "user_id": row.get::<_, Option<Uuid>>("user_id"),
        "total_actions": int("total_actions"),
        "successful_actions": int("successful_actions"),
        "failed_actions": int("failed_actions"),
        "file_operations": int("file_operations"),
        "code_executions": int("code_executions"),
        "admin_actions": int("admin_actions"),
        "quota_violations": int("quota_violations"),
        "total_cpu_ms": float("total_cpu_ms"),
        "total_memory_mb": float("total_memory_mb"),
        "files_created": int("files_created"),
        "files_deleted": int("files_deleted"),
        "sum_response_time_ms": float("sum_response_time_ms"),
        "avg_response_time_ms": float("avg_response_time_ms"),
        "max_response_time_ms": float("max_response_time_ms"),
        "unique_sessions": int("unique_sessions"),
        "first_activity": timestamp_json(row.get::<_, Option<OffsetDateTime>>("first_activity")),
        "last_activity": timestamp_json(row.get::<_, Option<OffsetDateTime>>("last_activity")),
    })
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct AdminActionsQuery {
    /// Days back from now, 1 to 365 (default 30).
    #[param(minimum = 1, maximum = 365)]
    pub days: Option<i64>,
    pub admin_user_id: Option<Uuid>,
    pub target_user_id: Option<Uuid>,
    pub admin_action_type: Option<String>,
}

#[utoipa::path(params(AdminActionsQuery), responses((status = 200, description = "Admin actions, newest first"), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)), security(("bearer" = [])), tag = "admin-audit")]
#[get("/admin/audit/admin-actions")]
pub async fn admin_actions(
    caller: Authenticated,
    state: web::Data<AppState>,
    query: web::Query<AdminActionsQuery>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Auditor)?;
    let days = days_back(query.days, 30)?;
    if let Some(kind) = &query.admin_action_type {
        refuse_nul("admin_action_type", kind)?;
    }
    let client = state.pool.get().await?;
    let rows = client
        .query(
            "SELECT id, \"timestamp\", admin_user_id, target_user_id, admin_action_type,
                    old_values, new_values, justification
             FROM audit_admin_actions
             WHERE \"timestamp\" >= now() - make_interval(days => $1)
               AND ($2::uuid IS NULL OR admin_user_id = $2)
               AND ($3::uuid IS NULL OR target_user_id = $3)
               AND ($4::text IS NULL OR admin_action_type = $4)
             ORDER BY \"timestamp\" DESC, id DESC",
            &[
                &days,
                &query.admin_user_id,
                &query.target_user_id,
                &query.admin_action_type,
            ],
        )
        .await
        .map_err(ApiError::internal)?;
    let actions: Vec<Value> = rows
        .iter()
        .map(|row| {
            json!({
                "id": row.get::<_, Uuid>(0),
                "timestamp": timestamp_json(row.get::<_, OffsetDateTime>(1)),
                "admin_user_id": row.get::<_, Option<Uuid>>(2),
                "target_user_id": row.get::<_, Option<Uuid>>(3),
                "admin_action_type": row.get::<_, String>(4),
                "old_values": row.get::<_, Option<Value>>(5),
                "new_values": row.get::<_, Option<Value>>(6),
                "justification": row.get::<_, Option<String>>(7),
            })
        })
        .collect();
    Ok(HttpResponse::Ok().json(json!({ "admin_actions": actions })))
}

#[utoipa::path(responses((status = 200, description = "The audit metrics (nox_audit_*) in Prometheus text", content_type = "text/plain"), (status = 403, body = ErrorBody), (status = 404, description = "This process exports no metrics")), security(("bearer" = [])), tag = "admin-audit")]
#[get("/admin/audit/metrics")]
pub async fn audit_metrics(
    caller: Authenticated,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Auditor)?;
    let Some(handle) = &state.metrics.handle else {
        return Err(ApiError::NotFound(
            "metrics are not exported by this process".into(),
        ));
    };
    let text: String = handle
        .render()
        .lines()
        .filter(|line| {
            let name = line
                .strip_prefix("# HELP ")
                .or_else(|| line.strip_prefix("# TYPE "))
                .unwrap_or(line);
            name.starts_with("nox_audit_")
        })
        .map(|line| format!("{line}\n"))
        .collect();
    Ok(HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(text))
}
