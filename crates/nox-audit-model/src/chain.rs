//! The tamper-evident hash chains over the audit tables.
//!
//! Each chained row has a gapless sequence number `seq` (from 1) and
//! `row_hash = SHA-256(previous row_hash ‖ canonical encoding)`, the first
//! row's previous hash being 32 zero bytes. The canonical encoding (specified
//! in ARCHITECTURE.md, "The audit hash chains") is:
//!
//! - the domain tag `nox-audit-v1`, then the chain's name, length-prefixed;
//! - `seq` as 8 bytes, big-endian;
//! - every column in a fixed order, each as one presence byte (`0` for
//!   NULL, which ends the field, `1` otherwise) followed by the value:
//!   UUIDs as their 16 bytes; timestamps as microseconds since the Unix
//!   epoch (UTC), 8 bytes big-endian signed; integers widened to 8 bytes
//!   big-endian signed; floats as their IEEE 754 bits, 8 bytes big-endian;
//!   booleans as one byte `0`/`1`; text as a 4-byte big-endian byte length
//!   and its UTF-8 bytes; IP addresses as one byte `4` or `16` and the
//!   address bytes; JSON as text (length-prefixed) in its canonical form:
//!   no whitespace, object keys sorted by their UTF-8 bytes, strings and
//!   numbers as `serde_json` writes them.
//!
//! A checkpoint signs `nox-audit-checkpoint-v1`, the chain name
//! (length-prefixed), `seq`, `row_hash` and the checkpoint's time (µs, as
//! above) with Ed25519.

use std::net::IpAddr;

use serde_json::Value;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::AdminAction;

/// The previous hash of a chain's first row.
pub const GENESIS: [u8; 32] = [0; 32];

/// The chain over `audit_actions`.
pub const ACTIONS_CHAIN: &str = "audit_actions";
/// The chain over `audit_admin_actions`.
pub const ADMIN_CHAIN: &str = "audit_admin_actions";

const ROW_TAG: &[u8] = b"nox-audit-v1";
const CHECKPOINT_TAG: &[u8] = b"nox-audit-checkpoint-v1";

/// A timestamp as the chain (and PostgreSQL) keeps it: whole microseconds.
pub fn micros(at: OffsetDateTime) -> i64 {
    (at.unix_timestamp_nanos() / 1000) as i64
}

/// `at` cut to whole microseconds, as PostgreSQL will store it: records are
/// cut before they are hashed, so the stored row hashes the same.
pub fn to_micros(at: OffsetDateTime) -> OffsetDateTime {
    let nanos = at.nanosecond();
    at.replace_nanosecond(nanos - nanos % 1000).unwrap_or(at)
}

/// Builds a canonical encoding field by field.
#[derive(Debug, Default)]
pub struct Canonical(Vec<u8>);

impl Canonical {
    /// The start of a row's encoding: tag, chain and sequence number.
    pub fn row(chain: &str, seq: i64) -> Canonical {
        let mut encoding = Canonical(Vec::with_capacity(512));
        encoding.0.extend_from_slice(ROW_TAG);
        encoding.text(Some(chain));
        encoding.0.extend_from_slice(&seq.to_be_bytes());
        encoding
    }

    /// Marks a column added after encoding v1 (present only when not NULL):
    /// `2`, then its name as text without a presence byte.
    pub(crate) fn added_column(&mut self, name: &str) -> &mut Self {
        self.0.push(2);
        self.0.extend_from_slice(&(name.len() as u32).to_be_bytes());
        self.0.extend_from_slice(name.as_bytes());
        self
    }

    pub(crate) fn null(&mut self) -> &mut Self {
        self.0.push(0);
        self
    }

    /// A present value: the presence byte, then the value's bytes.
    fn value(&mut self, parts: &[&[u8]]) -> &mut Self {
        self.0.push(1);
        for part in parts {
            self.0.extend_from_slice(part);
        }
        self
    }

    pub fn uuid(&mut self, value: Option<Uuid>) -> &mut Self {
        match value {
            None => self.null(),
            Some(v) => self.value(&[v.as_bytes()]),
        }
    }

    pub fn timestamp(&mut self, value: Option<OffsetDateTime>) -> &mut Self {
        self.int(value.map(micros))
    }

