//! Times as the API writes them: RFC 3339 UTC with microseconds (the
//! export's format), dates as `YYYY-MM-DD`.

use serde::Serializer;
use time::{Date, OffsetDateTime};

pub mod option {
    use super::*;

    pub fn serialize<S: Serializer>(at: &Option<OffsetDateTime>, s: S) -> Result<S::Ok, S::Error> {
        match at {
            Some(at) => s.serialize_str(&nox_audit_export::rfc3339(*at)),
            None => s.serialize_none(),
        }
    }
}

pub mod required {
    use super::*;

    pub fn serialize<S: Serializer>(at: &OffsetDateTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&nox_audit_export::rfc3339(*at))
    }
}

pub mod date {
    use super::*;

    pub fn serialize<S: Serializer>(date: &Date, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(date)
    }
}
