//! Continuous verification through the real server (`NOX_AUDIT_VERIFY_SECS`):
//! `GET /admin/audit/status` shows each chain's newest result, whichever
//! server verified, and a row edited in SQL turns it failed.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nox_audit_model::chain::{ACTIONS_CHAIN, ADMIN_CHAIN};
use nox_testkit::{TEST_ADMIN_TOKEN, TestApp, spawn_app_on, spawn_app_with};
use reqwest::StatusCode;
use serde_json::{Value, json};

async fn status(app: &TestApp) -> Value {
    let response = app.get_as("/admin/audit/status", TEST_ADMIN_TOKEN).await;
    assert_eq!(response.status(), StatusCode::OK);
    response.json().await.expect("json")
}

/// The status once `done` holds of it (passes run every second; the
/// deadline is only there to end a broken test).
async fn status_when(app: &TestApp, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let status = status(app).await;
        if done(&status) {
            return status;
        }
        assert!(Instant::now() < deadline, "never: {status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn chain<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["verification"]["chains"]
        .as_array()
        .expect("chains")
        .iter()
        .find(|c| c["chain"] == name)
        .unwrap_or_else(|| panic!("no {name}: {status}"))
}

fn is_utc_time(value: &Value) -> bool {
    value
        .as_str()
        .is_some_and(|t| t.ends_with('Z') && t.contains('T'))
}

#[tokio::test]
async fn the_status_shows_each_chains_verification_and_an_edited_row_fails_it() {
    // No interval checkpoint during the test: every pass starts at the
    // chain's beginning, so the edited row is always in range.
    let app = spawn_app_with(|config| {
        config.audit_verify_secs = 1;
        config.audit_checkpoint_secs = 3600;
    })
    .await;
    let alice = app.new_user("alice").await;
    for _ in 0..5 {
        app.get_as("/me", &alice.token).await;
    }
    let status = status_when(&app, |s| {
        s["verification"]["outcome"] == "ok"
            && s["verification"]["chains"]
                .as_array()
                .is_some_and(|c| c.len() == 2)
            && chain(s, ACTIONS_CHAIN)["to_seq"]
                .as_i64()
                .is_some_and(|seq| seq >= 6)
    })
    .await;
    let verification = &status["verification"];
    assert_eq!(verification["interval_secs"], 1);
    assert!(is_utc_time(&verification["last_run_at"]), "{verification}");
    assert_eq!(status["audit_system"], "active");
    let actions = chain(&status, ACTIONS_CHAIN);
    let keys: BTreeSet<&str> = actions
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        BTreeSet::from([
            "chain",
            "from_seq",
            "to_seq",
            "outcome",
            "first_bad_seq",
            "problem_kind",
            "problem",
            "finished_at"
        ])
    );
    assert_eq!(actions["from_seq"], 1, "no checkpoint yet: from the start");
    assert_eq!(actions["outcome"], "ok");
    assert_eq!(
        (
            &actions["first_bad_seq"],
            &actions["problem_kind"],
            &actions["problem"]
        ),
        (&Value::Null, &Value::Null, &Value::Null)
    );
    assert!(is_utc_time(&actions["finished_at"]));
    assert_eq!(chain(&status, ADMIN_CHAIN)["outcome"], "ok");

    app.db
        .client()
        .await
        .batch_execute("UPDATE audit_actions SET user_agent = 'x' WHERE seq = 2")
        .await
        .expect("tamper");
    let status = status_when(&app, |s| s["verification"]["outcome"] == "failed").await;
    let actions = chain(&status, ACTIONS_CHAIN);
    assert_eq!(actions["outcome"], "failed", "{status}");
    assert_eq!(actions["first_bad_seq"], 2);
    assert_eq!(actions["problem_kind"], "hash_mismatch");
    assert!(actions["problem"].is_string());
    assert_eq!(
        (&actions["from_seq"], &actions["to_seq"]),
        (&json!(1), &json!(1))
    );
    assert_eq!(chain(&status, ADMIN_CHAIN)["outcome"], "ok");
    assert_eq!(status["audit_system"], "degraded");
    // Later passes keep finding it.
    let later = status_when(&app, |s| {
        s["verification"]["last_run_at"] != status["verification"]["last_run_at"]
    })
    .await;
    assert_eq!(chain(&later, ACTIONS_CHAIN)["first_bad_seq"], 2, "{later}");
    app.stop().await;
}

#[tokio::test]
async fn a_server_that_does_not_verify_says_so_and_shows_another_servers_results() {
    let quiet = spawn_app_with(|config| config.audit_verify_secs = 0).await;
    assert_eq!(
        status(&quiet).await["verification"],
        json!({"interval_secs": null, "last_run_at": null, "outcome": "never", "chains": []})
    );
    // Servers sharing a database share the signing key.
    let key = quiet.data_dir.path().join("audit-signing.key");
    let verifying = spawn_app_on(Arc::clone(&quiet.db), |config| {
        config.audit_verify_secs = 1;
        config.storage.audit_signing_key_file = Some(key);
    })
    .await;
    let seen = status_when(&quiet, |s| s["verification"]["outcome"] == "ok").await;
    assert_eq!(seen["verification"]["interval_secs"], Value::Null);
    assert_eq!(status(&verifying).await["verification"]["interval_secs"], 1);
    verifying.stop().await;
    quiet.stop().await;
}
