//! Blocking work (file I/O, workspace walks) on actix's blocking pool, with
//! the CPU that pool thread spends on it charged to the request's audit
//! record: the audit layer measures the HTTP worker's thread only, and for
//! a file operation most of the CPU is spent here.

use std::time::Duration;

use actix_web::{HttpRequest, web};

use crate::error::ApiError;

pub(crate) async fn block<T: Send + 'static>(
    request: &HttpRequest,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    let metered = nox_audit_actix::is_metered(request);
    let (result, cpu) = web::block(move || {
        if !metered {
            return (work(), Duration::ZERO);
        }
        let started = nox_audit_actix::thread_cpu_time();
        let result = work();
        (
            result,
            nox_audit_actix::thread_cpu_time().saturating_sub(started),
        )
    })
    .await?;
    nox_audit_actix::charge_cpu(request, cpu);
    Ok(result)
}
