//! Server configuration: one plain struct, read from flags and environment
//! variables by clap and passed down explicitly (no global state).

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use ipnet::IpNet;
use nox_audit_store::AuditMode;
use nox_auth::Secret;

/// Operator-chosen admin tokens shorter than this are refused.
pub const MIN_ADMIN_TOKEN_CHARS: usize = nox_auth::token::MIN_TOKEN_LEN;

/// The default `NOX_MAX_INFLIGHT`, per core.
pub const MAX_INFLIGHT_PER_CORE: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RunNetwork {
    Deny,
    Allow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RunIsolation {
    /// POST /run serves only with every isolation layer in force.
    Strict,
    /// Runs with whatever layers this host gives (development only).
    Relaxed,
}

/// The uids commands run as, one per user: `first-last`, both included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UidRange {
    pub first: u32,
    pub last: u32,
}

impl UidRange {
    pub fn contains(&self, uid: u32) -> bool {
        (self.first..=self.last).contains(&uid)
    }
}

impl std::str::FromStr for UidRange {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!("{text:?} is not a uid range: expected first-last, e.g. 1900000000-1900065535")
        };
        let (first, last) = text.trim().split_once('-').ok_or_else(bad)?;
        let (first, last): (u32, u32) = (
            first.trim().parse().map_err(|_| bad())?,
            last.trim().parse().map_err(|_| bad())?,
        );
        // Not root, and not the invalid uid (u32::MAX is -1 to the kernel).
        if first == 0 || first > last || last == u32::MAX {
            return Err(bad());
        }
        Ok(UidRange { first, last })
    }
}

/// Where the server keeps its state and how it reaches PostgreSQL.
#[derive(Debug, Clone, clap::Args)]
pub struct StorageConfig {
    /// Directory for the embedded PostgreSQL cluster (`pg/`), the users'
    /// sandboxes and the audit spool.
    #[arg(long, env = "NOX_DATA_DIR", default_value = "./nox-data")]
    pub data_dir: PathBuf,

    /// PostgreSQL connection URL. When unset, Nox runs its own PostgreSQL
    /// from the system binaries with its data in <NOX_DATA_DIR>/pg.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<Secret>,

    /// Directory holding initdb, pg_ctl and postgres for the embedded
    /// cluster (default: search PATH, then /usr/lib/postgresql/*/bin).
    #[arg(long, env = "NOX_PG_BIN_DIR")]
    pub pg_bin_dir: Option<PathBuf>,

    /// Maximum number of pooled database connections.
    #[arg(long, env = "NOX_DB_POOL_SIZE", default_value_t = 16)]
    pub db_pool_size: usize,

    /// A streaming replica of the database, for the audit read endpoints
    /// (searches, export, statistics, summaries, the live stream's reads);
    /// they fall back to DATABASE_URL when it is down or lags. Pooled like
    /// DATABASE_URL (NOX_DB_POOL_SIZE connections).
    #[arg(long, env = "NOX_DATABASE_READ_URL", hide_env_values = true)]
    pub database_read_url: Option<Secret>,

    /// The most the read replica may lag, in milliseconds, for a read to be
    /// served there; a read past it goes to the primary.
    #[arg(long, env = "NOX_READ_MAX_LAG_MS", default_value_t = 5000)]
    pub read_max_lag_ms: u64,

    /// The Ed25519 key that signs audit checkpoints (64 hex digits; default
    /// <NOX_DATA_DIR>/audit-signing.key, generated with mode 0600 on first
    /// start).
    #[arg(long, env = "NOX_AUDIT_SIGNING_KEY_FILE")]
    pub audit_signing_key_file: Option<PathBuf>,

    /// Where signed checkpoints are appended (`checkpoints.log`) beside the
    /// public key (`public-key`), for shipping off the database host
    /// (default <NOX_DATA_DIR>/checkpoints).
    #[arg(long, env = "NOX_AUDIT_CHECKPOINT_DIR")]
    pub audit_checkpoint_dir: Option<PathBuf>,

    /// The users' workspaces (default <NOX_DATA_DIR>/sandboxes). Servers
    /// behind one balancer need it on a filesystem they all mount here.
    #[arg(long, env = "NOX_SANDBOX_DIR")]
    pub sandbox_dir: Option<PathBuf>,
}

