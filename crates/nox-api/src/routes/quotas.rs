//! The `/quotas/*` endpoints. Enforcement (the request-quota middleware and
//! the helpers the file and run endpoints use) is in [`crate::admission`].

use actix_web::{HttpRequest, HttpResponse, get, post, put, web};
use nox_audit_model::{AdminAction, AdminActionType};
use nox_auth::{Caller, Role, Tier};
use nox_quota::{Limits, tier_limits};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::admission::limits_of;
use crate::auth::Authenticated;
use crate::error::{ApiError, ErrorBody};
use crate::state::AppState;
use crate::storage_quota::MIB;

pub fn routes(config: &mut web::ServiceConfig) {
    config
        .service(my_quotas)
        .service(my_usage)
        .service(my_violations)
        .service(admin_get_quotas)
        .service(admin_put_quotas)
        .service(admin_violations)
        .service(admin_statistics)
        .service(admin_reset);
}

fn quotas_json(tier: Tier, limits: &Limits) -> Value {
    json!({
        "tier": tier,
        "req_hour": limits.req_hour,
        "req_day": limits.req_day,
        "cpu_seconds": limits.cpu_seconds,
        "mem_mb": limits.mem_mb,
        "storage_mb": limits.storage_mb,
        "files_max": limits.files_max,
    })
}

fn percent(used: u64, limit: Option<u64>) -> Option<f64> {
    limit.map(|limit| {
        if limit == 0 {
            100.0
        } else {
            ((used as f64 / limit as f64) * 1000.0).round() / 10.0
        }
    })
}

#[utoipa::path(responses((status = 200, description = "The caller's effective limits (null: unlimited)")), security(("bearer" = [])), tag = "quotas")]
#[get("/quotas/my/quotas")]
pub async fn my_quotas(caller: Authenticated, state: web::Data<AppState>) -> HttpResponse {
    let limits = limits_of(&state, &caller.0).await;
    HttpResponse::Ok().json(quotas_json(caller.0.tier, &limits))
}

async fn usage_json(
    request: &HttpRequest,
    state: &web::Data<AppState>,
    caller: &Caller,
) -> Result<Value, ApiError> {
    let limits = limits_of(state, caller).await;
    let windows = state.quotas.usage(caller.user_id);
    let user = caller.user_id;
    let handler_state = state.clone();
    let storage =
        crate::blocking::block(request, move || -> Result<nox_sandbox::Usage, ApiError> {
            let workspace = handler_state.workspaces.open(user)?;
            Ok(handler_state.workspaces.usage(user, &workspace)?)
        })
        .await??;
    let cpu_seconds = windows.cpu_ms_day as f64 / 1000.0;
    let storage_mb = storage.bytes as f64 / MIB as f64;
    Ok(json!({
        "usage": {
            "req_hour": windows.req_hour,
            "req_day": windows.req_day,
            "cpu_seconds": cpu_seconds,
            "storage_mb": (storage_mb * 1000.0).round() / 1000.0,
            "files_count": storage.files,
            // False when the workspace was too deep or too large to measure
            // whole: it then counts as over its storage and files quotas.
            "storage_complete": !storage.incomplete,
        },
        "quotas": quotas_json(caller.tier, &limits),
        "percentages": {
            "req_hour": percent(windows.req_hour, limits.req_hour),
            "req_day": percent(windows.req_day, limits.req_day),
            "cpu_seconds": percent(windows.cpu_ms_day / 1000, limits.cpu_seconds),
            "storage_mb": percent(storage.bytes / MIB, limits.storage_mb),
            "files_count": percent(storage.files, limits.files_max),
        },
        "resets": { "hour": nox_audit_export::rfc3339_json(windows.hour_resets_at), "day": nox_audit_export::rfc3339_json(windows.day_resets_at) },
    }))
}

#[utoipa::path(responses((status = 200, description = "Usage, limits, percentages and window resets; reachable over quota")), security(("bearer" = [])), tag = "quotas")]
#[get("/quotas/my/usage")]
pub async fn my_usage(
    request: HttpRequest,
    caller: Authenticated,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(usage_json(&request, &state, &caller.0).await?))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct ViolationsQuery {
    /// How far back, 1 to 8760 hours (default 24).
    pub hours: Option<i64>,
    pub user_id: Option<Uuid>,
    /// At most this many, 1 to 1000 (default 100).
    pub limit: Option<i64>,
}

