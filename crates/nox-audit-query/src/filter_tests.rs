//! Filter parsing and the SQL it builds, against hostile input.

use super::*;
use crate::error::ErrorKind;
use crate::{ExportQuery, LogsQuery, UserNames};

fn query(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn error(pairs: &[(&str, &str)]) -> String {
    let error = Filters::parse(&query(pairs), &[]).unwrap_err();
    assert_eq!(error.kind(), ErrorKind::InvalidParameter);
    error.to_string()
}

const INJECTIONS: &[&str] = &[
    "' OR '1'='1",
    "1; DROP TABLE audit_actions; --",
    "$1",
    "\") OR TRUE --",
    "a.user_id",
    "%_\\",
];

#[test]
fn no_filters_match_everything() {
    let filters = Filters::parse(&query(&[]), &[]).unwrap();
    assert_eq!(filters.where_sql(), "TRUE");
    assert!(filters.params().is_empty());
    assert!(filters.applied().is_empty());
}

#[test]
fn every_filter_becomes_a_numbered_parameter() {
    let id = Uuid::nil().to_string();
    let all = [
        ("user_id", id.as_str()),
        ("session_id", id.as_str()),
        ("request_id", id.as_str()),
        ("action_type", "file_read"),
        ("action_category", "filesystem"),
        ("endpoint", "/ls"),
        ("status_code", "200"),
        ("success", "true"),
        ("quota_violation", "0"),
        ("client_ip", "10.0.0.0/8"),
        ("start_date", "2026-01-01"),
        ("end_date", "2026-01-31T12:00:00Z"),
        ("search", "needle"),
    ];
    let filters = Filters::parse(&query(&all), &[]).unwrap();
    assert_eq!(filters.params().len(), all.len());
    assert_eq!(filters.applied().len(), all.len());
    let sql = filters.where_sql();
    for n in 1..=all.len() {
        assert!(sql.contains(&format!("${n}")), "{sql}");
    }
    assert!(sql.contains("a.client_ip <<= $10::text::inet"), "{sql}");
    assert!(sql.contains("a.\"timestamp\" <= $12"), "{sql}");
}

#[test]
fn injection_attempts_are_refused_or_bound_never_spliced() {
    for attack in INJECTIONS {
        // Typed filters refuse them.
        for name in ["user_id", "session_id", "request_id"] {
            assert_eq!(error(&[(name, attack)]), format!("{name}: expected a UUID"));
        }
        assert_eq!(
            error(&[("status_code", attack)]),
            "status_code: expected 100 to 599"
        );
        for name in ["success", "quota_violation"] {
            assert_eq!(
                error(&[(name, attack)]),
                format!("{name}: expected true or false")
            );
        }
        assert_eq!(
            error(&[("client_ip", attack)]),
            "client_ip: expected an address or a CIDR"
        );
        for name in ["start_date", "end_date"] {
            assert_eq!(
                error(&[(name, attack)]),
                format!("{name}: expected RFC 3339 or YYYY-MM-DD")
            );
        }
        // Text filters take them as values: the SQL text never changes.
        for name in ["action_type", "action_category", "endpoint", "search"] {
            let filters = Filters::parse(&query(&[(name, attack)]), &[]).unwrap();
            let benign = Filters::parse(&query(&[(name, "x")]), &[]).unwrap();
            assert_eq!(filters.where_sql(), benign.where_sql(), "{name}: {attack}");
            assert_eq!(filters.params().len(), 1);
            assert_eq!(filters.applied()[name], *attack);
        }
        // Nor do unknown parameter names get anywhere.
        let message = error(&[(attack, "x")]);
        assert_eq!(message, format!("{attack}: unknown parameter"));
    }
}

#[test]
fn like_patterns_match_their_text_literally() {
    assert_eq!(like_pattern("50%_off\\"), "%50\\%\\_off\\\\%");
}

#[test]
fn nul_bytes_are_refused_in_every_parameter() {
    for name in FILTERS {
        assert_eq!(
            error(&[(name, "a\0b")]),
            format!("{name}: must not contain a NUL byte")
        );
    }
    let own = Filters::parse(&query(&[("page", "\0")]), &["page"]).unwrap_err();
    assert_eq!(own.to_string(), "page: must not contain a NUL byte");
}

#[test]
fn replacement_characters_from_invalid_utf8_are_plain_text() {
    // A query string's invalid UTF-8 arrives as U+FFFD (lossy decoding):
    // text filters bind it, typed ones refuse it.
    let filters = Filters::parse(&query(&[("search", "\u{fffd}\u{fffd}")]), &[]).unwrap();
    assert_eq!(filters.params().len(), 1);
    assert_eq!(
        error(&[("user_id", "\u{fffd}")]),
        "user_id: expected a UUID"
    );
    assert_eq!(error(&[("\u{fffd}", "x")]), "\u{fffd}: unknown parameter");
}

#[test]
fn dates_out_of_range_or_reversed_are_refused() {
    assert_eq!(
        error(&[("start_date", "-9999-01-01")]),
        "start_date: out of range"
    );
    assert_eq!(
        error(&[("start_date", "2026-02-01"), ("end_date", "2026-01-31")]),
        "end_date: is before start_date"
    );
    // A date-only end covers its whole day, so the same day is fine...
    let same = Filters::parse(
        &query(&[("start_date", "2026-02-01"), ("end_date", "2026-02-01")]),
        &[],
    )
    .unwrap();
    assert!(same.where_sql().ends_with("a.\"timestamp\" < $2"));
    // ...and the last representable day ends inclusively.
    let last = Filters::parse(&query(&[("end_date", "9999-12-31")]), &[]).unwrap();
    assert!(last.where_sql().ends_with("<= $1"));
    assert_eq!(
        error(&[("end_date", "2026-13-01")]),
        "end_date: expected RFC 3339 or YYYY-MM-DD"
    );
}

#[test]
fn days_and_booleans_are_bounded() {
    assert_eq!(days_back(None, 7).unwrap(), 7);
    for days in [0, -1, 366, i64::MAX, i64::MIN] {
        assert_eq!(
            days_back(Some(days), 7).unwrap_err().to_string(),
            "days must be 1 to 365"
        );
    }
    for text in ["yes", "TRUE", "", "2"] {
        assert!(parse_bool("x", text).is_err(), "{text}");
    }
}

#[test]
fn paging_limits_are_enforced() {
    let logs = |pairs: &[(&str, &str)]| LogsQuery::parse(&query(pairs));
    let default = logs(&[]).unwrap();
    assert_eq!((default.page, default.page_size), (1, 50));
    for size in ["0", "1001", "-1", "99999999999999999999", "1e3", " 5"] {
        assert_eq!(
            logs(&[("page_size", size)]).unwrap_err().to_string(),
            "page_size: expected 1 to 1000"
        );
    }
    for page in ["0", "4294967296", "-3", "NaN"] {
        assert_eq!(
            logs(&[("page", page)]).unwrap_err().to_string(),
            "page: expected 1 to 4294967295"
        );
    }
    // The largest page and page size still make a valid offset.
    let deep = logs(&[("page", "4294967295"), ("page_size", "1000")]).unwrap();
    assert!(deep.sql(None).ends_with("LIMIT 1001 OFFSET 4294967294000"));
    assert_eq!(
        logs(&[("cursor", "' OR 1=1 --")]).unwrap_err().to_string(),
        "cursor: not a cursor this API returned"
    );
    assert_eq!(
        logs(&[("include_total", "maybe")]).unwrap_err().to_string(),
        "include_total: expected true or false"
    );
    // Export-only parameters are unknown here.
    assert_eq!(
        logs(&[("format", "csv")]).unwrap_err().to_string(),
        "format: unknown parameter"
    );
}

#[test]
fn a_cursor_pages_by_keyset_after_the_filters() {
    let cursor = crate::Cursor {
        at: time::OffsetDateTime::UNIX_EPOCH,
        id: Uuid::nil(),
    }
    .encode();
    let logs = LogsQuery::parse(&query(&[("success", "true"), ("cursor", &cursor)])).unwrap();
    let users = UserNames::new("users", "id", "name").unwrap();
    let sql = logs.sql(Some(&users));
    assert!(
        sql.contains("LEFT JOIN users u ON u.id = a.user_id"),
        "{sql}"
    );
    assert!(
        sql.contains("a.success = $1 AND (a.\"timestamp\", a.id) < ($2, $3)"),
        "{sql}"
    );
    assert!(sql.ends_with("LIMIT 51 OFFSET 0"), "{sql}");
    assert!(logs.sql(None).contains("NULL::text AS user_name"));
    assert_eq!(
        logs.count_sql(),
        "SELECT count(*) FROM audit_actions a WHERE a.success = $1"
    );
}

#[test]
fn export_parameters_are_validated() {
    let export = |pairs: &[(&str, &str)]| ExportQuery::parse(&query(pairs));
    let plain = export(&[]).unwrap();
    assert_eq!(plain.content_type(), "text/csv; charset=utf-8");
    assert!(
        plain
            .sql()
            .ends_with("ORDER BY a.\"timestamp\" DESC, a.id DESC")
    );
    let limited = export(&[("limit", "10"), ("compress", "true"), ("format", "ndjson")]).unwrap();
    assert!(limited.sql().ends_with(" LIMIT 10"));
    assert_eq!(limited.content_type(), "application/gzip");
    for limit in ["0", "-1", "10; DELETE", "99999999999999999999"] {
        assert_eq!(
            export(&[("limit", limit)]).unwrap_err().to_string(),
            "limit: expected 1 or more"
        );
    }
    assert_eq!(
        export(&[("format", "xml")]).unwrap_err().to_string(),
        "format: expected csv, json or ndjson"
    );
    assert_eq!(
        export(&[("page_size", "5")]).unwrap_err().to_string(),
        "page_size: unknown parameter"
    );
}

#[test]
fn user_tables_must_be_plain_identifiers() {
    assert!(UserNames::new("auth.users", "id", "name").is_ok());
    for (table, id, name) in [
        ("users u; --", "id", "name"),
        ("users", "id = 1 OR", "name"),
        ("users", "id", "x.name"),
        ("", "id", "name"),
        ("1users", "id", "name"),
        ("users", "id", "\"name\""),
    ] {
        assert!(
            UserNames::new(table, id, name).is_err(),
            "{table} {id} {name}"
        );
    }
}
