//! The one declaration of an `audit_actions` row.
//!
//! [`action_columns!`](crate::action_columns) lists every column once, in
//! the table's order. Everything that must follow the column set is derived
//! from it: here the [`ActionRecord`](crate::ActionRecord) struct, the
//! column names and SQL types ([`ACTION_COLUMNS`](crate::ACTION_COLUMNS),
//! [`ACTION_COLUMN_DEFS`](crate::record::ACTION_COLUMN_DEFS)), the canonical
//! chain encoding and the sanitizing of request-controlled text; in
//! `nox-audit-store` the PostgreSQL side (the `COPY` types and values, the
//! `unnest` arrays, the row reader). So adding a column is its migration
//! plus one line below.

use std::net::IpAddr;

use serde_json::Value;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::chain::Canonical;

/// Hands the column list of `audit_actions` to the macro `$derive`: one
/// line per column,
///
/// `name: RustType => SQL_TYPE [sanitize];`
///
/// - `RustType` is the field's type; `Option<_>` means the column is
///   nullable;
/// - `SQL_TYPE` is the column's PostgreSQL type, spelt as its
///   `tokio_postgres::types::Type` constant (`information_schema`'s
///   `udt_name`, upper-cased);
/// - `[text MAX]` cuts a request-controlled text to `MAX` characters and
///   replaces NUL, `[json]` does the same for JSON
///   ([`ActionRecord::make_storable`](crate::ActionRecord::make_storable)).
///
/// The order is the table's, the chain encoding's and the spool's: new
/// columns go at the end, nullable (`Option<_>`), without a default or a
/// backfill: the chain encodes the [`V1_COLUMNS`] first columns always and a
/// later one only when it is not NULL, so rows written before it existed
/// still verify.
#[macro_export]
macro_rules! action_columns {
    ($derive:ident) => {
        $derive! {
            id: Uuid => UUID;
            #[serde(with = "time::serde::rfc3339")]
            timestamp: OffsetDateTime => TIMESTAMPTZ;
            request_id: Uuid => UUID;
            session_id: Option<Uuid> => UUID;
            user_id: Option<Uuid> => UUID;
            endpoint: String => VARCHAR [text MAX_ENDPOINT_CHARS];
            route: String => TEXT [text MAX_ROUTE_CHARS];
            http_method: String => VARCHAR [text MAX_HTTP_METHOD_CHARS];
            action_type: String => TEXT [text MAX_LABEL_CHARS];
            action_category: String => TEXT [text MAX_LABEL_CHARS];
            client_ip: Option<IpAddr> => INET;
            user_agent: Option<String> => TEXT [text MAX_USER_AGENT_CHARS];
            request_size: i64 => INT8;
            response_size: i64 => INT8;
            status_code: i16 => INT2;
            success: bool => BOOL;
            response_time_ms: f64 => FLOAT8;
            cpu_time_ms: Option<f64> => FLOAT8;
            memory_peak_mb: Option<f64> => FLOAT8;
            file_path: Option<String> => TEXT [text MAX_FILE_PATH_CHARS];
            file_size_bytes: Option<i64> => INT8;
            files_affected: Option<i32> => INT4;
            command_type: Option<String> => TEXT [text MAX_LABEL_CHARS];
            command_text: Option<String> => TEXT [text MAX_COMMAND_TEXT_CHARS];
            exit_code: Option<i32> => INT4;
            stdout_size: Option<i64> => INT8;
            stderr_size: Option<i64> => INT8;
            quota_violation: bool => BOOL;
            quota_consumed: Option<Value> => JSONB [json];
            quota_remaining: Option<Value> => JSONB [json];
            metadata: Option<Value> => JSONB [json];
            error_details: Option<String> => TEXT [text MAX_ERROR_DETAILS_CHARS];
        }
    };
}

/// How many columns encoding v1 had: each is encoded, NULL or not. A column
/// declared after them is encoded only when not NULL, named
/// (`Canonical::added_column`).
pub const V1_COLUMNS: usize = 32;

/// One column as declared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Column {
    pub name: &'static str,
    /// PostgreSQL's name of the type, upper-cased (`TIMESTAMPTZ`).
    pub sql_type: &'static str,
    pub nullable: bool,
}

/// What a column's Rust type brings to the derived code.
pub trait ColumnValue {
    /// `Option<_>`: the column allows NULL.
    const NULLABLE: bool = false;

