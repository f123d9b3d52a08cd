//! Admin changes made on any server, in force on this one at once.
//!
//! Migration 0014's triggers announce each committed change of a token
//! (revoked, expired, deleted), of a user (role, tier, activity, name) or of
//! a user's quota overrides on [`CHANNEL`]. [`AdminChanges`] listens with a
//! connection of its own ([`nox_audit_store::listen`]) and applies each
//! notice: the token's or user's cached callers are forgotten (the next
//! request checks the database), and a user's overrides are read and put in
//! force. Notices are applied one at a time, in commit order, so an older
//! read of a user's overrides never replaces a newer one. When the
//! connection is re-established, notices may have been missed: every
//! cached token and override is dropped. The cache TTLs stay as the
//! fallback, for what was cached before the first connection listened
//! (the server's first moments) and for the time no connection listens.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use nox_audit_store::listen::{self, Connection, Listener};
use nox_auth::Authenticator;
use nox_quota::QuotaBook;
use uuid::Uuid;

/// The channel migration 0014's triggers notify.
pub const CHANNEL: &str = "nox_admin_change";

/// What a notice is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// A token was revoked, deleted, or changed what it stands for.
    Token { user: Uuid, token: Uuid },
    /// A user's role, tier, activity or name changed.
    User(Uuid),
    /// A user's quota overrides changed.
    Quota(Uuid),
}

/// The kinds of notices, as their payloads and the metric label name them.
pub const KINDS: [&str; 3] = ["token", "user", "quota"];

impl Change {
    /// `token <user> <token>`, `user <user>` or `quota <user>`; anything
    /// else is ignored.
    pub fn parse(payload: &str) -> Option<Change> {
        let id = |text: &str| Uuid::parse_str(text).ok();
        match payload.split(' ').collect::<Vec<_>>().as_slice() {
            ["token", user, token] => Some(Change::Token {
                user: id(user)?,
                token: id(token)?,
            }),
            ["user", user] => Some(Change::User(id(user)?)),
            ["quota", user] => Some(Change::Quota(id(user)?)),
            _ => None,
        }
    }

    /// Its kind, one of [`KINDS`].
    pub fn kind(self) -> &'static str {
        KINDS[self.index()]
    }

    fn index(self) -> usize {
        match self {
            Change::Token { .. } => 0,
            Change::User(_) => 1,
            Change::Quota(_) => 2,
        }
    }
}

/// The listener; clones share it. Closed at shutdown.
#[derive(Debug, Clone)]
pub struct AdminChanges {
    listener: Arc<Listener>,
    counts: Arc<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    connections: AtomicU64,
    /// Notices applied, by [`KINDS`].
    applied: [AtomicU64; 3],
}

/// What a session needs to apply notices.
#[derive(Debug, Clone)]
struct Appliers {
    authenticator: Authenticator,
    quotas: Arc<QuotaBook>,
    counts: Arc<Counts>,
}

impl AdminChanges {
    /// Listens with `pg_config` (reconnecting whenever the connection is
    /// lost). Call on the runtime that outlives the HTTP workers.
    pub fn start(
        pg_config: tokio_postgres::Config,
        authenticator: Authenticator,
        quotas: Arc<QuotaBook>,
    ) -> AdminChanges {
        let counts = Arc::new(Counts::default());
        let appliers = Appliers {
            authenticator,
            quotas,
            counts: Arc::clone(&counts),
        };
        let listener = listen::spawn(pg_config, &[CHANNEL], "admin changes", move |connection| {
            follow(connection, appliers.clone())
        });
        AdminChanges {
            listener: Arc::new(listener),
            counts,
        }
    }

    /// Stops listening (for every clone). For shutdown.
    pub fn close(&self) {
        self.listener.close();
    }

    /// Connections that listened so far (1 + reconnects), each counted once
    /// its caches were dropped.
    pub fn connections(&self) -> u64 {
        self.counts.connections.load(Ordering::SeqCst)
    }

    /// Notices of `kind` (one of [`KINDS`]) applied so far.
    pub fn applied(&self, kind: &str) -> u64 {
        KINDS
            .iter()
            .position(|known| *known == kind)
            .map_or(0, |i| self.counts.applied[i].load(Ordering::SeqCst))
    }
}

/// One connection's life (already listening): after a reconnect, drop what
/// may be stale; then apply each notice. Returns when the connection closes.
async fn follow(connection: Connection, appliers: Appliers) -> Result<(), tokio_postgres::Error> {
    let Connection {
        client: _client,
        mut notices,
        number,
    } = connection;
    if number > 1 {
        appliers.authenticator.forget_all();
        appliers.quotas.expire_overrides();
        crate::metrics::record_admin_changes_reconnect();
        tracing::info!("listening for admin changes again; cached tokens and quotas dropped");
    }
    appliers.counts.connections.fetch_add(1, Ordering::SeqCst);
    while let Some(note) = notices.recv().await {
        match Change::parse(note.payload()) {
            Some(change) => appliers.apply(change).await,
            None => tracing::warn!("ignored a malformed admin change notice"),
        }
    }
    Ok(())
}

impl Appliers {
    async fn apply(&self, change: Change) {
        match change {
            Change::Token { token, .. } => self.authenticator.forget_token(token),
            Change::User(user) => self.authenticator.forget_user(user),
            Change::Quota(user) => match self.quotas.read_overrides(user).await {
                // Installed again: a request's read that began before the
                // change, and ends after this one, must not install its
                // older overrides.
                Ok(overrides) => self.quotas.install_overrides(user, overrides),
                Err(error) => {
                    // The book reads them again within its TTL.
                    tracing::warn!(%error, "a user's changed quota overrides could not be read");
                    return;
                }
            },
        }
        self.counts.applied[change.index()].fetch_add(1, Ordering::SeqCst);
        crate::metrics::record_admin_change(change.kind());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notices_are_parsed_strictly() {
        let (user, token) = (Uuid::now_v7(), Uuid::now_v7());
        assert_eq!(
            Change::parse(&format!("token {user} {token}")),
            Some(Change::Token { user, token })
        );
        assert_eq!(
            Change::parse(&format!("user {user}")),
            Some(Change::User(user))
        );
        assert_eq!(
            Change::parse(&format!("quota {user}")),
            Some(Change::Quota(user))
        );
        for hostile in [
            String::new(),
            "token".into(),
            format!("token {user}"),
            format!("token {user} {token} {token}"),
            format!("user {user} {token}"),
            format!("user  {user}"),
            format!("quota {user} "),
            "user not-a-uuid".into(),
            format!("group {user}"),
        ] {
            assert_eq!(Change::parse(&hostile), None, "{hostile:?}");
        }
    }
}
