//! Recomputing the hash chains and checking the signed checkpoints against
//! them. One walk serves both ways of verifying: [`verify`] (`nox-migrate
//! verify`: both chains, whole, in one snapshot) and [`verify_chain`] (one
//! chain from a given [`Start`], in a snapshot of its own), which the
//! continuous verification ([`Verifier`]) runs from the last checkpoint an
//! earlier pass verified.
//!
//! A walk reads in a repeatable-read snapshot, so a server writing meanwhile
//! cannot make a sound chain look broken, and it reads the rows and the
//! checkpoints through two cursors in `seq` order, a batch at a time, so its
//! memory does not grow with the chain.

mod continuous;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::fmt;

pub use continuous::{
    ChainVerification, ContinuousVerifier, KEEP_DAYS, KEEP_ROWS, Outcome, Pass, PassError,
    VERIFY_LOCK_KEY, VerificationStatus, Verifier, last_success_at,
};
use ed25519_dalek::VerifyingKey;
use nox_audit_model::chain::{ACTIONS_CHAIN, ADMIN_CHAIN, AdminRow, Canonical, GENESIS};
use serde_json::Value;
use tokio_postgres::{Client, IsolationLevel, Portal, Row, Transaction};

use crate::checkpoints::{CHAINS, Checkpoint, hash32};
pub use crate::row::action_from_row;
use crate::row::record_columns;

/// Rows (or checkpoints) fetched per round trip.
const BATCH: i32 = 1000;

/// What to check besides the database's own content.
#[derive(Debug, Default)]
pub struct VerifyOptions {
    /// Start the actions chain at this seq, trusting the stored hash of the
    /// row before it (the admin chain, small, is always checked whole).
    pub from_seq: Option<i64>,
    /// Checkpoints kept outside the database (`checkpoints.log`).
    pub external_checkpoints: Vec<Checkpoint>,
    /// The key every checkpoint must be signed with. Without it, the key of
    /// the database's own checkpoints is used, which someone who can edit
    /// the database could have replaced.
    pub public_key: Option<VerifyingKey>,
}

/// One chain that verified, or how far a walk got: the rows from
/// `first_seq` to `last_seq` recomputed and found sound (`first > last`:
/// none, as in an empty chain).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainSummary {
    pub chain: &'static str,
    pub first_seq: i64,
    pub last_seq: i64,
    /// Checkpoints checked (a copy in the log file counted once).
    pub checkpoints: usize,
}

impl ChainSummary {
    fn new(chain: &'static str) -> ChainSummary {
        ChainSummary {
            chain,
            first_seq: 1,
            last_seq: 0,
            checkpoints: 0,
        }
    }
}

/// Where a walk starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// The chain's first row: seq 1 from the zero hash or, when retention
    /// dropped the oldest rows, the oldest kept row from the signed
    /// checkpoint retention left at the boundary (without one: `no_start`).
    Beginning,
    /// This seq, trusting the stored `row_hash` of the row before it (or a
    /// checkpoint there); the head is not compared (`--from-seq`).
    TrustStored(i64),
    /// After this checkpoint, which an earlier pass verified: its row is
    /// read again (gone: `missing`; another stored hash:
    /// `checkpoint_mismatch`), the walk goes on from its hash to the head,
    /// and only the checkpoints from its seq on are checked.
    After { seq: i64, row_hash: [u8; 32] },
}

/// What is wrong, at a given spot of a chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// A row has no seq: it was inserted outside the writer.
    Unchained { id: String },
    /// No row has this seq: a row was deleted.
    Missing,
    /// Two rows have this seq.
    Duplicate,
    /// The row does not hash to its stored hash: it was edited, or rows were
    /// inserted or reordered here.
    HashMismatch,
    /// The chain's hash here differs from a signed checkpoint's: the chain
    /// was recomputed after the checkpoint.
    CheckpointMismatch,
    /// A checkpoint names a seq past the chain's end: the newest rows were
    /// deleted.
    Truncated { chain_end: i64 },
    /// The chain ends elsewhere than its head row says.
    HeadMismatch { head_seq: i64 },
    /// A checkpoint's signature does not verify with the expected key.
    BadSignature,
    /// The rows before this seq are gone and no checkpoint covers them.
    NoStart,
}

