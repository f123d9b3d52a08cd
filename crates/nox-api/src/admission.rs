//! Admission: the in-flight cap, the rate limits and the request quotas,
//! and the quota helpers the file and run endpoints use.
//!
//! Outermost first, a request meets:
//! 1. [`shed_overload`], just inside the audit layer: beyond
//!    `NOX_MAX_INFLIGHT` requests in flight (all workers together) it is
//!    answered 503 with `Retry-After: 1` at once: no identity, no database
//!    work, no body read; still audited.
//! 2. The identity middleware (`crate::auth`): a token this instance knows
//!    is resolved from memory; every other request (no token, a malformed
//!    or refused one, or one that needs a database lookup) is charged to its
//!    client address's limit ([`check_address`]) *before* any lookup, and
//!    refused with [`refusal`] when over it.
//! 3. [`rate_limit`]: the per-user limit, for requests with a valid token.
//! 4. [`enforce_request_quota`]: the hour and day request quotas (not
//!    `/quotas/my/*`, nor an admin's `/quotas/admin/*`).
//!
//! Every refusal is an audit record attributed to whoever was refused (the
//! caller, or nobody when the token was never looked up).

use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use actix_web::body::{BodySize, BoxBody, EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderValue, RETRY_AFTER};
use actix_web::middleware::Next;
use actix_web::web::Bytes;
use actix_web::{HttpMessage, ResponseError, web};
use nox_auth::{Caller, Role};
use nox_quota::{Limited, Limits, Violation, tier_limits};
use serde_json::json;

use crate::auth::Identity;
use crate::error::ApiError;
use crate::state::AppState;

/// Never limited nor shed, and never the cause of a token lookup: health
/// checks, scrapes, and the console's files (`crate::routes::console`).
const EXEMPT: &[&str] = &["/health", "/metrics"];

pub(crate) fn is_exempt(request: &ServiceRequest) -> bool {
    EXEMPT.contains(&request.path()) || crate::routes::console::is_asset(request.path())
}

/// The per-user rate limit, for requests whose identity resolved to a
/// caller. (The per-address limit is charged earlier, by the identity
/// middleware, so that it comes before any token lookup.)
pub async fn rate_limit(
    request: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    let verdict = match request.app_data::<web::Data<AppState>>() {
        Some(state) if !is_exempt(&request) => {
            let caller = request
                .extensions()
                .get::<Identity>()
                .and_then(|identity| identity.caller().map(|c| c.user_id));
            match caller {
                Some(user) => state.rate_limits.check_user(user),
                None => Ok(()),
            }
        }
        _ => Ok(()),
    };
    match verdict {
        Ok(()) => Ok(next.call(request).await?.map_into_left_body()),
        Err(limited) => Ok(refusal(request, &limited).map_into_right_body()),
    }
}

/// Charges the request's client address (an IPv6 client's /64): called by
/// the identity middleware for every request it cannot resolve to a caller
/// from memory, before any database lookup. Exempt paths are never charged.
pub(crate) fn check_address(request: &ServiceRequest, state: &AppState) -> Result<(), Limited> {
    if is_exempt(request) {
        return Ok(());
    }
    match nox_audit_actix::client_ip(
        request.peer_addr().map(|a| a.ip()),
        request.headers(),
        &state.audit_config.trusted_proxies,
    ) {
        Some(ip) => state.rate_limits.check_ip(ip),
        None => Ok(()),
    }
}

/// The 429 answer to a rate-limit refusal, recorded in the request's audit
/// row and the metrics.
pub(crate) fn refusal(request: ServiceRequest, limited: &Limited) -> ServiceResponse {
    record_refusal(&request, limited);
    let error = ApiError::RateLimited {
        detail: format!(
            "rate limit exceeded: {} requests per minute (burst {})",
            limited.rate.per_minute, limited.rate.burst
        ),
        retry_after_secs: limited.retry_after.as_secs_f64().ceil().max(1.0) as u64,
    };
    request.into_response(error.error_response())
}

