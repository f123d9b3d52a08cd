//! Continuous verification: a pass over every chain at an interval, by one
//! server at a time, each chain from the last checkpoint an earlier pass
//! verified, with the results kept in `audit_verifications` (migration 11)
//! for every server to show.
//!
//! [`Verifier::run_once`] is one pass; [`Verifier::start`] runs one at once
//! and then every interval until [`ContinuousVerifier::shutdown`]. A pass:
//! 1. takes a connection out of the pool for itself and tries
//!    `pg_try_advisory_lock(`[`VERIFY_LOCK_KEY`]`)` on it: a server that does
//!    not get it skips the round (another is verifying). The connection is
//!    closed at the end, so the lock goes with it however the pass ends.
//! 2. per chain, starts after the newest checkpoint at or below the `to_seq`
//!    of the chain's last `ok` row and signed before that pass began (so
//!    one that pass checked), trusting its hash: it verified then, and it is
//!    signed. Without one, from the chain's start. A failed chain is walked
//!    again from the same point at every pass: it stays failed until
//!    repaired.
//! 3. walks to the head with [`verify_chain`] (the checks of `nox-migrate
//!    verify`), checkpoint signatures against the key given (the server's
//!    own, which someone editing the database cannot replace), in one
//!    snapshot per chain, and records one row per chain.
//! 4. deletes rows older than [`KEEP_DAYS`] or past the newest
//!    [`KEEP_ROWS`], except each chain's newest `ok` row (the next start).
//!
//! Rows before the starting checkpoint are not read again by an
//! incremental pass: a later edit there is found by the full pass each
//! server runs first and every [`FULL_PASS_EVERY`], or `nox-migrate verify`. Nor are the
//! results signed: someone who can write the database could record an `ok`
//! past an edit; against a database writer the proof stays `nox-migrate
//! verify` with the checkpoint log kept off the host.

use std::time::Duration;

use deadpool_postgres::Pool;
use ed25519_dalek::VerifyingKey;
use nox_audit_model::chain::to_micros;
use time::OffsetDateTime;
use tokio_postgres::Client;

use super::{ChainSummary, Start, VerifyError, verify_chain};
use crate::checkpoints::{CHAINS, hash32};

/// The advisory lock a pass holds (`"nox_veri"` in ASCII): one pass at a
/// time across every server sharing the database.
pub const VERIFY_LOCK_KEY: i64 = 0x6e6f_785f_7665_7269;
/// Results are kept this many days (each chain's newest `ok` row longer)...
pub const KEEP_DAYS: i64 = 30;
/// How often a server's pass reads whole chains (its first pass does too):
/// incremental passes never re-read rows behind their starting checkpoint.
pub const FULL_PASS_EVERY: Duration = Duration::from_secs(24 * 3600);
/// ...and at most this many rows.
pub const KEEP_ROWS: i64 = 10_000;

/// How one chain's verification ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    /// Every row from the start to the head is sound.
    Ok,
    /// The database could not be read to the end: nothing is known.
    Error,
    /// The chain is broken: tampered with, or rows are missing.
    Failed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Failed => "failed",
            Outcome::Error => "error",
        }
    }

    /// Text the table holds (its CHECK allows only the three).
    fn parse(text: &str) -> Outcome {
        match text {
            "ok" => Outcome::Ok,
            "failed" => Outcome::Failed,
            _ => Outcome::Error,
        }
    }
}

/// One chain's verification: a row of `audit_verifications`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainVerification {
    pub chain: String,
    pub started_at: OffsetDateTime,
    pub finished_at: OffsetDateTime,
    /// The rows recomputed and found sound: `from_seq` to `to_seq`
    /// (`to_seq < from_seq`: none, as when nothing was added since the
    /// starting checkpoint).
    pub from_seq: i64,
    pub to_seq: i64,
    pub outcome: Outcome,
    /// Where a failed chain first goes wrong (none for an unchained row,
    /// which has no seq).
    pub first_bad_seq: Option<i64>,
    /// A failure's [`super::Problem::kind`].
    pub problem_kind: Option<String>,
    /// A failure or an error, in words.
    pub problem: Option<String>,
}

