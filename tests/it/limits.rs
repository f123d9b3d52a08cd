//! Rate limits: per user and per address, with Retry-After, audited.

use nox_testkit::{send, spawn_app_with};
use reqwest::{Method, StatusCode};
use serde_json::Value;

#[tokio::test]
async fn users_and_addresses_are_limited_and_every_refusal_is_audited() {
    let app = spawn_app_with(|config| {
        config.rate_limit_per_user = 60;
        config.rate_limit_burst_per_user = 5;
        config.rate_limit_per_ip = 60;
        config.rate_limit_burst_per_ip = 3;
    })
    .await;
    let alice = app.new_user("alice").await;

    let mut statuses = Vec::new();
    for _ in 0..7 {
        statuses.push(app.get_as("/me", &alice.token).await.status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429, 429]);
    let refused = app.get_as("/me", &alice.token).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    let wait: u64 = refused.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=2).contains(&wait), "{wait}");
    let body: Value = refused.json().await.expect("json");
    assert_eq!(
        (body["code"].as_str(), body["retry_after"].as_u64()),
        (Some("rate_limited"), Some(wait))
    );

    // Anonymous callers share their address's limit; health checks are exempt.
    let anonymous: Vec<u16> = futures_util::future::join_all(
        (0..5).map(|_| async { send(app.client.get(app.url("/me"))).await.status().as_u16() }),
    )
    .await;
    assert_eq!(
        anonymous.iter().filter(|s| **s == 401).count(),
        3,
        "{anonymous:?}"
    );
    assert_eq!(
        anonymous.iter().filter(|s| **s == 429).count(),
        2,
        "{anonymous:?}"
    );
    for _ in 0..20 {
        assert_eq!(app.get("/health").await.status(), StatusCode::OK);
    }
    // Another user is unaffected by alice's limit.
    let bob = app.new_user("bob").await;
    assert_eq!(
        send(app.request(Method::GET, "/me", &bob.token))
            .await
            .status(),
        StatusCode::OK
    );

    let rows = app
        .db
        .client()
        .await
        .query(
            "SELECT user_id::text, quota_consumed->>'quota_type' FROM audit_actions
             WHERE quota_violation AND status_code = 429 ORDER BY timestamp",
            &[],
        )
        .await
        .expect("rows");
    let rows: Vec<(Option<String>, Option<String>)> =
        rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let user_rows = rows
        .iter()
        .filter(|r| r.1.as_deref() == Some("rate_limit_user"))
        .count();
    let ip_rows = rows
        .iter()
        .filter(|r| r.1.as_deref() == Some("rate_limit_ip"))
        .count();
    assert_eq!((user_rows, ip_rows), (3, 2), "{rows:?}");
    assert!(
        rows.iter()
            .filter(|r| r.1.as_deref() == Some("rate_limit_user"))
            .all(|r| r.0.as_deref() == Some(alice.id.as_str()))
    );
    assert!(
        rows.iter()
            .filter(|r| r.1.as_deref() == Some("rate_limit_ip"))
            .all(|r| r.0.is_none())
    );
}