fn record_refusal(request: &ServiceRequest, limited: &Limited) {
    crate::metrics::record_rate_limited(match limited.scope {
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

/// The requests in flight in this process, all workers together: one
/// counter, built once in `AppState::build`.
#[derive(Debug)]
pub struct InFlight {
    count: AtomicUsize,
    max: usize,
}

/// One request's place among those in flight; freed when dropped (the
/// response body ended, or the request was dropped or cancelled).
#[derive(Debug)]
pub struct Slot(Arc<InFlight>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::AcqRel);
    }
}

impl InFlight {
    pub fn new(max: usize) -> Arc<InFlight> {
        Arc::new(InFlight {
            count: AtomicUsize::new(0),
            max,
        })
    }

    /// Requests in flight now.
    pub fn current(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// A slot, unless `max` requests are in flight already.
    pub fn try_enter(self: &Arc<Self>) -> Option<Slot> {
        self.count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(Arc::clone(self)))
    }
}

/// Sheds load beyond `NOX_MAX_INFLIGHT`: mounted just inside the audit
/// layer, so a shed request gets its audit row and nothing else (no
/// identity, no database work, no body read). A request holds its slot
/// until its response body has been sent, or it is dropped.
pub async fn shed_overload(
    request: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<EitherBody<InFlightBody>>, actix_web::Error> {
    let in_flight = match request.app_data::<web::Data<AppState>>() {
        Some(state) if !is_exempt(&request) => Arc::clone(&state.in_flight),
        _ => {
            return Ok(next
                .call(request)
                .await?
                .map_body(|_, body| EitherBody::left(InFlightBody::new(body, None))));
        }
    };
    let Some(slot) = in_flight.try_enter() else {
        crate::metrics::record_shed();
        let mut response = ApiError::ServiceUnavailable(format!(
            "the server is busy ({} requests in flight); retry shortly",
            in_flight.max()
        ))
        .error_response();
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static("1"));
        return Ok(request.into_response(response).map_into_right_body());
    };
    // Held by the request too, which lives until its response leaves the
    // audit layer: in durable mode that is after the record's commit, so
    // requests waiting for the audit writer still count.
    let slot = Rc::new(slot);
    request.extensions_mut().insert(HeldSlot(Rc::clone(&slot)));
    let response = next.call(request).await?;
    Ok(response.map_body(|_, body| EitherBody::left(InFlightBody::new(body, Some(slot)))))
}

/// The request's share of its slot (see [`shed_overload`]).
struct HeldSlot(#[allow(dead_code)] Rc<Slot>);

/// A response body that holds its request's in-flight slot until it is
/// dropped.
pub struct InFlightBody {
    body: BoxBody,
    _slot: Option<Rc<Slot>>,
}

impl InFlightBody {
    fn new(body: impl MessageBody + 'static, slot: Option<Rc<Slot>>) -> Self {
        InFlightBody {
            body: body.boxed(),
            _slot: slot,
        }
    }
}

impl std::fmt::Debug for InFlightBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InFlightBody").finish_non_exhaustive()
    }
}

impl MessageBody for InFlightBody {
    type Error = Box<dyn std::error::Error>;

    fn size(&self) -> BodySize {
        self.body.size()
    }

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_next(cx)
    }

    /// A body already in memory is sent as bytes: the body's share of the
    /// slot is dropped here, the request's when it is.
    fn try_into_bytes(self) -> Result<Bytes, Self> {
        let InFlightBody { body, _slot } = self;
        body.try_into_bytes()
            .map_err(|body| InFlightBody { body, _slot })
    }
}

/// Endpoints a user over quota can still reach, and that do not count.
const OWN_QUOTA_PREFIX: &str = "/quotas/my/";
const ADMIN_QUOTA_PREFIX: &str = "/quotas/admin/";

/// The caller's effective limits: their tier's, overridden per field.
pub async fn limits_of(state: &AppState, caller: &Caller) -> Limits {
    state.quotas.load(caller.user_id).await;
    tier_limits(caller.tier.as_str()).with_overrides(&state.quotas.overrides(caller.user_id))
}

/// Records a refusal in the request's audit row.
pub fn record_violation<M: HttpMessage>(message: &M, violation: &Violation) {
    crate::metrics::record_quota_violation(violation.quota_type);
    nox_audit_actix::record(message, |details| {
        details.quota_violation = true;
        details.quota_consumed = Some(json!({
            "quota_type": violation.quota_type,
            "current_usage": violation.current_usage,
        }));
        details.quota_remaining = Some(json!({
            "quota_type": violation.quota_type,
            "limit": violation.limit,
            "remaining": violation.limit.saturating_sub(violation.current_usage),
        }));
    });
}

/// Counts each authenticated request against the hour and day quotas.
pub async fn enforce_request_quota(
    request: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    let caller = request
        .extensions()
        .get::<Identity>()
        .and_then(|identity| identity.caller().cloned());
    let state = request.app_data::<web::Data<AppState>>().cloned();
    if let (Some(caller), Some(state)) = (caller, state)
        && !request.path().starts_with(OWN_QUOTA_PREFIX)
        // An admin can always reach the quota admin API, so one who set
        // their own request quota to 0 can undo it.
        && !(caller.role == Role::Admin && request.path().starts_with(ADMIN_QUOTA_PREFIX))
        // Health checks and scrapes are never limited, nor counted.
        && !is_exempt(&request)
    {
        let limits = limits_of(&state, &caller).await;
        if let Err(violation) = state
            .quotas
            .try_count_request(caller.user_id, &limits)
            .await
        {
            record_violation(&request, &violation);
            let response = ApiError::QuotaExceeded(violation).error_response();
            return Ok(request.into_response(response).map_into_right_body());
        }
    }
    Ok(next.call(request).await?.map_into_left_body())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_bounded_and_freed_on_drop() {
        let in_flight = InFlight::new(2);
        let a = in_flight.try_enter().expect("first");
        let b = in_flight.try_enter().expect("second");
        assert!(in_flight.try_enter().is_none(), "the cap holds");
        assert_eq!(in_flight.current(), 2);
        drop(a);
        let c = in_flight.try_enter().expect("a freed slot is reused");
        drop((b, c));
        assert_eq!(in_flight.current(), 0);
    }
}
