//! Rate limits: per user and per address, with Retry-After, audited; the
//! per-address limit before any token lookup; the in-flight cap.

use nox_testkit::{TEST_ADMIN_TOKEN, send, spawn_app, spawn_app_with};
use reqwest::{Method, StatusCode};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn users_and_addresses_are_limited_and_every_refusal_is_audited() {
    let app = spawn_app_with(|config| {
        config.rate_limit_per_user = 60;
        config.rate_limit_burst_per_user = 5;
        config.rate_limit_per_ip = 60;
        config.rate_limit_burst_per_ip = 5;
    })
    .await;
    let alice = app.new_user("alice").await;
    let bob = app.new_user("bob").await;
    // A token's first use needs a database lookup, so it is charged to the
    // address: the admin's (creating the users), bob's here and alice's
    // below spend 3 of its 5; from then on they are known from memory.
    assert_eq!(app.get_as("/me", &bob.token).await.status(), StatusCode::OK);

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

    // Anonymous callers share what is left of their address's limit;
    // health checks are exempt.
    let anonymous: Vec<u16> = futures_util::future::join_all(
        (0..5).map(|_| async { send(app.client.get(app.url("/me"))).await.status().as_u16() }),
    )
    .await;
    assert_eq!(
        anonymous.iter().filter(|s| **s == 401).count(),
        2,
        "{anonymous:?}"
    );
    assert_eq!(
        anonymous.iter().filter(|s| **s == 429).count(),
        3,
        "{anonymous:?}"
    );
    for _ in 0..20 {
        assert_eq!(app.get("/health").await.status(), StatusCode::OK);
    }
    // Another user is unaffected by alice's limit, and, known from memory,
    // by the spent address's.
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
    assert_eq!((user_rows, ip_rows), (3, 3), "{rows:?}");
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

/// A well-formed token nobody issued: `nox_` and 64 random hex digits.
fn random_token() -> String {
    format!(
        "nox_{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

async fn count(app: &nox_testkit::TestApp, sql: &str) -> i64 {
    app.db.scalar(sql).await
}

/// A flood of distinct made-up tokens from one address is charged to the
/// address before any token lookup: the database sees at most the burst,
/// the rest are refused (and audited) from memory.
#[tokio::test]
async fn unknown_tokens_are_charged_to_the_address_before_any_lookup() {
    const BURST: u64 = 10;
    let app = spawn_app_with(|config| {
        // One a minute: within the test only the burst can be spent.
        config.rate_limit_per_ip = 1;
        config.rate_limit_burst_per_ip = BURST as u32;
    })
    .await;
    // The admin's token, never seen before: charged to the address (one of
    // the burst), then known from memory.
    assert_eq!(
        app.get_as("/me", TEST_ADMIN_TOKEN).await.status(),
        StatusCode::OK
    );
    let bob = app.new_user("bob").await;
    let audited_before = count(&app, "SELECT count(*) FROM audit_actions").await;
    let lookups_before = app.state.authenticator.database_checks();

    let mut statuses: Vec<u16> = Vec::new();
    for _ in 0..15 {
        let batch = futures_util::future::join_all(
            (0..20).map(|_| async { app.get_as("/me", &random_token()).await.status().as_u16() }),
        )
        .await;
        statuses.extend(batch);
    }
    let lookups = app.state.authenticator.database_checks() - lookups_before;
    let unauthorized = statuses.iter().filter(|s| **s == 401).count() as u64;
    let limited = statuses.iter().filter(|s| **s == 429).count() as u64;
    assert_eq!(unauthorized + limited, 300, "{statuses:?}");
    // The admin's first request spent one of the burst; one more may have
    // been earned meanwhile.
    assert!(lookups <= BURST, "{lookups} token lookups for 300 requests");
    assert_eq!(unauthorized, lookups, "only the looked-up tokens got 401");
    assert!(limited >= 300 - BURST, "{limited}");

    // Each request has its audit row; the refused ones as rate-limit
    // violations of nobody.
    let audited = count(&app, "SELECT count(*) FROM audit_actions").await;
    assert_eq!(audited - audited_before, 300);
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM audit_actions WHERE status_code = 429 AND user_id IS NULL
             AND quota_consumed->>'quota_type' = 'rate_limit_ip'"
        )
        .await as u64,
        limited
    );

    // A token this instance knows is resolved from memory: not charged to
    // the spent address. A valid token it has never seen needs a lookup,
    // so it is charged first, and refused.
    assert_eq!(
        app.get_as("/me", TEST_ADMIN_TOKEN).await.status(),
        StatusCode::OK
    );
    let lookups_before = app.state.authenticator.database_checks();
    assert_eq!(
        app.get_as("/me", &bob.token).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(app.state.authenticator.database_checks(), lookups_before);
}

/// A bearer value that cannot be a token is refused without a lookup.
#[tokio::test]
async fn malformed_bearers_are_refused_without_a_lookup() {
    let app = spawn_app().await;
    let lookups_before = app.state.authenticator.database_checks();
    let junk: String = (0..10 * 1024)
        .map(|i| char::from(b'!' + (i % 90) as u8))
        .collect();
    for value in [
        "x".to_owned(),
        "nox_deadbeef".to_owned(),
        "x".repeat(31),
        junk,
    ] {
        let response = app.get_as("/me", &value).await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{value:.40}");
        let body: Value = response.json().await.expect("json");
        assert_eq!(body["code"], "unauthorized");
    }
    assert_eq!(
        app.state.authenticator.database_checks(),
        lookups_before,
        "no token lookup for malformed bearers"
    );
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM audit_actions WHERE status_code = 401 AND user_id IS NULL"
        )
        .await,
        4
    );
    // Health checks and scrapes are never limited, so they never cause a
    // lookup either.
    for _ in 0..3 {
        let health = send(
            app.client
                .get(app.url("/health"))
                .bearer_auth(random_token()),
        )
        .await;
        assert_eq!(health.status(), StatusCode::OK);
    }
    assert_eq!(app.state.authenticator.database_checks(), lookups_before);
    // A well-formed unknown token is looked up once, then refused from
    // memory (remembered, though no token of that value ever existed).
    let unknown = random_token();
    for _ in 0..3 {
        assert_eq!(
            app.get_as("/me", &unknown).await.status(),
            StatusCode::UNAUTHORIZED
        );
    }
    assert_eq!(
        app.state.authenticator.database_checks(),
        lookups_before + 1
    );
    // An operator-chosen token (any string of 32+ printable characters)
    // is well-formed: the test admin's is one.
    assert_eq!(
        app.get_as("/me", TEST_ADMIN_TOKEN).await.status(),
        StatusCode::OK
    );
}

