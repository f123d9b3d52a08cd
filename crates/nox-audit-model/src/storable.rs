//! Making a record storable whatever a client sent: PostgreSQL refuses a
//! NUL in `text` and `jsonb`, and the columns' length limits refuse longer
//! values, and one refused row would fail its whole batch. Every field a
//! request controls therefore passes through [`ActionRecord::make_storable`]
//! before it is queued: NUL becomes U+FFFD, values over their column's limit
//! are cut (keeping the original's byte length and SHA-256), and
//! `metadata.sanitized` names every field that was altered. Bytes that were
//! not UTF-8 are replaced where they are decoded ([`text_from_bytes`]) and
//! marked there with [`mark_sanitized`].

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::ActionRecord;

/// Longest stored values, in characters (as PostgreSQL's `length` counts).
pub const MAX_ENDPOINT_CHARS: usize = 1024;
pub const MAX_ROUTE_CHARS: usize = 1024;
pub const MAX_HTTP_METHOD_CHARS: usize = 16;
pub const MAX_LABEL_CHARS: usize = 256;
pub const MAX_USER_AGENT_CHARS: usize = 500;
pub const MAX_FILE_PATH_CHARS: usize = 4096;
/// The whole command as run: `POST /run` accepts no longer one.
pub const MAX_COMMAND_TEXT_CHARS: usize = 10_000;
pub const MAX_ERROR_DETAILS_CHARS: usize = 1000;
/// Largest magnitude of a measure (milliseconds, mebibytes): the daily
/// rollups sum them as integer micro-units, which a larger value, or one
/// that is not finite, would overflow and stop.
pub const MAX_MEASURE: f64 = 1e12;

/// Largest JSON value (metadata, quota facts) in its compact form.
pub const MAX_JSON_BYTES: usize = 16 * 1024;

/// The metadata key listing the fields that were altered.
pub const SANITIZED_KEY: &str = "sanitized";
/// The metadata key holding, per cut field, the original's size and hash.
pub const ORIGINAL_KEY: &str = "original";

/// Text from bytes that should be UTF-8, and whether any had to be replaced.
pub fn text_from_bytes(bytes: &[u8]) -> (String, bool) {
    match String::from_utf8_lossy(bytes) {
        std::borrow::Cow::Borrowed(text) => (text.to_owned(), false),
        std::borrow::Cow::Owned(text) => (text, true),
    }
}

/// Adds `field` to `metadata.sanitized` (once).
pub fn mark_sanitized(metadata: &mut Map<String, Value>, field: &str) {
    let list = metadata
        .entry(SANITIZED_KEY)
        .or_insert_with(|| Value::Array(Vec::new()));
    if !list.is_array() {
        *list = Value::Array(Vec::new());
    }
    if let Value::Array(fields) = list
        && !fields.iter().any(|f| f == field)
    {
        fields.push(Value::String(field.to_owned()));
    }
}

/// What happened to one field.
#[derive(Debug, Default)]
pub(crate) struct Alterations {
    sanitized: Vec<&'static str>,
    /// Cut fields: name, original byte length, SHA-256 (hex).
    cut: Vec<(&'static str, usize, String)>,
}

impl Alterations {
    pub(crate) fn text(&mut self, field: &'static str, text: &mut String, max_chars: usize) {
        let mut altered = false;
        if let Some((cut, _)) = text.char_indices().nth(max_chars) {
            self.cut
                .push((field, text.len(), sha256_hex(text.as_bytes())));
            text.truncate(cut);
            altered = true;
        }
        if text.contains('\0') {
            *text = text.replace('\0', "\u{FFFD}");
            altered = true;
        }
        if altered {
            self.sanitized.push(field);
        }
    }