impl ChainVerification {
    fn new(
        started_at: OffsetDateTime,
        summary: &ChainSummary,
        result: Result<(), VerifyError>,
    ) -> ChainVerification {
        let (outcome, first_bad_seq, problem_kind, problem) = match result {
            Ok(()) => (Outcome::Ok, None, None, None),
            Err(VerifyError::Broken { seq, problem, .. }) => (
                Outcome::Failed,
                Some(seq).filter(|_| !matches!(problem, super::Problem::Unchained { .. })),
                Some(problem.kind().to_owned()),
                Some(problem.to_string()),
            ),
            Err(error) => (Outcome::Error, None, None, Some(error.to_string())),
        };
        ChainVerification {
            chain: summary.chain.to_owned(),
            // As the table keeps them: whole microseconds.
            started_at: to_micros(started_at),
            finished_at: to_micros(OffsetDateTime::now_utc()),
            from_seq: summary.first_seq,
            to_seq: summary.last_seq,
            outcome,
            first_bad_seq,
            problem_kind,
            problem,
        }
    }

    const COLUMNS: &str = "chain, started_at, finished_at, from_seq, to_seq, outcome, \
                           first_bad_seq, problem_kind, problem";

    fn from_row(row: &tokio_postgres::Row) -> ChainVerification {
        ChainVerification {
            chain: row.get(0),
            started_at: row.get(1),
            finished_at: row.get(2),
            from_seq: row.get(3),
            to_seq: row.get(4),
            outcome: Outcome::parse(row.get(5)),
            first_bad_seq: row.get(6),
            problem_kind: row.get(7),
            problem: row.get(8),
        }
    }

    async fn insert(&self, client: &Client) -> Result<(), tokio_postgres::Error> {
        client
            .execute(
                &format!(
                    "INSERT INTO audit_verifications ({}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                    Self::COLUMNS
                ),
                &[
                    &self.chain,
                    &self.started_at,
                    &self.finished_at,
                    &self.from_seq,
                    &self.to_seq,
                    &self.outcome.as_str(),
                    &self.first_bad_seq,
                    &self.problem_kind,
                    &self.problem,
                ],
            )
            .await?;
        Ok(())
    }
}

/// What a pass did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pass {
    /// Another server held the lock: it is verifying.
    Skipped,
    /// Each chain's result, in [`CHAINS`] order.
    Ran(Vec<ChainVerification>),
}

