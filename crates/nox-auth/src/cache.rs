//! Resolving bearer tokens without a database round trip per request.
//!
//! A resolved token is trusted for `ttl` (default 4 s). After that the next
//! request re-checks it against the database (which also records
//! `last_used_at`). Changes are applied at once by forgetting entries: the
//! instance that makes a change does so itself, the others when its notice
//! reaches them (`nox_api::admin_changes`); `ttl` bounds how long a change
//! whose notice was lost goes unnoticed. One request at a time
//! re-checks a token: requests arriving meanwhile use the cached caller
//! instead of each waiting for a check of their own (a busy token would
//! otherwise send a burst of checks, and of `last_used_at` updates queued
//! on one row, to the database every `ttl`, stalling all its requests). A
//! check that has not finished within `ttl` no longer holds the others
//! back. While the database is unreachable, tokens already cached stay
//! valid (nothing can be revoked without the database) and unknown tokens
//! cannot be checked.
//!
//! A token the database refused (unknown, revoked, expired, or its user
//! inactive) is refused from memory for `ttl` too, so a client retrying a
//! revoked or mistyped token costs no database round trip per request. At
//! most `MAX_REJECTED` such tokens are remembered: when the set is full of
//! refusals younger than `ttl` (a flood of distinct random tokens), the
//! older half is forgotten, so memory stays bounded and the sweep's cost is
//! shared by the next `MAX_REJECTED / 2` refusals. A bearer value that is
//! not a well-formed token ([`token::is_well_formed`]) is refused without
//! being hashed or looked up.
//!
//! [`Authenticator::cached`] answers from memory alone and says when a
//! database check is needed, so a caller can decide what to do first (Nox
//! charges the per-address rate limit before checking a token this instance
//! has never accepted; see `nox_api::auth`). [`Authenticator::authenticate`]
//! is the two steps in one.

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

/// What memory alone says about a bearer token ([`Authenticator::cached`]).
#[derive(Debug)]
pub enum Lookup {
    /// Accepted within `ttl`, or being re-checked by another request: the
    /// caller, with no database work.
    Known(Caller),
    /// Not a well-formed token, or refused by the database within `ttl`.
    Refused,
    /// A database check is needed; [`Check::run`] makes it.
    Check(Check),
}

/// A database check of one token, still to be made.
#[derive(Debug)]
pub struct Check {
    cache: Arc<Cache>,
    hash: [u8; 32],
    /// The cached caller of a stale entry this check re-validates (claimed
    /// for it: other requests use the cached caller meanwhile).
    stale: Option<Caller>,
}

impl Check {
    /// Whether this instance accepted the token before and only its periodic
    /// re-check is due (at most one per token per `ttl`), as opposed to a
    /// token it has never accepted.
    pub fn is_known_token(&self) -> bool {
        self.stale.is_some()
    }

    /// Checks the token against the database. While the database is
    /// unreachable, a stale entry's caller is still accepted.
    pub async fn run(self, pool: &Pool) -> Result<Caller, AuthFailure> {
        // The check is a task of its own: if this request is dropped (its
        // client went away), the check still completes and settles the
        // entry, instead of leaving it claimed for a whole `ttl`.
        let Check { cache, hash, stale } = self;
        let pool = pool.clone();
        match tokio::spawn(async move { cache.check(&pool, hash).await }).await {
            Ok(Ok(Some(caller))) => Ok(caller),
            Ok(Ok(None)) => Err(AuthFailure::Invalid),
            // The check stays marked as started: the next one is made `ttl`
            // from now, not by every request meanwhile.
            Ok(Err(())) | Err(_) => stale.ok_or(AuthFailure::Unavailable),
        }
    }
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
    /// Database checks made (for tests and diagnostics).
    checks: AtomicU64,
}

impl Authenticator {
    pub fn new(ttl: Duration) -> Self {
        Authenticator(Arc::new(Cache {
            ttl,
            entries: Mutex::new(HashMap::new()),
            rejected: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
            checks: AtomicU64::new(0),
        }))
    }

    /// What memory alone says about `token`: never touches the database.
    /// A stale entry is claimed for re-checking by the first request that
    /// finds it (the others get [`Lookup::Known`] meanwhile).
    pub fn cached(&self, token: &str) -> Lookup {
        if !token::is_well_formed(token) {
            return Lookup::Refused;
        }
        let hash = token::hash(token);
        let stale = match self.0.cached(&hash) {
            Some(Cached::Fresh(caller) | Cached::BeingChecked(caller)) => {
                return Lookup::Known(caller);
            }
            Some(Cached::Stale(caller)) => Some(caller),
            None if self.0.recently_rejected(&hash) => return Lookup::Refused,
            None => None,
        };
        Lookup::Check(Check {
            cache: Arc::clone(&self.0),
            hash,
            stale,
        })
    }