    pub(crate) fn json(&mut self, field: &'static str, value: &mut Option<Value>) {
        let Some(json) = value else { return };
        if replace_nul_in_json(json) {
            self.sanitized.push(field);
        }
        let compact = json.to_string();
        if compact.len() > MAX_JSON_BYTES {
            self.cut
                .push((field, compact.len(), sha256_hex(compact.as_bytes())));
            self.sanitized.push(field);
            *value = None;
        }
    }
}

/// A text column, nullable or not.
pub(crate) trait TextColumn {
    fn text_mut(&mut self) -> Option<&mut String>;
}

impl TextColumn for String {
    fn text_mut(&mut self) -> Option<&mut String> {
        Some(self)
    }
}

impl TextColumn for Option<String> {
    fn text_mut(&mut self) -> Option<&mut String> {
        self.as_mut()
    }
}

fn metadata_json_len(metadata: &Map<String, Value>) -> usize {
    serde_json::to_vec(metadata).map_or(usize::MAX, |json| json.len())
}

/// SHA-256 of `bytes` in lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// Replaces NUL in every string and key of `value`; whether any was found.
fn replace_nul_in_json(value: &mut Value) -> bool {
    match value {
        Value::String(text) if text.contains('\0') => {
            *text = text.replace('\0', "\u{FFFD}");
            true
        }
        Value::Array(items) => items
            .iter_mut()
            .fold(false, |found, item| replace_nul_in_json(item) | found),
        Value::Object(map) => {
            let mut found = false;
            if map.keys().any(|key| key.contains('\0')) {
                let entries = std::mem::take(map);
                for (key, item) in entries {
                    map.insert(key.replace('\0', "\u{FFFD}"), item);
                }
                found = true;
            }
            map.values_mut()
                .fold(found, |found, item| replace_nul_in_json(item) | found)
        }
        _ => false,
    }
}

impl ActionRecord {
    /// Makes every field storable (see the module's documentation) and
    /// notes in `metadata` what was altered. Idempotent.
    /// A measure that is not finite or past [`MAX_MEASURE`] is dropped
    /// (the response time, which is not optional, becomes 0).
    fn sanitize_measures(&mut self, changes: &mut Alterations) {
        let storable = |value: f64| value.is_finite() && value.abs() <= MAX_MEASURE;
        if !storable(self.response_time_ms) {
            self.response_time_ms = 0.0;
            changes.sanitized.push("response_time_ms");
        }
        for (field, value) in [
            ("cpu_time_ms", &mut self.cpu_time_ms),
            ("memory_peak_mb", &mut self.memory_peak_mb),
        ] {
            if value.is_some_and(|v| !storable(v)) {
                *value = None;
                changes.sanitized.push(field);
            }
        }
    }

    pub fn make_storable(&mut self) {
        let mut changes = Alterations::default();
        // The columns flagged in the declaration (`action_columns!`); the
        // metadata is the last JSON column, so the notes about the other
        // fields fit in it.
        self.sanitize_columns(&mut changes);
        self.sanitize_measures(&mut changes);
        if let Some(token_hash) = &mut self.session_token_hash {
            // Ours (16 hex digits); a longer one would fail the session row.
            token_hash.retain(|c| c.is_ascii_hexdigit());
            token_hash.truncate(64);
        }
        if changes.sanitized.is_empty() {
            return;
        }
        let metadata = self.metadata_mut();
        for field in &changes.sanitized {
            mark_sanitized(metadata, field);
        }
        if !changes.cut.is_empty() {
            let originals = metadata
                .entry(ORIGINAL_KEY)
                .or_insert_with(|| Value::Object(Map::new()));
            if !originals.is_object() {
                *originals = Value::Object(Map::new());
            }
            if let Value::Object(originals) = originals {
                for (field, bytes, sha256) in changes.cut {
                    originals.insert(
                        field.to_owned(),
                        serde_json::json!({ "bytes": bytes, "sha256": sha256 }),
                    );
                }
            }
        }
        // The notes themselves may take metadata past its limit: then only
        // they are kept (so a second pass changes nothing).
        if metadata_json_len(metadata) > MAX_JSON_BYTES {
            metadata.retain(|key, _| key == SANITIZED_KEY || key == ORIGINAL_KEY);
            mark_sanitized(metadata, "metadata");
        }
    }
}

impl ActionRecord {
    /// The least of this record that still says a request happened, for a
    /// row PostgreSQL refused: who, when, which route, the outcome, and
    /// why the rest is missing (`metadata.write_error`). Every free-text
    /// value is left out.
    pub fn minimal(&self, write_error: Value) -> ActionRecord {
        let mut minimal = ActionRecord {
            session_id: self.session_id,
            user_id: self.user_id,
            route: self.route.clone(),
            action_type: self.action_type.clone(),
            action_category: self.action_category.clone(),
            client_ip: self.client_ip,
            request_size: self.request_size,
            response_size: self.response_size,
            status_code: self.status_code,
            success: self.success,
            response_time_ms: self.response_time_ms,
            quota_violation: self.quota_violation,
            metadata: Some(serde_json::json!({ "write_error": write_error })),
            ..ActionRecord::arrived(self.request_id, self.timestamp, &self.http_method, "")
        };
        minimal.id = self.id;
        minimal.make_storable();
        minimal
    }
}

#[cfg(test)]
mod tests {
    use time::OffsetDateTime;
    use uuid::Uuid;

    use super::*;

    fn record() -> ActionRecord {
        ActionRecord::arrived(Uuid::now_v7(), OffsetDateTime::now_utc(), "GET", "/ls")
    }

