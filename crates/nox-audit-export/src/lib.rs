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

/// How a column's values are decoded and written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Uuid,
    Timestamp,
    Inet,
    Int2,
    Int4,
    Int8,
    Float8,
    Bool,
    Json,
    Text,
    /// Written as lowercase hex (the chain's `row_hash`).
    Bytes,
}

impl Kind {
    fn of(ty: &Type) -> Result<Kind, String> {
        Ok(match *ty {
            Type::UUID => Kind::Uuid,
            Type::TIMESTAMPTZ => Kind::Timestamp,
            Type::INET => Kind::Inet,
            Type::INT2 => Kind::Int2,
            Type::INT4 => Kind::Int4,
            Type::INT8 => Kind::Int8,
            Type::FLOAT8 => Kind::Float8,
            Type::BOOL => Kind::Bool,
            Type::JSON | Type::JSONB => Kind::Json,
            Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME => Kind::Text,
            Type::BYTEA => Kind::Bytes,
            _ => return Err(format!("column type {} cannot be exported", ty.name())),
        })
    }
}

/// The names and kinds of a result's columns, read once from the prepared
/// statement (so an empty result still has its CSV header).
#[derive(Debug, Clone)]
pub struct Columns {
    names: Vec<String>,
    kinds: Vec<Kind>,
}

impl Columns {
    pub fn new(columns: &[Column]) -> io::Result<Columns> {
        let kinds = columns
            .iter()
            .map(|c| Kind::of(c.type_()).map_err(io::Error::other))
            .collect::<io::Result<_>>()?;
        Ok(Columns {
            names: columns.iter().map(|c| c.name().to_owned()).collect(),
            kinds,
        })
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }
}

/// One decoded value.
#[derive(Debug)]
enum Cell<'a> {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(&'a str),
    Uuid(Uuid),
    Timestamp(OffsetDateTime),
    Inet(IpAddr),
    Json(serde_json::Value),
    Bytes(&'a [u8]),
}

fn cell<'a>(row: &'a Row, index: usize, kind: Kind) -> Result<Cell<'a>, tokio_postgres::Error> {
    fn get<'a, T: tokio_postgres::types::FromSql<'a>>(
        row: &'a Row,
        index: usize,
    ) -> Result<Option<T>, tokio_postgres::Error> {
        row.try_get::<_, Option<T>>(index)
    }
    Ok(match kind {
        Kind::Uuid => get(row, index)?.map(Cell::Uuid),
        Kind::Timestamp => get(row, index)?.map(Cell::Timestamp),
        Kind::Inet => get(row, index)?.map(Cell::Inet),
        Kind::Int2 => get::<i16>(row, index)?.map(|v| Cell::Int(v.into())),
        Kind::Int4 => get::<i32>(row, index)?.map(|v| Cell::Int(v.into())),
        Kind::Int8 => get(row, index)?.map(Cell::Int),
        Kind::Float8 => get(row, index)?.map(Cell::Float),
        Kind::Bool => get(row, index)?.map(Cell::Bool),
        Kind::Json => get(row, index)?.map(Cell::Json),
        Kind::Text => get(row, index)?.map(Cell::Text),
        Kind::Bytes => get(row, index)?.map(Cell::Bytes),
    }
    .unwrap_or(Cell::Null))
}

impl Serialize for Cell<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Cell::Null => serializer.serialize_none(),
            Cell::Bool(v) => serializer.serialize_bool(*v),
            Cell::Int(v) => serializer.serialize_i64(*v),
            // JSON has no NaN or infinity.
            Cell::Float(v) if v.is_finite() => serializer.serialize_f64(*v),
            Cell::Float(_) => serializer.serialize_none(),
            Cell::Text(v) => serializer.serialize_str(v),
            Cell::Uuid(v) => v.serialize(serializer),
            Cell::Timestamp(v) => serializer.serialize_str(&rfc3339(*v)),
            Cell::Inet(v) => serializer.collect_str(v),
            Cell::Json(v) => v.serialize(serializer),
            Cell::Bytes(v) => serializer.serialize_str(&hex::encode(v)),
        }
    }
}

impl Cell<'_> {
    /// The CSV text of the value: NULL is empty, booleans `true`/`false`,
    /// timestamps RFC 3339 UTC, JSON compact, text that begins like a
    /// formula after a `'` (see the crate's documentation on CSV injection).
    fn write_csv(&self, out: &mut Vec<u8>) -> io::Result<()> {
        out.clear();
        match self {
            Cell::Null => {}
            Cell::Bool(v) => out.extend_from_slice(if *v { b"true" } else { b"false" }),
            Cell::Int(v) => write!(out, "{v}")?,
            Cell::Float(v) => write!(out, "{v}")?,
            Cell::Text(v) => {
                if starts_like_a_formula(v) {
                    out.push(b'\'');
                }
                out.extend_from_slice(v.as_bytes());
            }
            // The three below write straight into `out`: no String per cell
            // (the profile of the export showed allocation as a main cost).
            Cell::Uuid(v) => out.extend_from_slice(
                v.hyphenated()
                    .encode_lower(&mut Uuid::encode_buffer())
                    .as_bytes(),
            ),
            Cell::Timestamp(v) => {
                if v.to_offset(time::UtcOffset::UTC)
                    .format_into(&mut *out, &Rfc3339)
                    .is_err()
                {
                    out.clear();
                    out.extend_from_slice(rfc3339(*v).as_bytes());
                }
            }
            Cell::Bytes(v) => {
                out.resize(v.len() * 2, 0);
                hex::encode_to_slice(v, out).map_err(io::Error::other)?;
            }
            Cell::Inet(v) => write!(out, "{v}")?,
            Cell::Json(v) => serde_json::to_writer(&mut *out, v)?,
        }
        Ok(())
    }
}

