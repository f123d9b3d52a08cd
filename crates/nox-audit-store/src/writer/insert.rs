//! How a batch goes in: one transaction, either reading and locking the
//! chain head and sending the rows by binary `COPY` (two round trips), or,
//! for a small batch after a known head, `BEGIN` to `COMMIT` in one round
//! trip with the rows as `unnest` arrays and the head's move guarded (one
//! self-committing statement when the batch changes no session).
//! Locks are taken in one order by every writer, so none can deadlock
//! another: `audit_actions`' table lock (`ROW EXCLUSIVE`: a statement
//! inserting rows takes it when it starts), then the chain head's row, then
//! session rows in one order. Retention takes its stronger table lock
//! before the head too.

use std::collections::HashSet;
use std::pin::pin;
use std::sync::LazyLock;
use std::time::{Duration as StdDuration, Instant};

use deadpool_postgres::Pool;
use tokio::{join, try_join};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::ToSql;

use nox_audit_model::ActionRecord;
use nox_audit_model::chain::ACTIONS_CHAIN;
use uuid::Uuid;

use crate::checkpoints;
use crate::row::{ActionColumns, COLUMN_TYPES, ChainHead, row_values, written_columns};
use crate::sessions::SessionRow;

use super::sessions::{WRITE_SESSIONS, write_sessions};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsertTarget {
    /// Every record is new.
    Direct,
    /// A replay, which may repeat rows already written: those are skipped,
    /// and only the new ones join the chain.
    Idempotent,
    /// Every record is new and none joins the chain (no `seq`; `verify`
    /// reports such rows). Only for measuring what the chain costs.
    Unchained,
}

/// The `COPY` statement for the rows (batches that read the head first).
static COPY_ACTIONS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "COPY audit_actions ({}) FROM STDIN BINARY",
        written_columns()
    )
});

/// The `INSERT` of a batch's rows as one array per column (the one-round-trip
/// path: unlike `COPY`, it needs no answer before its rows are sent).
static INSERT_ACTIONS: LazyLock<String> = LazyLock::new(|| {
    let arrays = COLUMN_TYPES
        .iter()
        .enumerate()
        .map(|(i, column_type)| format!("${}::{}[]", i + 1, column_type.name()))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "INSERT INTO audit_actions ({}) SELECT * FROM unnest({arrays})",
        written_columns()
    )
});

/// A small batch without session changes as one statement, committed on
/// its own (no `BEGIN`/`COMMIT` messages, one reply): the rows are
/// inserted first, then the head is moved (its lock held only from there to
/// the commit), after the aggregate has consumed every inserted row.
static APPEND_ACTIONS: LazyLock<String> = LazyLock::new(|| {
    let head = COLUMN_TYPES.len();
    format!(
        "WITH inserted AS ({} RETURNING 1) \
         SELECT audit_chain_advance(${}, ${}, ${}, ${}, ${}) FROM (SELECT count(*) FROM inserted) AS rows",
        *INSERT_ACTIONS,
        head + 1,
        head + 2,
        head + 3,
        head + 4,
        head + 5
    )
});

/// Moves the actions chain's head from where this writer left it, or fails
/// with [`HEAD_MOVED`] (migration 0007). Parameters: chain, expected seq and
/// hash, new seq and hash.
const ADVANCE_HEAD: &str = "SELECT audit_chain_advance($1, $2, $3, $4, $5)";

/// The SQLSTATE `audit_chain_advance` raises when another writer moved the
/// head first.
const HEAD_MOVED: &str = "NX001";

/// Opens a batch that reads the head: the table's lock first, as the
/// one-statement batch takes it (see the module's doc).
const BEGIN_LOCKING_TABLE: &str = "BEGIN; LOCK TABLE audit_actions IN ROW EXCLUSIVE MODE";

/// The largest batch written in one round trip; larger ones use `COPY`,
/// whose per-row cost is lower.
const ONE_ROUND_TRIP_MAX_ROWS: usize = 64;

/// Writes sessions and records in one transaction, appending the records to
/// the actions chain in the order given.
///
/// A durable request waits for this transaction, so it is built for few
/// round trips: statements are prepared once per connection (deadpool's
/// cache); `BEGIN`, the head lock, the session changes and the start of the
/// `COPY` travel together, and so do the end of the `COPY`, the head update
/// and `COMMIT`. Two round trips per batch (a replay adds one, to read which
/// rows exist).
pub async fn insert(
    pool: &Pool,
    sessions: &[SessionRow],
    records: &[ActionRecord],
    target: InsertTarget,
) -> Result<(), InsertError> {
    insert_reading_head(pool, sessions, records, target)
        .await
        .map(drop)
}

