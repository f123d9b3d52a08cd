//! Several servers on one database: the per-user rate limit is shared by
//! the live servers, checkpoints are signed by one server at a time, and a
//! trail written by three servers at once verifies and rolls up exactly.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nox_audit_store::checkpoints::{CHECKPOINT_LOCK_KEY, Checkpoint, Checkpointer};
use nox_audit_store::summaries;
use nox_audit_store::verify::VerifyOptions;
use nox_testkit::{TEST_ADMIN_TOKEN, TestApp, TestDb, send, spawn_app_on};
use reqwest::{Method, StatusCode};
use serde_json::json;

const ADMIN: &str = TEST_ADMIN_TOKEN;
/// How long a condition may take to become true (heartbeats are 2 s apart).
const PATIENCE: Duration = Duration::from_secs(30);

/// Three servers on one database, configured alike by `adjust`.
async fn three_servers(adjust: impl Fn(&mut nox_api::Config)) -> Vec<TestApp> {
    let db = Arc::new(TestDb::new().await);
    let mut apps = Vec::new();
    for _ in 0..3 {
        apps.push(spawn_app_on(Arc::clone(&db), &adjust).await);
    }
    apps
}

/// Waits until every server has counted `servers` live servers.
async fn until_each_counts(apps: &[TestApp], servers: u32) {
    let start = Instant::now();
    while apps
        .iter()
        .any(|app| app.state.rate_limits.servers() != servers)
    {
        assert!(
            start.elapsed() < PATIENCE,
            "servers never counted {servers} live"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_users_rate_holds_for_three_servers_together() {
    let apps = three_servers(|config| {
        config.rate_limit_per_user = 60;
        config.rate_limit_burst_per_user = 60;
    })
    .await;
    until_each_counts(&apps, 3).await;
    let alice = apps[0].new_user("alice").await;
    let start = Instant::now();
    let mut admitted = 0u64;
    for i in 0..180 {
        let response = apps[i % 3].get_as("/me", &alice.token).await;
        match response.status() {
            StatusCode::OK => admitted += 1,
            StatusCode::TOO_MANY_REQUESTS => {}
            other => panic!("unexpected {other}"),
        }
    }
    // Each server admits a burst of ⌈60/3⌉ = 20 and then one request every
    // 3 s: 60 at once for the three, plus one a second while this ran.
    let refilled = start.elapsed().as_secs() + 1;
    assert!(
        (60..=60 + refilled).contains(&admitted),
        "admitted {admitted} of 180 at 60/min over three servers (refill allowance {refilled})"
    );
    for app in &apps {
        app.stop().await;
    }
    let left: i64 = apps[0]
        .db
        .client()
        .await
        .query_one("SELECT count(*) FROM servers", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(left, 0, "each server removes its heartbeat row at shutdown");
}

#[tokio::test]
async fn the_live_count_ignores_servers_not_heard_from() {
    let apps = three_servers(|_| {}).await;
    until_each_counts(&apps, 3).await;
    let client = apps[0].db.client().await;
    // A server killed a minute ago left its row behind; one just started
    // has written its first heartbeat.
    client
        .execute(
            "INSERT INTO servers (id, host, pid, version, last_seen) VALUES
                 (gen_random_uuid(), 'gone', 1, 'x', now() - interval '1 minute'),
                 (gen_random_uuid(), 'new', 2, 'x', now())",
            &[],
        )
        .await
        .expect("insert");
    until_each_counts(&apps, 4).await;
    for app in &apps {
        app.stop().await;
    }
}

/// Every checkpoint the servers logged to their own files (a server that
/// never signed one has none).
fn logged_checkpoints(apps: &[TestApp]) -> Vec<Checkpoint> {
    apps.iter()
        .map(|app| app.data_dir.path().join("checkpoints/checkpoints.log"))
        .filter(|log| log.exists())
        .flat_map(|log| Checkpoint::read_log(&log).expect("a checkpoint log"))
        .collect()
}

#[tokio::test]
async fn three_servers_writing_at_once_leave_a_trail_that_verifies_and_rolls_up() {
    let key_dir = tempfile::tempdir().expect("a key dir");
    let key_file = key_dir.path().join("audit-signing.key");
    let apps = three_servers(|config| {
        // One organisation, one signing key.
        config.storage.audit_signing_key_file = Some(key_file.clone());
        config.audit_checkpoint_secs = 1;
    })
    .await;
    let mut users = Vec::new();
    for (i, app) in apps.iter().enumerate() {
        users.push(app.new_user(&format!("user{i}")).await);
    }
    let mut requests = Vec::new();
    for i in 0..300 {
        let (app, user) = (&apps[i % 3], &users[(i / 3) % 3]);
        requests.push(async move {
            if i % 5 == 0 {
                send(
                    app.request(Method::PUT, &format!("/write?path=f{i}.txt"), &user.token)
                        .body("x"),
                )
                .await
            } else {
                app.get_as("/ls?path=.", &user.token).await
            }
        });
    }
    for response in futures_util::future::join_all(requests).await {
        assert!(response.status().is_success(), "{}", response.status());
    }
    // Admin actions through each server, at once.
    let mut changes = Vec::new();
    for (app, user) in apps.iter().zip(&users) {
        changes.push(send(
            app.request(Method::PATCH, &format!("/admin/users/{}", user.id), ADMIN)
                .json(&json!({"tier": "premium"})),
        ));
    }
    for response in futures_util::future::join_all(changes).await {
        assert_eq!(response.status(), StatusCode::OK);
    }
    for app in &apps {
        app.stop().await;
    }

    let mut client = apps[0].db.client().await;
    let options = VerifyOptions {
        external_checkpoints: logged_checkpoints(&apps),
        public_key: Some(
            nox_audit_store::checkpoints::read_public_key(
                &apps[0].data_dir.path().join("checkpoints/public-key"),
            )
            .expect("the public key"),
        ),
        ..VerifyOptions::default()
    };
    let chains = nox_audit_store::verify::verify(&mut client, &options)
        .await
        .expect("the trail of three servers verifies");
    let rows: i64 = client
        .query_one("SELECT count(*) FROM audit_actions", &[])
        .await
        .expect("count")
        .get(0);
    assert!(rows >= 303, "{rows} rows");
    assert_eq!(chains[0].last_seq, rows, "every row on the chain once");
    assert!(chains[0].checkpoints >= 1);

    let duplicates: i64 = client
        .query_one(
            "SELECT count(*) FROM (SELECT chain, seq FROM audit_checkpoints
                                   GROUP BY chain, seq HAVING count(*) > 1) d",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(duplicates, 0, "no head is checkpointed twice");

    let (from, to) = summaries::date_range(&client)
        .await
        .expect("range")
        .expect("days with rows");
    assert_eq!(
        summaries::check(&client, from, to).await.expect("check"),
        vec![],
        "the rollups of three writers are exact"
    );
}

/// A server's periodic checkpoint skips while another holds the lock, and
/// a chain checkpointed recently (by anyone) waits for the next interval.
#[tokio::test]
async fn checkpoints_are_signed_by_one_server_at_a_time() {
    let apps = three_servers(|config| config.audit_checkpoint_secs = 3600).await;
    apps[0].get_as("/me", ADMIN).await;
    let checkpointer = signer(apps[0].data_dir.path());
    let holder = apps[0].db.client().await;
    holder
        .execute("SELECT pg_advisory_lock($1)", &[&CHECKPOINT_LOCK_KEY])
        .await
        .expect("lock");
    let mut client = apps[0].db.client().await;
    let skipped = checkpointer
        .checkpoint_heads_exclusive(&mut client, "interval", false, Duration::ZERO)
        .await
        .expect("no error");
    assert!(
        skipped.is_none(),
        "another server is checkpointing: skipped"
    );
    holder
        .execute("SELECT pg_advisory_unlock($1)", &[&CHECKPOINT_LOCK_KEY])
        .await
        .expect("unlock");
    let written = checkpointer
        .checkpoint_heads_exclusive(&mut client, "interval", false, Duration::ZERO)
        .await
        .expect("written")
        .expect("the lock was free");
    assert!(!written.is_empty(), "the moved heads are checkpointed");

    // The head moves again, but the chain was checkpointed a moment ago.
    apps[1].get_as("/me", ADMIN).await;
    let recent = checkpointer
        .checkpoint_heads_exclusive(&mut client, "interval", false, Duration::from_secs(3600))
        .await
        .expect("no error")
        .expect("the lock was free");
    assert!(recent.is_empty(), "checkpointed within the interval: later");
    let moved = checkpointer
        .checkpoint_heads_exclusive(&mut client, "shutdown", true, Duration::ZERO)
        .await
        .expect("written")
        .expect("waited for the lock");
    assert!(!moved.is_empty());
    for app in &apps {
        app.stop().await;
    }
}

fn signer(data_dir: &Path) -> Checkpointer {
    Checkpointer::open(
        &data_dir.join("audit-signing.key"),
        &data_dir.join("checkpoints"),
    )
    .expect("the server's signing key")
}

#[tokio::test]
async fn the_storage_quota_counts_what_other_servers_wrote_to_a_shared_workspace() {
    let shared = tempfile::tempdir().expect("a shared workspace directory");
    let dir = shared.path().to_path_buf();
    let apps = three_servers(|config| config.storage.sandbox_dir = Some(dir.clone())).await;
    until_each_counts(&apps, 3).await;
    let alice = apps[0].new_user("alice").await;
    let quota = send(
        apps[0]
            .request(
                Method::PUT,
                &format!("/quotas/admin/users/{}/quotas", alice.id),
                ADMIN,
            )
            .json(&json!({"storage_mb": 1})),
    )
    .await;
    assert_eq!(quota.status(), StatusCode::OK);
    let put = |app: &TestApp, path: &str, bytes: usize| {
        send(
            app.request(Method::PUT, &format!("/write?path={path}"), &alice.token)
                .body(vec![b'x'; bytes]),
        )
    };
    // Server B knows the workspace first, nearly empty.
    assert_eq!(
        put(&apps[1], "b.bin", 600_000).await.status(),
        StatusCode::OK
    );
    // Then A fills most of the rest.
    assert_eq!(
        put(&apps[0], "a.bin", 400_000).await.status(),
        StatusCode::OK
    );
    // B's own count says b.bin alone: replacing it fits. Once B measures
    // the workspace again, A's file counts and the same write is refused.
    let start = Instant::now();
    loop {
        let response = put(&apps[1], "b.bin", 700_000).await;
        if response.status() == StatusCode::FORBIDDEN {
            let body: serde_json::Value = response.json().await.expect("json");
            assert_eq!(body["code"], "quota_exceeded", "{body}");
            break;
        }
        assert_eq!(response.status(), StatusCode::OK);
        assert!(
            start.elapsed() < PATIENCE,
            "server B never counted what A wrote"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for app in &apps {
        app.stop().await;
    }
}
