//! The hash chains in the database: their heads (appending under the head's
//! lock) and signed checkpoints (the encoding itself lives in
//! `nox_audit_model::chain`, so a verifier needs no database code).

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use nox_audit_model::chain::{ACTIONS_CHAIN, ADMIN_CHAIN, CheckpointClaim, to_micros};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio_postgres::{GenericClient, Transaction};

/// Both chains, in the order they are checkpointed and verified.
pub const CHAINS: [&str; 2] = [ACTIONS_CHAIN, ADMIN_CHAIN];

/// Locks the chain's head row until the transaction ends and returns its
/// newest `(seq, row_hash)` (see [`head_of`]): one lock per batch, and rows
/// join the chain in the order their transactions commit, whichever server
/// wrote them. Parameter: the chain's name.
pub const LOCK_HEAD: &str =
    "SELECT seq, row_hash FROM audit_chain_heads WHERE chain = $1 FOR UPDATE";

/// Moves the chain's head (inside the transaction that locked it).
/// Parameters: chain, seq, row_hash.
pub const SET_HEAD: &str = "UPDATE audit_chain_heads SET seq = $2, row_hash = $3 WHERE chain = $1";

/// Runs [`LOCK_HEAD`].
pub async fn lock_head(
    tx: &Transaction<'_>,
    chain: &str,
) -> Result<(i64, [u8; 32]), tokio_postgres::Error> {
    Ok(head_of(&tx.query_one(LOCK_HEAD, &[&chain]).await?))
}

/// Runs [`SET_HEAD`].
pub async fn set_head(
    tx: &Transaction<'_>,
    chain: &str,
    seq: i64,
    row_hash: &[u8; 32],
) -> Result<(), tokio_postgres::Error> {
    tx.execute(SET_HEAD, &[&chain, &seq, &row_hash.as_slice()])
        .await?;
    Ok(())
}

/// A head row's `(seq, row_hash)`.
pub fn head_of(row: &tokio_postgres::Row) -> (i64, [u8; 32]) {
    (row.get(0), hash32(row.get(1)))
}

/// The chain's newest `(seq, row_hash)`, without locking.
pub async fn head<C: GenericClient>(
    client: &C,
    chain: &str,
) -> Result<(i64, [u8; 32]), tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT seq, row_hash FROM audit_chain_heads WHERE chain = $1",
            &[&chain],
        )
        .await?;
    Ok(head_of(&row))
}

/// A stored hash as 32 bytes (anything else, which the schema forbids,
/// reads as zeros and so never matches a real hash).
pub fn hash32(bytes: &[u8]) -> [u8; 32] {
    bytes.try_into().unwrap_or([0; 32])
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("database: {0}")]
    Database(#[from] tokio_postgres::Error),
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn file_error(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::File {
        path: path.to_owned(),
        source,
    }
}

/// A signed checkpoint, as stored in `audit_checkpoints` and as one line of
/// `checkpoints.log` (hex for the binary fields).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub chain: String,
    pub seq: i64,
    #[serde(with = "hex::serde")]
    pub row_hash: [u8; 32],
    #[serde(with = "time::serde::rfc3339")]
    pub timestamp: OffsetDateTime,
    pub reason: String,
    #[serde(with = "hex::serde")]
    pub public_key: [u8; 32],
    #[serde(with = "hex::serde")]
    pub signature: [u8; 64],
}

impl Checkpoint {
    pub fn claim(&self) -> CheckpointClaim {
        CheckpointClaim {
            chain: self.chain.clone(),
            seq: self.seq,
            row_hash: self.row_hash,
            at: self.timestamp,
        }
    }

    /// Whether the signature is `key`'s over this checkpoint's claim.
    pub fn signed_by(&self, key: &VerifyingKey) -> bool {
        key.verify(
            &self.claim().message(),
            &Signature::from_bytes(&self.signature),
        )
        .is_ok()
    }

    /// Every checkpoint stored in the database, oldest first.
    pub async fn all<C: GenericClient>(
        client: &C,
    ) -> Result<Vec<Checkpoint>, tokio_postgres::Error> {
        Self::query(client, "ORDER BY id", &[]).await
    }

    /// The newest `limit` checkpoints, newest first.
    pub async fn newest<C: GenericClient>(
        client: &C,
        limit: i64,
    ) -> Result<Vec<Checkpoint>, tokio_postgres::Error> {
        Self::query(client, "ORDER BY id DESC LIMIT $1", &[&limit]).await
    }