    fn sanitized(record: &ActionRecord) -> Vec<String> {
        record
            .metadata
            .as_ref()
            .and_then(|m| m.get(SANITIZED_KEY))
            .and_then(Value::as_array)
            .map(|list| {
                list.iter()
                    .map(|v| v.as_str().unwrap_or_default().to_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn a_clean_record_is_left_alone() {
        let mut clean = record();
        clean.file_path = Some("notes/a.txt".into());
        let before = clean.clone();
        clean.make_storable();
        assert_eq!(clean, before);
    }

    #[test]
    fn nul_is_replaced_and_noted() {
        let mut hostile = record();
        hostile.file_path = Some("a\0b".into());
        hostile.metadata = Some(serde_json::json!({ "k\0": ["x\0"] }));
        hostile.make_storable();
        assert_eq!(hostile.file_path.as_deref(), Some("a\u{FFFD}b"));
        let metadata = hostile.metadata.as_ref().expect("metadata");
        assert_eq!(metadata["k\u{FFFD}"][0], "x\u{FFFD}");
        assert_eq!(sanitized(&hostile), ["file_path", "metadata"]);
        assert!(!metadata.to_string().contains("\\u0000"));
    }

    #[test]
    fn a_cut_keeps_the_originals_size_and_hash() {
        let mut long = record();
        let command = "é".repeat(MAX_COMMAND_TEXT_CHARS + 5);
        long.command_text = Some(command.clone());
        long.make_storable();
        let stored = long.command_text.as_deref().expect("command");
        assert_eq!(stored.chars().count(), MAX_COMMAND_TEXT_CHARS);
        let original = &long.metadata.as_ref().expect("metadata")[ORIGINAL_KEY]["command_text"];
        assert_eq!(original["bytes"], command.len());
        assert_eq!(original["sha256"], sha256_hex(command.as_bytes()));
        assert_eq!(sanitized(&long), ["command_text"]);
    }

    #[test]
    fn measures_the_rollups_could_not_sum_are_dropped_and_noted() {
        let mut odd = record();
        odd.response_time_ms = f64::NAN;
        odd.cpu_time_ms = Some(f64::INFINITY);
        odd.memory_peak_mb = Some(MAX_MEASURE * 2.0);
        odd.make_storable();
        assert_eq!(
            (odd.response_time_ms, odd.cpu_time_ms, odd.memory_peak_mb),
            (0.0, None, None)
        );
        assert_eq!(
            sanitized(&odd),
            ["response_time_ms", "cpu_time_ms", "memory_peak_mb"]
        );
        let mut fine = record();
        fine.cpu_time_ms = Some(MAX_MEASURE);
        fine.make_storable();
        assert_eq!(fine.cpu_time_ms, Some(MAX_MEASURE));
    }

    #[test]
    fn a_method_longer_than_its_column_is_cut() {
        let mut odd = record();
        odd.http_method = "X".repeat(40);
        odd.make_storable();
        assert_eq!(odd.http_method.len(), MAX_HTTP_METHOD_CHARS);
    }

    #[test]
    fn oversized_json_is_replaced_by_its_size_and_hash() {
        let mut big = record();
        big.quota_consumed = Some(Value::String("x".repeat(MAX_JSON_BYTES + 1)));
        big.make_storable();
        assert_eq!(big.quota_consumed, None);
        assert_eq!(sanitized(&big), ["quota_consumed"]);
    }

    #[test]
    fn non_object_metadata_is_kept_under_value() {
        let mut odd = record();
        odd.metadata = Some(Value::String("a\0".into()));
        odd.make_storable();
        let metadata = odd.metadata.expect("metadata");
        assert_eq!(metadata["value"], "a\u{FFFD}");
        assert_eq!(metadata[SANITIZED_KEY][0], "metadata");
    }

    #[test]
    fn making_storable_twice_changes_nothing_more() {
        let mut hostile = record();
        hostile.user_agent = Some(format!("{}\0", "a".repeat(600)));
        hostile.make_storable();
        let once = hostile.clone();
        hostile.make_storable();
        assert_eq!(hostile, once);
    }

    #[test]
    fn metadata_near_its_limit_stays_within_it_and_a_second_pass_changes_nothing() {
        let mut near = record();
        near.metadata = Some(serde_json::json!({ "k": "m".repeat(MAX_JSON_BYTES - 10) }));
        near.command_text = Some("c".repeat(MAX_COMMAND_TEXT_CHARS + 1));
        near.make_storable();
        let metadata = near.metadata.clone().expect("metadata");
        assert!(metadata.to_string().len() <= MAX_JSON_BYTES);
        assert!(
            metadata[ORIGINAL_KEY]["command_text"].is_object(),
            "{metadata}"
        );
        let once = near.clone();
        near.make_storable();
        assert_eq!(near, once);
    }

    #[test]
    fn invalid_utf8_is_replaced_and_reported() {
        assert_eq!(text_from_bytes(b"ok"), ("ok".to_owned(), false));
        assert_eq!(text_from_bytes(b"a\xffb"), ("a\u{FFFD}b".to_owned(), true));
    }
}