/// [`insert`], returning the chain head the batch left (`None` when it
/// appended no row).
async fn insert_reading_head(
    pool: &Pool,
    sessions: &[SessionRow],
    records: &[ActionRecord],
    target: InsertTarget,
) -> Result<Option<ChainHead>, InsertError> {
    let mut connection = CloseUnlessCommitted(Some(pool.get().await?));
    let head = insert_in_transaction(connection.client(), sessions, records, target).await?;
    connection.transaction_ended();
    Ok(head)
}

/// What the writer knows of the actions chain's head.
#[derive(Debug, Default)]
pub(super) struct HeadCache {
    /// The head as this writer's last batch left it, if that batch surely
    /// committed.
    known: Option<ChainHead>,
    /// Until then another server is taken to be appending too, and batches
    /// read the head (each one-round-trip attempt would mostly fail).
    contended_until: Option<Instant>,
}

/// How long a head moved by another server keeps batches on the reading path.
const HEAD_CONTENDED_FOR: StdDuration = StdDuration::from_secs(10);

impl HeadCache {
    /// The head to link a small batch after, unless unknown or another
    /// server has been moving it.
    fn usable(&self) -> Option<ChainHead> {
        self.known.filter(|_| {
            self.contended_until
                .is_none_or(|until| Instant::now() >= until)
        })
    }

    /// Another server moved the head: batches read it for a while.
    fn contended(&mut self) {
        self.contended_until = Some(Instant::now() + HEAD_CONTENDED_FOR);
    }
}

/// Whether a batch of `records` can be linked after a known head and sent
/// as one statement ([`append`]).
fn appendable(records: &[ActionRecord], target: InsertTarget) -> bool {
    target == InsertTarget::Direct && (1..=ONE_ROUND_TRIP_MAX_ROWS).contains(&records.len())
}

/// A batch's rows linked after a head (which its statement checks).
#[derive(Debug)]
struct LinkedBatch {
    head: ChainHead,
    links: Vec<ChainHead>,
}

impl LinkedBatch {
    fn new(records: &[ActionRecord], head: ChainHead) -> LinkedBatch {
        let records: Vec<&ActionRecord> = records.iter().collect();
        LinkedBatch {
            head,
            links: chain_links(&records, head),
        }
    }

    /// The head the batch leaves once committed.
    fn new_head(&self) -> ChainHead {
        *self.links.last().expect("a batch of at least one row")
    }
}

/// Appends `records`, linked by `batch`, in one self-committing statement
/// ([`APPEND_ACTIONS`]); the head guard fails it (`NX001`) if the head is
/// no longer where the batch was linked.
async fn append(
    client: &deadpool_postgres::Object,
    records: &[ActionRecord],
    batch: &LinkedBatch,
) -> Result<(), InsertError> {
    let append = client.prepare_cached(&APPEND_ACTIONS).await?;
    let rows: Vec<&ActionRecord> = records.iter().collect();
    let columns = ActionColumns::new(&rows, &batch.links);
    let new_head = batch.new_head();
    let (expected_hash, new_hash) = (batch.head.1.as_slice(), new_head.1.as_slice());
    let advance_params: [&(dyn ToSql + Sync); 5] = [
        &ACTIONS_CHAIN,
        &batch.head.0,
        &expected_hash,
        &new_head.0,
        &new_hash,
    ];
    let params: Vec<&(dyn ToSql + Sync)> =
        columns.params().into_iter().chain(advance_params).collect();
    client.execute(&append, &params).await?;
    Ok(())
}

/// The writer's [`insert`]: given the head its previous batch left, a small
/// batch of new rows goes in one round trip, its links computed from that
/// head and the head's move guarded in the transaction; if another server
/// moved the head meanwhile, the batch is rolled back and written again the
/// reading way, which every batch then takes for [`HEAD_CONTENDED_FOR`].
/// Any failure forgets the head.
pub(super) async fn insert_batch(
    pool: &Pool,
    sessions: &[SessionRow],
    records: &[ActionRecord],
    target: InsertTarget,
    cache: &mut HeadCache,
) -> Result<(), InsertError> {
    let usable = cache.usable();
    let mut known = cache.known.take();
    let mut written = None;
    if let Some(head) = usable.filter(|_| appendable(records, target)) {
        match insert_after_known_head(pool, sessions, records, head).await {
            Err(error) if error.is_head_moved() => {
                tracing::debug!("another server moved the audit chain's head; reading it");
                known = None;
                cache.contended();
            }
            result => written = Some(result.map(Some)),
        }
    }
    let head = match written {
        Some(result) => result?,
        None => insert_reading_head(pool, sessions, records, target).await?,
    };
    // A batch without rows leaves the head where it was.
    cache.known = head.or(known);
    Ok(())
}

