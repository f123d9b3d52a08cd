//! Admin changes made through one server are in force on the others at once:
//! announced with `NOTIFY` at commit (migration 0014), applied by each
//! server's listener (`nox_api::admin_changes`). The other servers trust a
//! checked token for 300 s, so only the notice can explain what they do.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio_postgres::{AsyncMessage, NoTls};

use nox_testkit::{TEST_ADMIN_TOKEN as ADMIN, TestApp, TestUser, send, spawn_app_on};

/// Far beyond any test: a cached token is never checked again meanwhile.
fn long_auth_cache(config: &mut nox_api::Config) {
    config.auth_cache_ttl_ms = 300_000;
}

/// Waits (with a generous patience) until `check` holds; how long it took.
async fn wait_until(what: &str, mut check: impl AsyncFnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !check().await {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "never happened: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    started.elapsed()
}

async fn status_of(app: &TestApp, path: &str, token: &str) -> StatusCode {
    app.get_as(path, token).await.status()
}

/// When a change was sent to server A, and when A answered (committed).
#[derive(Debug, Clone, Copy)]
struct Sent {
    sent: Instant,
    answered: Instant,
}

impl Sent {
    async fn timing(change: impl Future<Output = ()>) -> Sent {
        let sent = Instant::now();
        change.await;
        Sent {
            sent,
            answered: Instant::now(),
        }
    }

    /// Prints (for the report, not asserted) how long `what` took to be in
    /// force on `server`.
    fn print(&self, what: &str, server: &str) {
        let ms = |since: Instant| since.elapsed().as_secs_f64() * 1000.0;
        eprintln!(
            "admin change propagation: {what} in force on {server} {:.1} ms after the request was sent, {:.1} ms after A answered",
            ms(self.sent),
            ms(self.answered)
        );
    }
}

/// Waits until `path` answers `wanted` on each of `servers`.
async fn wait_everywhere(
    what: &str,
    change: Sent,
    servers: &[(&str, &TestApp)],
    path: &str,
    token: &str,
    wanted: StatusCode,
) {
    for (name, server) in servers {
        wait_until(&format!("{what} on {name}"), async || {
            status_of(server, path, token).await == wanted
        })
        .await;
        change.print(what, name);
    }
}

async fn token_id(app: &TestApp, user: &TestUser) -> String {
    let tokens: Value = app
        .get_as(&format!("/admin/users/{}/tokens", user.id), ADMIN)
        .await
        .json()
        .await
        .expect("json");
    tokens["tokens"][0]["id"]
        .as_str()
        .expect("a token id")
        .to_owned()
}

async fn patch_user(app: &TestApp, user: &TestUser, body: Value) {
    let response = send(
        app.request(Method::PATCH, &format!("/admin/users/{}", user.id), ADMIN)
            .json(&body),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK, "PATCH {body}");
}

async fn revoke(app: &TestApp, token_id: &str) {
    let response =
        send(app.request(Method::DELETE, &format!("/admin/tokens/{token_id}"), ADMIN)).await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
}

/// A user whose token each of `servers` has accepted (and cached).
async fn user_known_to(servers: &[&TestApp], name: &str) -> TestUser {
    let user = servers[0].new_user(name).await;
    for server in servers {
        assert_eq!(status_of(server, "/me", &user.token).await, StatusCode::OK);
    }
    user
}

#[tokio::test]
async fn admin_changes_through_one_server_are_in_force_on_the_others_at_once() {
    let a = nox_testkit::spawn_app_with(long_auth_cache).await;
    let b = spawn_app_on(Arc::clone(&a.db), long_auth_cache).await;
    let c = spawn_app_on(Arc::clone(&a.db), long_auth_cache).await;
    for server in [&a, &b, &c] {
        wait_until("the listener is connected", async || {
            server.state.admin_changes.connections() >= 1
        })
        .await;
    }
    let others = [("B", &b), ("C", &c)];

    // A revocation.
    let alice = user_known_to(&[&a, &b, &c], "alice").await;
    let alice_token = token_id(&a, &alice).await;
    let sent = Sent::timing(revoke(&a, &alice_token)).await;
    wait_everywhere(
        "revocation",
        sent,
        &others,
        "/me",
        &alice.token,
        StatusCode::UNAUTHORIZED,
    )
    .await;

    // A deactivation.
    let bob = user_known_to(&[&a, &b, &c], "bob").await;
    let sent = Sent::timing(patch_user(&a, &bob, json!({"is_active": false}))).await;
    wait_everywhere(
        "deactivation",
        sent,
        &others,
        "/me",
        &bob.token,
        StatusCode::UNAUTHORIZED,
    )
    .await;

    // Role changes: a user made auditor may read the user list; an admin
    // made user may not any more.
    let carol = user_known_to(&[&a, &b], "carol").await;
    assert_eq!(
        status_of(&b, "/admin/users", &carol.token).await,
        StatusCode::FORBIDDEN
    );
    let sent = Sent::timing(patch_user(&a, &carol, json!({"role": "auditor"}))).await;
    wait_everywhere(
        "user → auditor",
        sent,
        &others[..1],
        "/admin/users",
        &carol.token,
        StatusCode::OK,
    )
    .await;
    let dave = user_known_to(&[&a, &b], "dave").await;
    patch_user(&a, &dave, json!({"role": "admin"})).await;
    wait_until("dave is an admin on B", async || {
        status_of(&b, "/admin/users", &dave.token).await == StatusCode::OK
    })
    .await;
    let sent = Sent::timing(patch_user(&a, &dave, json!({"role": "user"}))).await;
    wait_everywhere(
        "admin → user",
        sent,
        &others[..1],
        "/admin/users",
        &dave.token,
        StatusCode::FORBIDDEN,
    )
    .await;

    // A tier change: the caller's tier (cached with the token) and the
    // limits it implies.
    let erin = user_known_to(&[&a, &b], "erin").await;
    let quotas_on_b = async || -> Value {
        b.get_as("/quotas/my/quotas", &erin.token)
            .await
            .json()
            .await
            .expect("json")
    };
    assert_eq!(quotas_on_b().await["tier"], "standard");
    let sent = Sent::timing(patch_user(&a, &erin, json!({"tier": "free"}))).await;
    wait_until("the free tier on B", async || {
        quotas_on_b().await["tier"] == "free"
    })
    .await;
    sent.print("tier", "B");
    assert_eq!(
        quotas_on_b().await["req_hour"],
        100,
        "the free tier's limit"
    );

    // A quota override lowered to what the user has used: B refuses the
    // next request as soon as it applied the notice, well within the 5 s
    // its own read of the overrides is trusted.
    let frank = user_known_to(&[&b], "frank").await;
    for _ in 0..2 {
        assert_eq!(status_of(&b, "/me", &frank.token).await, StatusCode::OK);
    }
    let applied = b.state.admin_changes.applied("quota");
    let sent = Sent::timing(async {
        let response = send(
            a.request(
                Method::PUT,
                &format!("/quotas/admin/users/{}/quotas", frank.id),
                ADMIN,
            )
            .json(&json!({"req_hour": 3})),
        )
        .await;
        assert_eq!(response.status(), StatusCode::OK);
    })
    .await;
    wait_until("B applies the quota notice", async || {
        b.state.admin_changes.applied("quota") > applied
    })
    .await;
    sent.print("quota override", "B");
    let refused = b.get_as("/me", &frank.token).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    let body: Value = refused.json().await.expect("json");
    assert_eq!(
        (body["code"].as_str(), body["quota_type"].as_str()),
        (Some("quota_exceeded"), Some("req_hour"))
    );

    // The listeners' connections are cut: each reconnects, and a later
    // revocation still reaches the others.
    let killed: i64 =
        a.db.client()
            .await
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
              WHERE application_name = 'nox-admin-changes' AND datname = current_database()",
                &[],
            )
            .await
            .expect("terminate the listeners")
            .get(0);
    assert_eq!(killed, 3, "one listener per server");
    for server in [&a, &b, &c] {
        wait_until("the listener reconnects", async || {
            server.state.admin_changes.connections() >= 2
        })
        .await;
    }
    let gina = user_known_to(&[&a, &b, &c], "gina").await;
    let gina_token = token_id(&a, &gina).await;
    let sent = Sent::timing(revoke(&a, &gina_token)).await;
    wait_everywhere(
        "revocation after a reconnect",
        sent,
        &others,
        "/me",
        &gina.token,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    for server in [&a, &b, &c] {
        server.stop().await;
    }
}

/// The notices a raw listener receives, in commit order, while the client
/// lives.
async fn listen(
    app: &TestApp,
) -> (
    tokio_postgres::Client,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    let (client, mut connection) = app.db.config.connect(NoTls).await.expect("connect");
    let (sender, notices) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let AsyncMessage::Notification(note) = message {
                let _ = sender.send(note.payload().to_owned());
            }
        }
    });
    client
        .batch_execute("LISTEN nox_admin_change")
        .await
        .expect("listen");
    (client, notices)
}

