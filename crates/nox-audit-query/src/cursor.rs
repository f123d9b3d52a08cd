//! Keyset cursors: the `(timestamp, id)` of the last row of a page, opaque
//! to clients (URL-safe base64 of `micros,uuid`).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::error::{QueryError, invalid};
use crate::filter::storable_instant;

/// Where the next page starts: rows strictly older than this key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub at: OffsetDateTime,
    pub id: Uuid,
}

impl Cursor {
    pub fn encode(&self) -> String {
        let micros = self.at.unix_timestamp_nanos() / 1000;
        URL_SAFE_NO_PAD.encode(format!("{micros},{}", self.id))
    }

    /// Only what [`Cursor::encode`] produces; anything else is a 400 that
    /// says nothing about the cursor's insides.
    pub fn decode(text: &str) -> Result<Cursor, QueryError> {
        let bad = || invalid("cursor", "not a cursor this API returned");
        let bytes = URL_SAFE_NO_PAD.decode(text).map_err(|_| bad())?;
        let text = String::from_utf8(bytes).map_err(|_| bad())?;
        let (micros, id) = text.split_once(',').ok_or_else(bad)?;
        let micros: i128 = micros.parse().map_err(|_| bad())?;
        let nanos = micros.checked_mul(1000).ok_or_else(bad)?;
        let at = OffsetDateTime::from_unix_timestamp_nanos(nanos)
            .ok()
            .filter(|at| storable_instant(*at))
            .ok_or_else(bad)?;
        let id = Uuid::parse_str(id).map_err(|_| bad())?;
        Ok(Cursor { at, id })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_survives_the_round_trip() {
        let cursor = Cursor {
            at: OffsetDateTime::from_unix_timestamp_nanos(1_765_000_000_123_456_000).unwrap(),
            id: Uuid::now_v7(),
        };
        assert_eq!(Cursor::decode(&cursor.encode()).unwrap(), cursor);
    }

    #[test]
    fn malformed_cursors_are_one_clear_error() {
        let encode = |text: &str| URL_SAFE_NO_PAD.encode(text);
        let id = Uuid::nil();
        let hostile = [
            String::new(),
            "!!!".into(),
            "a\0b".into(),
            "%27%20OR%201=1--".into(),
            URL_SAFE_NO_PAD.encode([0xff, 0xfe, b',']),
            encode("no comma"),
            encode(&format!("abc,{id}")),
            encode("1,not-a-uuid"),
            encode(&format!("{},{id}", i128::MAX)),
            encode(&format!("-999999999999999999,{id}")),
            encode(&format!("1,{id}' OR '1'='1")),
            "A".repeat(100_000),
        ];
        for text in hostile {
            let error = Cursor::decode(&text).unwrap_err();
            assert_eq!(
                error.to_string(),
                "cursor: not a cursor this API returned",
                "{text:?}"
            );
        }
    }
}