impl Pass {
    /// The worst chain's outcome (failed, then error, then ok); none when
    /// skipped.
    pub fn outcome(&self) -> Option<Outcome> {
        match self {
            Pass::Skipped => None,
            Pass::Ran(chains) => chains.iter().map(|c| c.outcome).max(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error("connection pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("database: {0}")]
    Database(#[from] tokio_postgres::Error),
}

/// Runs verification passes on a pool, checking signatures with the public
/// key given (the checkpoint signer's: [`crate::checkpoints::Checkpointer::public_key`]).
/// Servers sharing a database must sign with one key (the same key file),
/// or each finds the others' checkpoints `bad_signature`.
#[derive(Debug, Clone)]
pub struct Verifier {
    pool: Pool,
    public_key: VerifyingKey,
}

impl Verifier {
    pub fn new(pool: Pool, public_key: VerifyingKey) -> Verifier {
        Verifier { pool, public_key }
    }

    /// One pass over every chain, unless another server is running one.
    /// Each chain's result is recorded, and returned; a result that could
    /// not be recorded is logged.
    pub async fn run_once(&self) -> Result<Pass, PassError> {
        self.pass(false).await
    }

    /// A pass that reads every chain from its beginning, like `nox-migrate
    /// verify`: it also finds edits behind the checkpoints incremental
    /// passes start from.
    pub async fn run_full(&self) -> Result<Pass, PassError> {
        self.pass(true).await
    }

    async fn pass(&self, full: bool) -> Result<Pass, PassError> {
        // A connection of its own, closed when it is dropped: no pooled
        // connection ever keeps the lock.
        let mut client = deadpool_postgres::Object::take(self.pool.get().await?);
        let locked: bool = client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&VERIFY_LOCK_KEY])
            .await?
            .get(0);
        if !locked {
            return Ok(Pass::Skipped);
        }
        let mut chains = Vec::new();
        for chain in CHAINS {
            let started_at = OffsetDateTime::now_utc();
            let start = match full {
                true => Ok(Start::Beginning),
                false => start_of(&client, chain).await,
            };
            let (summary, result) = match start {
                Ok(start) => verify_chain(&mut client, chain, start, &self.public_key).await,
                Err(error) => (ChainSummary::new(chain), Err(error.into())),
            };
            let verification = ChainVerification::new(started_at, &summary, result);
            if let Err(error) = verification.insert(&client).await {
                tracing::warn!(%error, chain, "the audit verification's result was not recorded");
            }
            chains.push(verification);
        }
        if let Err(error) = prune(&client, OffsetDateTime::now_utc()).await {
            tracing::warn!(%error, "old audit verification results were not deleted");
        }
        // At once, rather than when the server sees the connection close.
        client
            .execute("SELECT pg_advisory_unlock($1)", &[&VERIFY_LOCK_KEY])
            .await?;
        Ok(Pass::Ran(chains))
    }

    /// Runs a pass now and then every `every` (a pass that overruns delays
    /// the next), recording metrics, until shut down. The first pass this
    /// process runs, and one every [`FULL_PASS_EVERY`] after, is full.
    pub fn start(self, every: Duration) -> ContinuousVerifier {
        nox_audit_metrics::verification_started(&CHAINS, every.as_secs_f64());
        let task = tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last_full: Option<tokio::time::Instant> = None;
            loop {
                ticks.tick().await;
                let full = last_full.is_none_or(|at| at.elapsed() >= FULL_PASS_EVERY);
                if self.round(full).await && full {
                    last_full = Some(tokio::time::Instant::now());
                }
            }
        });
        ContinuousVerifier { task }
    }

    /// A pass, logged and counted, then the last success read from the
    /// table, whoever verified. Whether this server ran one.
    pub(crate) async fn round(&self, full: bool) -> bool {
        self.show_last_success().await;
        let ran = match self.pass(full).await {
            Ok(Pass::Skipped) => {
                tracing::debug!("audit verification skipped: another server is verifying");
                nox_audit_metrics::record_verification_run("skipped");
                false
            }
            Ok(pass @ Pass::Ran(_)) => {
                let outcome = pass.outcome().unwrap_or(Outcome::Ok);
                let Pass::Ran(chains) = pass else {
                    return false;
                };
                for chain in &chains {
                    log(chain);
                    if chain.outcome == Outcome::Failed {
                        nox_audit_metrics::record_verification_failure(&chain.chain);
                    }
                }
                nox_audit_metrics::record_verification_run(outcome.as_str());
                true
            }
            Err(error) => {
                tracing::warn!(%error, "audit verification did not run; retrying at the next interval");
                nox_audit_metrics::record_verification_run(Outcome::Error.as_str());
                false
            }
        };
        self.show_last_success().await;
        ran
    }

    async fn show_last_success(&self) {
        let at = match self.pool.get().await {
            Ok(client) => last_success_at(&client).await.map_err(|e| e.to_string()),
            Err(error) => Err(error.to_string()),
        };
        match at {
            Ok(Some(at)) => nox_audit_metrics::set_last_verified_at(
                at.unix_timestamp_nanos() as f64 / 1_000_000_000.0,
            ),
            Ok(None) => {}
            Err(error) => tracing::debug!(%error, "the last audit verification is unknown"),
        }
    }
}

fn log(chain: &ChainVerification) {
    let (name, from, to) = (&chain.chain, chain.from_seq, chain.to_seq);
    match chain.outcome {
        Outcome::Ok => tracing::info!(chain = %name, from, to, "audit chain verified"),
        Outcome::Failed => tracing::error!(
            chain = %name,
            seq = chain.first_bad_seq,
            kind = chain.problem_kind.as_deref(),
            problem = chain.problem.as_deref(),
            "audit chain verification FAILED"
        ),
        Outcome::Error => tracing::warn!(
            chain = %name,
            error = chain.problem.as_deref(),
            "audit chain verification could not finish"
        ),
    }
}

/// Where the chain's next pass starts: after the newest checkpoint at or
/// below its last `ok` pass's `to_seq`, signed before that pass began (a
/// checkpoint that pass checked, not one signed later over rows changed
/// since), else at the beginning.
async fn start_of(client: &Client, chain: &str) -> Result<Start, tokio_postgres::Error> {
    let Some(ok) = client
        .query_opt(
            "SELECT to_seq, started_at FROM audit_verifications
             WHERE chain = $1 AND outcome = 'ok' ORDER BY id DESC LIMIT 1",
            &[&chain],
        )
        .await?
    else {
        return Ok(Start::Beginning);
    };
    let (to_seq, started_at): (i64, OffsetDateTime) = (ok.get(0), ok.get(1));
    let checkpoint = client
        .query_opt(
            "SELECT seq, row_hash FROM audit_checkpoints
             WHERE chain = $1 AND seq <= $2 AND \"timestamp\" <= $3
             ORDER BY seq DESC, id DESC LIMIT 1",
            &[&chain, &to_seq, &started_at],
        )
        .await?;
    Ok(match checkpoint {
        Some(row) => Start::After {
            seq: row.get(0),
            row_hash: hash32(row.get(1)),
        },
        None => Start::Beginning,
    })
}

/// Deletes results older than [`KEEP_DAYS`] or past the newest
/// [`KEEP_ROWS`], keeping each chain's newest `ok` row.
async fn prune(client: &Client, now: OffsetDateTime) -> Result<u64, tokio_postgres::Error> {
    client
        .execute(
            "DELETE FROM audit_verifications
             WHERE (finished_at < $1
                    OR id <= (SELECT id FROM audit_verifications ORDER BY id DESC OFFSET $2 LIMIT 1))
               AND id NOT IN (SELECT max(id) FROM audit_verifications
                              WHERE outcome = 'ok' GROUP BY chain)",
            &[&(now - time::Duration::days(KEEP_DAYS)), &KEEP_ROWS],
        )
        .await
}

/// The newest result of each chain, whoever verified: what
/// `GET /admin/audit/status` shows.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VerificationStatus {
    /// By chain name.
    pub chains: Vec<ChainVerification>,
}

