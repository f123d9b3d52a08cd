//! `nox-server`: parse the configuration, install logging, run the API.

use std::process::ExitCode;

use clap::Parser;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use nox_api::Config;

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    nox_api::telemetry::init_tracing(config.log_format);
    let metrics = match install_metrics() {
        Ok(handle) => Some(handle),
        Err(error) => {
            eprintln!("nox-server: metrics are off: {error}");
            None
        }
    };
    match nox_api::run_server(config, metrics).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("nox-server: {error:#}");
            ExitCode::FAILURE
        }
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
    nox_audit_metrics::describe(nox_api::VERSION);
    Ok(handle)
}
