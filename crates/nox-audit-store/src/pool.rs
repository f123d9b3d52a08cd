//! Connection pool construction.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

/// Pool sizing and time-outs.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    pub max_size: usize,
    /// How long a caller waits for a free connection before giving up.
    pub wait_timeout: Duration,
    /// How long opening a new connection may take.
    pub connect_timeout: Duration,
}

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions {
            max_size: 16,
            wait_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// Builds a pool; connections open lazily, so this never touches the network.
pub fn build_pool(
    mut pg_config: tokio_postgres::Config,
    options: &PoolOptions,
) -> Result<Pool, deadpool_postgres::BuildError> {
    if pg_config.get_connect_timeout().is_none() {
        pg_config.connect_timeout(options.connect_timeout);
    }
    if pg_config.get_application_name().is_none() {
        pg_config.application_name("nox");
    }
    let manager = Manager::from_config(
        pg_config,
        NoTls,
        ManagerConfig {
            // A cheap liveness check of returned connections.
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(options.max_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(options.wait_timeout))
        .create_timeout(Some(options.connect_timeout))
        .recycle_timeout(Some(options.connect_timeout))
        .build()
}
