//! The HTTP handlers, one module per group of endpoints, and [`routes`],
//! which registers them all. The audit read endpoints (`/admin/audit/*`)
//! live in [`crate::admin_audit`], [`crate::audit_logs`] and
//! [`crate::export`].

use actix_web::web;

pub mod files;
pub mod health;
pub mod me;
pub mod metrics;
pub mod quotas;
pub mod run;
pub mod users;

/// Registers every route; shared by the server and the tests.
pub fn routes(config: &mut web::ServiceConfig) {
    config
        .service(health::health)
        .service(crate::openapi::openapi_json)
        .service(metrics::metrics)
        .service(me::me)
        .configure(users::routes)
        .configure(files::routes)
        .configure(run::routes)
        .configure(quotas::routes)
        .configure(crate::admin_audit::routes);
}
