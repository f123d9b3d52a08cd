//! `GET /admin/audit/logs`: every filter includes what matches and excludes
//! what does not; keyset paging has no gaps or duplicates under inserts.

use std::collections::HashSet;

use nox_testkit::{TEST_ADMIN_TOKEN, TestApp, send, spawn_app};
use reqwest::{Method, StatusCode};
use serde_json::Value;

const ADMIN: &str = TEST_ADMIN_TOKEN;

async fn logs(app: &TestApp, query: &str) -> Value {
    let response = app
        .get_as(&format!("/admin/audit/logs?{query}"), ADMIN)
        .await;
    assert_eq!(response.status(), StatusCode::OK, "{query}");
    response.json().await.expect("json")
}

/// What every row a filter returns must satisfy.
type Predicate<'a> = Box<dyn Fn(&Value) -> bool + 'a>;

fn rows(body: &Value) -> Vec<Value> {
    body["logs"].as_array().expect("logs").clone()
}

#[tokio::test]
async fn each_filter_includes_matches_and_excludes_the_rest() {
    let app = spawn_app().await;
    let alice = app.new_user("alice").await;
    let bob = app.new_user("bob").await;
    app.get_as("/me", &alice.token).await;
    app.get_as("/nope", &alice.token).await;
    send(
        app.request(Method::PUT, "/write?path=notes/x.txt", &bob.token)
            .body("hello"),
    )
    .await;
    app.get_as("/cat?path=missing.txt", &bob.token).await;
    send(app.client.get(app.url("/me"))).await;

    let all = rows(&logs(&app, "page_size=1000").await);
    assert!(all.len() >= 7);
    let newest_first: Vec<&str> = all
        .iter()
        .map(|r| r["timestamp"].as_str().expect("ts"))
        .collect();
    assert!(newest_first.windows(2).all(|w| w[0] >= w[1]));

    // Each case: the query, and what every returned row must satisfy.
    let alice_session = all
        .iter()
        .find(|r| r["user_id"] == alice.id.as_str())
        .and_then(|r| r["session_id"].as_str())
        .expect("alice's session")
        .to_owned();
    let one_request = all[0]["request_id"]
        .as_str()
        .expect("request id")
        .to_owned();
    let today = time::OffsetDateTime::now_utc().date();
    let yesterday = today.previous_day().expect("a day");
    let cases: Vec<(String, Predicate)> = vec![
        (
            format!("user_id={}", alice.id),
            Box::new(|r: &Value| r["user_id"] == alice.id.as_str() && r["user_name"] == "alice"),
        ),
        (
            format!("session_id={alice_session}"),
            Box::new(|r: &Value| r["session_id"] == alice_session.as_str()),
        ),
        (
            format!("request_id={one_request}"),
            Box::new(|r: &Value| r["request_id"] == one_request.as_str()),
        ),
        (
            "action_type=file_write".into(),
            Box::new(|r: &Value| r["action_type"] == "file_write"),
        ),
        (
            "action_category=filesystem".into(),
            Box::new(|r: &Value| r["action_category"] == "filesystem"),
        ),
        (
            "endpoint=ME".into(),
            Box::new(|r: &Value| {
                r["endpoint"]
                    .as_str()
                    .is_some_and(|e| e.to_lowercase().contains("me"))
            }),
        ),
        (
            "status_code=404".into(),
            Box::new(|r: &Value| r["status_code"] == 404),
        ),
        (
            "success=false".into(),
            Box::new(|r: &Value| r["success"] == false),
        ),
        (
            "quota_violation=false".into(),
            Box::new(|r: &Value| r["quota_violation"] == false),
        ),
        (
            "client_ip=127.0.0.0/8".into(),
            Box::new(|r: &Value| {
                r["client_ip"]
                    .as_str()
                    .is_some_and(|ip| ip.starts_with("127."))
            }),
        ),
        (format!("end_date={today}"), Box::new(|_: &Value| true)),
        (
            "search=x.txt".into(),
            Box::new(|r: &Value| r["file_path"].as_str().is_some_and(|p| p.contains("x.txt"))),
        ),
        (
            "search=PATH%20NOT%20FOUND".into(),
            Box::new(|r: &Value| {
                r["error_details"]
                    .as_str()
                    .is_some_and(|e| e.contains("path not found"))
            }),
        ),
    ];
    for (query, matches) in &cases {
        let found = rows(&logs(&app, &format!("{query}&page_size=1000")).await);
        assert!(!found.is_empty(), "{query} found nothing");
        assert!(
            found.iter().all(matches),
            "{query} returned a row that does not match"
        );
        // Reading the logs is audited too: compare over the snapshot's rows.
        let known: HashSet<&str> = all.iter().map(|r| r["id"].as_str().expect("id")).collect();
        let found_known = found
            .iter()
            .filter(|r| known.contains(r["id"].as_str().expect("id")))
            .count();
        let expected = all.iter().filter(|r| matches(r)).count();
        assert_eq!(found_known, expected, "{query} left out matching rows");
    }
    for query in [
        "quota_violation=true".to_owned(),
        "client_ip=10.0.0.0/8".to_owned(),
        format!("end_date={yesterday}"),
        "start_date=2999-01-01".to_owned(),
        "action_type=code_exec".to_owned(),
        format!("user_id={}&action_type=file_write", alice.id),
    ] {
        assert!(
            rows(&logs(&app, &query).await).is_empty(),
            "{query} should match nothing"
        );
    }
    let applied = logs(&app, &format!("user_id={}&success=true", alice.id)).await;
    assert_eq!(applied["filters_applied"]["success"], true);
    assert_eq!(applied["filters_applied"]["user_id"], alice.id.as_str());
    // Up to the snapshot only, so rows audited meanwhile do not shift pages.
    let until = format!("end_date={}", all[0]["timestamp"].as_str().expect("ts"));
    let counted = logs(&app, &format!("{until}&include_total=true&page_size=2")).await;
    assert_eq!(counted["total_count"].as_u64(), Some(all.len() as u64));
    assert_eq!(counted["has_next"], true);
    // Offset paging for older clients meets keyset paging.
    let second = rows(&logs(&app, &format!("{until}&page_size=2&page=2")).await);
    let cursor = counted["next_cursor"].as_str().expect("cursor");
    let keyset = rows(&logs(&app, &format!("{until}&page_size=2&cursor={cursor}")).await);
    assert_eq!(second[0]["id"], keyset[0]["id"]);
}

