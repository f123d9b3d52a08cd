//! Streaming export of audit rows as CSV, JSON or NDJSON, optionally gzipped.
//!
//! Rows come from a `tokio_postgres` row stream and leave as a stream of
//! chunks, so memory stays constant whatever the number of rows. The same
//! cell encoding serves the JSON of `GET /admin/audit/logs` ([`RowJson`]),
//! so an export and a page of logs always agree.
//!
//! Encoding and compression are CPU work: run the stream on a runtime that
//! does not serve HTTP requests (Nox runs it on the server's main runtime,
//! not on actix's workers).
//!
//! Rows need a database (a `tokio_postgres::Row` comes only from one):
//!
//! ```no_run
//! use futures_util::TryStreamExt;
//! use nox_audit_export::{Columns, Format, Progress, encode, file_name, gzip};
//! use time::OffsetDateTime;
//!
//! # async fn example(client: tokio_postgres::Client, since: OffsetDateTime) -> Result<(), Box<dyn std::error::Error>> {
//! let statement = client
//!     .prepare("SELECT id, timestamp, endpoint, user_agent, status_code FROM audit_actions WHERE timestamp >= $1 ORDER BY id")
//!     .await?;
//! // Read once from the statement, so an empty result still has its header.
//! let columns = Columns::new(statement.columns())?;
//! let rows = client.query_raw(&statement, [&since]).await?;
//! let progress = Progress::default();
//! let chunks = gzip(encode(Format::Csv, columns, rows, progress.clone())?);
//! let file: Vec<bytes::Bytes> = chunks.try_collect().await?;
//! let name = file_name(OffsetDateTime::now_utc(), Format::Csv, true);
//! std::fs::write(&name, file.concat())?;
//! println!("{name}: {} rows", progress.rows());
//! # Ok(())
//! # }
//! ```
//!
//! # CSV injection
//!
//! A CSV file is opened in spreadsheets, which run a cell that begins with
//! `=`, `+`, `-` or `@` (or a tab or carriage return before one) as a
//! formula; audit rows hold text chosen by whoever sent the request (a
//! `User-Agent`, a file path, a command). Following OWASP's advice on CSV
//! injection, the CSV encoder puts a `'` before every cell of a text column
//! (`text`, `varchar`, `char`, `name`) whose value begins with one of those
//! six characters, so the spreadsheet shows it as text. Only text columns
//! are touched:
//!
//! - numbers (integer and floating point) are written as they are: a `-`
//!   there is a sign, a spreadsheet reads `-1` as the number −1, and a
//!   prefix would turn a number column into text;
//! - JSON columns are written as compact JSON, which begins with `{`, `[`,
//!   `"`, a digit, `-` (a number again) or `true`/`false`/`null`, never
//!   with a formula (a JSON string such as `"=1+1"` keeps its quotes);
//! - UUIDs, timestamps, addresses, booleans and hex never begin with one of
//!   the six characters.
//!
//! So a CSV export is meant for people and spreadsheets: a text value that
//! begins with one of the six characters (or with `'` itself) cannot be
//! told apart from one that was prefixed. JSON and NDJSON exports, and the
//! JSON of the log pages, are exact: they are never prefixed.
//!
//! The test the CSV encoder applies to a text cell, and the names a
//! download gets, need no database:
//!
//! ```
//! use nox_audit_export::{Format, file_name, starts_like_a_formula};
//!
//! // Written as `'=HYPERLINK(…)` in a CSV text column, as-is elsewhere.
//! assert!(starts_like_a_formula("=HYPERLINK(\"http://evil.example\")"));
//! assert!(starts_like_a_formula("\t=1+1"));
//! assert!(!starts_like_a_formula("curl/8.0 =1"));
//!
//! let format = Format::parse("csv").unwrap();
//! assert_eq!(format.content_type(), "text/csv; charset=utf-8");
//! assert_eq!(Format::parse("xml"), None);
//! let at = time::macros::datetime!(2026-03-04 05:06:07 +02:00);
//! assert_eq!(file_name(at, format, true), "audit_logs_20260304_030607.csv.gz");
//! ```

