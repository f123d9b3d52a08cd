//! `nox-migrate`: apply migrations, report their state, rebuild or check
//! the daily audit rollups, verify the audit hash chains, drop old months,
//! and seed synthetic rows for benchmarks.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use nox_api::config::{LogFormat, StorageConfig};
use nox_api::db::{Database, connect};
use nox_api::migrations::MIGRATIONS;
use nox_audit_store::checkpoints::{Checkpoint, read_public_key};
use nox_audit_store::rollup::{self, RollupState};
use nox_audit_store::verify::{VerifyError, VerifyOptions};
use nox_audit_store::{MigrationState, Migrator, retention, summaries};
use time::Date;
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;

/// Applies the Nox database migrations.
#[derive(Debug, Parser)]
#[command(name = "nox-migrate", version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    storage: StorageConfig,

    /// Log output format.
    #[arg(long, env = "NOX_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Apply every pending migration (idempotent).
    Up,
    /// List every migration as applied or pending; exits 1 when an applied
    /// migration's checksum no longer matches.
    Status,
    /// Daily audit rollups (`audit_daily_summaries`).
    #[command(subcommand)]
    Summaries(SummariesCommand),
    /// Fill the audit tables with synthetic rows for benchmarks: several
    /// users (`seed-NN`, role user), one session per user and day, every
    /// category, a few percent of failures, spread over the last days.
    Seed {
        /// Rows to add to `audit_actions`.
        #[arg(long, value_parser = clap::value_parser!(i64).range(1..))]
        rows: i64,
        /// Days back from now the rows are spread over.
        #[arg(long, default_value_t = 90, value_parser = clap::value_parser!(i64).range(1..=3650))]
        days: i64,
        /// Distinct users.
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(i64).range(1..=250))]
        users: i64,
    },
    /// Recompute the audit hash chains and check every signed checkpoint;
    /// exits 1 naming the first bad seq and what is wrong there.
    Verify {
        /// Start the audit_actions chain at this seq, trusting the stored
        /// hash of the row before it (the admin chain is always checked whole).
        #[arg(long, value_parser = clap::value_parser!(i64).range(1..))]
        from_seq: Option<i64>,
        /// A checkpoints.log kept outside the database: catches deleted
        /// newest rows and checkpoints removed from the database.
        #[arg(long)]
        checkpoints: Option<PathBuf>,
        /// The signing key's public half (64 hex digits), kept outside the
        /// database: catches a chain recomputed and re-signed with another key.
        #[arg(long)]
        public_key: Option<PathBuf>,
    },
    /// Drop the monthly audit_actions partitions that end on or before a
    /// date, signing a checkpoint at the boundary (needs the server's signing
    /// key: NOX_AUDIT_SIGNING_KEY_FILE or <NOX_DATA_DIR>/audit-signing.key).
    Retention {
        /// YYYY-MM-DD: months ending on or before it are dropped.
        #[arg(long, value_parser = parse_date)]
        before: Date,
    },
}

#[derive(Debug, Subcommand)]
enum SummariesCommand {
    /// Recompute the rollups of a range of UTC days from the raw audit rows
    /// (idempotent; blocks audit inserts while it runs).
    Rebuild {
        /// First day, YYYY-MM-DD (default: the oldest day with audit data).
        #[arg(long, value_parser = parse_date)]
        from: Option<Date>,
        /// Last day, inclusive (default: the newest day with audit data).
        #[arg(long, value_parser = parse_date)]
        to: Option<Date>,
    },
    /// Compare the stored rollups with a recomputation; exits 1 and lists
    /// the differing (day, user) pairs when any differ.
    Check {
        #[arg(long, value_parser = parse_date)]
        from: Option<Date>,
        #[arg(long, value_parser = parse_date)]
        to: Option<Date>,
    },
}