impl StorageConfig {
    pub fn signing_key_file(&self) -> PathBuf {
        self.audit_signing_key_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("audit-signing.key"))
    }

    pub fn sandbox_dir(&self) -> PathBuf {
        self.sandbox_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("sandboxes"))
    }

    pub fn checkpoint_dir(&self) -> PathBuf {
        self.audit_checkpoint_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("checkpoints"))
    }

    /// The checkpoint signer (loading or generating its key).
    pub fn checkpointer(&self) -> anyhow::Result<nox_audit_store::checkpoints::Checkpointer> {
        Ok(nox_audit_store::checkpoints::Checkpointer::open(
            &self.signing_key_file(),
            &self.checkpoint_dir(),
        )?)
    }
}

/// The Nox API server.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "nox-server",
    version,
    about = "The Nox API server: per-user sandboxes with an audit trail in PostgreSQL.",
    long_about = None
)]
pub struct Config {
    /// Address to listen on.
    #[arg(long, env = "NOX_BIND_ADDR", default_value = "127.0.0.1")]
    pub bind_addr: IpAddr,

    /// Port to listen on (0 picks a free one).
    #[arg(long, env = "NOX_PORT", default_value_t = 8082)]
    pub port: u16,

    #[command(flatten)]
    pub storage: StorageConfig,

    /// Number of HTTP worker threads (default: one per core).
    #[arg(long, env = "NOX_WORKERS")]
    pub workers: Option<usize>,

    /// Blocking-pool threads per HTTP worker, for file work (default:
    /// actix's, 512 shared among the workers). A small pool such as 4 keeps
    /// its threads busy under load instead of waking a parked one per
    /// request (BENCHMARKS.md: cheap file reads 20-70 % faster unaudited,
    /// 12-30 % in buffered mode), but slow file operations then queue
    /// behind each other.
    #[arg(long, env = "NOX_BLOCKING_THREADS", value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub blocking_threads: Option<u32>,

    /// Log output format.
    #[arg(long, env = "NOX_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Do not apply pending migrations at start-up (run `nox-migrate up`).
    #[arg(long, env = "NOX_NO_MIGRATE")]
    pub no_migrate: bool,

    /// Token of the first admin, created on a start with no admin (at least
    /// 32 characters). When unset, one is generated, printed once and written
    /// to <NOX_DATA_DIR>/admin-token.
    #[arg(long, env = "NOX_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<Secret>,

    /// The older API's name for NOX_ADMIN_TOKEN, accepted when that is unset.
    #[arg(long, env = "NOX_API_TOKEN", hide_env_values = true, hide = true)]
    pub legacy_api_token: Option<Secret>,

    /// How long a resolved token is trusted before it is checked against the
    /// database again: the longest a revocation made on another server
    /// instance takes to apply (the instance that makes it applies it at once).
    #[arg(long, env = "NOX_AUTH_CACHE_TTL_MS", default_value_t = 4000)]
    pub auth_cache_ttl_ms: u64,

    /// Largest accepted upload to PUT /write, in MiB.
    #[arg(long, env = "NOX_MAX_UPLOAD_MB", default_value_t = 50)]
    pub max_upload_mb: u64,

    /// Free space, in MiB, kept on the data directory's filesystem (which
    /// also holds the embedded PostgreSQL and the audit spool): with less
    /// available, PUT /write and POST /run answer 507
    /// `insufficient_storage`; 0 turns the check off.
    #[arg(long, env = "NOX_MIN_FREE_MB", default_value_t = 1024)]
    pub min_free_mb: u64,

    /// Default time limit of POST /run, in seconds (a request may ask for
    /// 1 to 300).
    #[arg(long = "run-timeout-secs", env = "NOX_TIMEOUT", default_value_t = 20)]
    pub run_timeout_secs: u64,

