//! `nox-migrate`: apply migrations, report their state, and rebuild or
//! check the daily audit rollups.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use nox_api::config::{LogFormat, StorageConfig};
use nox_api::db::{Database, connect};
use nox_api::schema::MIGRATIONS;
use nox_audit_store::{MigrationState, Migrator, summaries};
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
    nox_api::telemetry::init_tracing(cli.log_format);
    match run(cli).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("nox-migrate: {error:#}");
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
            let mismatches = summaries::check(&client, from, to).await?;
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
