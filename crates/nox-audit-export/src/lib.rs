//! Streaming export of audit rows as CSV, JSON or NDJSON, optionally gzipped,
//! over a `Stream` so memory stays constant whatever the size.
//!
//! The admin audit API issue fills it; until then it holds nothing.
