//! `nox-server`: parse the configuration, install logging, run the API.

use std::process::ExitCode;

use clap::Parser;
use nox_api::Config;

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    nox_api::telemetry::init_tracing(config.log_format);
    match nox_api::run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("nox-server: {error:#}");
            ExitCode::FAILURE
        }
    }
}
