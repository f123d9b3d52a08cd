//! Integration tests against a real PostgreSQL and the real app over HTTP.

mod admin_audit;
mod audit;
mod audit_logs;
mod audit_stream;
mod chain;
mod console;
mod deploy;
mod disk;
mod dropped;
mod export;
mod files;
mod hostile;
mod hostile_files;
mod http_basics;
mod identity;
mod limits;
mod migrations;
mod multi_server_quotas;
mod quotas;
mod rollups;
mod run;
mod run_isolation;
mod run_leaks;
mod run_limits;
mod verification;
mod writer;