use std::fmt::Write as _;
use std::io::{self, Write as _};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_compression::Level;
use async_compression::tokio::bufread::GzipEncoder;
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use serde::ser::{Error as _, SerializeMap};
use serde::{Serialize, Serializer};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio_postgres::types::Type;
use tokio_postgres::{Column, Row};
use tokio_util::io::{ReaderStream, StreamReader};
use uuid::Uuid;

mod cells;
#[cfg(test)]
mod tests;

use cells::cell;
pub use cells::{Columns, RowJson, starts_like_a_formula};

/// Chunks handed downstream are about this big: large enough that the
/// per-chunk overhead vanishes, small enough to keep memory flat.
pub const CHUNK_BYTES: usize = 64 * 1024;

/// The formats an export can take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Csv,
    /// One JSON array of objects.
    Json,
    /// One JSON object per line.
    Ndjson,
}

impl Format {
    pub fn parse(text: &str) -> Option<Format> {
        match text {
            "csv" => Some(Format::Csv),
            "json" => Some(Format::Json),
            "ndjson" => Some(Format::Ndjson),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Format::Csv => "csv",
            Format::Json => "json",
            Format::Ndjson => "ndjson",
        }
    }

    /// The media type of the uncompressed file.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Csv => "text/csv; charset=utf-8",
            Format::Json => "application/json",
            Format::Ndjson => "application/x-ndjson",
        }
    }

    /// The file name extension of the uncompressed file.
    pub fn extension(self) -> &'static str {
        self.as_str()
    }
}

/// A timestamp as every Nox output writes it: RFC 3339 in UTC.
pub fn rfc3339(at: OffsetDateTime) -> String {
    at.to_offset(time::UtcOffset::UTC)
        .format(&Rfc3339)
        .unwrap_or_else(|_| at.to_string())
}

/// A timestamp as a JSON value: [`rfc3339`] text, or null when absent.
pub fn rfc3339_json(at: impl Into<Option<OffsetDateTime>>) -> serde_json::Value {
    at.into().map_or(serde_json::Value::Null, |t| {
        serde_json::Value::String(rfc3339(t))
    })
}

/// RFC 4180 CSV (CRLF line ends, quotes only where needed).
fn csv_writer() -> csv::Writer<Vec<u8>> {
    csv::WriterBuilder::new()
        .terminator(csv::Terminator::CRLF)
        .from_writer(Vec::with_capacity(CHUNK_BYTES + 4096))
}

/// Turns rows into the bytes of one format, a row at a time.
#[derive(Debug)]
pub struct Encoder {
    format: Format,
    columns: Columns,
    rows: u64,
    out: Vec<u8>,
    csv: Option<csv::Writer<Vec<u8>>>,
    field: Vec<u8>,
}

impl Encoder {
    /// A new encoder; the header (CSV) or opening bracket (JSON) is already
    /// in its buffer.
    pub fn new(format: Format, columns: Columns) -> io::Result<Encoder> {
        let mut encoder = Encoder {
            format,
            columns,
            rows: 0,
            out: Vec::with_capacity(CHUNK_BYTES + 4096),
            csv: None,
            field: Vec::new(),
        };
        match format {
            Format::Csv => {
                let mut writer = csv_writer();
                writer.write_record(&encoder.columns.names)?;
                encoder.csv = Some(writer);
            }
            Format::Json => encoder.out.push(b'['),
            Format::Ndjson => {}
        }
        Ok(encoder)
    }