    async fn query<C: GenericClient>(
        client: &C,
        order: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<Checkpoint>, tokio_postgres::Error> {
        let rows = client
            .query(
                &format!("SELECT {} FROM audit_checkpoints {order}", Self::COLUMNS),
                params,
            )
            .await?;
        Ok(rows.iter().map(Checkpoint::from_row).collect())
    }

    /// The columns [`Checkpoint::from_row`] reads, in its order.
    pub(crate) const COLUMNS: &str =
        "chain, seq, row_hash, \"timestamp\", reason, public_key, signature";

    /// A row of [`Checkpoint::COLUMNS`] (a field of the wrong length, which
    /// the writer never stores, reads as zeros and so never verifies).
    pub(crate) fn from_row(row: &tokio_postgres::Row) -> Checkpoint {
        Checkpoint {
            chain: row.get(0),
            seq: row.get(1),
            row_hash: hash32(row.get(2)),
            timestamp: row.get(3),
            reason: row.get(4),
            public_key: row.get::<_, &[u8]>(5).try_into().unwrap_or([0; 32]),
            signature: row.get::<_, &[u8]>(6).try_into().unwrap_or([0; 64]),
        }
    }

    /// Reads a `checkpoints.log` file: one JSON checkpoint per line.
    pub fn read_log(path: &Path) -> Result<Vec<Checkpoint>, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        text.lines()
            .enumerate()
            .filter(|(_, line)| !line.trim().is_empty())
            .map(|(index, line)| {
                serde_json::from_str(line)
                    .map_err(|e| format!("{} line {}: {e}", path.display(), index + 1))
            })
            .collect()
    }
}

/// Reads a public key file: 64 hex digits (whitespace ignored).
pub fn read_public_key(path: &Path) -> Result<VerifyingKey, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let bytes: [u8; 32] = hex::decode(text.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| format!("{}: expected 64 hex digits", path.display()))?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// Signs checkpoints with the server's Ed25519 key and appends them to
/// `<dir>/checkpoints.log`.
#[derive(Debug)]
pub struct Checkpointer {
    key: SigningKey,
    log: PathBuf,
}

/// The checkpoint log's name inside the checkpoint directory.
pub const LOG_FILE: &str = "checkpoints.log";
/// The public key, in hex, beside the log (for shipping off the host).
pub const PUBLIC_KEY_FILE: &str = "public-key";