/// Quota refusals are audit rows: they are read from there.
async fn violations(
    state: &AppState,
    user: Option<Uuid>,
    hours: i64,
    limit: i64,
) -> Result<Vec<Value>, ApiError> {
    let client = state.pool.get().await?;
    let rows = client
        .query(
            "SELECT \"timestamp\", user_id, quota_consumed->>'quota_type',
                    (quota_consumed->>'current_usage')::bigint, (quota_remaining->>'limit')::bigint,
                    endpoint, request_id
             FROM audit_actions
             WHERE quota_violation AND ($1::uuid IS NULL OR user_id = $1)
               AND \"timestamp\" >= now() - make_interval(hours => $2::int)
             ORDER BY \"timestamp\" DESC LIMIT $3",
            &[&user, &(hours as i32), &limit],
        )
        .await
        .map_err(ApiError::internal)?;
    Ok(rows
        .iter()
        .map(|row| {
            let at: time::OffsetDateTime = row.get(0);
            json!({
                "timestamp": nox_audit_export::rfc3339_json(at),
                "user_id": row.get::<_, Option<Uuid>>(1),
                "quota_type": row.get::<_, Option<String>>(2),
                "current_usage": row.get::<_, Option<i64>>(3),
                "limit": row.get::<_, Option<i64>>(4),
                "endpoint": row.get::<_, String>(5),
                "request_id": row.get::<_, Uuid>(6),
            })
        })
        .collect())
}

fn hours_and_limit(query: &ViolationsQuery) -> Result<(i64, i64), ApiError> {
    let hours = query.hours.unwrap_or(24);
    if !(1..=8760).contains(&hours) {
        return Err(ApiError::InvalidParameter("hours must be 1 to 8760".into()));
    }
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::InvalidParameter("limit must be 1 to 1000".into()));
    }
    Ok((hours, limit))
}

#[utoipa::path(params(ViolationsQuery), responses((status = 200, description = "The caller's quota refusals")), security(("bearer" = [])), tag = "quotas")]
#[get("/quotas/my/violations")]
pub async fn my_violations(
    caller: Authenticated,
    state: web::Data<AppState>,
    query: web::Query<ViolationsQuery>,
) -> Result<HttpResponse, ApiError> {
    let (hours, limit) = hours_and_limit(&query)?;
    let list = violations(&state, Some(caller.0.user_id), hours, limit).await?;
    Ok(HttpResponse::Ok().json(json!({ "total": list.len(), "hours": hours, "violations": list })))
}

#[utoipa::path(params(ViolationsQuery), responses((status = 200, description = "Quota refusals of all users"), (status = 403, body = ErrorBody)), security(("bearer" = [])), tag = "quotas")]
#[get("/quotas/admin/violations")]
pub async fn admin_violations(
    caller: Authenticated,
    state: web::Data<AppState>,
    query: web::Query<ViolationsQuery>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Admin)?;
    let (hours, limit) = hours_and_limit(&query)?;
    let list = violations(&state, query.user_id, hours, limit).await?;
    Ok(HttpResponse::Ok().json(json!({ "total": list.len(), "hours": hours, "user_id": query.user_id, "violations": list })))
}

/// A user's tier and overrides, for the admin endpoints.
async fn stored_quotas(state: &AppState, user: Uuid) -> Result<(Tier, Limits), ApiError> {
    let record = nox_auth::store::get_user(&state.pool, user).await?;
    let overrides = state.quotas.read_overrides(user).await.map_err(|error| {
        tracing::warn!(%error, "a user's quota overrides could not be read");
        ApiError::ServiceUnavailable("the quota overrides cannot be read right now".into())
    })?;
    Ok((record.tier, overrides))
}

#[utoipa::path(params(("id" = Uuid, Path)), responses((status = 200, description = "The tier, the per-user overrides and the effective limits"), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)), security(("bearer" = [])), tag = "quotas")]
#[get("/quotas/admin/users/{id}/quotas")]
pub async fn admin_get_quotas(
    caller: Authenticated,
    state: web::Data<AppState>,
    id: web::Path<Uuid>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Admin)?;
    let (tier, overrides) = stored_quotas(&state, *id).await?;
    let mut body = quotas_json(tier, &tier_limits(tier.as_str()).with_overrides(&overrides));
    body["user_id"] = json!(*id);
    body["overrides"] = serde_json::to_value(overrides).unwrap_or_default();
    Ok(HttpResponse::Ok().json(body))
}