/// Whether a spreadsheet could take a text cell for a formula: it begins
/// with `=`, `+`, `-`, `@`, a tab or a carriage return (OWASP's list; see
/// the crate's documentation on CSV injection).
pub fn starts_like_a_formula(text: &str) -> bool {
    matches!(
        text.as_bytes().first(),
        Some(b'=' | b'+' | b'-' | b'@' | b'\t' | b'\r')
    )
}

/// A row as a JSON object, every column under its name.
#[derive(Debug)]
pub struct RowJson<'a> {
    pub columns: &'a Columns,
    pub row: &'a Row,
}

impl Serialize for RowJson<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.columns.names.len()))?;
        for (index, (name, kind)) in self
            .columns
            .names
            .iter()
            .zip(&self.columns.kinds)
            .enumerate()
        {
            let value = cell(self.row, index, *kind).map_err(S::Error::custom)?;
            map.serialize_entry(name, &value)?;
        }
        map.end()
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_round_trip_their_names() {
        for format in [Format::Csv, Format::Json, Format::Ndjson] {
            assert_eq!(Format::parse(format.as_str()), Some(format));
        }
        assert_eq!(Format::parse("xml"), None);
        assert_eq!(Format::Csv.content_type(), "text/csv; charset=utf-8");
    }

    #[test]
    fn file_names_are_utc_and_mark_gzip() {
        let at = time::macros::datetime!(2026-03-04 05:06:07 +02:00);
        assert_eq!(
            file_name(at, Format::Csv, false),
            "audit_logs_20260304_030607.csv"
        );
        assert_eq!(
            file_name(at, Format::Ndjson, true),
            "audit_logs_20260304_030607.ndjson.gz"
        );
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let at = time::macros::datetime!(2026-03-04 05:06:07.123456 +02:00);
        assert_eq!(rfc3339(at), "2026-03-04T03:06:07.123456Z");
    }

    #[test]
    fn csv_cells_follow_the_documented_text() {
        let mut out = Vec::new();
        let cases: Vec<(Cell, &str)> = vec![
            (Cell::Null, ""),
            (Cell::Bool(true), "true"),
            (Cell::Bool(false), "false"),
            (Cell::Int(-42), "-42"),
            (Cell::Float(1.5), "1.5"),
            (
                Cell::Json(serde_json::json!({"a": [1, 2]})),
                r#"{"a":[1,2]}"#,
            ),
            (Cell::Inet("10.0.0.1".parse().unwrap()), "10.0.0.1"),
            (Cell::Bytes(&[0, 171, 255]), "00abff"),
        ];
        for (value, text) in cases {
            value.write_csv(&mut out).unwrap();
            assert_eq!(String::from_utf8_lossy(&out), text, "{value:?}");
        }
    }

    #[test]
    fn csv_text_that_begins_like_a_formula_is_neutralised() {
        let mut out = Vec::new();
        let cases: Vec<(Cell, &str)> = vec![
            (
                Cell::Text("=HYPERLINK(\"http://x\"&A2)"),
                "'=HYPERLINK(\"http://x\"&A2)",
            ),
            (Cell::Text("+1"), "'+1"),
            (Cell::Text("-1"), "'-1"),
            (Cell::Text("@SUM(A1)"), "'@SUM(A1)"),
            (Cell::Text("\t=1+1"), "'\t=1+1"),
            (Cell::Text("\r=1+1"), "'\r=1+1"),
            // Not at the start, or not one of the six: untouched.
            (Cell::Text("curl/8.0 =1"), "curl/8.0 =1"),
            (Cell::Text(" =1"), " =1"),
            (Cell::Text("'=1"), "'=1"),
            (Cell::Text(""), ""),
            (Cell::Text("/files"), "/files"),
            // Numbers keep their sign; JSON stays JSON.
            (Cell::Int(-1), "-1"),
            (Cell::Float(-0.5), "-0.5"),
            (Cell::Json(serde_json::json!(-3)), "-3"),
            (Cell::Json(serde_json::json!("=1+1")), "\"=1+1\""),
            (Cell::Json(serde_json::json!({"a": "=1"})), r#"{"a":"=1"}"#),
        ];
        for (value, text) in cases {
            value.write_csv(&mut out).unwrap();
            assert_eq!(String::from_utf8_lossy(&out), text, "{value:?}");
        }
    }

    #[test]
    fn json_cells_are_never_prefixed() {
        for text in ["=1", "+1", "-1", "@a", "\t1", "\r1"] {
            let json = serde_json::to_string(&Cell::Text(text)).unwrap();
            assert_eq!(serde_json::from_str::<String>(&json).unwrap(), text);
        }
    }

    #[tokio::test]
    async fn gzip_output_decompresses_to_the_input() {
        let chunks: Vec<io::Result<Bytes>> = (0..50)
            .map(|i| Ok(Bytes::from(format!("line {i}\n").repeat(1000))))
            .collect();
        let expected: Vec<u8> = chunks
            .iter()
            .flat_map(|c| c.as_ref().unwrap().to_vec())
            .collect();
        let compressed: Vec<Bytes> =
            futures_util::TryStreamExt::try_collect(gzip(futures_util::stream::iter(chunks)))
                .await
                .unwrap();
        let compressed: Vec<u8> = compressed.concat();
        assert_eq!(&compressed[..2], &[0x1f, 0x8b], "gzip magic");
        let mut decoder = async_compression::tokio::bufread::GzipDecoder::new(&compressed[..]);
        let mut plain = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut decoder, &mut plain)
            .await
            .unwrap();
        assert_eq!(plain, expected);
    }
}
