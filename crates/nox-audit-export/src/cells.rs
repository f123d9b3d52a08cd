//! Cells: how each column type is decoded from a row and written (CSV text,
//! JSON value), shared by every format and by [`RowJson`].

use super::*;

/// How a column's values are decoded and written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
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
    pub(crate) fn of(ty: &Type) -> Result<Kind, String> {
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
    pub(crate) names: Vec<String>,
    pub(crate) kinds: Vec<Kind>,
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
pub(crate) enum Cell<'a> {
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

pub(crate) fn cell<'a>(
    row: &'a Row,
    index: usize,
    kind: Kind,
) -> Result<Cell<'a>, tokio_postgres::Error> {
    pub(crate) fn get<'a, T: tokio_postgres::types::FromSql<'a>>(
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
    pub(crate) fn write_csv(&self, out: &mut Vec<u8>) -> io::Result<()> {
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