    pub fn int(&mut self, value: Option<i64>) -> &mut Self {
        match value {
            None => self.null(),
            Some(v) => self.value(&[&v.to_be_bytes()]),
        }
    }

    pub fn float(&mut self, value: Option<f64>) -> &mut Self {
        match value {
            None => self.null(),
            Some(v) => self.value(&[&v.to_bits().to_be_bytes()]),
        }
    }

    pub fn bool(&mut self, value: Option<bool>) -> &mut Self {
        match value {
            None => self.null(),
            Some(v) => self.value(&[&[u8::from(v)]]),
        }
    }

    pub fn text(&mut self, value: Option<&str>) -> &mut Self {
        match value {
            None => self.null(),
            Some(v) => self.value(&[&(v.len() as u32).to_be_bytes(), v.as_bytes()]),
        }
    }

    pub fn ip(&mut self, value: Option<IpAddr>) -> &mut Self {
        match value {
            None => self.null(),
            Some(IpAddr::V4(v4)) => self.value(&[&[4], &v4.octets()]),
            Some(IpAddr::V6(v6)) => self.value(&[&[16], &v6.octets()]),
        }
    }

    pub fn json(&mut self, value: Option<&Value>) -> &mut Self {
        let text = value.map(canonical_json);
        self.text(text.as_deref())
    }

    /// `SHA-256(prev ‖ encoding)`.
    pub fn link(&self, prev: &[u8; 32]) -> [u8; 32] {
        let mut hasher = Sha256::new();
        hasher.update(prev);
        hasher.update(&self.0);
        hasher.finalize().into()
    }

    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

/// JSON without whitespace, object keys sorted by their UTF-8 bytes.
pub fn canonical_json(value: &Value) -> String {
    fn write(value: &Value, out: &mut String) {
        match value {
            Value::Object(map) => {
                let mut entries: Vec<_> = map.iter().collect();
                entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
                out.push('{');
                for (index, (key, value)) in entries.into_iter().enumerate() {
                    if index > 0 {
                        out.push(',');
                    }
                    out.push_str(&Value::String(key.clone()).to_string());
                    out.push(':');
                    write(value, out);
                }
                out.push('}');
            }
            Value::Array(items) => {
                out.push('[');
                for (index, item) in items.iter().enumerate() {
                    if index > 0 {
                        out.push(',');
                    }
                    write(item, out);
                }
                out.push(']');
            }
            scalar => out.push_str(&scalar.to_string()),
        }
    }
    let mut out = String::new();
    write(value, &mut out);
    out
}

impl AdminAction {
    /// The canonical encoding of this row at `seq` in the admin chain.
    pub fn canonical(&self, seq: i64) -> Canonical {
        AdminRow {
            id: self.id,
            timestamp: self.timestamp,
            admin_user_id: self.admin_user_id,
            target_user_id: self.target_user_id,
            action_type: self.action_type.as_str(),
            old_values: self.old_values.as_ref(),
            new_values: self.new_values.as_ref(),
            justification: self.justification.as_deref(),
        }
        .canonical(seq)
    }
}

/// An `audit_admin_actions` row as read back (its type may be one a host
/// service defined), for verification.
#[derive(Debug)]
pub struct AdminRow<'a> {
    pub id: Uuid,
    pub timestamp: OffsetDateTime,
    pub admin_user_id: Option<Uuid>,
    pub target_user_id: Option<Uuid>,
    pub action_type: &'a str,
    pub old_values: Option<&'a Value>,
    pub new_values: Option<&'a Value>,
    pub justification: Option<&'a str>,
}

impl AdminRow<'_> {
    pub fn canonical(&self, seq: i64) -> Canonical {
        let mut c = Canonical::row(ADMIN_CHAIN, seq);
        c.uuid(Some(self.id))
            .timestamp(Some(self.timestamp))
            .uuid(self.admin_user_id)
            .uuid(self.target_user_id)
            .text(Some(self.action_type))
            .json(self.old_values)
            .json(self.new_values)
            .text(self.justification);
        c
    }
}

/// A signed statement that a chain's row `seq` had hash `row_hash` at `at`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointClaim {
    pub chain: String,
    pub seq: i64,
    pub row_hash: [u8; 32],
    pub at: OffsetDateTime,
}

