//! The `audit_actions` row as PostgreSQL takes and gives it, derived from
//! the model's one declaration ([`nox_audit_model::action_columns!`]): the
//! types of the binary `COPY`, a record's `COPY` values, a batch's `unnest`
//! arrays and the row reader of `verify`. Each list ends with the chain's
//! own columns, `seq` and `row_hash`.

use nox_audit_model::{ACTION_COLUMNS, ActionRecord};
use tokio_postgres::Row;
use tokio_postgres::types::{ToSql, Type};

/// A chain's `(seq, row_hash)`.
pub(crate) type ChainHead = (i64, [u8; 32]);

/// The chain's columns, written after the record's.
const CHAIN_COLUMNS: [&str; 2] = ["seq", "row_hash"];

/// Columns written per row: the record's, then the chain's.
const WRITTEN: usize = ACTION_COLUMNS.len() + CHAIN_COLUMNS.len();

/// A batch's rows as one array per column, for `unnest`.
pub(crate) struct ActionColumns<'a>(Vec<Box<dyn ToSql + Send + Sync + 'a>>);

macro_rules! derive_postgres_row {
    ($( $(#[$attr:meta])* $name:ident: $ty:ty => $sql:ident $([$($sanitize:tt)*])?; )*) => {
        /// The PostgreSQL types of [`written_columns`], for binary `COPY`.
        pub(crate) const COLUMN_TYPES: &[Type] = &[$(Type::$sql,)* Type::INT8, Type::BYTEA];

        /// A record's values for `COPY`, in [`written_columns`] order.
        pub(crate) fn row_values<'a>(
            r: &'a ActionRecord,
            seq: &'a Option<i64>,
            row_hash: &'a Option<&'a [u8]>,
        ) -> [&'a (dyn ToSql + Sync); WRITTEN] {
            [$(&r.$name,)* seq, row_hash]
        }

        impl<'a> ActionColumns<'a> {
            /// `links`: each record's place on the chain.
            pub(crate) fn new(records: &[&'a ActionRecord], links: &[ChainHead]) -> Self {
                fn column<'a, T: ToSql + Send + Sync + 'a>(
                    records: &[&'a ActionRecord],
                    value: impl Fn(&'a ActionRecord) -> T,
                ) -> Box<dyn ToSql + Send + Sync + 'a> {
                    Box::new(records.iter().map(|r| value(r)).collect::<Vec<T>>())
                }
                ActionColumns(vec![
                    $(column(records, |r| &r.$name),)*
                    Box::new(links.iter().map(|(seq, _)| *seq).collect::<Vec<i64>>()),
                    Box::new(
                        links
                            .iter()
                            .map(|(_, hash)| hash.to_vec())
                            .collect::<Vec<Vec<u8>>>(),
                    ),
                ])
            }
        }

        /// An `audit_actions` row read back: the record's columns in
        /// [`ACTION_COLUMNS`] order from index `first`.
        pub fn action_from_row(row: &Row, first: usize) -> ActionRecord {
            let mut at = first;
            let mut next = || {
                at += 1;
                at - 1
            };
            ActionRecord {
                $($name: row.get(next()),)*
                session_token_hash: None,
            }
        }
    };
}

nox_audit_model::action_columns!(derive_postgres_row);

impl ActionColumns<'_> {
    pub(crate) fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.0.iter().map(|column| &**column as _).collect()
    }
}

/// The columns written per row, quoted, comma-separated: the record's,
/// then the chain's.
pub(crate) fn written_columns() -> String {
    ACTION_COLUMNS
        .iter()
        .chain(&CHAIN_COLUMNS)
        .map(|c| format!("\"{c}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The record's columns, quoted, comma-separated (what `verify` reads).
pub(crate) fn record_columns() -> String {
    ACTION_COLUMNS
        .iter()
        .map(|c| format!("\"{c}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use nox_audit_model::ACTION_COLUMN_DEFS;
    use nox_audit_model::row::V1_COLUMNS;

    use super::*;
    use crate::{Migrator, schema};

    /// The declaration is the table the audit migrations make: the same
    /// columns, with the types the writer sends and the same nullability,
    /// and no default on a column added after v1.
    #[tokio::test]
    async fn the_declaration_matches_the_migrated_table() {
        let db = nox_testkit::TestDb::empty().await;
        let mut client = db.client().await;
        Migrator::new(schema::MIGRATIONS)
            .up(&mut client)
            .await
            .expect("the audit migrations");
        // Name → (type, NULL allowed, has a default), for every column.
        type Columns = BTreeMap<String, (String, bool, bool)>;
        let table: Columns = client
            .query(
                "SELECT column_name::text, udt_name::text, is_nullable = 'YES',
                        column_default IS NOT NULL
                   FROM information_schema.columns
                  WHERE table_schema = current_schema() AND table_name = 'audit_actions'",
                &[],
            )
            .await
            .expect("information_schema")
            .iter()
            .map(|row| (row.get(0), (row.get(1), row.get(2), row.get(3))))
            .collect();
        // Names and nullability as declared, types as the writer sends them;
        // the chain's columns are NULL in rows written before the chain.
        // A column added after v1 must have no default: old rows would read
        // back a value and stop verifying. (Columns are matched by name: an
        // added column lands after the chain's in the table.)
        let has_default = |name: &str| table.get(name).is_some_and(|c| c.2);
        let declared: Columns = ACTION_COLUMN_DEFS
            .iter()
            .enumerate()
            .map(|(at, c)| (c.name, c.nullable, at < V1_COLUMNS && has_default(c.name)))
            .chain(CHAIN_COLUMNS.map(|name| (name, true, has_default(name))))
            .zip(COLUMN_TYPES)
            .map(|((name, nullable, default), sent)| {
                (name.to_owned(), (sent.name().to_owned(), nullable, default))
            })
            .collect();
        assert_eq!(declared.len(), WRITTEN);
        for (name, column) in &declared {
            assert_eq!(
                Some(column),
                table.get(name),
                "column {name} of audit_actions"
            );
        }
        assert_eq!(declared, table, "the number of columns");
    }
}
