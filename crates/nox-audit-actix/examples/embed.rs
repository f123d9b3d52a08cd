//! A service of its own that keeps a Nox audit trail.
//!
//! ```sh
//! DATABASE_URL=postgres://postgres@127.0.0.1/postgres \
//!     cargo run -p nox-audit-actix --example embed
//! curl -s localhost:8090/hello
//! curl -s -X POST localhost:8090/orders -H 'X-Customer: 0193a000-0000-7000-8000-000000000001'
//! psql "$DATABASE_URL" -c 'SELECT route, action_type, status_code, user_id FROM audit_actions'
//! ```
//!
//! It runs only the audit crates' migrations, recorded in a table of its own,
//! classifies its two routes with its own taxonomy, and tells the audit layer
//! who the caller is (here from a header; a real service would use its auth).

use std::str::FromStr;
use std::sync::Arc;

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, get, post};
use anyhow::Context;
use nox_audit_actix::{Audit, AuditConfig, record};
use nox_audit_model::SystemClock;
use nox_audit_model::taxonomy::{ActionKind, RouteMatch, Rule, Taxonomy};
use nox_audit_store::{
    AuditMode, AuditWriter, Migrator, PoolOptions, Spool, WriterConfig, build_pool, schema,
};
use uuid::Uuid;

const SHOP: Taxonomy = Taxonomy {
    rules: &[
        Rule {
            method: Some("POST"),
            route: RouteMatch::Exact("/orders"),
            kind: ActionKind {
                action_type: "order_create",
                category: "orders",
            },
        },
        Rule {
            method: None,
            route: RouteMatch::Exact("/hello"),
            kind: ActionKind {
                action_type: "greeting",
                category: "general",
            },
        },
    ],
    fallback: ActionKind {
        action_type: "other",
        category: "general",
    },
};

#[get("/hello")]
async fn hello() -> HttpResponse {
    HttpResponse::Ok().body("hello\n")
}

#[post("/orders")]
async fn create_order(request: HttpRequest) -> HttpResponse {
    let customer = request
        .headers()
        .get("x-customer")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| Uuid::parse_str(v).ok());
    let order = Uuid::now_v7();
    record(&request, |details| {
        details.user_id = customer;
        details
            .metadata_mut()
            .insert("order_id".into(), order.to_string().into());
    });
    HttpResponse::Created().json(serde_json::json!({ "order_id": order }))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::var("DATABASE_URL").context("set DATABASE_URL")?;
    let pg_config = tokio_postgres::Config::from_str(&url).context("DATABASE_URL")?;

    let (mut client, connection) = pg_config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Migrator::new(schema::MIGRATIONS)
        .with_table("shop_audit_migrations")
        .up(&mut client)
        .await?;

    let pool = build_pool(pg_config, &PoolOptions::default())?;
    let spool = Spool::open(std::env::temp_dir().join("shop-audit-spool"))?;
    let writer = AuditWriter::start(pool, spool, Arc::new(SystemClock), WriterConfig::default());
    let audit = Audit::new(
        AuditConfig {
            taxonomy: SHOP,
            mode: AuditMode::Durable,
            ..AuditConfig::default()
        },
        writer.sink(),
    );

    println!("listening on http://127.0.0.1:8090");
    HttpServer::new(move || {
        App::new()
            .service(hello)
            .service(create_order)
            .wrap(audit.clone())
    })
    .bind(("127.0.0.1", 8090))?
    .run()
    .await?;
    writer.shutdown().await;
    Ok(())
}