/// Waits (a bounded number of short sleeps) until `ready` holds.
async fn until(what: &str, ready: impl Fn() -> bool) {
    for _ in 0..200 {
        if ready() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("never happened: {what}");
}

/// Starts `PUT /write?path=<name>` with a 10-byte body of which only 5
/// bytes are sent: the request stays in flight until the rest comes.
async fn slow_upload(app: &nox_testkit::TestApp, token: &str, name: &str) -> TcpStream {
    let mut stream = TcpStream::connect(app.address).await.expect("connect");
    stream
        .write_all(
            format!(
                "PUT /write?path={name} HTTP/1.1\r\nHost: nox\r\nAuthorization: Bearer {token}\r\n\
                 Content-Type: application/octet-stream\r\nContent-Length: 10\r\n\
                 Connection: close\r\n\r\nhello"
            )
            .as_bytes(),
        )
        .await
        .expect("send the head and half the body");
    stream
}

/// Beyond NOX_MAX_INFLIGHT, requests are answered 503 at once, before any
/// identity work, and still audited; slots come back when requests end or
/// are dropped.
#[tokio::test]
async fn requests_beyond_the_in_flight_cap_are_shed_and_audited() {
    let app = spawn_app_with(|config| config.max_inflight = Some(2)).await;
    let alice = app.new_user("alice").await;
    // Alice's token resolved once, so the uploads below take it from memory:
    // no lookup of theirs can land after `lookups_before` is read.
    assert_eq!(
        app.get_as("/me", &alice.token).await.status(),
        StatusCode::OK
    );
    until("idle", || app.state.in_flight.current() == 0).await;

    let mut slow = vec![
        slow_upload(&app, &alice.token, "a.txt").await,
        slow_upload(&app, &alice.token, "b.txt").await,
    ];
    until("two uploads in flight", || {
        app.state.in_flight.current() == 2
    })
    .await;

    let lookups_before = app.state.authenticator.database_checks();
    let shed = app.get_as("/me", &alice.token).await;
    assert_eq!(shed.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(shed.headers()["retry-after"], "1");
    let body: Value = shed.json().await.expect("json");
    assert_eq!(body["code"], "service_unavailable", "{body}");
    assert!(body["detail"].is_string());
    let unknown = app.get_as("/me", &random_token()).await;
    assert_eq!(unknown.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        app.state.authenticator.database_checks(),
        lookups_before,
        "a shed request resolves no identity"
    );
    // Health checks are never shed.
    assert_eq!(app.get("/health").await.status(), StatusCode::OK);
    let rows = app
        .db
        .client()
        .await
        .query(
            "SELECT endpoint, user_id::text FROM audit_actions WHERE status_code = 503",
            &[],
        )
        .await
        .expect("rows");
    let rows: Vec<(String, Option<String>)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        rows,
        [("/me".to_owned(), None), ("/me".to_owned(), None)],
        "each shed request has its audit row"
    );

    // The slow uploads complete, and free their slots.
    for stream in &mut slow {
        stream.write_all(b"world").await.expect("the rest");
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.expect("answer");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    until("slots freed", || app.state.in_flight.current() == 0).await;
    assert_eq!(
        app.get_as("/me", &alice.token).await.status(),
        StatusCode::OK
    );

    // A request whose client goes away mid-body frees its slot too.
    let dropped = slow_upload(&app, &alice.token, "c.txt").await;
    until("one upload in flight", || {
        app.state.in_flight.current() == 1
    })
    .await;
    drop(dropped);
    until("its slot freed", || app.state.in_flight.current() == 0).await;
    drop(slow);
}

/// In durable mode a request waiting for its audit commit is still in
/// flight: while the audit chain's head is locked (the writer cannot
/// commit), two waiting requests fill a cap of 2 and a third is shed.
#[tokio::test]
async fn requests_waiting_for_their_audit_commit_hold_their_slot() {
    let app = spawn_app_with(|config| config.max_inflight = Some(2)).await;
    let alice = app.new_user("alice").await;
    let mut blocker = app.db.client().await;
    let lock = blocker.transaction().await.expect("transaction");
    lock.execute("SELECT 1 FROM audit_chain_heads FOR UPDATE", &[])
        .await
        .expect("lock the chain heads");
    let waiting: Vec<_> = (0..2)
        .map(|_| tokio::spawn(app.request(Method::GET, "/me", &alice.token).send()))
        .collect();
    // Both are in the handler or waiting for the commit by now.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let third = tokio::spawn(app.request(Method::GET, "/me", &alice.token).send());
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    lock.rollback().await.expect("unlock");
    let status = |answer: Result<reqwest::Result<reqwest::Response>, _>| {
        answer.expect("task").expect("response").status()
    };
    assert_eq!(status(third.await), StatusCode::SERVICE_UNAVAILABLE);
    for request in waiting {
        assert_eq!(status(request.await), StatusCode::OK);
    }
}