    /// Appends the value's canonical encoding (presence byte included).
    fn encode(&self, canonical: &mut Canonical);

    /// NULL in the database.
    fn is_null(&self) -> bool {
        false
    }

    /// Appends column number `index` (from 0) of the declaration: a v1
    /// column as [`ColumnValue::encode`]; a later one only when not NULL,
    /// after its name.
    fn encode_column(&self, index: usize, name: &str, canonical: &mut Canonical) {
        if index < V1_COLUMNS {
            self.encode(canonical);
        } else if !self.is_null() {
            canonical.added_column(name);
            self.encode(canonical);
        }
    }

    /// The value of a fact not known yet.
    fn empty() -> Self;
}

impl<T: ColumnValue> ColumnValue for Option<T> {
    const NULLABLE: bool = true;

    fn encode(&self, canonical: &mut Canonical) {
        match self {
            None => {
                canonical.null();
            }
            Some(value) => value.encode(canonical),
        }
    }

    fn is_null(&self) -> bool {
        self.is_none()
    }

    fn empty() -> Self {
        None
    }
}

/// A column type: how it encodes and its empty value.
macro_rules! column_value {
    ($ty:ty, |$value:ident, $c:ident| $encode:expr, $empty:expr) => {
        impl ColumnValue for $ty {
            fn encode(&self, $c: &mut Canonical) {
                let $value = self;
                $encode;
            }

            fn empty() -> Self {
                $empty
            }
        }
    };
}

column_value!(Uuid, |v, c| c.uuid(Some(*v)), Uuid::nil());
column_value!(
    OffsetDateTime,
    |v, c| c.timestamp(Some(*v)),
    OffsetDateTime::UNIX_EPOCH
);
column_value!(String, |v, c| c.text(Some(v)), String::new());
column_value!(IpAddr, |v, c| c.ip(Some(*v)), IpAddr::from([0, 0, 0, 0]));
column_value!(i64, |v, c| c.int(Some(*v)), 0);
column_value!(i32, |v, c| c.int(Some(i64::from(*v))), 0);
column_value!(i16, |v, c| c.int(Some(i64::from(*v))), 0);
column_value!(f64, |v, c| c.float(Some(*v)), 0.0);
column_value!(bool, |v, c| c.bool(Some(*v)), false);
column_value!(Value, |v, c| c.json(Some(v)), Value::Null);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::ACTIONS_CHAIN;
    use crate::record::ACTION_COLUMN_DEFS;

    fn encoded(add: impl FnOnce(&mut Canonical)) -> Vec<u8> {
        let mut canonical = Canonical::row(ACTIONS_CHAIN, 1);
        let start = canonical.bytes().len();
        add(&mut canonical);
        canonical.bytes()[start..].to_vec()
    }

    /// Old rows must keep verifying after a column is added: a NULL in an
    /// added column adds nothing, while a v1 column's NULL is its byte `0`.
    #[test]
    fn an_added_column_is_encoded_only_when_not_null() {
        let none: Option<i64> = None;
        assert_eq!(encoded(|c| none.encode_column(3, "x", c)), [0]);
        assert!(encoded(|c| none.encode_column(V1_COLUMNS, "x", c)).is_empty());
        assert_eq!(
            encoded(|c| Some(7_i64).encode_column(V1_COLUMNS, "ab", c)),
            [&[2, 0, 0, 0, 2, b'a', b'b', 1][..], &7_i64.to_be_bytes()].concat()
        );
    }

    /// Two added columns, one NULL, cannot pass for the other: each value
    /// carries its column's name.
    #[test]
    fn added_columns_are_told_apart_by_name() {
        let first = encoded(|c| {
            Some(1_i64).encode_column(V1_COLUMNS, "a", c);
            None::<i64>.encode_column(V1_COLUMNS + 1, "b", c);
        });
        let second = encoded(|c| {
            None::<i64>.encode_column(V1_COLUMNS, "a", c);
            Some(1_i64).encode_column(V1_COLUMNS + 1, "b", c);
        });
        assert_ne!(first, second);
    }

    #[test]
    fn columns_after_v1_are_nullable() {
        assert!(ACTION_COLUMN_DEFS.len() >= V1_COLUMNS);
        for column in &ACTION_COLUMN_DEFS[V1_COLUMNS..] {
            assert!(column.nullable, "{} must be Option<_>", column.name);
        }
    }
}
