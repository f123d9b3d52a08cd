//! Resolving bearer tokens without a database round trip per request.
//!
//! A resolved token is trusted for `ttl` (default 4 s). After that the next
//! request re-checks it against the database (which also records
//! `last_used_at`), so a revocation or deactivation made on another server
//! instance takes effect within `ttl` plus one check; the instance that
//! makes the change drops its entries at once. One request at a time
//! re-checks a token: requests arriving meanwhile use the cached caller
//! instead of each waiting for a check of their own (a busy token would
//! otherwise send a burst of checks, and of `last_used_at` updates queued
//! on one row, to the database every `ttl`, stalling all its requests). A
//! check that has not finished within `ttl` no longer holds the others
//! back. While the database is unreachable, tokens already cached stay
//! valid (nothing can be revoked without the database) and unknown tokens
//! cannot be checked.
//!
//! A token the database refused is refused from memory for `ttl` too, so a
//! client retrying a revoked or mistyped token costs no database round trip
//! per request (identity is resolved before the rate limits apply). At
//! most `MAX_REJECTED` such tokens are remembered; a flood of distinct
//! random tokens still costs a check each.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use uuid::Uuid;

use crate::model::Caller;
use crate::store;
use crate::token;

/// Entries not validated for this long are pruned when the cache is large.
const PRUNE_AFTER: Duration = Duration::from_secs(300);
const PRUNE_WHEN_LARGER_THAN: usize = 10_000;
/// Refused tokens remembered at most.
const MAX_REJECTED: usize = 10_000;

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
    /// When a request began re-checking this stale entry.
    check_started: Option<Instant>,
}

/// What the cache knows about a token.
#[derive(Debug)]
enum Cached {
    /// Checked within `ttl`.
    Fresh(Caller),
    /// Stale, and another request is re-checking it.
    BeingChecked(Caller),
    /// Stale: this request re-checks it.
    Stale(Caller),
}

/// Resolves tokens through a per-instance cache; cheap to clone (shared).
#[derive(Debug, Clone)]
pub struct Authenticator(Arc<Cache>);

#[derive(Debug)]
struct Cache {
    ttl: Duration,
    entries: Mutex<HashMap<[u8; 32], Entry>>,
    /// Token hashes the database refused, and when.
    rejected: Mutex<HashMap<[u8; 32], Instant>>,
    /// Bumped whenever entries are forgotten: a check that read the
    /// database before a revocation here must not cache what it read.
    generation: AtomicU64,
}

impl Authenticator {
    pub fn new(ttl: Duration) -> Self {
        Authenticator(Arc::new(Cache {
            ttl,
            entries: Mutex::new(HashMap::new()),
            rejected: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
        }))
    }

    pub async fn authenticate(&self, pool: &Pool, token: &str) -> Result<Caller, AuthFailure> {
        let hash = token::hash(token);
        let cached = match self.0.cached(&hash) {
            Some(Cached::Fresh(caller) | Cached::BeingChecked(caller)) => return Ok(caller),
            Some(Cached::Stale(caller)) => Some(caller),
            None if self.0.recently_rejected(&hash) => return Err(AuthFailure::Invalid),
            None => None,
        };
        // The check is a task of its own: if this request is dropped (its
        // client went away), the check still completes and settles the
        // entry, instead of leaving it claimed for a whole `ttl`.
        let cache = Arc::clone(&self.0);
        let pool = pool.clone();
        match tokio::spawn(async move { cache.check(&pool, hash).await }).await {
            Ok(Ok(Some(caller))) => Ok(caller),
            Ok(Ok(None)) => Err(AuthFailure::Invalid),
            // The check stays marked as started: the next one is made `ttl`
            // from now, not by every request meanwhile.
            Ok(Err(())) | Err(_) => cached.ok_or(AuthFailure::Unavailable),
        }
    }

    /// Forgets every cached token of `user_id` (after a role change or
    /// deactivation on this instance).
    pub fn forget_user(&self, user_id: Uuid) {
        self.0.generation.fetch_add(1, Ordering::SeqCst);
        self.0
            .lock()
            .retain(|_, entry| entry.caller.user_id != user_id);
        // Refused tokens are not known by user: after a reactivation, its
        // tokens must work here at once.
        self.0.lock_rejected().clear();
    }

    /// Forgets one token (after revoking it on this instance).
    pub fn forget_token(&self, token_id: Uuid) {
        self.0.generation.fetch_add(1, Ordering::SeqCst);
        self.0
            .lock()
            .retain(|_, entry| entry.caller.token_id != token_id);
    }
}

