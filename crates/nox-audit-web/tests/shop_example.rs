//! The embedding example (`examples/shop.rs`) as a real service against
//! PostgreSQL: its requests are audited by its own taxonomy, read back
//! through the mounted audit endpoints behind its own hook, and exported;
//! its chains are verified.

#[path = "../examples/shop.rs"]
#[allow(dead_code)]
mod shop;

use std::net::TcpListener;

use actix_web::{App, HttpServer};
use nox_testkit::TestDb;
use serde_json::Value;

const TOKEN: &str = "shop-auditor-token";

/// An audit endpoint's JSON, read with the auditor's token.
async fn read(http: &reqwest::Client, url: &str) -> Value {
    let response = http.get(url).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(response.status(), 200, "{url}");
    response.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shop_audits_its_requests_and_serves_them_back() {
    let db = TestDb::empty().await;
    let state = tempfile::tempdir().unwrap();
    let shop = shop::start(db.url().parse().unwrap(), state.path(), TOKEN.into())
        .await
        .unwrap();
    let (audit, api) = (shop.audit.clone(), shop.api.clone());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let server = HttpServer::new(move || {
        App::new()
            .app_data(api.clone())
            .configure(shop::routes)
            .wrap(audit.clone())
    })
    .workers(1)
    .listen(listener)
    .unwrap()
    .run();
    let handle = server.handle();
    tokio::spawn(server);
    let http = reqwest::Client::new();

    let customer = "0193a000-0000-7000-8000-000000000001";
    let order: Value = http
        .post(format!("{base}/orders"))
        .header("x-customer", customer)
        // A formula an attacker hopes the auditor's spreadsheet will run.
        .header("user-agent", "=HYPERLINK(\"http://evil\")")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let hello = http.get(format!("{base}/hello")).send().await.unwrap();
    assert_eq!(hello.status(), 200);

    // The hook decides: no token and a wrong one are refused, and audited.
    let anonymous = http
        .get(format!("{base}/admin/audit/logs"))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    let body: Value = anonymous.json().await.unwrap();
    assert!(
        body["detail"].is_string() && body["code"].is_string(),
        "{body}"
    );
    let wrong = http
        .get(format!("{base}/admin/audit/logs"))
        .bearer_auth("guess")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);

    // A malformed typed parameter: JSON too, though the shop sets no
    // QueryConfig of its own.
    for path in [
        "checkpoints?limit=x",
        "users?days=%00",
        "daily-summaries?user_id=1",
    ] {
        let refused = http
            .get(format!("{base}/admin/audit/{path}"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), 400, "{path}");
        let body: Value = refused.json().await.unwrap();
        assert_eq!(body["code"], "invalid_parameter", "{path}: {body}");
    }

    let page = read(
        &http,
        &format!("{base}/admin/audit/logs?action_type=order_create"),
    )
    .await;
    let rows = page["logs"].as_array().expect("logs");
    assert_eq!(rows.len(), 1, "{page}");
    assert_eq!(rows[0]["user_id"], customer);
    assert_eq!(rows[0]["action_category"], "filesystem");
    assert_eq!(rows[0]["metadata"]["order_id"], order["order_id"]);

    let all = read(&http, &format!("{base}/admin/audit/logs")).await;
    let kinds: Vec<(&str, i64)> = all["logs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            (
                row["action_type"].as_str().unwrap(),
                row["status_code"].as_i64().unwrap(),
            )
        })
        .collect();
    for expected in [
        ("order_create", 201),
        ("shop_read", 200),
        ("admin_read", 401),
        ("admin_read", 200),
    ] {
        assert!(kinds.contains(&expected), "{expected:?} in {kinds:?}");
    }

    let export = http
        .get(format!("{base}/admin/audit/export?format=csv"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(export.status(), 200);
    let csv = export.text().await.unwrap();
    let header = csv.lines().next().unwrap();
    assert!(
        header.split(',').any(|column| column == "action_type"),
        "{header}"
    );
    assert!(csv.contains("order_create"), "{csv}");
    assert!(
        csv.contains("'=HYPERLINK")
            && !csv.contains(",=HYPERLINK")
            && !csv.contains(",\"=HYPERLINK"),
        "the formula is neutralised: {csv}"
    );

    // The verification's first pass runs at start.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let verification = loop {
        let status = read(&http, &format!("{base}/admin/audit/status")).await;
        if status["verification"]["outcome"] != "never" {
            break status["verification"].clone();
        }
        assert!(std::time::Instant::now() < deadline, "{status}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(verification["outcome"], "ok", "{verification}");
    assert_eq!(verification["interval_secs"], 60);
    assert_eq!(verification["chains"].as_array().map(Vec::len), Some(2));

    handle.stop(true).await;
    shop.verifier.shutdown().await;
    shop.writer.shutdown().await;
    let chained = db
        .scalar("SELECT count(*) FROM audit_actions WHERE seq IS NOT NULL")
        .await;
    assert!(chained >= 6, "every request chained: {chained}");
}
