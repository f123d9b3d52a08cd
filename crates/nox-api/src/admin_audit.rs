//! Nox's side of the admin audit endpoints, which `nox-audit-web` serves:
//! who may read and export the trail (auditors and admins), and the state
//! the endpoints share. Every call is itself audited (`admin_read`, or
//! `audit_export`) by the audit layer, with the caller the identity layer
//! resolved.

use std::sync::Arc;

use actix_web::{FromRequest, HttpRequest, web};
use nox_audit_query::UserNames;
use nox_audit_web::{Access, AuditApi, Authorize, Reader};
use nox_auth::Role;

use crate::auth::Authenticated;
use crate::error::ApiError;
use crate::state::AppState;

/// The endpoints' state, built once from the app's.
pub fn api(state: &AppState) -> web::Data<AuditApi> {
    let users = UserNames::new("users", "id", "name").expect("plain identifiers");
    let api = AuditApi::new(
        state.pool.clone(),
        state.audit.clone(),
        Arc::clone(&state.checkpointer),
        Auditors,
    )
    .mode(state.audit_config.mode)
    .version(crate::VERSION)
    .metrics(state.metrics.handle.clone())
    .clock(Arc::clone(&state.audit_config.clock))
    .exports(Arc::clone(&state.exports))
    .work_runtime(state.work_runtime.clone())
    .user_names(users)
    .commit_feed(state.commit_feed.clone())
    .stream_limits(state.stream_limits.clone())
    .verification_interval(state.audit_verify_interval);
    let api = match &state.read_pool {
        Some(pool) => api.read_replica(pool.clone(), state.read_max_lag),
        None => api,
    };
    web::Data::new(api)
}

/// Auditors and admins may read and export. A missing or bad token is
/// refused first (401, or 503 when it cannot be checked), then a lower role
/// (403), then malformed parameters (400).
#[derive(Debug)]
struct Auditors;

fn caller(request: &HttpRequest) -> Result<Authenticated, ApiError> {
    Authenticated::extract(request).into_inner()
}

impl Authorize for Auditors {
    fn authenticate(&self, request: &HttpRequest) -> Result<(), actix_web::Error> {
        caller(request)?;
        Ok(())
    }

    fn authorize(&self, request: &HttpRequest, _: Access) -> Result<Reader, actix_web::Error> {
        let caller = caller(request)?;
        let caller = caller.require(Role::Auditor)?;
        Ok(Reader {
            user_id: Some(caller.user_id),
        })
    }

    /// `X-Nox-Justification`, as for admin changes.
    fn justification(&self, request: &HttpRequest) -> Result<Option<String>, actix_web::Error> {
        Ok(crate::routes::users::justification(request)?)
    }
}
