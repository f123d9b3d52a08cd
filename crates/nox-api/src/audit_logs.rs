//! `GET /admin/audit/logs`: the audit rows, filtered, newest first, paged by
//! keyset (`cursor`, constant cost however deep) or by `page` (for older
//! clients).

use std::collections::HashMap;
use std::net::IpAddr;

use actix_web::{HttpResponse, get, web};
use base64::Engine;
use ipnet::IpNet;
use nox_audit_export::{Columns, RowJson};
use nox_auth::Role;
use serde_json::{Map, Value, json};
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::{Date, OffsetDateTime};
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use crate::auth::Authenticated;
use crate::error::{ApiError, ErrorBody, refuse_nul};
use crate::state::AppState;

/// The filters `/logs` and `/export` share.
const FILTERS: &[&str] = &[
    "user_id",
    "session_id",
    "request_id",
    "action_type",
    "action_category",
    "endpoint",
    "status_code",
    "success",
    "quota_violation",
    "client_ip",
    "start_date",
    "end_date",
    "search",
];

/// `/logs`'s own parameters, besides the filters.
const PAGING: &[&str] = &["page", "page_size", "cursor", "include_total"];

pub(crate) fn invalid(name: &str, why: &str) -> ApiError {
    ApiError::InvalidParameter(format!("{name}: {why}"))
}

pub(crate) fn parse_bool(name: &str, text: &str) -> Result<bool, ApiError> {
    match text {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(invalid(name, "expected true or false")),
    }
}

/// Whether PostgreSQL's `timestamptz` can hold `at` (it starts in 4713 BC;
/// `time` goes back to -9999, and a value before was a 500).
fn storable_instant(at: OffsetDateTime) -> bool {
    at.to_offset(time::UtcOffset::UTC).year() > -4712
}

/// RFC 3339, or `YYYY-MM-DD` (the start of that UTC day, or with
/// `end_of_day` the start of the next one, exclusive; the second value says
/// whether the instant is exclusive).
fn parse_instant(
    name: &str,
    text: &str,
    end_of_day: bool,
) -> Result<(OffsetDateTime, bool), ApiError> {
    let parsed = match OffsetDateTime::parse(text, &Rfc3339) {
        Ok(at) => (at, false),
        Err(_) => {
            let day = Date::parse(text, format_description!("[year]-[month]-[day]"))
                .map_err(|_| invalid(name, "expected RFC 3339 or YYYY-MM-DD"))?;
            match (end_of_day, day.next_day()) {
                (false, _) => (day.midnight().assume_utc(), false),
                (true, Some(next)) => (next.midnight().assume_utc(), true),
                // 9999-12-31 has no next day here: up to its last instant,
                // inclusive (it was refused as before the start date).
                (true, None) => (
                    time::PrimitiveDateTime::new(day, time::Time::MAX).assume_utc(),
                    false,
                ),
            }
        }
    };
    if !storable_instant(parsed.0) {
        return Err(invalid(name, "out of range"));
    }
    Ok(parsed)
}

fn encode_cursor(at: OffsetDateTime, id: Uuid) -> String {
    let micros = at.unix_timestamp_nanos() / 1000;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{micros},{id}"))
}

fn decode_cursor(text: &str) -> Result<(OffsetDateTime, Uuid), ApiError> {
    let bad = || invalid("cursor", "not a cursor this API returned");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text)
        .map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let (micros, id) = text.split_once(',').ok_or_else(bad)?;
    let micros: i128 = micros.parse().map_err(|_| bad())?;
    let nanos = micros.checked_mul(1000).ok_or_else(bad)?;
    let at = OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .filter(|at| storable_instant(*at))
        .ok_or_else(bad)?;
    Ok((at, Uuid::parse_str(id).map_err(|_| bad())?))
}

/// The WHERE clause and its parameters, built from validated input only.
#[derive(Default)]
pub(crate) struct Filters {
    conditions: Vec<String>,
    pub(crate) params: Vec<Box<dyn ToSql + Sync + Send>>,
    /// The filters as given, for the response and the export's record.
    pub(crate) applied: Map<String, Value>,
}

impl Filters {
    fn add(&mut self, condition: impl Fn(usize) -> String, param: Box<dyn ToSql + Sync + Send>) {
        self.params.push(param);
        self.conditions.push(condition(self.params.len()));
    }

    pub(crate) fn sql(&self) -> String {
        if self.conditions.is_empty() {
            "TRUE".to_owned()
        } else {
            self.conditions.join(" AND ")
        }
    }
}

