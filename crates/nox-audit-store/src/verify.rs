//! Recomputing the hash chains and checking the signed checkpoints against
//! them (`nox-migrate verify`).
//!
//! Everything is read in one repeatable-read snapshot, so a server writing
//! meanwhile cannot make a sound chain look broken.

use std::collections::HashMap;
use std::fmt;

use ed25519_dalek::VerifyingKey;
use futures_util::TryStreamExt;
use nox_audit_model::chain::{ACTIONS_CHAIN, ADMIN_CHAIN, AdminRow, Canonical, GENESIS};
use serde_json::Value;
use tokio_postgres::{Client, IsolationLevel, Row, Transaction};

use crate::checkpoints::{CHAINS, Checkpoint, hash32};
pub use crate::row::action_from_row;
use crate::row::record_columns;

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

/// One chain that verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainSummary {
    pub chain: &'static str,
    /// The seq range checked (`first > last` for an empty chain).
    pub first_seq: i64,
    pub last_seq: i64,
    pub checkpoints: usize,
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

/// Verifies both chains; the first problem found is the error.
pub async fn verify(
    client: &mut Client,
    options: &VerifyOptions,
) -> Result<Vec<ChainSummary>, VerifyError> {
    let tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let mut checkpoints = Checkpoint::all(&tx).await?;
    // Without a key from outside, trust the one the database's oldest
    // checkpoint was signed with (the CLI says so), else the log file's.
    let key = match options.public_key {
        Some(key) => Some(key),
        None => checkpoints
            .first()
            .or(options.external_checkpoints.first())
            .and_then(|c| VerifyingKey::from_bytes(&c.public_key).ok()),
    };
    // The log file usually repeats the database's checkpoints: count each once.
    checkpoints.extend(options.external_checkpoints.iter().cloned());
    checkpoints.sort_by_key(|c| (c.chain.clone(), c.seq, c.signature));
    checkpoints.dedup();
    let mut summaries = Vec::new();
    for chain in CHAINS {
        let mine: Vec<&Checkpoint> = checkpoints.iter().filter(|c| c.chain == chain).collect();
        if !mine.is_empty() {
            let key = key.ok_or(VerifyError::NoKey)?;
            if let Some(bad) = mine.iter().find(|c| !c.signed_by(&key)) {
                return Err(broken(chain, bad.seq, Problem::BadSignature));
            }
        }
        let from_seq = options.from_seq.filter(|_| chain == ACTIONS_CHAIN);
        summaries.push(verify_chain(&tx, chain, &mine, from_seq).await?);
    }
    tx.commit().await?;
    Ok(summaries)
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

async fn verify_chain(
    tx: &Transaction<'_>,
    chain: &'static str,
    checkpoints: &[&Checkpoint],
    from_seq: Option<i64>,
) -> Result<ChainSummary, VerifyError> {
    let (table, columns, canonical) = table_of(chain);
    if let Some(row) = tx
        .query_opt(
            &format!("SELECT id::text FROM {table} WHERE seq IS NULL LIMIT 1"),
            &[],
        )
        .await?
    {
        return Err(broken(chain, 0, Problem::Unchained { id: row.get(0) }));
    }
    let oldest: Option<i64> = tx
        .query_one(&format!("SELECT min(seq) FROM {table}"), &[])
        .await?
        .get(0);
    let start = from_seq.unwrap_or(oldest.unwrap_or(1)).max(1);
    let mut at_seq: HashMap<i64, [u8; 32]> = HashMap::new();
    for checkpoint in checkpoints {
        if let Some(other) = at_seq.insert(checkpoint.seq, checkpoint.row_hash)
            && other != checkpoint.row_hash
        {
            return Err(broken(chain, checkpoint.seq, Problem::CheckpointMismatch));
        }
    }
    let mut prev = if start == 1 {
        GENESIS
    } else {
        let stored = match from_seq {
            Some(_) => tx
                .query_opt(
                    &format!("SELECT row_hash FROM {table} WHERE seq = $1"),
                    &[&(start - 1)],
                )
                .await?
                .map(|row| hash32(row.get(0))),
            None => None,
        };
        // Rows before the oldest one were dropped by retention, which leaves
        // a signed checkpoint at the boundary.
        stored
            .or_else(|| at_seq.get(&(start - 1)).copied())
            .ok_or_else(|| broken(chain, start, Problem::NoStart))?
    };

    let sql = format!("SELECT seq, row_hash, {columns} FROM {table} WHERE seq >= $1 ORDER BY seq");
    let rows = tx.query_raw(&sql, [&start]).await?;
    let mut rows = std::pin::pin!(rows);
    let mut expected = start;
    while let Some(row) = rows.try_next().await? {
        let seq: i64 = row.get(0);
        if seq < expected {
            return Err(broken(chain, seq, Problem::Duplicate));
        }
        if seq > expected {
            return Err(broken(chain, expected, Problem::Missing));
        }
        let hash = canonical(&row, seq).link(&prev);
        if hash != hash32(row.get(1)) {
            return Err(broken(chain, seq, Problem::HashMismatch));
        }
        if at_seq.get(&seq).is_some_and(|signed| *signed != hash) {
            return Err(broken(chain, seq, Problem::CheckpointMismatch));
        }
        prev = hash;
        expected += 1;
    }
    let last = expected - 1;
    if let Some(beyond) = checkpoints
        .iter()
        .filter(|c| c.seq > last)
        .map(|c| c.seq)
        .min()
    {
        return Err(broken(
            chain,
            beyond,
            Problem::Truncated { chain_end: last },
        ));
    }
    let (head_seq, head_hash) = crate::checkpoints::head(tx, chain).await?;
    if from_seq.is_none() && (head_seq != last || (last > 0 && head_hash != prev)) {
        return Err(broken(chain, last, Problem::HeadMismatch { head_seq }));
    }
    Ok(ChainSummary {
        chain,
        first_seq: start,
        last_seq: last,
        checkpoints: checkpoints.len(),
    })
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
