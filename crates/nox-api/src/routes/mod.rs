//! The HTTP handlers, one module per group of endpoints, and [`routes`],
//! which registers them all. The audit read endpoints (`/admin/audit/*`)
//! are `nox-audit-web`'s ([`crate::admin_audit`] gives them Nox's access
//! rules and state).

use actix_web::web;

pub mod console;
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
        .configure(console::routes)
        .configure(nox_audit_web::services);
}
