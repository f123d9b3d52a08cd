//! Names, descriptions and record helpers for the audit metrics. It only
//! records through the `metrics` facade and never installs a recorder: the
//! host binary decides where metrics go.
//!
//! The metrics issue fills it; until then it holds nothing.
