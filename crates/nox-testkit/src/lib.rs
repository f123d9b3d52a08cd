//! Test support for Nox: a fresh, migrated PostgreSQL database per test
//! ([`TestDb`]) and the real app served in-process on a random port
//! ([`spawn_app`]).
//!
//! The PostgreSQL server is chosen once per test process:
//! 1. `DATABASE_URL`, when set (its role needs `CREATEDB`);
//! 2. else a server answering on `127.0.0.1:5432` as `postgres`;
//! 3. else a throwaway cluster started from the system binaries, which
//!    shuts down when the test process exits.
//!
//! Each test database is cloned from a template database that has every
//! migration applied (`CREATE DATABASE … TEMPLATE`, about 0.1 s), and is
//! dropped when the [`TestDb`] is.
//!
//! [`Replicated`] gives a test a database on a primary of the harness's own
//! with a streaming replica of it.

mod app;
mod replica;
mod server;

pub use app::{
    TEST_ADMIN_TOKEN, TestApp, TestUser, sandbox_launcher, send, spawn_app, spawn_app_on,
    spawn_app_with,
};
pub use replica::Replicated;
pub use server::{TestDb, conninfo};