impl Problem {
    /// A stable snake_case name of the kind of problem, for machines.
    pub fn kind(&self) -> &'static str {
        match self {
            Problem::Unchained { .. } => "unchained",
            Problem::Missing => "missing",
            Problem::Duplicate => "duplicate",
            Problem::HashMismatch => "hash_mismatch",
            Problem::CheckpointMismatch => "checkpoint_mismatch",
            Problem::Truncated { .. } => "truncated",
            Problem::HeadMismatch { .. } => "head_mismatch",
            Problem::BadSignature => "bad_signature",
            Problem::NoStart => "no_start",
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Unchained { id } => {
                write!(f, "row {id} has no seq: inserted outside the writer")
            }
            Problem::Missing => write!(f, "missing: a row was deleted"),
            Problem::Duplicate => write!(f, "two rows have this seq"),
            Problem::HashMismatch => write!(
                f,
                "the row does not match its hash: edited, or rows inserted or reordered here"
            ),
            Problem::CheckpointMismatch => write!(
                f,
                "the chain differs from a signed checkpoint: recomputed after it"
            ),
            Problem::Truncated { chain_end } => write!(
                f,
                "a signed checkpoint names this seq but the chain ends at {chain_end}: the newest rows were deleted"
            ),
            Problem::HeadMismatch { head_seq } => write!(
                f,
                "the chain ends here but its head says seq {head_seq}: rows were deleted from the end"
            ),
            Problem::BadSignature => write!(
                f,
                "a checkpoint's signature does not verify with the expected key"
            ),
            Problem::NoStart => write!(
                f,
                "the rows before this seq are gone and no checkpoint covers the boundary"
            ),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("database: {0}")]
    Database(#[from] tokio_postgres::Error),
    #[error("{chain}: seq {seq}: {problem}")]
    Broken {
        chain: &'static str,
        seq: i64,
        problem: Problem,
    },
    #[error("no public key: pass one, or checkpoint first")]
    NoKey,
}

fn broken(chain: &'static str, seq: i64, problem: Problem) -> VerifyError {
    VerifyError::Broken {
        chain,
        seq,
        problem,
    }
}

async fn snapshot(client: &mut Client) -> Result<Transaction<'_>, tokio_postgres::Error> {
    client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
}

/// Verifies both chains, whole, in one snapshot; the first problem found is
/// the error.
pub async fn verify(
    client: &mut Client,
    options: &VerifyOptions,
) -> Result<Vec<ChainSummary>, VerifyError> {
    let tx = snapshot(client).await?;
    // Without a key from outside, trust the one the database's oldest
    // checkpoint was signed with (the CLI says so), else the log file's.
    let key = match options.public_key {
        Some(key) => Some(key),
        None => tx
            .query_opt(
                "SELECT public_key FROM audit_checkpoints ORDER BY id LIMIT 1",
                &[],
            )
            .await?
            .map(|row| row.get::<_, &[u8]>(0).try_into().unwrap_or([0; 32]))
            .or(options.external_checkpoints.first().map(|c| c.public_key))
            .and_then(|bytes| VerifyingKey::from_bytes(&bytes).ok()),
    };
    let mut summaries = Vec::new();
    for chain in CHAINS {
        let external: Vec<Checkpoint> = options
            .external_checkpoints
            .iter()
            .filter(|c| c.chain == chain)
            .cloned()
            .collect();
        let start = match options.from_seq {
            Some(seq) if chain == ACTIONS_CHAIN => Start::TrustStored(seq),
            _ => Start::Beginning,
        };
        let mut summary = ChainSummary::new(chain);
        walk(&tx, start, key.as_ref(), &external, &mut summary).await?;
        summaries.push(summary);
    }
    tx.commit().await?;
    Ok(summaries)
}