impl VerificationStatus {
    pub async fn read(client: &Client) -> Result<VerificationStatus, tokio_postgres::Error> {
        let rows = client
            .query(
                &format!(
                    "SELECT DISTINCT ON (chain) {} FROM audit_verifications ORDER BY chain, id DESC",
                    ChainVerification::COLUMNS
                ),
                &[],
            )
            .await?;
        Ok(VerificationStatus {
            chains: rows.iter().map(ChainVerification::from_row).collect(),
        })
    }

    /// When the newest of them finished.
    pub fn last_run_at(&self) -> Option<OffsetDateTime> {
        self.chains.iter().map(|c| c.finished_at).max()
    }

    /// `never` without results, else the worst chain's: `failed`, then
    /// `error`, then `ok`.
    pub fn outcome(&self) -> &'static str {
        self.chains
            .iter()
            .map(|c| c.outcome)
            .max()
            .map_or("never", Outcome::as_str)
    }
}

/// When every chain last verified `ok` (the oldest of their newest `ok`
/// results), whoever verified; none until each has.
pub async fn last_success_at(
    client: &Client,
) -> Result<Option<OffsetDateTime>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT chain, max(finished_at) FROM audit_verifications
             WHERE outcome = 'ok' GROUP BY chain",
            &[],
        )
        .await?;
    let newest: Vec<(String, OffsetDateTime)> =
        rows.iter().map(|row| (row.get(0), row.get(1))).collect();
    let every_chain = CHAINS
        .iter()
        .all(|chain| newest.iter().any(|(c, _)| c == chain));
    Ok(every_chain
        .then(|| {
            newest
                .iter()
                .filter(|(c, _)| CHAINS.contains(&c.as_str()))
                .map(|(_, at)| *at)
                .min()
        })
        .flatten())
}

/// The running [`Verifier::start`] task.
#[derive(Debug)]
pub struct ContinuousVerifier {
    task: tokio::task::JoinHandle<()>,
}

impl ContinuousVerifier {
    /// Stops it; a pass under way is abandoned (its connection closed, the
    /// lock released, nothing half-written: each result is one insert).
    pub async fn shutdown(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}