fn parse_date(text: &str) -> Result<Date, String> {
    Date::parse(text, format_description!("[year]-[month]-[day]"))
        .map_err(|_| format!("{text:?} is not a date of the form YYYY-MM-DD"))
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let console = nox_api::telemetry::Console(cli.log_format);
    nox_api::telemetry::init_tracing(cli.log_format);
    match run(cli).await {
        Ok(code) => code,
        Err(error) => {
            console.error(&format!("nox-migrate: {error:#}"));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let database = Database::open(&cli.storage).await?;
    let result = match cli.command {
        Command::Up => up(&database).await,
        Command::Status => status(&database).await,
        Command::Summaries(command) => summaries(&database, command).await,
        Command::Seed { rows, days, users } => seed(&database, rows, days, users).await,
        Command::Verify {
            from_seq,
            checkpoints,
            public_key,
        } => verify(&database, from_seq, checkpoints, public_key).await,
        Command::Retention { before } => retention(&database, &cli.storage, before).await,
    };
    tokio::task::spawn_blocking(move || database.shutdown())
        .await
        .context("the database shutdown task failed")??;
    result
}

async fn up(database: &Database) -> anyhow::Result<ExitCode> {
    let applied = database.migrate().await?;
    if applied.is_empty() {
        println!("schema is current: nothing to apply");
    } else {
        for version in applied {
            let name = MIGRATIONS
                .iter()
                .find(|m| m.version == version)
                .map_or("?", |m| m.name);
            println!("applied {version:04} {name}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn status(database: &Database) -> anyhow::Result<ExitCode> {
    let client = connect(&database.pg_config).await?;
    let statuses = Migrator::new(MIGRATIONS).status(&client).await?;
    println!("{:<8} {:<32} {:<18} applied_at", "version", "name", "state");
    let mut broken = false;
    for status in statuses {
        let state = match status.state {
            MigrationState::Applied => "applied",
            MigrationState::Pending => "pending",
            MigrationState::ChecksumMismatch => {
                broken = true;
                "checksum-mismatch"
            }
            MigrationState::Unknown => "unknown",
        };
        let applied_at = status
            .applied_at
            .and_then(|t| t.format(&Rfc3339).ok())
            .unwrap_or_else(|| "-".to_owned());
        println!(
            "{:<8} {:<32} {:<18} {}",
            format!("{:04}", status.version),
            status.name,
            state,
            applied_at
        );
    }
    Ok(if broken {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

async fn seed(database: &Database, rows: i64, days: i64, users: i64) -> anyhow::Result<ExitCode> {
    let client = connect(&database.pg_config).await?;
    if database.pending_migrations().await? > 0 {
        anyhow::bail!("the schema is not current: run `nox-migrate up` first");
    }
    let users: Vec<uuid::Uuid> = client
        .query(
            "WITH wanted AS (
                 SELECT format('seed-%s', lpad(n::text, 2, '0')) AS name
                 FROM generate_series(1, $1::bigint) AS n),
             created AS (
                 INSERT INTO users (id, name, role)
                 SELECT gen_random_uuid(), name, 'user' FROM wanted
                 ON CONFLICT (name) DO NOTHING
                 RETURNING id)
             -- The statement's snapshot: existing users here, new ones above.
             SELECT id FROM created
             UNION ALL
             SELECT u.id FROM users u JOIN wanted USING (name)",
            &[&users],
        )
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let started = std::time::Instant::now();
    let now = time::OffsetDateTime::now_utc();
    let pool = database.pool(1)?;
    nox_audit_store::seed::seed(&pool, rows as u64, days, &users, now, |done| {
        if done % 500_000 == 0 || done == rows as u64 {
            println!("{done} of {rows} rows");
        }
    })
    .await?;
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "seeded {rows} rows for {} users over {days} days in {seconds:.1} s ({:.0} rows/s)",
        users.len(),
        rows as f64 / seconds
    );
    Ok(ExitCode::SUCCESS)
}

async fn verify(
    database: &Database,
    from_seq: Option<i64>,
    checkpoints: Option<PathBuf>,
    public_key: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let mut options = VerifyOptions {
        from_seq,
        ..VerifyOptions::default()
    };
    if let Some(path) = &checkpoints {
        options.external_checkpoints = Checkpoint::read_log(path).map_err(anyhow::Error::msg)?;
    }
    if let Some(path) = &public_key {
        options.public_key = Some(read_public_key(path).map_err(anyhow::Error::msg)?);
    }
    let mut client = connect(&database.pg_config).await?;
    match nox_audit_store::verify::verify(&mut client, &options).await {
        Ok(chains) => {
            for chain in chains {
                if chain.last_seq < chain.first_seq {
                    println!("{}: empty", chain.chain);
                } else {
                    println!(
                        "{}: seq {} to {} verified, {} checkpoints hold",
                        chain.chain, chain.first_seq, chain.last_seq, chain.checkpoints
                    );
                }
            }
            if public_key.is_none() {
                println!(
                    "note: checkpoint signatures were checked against the key stored with them; \
                     pass --public-key for a check that does not trust the database"
                );
            }
            println!("the audit trail verifies");
            Ok(ExitCode::SUCCESS)
        }
        Err(VerifyError::Database(error)) => Err(error.into()),
        Err(error) => {
            println!("verification FAILED: {error}");
            Ok(ExitCode::FAILURE)
        }
    }
}

async fn retention(
    database: &Database,
    storage: &StorageConfig,
    before: Date,
) -> anyhow::Result<ExitCode> {
    let key_file = storage.signing_key_file();
    if !key_file.exists() {
        anyhow::bail!(
            "no signing key at {}: point NOX_AUDIT_SIGNING_KEY_FILE (or NOX_DATA_DIR) at the server's",
            key_file.display()
        );
    }
    let checkpointer = storage.checkpointer()?;
    let mut client = connect(&database.pg_config).await?;
    let dropped = retention::drop_months_before(&mut client, before, &checkpointer).await?;
    if dropped.partitions.is_empty() {
        println!("no month ends on or before {before}: nothing dropped");
    } else {
        println!(
            "dropped {} ({} rows); checkpoint at seq {}",
            dropped.partitions.join(", "),
            dropped.rows,
            dropped
                .boundary_seq
                .map_or_else(|| "-".to_owned(), |s| s.to_string())
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn summaries(database: &Database, command: SummariesCommand) -> anyhow::Result<ExitCode> {
    let mut client = connect(&database.pg_config).await?;
    let (from, to) = match &command {
        SummariesCommand::Rebuild { from, to } | SummariesCommand::Check { from, to } => {
            (*from, *to)
        }
    };
    let range = match (from, to) {
        (Some(from), Some(to)) => Some((from, to)),
        _ => summaries::date_range(&client)
            .await?
            .map(|(first, last)| (from.unwrap_or(first), to.unwrap_or(last))),
    };
    let Some((from, to)) = range else {
        println!("no audit data: nothing to do");
        return Ok(ExitCode::SUCCESS);
    };
    if from > to {
        anyhow::bail!("--from {from} is after --to {to}");
    }
    match command {
        SummariesCommand::Rebuild { .. } => {
            let rows = summaries::rebuild(&mut client, from, to).await?;
            println!("rebuilt {rows} daily summaries for {from} to {to}");
            Ok(ExitCode::SUCCESS)
        }
        SummariesCommand::Check { .. } => {
            // Servers roll rows up a few times a second; bring the rollups
            // to the head first, so every committed row is checked. A
            // read-only role, or a rebuild holding the rollups, still gets
            // the check of what they hold.
            if let Err(error) = rollup::catch_up(&client).await {
                println!("note: the rollups were not brought up to date first ({error})");
            }
            let mismatches = summaries::check(&client, from, to).await?;
            let state = RollupState::read(&client).await?;
            if state.rows_behind() > 0 {
                println!(
                    "checked the rows up to seq {} ({} committed since are not rolled up yet)",
                    state.rolled_seq,
                    state.rows_behind()
                );
            }
            if mismatches.is_empty() {
                println!("daily summaries for {from} to {to} match the audit rows");
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{} daily summaries differ from the audit rows:",
                mismatches.len()
            );
            for mismatch in &mismatches {
                let user = mismatch
                    .user_id
                    .map_or_else(|| "anonymous".to_owned(), |id| id.to_string());
                println!("  {} {user}", mismatch.summary_date);
            }
            println!("run `nox-migrate summaries rebuild --from {from} --to {to}` to repair them");
            Ok(ExitCode::FAILURE)
        }
    }
}