/// The largest limit an admin can set: far beyond any real use, and small
/// enough that the quota arithmetic (seconds to milliseconds, MiB to bytes)
/// cannot overflow. (`cpu_seconds: 9223372036854775807` was accepted and
/// then overflowed in the CPU check of the user's next run.)
pub const MAX_LIMIT: u64 = 1_000_000_000_000;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QuotaUpdate {
    pub tier: Option<Tier>,
    // Each limit: a number up to MAX_LIMIT, or `null` for the tier's.
    #[serde(default, deserialize_with = "crate::routes::users::present")]
    #[schema(value_type = Option<u64>, maximum = 1_000_000_000_000_u64)]
    pub req_hour: Option<Option<u64>>,
    #[serde(default, deserialize_with = "crate::routes::users::present")]
    #[schema(value_type = Option<u64>, maximum = 1_000_000_000_000_u64)]
    pub req_day: Option<Option<u64>>,
    #[serde(default, deserialize_with = "crate::routes::users::present")]
    #[schema(value_type = Option<u64>, maximum = 1_000_000_000_000_u64)]
    pub cpu_seconds: Option<Option<u64>>,
    #[serde(default, deserialize_with = "crate::routes::users::present")]
    #[schema(value_type = Option<u64>, maximum = 1_000_000_000_000_u64)]
    pub mem_mb: Option<Option<u64>>,
    #[serde(default, deserialize_with = "crate::routes::users::present")]
    #[schema(value_type = Option<u64>, maximum = 1_000_000_000_000_u64)]
    pub storage_mb: Option<Option<u64>>,
    #[serde(default, deserialize_with = "crate::routes::users::present")]
    #[schema(value_type = Option<u64>, maximum = 1_000_000_000_000_u64)]
    pub files_max: Option<Option<u64>>,
}

#[utoipa::path(params(("id" = Uuid, Path)), request_body = QuotaUpdate, responses((status = 200, description = "The new tier, overrides and effective limits"), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)), security(("bearer" = [])), tag = "quotas")]
#[put("/quotas/admin/users/{id}/quotas")]
pub async fn admin_put_quotas(
    caller: Authenticated,
    request: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<Uuid>,
    body: web::Json<QuotaUpdate>,
) -> Result<HttpResponse, ApiError> {
    let admin = caller.require(Role::Admin)?;
    let user = *id;
    for (name, value) in [
        ("req_hour", body.req_hour),
        ("req_day", body.req_day),
        ("cpu_seconds", body.cpu_seconds),
        ("mem_mb", body.mem_mb),
        ("storage_mb", body.storage_mb),
        ("files_max", body.files_max),
    ] {
        if value.flatten().is_some_and(|v| v > MAX_LIMIT) {
            return Err(ApiError::InvalidParameter(format!(
                "{name} must be at most {MAX_LIMIT} (null: the tier's limit)"
            )));
        }
    }
    let (old_tier, old) = stored_quotas(&state, user).await?;
    let pick = |change: Option<Option<u64>>, current: Option<u64>| change.unwrap_or(current);
    let new = Limits {
        req_hour: pick(body.req_hour, old.req_hour),
        req_day: pick(body.req_day, old.req_day),
        cpu_seconds: pick(body.cpu_seconds, old.cpu_seconds),
        mem_mb: pick(body.mem_mb, old.mem_mb),
        storage_mb: pick(body.storage_mb, old.storage_mb),
        files_max: pick(body.files_max, old.files_max),
    };
    let new_tier = body.tier.unwrap_or(old_tier);
    let values = |tier: Tier, limits: &Limits| json!({ "tier": tier, "overrides": limits });
    let action = AdminAction::new(AdminActionType::QuotaUpdate, Some(admin.user_id))
        .target(user)
        .old_values(values(old_tier, &old))
        .new_values(values(new_tier, &new))
        .justification(crate::routes::users::justification(&request)?);
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await.map_err(ApiError::internal)?;
    nox_auth::store::set_tier(&*tx, user, new_tier)
        .await
        .map_err(ApiError::internal)?;
    nox_quota::store::save_overrides(&*tx, user, &new)
        .await
        .map_err(ApiError::internal)?;
    nox_audit_store::admin_actions::record(&tx, &action)
        .await
        .map_err(ApiError::internal)?;
    tx.commit().await.map_err(ApiError::internal)?;
    // The tier is cached with the token; the overrides with the counters.
    state.authenticator.forget_user(user);
    state.quotas.install_overrides(user, new);
    let mut response = quotas_json(
        new_tier,
        &tier_limits(new_tier.as_str()).with_overrides(&new),
    );
    response["user_id"] = json!(user);
    response["overrides"] = serde_json::to_value(new).unwrap_or_default();
    Ok(HttpResponse::Ok().json(response))
}