impl CheckpointClaim {
    /// The bytes the Ed25519 signature covers.
    pub fn message(&self) -> Vec<u8> {
        let mut message = Vec::with_capacity(96);
        message.extend_from_slice(CHECKPOINT_TAG);
        message.extend_from_slice(&(self.chain.len() as u32).to_be_bytes());
        message.extend_from_slice(self.chain.as_bytes());
        message.extend_from_slice(&self.seq.to_be_bytes());
        message.extend_from_slice(&self.row_hash);
        message.extend_from_slice(&micros(self.at).to_be_bytes());
        message
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ActionRecord;
    use serde_json::json;

    fn record() -> ActionRecord {
        let mut record = ActionRecord::arrived(
            Uuid::nil(),
            time::macros::datetime!(2026-11-27 01:02:03.456789 UTC),
            "GET",
            "/ls",
        );
        record.id = Uuid::from_u128(7);
        record.metadata = Some(json!({"b": 1, "a": [true, null, "x"]}));
        record
    }

    #[test]
    fn json_is_compact_with_sorted_keys() {
        let value = json!({"b": {"z": 1, "y": 2.5}, "a": "é\"", "c": [3, {"k": null}]});
        assert_eq!(
            canonical_json(&value),
            r#"{"a":"é\"","b":{"y":2.5,"z":1},"c":[3,{"k":null}]}"#
        );
    }

    #[test]
    fn the_encoding_is_the_documented_bytes() {
        let mut c = Canonical::row("t", 1);
        c.uuid(None)
            .int(Some(-2))
            .text(Some("ab"))
            .ip(Some("10.0.0.1".parse().unwrap()));
        let mut expected = b"nox-audit-v1".to_vec();
        expected.extend_from_slice(&[1, 0, 0, 0, 1, b't']);
        expected.extend_from_slice(&1i64.to_be_bytes());
        expected.push(0);
        expected.push(1);
        expected.extend_from_slice(&(-2i64).to_be_bytes());
        expected.extend_from_slice(&[1, 0, 0, 0, 2, b'a', b'b']);
        expected.extend_from_slice(&[1, 4, 10, 0, 0, 1]);
        assert_eq!(c.bytes(), &expected[..]);
    }

    #[test]
    fn every_field_and_the_position_change_the_hash() {
        let base = record();
        let hash = base.canonical(5).link(&GENESIS);
        assert_eq!(hash, base.canonical(5).link(&GENESIS), "deterministic");
        assert_ne!(hash, base.canonical(6).link(&GENESIS), "seq is hashed");
        assert_ne!(hash, base.canonical(5).link(&[1; 32]), "the link is hashed");
        let mut edited = base.clone();
        edited.response_size += 1;
        assert_ne!(hash, edited.canonical(5).link(&GENESIS));
        let mut edited = base.clone();
        edited.metadata = Some(json!({"a": [true, null, "x"], "b": 1}));
        assert_eq!(
            hash,
            edited.canonical(5).link(&GENESIS),
            "key order is not significant"
        );
        // NULL and empty text differ.
        let mut empty = base.clone();
        empty.user_agent = Some(String::new());
        assert_ne!(hash, empty.canonical(5).link(&GENESIS));
    }

    /// Every v1 column set, with values whose encodings differ by type
    /// (columns added later stay empty, so they need no edit here).
    #[allow(clippy::needless_update)]
    fn full_record() -> ActionRecord {
        ActionRecord {
            id: Uuid::from_u128(0x0193_0000_0000_7000_8000_0000_0000_0001),
            timestamp: time::macros::datetime!(2026-11-27 01:02:03.456789 UTC),
            request_id: Uuid::from_u128(2),
            session_id: Some(Uuid::from_u128(3)),
            user_id: Some(Uuid::from_u128(4)),
            endpoint: "/run".into(),
            route: "/run".into(),
            http_method: "POST".into(),
            action_type: "code_exec".into(),
            action_category: "execution".into(),
            client_ip: Some("2001:db8::7".parse().unwrap()),
            user_agent: Some("curl/8.5 é".into()),
            request_size: 1234,
            response_size: -5,
            status_code: 429,
            success: false,
            response_time_ms: 12.345,
            cpu_time_ms: Some(0.5),
            memory_peak_mb: Some(-1.25),
            file_path: Some("a/b.txt".into()),
            file_size_bytes: Some(1 << 40),
            files_affected: Some(-3),
            command_type: Some("bash".into()),
            command_text: Some("echo hi".into()),
            exit_code: Some(i32::MIN),
            stdout_size: Some(i64::MAX),
            stderr_size: Some(0),
            quota_violation: true,
            quota_consumed: Some(json!({"requests_hour": 1, "quota_type": "hour"})),
            quota_remaining: Some(json!({"requests_hour": 0})),
            metadata: Some(json!({"z": [1.5, null], "a": {"y": "\u{0}", "b": false}})),
            error_details: Some("quota exceeded".into()),
            session_token_hash: Some("0123456789abcdef".into()),
            ..ActionRecord::arrived(Uuid::nil(), OffsetDateTime::UNIX_EPOCH, "", "")
        }
    }

    /// Golden vectors: the row hashes the canonical encoding v1 gave when
    /// this test was written. Rows already in production were hashed so;
    /// if this fails, stored trails no longer verify.
    #[test]
    fn golden_vectors_of_the_actions_encoding() {
        let full = full_record();
        let mut sparse = ActionRecord::arrived(
            Uuid::from_u128(9),
            time::macros::datetime!(2026-01-01 00:00:00 UTC),
            "GET",
            "/ls",
        );
        sparse.id = Uuid::from_u128(8);
        sparse.client_ip = Some("10.1.2.3".parse().unwrap());
        let hex = |hash: [u8; 32]| -> String { hash.iter().map(|b| format!("{b:02x}")).collect() };
        let first = full.canonical(1).link(&GENESIS);
        assert_eq!(
            hex(first),
            "9918de0fc33e4f95be70973123a3b0fa4f274ecdae59ed012dbd1cc5d98f1c5b"
        );
        assert_eq!(
            hex(sparse.canonical(2).link(&first)),
            "f14a8dd5b78c075e706b152b3fcb52c9d4027bbed884042eba961fefa83894c1"
        );
        assert_eq!(full.canonical(1).bytes().len(), 477);
    }

    /// Spool files hold records in this JSON (written by the code of the
    /// golden vectors above): files spooled before an upgrade must still
    /// read back the same.
    #[test]
    fn the_spool_form_of_a_record_is_unchanged() {
        let json = r#"{"id":"01930000-0000-7000-8000-000000000001","timestamp":"2026-11-27T01:02:03.456789Z","request_id":"00000000-0000-0000-0000-000000000002","session_id":"00000000-0000-0000-0000-000000000003","user_id":"00000000-0000-0000-0000-000000000004","endpoint":"/run","route":"/run","http_method":"POST","action_type":"code_exec","action_category":"execution","client_ip":"2001:db8::7","user_agent":"curl/8.5 é","request_size":1234,"response_size":-5,"status_code":429,"success":false,"response_time_ms":12.345,"cpu_time_ms":0.5,"memory_peak_mb":-1.25,"file_path":"a/b.txt","file_size_bytes":1099511627776,"files_affected":-3,"command_type":"bash","command_text":"echo hi","exit_code":-2147483648,"stdout_size":9223372036854775807,"stderr_size":0,"quota_violation":true,"quota_consumed":{"quota_type":"hour","requests_hour":1},"quota_remaining":{"requests_hour":0},"metadata":{"a":{"b":false,"y":"\u0000"},"z":[1.5,null]},"error_details":"quota exceeded","session_token_hash":"0123456789abcdef"}"#;
        let read: ActionRecord = serde_json::from_str(json).unwrap();
        assert_eq!(read, full_record());
        let written = serde_json::to_string(&full_record()).unwrap();
        assert_eq!(
            serde_json::from_str::<ActionRecord>(&written).unwrap(),
            read
        );
    }

    #[test]
    fn timestamps_are_cut_to_microseconds() {
        let at = time::macros::datetime!(2026-11-27 01:02:03.456789123 UTC);
        assert_eq!(micros(to_micros(at)), micros(at));
        assert_eq!(to_micros(at).nanosecond(), 456_789_000);
    }
}