impl Checkpointer {
    /// Loads the signing key (64 hex digits), generating it on first use
    /// with mode 0600, and prepares the checkpoint directory.
    pub fn open(key_file: &Path, checkpoint_dir: &Path) -> Result<Checkpointer, CheckpointError> {
        let key = match std::fs::read_to_string(key_file) {
            Ok(text) => {
                let seed: [u8; 32] = hex::decode(text.trim())
                    .ok()
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| CheckpointError::File {
                        path: key_file.to_owned(),
                        source: std::io::Error::other("expected 64 hex digits"),
                    })?;
                SigningKey::from_bytes(&seed)
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                let mut seed = [0u8; 32];
                getrandom::fill(&mut seed)
                    .map_err(|e| file_error(key_file)(std::io::Error::other(e.to_string())))?;
                if let Some(parent) = key_file.parent() {
                    std::fs::create_dir_all(parent).map_err(file_error(parent))?;
                }
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(key_file)
                    .map_err(file_error(key_file))?;
                writeln!(file, "{}", hex::encode(seed)).map_err(file_error(key_file))?;
                file.sync_all().map_err(file_error(key_file))?;
                tracing::info!(file = %key_file.display(), "generated the audit checkpoint signing key");
                SigningKey::from_bytes(&seed)
            }
            Err(error) => return Err(file_error(key_file)(error)),
        };
        std::fs::create_dir_all(checkpoint_dir).map_err(file_error(checkpoint_dir))?;
        let public = checkpoint_dir.join(PUBLIC_KEY_FILE);
        std::fs::write(
            &public,
            format!("{}\n", hex::encode(key.verifying_key().as_bytes())),
        )
        .map_err(file_error(&public))?;
        Ok(Checkpointer {
            key,
            log: checkpoint_dir.join(LOG_FILE),
        })
    }

    pub fn public_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    pub fn public_key_hex(&self) -> String {
        hex::encode(self.key.verifying_key().as_bytes())
    }

    /// Signs `(chain, seq, row_hash, now)`, stores it through `client` and
    /// appends it (fsynced) to the log.
    pub async fn sign<C: GenericClient>(
        &self,
        client: &C,
        chain: &str,
        seq: i64,
        row_hash: [u8; 32],
        reason: &str,
    ) -> Result<Checkpoint, CheckpointError> {
        let claim = CheckpointClaim {
            chain: chain.to_owned(),
            seq,
            row_hash,
            at: to_micros(OffsetDateTime::now_utc()),
        };
        let signature = self.key.sign(&claim.message());
        let checkpoint = Checkpoint {
            chain: claim.chain,
            seq,
            row_hash,
            timestamp: claim.at,
            reason: reason.to_owned(),
            public_key: *self.key.verifying_key().as_bytes(),
            signature: signature.to_bytes(),
        };
        client
            .execute(
                "INSERT INTO audit_checkpoints
                    (chain, seq, row_hash, \"timestamp\", reason, public_key, signature)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[
                    &checkpoint.chain,
                    &checkpoint.seq,
                    &checkpoint.row_hash.as_slice(),
                    &checkpoint.timestamp,
                    &checkpoint.reason,
                    &checkpoint.public_key.as_slice(),
                    &checkpoint.signature.as_slice(),
                ],
            )
            .await?;
        let line = serde_json::to_string(&checkpoint).map_err(|e| CheckpointError::File {
            path: self.log.clone(),
            source: std::io::Error::other(e),
        })?;
        let mut file = OpenOptions::new()
            .append(true)
            .create(true)
            .open(&self.log)
            .map_err(file_error(&self.log))?;
        writeln!(file, "{line}").map_err(file_error(&self.log))?;
        file.sync_data().map_err(file_error(&self.log))?;
        Ok(checkpoint)
    }

    /// Checkpoints every chain whose head moved since its newest checkpoint
    /// (or, with `always`, every non-empty chain). Returns what it wrote.
    pub async fn checkpoint_heads<C: GenericClient>(
        &self,
        client: &C,
        reason: &str,
        always: bool,
    ) -> Result<Vec<Checkpoint>, CheckpointError> {
        self.checkpoint_moved_heads(client, reason, always, Duration::ZERO)
            .await
    }

    /// A server's periodic or shutdown checkpoint, one server at a time
    /// across every server sharing the database ([`CHECKPOINT_LOCK_KEY`],
    /// held for the transaction). A chain whose newest checkpoint, whoever
    /// signed it, is younger than `min_age` is left for later, so N servers
    /// ticking every interval sign about one checkpoint per interval, not
    /// N. `Ok(None)`: another server is checkpointing and `wait` is off.
    pub async fn checkpoint_heads_exclusive(
        &self,
        client: &mut tokio_postgres::Client,
        reason: &str,
        wait: bool,
        min_age: Duration,
    ) -> Result<Option<Vec<Checkpoint>>, CheckpointError> {
        let transaction = client.transaction().await?;
        if wait {
            transaction
                .execute("SELECT pg_advisory_xact_lock($1)", &[&CHECKPOINT_LOCK_KEY])
                .await?;
        } else {
            let locked: bool = transaction
                .query_one(
                    "SELECT pg_try_advisory_xact_lock($1)",
                    &[&CHECKPOINT_LOCK_KEY],
                )
                .await?
                .get(0);
            if !locked {
                return Ok(None);
            }
        }
        let written = self
            .checkpoint_moved_heads(&transaction, reason, false, min_age)
            .await?;
        transaction.commit().await?;
        Ok(Some(written))
    }

    async fn checkpoint_moved_heads<C: GenericClient>(
        &self,
        client: &C,
        reason: &str,
        always: bool,
        min_age: Duration,
    ) -> Result<Vec<Checkpoint>, CheckpointError> {
        let mut written = Vec::new();
        for chain in CHAINS {
            let (seq, row_hash) = head(client, chain).await?;
            // The age on the database's clock, the one all servers share.
            let newest = client
                .query_one(
                    "SELECT max(seq), coalesce(max(\"timestamp\") > now() - make_interval(secs => $2), false)
                       FROM audit_checkpoints WHERE chain = $1",
                    &[&chain, &min_age.as_secs_f64()],
                )
                .await?;
            let (newest_seq, too_recent): (Option<i64>, bool) = (newest.get(0), newest.get(1));
            if seq == 0 || (!always && (newest_seq.is_some_and(|n| n >= seq) || too_recent)) {
                continue;
            }
            written.push(self.sign(client, chain, seq, row_hash, reason).await?);
        }
        Ok(written)
    }
}

/// The advisory lock held while a server checkpoints (`"nox_chpt"` in
/// ASCII).
pub const CHECKPOINT_LOCK_KEY: i64 = 0x6e6f_785f_6368_7074;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_generated_once_private_and_checkpoints_verify() {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("keys/audit-signing.key");
        let first = Checkpointer::open(&key_file, &dir.path().join("cp")).unwrap();
        let again = Checkpointer::open(&key_file, &dir.path().join("cp")).unwrap();
        assert_eq!(first.public_key_hex(), again.public_key_hex());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let public = read_public_key(&dir.path().join("cp").join(PUBLIC_KEY_FILE)).unwrap();
        assert_eq!(public, first.public_key());

        let claim = CheckpointClaim {
            chain: "audit_actions".into(),
            seq: 3,
            row_hash: [9; 32],
            at: to_micros(OffsetDateTime::now_utc()),
        };
        let mut checkpoint = Checkpoint {
            chain: claim.chain.clone(),
            seq: 3,
            row_hash: [9; 32],
            timestamp: claim.at,
            reason: "interval".into(),
            public_key: *public.as_bytes(),
            signature: first.key.sign(&claim.message()).to_bytes(),
        };
        assert!(checkpoint.signed_by(&public));
        let line = serde_json::to_string(&checkpoint).unwrap();
        assert_eq!(
            serde_json::from_str::<Checkpoint>(&line).unwrap(),
            checkpoint
        );
        checkpoint.seq = 4;
        assert!(!checkpoint.signed_by(&public), "the seq is signed");
    }
}
