//! One audit record per request: a row of `audit_actions`.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::chain::{ACTIONS_CHAIN, Canonical};
use crate::row::{Column, ColumnValue};
use crate::storable::{
    Alterations, MAX_COMMAND_TEXT_CHARS, MAX_ENDPOINT_CHARS, MAX_ERROR_DETAILS_CHARS,
    MAX_FILE_PATH_CHARS, MAX_HTTP_METHOD_CHARS, MAX_LABEL_CHARS, MAX_ROUTE_CHARS,
    MAX_USER_AGENT_CHARS, TextColumn,
};

/// The model's half of the derived code (the store derives the rest).
macro_rules! derive_action_record {
    ($( $(#[$attr:meta])* $name:ident: $ty:ty => $sql:ident $([$($sanitize:tt)*])?; )*) => {
        /// Every column of `audit_actions`, in the table's order. Serialisable
        /// so the writer can spool records to disk while the database is
        /// away. Values a client controls are made storable before the record
        /// is queued ([`ActionRecord::make_storable`]).
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        pub struct ActionRecord {
            $( $(#[$attr])* pub $name: $ty, )*
            /// Not a column: the first 16 hex digits of SHA-256(token), which
            /// with `user_id` identifies the session. The writer assigns
            /// `session_id`.
            pub session_token_hash: Option<String>,
        }

        /// The column names of `audit_actions`, in order.
        pub const ACTION_COLUMNS: &[&str] = &[$(stringify!($name)),*];

        /// The columns of `audit_actions` with their types, in order.
        pub const ACTION_COLUMN_DEFS: &[Column] = &[$(Column {
            name: stringify!($name),
            sql_type: stringify!($sql),
            nullable: <$ty as ColumnValue>::NULLABLE,
        }),*];

        impl ActionRecord {
            /// Every column empty (NULL, zero, false, nil).
            fn empty() -> ActionRecord {
                ActionRecord {
                    $( $name: ColumnValue::empty(), )*
                    session_token_hash: None,
                }
            }

            /// The canonical encoding of this row at `seq` in the actions
            /// chain: every column but the chain's own, in table order
            /// (columns added after v1 only when not NULL).
            pub fn canonical(&self, seq: i64) -> Canonical {
                let mut canonical = Canonical::row(ACTIONS_CHAIN, seq);
                let mut index = 0;
                $(
                    self.$name.encode_column(index, stringify!($name), &mut canonical);
                    index += 1;
                )*
                debug_assert_eq!(index, ACTION_COLUMNS.len());
                canonical
            }

            /// Cuts and cleans the request-controlled columns: text first,
            /// then JSON, each in table order (the order of the notes in
            /// `metadata.sanitized`).
            pub(crate) fn sanitize_columns(&mut self, changes: &mut Alterations) {
                $( $( sanitize!(text, changes, self.$name, $name, $($sanitize)*); )? )*
                $( $( sanitize!(json, changes, self.$name, $name, $($sanitize)*); )? )*
            }
        }
    };
}

/// One column's part of one pass of [`ActionRecord::sanitize_columns`].
macro_rules! sanitize {
    (text, $changes:ident, $field:expr, $name:ident, text $max:expr) => {
        if let Some(text) = TextColumn::text_mut(&mut $field) {
            $changes.text(stringify!($name), text, $max);
        }
    };
    (json, $changes:ident, $field:expr, $name:ident, json) => {
        $changes.json(stringify!($name), &mut $field)
    };
    ($pass:ident, $($other:tt)*) => {};
}

crate::action_columns!(derive_action_record);

impl ActionRecord {
    /// A record of a request that has just arrived: a fresh UUIDv7 id, and
    /// every fact not known yet empty (`route` is `unmatched` until routing
    /// says otherwise).
    pub fn arrived(
        request_id: Uuid,
        timestamp: OffsetDateTime,
        http_method: &str,
        endpoint: &str,
    ) -> ActionRecord {
        ActionRecord {
            id: Uuid::now_v7(),
            timestamp,
            request_id,
            endpoint: endpoint.to_owned(),
            route: "unmatched".to_owned(),
            http_method: http_method.to_owned(),
            ..ActionRecord::empty()
        }
    }

    /// Sets the kind, status and success flag.
    pub fn set_outcome(&mut self, kind: crate::ActionKind, status: u16) {
        self.action_type = kind.action_type.to_owned();
        self.action_category = kind.category.to_owned();
        self.status_code = status as i16;
        self.success = is_success(status);
    }

    /// `metadata` as an object to add keys to (made one if it is empty or
    /// not an object, a non-object kept under `value`).
    pub fn metadata_mut(&mut self) -> &mut Map<String, Value> {
        if !matches!(self.metadata, Some(Value::Object(_))) {
            let mut map = Map::new();
            if let Some(previous) = self.metadata.take() {
                map.insert("value".to_owned(), previous);
            }
            self.metadata = Some(Value::Object(map));
        }
        match &mut self.metadata {
            Some(Value::Object(map)) => map,
            _ => unreachable!("an object was just ensured"),
        }
    }
}

/// `2xx` and `3xx` count as success.
pub fn is_success(status: u16) -> bool {
    (200..400).contains(&status)
}

/// Milliseconds with microsecond precision, as stored.
pub fn millis_from_micros(micros: u64) -> f64 {
    micros as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn success_is_2xx_and_3xx() {
        assert!(!is_success(199));
        assert!(is_success(200) && is_success(304) && is_success(399));
        assert!(!is_success(400) && !is_success(503));
    }

    #[test]
    fn microsecond_precision() {
        assert_eq!(millis_from_micros(1_234), 1.234);
        assert_eq!(millis_from_micros(0), 0.0);
    }
}
