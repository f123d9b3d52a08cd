//! Request quotas across three servers on one database: together they admit
//! exactly what is left, however the requests are spread over them.

use std::sync::Arc;
use std::time::Duration;

use nox_audit_model::Clock;
use nox_testkit::{TEST_ADMIN_TOKEN, TestApp, TestUser, send, spawn_app_on, spawn_app_with};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// Three servers sharing one database, their clocks five minutes into the
/// next UTC hour (`next_day`: day), so no window ends during the test.
async fn three_servers(next_day: bool) -> [TestApp; 3] {
    // Small pools: these tests run beside others on one PostgreSQL.
    let small = |config: &mut nox_api::Config| config.storage.db_pool_size = 4;
    let first = spawn_app_with(small).await;
    let second = spawn_app_on(Arc::clone(&first.db), small).await;
    let third = spawn_app_on(Arc::clone(&first.db), small).await;
    let now = time::OffsetDateTime::now_utc();
    let start = if next_day {
        now.date().next_day().expect("a next day").midnight()
    } else {
        now.date().with_hms(now.hour(), 0, 0).expect("an hour") + time::Duration::HOUR
    };
    let by = start.assume_utc() - now + time::Duration::minutes(5);
    for app in [&first, &second, &third] {
        app.clock.advance(by);
    }
    [first, second, third]
}