/// One round trip: `BEGIN`, the rows as arrays, the guarded head move, the
/// session changes and `COMMIT` travel together; without session changes,
/// one statement ([`APPEND_ACTIONS`]).
async fn insert_after_known_head(
    pool: &Pool,
    sessions: &[SessionRow],
    records: &[ActionRecord],
    head: ChainHead,
) -> Result<ChainHead, InsertError> {
    if sessions.is_empty() {
        let batch = LinkedBatch::new(records, head);
        let mut connection = CloseUnlessCommitted(Some(pool.get().await?));
        let appended = append(connection.client(), records, &batch).await;
        // The statement's own transaction ended with its reply, whatever
        // that said.
        connection.transaction_ended();
        appended?;
        return Ok(batch.new_head());
    }
    let mut connection = CloseUnlessCommitted(Some(pool.get().await?));
    let client = connection.client();
    let records: Vec<&ActionRecord> = records.iter().collect();
    let links = chain_links(&records, head);
    let new_head = *links.last().expect("a batch of at least one row");
    let columns = ActionColumns::new(&records, &links);
    let (expected_hash, new_hash) = (head.1.as_slice(), new_head.1.as_slice());
    let column_params = columns.params();
    let advance_params: [&(dyn ToSql + Sync); 5] = [
        &ACTIONS_CHAIN,
        &head.0,
        &expected_hash,
        &new_head.0,
        &new_hash,
    ];
    let (write, advance, insert) = try_join!(
        client.prepare_cached(WRITE_SESSIONS),
        client.prepare_cached(ADVANCE_HEAD),
        client.prepare_cached(&INSERT_ACTIONS),
    )?;
    // `biased`: polled in order, so the statements go out in this order.
    // Every reply is awaited: a failed statement makes PostgreSQL answer the
    // COMMIT with a rollback, after which the connection is idle and can go
    // back to the pool (a moved head is routine with several servers).
    // The rows (and the table's lock) before the head: the order every
    // writer takes them in (see the module's doc).
    let (begin, insert, advance, write, commit) = join!(
        biased;
        client.batch_execute("BEGIN"),
        client.execute(&insert, &column_params),
        client.execute(&advance, &advance_params),
        write_sessions(client, &write, sessions),
        client.batch_execute("COMMIT"),
    );
    if commit.is_ok() {
        connection.transaction_ended();
    }
    // The first failure in statement order is the cause; the later ones
    // only say the transaction was aborted.
    begin?;
    insert?;
    advance?;
    write?;
    commit?;
    Ok(new_head)
}

/// Each record's `(seq, row_hash)` on the chain after `head`, in order.
fn chain_links(records: &[&ActionRecord], head: ChainHead) -> Vec<ChainHead> {
    let (mut seq, mut prev) = head;
    records
        .iter()
        .map(|record| {
            seq += 1;
            prev = record.canonical(seq).link(&prev);
            (seq, prev)
        })
        .collect()
}

/// A pooled connection on which [`insert`] began a transaction with a plain
/// `BEGIN` (so it can share a round trip). Dropped before its transaction
/// ended, after an error or with a cancelled future, the connection is
/// closed instead of going back to the pool mid-transaction, and PostgreSQL
/// rolls the transaction back.
struct CloseUnlessCommitted(Option<deadpool_postgres::Object>);

impl CloseUnlessCommitted {
    fn client(&self) -> &deadpool_postgres::Object {
        self.0.as_ref().expect("present until dropped")
    }

    /// The transaction ended (committed, or rolled back in answer to its
    /// `COMMIT`): the connection goes back to the pool.
    fn transaction_ended(&mut self) {
        self.0.take();
    }
}

impl Drop for CloseUnlessCommitted {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            drop(deadpool_postgres::Object::take(client));
        }
    }
}

