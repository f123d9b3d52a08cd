//! Resolving bearer tokens without a database round trip per request.
//!
//! A resolved token is trusted for `ttl` (default 4 s). After that the next
//! request re-checks it against the database (which also records
//! `last_used_at`), so a revocation or deactivation made on another server
//! instance takes effect within `ttl`; the instance that makes the change
//! drops its entries at once. While the database is unreachable, tokens
//! already cached stay valid (nothing can be revoked without the database)
//! and unknown tokens cannot be checked.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use uuid::Uuid;

use crate::model::Caller;
use crate::store;
use crate::token;

/// Entries not validated for this long are pruned when the cache is large.
const PRUNE_AFTER: Duration = Duration::from_secs(300);
const PRUNE_WHEN_LARGER_THAN: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// Unknown, revoked or expired token, or an inactive user.
    Invalid,
    /// The token could not be checked: the database is unreachable.
    Unavailable,
}

#[derive(Debug)]
struct Entry {
    caller: Caller,
    validated_at: Instant,
}

#[derive(Debug)]
pub struct Authenticator {
    ttl: Duration,
    entries: Mutex<HashMap<[u8; 32], Entry>>,
}

impl Authenticator {
    pub fn new(ttl: Duration) -> Self {
        Authenticator {
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    pub async fn authenticate(&self, pool: &Pool, token: &str) -> Result<Caller, AuthFailure> {
        let hash = token::hash(token);
        let cached = self.cached(&hash);
        if let Some((caller, true)) = &cached {
            return Ok(caller.clone());
        }
        match store::resolve_token(pool, &hash).await {
            Ok(Some(caller)) => {
                self.insert(hash, caller.clone());
                Ok(caller)
            }
            Ok(None) => {
                self.lock().remove(&hash);
                Err(AuthFailure::Invalid)
            }
            Err(error) => {
                tracing::warn!(%error, "cannot check a token against the database");
                match cached {
                    Some((caller, _stale)) => Ok(caller),
                    None => Err(AuthFailure::Unavailable),
                }
            }
        }
    }

    /// Forgets every cached token of `user_id` (after a role change or
    /// deactivation on this instance).
    pub fn forget_user(&self, user_id: Uuid) {
        self.lock()
            .retain(|_, entry| entry.caller.user_id != user_id);
    }

    /// Forgets one token (after revoking it on this instance).
    pub fn forget_token(&self, token_id: Uuid) {
        self.lock()
            .retain(|_, entry| entry.caller.token_id != token_id);
    }

    /// The cached caller and whether it is still fresh.
    fn cached(&self, hash: &[u8; 32]) -> Option<(Caller, bool)> {
        self.lock().get(hash).map(|entry| {
            (
                entry.caller.clone(),
                entry.validated_at.elapsed() < self.ttl,
            )
        })
    }

    fn insert(&self, hash: [u8; 32], caller: Caller) {
        let mut entries = self.lock();
        if entries.len() > PRUNE_WHEN_LARGER_THAN {
            entries.retain(|_, entry| entry.validated_at.elapsed() < PRUNE_AFTER);
        }
        entries.insert(
            hash,
            Entry {
                caller,
                validated_at: Instant::now(),
            },
        );
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Entry>> {
        // A panic while holding this lock cannot leave the map inconsistent.
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
