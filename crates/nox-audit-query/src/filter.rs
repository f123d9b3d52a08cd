//! The filters `/logs` and `/export` share, validated into a WHERE clause
//! whose only variable parts are numbered parameters: no input is ever
//! spliced into SQL text.

use std::collections::HashMap;
use std::net::IpAddr;

use ipnet::IpNet;
use serde_json::{Map, Value, json};
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::{Date, OffsetDateTime};
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use crate::error::{QueryError, invalid};

/// The filter parameters, by name.
pub const FILTERS: &[&str] = &[
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

/// A query parameter bound to a statement.
pub type Param = Box<dyn ToSql + Sync + Send>;

/// Refuses a NUL, which PostgreSQL's text cannot hold (it would fail the
/// query instead of answering 400).
pub fn refuse_nul(name: &str, text: &str) -> Result<(), QueryError> {
    match text.contains('\0') {
        true => Err(invalid(name, "must not contain a NUL byte")),
        false => Ok(()),
    }
}

/// `true`/`1` or `false`/`0`.
pub fn parse_bool(name: &str, text: &str) -> Result<bool, QueryError> {
    match text {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(invalid(name, "expected true or false")),
    }
}

/// A `days` parameter: 1 to 365, `default` when absent.
pub fn days_back(days: Option<i64>, default: i64) -> Result<i32, QueryError> {
    let days = days.unwrap_or(default);
    if (1..=365).contains(&days) {
        Ok(days as i32)
    } else {
        Err(QueryError::InvalidParameter("days must be 1 to 365".into()))
    }
}

/// Whether PostgreSQL's `timestamptz` can hold `at` (it starts in 4713 BC;
/// `time` goes back to -9999, and a value before was a 500).
pub(crate) fn storable_instant(at: OffsetDateTime) -> bool {
    at.to_offset(time::UtcOffset::UTC).year() > -4712
}

/// RFC 3339, or `YYYY-MM-DD` (the start of that UTC day, or with
/// `end_of_day` the start of the next one, exclusive; the second value says
/// whether the instant is exclusive).
fn parse_instant(
    name: &str,
    text: &str,
    end_of_day: bool,
) -> Result<(OffsetDateTime, bool), QueryError> {
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

/// `%text%` for ILIKE, with the pattern characters in `text` taken literally.
fn like_pattern(text: &str) -> String {
    let escaped = text
        .replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_");
    format!("%{escaped}%")
}

/// A validated filter set: conditions on the alias `a` of `audit_actions`,
/// their parameters, and the filters as given.
#[derive(Default)]
pub struct Filters {
    conditions: Vec<String>,
    params: Vec<Param>,
    applied: Map<String, Value>,
}

impl std::fmt::Debug for Filters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Filters")
            .field("conditions", &self.conditions)
            .field("applied", &self.applied)
            .finish_non_exhaustive()
    }
}

impl Filters {
    /// Validates the filters in `query`; any other key must be one of `own`
    /// (the caller's own parameters, which it validates itself).
    pub fn parse(query: &HashMap<String, String>, own: &[&str]) -> Result<Filters, QueryError> {
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
        filters.add_time_range(query)?;
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

    fn add(&mut self, condition: impl Fn(usize) -> String, param: Param) {
        self.params.push(param);
        self.conditions.push(condition(self.params.len()));
    }

    /// `start_date` (inclusive) and `end_date` (inclusive; a bare date
    /// covers its whole day).
    fn add_time_range(&mut self, query: &HashMap<String, String>) -> Result<(), QueryError> {
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
            self.add(|n| format!("a.\"timestamp\" >= ${n}"), Box::new(start));
            self.applied
                .insert("start_date".into(), json!(query["start_date"]));
        }
        if let Some((end, exclusive)) = end {
            let op = if exclusive { "<" } else { "<=" };
            self.add(move |n| format!("a.\"timestamp\" {op} ${n}"), Box::new(end));
            self.applied
                .insert("end_date".into(), json!(query["end_date"]));
        }
        Ok(())
    }

    /// The conditions joined with AND (`TRUE` when there are none).
    pub fn where_sql(&self) -> String {
        if self.conditions.is_empty() {
            "TRUE".to_owned()
        } else {
            self.conditions.join(" AND ")
        }
    }

    /// The parameters `$1..$n` of [`Filters::where_sql`].
    pub fn params(&self) -> &[Param] {
        &self.params
    }

    pub(crate) fn into_params(self) -> Vec<Param> {
        self.params
    }

    /// The filters as given (validated), for responses and records.
    pub fn applied(&self) -> &Map<String, Value> {
        &self.applied
    }
}

/// The parameters as `query` takes them.
pub(crate) fn borrowed(params: &[Param]) -> Vec<&(dyn ToSql + Sync)> {
    params
        .iter()
        .map(|p| p.as_ref() as &(dyn ToSql + Sync))
        .collect()
}

#[cfg(test)]
#[path = "filter_tests.rs"]
mod tests;