fn like_pattern(text: &str) -> String {
    let escaped = text
        .replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_");
    format!("%{escaped}%")
}

/// Validates the filters in `query`; any other key must be one of `own`
/// (the endpoint's own parameters).
pub(crate) fn build_filters(
    query: &HashMap<String, String>,
    own: &[&str],
) -> Result<Filters, ApiError> {
    let known = |key: &str| FILTERS.contains(&key) || own.contains(&key);
    if let Some(unknown) = query.keys().find(|k| !known(k)) {
        return Err(invalid(unknown, "unknown parameter"));
    }
    for (name, value) in query {
        refuse_nul(name, value)?;
    }
    let mut filters = Filters::default();
    for name in ["user_id", "session_id", "request_id"] {
        if let Some(text) = query.get(name) {
            let id = Uuid::parse_str(text).map_err(|_| invalid(name, "expected a UUID"))?;
            filters.add(|n| format!("a.{name} = ${n}"), Box::new(id));
            filters.applied.insert(name.into(), json!(id));
        }
    }
    for name in ["action_type", "action_category"] {
        if let Some(text) = query.get(name) {
            filters.add(|n| format!("a.{name} = ${n}"), Box::new(text.clone()));
            filters.applied.insert(name.into(), json!(text));
        }
    }
    if let Some(text) = query.get("endpoint") {
        filters.add(
            |n| format!("a.endpoint ILIKE ${n}"),
            Box::new(like_pattern(text)),
        );
        filters.applied.insert("endpoint".into(), json!(text));
    }
    if let Some(text) = query.get("status_code") {
        let code: i16 = text
            .parse()
            .ok()
            .filter(|c| (100..=599).contains(c))
            .ok_or_else(|| invalid("status_code", "expected 100 to 599"))?;
        filters.add(|n| format!("a.status_code = ${n}"), Box::new(code));
        filters.applied.insert("status_code".into(), json!(code));
    }
    for name in ["success", "quota_violation"] {
        if let Some(text) = query.get(name) {
            let value = parse_bool(name, text)?;
            filters.add(|n| format!("a.{name} = ${n}"), Box::new(value));
            filters.applied.insert(name.into(), json!(value));
        }
    }
    if let Some(text) = query.get("client_ip") {
        let network: IpNet = text
            .parse::<IpNet>()
            .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
            .map_err(|_| invalid("client_ip", "expected an address or a CIDR"))?;
        filters.add(
            |n| format!("a.client_ip <<= ${n}::text::inet"),
            Box::new(network.to_string()),
        );
        filters.applied.insert("client_ip".into(), json!(text));
    }
    let start = query
        .get("start_date")
        .map(|t| parse_instant("start_date", t, false))
        .transpose()?;
    let end = query
        .get("end_date")
        .map(|t| parse_instant("end_date", t, true))
        .transpose()?;
    if let (Some((start, _)), Some((end, exclusive))) = (start, end)
        && (end < start || (exclusive && end == start))
    {
        return Err(invalid("end_date", "is before start_date"));
    }
    if let Some((start, _)) = start {
        filters.add(|n| format!("a.\"timestamp\" >= ${n}"), Box::new(start));
        filters
            .applied
            .insert("start_date".into(), json!(query["start_date"]));
    }
    if let Some((end, exclusive)) = end {
        let op = if exclusive { "<" } else { "<=" };
        filters.add(move |n| format!("a.\"timestamp\" {op} ${n}"), Box::new(end));
        filters
            .applied
            .insert("end_date".into(), json!(query["end_date"]));
    }
    if let Some(text) = query.get("search") {
        filters.add(
            |n| {
                format!(
                    "(a.error_details ILIKE ${n} OR a.command_text ILIKE ${n} \
                     OR a.file_path ILIKE ${n} OR a.metadata::text ILIKE ${n})"
                )
            },
            Box::new(like_pattern(text)),
        );
        filters.applied.insert("search".into(), json!(text));
    }
    Ok(filters)
}

