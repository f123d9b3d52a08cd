//! The rate-limit middleware: per user for requests with a valid token, per
//! client address for the others. It sits inside the audit layer and after
//! identity resolution, so every refusal is an audit record attributed to
//! whoever was refused.

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::{HttpMessage, ResponseError, web};
use nox_quota::Limited;
use serde_json::json;

use crate::app::AppState;
use crate::auth::Identity;
use crate::error::ApiError;

/// Never limited: health checks and scrapes.
const EXEMPT: &[&str] = &["/health", "/metrics"];

pub async fn rate_limit(
    request: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    let verdict = match request.app_data::<web::Data<AppState>>() {
        Some(state) if !EXEMPT.contains(&request.path()) => {
            let caller = request
                .extensions()
                .get::<Identity>()
                .and_then(|identity| identity.caller().map(|c| c.user_id));
            match caller {
                Some(user) => state.rate_limits.check_user(user),
                None => match nox_audit_actix::client_ip(
                    request.peer_addr().map(|a| a.ip()),
                    request.headers(),
                    &state.audit_config.trusted_proxies,
                ) {
                    Some(ip) => state.rate_limits.check_ip(ip),
                    None => Ok(()),
                },
            }
        }
        _ => Ok(()),
    };
    match verdict {
        Ok(()) => Ok(next.call(request).await?.map_into_left_body()),
        Err(limited) => {
            record_refusal(&request, &limited);
            let error = ApiError::RateLimited {
                detail: format!(
                    "rate limit exceeded: {} requests per minute (burst {})",
                    limited.rate.per_minute, limited.rate.burst
                ),
                retry_after_secs: limited.retry_after.as_secs_f64().ceil().max(1.0) as u64,
            };
            Ok(request
                .into_response(error.error_response())
                .map_into_right_body())
        }
    }
}

fn record_refusal(request: &ServiceRequest, limited: &Limited) {
    nox_audit_metrics::record_rate_limited(match limited.scope {
        nox_quota::Scope::User => "user",
        nox_quota::Scope::Ip => "ip",
    });
    nox_audit_actix::record(request, |details| {
        details.quota_violation = true;
        details.quota_consumed = Some(json!({
            "quota_type": limited.scope.quota_type(),
            "limit_per_minute": limited.rate.per_minute,
            "burst": limited.rate.burst,
        }));
        details.quota_remaining = Some(json!({
            "quota_type": limited.scope.quota_type(),
            "remaining": 0,
            "retry_after_ms": limited.retry_after.as_millis() as u64,
        }));
    });
}