    /// The uids commands run as, one per user, recorded in the database
    /// (`first-last`; each user's gid is its uid). No other user of the
    /// host may hold one; the server's and the embedded PostgreSQL's uids
    /// are refused. The default lies in a span systemd leaves unused.
    #[arg(
        long,
        env = "NOX_RUN_UID_RANGE",
        default_value = "1900000000-1900065535"
    )]
    pub run_uid_range: UidRange,

    /// `strict` (default): POST /run serves only while every isolation layer
    /// is in force (namespaces, a uid of its own, Landlock, memory and
    /// process cgroups), else 503 `sandbox_unavailable`; `relaxed`: runs
    /// with what this host gives (development; logged loudly at start).
    #[arg(long, env = "NOX_RUN_ISOLATION", value_enum, default_value = "strict")]
    pub run_isolation: RunIsolation,

    /// Memory limit of one run, in MiB: the user's tier limit, capped by this.
    #[arg(long, env = "NOX_RUN_MAX_MEMORY_MB", default_value_t = 2048)]
    pub run_max_memory_mb: u64,

    /// `deny` (default): commands get an empty network namespace; `allow`:
    /// the host's network.
    #[arg(long, env = "NOX_RUN_NETWORK", value_enum, default_value = "deny")]
    pub run_network: RunNetwork,

    /// Bytes of stdout and of stderr kept per run; the rest is discarded.
    #[arg(long, env = "NOX_RUN_OUTPUT_LIMIT", default_value_t = 1024 * 1024)]
    pub run_output_limit: usize,

    /// Runs at once over all users (default: two per core); each user may
    /// have two.
    #[arg(long, env = "NOX_RUN_MAX_CONCURRENT")]
    pub run_max_concurrent: Option<usize>,

    /// The `nox-sandbox-exec` launcher (default: next to this executable).
    #[arg(long, env = "NOX_SANDBOX_EXEC")]
    pub sandbox_exec: Option<PathBuf>,

    /// cgroup v2 only (`/sys/fs/cgroup` is the unified hierarchy): the
    /// cgroup directory runs' cgroups go under, made if missing. From a
    /// systemd unit with `Delegate=yes`, the unit's own cgroup, e.g.
    /// /sys/fs/cgroup/system.slice/nox.service (deploy/nox.service): the
    /// server then moves itself into <dir>/server and runs go to
    /// <dir>/runs/<run id>. The `memory` and `pids` controllers must be
    /// available there, or runs lack those limits.
    #[arg(long, env = "NOX_CGROUP_PARENT", default_value = nox_sandbox::cgroup::DEFAULT_PARENT)]
    pub cgroup_parent: PathBuf,

    /// Requests per minute per user (authenticated requests); 0: no limit.
    #[arg(long, env = "NOX_RATE_LIMIT_PER_USER", default_value_t = 600)]
    pub rate_limit_per_user: u32,

    /// Burst allowed above the per-user rate.
    #[arg(long, env = "NOX_RATE_LIMIT_BURST_PER_USER", default_value_t = 100)]
    pub rate_limit_burst_per_user: u32,

    /// Requests per minute per client address for unauthenticated or
    /// failed-authentication requests; 0: no limit.
    #[arg(long, env = "NOX_RATE_LIMIT_PER_IP", default_value_t = 60)]
    pub rate_limit_per_ip: u32,

    /// Burst allowed above the per-address rate.
    #[arg(long, env = "NOX_RATE_LIMIT_BURST_PER_IP", default_value_t = 10)]
    pub rate_limit_burst_per_ip: u32,

    /// Requests in flight at once, all workers together (a request counts
    /// until its response body is sent); beyond, 503 with Retry-After: 1
    /// before any other work, each still audited. /health and /metrics do
    /// not count. Default: 256 per core.
    #[arg(long, env = "NOX_MAX_INFLIGHT", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_inflight: Option<u32>,

    /// When set, GET /metrics requires `Authorization: Bearer <this token>`.
    #[arg(long, env = "NOX_METRICS_TOKEN", hide_env_values = true)]
    pub metrics_token: Option<Secret>,

    /// Distinct `user_id` label values in the metrics before the rest are
    /// `other` (0: every value is `all`).
    #[arg(long, env = "NOX_METRICS_MAX_USERS", default_value_t = 1000)]
    pub metrics_max_users: usize,

    /// Seconds between signed checkpoints of the audit hash chains while rows
    /// arrive (one is also written at graceful shutdown).
    #[arg(long, env = "NOX_AUDIT_CHECKPOINT_SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub audit_checkpoint_secs: u64,

    /// Seconds between continuous verifications of the audit hash chains
    /// (the first at start): each chain from the last checkpoint a pass
    /// verified to its head, one server at a time; results in
    /// GET /admin/audit/status. 0: this server never verifies.
    #[arg(long, env = "NOX_AUDIT_VERIFY_SECS", default_value_t = 300)]
    pub audit_verify_secs: u64,

    /// Audit exports that may run at once (each holds a database connection
    /// while it streams); more get 503.
    #[arg(long, env = "NOX_EXPORT_CONCURRENCY", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub export_concurrency: u32,

    /// Live audit streams (`/admin/audit/stream`) open at once; more get
    /// 503. Each holds a request slot (`NOX_MAX_INFLIGHT`) while open.
    #[arg(long, env = "NOX_AUDIT_STREAM_MAX", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub audit_stream_max: u32,

    /// Seconds a live stream's client may leave its full buffer unread
    /// before it is cut off with a `lagged` event.
    #[arg(long, env = "NOX_AUDIT_STREAM_STALL_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub audit_stream_stall_secs: u64,

    /// `durable`: a response is sent only once its audit record is committed
    /// (or spooled to disk); `buffered`: responses do not wait for the
    /// record; `off`: no audit records at all (benchmarks only).
    #[arg(long, env = "NOX_AUDIT_MODE", default_value = "durable")]
    pub audit_mode: AuditMode,

    /// Proxies (addresses or CIDRs, comma-separated) whose X-Forwarded-For
    /// header is believed for the audit trail's client address.
    #[arg(long, env = "NOX_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<IpNet>,

    /// Seconds without activity after which an audit session
    /// ends and the next request opens a new one.
    #[arg(long, env = "NOX_SESSION_IDLE_SECS", default_value_t = 1800)]
    pub session_idle_secs: u64,

    /// Paths that are not audited (comma-separated, exact); the console's
    /// files (`/console`, `/console/*.js`, …) are never audited besides.
    #[arg(
        long,
        env = "NOX_AUDIT_SKIP_PATHS",
        value_delimiter = ',',
        default_value = "/health,/metrics"
    )]
    pub audit_skip_paths: Vec<String>,

    /// Seconds to let in-flight requests finish after SIGTERM or SIGINT.
    #[arg(long, env = "NOX_SHUTDOWN_TIMEOUT_SECS", default_value_t = 30)]
    pub shutdown_timeout_secs: u64,
}

