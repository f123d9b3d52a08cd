//! Encoding audit rows for export, per row, beside references measured in
//! the same run: the same text written from fields already rendered (CSV),
//! and the same JSON written from an already-decoded value (NDJSON). The
//! difference is the cost of decoding PostgreSQL's binary values.
//!
//! `cargo bench -p nox-audit-export --bench encode` (needs a PostgreSQL like
//! the tests: DATABASE_URL, 127.0.0.1:5432 or a throwaway cluster; plain
//! harness, medians of `NOX_BENCH_RUNS` runs, default 5).

use std::hint::black_box;
use std::time::Instant;

use nox_audit_export::{Columns, Encoder, Format, RowJson};
use nox_testkit::TestDb;

const ROWS: i64 = 10_000;

/// Nanoseconds per row of `pass` (which handles every row once), median of
/// `runs` passes.
fn per_row(runs: usize, rows: usize, mut pass: impl FnMut()) -> f64 {
    let mut samples: Vec<f64> = (0..runs)
        .map(|_| {
            let started = Instant::now();
            pass();
            started.elapsed().as_nanos() as f64 / rows as f64
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let runs: usize = std::env::var("NOX_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let db = TestDb::new().await;
    let client = db.client().await;
    client
        .execute(
            "INSERT INTO audit_actions (id, \"timestamp\", request_id, session_id, user_id, endpoint,
                 route, http_method, action_type, action_category, client_ip, user_agent,
                 request_size, response_size, status_code, success, response_time_ms, cpu_time_ms,
                 file_path, file_size_bytes, metadata, error_details)
             SELECT gen_random_uuid(), now() - i * interval '1 second', gen_random_uuid(),
                    gen_random_uuid(), gen_random_uuid(), '/cat', '/cat', 'GET', 'file_read',
                    'filesystem', '10.1.2.3', 'curl/8.5.0', 210, 4300, 200, true, 0.412, 0.081,
                    'data/dir_' || i % 40 || '/file, \"quoted\".csv', i * 17,
                    jsonb_build_object('entries', i % 50), NULL
             FROM generate_series(1, $1::bigint) AS i",
            &[&ROWS],
        )
        .await
        .expect("rows");
    let statement = client
        .prepare("SELECT * FROM audit_actions ORDER BY \"timestamp\" DESC")
        .await
        .expect("prepare");
    let rows = client.query(&statement, &[]).await.expect("rows");
    let columns = Columns::new(statement.columns()).expect("columns");

    let csv = per_row(runs, rows.len(), || {
        let mut encoder = Encoder::new(Format::Csv, columns.clone()).expect("encoder");
        for row in &rows {
            encoder.push(row).expect("encode");
        }
        black_box(encoder.finish().expect("finish"));
    });
    let rendered: Vec<Vec<String>> = rows
        .iter()
        .map(|row| {
            let value = serde_json::to_value(RowJson {
                columns: &columns,
                row,
            })
            .expect("json");
            columns
                .names()
                .iter()
                .map(|name| match &value[name] {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Null => String::new(),
                    other => other.to_string(),
                })
                .collect()
        })
        .collect();
    let csv_rendered = per_row(runs, rows.len(), || {
        let mut writer = csv::Writer::from_writer(Vec::with_capacity(8 << 20));
        for fields in &rendered {
            writer.write_record(fields).expect("write");
        }
        black_box(writer.into_inner().expect("bytes"));
    });
    let ndjson = per_row(runs, rows.len(), || {
        let mut encoder = Encoder::new(Format::Ndjson, columns.clone()).expect("encoder");
        for row in &rows {
            encoder.push(row).expect("encode");
        }
        black_box(encoder.finish().expect("finish"));
    });
    let decoded: Vec<serde_json::Value> = rows
        .iter()
        .map(|row| {
            serde_json::to_value(RowJson {
                columns: &columns,
                row,
            })
            .expect("json")
        })
        .collect();
    let ndjson_decoded = per_row(runs, rows.len(), || {
        let mut out = Vec::with_capacity(16 << 20);
        for value in &decoded {
            serde_json::to_writer(&mut out, value).expect("json");
            out.push(b'\n');
        }
        black_box(out);
    });
    println!(
        "{ROWS} rows of {} columns, ns per row (median of {runs}):",
        columns.names().len()
    );
    println!(
        "  CSV from rows      {csv:>8.0}   reference, CSV from rendered fields  {csv_rendered:>8.0}"
    );
    println!(
        "  NDJSON from rows   {ndjson:>8.0}   reference, NDJSON from decoded values {ndjson_decoded:>8.0}"
    );
}