async fn insert_in_transaction(
    client: &deadpool_postgres::Object,
    sessions: &[SessionRow],
    records: &[ActionRecord],
    target: InsertTarget,
) -> Result<Option<ChainHead>, InsertError> {
    let (write, lock_head, copy, set_head) = try_join!(
        client.prepare_cached(WRITE_SESSIONS),
        client.prepare_cached(checkpoints::LOCK_HEAD),
        client.prepare_cached(&COPY_ACTIONS),
        client.prepare_cached(checkpoints::SET_HEAD),
    )?;
    let chained = target != InsertTarget::Unchained && !records.is_empty();
    // A replay must read which rows exist before it can start its COPY (the
    // connection runs one statement at a time and a COPY holds it).
    let copy_early = !records.is_empty() && target != InsertTarget::Idempotent;
    // `biased`: polled in order, so the requests go out in this order; the
    // COPY must be last, as the connection sends nothing else until its
    // rows, which need the head, have been written.
    let ((), head, (), early_sink) = try_join!(
        biased;
        client.batch_execute(if chained { BEGIN_LOCKING_TABLE } else { "BEGIN" }),
        async {
            if !chained {
                return Ok(None);
            }
            let row = client.query_one(&lock_head, &[&ACTIONS_CHAIN]).await?;
            Ok(Some(checkpoints::head_of(&row)))
        },
        write_sessions(client, &write, sessions),
        async {
            if !copy_early {
                return Ok(None);
            }
            client.copy_in(&copy).await.map(Some)
        },
    )?;
    let mut records: Vec<&ActionRecord> = records.iter().collect();
    if target == InsertTarget::Idempotent && !records.is_empty() {
        let ids: Vec<Uuid> = records.iter().map(|r| r.id).collect();
        let written: HashSet<Uuid> = client
            .query("SELECT id FROM audit_actions WHERE id = ANY($1)", &[&ids])
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect();
        records.retain(|r| !written.contains(&r.id));
    }
    let links = head.map(|head| chain_links(&records, head));
    let sink = match early_sink {
        Some(sink) => Some(sink),
        None if !records.is_empty() => Some(client.copy_in(&copy).await?),
        None => None,
    };
    let mut writer = pin!(sink.map(|sink| BinaryCopyInWriter::new(sink, COLUMN_TYPES)));
    if let Some(mut writer) = writer.as_mut().as_pin_mut() {
        for (i, record) in records.iter().enumerate() {
            let link = links.as_ref().map(|links| &links[i]);
            let seq = link.map(|(seq, _)| *seq);
            let hash = link.map(|(_, hash)| hash.as_slice());
            writer
                .as_mut()
                .write(&row_values(record, &seq, &hash))
                .await?;
        }
    }
    let new_head = links.as_ref().and_then(|links| links.last());
    // A failed statement makes PostgreSQL answer this COMMIT with a
    // rollback, and that statement's own future reports the error.
    try_join!(
        biased;
        async {
            match writer.as_mut().as_pin_mut() {
                Some(writer) => writer.finish().await.map(drop),
                None => Ok(()),
            }
        },
        async {
            match new_head {
                Some((seq, hash)) => client
                    .execute(&set_head, &[&ACTIONS_CHAIN, seq, &hash.as_slice()])
                    .await
                    .map(drop),
                None => Ok(()),
            }
        },
        client.batch_execute("COMMIT"),
    )?;
    Ok(new_head.copied())
}

#[derive(Debug, thiserror::Error)]
pub enum InsertError {
    #[error("no database connection: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("{0}")]
    Database(#[from] tokio_postgres::Error),
}

impl InsertError {
    /// PostgreSQL refused the values themselves (SQLSTATE classes 22 data
    /// exception, 23 integrity constraint, 54 program limit): writing the
    /// same rows again cannot succeed, unlike a lost connection.
    pub fn is_content_refused(&self) -> bool {
        match self {
            InsertError::Database(error) => error
                .code()
                .is_some_and(|code| matches!(&code.code()[..2], "22" | "23" | "54")),
            InsertError::Pool(_) => false,
        }
    }

    /// The SQLSTATE and message, for a minimal row's `write_error` (never
    /// PostgreSQL's DETAIL, which may quote the refused row).
    pub(super) fn describe(&self) -> serde_json::Value {
        match self {
            InsertError::Database(error) => match error.as_db_error() {
                Some(db) => serde_json::json!({
                    "sqlstate": db.code().code(),
                    "message": db.message().chars().take(200).collect::<String>(),
                }),
                None => serde_json::json!({ "message": "database error" }),
            },
            InsertError::Pool(_) => serde_json::json!({ "message": "no connection" }),
        }
    }

    /// Another writer moved the chain head this batch was linked to.
    fn is_head_moved(&self) -> bool {
        matches!(self, InsertError::Database(error)
            if error.code().map(|code| code.code()) == Some(HEAD_MOVED))
    }
}