    /// Rows encoded so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    pub fn push(&mut self, row: &Row) -> io::Result<()> {
        match &mut self.csv {
            Some(writer) => {
                for (index, kind) in self.columns.kinds.iter().enumerate() {
                    cell(row, index, *kind)
                        .map_err(io::Error::other)?
                        .write_csv(&mut self.field)?;
                    writer.write_field(&self.field)?;
                }
                writer.write_record(None::<&[u8]>)?;
            }
            None => {
                if self.format == Format::Json {
                    self.out
                        .extend_from_slice(if self.rows == 0 { b"\n" } else { b",\n" });
                }
                let object = RowJson {
                    columns: &self.columns,
                    row,
                };
                serde_json::to_writer(&mut self.out, &object)?;
                if self.format == Format::Ndjson {
                    self.out.push(b'\n');
                }
            }
        }
        self.rows += 1;
        Ok(())
    }

    /// Bytes waiting to be sent.
    fn buffered(&mut self) -> io::Result<usize> {
        if let Some(writer) = &mut self.csv {
            writer.flush()?;
            return Ok(writer.get_ref().len());
        }
        Ok(self.out.len())
    }

    /// Takes the bytes encoded so far.
    fn take(&mut self) -> io::Result<Bytes> {
        let buffer = match &mut self.csv {
            // csv's writer lends no access to its output: swap in a new one.
            Some(writer) => std::mem::replace(writer, csv_writer())
                .into_inner()
                .map_err(|e| e.into_error())?,
            None => std::mem::replace(&mut self.out, Vec::with_capacity(CHUNK_BYTES + 4096)),
        };
        Ok(Bytes::from(buffer))
    }

    /// Ends the file (the closing bracket of a JSON array) and takes what
    /// is left.
    pub fn finish(mut self) -> io::Result<Bytes> {
        if self.format == Format::Json {
            self.out.extend_from_slice(b"\n]\n");
        }
        self.take()
    }
}

/// How many rows an export has encoded; readable while it runs and after.
#[derive(Debug, Clone, Default)]
pub struct Progress(Arc<AtomicU64>);

impl Progress {
    pub fn rows(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Encodes `rows` as `format`, in chunks of about [`CHUNK_BYTES`]. A
/// database error ends the stream with that error (the file is then
/// visibly incomplete, never silently short).
pub fn encode<S>(
    format: Format,
    columns: Columns,
    rows: S,
    progress: Progress,
) -> io::Result<impl Stream<Item = io::Result<Bytes>> + Send>
where
    S: Stream<Item = Result<Row, tokio_postgres::Error>> + Send + 'static,
{
    struct State<S> {
        rows: std::pin::Pin<Box<S>>,
        encoder: Option<Encoder>,
        progress: Progress,
    }
    let state = State {
        rows: Box::pin(rows),
        encoder: Some(Encoder::new(format, columns)?),
        progress,
    };
    Ok(futures_util::stream::try_unfold(
        state,
        |mut state| async move {
            let Some(encoder) = state.encoder.as_mut() else {
                return Ok(None);
            };
            while let Some(row) = state.rows.next().await {
                encoder.push(&row.map_err(io::Error::other)?)?;
                state.progress.0.store(encoder.rows(), Ordering::Relaxed);
                if encoder.buffered()? >= CHUNK_BYTES {
                    let chunk = encoder.take()?;
                    return Ok(Some((chunk, state)));
                }
            }
            let last = state.encoder.take().map(Encoder::finish).transpose()?;
            Ok(last.map(|chunk| (chunk, state)))
        },
    ))
}

/// Gzips a byte stream at the fastest level (the default level made
/// exports about three times slower here, for files a third smaller).
pub fn gzip<S>(bytes: S) -> impl Stream<Item = io::Result<Bytes>> + Send
where
    S: Stream<Item = io::Result<Bytes>> + Send,
{
    let encoder = GzipEncoder::with_quality(StreamReader::new(bytes), Level::Fastest);
    ReaderStream::with_capacity(encoder, CHUNK_BYTES)
}

/// The download's file name: `audit_logs_YYYYMMDD_HHMMSS.<ext>[.gz]`, UTC.
pub fn file_name(now: OffsetDateTime, format: Format, gzipped: bool) -> String {
    let now = now.to_offset(time::UtcOffset::UTC);
    let mut name = String::new();
    let _ = write!(
        name,
        "audit_logs_{:04}{:02}{:02}_{:02}{:02}{:02}.{}",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        format.extension()
    );
    if gzipped {
        name.push_str(".gz");
    }
    name
}