    /// Resolves `token`: from memory when it can, else with a database
    /// check.
    pub async fn authenticate(&self, pool: &Pool, token: &str) -> Result<Caller, AuthFailure> {
        match self.cached(token) {
            Lookup::Known(caller) => Ok(caller),
            Lookup::Refused => Err(AuthFailure::Invalid),
            Lookup::Check(check) => check.run(pool).await,
        }
    }

    /// How many database checks of tokens this authenticator has made.
    pub fn database_checks(&self) -> u64 {
        self.0.checks.load(Ordering::Relaxed)
    }

    /// Forgets every cached token of `user_id` (after a change of its role,
    /// tier or activity).
    pub fn forget_user(&self, user_id: Uuid) {
        self.0.generation.fetch_add(1, Ordering::SeqCst);
        self.0
            .lock()
            .retain(|_, entry| entry.caller.user_id != user_id);
        // Refused tokens are not known by user: after a reactivation, its
        // tokens must work here at once.
        self.0.lock_rejected().clear();
    }

    /// Forgets one token (after revoking it).
    pub fn forget_token(&self, token_id: Uuid) {
        self.0.generation.fetch_add(1, Ordering::SeqCst);
        self.0
            .lock()
            .retain(|_, entry| entry.caller.token_id != token_id);
    }

    /// Forgets every token, accepted or refused (when changes may have
    /// been missed): each is checked against the database again.
    pub fn forget_all(&self) {
        self.0.generation.fetch_add(1, Ordering::SeqCst);
        self.0.lock().clear();
        self.0.lock_rejected().clear();
    }
}

impl Cache {
    /// Checks a token against the database and settles its entries.
    async fn check(&self, pool: &Pool, hash: [u8; 32]) -> Result<Option<Caller>, ()> {
        self.checks.fetch_add(1, Ordering::Relaxed);
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
        if rejected.len() >= MAX_REJECTED {
            // Full of recent refusals: a flood of distinct tokens. Forget the
            // older half (at least), so the newest are remembered and the
            // next sweep is `MAX_REJECTED / 2` refusals away.
            let mut times: Vec<Instant> = rejected.values().copied().collect();
            let middle = times.len() / 2;
            let (_, median, _) = times.select_nth_unstable(middle);
            let median = *median;
            rejected.retain(|_, at| *at > median);
        }
        rejected.insert(hash, Instant::now());
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
    fn refused_tokens_remembered_are_bounded_and_the_newest_are_kept() {
        let authenticator = Authenticator::new(Duration::from_secs(60));
        let cache = &authenticator.0;
        let mut largest = 0;
        let mut last = [0u8; 32];
        // A flood of 20,000 distinct random (unknown) tokens, each refused.
        for _ in 0..2 * MAX_REJECTED {
            let token = format!("nox_{}", hex::encode(rand_bytes()));
            last = token::hash(&token);
            cache.reject(last);
            largest = largest.max(cache.lock_rejected().len());
            assert!(cache.recently_rejected(&last), "the newest is remembered");
        }
        assert!(largest <= MAX_REJECTED, "{largest}");
        assert!(cache.recently_rejected(&last));
    }

    fn rand_bytes() -> [u8; 32] {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).expect("random");
        bytes
    }

    #[test]
    fn forgetting_all_forgets_accepted_and_refused_tokens() {
        let authenticator = Authenticator::new(Duration::from_secs(300));
        let cache = &authenticator.0;
        let (accepted, refused) = ([1u8; 32], [2u8; 32]);
        cache.insert(accepted, caller());
        cache.reject(refused);
        let generation = cache.generation.load(Ordering::SeqCst);
        authenticator.forget_all();
        assert!(cache.cached(&accepted).is_none());
        assert!(!cache.recently_rejected(&refused));
        assert!(
            cache.generation.load(Ordering::SeqCst) > generation,
            "a check under way does not cache what it read before"
        );
    }

    #[test]
    fn malformed_tokens_are_refused_from_memory() {
        let authenticator = Authenticator::new(Duration::from_secs(60));
        for junk in [
            "x",
            "short-token",
            &"y".repeat(4096),
            "é".repeat(40).as_str(),
        ] {
            assert!(matches!(authenticator.cached(junk), Lookup::Refused));
        }
        // A well-formed token nobody has seen needs a check.
        let token = format!("nox_{}", hex::encode(rand_bytes()));
        match authenticator.cached(&token) {
            Lookup::Check(check) => assert!(!check.is_known_token()),
            other => panic!("{other:?}"),
        }
        assert_eq!(authenticator.database_checks(), 0);
    }
}
