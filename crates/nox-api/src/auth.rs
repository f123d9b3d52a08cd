//! Who is calling. A middleware resolves the bearer token of every request
//! once and leaves an [`Identity`] in the request's extensions (the audit
//! layer records it whatever the response); handlers that need a caller take
//! the [`Authenticated`] extractor, which turns a missing or bad identity
//! into 401 (or 503 when the token could not be checked).

use std::future::{Ready, ready};

use actix_web::body::MessageBody;
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::http::header::AUTHORIZATION;
use actix_web::middleware::Next;
use actix_web::{FromRequest, HttpMessage, HttpRequest, web};
use nox_auth::token::{self, parse_bearer};
use nox_auth::{AuthFailure, Caller, Role};

use crate::app::AppState;
use crate::error::ApiError;

#[derive(Debug, Clone)]
pub enum Identity {
    /// No `Authorization` header.
    Anonymous,
    /// A malformed header, or an unknown, revoked or expired token, or an
    /// inactive user.
    Invalid,
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

/// Resolves the request's identity; never rejects by itself.
pub async fn resolve_identity(
    request: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let header = request.headers().get(AUTHORIZATION).map(|value| {
        value
            .to_str()
            .ok()
            .and_then(parse_bearer)
            .map(str::to_owned)
    });
    let identity = match header {
        None => Identity::Anonymous,
        Some(None) => Identity::Invalid,
        Some(Some(token)) => match request.app_data::<web::Data<AppState>>() {
            Some(state) => match state.authenticator.authenticate(&state.pool, &token).await {
                Ok(caller) => {
                    let session_token_hash = hex::encode(&token::hash(&token)[..8]);
                    nox_audit_actix::record(&request, |details| {
                        details.user_id = Some(caller.user_id);
                        details.session_token_hash = Some(session_token_hash);
                    });
                    Identity::Caller(caller)
                }
                Err(AuthFailure::Invalid) => Identity::Invalid,
                Err(AuthFailure::Unavailable) => Identity::Unavailable,
            },
            None => Identity::Unavailable,
        },
    };
    request.extensions_mut().insert(identity);
    next.call(request).await
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
            Some(Identity::Invalid) => {
                Err(ApiError::Unauthorized("invalid, revoked or expired token"))
            }
            Some(Identity::Anonymous) | None => Err(ApiError::Unauthorized(
                "missing bearer token: send Authorization: Bearer <token>",
            )),
        })
    }
}
