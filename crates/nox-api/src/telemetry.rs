//! Log output for the binaries. Library code only emits `tracing` events;
//! a binary calls [`init_tracing`] once to decide where they go.
//!
//! The few lines printed on purpose rather than logged (the first admin's
//! token and the checkpoint public key on stdout, a binary's fatal error on
//! stderr) go through [`Console`], so that with `NOX_LOG_FORMAT=json` every
//! line the server prints is one JSON object; in text mode they are plain
//! text, as ever.

use std::io::IsTerminal;

use serde_json::{Map, Value};
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber: `RUST_LOG` filters (default `info`),
/// output goes to stderr so stdout stays for what a binary prints on purpose.
pub fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    if let Err(error) = result {
        Console(format).error(&format!("logging was already initialised: {error}"));
    }
}

/// Prints what is shown on purpose, outside the log: plain text, or with
/// [`LogFormat::Json`] one JSON object per line (`timestamp`, `level`,
/// `message` and the line's own fields, like the log's lines).
#[derive(Debug, Clone, Copy)]
pub struct Console(pub LogFormat);

impl Console {
    /// On stdout: `<label>: <value>` in text; in JSON, `message` is `label`
    /// and the value is the field `key`.
    pub fn show(self, label: &str, key: &str, value: &str) {
        match self.0 {
            LogFormat::Text => println!("{label}: {value}"),
            LogFormat::Json => println!("{}", json_line("INFO", label, &[(key, value)])),
        }
    }

    /// On stderr: `text` as it is, or as the `message` of a JSON `ERROR`
    /// line.
    pub fn error(self, text: &str) {
        match self.0 {
            LogFormat::Text => eprintln!("{text}"),
            LogFormat::Json => eprintln!("{}", json_line("ERROR", text, &[])),
        }
    }
}

/// One JSON object, on one line (JSON escapes any newline in the text).
fn json_line(level: &str, message: &str, fields: &[(&str, &str)]) -> String {
    let mut line = Map::new();
    let now = time::OffsetDateTime::now_utc();
    let timestamp = now
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    line.insert("timestamp".into(), Value::String(timestamp));
    line.insert("level".into(), Value::String(level.into()));
    line.insert("message".into(), Value::String(message.into()));
    for (key, value) in fields {
        line.insert((*key).into(), Value::String((*value).into()));
    }
    Value::Object(line).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_are_single_line_objects() {
        let line = json_line("ERROR", "first\nsecond", &[("token", "nox_x")]);
        assert!(!line.contains('\n'), "{line}");
        let value: Value = serde_json::from_str(&line).expect("json");
        assert_eq!(value["level"], "ERROR");
        assert_eq!(value["message"], "first\nsecond");
        assert_eq!(value["token"], "nox_x");
        assert!(value["timestamp"].is_string());
    }
}
