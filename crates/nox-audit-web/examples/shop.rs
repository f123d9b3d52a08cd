//! A small service of its own that keeps a Nox audit trail and serves it:
//! two routes of its own, the audit middleware with its own taxonomy, and
//! the admin audit endpoints (search, statistics, export) behind its own
//! authorization hook, and the continuous verification of its hash chains.
//!
//! ```sh
//! DATABASE_URL=postgres://postgres@127.0.0.1/postgres SHOP_AUDITOR_TOKEN=s3cret-auditor-token \
//!     cargo run -p nox-audit-web --example shop   # state in ./shop-data (SHOP_STATE_DIR)
//! curl -s -X POST localhost:8090/orders -H 'X-Customer: 0193a000-0000-7000-8000-000000000001'
//! curl -s localhost:8090/admin/audit/logs -H 'Authorization: Bearer s3cret-auditor-token'
//! curl -s 'localhost:8090/admin/audit/export?format=csv' -H 'Authorization: Bearer s3cret-auditor-token'
//! ```
//!
//! It runs only the audit crates' migrations, recorded in a table of its
//! own, and tells the audit layer who the caller is (here from a header; a
//! real service would use its authentication). `tests/shop_example.rs` runs
//! it against PostgreSQL.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use actix_web::{HttpRequest, HttpResponse, get, post, web};
use anyhow::Context;
use nox_audit_actix::{Audit, AuditConfig, record};
use nox_audit_model::SystemClock;
use nox_audit_model::taxonomy::{ActionKind, RouteMatch, Rule, Taxonomy};
use nox_audit_store::checkpoints::Checkpointer;
use nox_audit_store::verify::{ContinuousVerifier, Verifier};
use nox_audit_store::{
    AuditWriter, Migrator, PoolOptions, Spool, WriterConfig, build_pool, schema,
};
use nox_audit_web::{Access, AuditApi, Authorize, Reader, WebError};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// The shop's actions, in the schema's categories (the daily rollups count
/// `filesystem`, `execution` and `admin`; see `nox-audit-model`).
const SHOP: Taxonomy = Taxonomy {
    rules: &[
        Rule {
            method: Some("POST"),
            route: RouteMatch::Exact("/orders"),
            kind: ActionKind {
                action_type: "order_create",
                category: "filesystem",
            },
        },
        Rule {
            method: None,
            route: RouteMatch::Under("/admin"),
            kind: ActionKind {
                action_type: "admin_read",
                category: "admin",
            },
        },
    ],
    fallback: ActionKind {
        action_type: "shop_read",
        category: "shop",
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
    record(&request, |row| {
        row.user_id = customer;
        row.metadata_mut()
            .insert("order_id".into(), order.to_string().into());
    });
    HttpResponse::Created().json(serde_json::json!({ "order_id": order }))
}

/// Who may read the trail: whoever presents the auditor token (a real
/// service would ask its own users and roles). Only its digest is kept, and
/// digests are compared, so the comparison's time says nothing of the token.
struct Auditors {
    token_sha256: [u8; 32],
}

fn sha256(text: &str) -> [u8; 32] {
    Sha256::digest(text.as_bytes()).into()
}

impl Auditors {
    fn bearer(request: &HttpRequest) -> Option<&str> {
        let header = request.headers().get("authorization")?.to_str().ok()?;
        header.strip_prefix("Bearer ")
    }
}

impl Authorize for Auditors {
    fn authenticate(&self, request: &HttpRequest) -> Result<(), actix_web::Error> {
        match Auditors::bearer(request) {
            Some(token) if sha256(token) == self.token_sha256 => Ok(()),
            _ => Err(WebError::Unauthorized("an auditor's token is needed".into()).into()),
        }
    }

    fn authorize(&self, _: &HttpRequest, _: Access) -> Result<Reader, actix_web::Error> {
        Ok(Reader::default())
    }
}

/// How often the hash chains are verified (the first time at start).
const VERIFY_EVERY: Duration = Duration::from_secs(60);

/// The running pieces: the writer (shut it down last), the verification,
/// the middleware and the audit endpoints' state.
#[derive(Debug)]
pub struct Shop {
    pub writer: AuditWriter,
    pub verifier: ContinuousVerifier,
    pub audit: Audit,
    pub api: web::Data<AuditApi>,
}

/// Migrates, then starts the audit writer; `state_dir` keeps the spool and
/// the checkpoint signing key.
pub async fn start(
    pg_config: tokio_postgres::Config,
    state_dir: &Path,
    auditor_token: String,
) -> anyhow::Result<Shop> {
    let (mut client, connection) = pg_config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Migrator::new(schema::MIGRATIONS)
        .with_table("shop_audit_migrations")
        .up(&mut client)
        .await?;

    let pool = build_pool(pg_config, &PoolOptions::default())?;
    let spool = Spool::open(state_dir.join("audit-spool"))?;
    let checkpointer = Checkpointer::open(
        &state_dir.join("audit-signing.key"),
        &state_dir.join("checkpoints"),
    )?;
    let writer = AuditWriter::start(
        pool.clone(),
        spool,
        Arc::new(SystemClock),
        WriterConfig::default(),
    );
    let audit = Audit::new(
        AuditConfig {
            taxonomy: SHOP,
            ..AuditConfig::default()
        },
        writer.sink(),
    );
    anyhow::ensure!(
        auditor_token.len() >= 16,
        "the auditor token must have at least 16 characters"
    );
    let auditors = Auditors {
        token_sha256: sha256(&auditor_token),
    };
    let verifier = Verifier::new(pool.clone(), checkpointer.public_key()).start(VERIFY_EVERY);
    let api = AuditApi::new(pool, writer.sink(), Arc::new(checkpointer), auditors)
        .verification_interval(Some(VERIFY_EVERY));
    Ok(Shop {
        writer,
        verifier,
        audit,
        api: web::Data::new(api),
    })
}

/// The shop's routes and the audit endpoints.
pub fn routes(config: &mut web::ServiceConfig) {
    config
        .service(hello)
        .service(create_order)
        .configure(nox_audit_web::services);
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::var("DATABASE_URL").context("set DATABASE_URL")?;
    let token = std::env::var("SHOP_AUDITOR_TOKEN").context("set SHOP_AUDITOR_TOKEN")?;
    let state_dir = std::env::var("SHOP_STATE_DIR").unwrap_or_else(|_| "shop-data".into());
    let shop = start(url.parse()?, Path::new(&state_dir), token).await?;

    let (audit, api) = (shop.audit.clone(), shop.api.clone());
    println!("listening on http://127.0.0.1:8090");
    actix_web::HttpServer::new(move || {
        actix_web::App::new()
            .app_data(api.clone())
            .configure(routes)
            .wrap(audit.clone())
    })
    .bind(("127.0.0.1", 8090))?
    .run()
    .await?;
    shop.verifier.shutdown().await;
    shop.writer.shutdown().await;
    Ok(())
}