/// Verifies one chain (one of [`CHAINS`], else this panics) from `start` to
/// its head, in a snapshot of its own, with the checkpoints' signatures
/// checked against `key`. Returns how far the walk got, and the first
/// problem.
pub async fn verify_chain(
    client: &mut Client,
    chain: &'static str,
    start: Start,
    key: &VerifyingKey,
) -> (ChainSummary, Result<(), VerifyError>) {
    assert!(CHAINS.contains(&chain), "{chain} is not an audit chain");
    let mut summary = ChainSummary::new(chain);
    let result = async {
        let tx = snapshot(client).await?;
        walk(&tx, start, Some(key), &[], &mut summary).await?;
        tx.commit().await?;
        Ok(())
    }
    .await;
    (summary, result)
}

/// The table, the columns the canonical encoding reads, and how it reads
/// them.
fn table_of(chain: &'static str) -> (&'static str, String, fn(&Row, i64) -> Canonical) {
    if chain == ACTIONS_CHAIN {
        ("audit_actions", record_columns(), action_canonical)
    } else {
        debug_assert_eq!(chain, ADMIN_CHAIN);
        (
            "audit_admin_actions",
            "id, \"timestamp\", admin_user_id, target_user_id, admin_action_type, \
             old_values, new_values, justification"
                .to_owned(),
            admin_canonical,
        )
    }
}

/// The stored hash of the row at `seq` (none: no such row).
async fn stored_hash(
    tx: &Transaction<'_>,
    chain: &'static str,
    table: &str,
    seq: i64,
) -> Result<Option<[u8; 32]>, VerifyError> {
    let rows = tx
        .query(
            &format!("SELECT row_hash FROM {table} WHERE seq = $1 LIMIT 2"),
            &[&seq],
        )
        .await?;
    match rows.as_slice() {
        [] => Ok(None),
        [row] => Ok(Some(hash32(row.get(0)))),
        _ => Err(broken(chain, seq, Problem::Duplicate)),
    }
}