impl Cache {
    /// Checks a token against the database and settles its entries.
    async fn check(&self, pool: &Pool, hash: [u8; 32]) -> Result<Option<Caller>, ()> {
        let generation = self.generation.load(Ordering::SeqCst);
        match store::resolve_token(pool, &hash).await {
            Ok(Some(caller)) => {
                if self.generation.load(Ordering::SeqCst) == generation {
                    self.insert(hash, caller.clone());
                } else {
                    // Something was forgotten meanwhile: what was read may
                    // predate it, so the next request checks again.
                    self.lock().remove(&hash);
                }
                Ok(Some(caller))
            }
            Ok(None) => {
                self.lock().remove(&hash);
                self.reject(hash);
                Ok(None)
            }
            Err(error) => {
                tracing::warn!(%error, "cannot check a token against the database");
                Err(())
            }
        }
    }

    /// The cached caller, if any; a stale entry is claimed for re-checking
    /// by the first request that finds it.
    fn cached(&self, hash: &[u8; 32]) -> Option<Cached> {
        let mut entries = self.lock();
        let entry = entries.get_mut(hash)?;
        let caller = entry.caller.clone();
        if entry.validated_at.elapsed() < self.ttl {
            return Some(Cached::Fresh(caller));
        }
        if entry
            .check_started
            .is_some_and(|started| started.elapsed() < self.ttl)
        {
            return Some(Cached::BeingChecked(caller));
        }
        entry.check_started = Some(Instant::now());
        Some(Cached::Stale(caller))
    }

    fn recently_rejected(&self, hash: &[u8; 32]) -> bool {
        self.lock_rejected()
            .get(hash)
            .is_some_and(|at| at.elapsed() < self.ttl)
    }

    fn reject(&self, hash: [u8; 32]) {
        let mut rejected = self.lock_rejected();
        if rejected.len() >= MAX_REJECTED {
            rejected.retain(|_, at| at.elapsed() < self.ttl);
        }
        if rejected.len() < MAX_REJECTED {
            rejected.insert(hash, Instant::now());
        }
    }

    fn insert(&self, hash: [u8; 32], caller: Caller) {
        self.lock_rejected().remove(&hash);
        let mut entries = self.lock();
        if entries.len() > PRUNE_WHEN_LARGER_THAN {
            entries.retain(|_, entry| entry.validated_at.elapsed() < PRUNE_AFTER);
        }
        entries.insert(
            hash,
            Entry {
                caller,
                validated_at: Instant::now(),
                check_started: None,
            },
        );
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Entry>> {
        // A panic while holding this lock cannot leave the map inconsistent.
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn lock_rejected(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Instant>> {
        self.rejected
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Role, Tier};

    fn caller() -> Caller {
        Caller {
            user_id: Uuid::now_v7(),
            name: "alice".into(),
            role: Role::User,
            tier: Tier::Free,
            token_id: Uuid::now_v7(),
        }
    }

    #[test]
    fn one_request_at_a_time_rechecks_a_stale_token() {
        let authenticator = Authenticator::new(Duration::from_millis(300));
        let cache = &authenticator.0;
        let hash = [7u8; 32];
        assert!(cache.cached(&hash).is_none());
        cache.insert(hash, caller());
        assert!(matches!(cache.cached(&hash), Some(Cached::Fresh(_))));

        std::thread::sleep(Duration::from_millis(350));
        assert!(matches!(cache.cached(&hash), Some(Cached::Stale(_))));
        for _ in 0..3 {
            assert!(
                matches!(cache.cached(&hash), Some(Cached::BeingChecked(_))),
                "others use the cached caller while the first request checks"
            );
        }
        // The check completed: fresh again.
        cache.insert(hash, caller());
        assert!(matches!(cache.cached(&hash), Some(Cached::Fresh(_))));

        // A check that never completes (its request was dropped) holds the
        // others back for one ttl only.
        std::thread::sleep(Duration::from_millis(350));
        assert!(matches!(cache.cached(&hash), Some(Cached::Stale(_))));
        std::thread::sleep(Duration::from_millis(350));
        assert!(matches!(cache.cached(&hash), Some(Cached::Stale(_))));
    }

    #[test]
    fn a_refused_token_is_refused_from_memory_for_one_ttl() {
        let authenticator = Authenticator::new(Duration::from_millis(300));
        let cache = &authenticator.0;
        let hash = [9u8; 32];
        assert!(!cache.recently_rejected(&hash));
        cache.reject(hash);
        assert!(cache.recently_rejected(&hash));
        std::thread::sleep(Duration::from_millis(350));
        assert!(
            !cache.recently_rejected(&hash),
            "checked against the database again after ttl"
        );
        // Accepted later (an operator-chosen token created meanwhile).
        cache.reject(hash);
        cache.insert(hash, caller());
        assert!(!cache.recently_rejected(&hash));
    }

    #[test]
    fn refused_tokens_remembered_are_bounded() {
        let authenticator = Authenticator::new(Duration::from_secs(60));
        let cache = &authenticator.0;
        for i in 0..MAX_REJECTED + 10 {
            let mut hash = [0u8; 32];
            hash[..8].copy_from_slice(&(i as u64).to_le_bytes());
            cache.reject(hash);
        }
        assert_eq!(cache.lock_rejected().len(), MAX_REJECTED);
    }
}
