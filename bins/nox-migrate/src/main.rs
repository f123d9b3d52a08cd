//! `nox-migrate`: apply migrations and report their state.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use nox_api::config::{LogFormat, StorageConfig};
use nox_api::db::{Database, connect};
use nox_api::schema::MIGRATIONS;
use nox_audit_store::{MigrationState, Migrator};
use time::format_description::well_known::Rfc3339;

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