async fn set_quotas(app: &TestApp, user: &TestUser, body: Value) {
    let response = send(
        app.request(
            Method::PUT,
            &format!("/quotas/admin/users/{}/quotas", user.id),
            TEST_ADMIN_TOKEN,
        )
        .json(&body),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
}

/// `n` concurrent `GET /me` as `user`, round-robined over `apps`: how many
/// were admitted, and the refusals' bodies.
async fn burst(apps: &[&TestApp], user: &TestUser, n: usize) -> (usize, Vec<Value>) {
    let answers = futures_util::future::join_all((0..n).map(|i| async move {
        let response = apps[i % apps.len()].get_as("/me", &user.token).await;
        let status = response.status();
        (status, response.json::<Value>().await.expect("json"))
    }))
    .await;
    let admitted = answers.iter().filter(|(s, _)| *s == StatusCode::OK).count();
    let refused = answers
        .into_iter()
        .filter(|(s, _)| *s == StatusCode::TOO_MANY_REQUESTS)
        .map(|(_, body)| body)
        .collect::<Vec<_>>();
    assert_eq!(admitted + refused.len(), n, "only 200s and 429s");
    (admitted, refused)
}

/// The user's `requests` in `quota_usage` for the current `kind` window
/// (as the servers' clocks have it): used plus leased and unspent.
/// Each server knows the user (token, overrides) before a burst.
async fn known_to(apps: &[&TestApp], user: &TestUser) {
    for app in apps {
        assert_eq!(
            app.get_as("/me", &user.token).await.status(),
            StatusCode::OK
        );
    }
}

async fn stored_requests(app: &TestApp, user: &TestUser, kind: &str) -> i64 {
    let now = app.clock.now();
    let start = if kind == "hour" {
        now.replace_time(time::Time::from_hms(now.hour(), 0, 0).expect("an hour"))
    } else {
        now.replace_time(time::Time::MIDNIGHT)
    };
    app.db
        .client()
        .await
        .query_one(
            "SELECT coalesce(sum(requests), 0)::bigint FROM quota_usage
              WHERE user_id::text = $1 AND window_kind = $2 AND window_start = $3",
            &[&user.id, &kind, &start],
        )
        .await
        .expect("usage")
        .get(0)
}

#[tokio::test]
async fn a_hundred_requests_over_three_servers_against_ten_left_in_the_hour_admit_exactly_ten() {
    let [a, b, c] = three_servers(false).await;
    let alice = a.new_user("alice").await;
    set_quotas(&a, &alice, json!({"req_hour": 13})).await;
    known_to(&[&a, &b, &c], &alice).await;
    let (admitted, refused) = burst(&[&a, &b, &c], &alice, 100).await;
    assert_eq!((admitted, refused.len()), (10, 90));
    for body in &refused {
        assert_eq!(
            (
                body["code"].as_str(),
                body["quota_type"].as_str(),
                body["limit"].as_u64()
            ),
            (Some("quota_exceeded"), Some("req_hour"), Some(13)),
            "{body}"
        );
    }
    // Spent: every server refuses, and the database holds exactly the limit.
    for app in [&a, &b, &c] {
        assert_eq!(
            app.get_as("/me", &alice.token).await.status(),
            StatusCode::TOO_MANY_REQUESTS
        );
    }
    assert_eq!(stored_requests(&a, &alice, "hour").await, 13);
}

#[tokio::test]
async fn a_hundred_requests_over_three_servers_against_ten_left_in_the_day_admit_exactly_ten() {
    let [a, b, c] = three_servers(true).await;
    let alice = a.new_user("alice").await;
    set_quotas(&a, &alice, json!({"req_day": 13})).await;
    known_to(&[&a, &b, &c], &alice).await;
    let (admitted, refused) = burst(&[&a, &b, &c], &alice, 100).await;
    assert_eq!((admitted, refused.len()), (10, 90));
    assert!(
        refused.iter().all(|body| body["quota_type"] == "req_day"),
        "the hour (the tier's 500) has room"
    );
    assert_eq!(stored_requests(&a, &alice, "day").await, 13);
}

/// A server that leased a block and went idle gives the unspent units back
/// once the others have used the rest, so they can admit them: the limit is
/// reached exactly, with no request beyond it.
#[tokio::test]
async fn an_idle_servers_unspent_lease_goes_back_to_the_others() {
    let [a, b, _c] = three_servers(false).await;
    let alice = a.new_user("alice").await;
    set_quotas(&a, &alice, json!({"req_hour": 100})).await;
    // One request on `a` leases a block (100 left: 6) and keeps the rest.
    assert_eq!(a.get_as("/me", &alice.token).await.status(), StatusCode::OK);
    let usage: Value = a
        .get_as("/quotas/my/usage", &alice.token)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(
        usage["usage"]["req_hour"], 1,
        "unspent units are not used: {usage}"
    );

    let (mut admitted, _) = burst(&[&b], &alice, 100).await;
    assert!(admitted < 100, "b cannot have a's request too: {admitted}");
    // a stays idle; its unspent units come back, and b admits them. (A
    // generous patience; no timing is asserted.)
    for _ in 0..300 {
        if admitted == 99 {
            break;
        }
        if b.get_as("/me", &alice.token).await.status() == StatusCode::OK {
            admitted += 1;
        } else {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert_eq!(admitted, 99);
    for app in [&a, &b] {
        assert_eq!(
            app.get_as("/me", &alice.token).await.status(),
            StatusCode::TOO_MANY_REQUESTS
        );
    }
    assert_eq!(stored_requests(&a, &alice, "hour").await, 100);
}

/// A server that stops gives its unspent units back at once.
#[tokio::test]
async fn a_stopping_server_gives_its_unspent_units_back() {
    let [a, b, _c] = three_servers(false).await;
    let alice = a.new_user("alice").await;
    set_quotas(&a, &alice, json!({"req_hour": 1000})).await;
    for _ in 0..3 {
        assert_eq!(a.get_as("/me", &alice.token).await.status(), StatusCode::OK);
    }
    a.stop().await;
    assert_eq!(stored_requests(&b, &alice, "hour").await, 3);
}

/// The CPU quota stays a check against totals: a server learns another's
/// CPU counts of a user with a request limit at its next lease.
#[tokio::test]
async fn cpu_spent_through_one_server_is_seen_by_the_others() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: runs need root (namespaces, cgroups, setuid)");
        return;
    }
    let [a, b, _c] = three_servers(true).await;
    let alice = a.new_user("alice").await;
    set_quotas(&a, &alice, json!({"cpu_seconds": 1})).await;
    assert_eq!(b.get_as("/me", &alice.token).await.status(), StatusCode::OK);
    let burn = send(a.request(Method::POST, "/run", &alice.token).json(
        &json!({"command": "python3 -c 'import time\nwhile time.process_time() < 1.1: pass'"}),
    ))
    .await;
    assert_eq!(burn.status(), StatusCode::OK);
    // b's requests keep leasing; one of its leases reads a's count.
    let mut seen = 0.0;
    for _ in 0..300 {
        b.get_as("/me", &alice.token).await;
        let usage: Value = b
            .get_as("/quotas/my/usage", &alice.token)
            .await
            .json()
            .await
            .expect("json");
        seen = usage["usage"]["cpu_seconds"].as_f64().expect("cpu");
        if seen >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(seen >= 1.0, "b never saw a's CPU: {seen}");
    let refused = send(
        b.request(Method::POST, "/run", &alice.token)
            .json(&json!({"command": "true"})),
    )
    .await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    let body: Value = refused.json().await.expect("json");
    assert_eq!(body["quota_type"], "cpu_seconds");
}