#[utoipa::path(params(("id" = Uuid, Path)), responses((status = 200, description = "The current hour and day windows are cleared"), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)), security(("bearer" = [])), tag = "quotas")]
#[post("/quotas/admin/users/{id}/reset")]
pub async fn admin_reset(
    caller: Authenticated,
    request: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<Uuid>,
) -> Result<HttpResponse, ApiError> {
    let admin = caller.require(Role::Admin)?;
    let user = *id;
    nox_auth::store::get_user(&state.pool, user).await?;
    let before = state.quotas.usage(user);
    state
        .quotas
        .reset(user)
        .await
        .map_err(|e| ApiError::internal(anyhow::anyhow!(e)))?;
    let action = AdminAction::new(AdminActionType::QuotaReset, Some(admin.user_id))
        .target(user)
        .old_values(json!({ "req_hour": before.req_hour, "req_day": before.req_day, "cpu_ms_day": before.cpu_ms_day }))
        .new_values(json!({ "req_hour": 0, "req_day": 0, "cpu_ms_day": 0 }))
        .justification(crate::routes::users::justification(&request)?);
    let mut client = state.pool.get().await?;
    nox_audit_store::admin_actions::record_alone(&mut client, &action)
        .await
        .map_err(ApiError::internal)?;
    Ok(HttpResponse::Ok().json(json!({ "message": "Quota windows reset", "user_id": user })))
}

#[derive(Debug, Serialize)]
struct Statistics {
    total_users: i64,
    active_users: i64,
    requests_this_hour: i64,
    requests_today: i64,
    cpu_seconds_today: f64,
    violations_last_24h: i64,
}

#[utoipa::path(responses((status = 200, description = "Totals over all users"), (status = 403, body = ErrorBody)), security(("bearer" = [])), tag = "quotas")]
#[get("/quotas/admin/statistics")]
pub async fn admin_statistics(
    caller: Authenticated,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Admin)?;
    // What this server counted but has not written yet.
    let _ = state.quotas.flush().await;
    let mut client = state.pool.get().await?;
    // One snapshot for the three reads, as when they were one statement.
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(ApiError::internal)?;
    let users = nox_auth::store::count_users(&*tx)
        .await
        .map_err(ApiError::internal)?;
    let usage = nox_quota::store::usage_totals(&*tx)
        .await
        .map_err(ApiError::internal)?;
    let violations: i64 = tx
        .query_one(
            "SELECT count(*) FROM audit_actions WHERE quota_violation AND \"timestamp\" >= now() - interval '24 hours'",
            &[],
        )
        .await
        .map_err(ApiError::internal)?
        .get(0);
    tx.commit().await.map_err(ApiError::internal)?;
    // The totals count leased requests; this server's unspent ones are not
    // used (other servers' are at most a block per user, for a second).
    let (unspent_hour, unspent_day) = state.quotas.unspent_leases();
    let statistics = Statistics {
        total_users: users.total,
        active_users: users.active,
        requests_this_hour: (usage.requests_this_hour - unspent_hour as i64).max(0),
        requests_today: (usage.requests_today - unspent_day as i64).max(0),
        cpu_seconds_today: usage.cpu_ms_today as f64 / 1000.0,
        violations_last_24h: violations,
    };
    Ok(HttpResponse::Ok().json(json!({ "statistics": statistics })))
}
