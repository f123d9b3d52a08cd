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
    use nox_audit_model::ACTION_COLUMN_DEFS;

    use super::*;
    use crate::{Migrator, schema};

    /// The declaration is the table the audit migrations make: the same
    /// columns in the same order, with the types the writer sends and the
    /// same nullability.
    #[tokio::test]
    async fn the_declaration_matches_the_migrated_table() {
        let db = nox_testkit::TestDb::empty().await;
        let mut client = db.client().await;
        Migrator::new(schema::MIGRATIONS)
            .up(&mut client)
            .await
            .expect("the audit migrations");
        let table: Vec<(String, String, bool)> = client
            .query(
                "SELECT column_name::text, udt_name::text, is_nullable = 'YES'
                   FROM information_schema.columns
                  WHERE table_schema = current_schema() AND table_name = 'audit_actions'
                  ORDER BY ordinal_position",
                &[],
            )
            .await
            .expect("information_schema")
            .iter()
            .map(|row| (row.get(0), row.get(1), row.get(2)))
            .collect();
        // Names and nullability as declared, types as the writer sends them;
        // the chain's columns are NULL in rows written before the chain.
        let nullable = ACTION_COLUMN_DEFS
            .iter()
            .map(|c| c.nullable)
            .chain(CHAIN_COLUMNS.map(|_| true));
        let declared: Vec<(String, String, bool)> = ACTION_COLUMNS
            .iter()
            .chain(&CHAIN_COLUMNS)
            .zip(COLUMN_TYPES)
            .zip(nullable)
            .map(|((name, sent), nullable)| (name.to_string(), sent.name().to_owned(), nullable))
            .collect();
        assert_eq!(declared.len(), WRITTEN);
        for (at, (declared, table)) in declared.iter().zip(&table).enumerate() {
            assert_eq!(declared, table, "column {} of audit_actions", at + 1);
        }
        assert_eq!(declared, table, "the number of columns");
    }
}
