//! `nox-server`: parse the configuration, install logging, run the API.

use std::process::ExitCode;

use clap::Parser;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use nox_api::Config;
use nox_api::config::LogFormat;
use nox_api::telemetry::Console;

#[tokio::main]
async fn main() -> ExitCode {
    let config = parse_config();
    let console = Console(config.log_format);
    nox_api::telemetry::init_tracing(config.log_format);
    let metrics = match install_metrics() {
        Ok(handle) => Some(handle),
        Err(error) => {
            console.error(&format!("nox-server: metrics are off: {error}"));
            None
        }
    };
    match nox_api::run_server(config, metrics).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            console.error(&format!("nox-server: {error:#}"));
            ExitCode::FAILURE
        }
    }
}

/// The configuration, or exit: `--help` and `--version` print as usual; a
/// refused configuration is one JSON line when `NOX_LOG_FORMAT=json`.
fn parse_config() -> Config {
    match Config::try_parse() {
        Ok(config) => config,
        Err(error)
            if error.use_stderr() && std::env::var("NOX_LOG_FORMAT").is_ok_and(|f| f == "json") =>
        {
            Console(LogFormat::Json)
                .error(&format!("nox-server: {}", error.to_string().trim_end()));
            std::process::exit(error.exit_code());
        }
        Err(error) => error.exit(),
    }
}

/// Installs the Prometheus recorder (no HTTP listener of its own: the API
/// serves `/metrics`), with explicit buckets so histograms stay histograms.
fn install_metrics() -> Result<PrometheusHandle, Box<dyn std::error::Error>> {
    use nox_audit_metrics::{AUDIT_WRITE_BATCH_ROWS, BATCH_ROWS_BUCKETS, SECONDS_BUCKETS};
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)?
        .set_buckets_for_metric(
            Matcher::Full(AUDIT_WRITE_BATCH_ROWS.into()),
            BATCH_ROWS_BUCKETS,
        )?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder)?;
    nox_api::metrics::describe();
    Ok(handle)
}