/// Walks `summary.chain` from `start`: every row recomputed and linked to
/// the one before, every checkpoint from the start on signed by `key` and
/// agreeing with the chain, none past its end, and (unless starting from a
/// stored hash) the head where the chain ends. `summary` follows the walk.
async fn walk(
    tx: &Transaction<'_>,
    start: Start,
    key: Option<&VerifyingKey>,
    external: &[Checkpoint],
    summary: &mut ChainSummary,
) -> Result<(), VerifyError> {
    let chain = summary.chain;
    let (table, columns, canonical) = table_of(chain);
    let oldest: Option<i64> = tx
        .query_one(&format!("SELECT min(seq) FROM {table}"), &[])
        .await?
        .get(0);
    // Where the walk means to start, until it is sure.
    summary.first_seq = match start {
        Start::Beginning => oldest.unwrap_or(1).max(1),
        Start::TrustStored(seq) => seq.max(1),
        Start::After { seq, .. } => seq + 1,
    };
    summary.last_seq = summary.first_seq - 1;
    if let Some(row) = tx
        .query_opt(
            &format!("SELECT id::text FROM {table} WHERE seq IS NULL LIMIT 1"),
            &[],
        )
        .await?
    {
        return Err(broken(chain, 0, Problem::Unchained { id: row.get(0) }));
    }
    let checkpoints_from = match start {
        Start::After { seq, .. } => seq,
        Start::Beginning | Start::TrustStored(_) => i64::MIN,
    };
    let mut checkpoints = Checkpoints::open(tx, chain, checkpoints_from, key, external).await?;
    let (first, mut prev) = match start {
        Start::Beginning | Start::TrustStored(_) => {
            let first = match start {
                Start::TrustStored(seq) => seq,
                _ => oldest.unwrap_or(1),
            }
            .max(1);
            // The checkpoints before the walk are checked too; one just
            // before it may prove where it starts.
            let boundary = checkpoints.up_to(first - 1).await?;
            let prev = if first == 1 {
                GENESIS
            } else {
                let stored = match start {
                    Start::TrustStored(_) => stored_hash(tx, chain, table, first - 1).await?,
                    _ => None,
                };
                // Rows before the oldest one were dropped by retention, which
                // leaves a signed checkpoint at the boundary.
                stored
                    .or(boundary)
                    .ok_or_else(|| broken(chain, first, Problem::NoStart))?
            };
            (first, prev)
        }
        Start::After { seq, row_hash } => {
            if checkpoints
                .up_to(seq)
                .await?
                .is_some_and(|signed| signed != row_hash)
            {
                return Err(broken(chain, seq, Problem::CheckpointMismatch));
            }
            match oldest {
                None => {
                    return Err(broken(chain, seq, Problem::Truncated { chain_end: 0 }));
                }
                // Retention dropped rows after the checkpoint: the one it
                // signed at its boundary must prove the start.
                Some(oldest) if oldest > seq + 1 => {
                    let boundary = checkpoints.up_to(oldest - 1).await?;
                    (
                        oldest,
                        boundary.ok_or_else(|| broken(chain, oldest, Problem::NoStart))?,
                    )
                }
                // Retention dropped up to the checkpoint's own row.
                Some(oldest) if oldest == seq + 1 => (oldest, row_hash),
                Some(_) => match stored_hash(tx, chain, table, seq).await? {
                    None => return Err(broken(chain, seq, Problem::Missing)),
                    Some(stored) if stored != row_hash => {
                        return Err(broken(chain, seq, Problem::CheckpointMismatch));
                    }
                    Some(_) => (seq + 1, row_hash),
                },
            }
        }
    };
    summary.first_seq = first;
    summary.last_seq = first - 1;

    let rows = tx
        .bind(
            &format!("SELECT seq, row_hash, {columns} FROM {table} WHERE seq >= $1 ORDER BY seq"),
            &[&first],
        )
        .await?;
    let mut expected = first;
    loop {
        let batch = tx.query_portal(&rows, BATCH).await?;
        for row in &batch {
            let seq: i64 = row.get(0);
            if seq < expected {
                return Err(broken(chain, seq, Problem::Duplicate));
            }
            if seq > expected {
                return Err(broken(chain, expected, Problem::Missing));
            }
            let hash = canonical(row, seq).link(&prev);
            if hash != hash32(row.get(1)) {
                return Err(broken(chain, seq, Problem::HashMismatch));
            }
            if checkpoints
                .up_to(seq)
                .await?
                .is_some_and(|signed| signed != hash)
            {
                return Err(broken(chain, seq, Problem::CheckpointMismatch));
            }
            prev = hash;
            summary.last_seq = seq;
            expected += 1;
        }
        if batch.len() < BATCH as usize {
            break;
        }
    }
    let last = expected - 1;
    // A checkpoint left names a seq past the chain's end.
    let beyond = checkpoints.take().await?;
    summary.checkpoints = checkpoints.counted;
    if let Some((seq, _)) = beyond {
        return Err(broken(chain, seq, Problem::Truncated { chain_end: last }));
    }
    let (head_seq, head_hash) = crate::checkpoints::head(tx, chain).await?;
    let head_checked = !matches!(start, Start::TrustStored(_));
    if head_checked && (head_seq != last || (last > 0 && head_hash != prev)) {
        return Err(broken(chain, last, Problem::HeadMismatch { head_seq }));
    }
    Ok(())
}

/// A chain's checkpoints in seq order, the database's (a cursor, a batch
/// at a time) and those given from outside it, handed out a seq at a time
/// with their signatures checked.
struct Checkpoints<'t, 'c> {
    tx: &'t Transaction<'c>,
    chain: &'static str,
    key: Option<&'t VerifyingKey>,
    portal: Portal,
    stored: VecDeque<Checkpoint>,
    exhausted: bool,
    /// From outside the database, in seq order.
    external: VecDeque<Checkpoint>,
    /// Handed out so far, each copy counted once.
    counted: usize,
}