#[utoipa::path(
    params(
        ("user_id" = Option<Uuid>, Query), ("session_id" = Option<Uuid>, Query), ("request_id" = Option<Uuid>, Query),
        ("action_type" = Option<String>, Query), ("action_category" = Option<String>, Query),
        ("endpoint" = Option<String>, Query, description = "Case-insensitive substring"),
        ("status_code" = Option<i16>, Query, minimum = 100, maximum = 599), ("success" = Option<bool>, Query), ("quota_violation" = Option<bool>, Query),
        ("client_ip" = Option<String>, Query, description = "An address or a CIDR"),
        ("start_date" = Option<String>, Query, description = "RFC 3339 or YYYY-MM-DD, inclusive"),
        ("end_date" = Option<String>, Query, description = "RFC 3339 or YYYY-MM-DD (the whole day), inclusive"),
        ("search" = Option<String>, Query, description = "Substring of error_details, command_text, file_path or metadata"),
        ("page_size" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "1 to 1000, default 50"),
        ("page" = Option<u32>, Query, minimum = 1, description = "Offset paging, for compatibility: 1 to 4294967295"),
        ("cursor" = Option<String>, Query, description = "Keyset paging: a previous next_cursor"),
        ("include_total" = Option<bool>, Query),
    ),
    responses((status = 200, description = "Audit rows, newest first"), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])),
    tag = "admin-audit"
)]
#[get("/admin/audit/logs")]
pub async fn logs(
    caller: Authenticated,
    state: web::Data<AppState>,
    query: web::Query<HashMap<String, String>>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Auditor)?;
    let query = query.into_inner();
    let mut filters = build_filters(&query, PAGING)?;
    let page_size: i64 = match query.get("page_size") {
        None => 50,
        Some(text) => text
            .parse()
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| invalid("page_size", "expected 1 to 1000"))?,
    };
    // At most u32::MAX, as documented: the offset, (page - 1) * page_size,
    // then fits an i64 (a larger page overflowed: a panic, or in a release
    // build a negative OFFSET and a 500).
    let page: i64 = match query.get("page") {
        None => 1,
        Some(text) => text
            .parse()
            .ok()
            .filter(|n| (1..=i64::from(u32::MAX)).contains(n))
            .ok_or_else(|| invalid("page", "expected 1 to 4294967295"))?,
    };
    let include_total = query
        .get("include_total")
        .map(|t| parse_bool("include_total", t))
        .transpose()?
        .unwrap_or(false);
    let where_filters = filters.sql();
    let filter_param_count = filters.params.len();
    let mut paging = String::new();
    if let Some(cursor) = query.get("cursor") {
        let (at, id) = decode_cursor(cursor)?;
        filters.params.push(Box::new(at));
        filters.params.push(Box::new(id));
        let n = filters.params.len();
        paging = format!(" AND (a.\"timestamp\", a.id) < (${}, ${n})", n - 1);
    }
    let offset = if query.contains_key("cursor") {
        0
    } else {
        (page - 1) * page_size
    };
    let sql = format!(
        "SELECT a.*, u.name AS user_name FROM audit_actions a LEFT JOIN users u ON u.id = a.user_id
         WHERE {where_filters}{paging}
         ORDER BY a.\"timestamp\" DESC, a.id DESC LIMIT {} OFFSET {offset}",
        page_size + 1
    );
    let client = state.pool.get().await?;
    let params: Vec<&(dyn ToSql + Sync)> = filters
        .params
        .iter()
        .map(|p| p.as_ref() as &(dyn ToSql + Sync))
        .collect();
    let mut rows = client
        .query(&sql, &params)
        .await
        .map_err(ApiError::internal)?;
    let has_next = rows.len() as i64 > page_size;
    rows.truncate(page_size as usize);
    let next_cursor = has_next.then(|| {
        let last = &rows[rows.len() - 1];
        encode_cursor(last.get("timestamp"), last.get("id"))
    });
    let logs = match rows.first() {
        None => Vec::new(),
        Some(first) => {
            let columns = Columns::new(first.columns()).map_err(ApiError::internal)?;
            rows.iter()
                .map(|row| {
                    serde_json::to_value(RowJson {
                        columns: &columns,
                        row,
                    })
                })
                .collect::<Result<_, _>>()
                .map_err(ApiError::internal)?
        }
    };
    let mut body = json!({
        "logs": logs,
        "page": page,
        "page_size": page_size,
        "has_next": has_next,
        "next_cursor": next_cursor,
        "filters_applied": Value::Object(filters.applied),
    });
    if include_total {
        let count_sql = format!("SELECT count(*) FROM audit_actions a WHERE {where_filters}");
        let total: i64 = client
            .query_one(&count_sql, &params[..filter_param_count])
            .await
            .map_err(ApiError::internal)?
            .get(0);
        body["total_count"] = json!(total);
    }
    Ok(HttpResponse::Ok().json(body))
}