#[tokio::test]
async fn only_committed_changes_of_what_servers_cache_are_announced() {
    let app = nox_testkit::spawn_app_with(long_auth_cache).await;
    let (_listening, mut notices) = listen(&app).await;
    let hank = app.new_user("hank").await;
    let hank_token = token_id(&app, &hank).await;
    // What happens all the time, or changes nothing a server caches: a
    // token's use (`last_used_at`) on a server that has not seen it, an
    // email, a PATCH that changes nothing, a revocation rolled back.
    let other = spawn_app_on(Arc::clone(&app.db), long_auth_cache).await;
    assert_eq!(status_of(&other, "/me", &hank.token).await, StatusCode::OK);
    assert_eq!(
        app.db
            .scalar("SELECT count(*) FROM api_tokens WHERE last_used_at IS NOT NULL")
            .await,
        2,
        "both tokens' uses were recorded"
    );
    patch_user(&app, &hank, json!({"email": "hank@example.org"})).await;
    patch_user(&app, &hank, json!({"role": "user"})).await;
    let mut client = app.db.client().await;
    let tx = client.transaction().await.expect("begin");
    tx.execute(
        "UPDATE api_tokens SET revoked_at = now() WHERE user_id::text = $1",
        &[&hank.id],
    )
    .await
    .expect("revoke");
    tx.rollback().await.expect("rollback");

    // What servers cache; a quota PUT that changes nothing announces nothing.
    let put_quotas = async |body: Value| {
        let response = send(
            app.request(
                Method::PUT,
                &format!("/quotas/admin/users/{}/quotas", hank.id),
                ADMIN,
            )
            .json(&body),
        )
        .await;
        assert_eq!(response.status(), StatusCode::OK);
    };
    put_quotas(json!({"req_day": 50})).await;
    put_quotas(json!({"req_day": 50})).await;
    patch_user(&app, &hank, json!({"role": "auditor"})).await;
    revoke(&app, &hank_token).await;

    let mut received = Vec::new();
    wait_until("three notices", async || {
        while let Ok(notice) = notices.try_recv() {
            received.push(notice);
        }
        received.len() >= 3
    })
    .await;
    assert_eq!(
        received,
        [
            format!("quota {}", hank.id),
            format!("user {}", hank.id),
            format!("token {} {hank_token}", hank.id),
        ],
        "the first notices are the three changes', in commit order"
    );
}