impl<'t, 'c> Checkpoints<'t, 'c> {
    /// The chain's checkpoints from `from_seq` on.
    async fn open(
        tx: &'t Transaction<'c>,
        chain: &'static str,
        from_seq: i64,
        key: Option<&'t VerifyingKey>,
        external: &[Checkpoint],
    ) -> Result<Checkpoints<'t, 'c>, tokio_postgres::Error> {
        let portal = tx
            .bind(
                &format!(
                    "SELECT {} FROM audit_checkpoints WHERE chain = $1 AND seq >= $2 ORDER BY seq, id",
                    Checkpoint::COLUMNS
                ),
                &[&chain, &from_seq],
            )
            .await?;
        let mut external: Vec<Checkpoint> = external
            .iter()
            .filter(|c| c.seq >= from_seq)
            .cloned()
            .collect();
        external.sort_by_key(|c| c.seq);
        Ok(Checkpoints {
            tx,
            chain,
            key,
            portal,
            stored: VecDeque::new(),
            exhausted: false,
            external: external.into(),
            counted: 0,
        })
    }

    /// Reads the next batch from the database if none is waiting.
    async fn fill(&mut self) -> Result<(), tokio_postgres::Error> {
        if self.stored.is_empty() && !self.exhausted {
            let rows = self.tx.query_portal(&self.portal, BATCH).await?;
            self.exhausted = rows.len() < BATCH as usize;
            self.stored.extend(rows.iter().map(Checkpoint::from_row));
        }
        Ok(())
    }

    /// The lowest seq not handed out yet.
    async fn next_seq(&mut self) -> Result<Option<i64>, tokio_postgres::Error> {
        self.fill().await?;
        let seqs = [self.stored.front(), self.external.front()];
        Ok(seqs.into_iter().flatten().map(|c| c.seq).min())
    }

    /// Hands out every checkpoint of the lowest seq left: each must be
    /// signed by the key, and all must name the same hash, returned with
    /// the seq.
    async fn take(&mut self) -> Result<Option<(i64, [u8; 32])>, VerifyError> {
        let Some(seq) = self.next_seq().await? else {
            return Ok(None);
        };
        let mut group: Vec<Checkpoint> = Vec::new();
        loop {
            while self.stored.front().is_some_and(|c| c.seq == seq) {
                group.extend(self.stored.pop_front());
            }
            if !self.stored.is_empty() || self.exhausted {
                break;
            }
            // This seq's checkpoints may go on in the next batch.
            self.fill().await?;
        }
        while self.external.front().is_some_and(|c| c.seq == seq) {
            // The log file usually repeats the database's checkpoints.
            if let Some(checkpoint) = self.external.pop_front()
                && !group.contains(&checkpoint)
            {
                group.push(checkpoint);
            }
        }
        self.counted += group.len();
        let key = self.key.ok_or(VerifyError::NoKey)?;
        if group.iter().any(|c| !c.signed_by(key)) {
            return Err(broken(self.chain, seq, Problem::BadSignature));
        }
        let row_hash = group[0].row_hash;
        if group.iter().any(|c| c.row_hash != row_hash) {
            return Err(broken(self.chain, seq, Problem::CheckpointMismatch));
        }
        Ok(Some((seq, row_hash)))
    }

    /// Hands out every checkpoint up to `seq`; returns the hash signed at
    /// `seq`, if any.
    async fn up_to(&mut self, seq: i64) -> Result<Option<[u8; 32]>, VerifyError> {
        let mut at_seq = None;
        while self.next_seq().await?.is_some_and(|next| next <= seq) {
            if let Some((taken, row_hash)) = self.take().await?
                && taken == seq
            {
                at_seq = Some(row_hash);
            }
        }
        Ok(at_seq)
    }
}

/// Columns after `seq, row_hash`.
const FIRST: usize = 2;

fn action_canonical(row: &Row, seq: i64) -> Canonical {
    action_from_row(row, FIRST).canonical(seq)
}

fn admin_canonical(row: &Row, seq: i64) -> Canonical {
    let old_values: Option<Value> = row.get(FIRST + 5);
    let new_values: Option<Value> = row.get(FIRST + 6);
    AdminRow {
        id: row.get(FIRST),
        timestamp: row.get(FIRST + 1),
        admin_user_id: row.get(FIRST + 2),
        target_user_id: row.get(FIRST + 3),
        action_type: row.get(FIRST + 4),
        old_values: old_values.as_ref(),
        new_values: new_values.as_ref(),
        justification: row.get(FIRST + 7),
    }
    .canonical(seq)
}