#[tokio::test]
async fn keyset_paging_walks_a_large_result_without_gaps_or_duplicates() {
    let app = spawn_app().await;
    let client = app.db.client().await;
    let seed = "INSERT INTO audit_actions (id, \"timestamp\", request_id, endpoint, route, http_method,
                    action_type, action_category, status_code, success, response_time_ms)
                SELECT gen_random_uuid(), now() - interval '1 hour' + (i % 600) * interval '1 second',
                       gen_random_uuid(), '/seeded', '/seeded', 'GET', 'seeded', 'general', 200, true, 1
                FROM generate_series(1, $1::int) AS i";
    client.execute(seed, &[&10_000i32]).await.expect("seed");

    let mut seen = HashSet::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let query = match &cursor {
            None => "action_type=seeded&page_size=500".to_owned(),
            Some(c) => format!("action_type=seeded&page_size=500&cursor={c}"),
        };
        let body = logs(&app, &query).await;
        for row in rows(&body) {
            assert!(
                seen.insert(row["id"].as_str().expect("id").to_owned()),
                "duplicate row"
            );
        }
        pages += 1;
        // Newer rows keep arriving while the walk goes on.
        client
            .execute(
                &seed.replace("now() - interval '1 hour'", "now()"),
                &[&50i32],
            )
            .await
            .expect("insert");
        match body["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(
        seen.len(),
        10_000,
        "every seeded row once, after {pages} pages"
    );
}

#[tokio::test]
async fn bad_parameters_are_400_naming_the_parameter() {
    let app = spawn_app().await;
    let alice = app.new_user("alice").await;
    for (query, name) in [
        ("user_id=xyz", "user_id"),
        ("session_id=1", "session_id"),
        ("status_code=99", "status_code"),
        ("success=maybe", "success"),
        ("client_ip=not-an-ip", "client_ip"),
        ("start_date=yesterday", "start_date"),
        ("start_date=2026-02-02&end_date=2026-02-01", "end_date"),
        ("page_size=0", "page_size"),
        ("page_size=1001", "page_size"),
        ("page=0", "page"),
        // Found by fuzzing: these were a panic or a 500.
        ("page=9223372036854775807", "page"),
        ("page=4294967296", "page"),
        ("start_date=-5000-06-01", "start_date"),
        ("end_date=-9999-01-01", "end_date"),
        // i128::MAX microseconds, and a time before 4713 BC, as cursors.
        (
            "cursor=MTcwMTQxMTgzNDYwNDY5MjMxNzMxNjg3MzAzNzE1ODg0MTA1NzI3LDAwMDAwMDAwLTAwMDAtMDAwMC0wMDAwLTAwMDAwMDAwMDAwMA",
            "cursor",
        ),
        (
            "cursor=LTMwMDAwMDAwMDAwMDAwMDAwMCwwMDAwMDAwMC0wMDAwLTAwMDAtMDAwMC0wMDAwMDAwMDAwMDA",
            "cursor",
        ),
        ("cursor=garbage!", "cursor"),
        ("include_total=perhaps", "include_total"),
        ("color=blue", "color"),
    ] {
        let response = app
            .get_as(&format!("/admin/audit/logs?{query}"), ADMIN)
            .await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{query}");
        let body: Value = response.json().await.expect("json");
        assert_eq!(body["code"], "invalid_parameter");
        assert!(
            body["detail"].as_str().expect("detail").starts_with(name),
            "{query}: {body}"
        );
    }
    assert_eq!(
        app.get_as("/admin/audit/logs", &alice.token).await.status(),
        StatusCode::FORBIDDEN
    );
    // The largest page, and the last day time can write as both ends (its
    // next day, the usual exclusive end, does not exist): answered, empty.
    for query in [
        "page=4294967295&page_size=1000",
        "start_date=9999-12-31&end_date=9999-12-31",
    ] {
        let body = logs(&app, query).await;
        assert_eq!(rows(&body), Vec::<Value>::new(), "{query}: {body}");
    }
}