impl Config {
    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_secs(self.shutdown_timeout_secs)
    }

    /// The first admin's token, if the operator gave one; refused when
    /// shorter than 32 characters, or when it could never be sent as a
    /// bearer token (not 32 to 512 printable ASCII characters without
    /// spaces: `nox_auth::token::is_well_formed`).
    pub fn admin_token(&self) -> anyhow::Result<Option<&Secret>> {
        let token = self.admin_token.as_ref().or(self.legacy_api_token.as_ref());
        if let Some(token) = token {
            if token.expose().chars().count() < MIN_ADMIN_TOKEN_CHARS {
                anyhow::bail!(
                    "NOX_ADMIN_TOKEN must be at least {MIN_ADMIN_TOKEN_CHARS} characters long"
                );
            }
            if !nox_auth::token::is_well_formed(token.expose()) {
                anyhow::bail!(
                    "NOX_ADMIN_TOKEN must be at most {} characters, each printable ASCII other than space",
                    nox_auth::token::MAX_TOKEN_LEN
                );
            }
        }
        Ok(token)
    }

    /// `NOX_MAX_INFLIGHT`, or its default: 256 per core. Nox serves tens of
    /// thousands of short requests a second with a few dozen in flight per
    /// core (BENCHMARKS.md measures up to 128 connections on two cores), so
    /// the default never sheds a load the machine can serve, and leaves
    /// room for slow ones (uploads, downloads, runs); it bounds what a flood
    /// can pile up in memory and in front of the database pool.
    pub fn max_inflight(&self) -> usize {
        match self.max_inflight {
            Some(max) => max as usize,
            None => {
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
                MAX_INFLIGHT_PER_CORE * cores
            }
        }
    }

    pub fn auth_cache_ttl(&self) -> Duration {
        Duration::from_millis(self.auth_cache_ttl_ms)
    }

    /// `NOX_AUDIT_VERIFY_SECS`, none when 0 (off).
    pub fn audit_verify_interval(&self) -> Option<Duration> {
        (self.audit_verify_secs > 0).then(|| Duration::from_secs(self.audit_verify_secs))
    }

    /// A configuration for tests and embedding: defaults, a free port and
    /// the given database.
    pub fn for_database(database_url: &str, data_dir: PathBuf) -> Config {
        let mut config = Config::parse_from(["nox-server"]);
        config.port = 0;
        config.storage.data_dir = data_dir;
        config.storage.database_url = Some(Secret::new(database_url));
        config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_documented_ones() {
        let config = Config::try_parse_from(["nox-server"]).expect("defaults parse");
        assert_eq!(config.port, 8082);
        assert_eq!(config.bind_addr.to_string(), "127.0.0.1");
        assert_eq!(config.storage.data_dir, PathBuf::from("./nox-data"));
        assert_eq!(config.log_format, LogFormat::Text);
        assert!(!config.no_migrate);
        assert_eq!(config.cgroup_parent, PathBuf::from("/sys/fs/cgroup/nox"));
        assert!(config.storage.database_read_url.is_none());
        assert_eq!(config.storage.read_max_lag_ms, 5000);
        assert_eq!(
            config.audit_verify_interval(),
            Some(Duration::from_secs(300))
        );
    }

    #[test]
    fn a_verification_interval_of_zero_turns_it_off() {
        let config =
            Config::try_parse_from(["nox-server", "--audit-verify-secs", "0"]).expect("parses");
        assert_eq!(config.audit_verify_interval(), None);
    }

    #[test]
    fn uid_ranges_exclude_root_and_the_invalid_uid() {
        let parse = |value: &str| {
            Config::try_parse_from(["nox-server", "--run-uid-range", value])
                .map(|config| config.run_uid_range)
        };
        assert_eq!(
            parse(" 5000 - 5009 ").expect("a range"),
            UidRange {
                first: 5000,
                last: 5009
            }
        );
        assert_eq!(
            Config::try_parse_from(["nox-server"])
                .expect("defaults")
                .run_isolation,
            RunIsolation::Strict
        );
        for bad in ["0-10", "10-5", "5", "a-b", "1-4294967295", "-1-5", ""] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn blocking_threads_must_be_at_least_one() {
        let parse = |value: &str| {
            Config::try_parse_from(["nox-server", "--blocking-threads", value])
                .map(|config| config.blocking_threads)
        };
        assert_eq!(parse("4").expect("4 threads"), Some(4));
        assert!(parse("0").is_err());
        assert!(parse("1025").is_err());
    }

    #[test]
    fn max_inflight_must_be_at_least_one_and_defaults_to_the_machine() {
        let parse = |value: &str| {
            Config::try_parse_from(["nox-server", "--max-inflight", value])
                .map(|config| config.max_inflight())
        };
        assert_eq!(parse("2").expect("2"), 2);
        assert!(parse("0").is_err(), "0 would refuse every request");
        let default = Config::try_parse_from(["nox-server"]).expect("defaults");
        assert!(default.max_inflight() >= MAX_INFLIGHT_PER_CORE);
        assert_eq!(default.max_inflight() % MAX_INFLIGHT_PER_CORE, 0);
    }

    #[test]
    fn admin_tokens_that_could_never_be_sent_are_refused() {
        let token = |value: &str| {
            Config::try_parse_from(["nox-server", "--admin-token", value])
                .expect("parses")
                .admin_token()
                .map(|token| token.is_some())
        };
        assert!(token("an-operator-chosen-secret-of-32+chars").expect("fine"));
        assert!(token("an operator chosen secret with spaces").is_err());
        assert!(token(&"x".repeat(513)).is_err());
    }

    #[test]
    fn database_urls_are_redacted_in_debug_output() {
        let config = Config::try_parse_from([
            "nox-server",
            "--database-url",
            "postgres://nox:s3cret@db/nox",
            "--database-read-url",
            "postgres://nox:r3plica@replica/nox",
        ])
        .expect("parses");
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("s3cret") && !shown.contains("r3plica"),
            "{shown}"
        );
    }

    #[test]
    fn short_admin_tokens_are_refused_and_the_old_name_is_accepted() {
        let short =
            Config::try_parse_from(["nox-server", "--admin-token", "too-short"]).expect("parses");
        assert!(short.admin_token().is_err());
        let legacy = Config::try_parse_from([
            "nox-server",
            "--legacy-api-token",
            "0123456789abcdef0123456789abcdef",
        ])
        .expect("parses");
        assert_eq!(
            legacy
                .admin_token()
                .expect("long enough")
                .map(Secret::expose),
            Some("0123456789abcdef0123456789abcdef")
        );
    }

    #[test]
    fn bad_values_are_rejected() {
        assert!(Config::try_parse_from(["nox-server", "--port", "70000"]).is_err());
        assert!(Config::try_parse_from(["nox-server", "--log-format", "xml"]).is_err());
    }
}
