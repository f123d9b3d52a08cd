//! Who is calling. A middleware resolves the bearer token of every request
//! once and leaves an [`Identity`] in the request's extensions (the audit
//! layer records it whatever the response); handlers that need a caller take
//! the [`Authenticated`] extractor, which turns a missing or bad identity
//! into 401 (or 503 when the token could not be checked).
//!
//! The order matters, because a token lookup is database work anyone can
//! cause: first memory (a token this instance accepted within
//! `NOX_AUTH_CACHE_TTL_MS`, or refused, or one that is not well-formed at
//! all); then, for every request memory does not resolve to a caller, the
//! per-address rate limit (`crate::admission::check_address`), which may refuse
//! it with 429; only then the database lookup of a token this instance has
//! never accepted. A token it accepted before whose periodic re-check is
//! due is looked up without a per-address charge: that costs at most one
//! lookup per token per TTL, and its caller's own limit applies after.
//! On `/health` and `/metrics` a token not known from memory is not looked
//! up at all ([`Identity::Unchecked`]): those paths are never limited, so
//! they must cause no database work.

use std::future::{Ready, ready};

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::http::header::AUTHORIZATION;
use actix_web::middleware::Next;
use actix_web::{FromRequest, HttpMessage, HttpRequest, web};
use nox_auth::token::{self, parse_bearer};
use nox_auth::{AuthFailure, Caller, Lookup, Role};

use crate::admission;
use crate::error::ApiError;
use crate::state::AppState;

#[derive(Debug, Clone)]
pub enum Identity {
    /// No `Authorization` header.
    Anonymous,
    /// A malformed header or token, or an unknown, revoked or expired
    /// token, or an inactive user.
    Invalid,
    /// A well-formed token not known from memory, left unchecked: on a path
    /// that never needs a caller (`/health`, `/metrics`), or because the
    /// per-address limit refused the request first.
    Unchecked,
    /// The token could not be checked: the database is unreachable.
    Unavailable,
    Caller(Caller),
}

impl Identity {
    pub fn caller(&self) -> Option<&Caller> {
        match self {
            Identity::Caller(caller) => Some(caller),
            _ => None,
        }
    }
}

/// Resolves the request's identity, charging the per-address rate limit
/// before any token lookup (see the module's documentation). Refuses only
/// with that limit's 429; everything else is left to the handlers.
pub async fn resolve_identity(
    request: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    let Some(state) = request.app_data::<web::Data<AppState>>().cloned() else {
        request.extensions_mut().insert(Identity::Unavailable);
        return Ok(next.call(request).await?.map_into_left_body());
    };
    let token = request.headers().get(AUTHORIZATION).map(|value| {
        value
            .to_str()
            .ok()
            .and_then(parse_bearer)
            .map(str::to_owned)
    });
    // 1. Memory.
    let (identity, check) = match &token {
        None => (Identity::Anonymous, None),
        Some(None) => (Identity::Invalid, None),
        Some(Some(token)) => match state.authenticator.cached(token) {
            Lookup::Known(caller) => (Identity::Caller(caller), None),
            Lookup::Refused => (Identity::Invalid, None),
            Lookup::Check(check) if !check.is_known_token() && admission::is_exempt(&request) => {
                (Identity::Unchecked, None)
            }
            Lookup::Check(check) => (Identity::Unchecked, Some(check)),
        },
    };
    // 2. The per-address limit, for all but callers known from memory.
    let known = identity.caller().is_some() || check.as_ref().is_some_and(|c| c.is_known_token());
    if !known && let Err(limited) = admission::check_address(&request, &state) {
        request.extensions_mut().insert(identity);
        return Ok(admission::refusal(request, &limited).map_into_right_body());
    }
    // 3. The database.
    let identity = match check {
        Some(check) => match check.run(&state.pool).await {
            Ok(caller) => Identity::Caller(caller),
            Err(AuthFailure::Invalid) => Identity::Invalid,
            Err(AuthFailure::Unavailable) => Identity::Unavailable,
        },
        None => identity,
    };
    if let (Identity::Caller(caller), Some(Some(token))) = (&identity, &token) {
        let session_token_hash = hex::encode(&token::hash(token)[..8]);
        nox_audit_actix::record(&request, |details| {
            details.user_id = Some(caller.user_id);
            details.session_token_hash = Some(session_token_hash);
        });
    }
    request.extensions_mut().insert(identity);
    Ok(next.call(request).await?.map_into_left_body())
}

/// A request with a valid token.
#[derive(Debug, Clone)]
pub struct Authenticated(pub Caller);

impl Authenticated {
    /// The caller, if their role is at least `minimum`; else 403.
    pub fn require(&self, minimum: Role) -> Result<&Caller, ApiError> {
        if self.0.has_role(minimum) {
            Ok(&self.0)
        } else {
            Err(ApiError::Forbidden(format!(
                "this endpoint requires the {} role",
                minimum.as_str()
            )))
        }
    }
}

impl FromRequest for Authenticated {
    type Error = ApiError;
    type Future = Ready<Result<Self, Self::Error>>;

    fn from_request(request: &HttpRequest, _: &mut Payload) -> Self::Future {
        let identity = request.extensions().get::<Identity>().cloned();
        ready(match identity {
            Some(Identity::Caller(caller)) => Ok(Authenticated(caller)),
            Some(Identity::Unavailable) => Err(ApiError::ServiceUnavailable(
                "the token cannot be checked: the database is unavailable".into(),
            )),
            Some(Identity::Invalid | Identity::Unchecked) => {
                Err(ApiError::Unauthorized("invalid, revoked or expired token"))
            }
            Some(Identity::Anonymous) | None => Err(ApiError::Unauthorized(
                "missing bearer token: send Authorization: Bearer <token>",
            )),
        })
    }
}
