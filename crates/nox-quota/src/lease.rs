//! Leases: blocks of requests a server reserves in `quota_usage` for a
//! user's current UTC hour and day, so that servers sharing one database
//! admit together at most the user's limit without a database round trip
//! per request.
//!
//! A lease is one statement (`quota_lease`, migration 0012): it locks the
//! hour row, then the day row, grants [`grant`] units (never more than both
//! windows have left) and adds them to both rows. Requests then spend the
//! units in memory. So `quota_usage.requests` counts the requests used plus
//! those leased and not yet spent; it never exceeds the limit, whatever the
//! number of servers.
//!
//! Blocks shrink with what is left ([`block_size`]): near the limit a
//! server leases one request at a time. Unspent units go back (subtracted)
//! at the flush each second once the database has nothing left for their
//! user ([`must_give_back`]: another server may be refused), once they have
//! not been spent for [`LEASE_IDLE`], when a window ends, and at shutdown.
//! A server leases the next block when a quarter of a large one is left
//! ([`Lease::wants_refill`]), so a busy user's requests do not wait for it.
//! So a request is refused early only while other servers hold unspent
//! units, at most a block and a quarter each, for at most about a flush
//! interval (plus
//! [`EXHAUSTED_RECHECK`], which a refused server waits before it asks
//! again). Units a server keeps spending stay with it: a user's leases cost
//! a statement per block, not one per second.

use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::limits::Limits;

/// The most units one lease takes: a statement (~0.3 ms of PostgreSQL CPU
/// here) per 64 requests of a busy user.
pub const MAX_BLOCK: u64 = 64;
/// A lease takes this fraction of what is left (at least 1, at most
/// [`MAX_BLOCK`]): what servers hold unspent is a small part of the rest.
const BLOCK_DIVISOR: u64 = 16;
/// Blocks at least this large are refilled ahead ([`Lease::wants_refill`]).
const REFILL_MIN_BLOCK: u64 = 8;
/// Unspent units not spent for this long are given back by the next flush
/// (only tidiness: units that another server needs go back sooner, see
/// [`must_give_back`]). Shorter would cost users who send a request every
/// few seconds a lease per request.
pub const LEASE_IDLE: Duration = Duration::from_secs(10);
/// After the database granted nothing, requests are refused in memory this
/// long before a lease is asked for again: a user over quota costs each
/// server a few statements a second, not one per request.
pub const EXHAUSTED_RECHECK: Duration = Duration::from_millis(250);
/// After a lease failed (database unreachable or too slow), requests are
/// counted in memory this long before a lease is tried again.
pub const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);
/// A lease statement that takes longer counts as failed.
pub const LEASE_TIMEOUT: Duration = Duration::from_secs(2);

/// How many units to ask for when `room` requests are left in the tighter
/// window (as last seen here).
pub fn block_size(room: u64) -> u64 {
    (room / BLOCK_DIVISOR).clamp(1, MAX_BLOCK)
}

/// What is left in the tighter of the limited windows; `None`: neither the
/// hour nor the day is limited.
pub fn room(limits: &Limits, hour_requests: u64, day_requests: u64) -> Option<u64> {
    [
        (limits.req_hour, hour_requests),
        (limits.req_day, day_requests),
    ]
    .into_iter()
    .filter_map(|(limit, used)| limit.map(|limit| limit.saturating_sub(used)))
    .min()
}

/// What `quota_lease` grants against the windows' totals (the SQL function
/// computes the same with the rows locked).
pub fn grant(wanted: u64, limits: &Limits, hour_requests: u64, day_requests: u64) -> u64 {
    room(limits, hour_requests, day_requests).map_or(wanted, |room| wanted.min(room))
}

/// Whether a server must give its unspent units back now: when the
/// database's totals leave nothing, a request to another server is refused
/// until they come back.
pub fn must_give_back(limits: &Limits, hour_requests: u64, day_requests: u64) -> bool {
    room(limits, hour_requests, day_requests) == Some(0)
}

/// Units leased for one pair of windows and not yet spent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub hour_start: OffsetDateTime,
    pub day_start: OffsetDateTime,
    pub units: u64,
    /// The units the last lease granted.
    pub block: u64,
    /// When units were last granted or spent.
    pub last_used: Instant,
}

impl Lease {
    /// Spends one unit, if any is left.
    pub fn spend(&mut self) -> bool {
        let spent = self.units > 0;
        if spent {
            self.units -= 1;
            self.last_used = Instant::now();
        }
        spent
    }

    /// Whether to lease the next block now, so that the user's requests do
    /// not wait for it: when a quarter of a large block is left. Small
    /// blocks (near the limit) are not refilled ahead: the units would wait
    /// here for requests that may go to other servers.
    pub fn wants_refill(&self) -> bool {
        self.block >= REFILL_MIN_BLOCK && self.units * 4 <= self.block
    }

    /// Holds units not spent for `idle` (zero: any unit).
    pub fn is_idle(&self, idle: Duration) -> bool {
        self.units > 0 && self.last_used.elapsed() >= idle
    }
}

/// A lease's answer: the units granted and both windows' totals after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Granted {
    pub units: u64,
    pub hour_requests: u64,
    pub day_requests: u64,
    pub hour_cpu_ms: u64,
    pub day_cpu_ms: u64,
}

/// Runs `quota_lease` (one round trip, a prepared statement).
pub async fn take(
    pool: Pool,
    user: Uuid,
    hour_start: OffsetDateTime,
    day_start: OffsetDateTime,
    limits: Limits,
    wanted: u64,
) -> Result<Granted, String> {
    let client = pool.get().await.map_err(|e| e.to_string())?;
    let statement = client
        .prepare_cached(
            "SELECT granted, hour_requests, day_requests, hour_cpu_ms, day_cpu_ms
               FROM quota_lease($1, $2, $3, $4, $5, $6)",
        )
        .await
        .map_err(|e| e.to_string())?;
    let as_i64 = |v: u64| v.min(i64::MAX as u64) as i64;
    let row = client
        .query_one(
            &statement,
            &[
                &user,
                &hour_start,
                &day_start,
                &limits.req_hour.map(as_i64),
                &limits.req_day.map(as_i64),
                &as_i64(wanted),
            ],
        )
        .await
        .map_err(|e| e.to_string())?;
    let get = |i: usize| row.get::<_, i64>(i).max(0) as u64;
    Ok(Granted {
        units: get(0),
        hour_requests: get(1),
        day_requests: get(2),
        hour_cpu_ms: get(3),
        day_cpu_ms: get(4),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(req_hour: Option<u64>, req_day: Option<u64>) -> Limits {
        Limits {
            req_hour,
            req_day,
            ..Limits::default()
        }
    }

    #[test]
    fn blocks_shrink_to_one_near_the_limit() {
        assert_eq!(block_size(0), 1);
        assert_eq!(block_size(10), 1);
        assert_eq!(block_size(31), 1);
        assert_eq!(block_size(32), 2);
        assert_eq!(block_size(160), 10);
        assert_eq!(block_size(512), 32);
        assert_eq!(block_size(1024), MAX_BLOCK);
        assert_eq!(block_size(u64::MAX), MAX_BLOCK);
    }

    #[test]
    fn the_tighter_window_decides() {
        assert_eq!(room(&limits(None, None), 5, 5), None);
        assert_eq!(room(&limits(Some(10), None), 4, 900), Some(6));
        assert_eq!(room(&limits(Some(100), Some(50)), 20, 45), Some(5));
        assert_eq!(room(&limits(Some(10), Some(50)), 12, 12), Some(0));
        assert_eq!(grant(8, &limits(Some(100), Some(50)), 20, 45), 5);
        assert_eq!(grant(8, &limits(None, Some(50)), 20, 10), 8);
        assert_eq!(grant(8, &limits(None, None), 20, 10), 8);
        assert_eq!(grant(8, &limits(Some(10), None), 11, 10), 0);
    }

    #[test]
    fn units_are_spent_once_and_idle_ones_go_back() {
        let now = OffsetDateTime::now_utc();
        let mut lease = Lease {
            hour_start: now,
            day_start: now,
            units: 2,
            block: 2,
            last_used: Instant::now() - Duration::from_secs(60),
        };
        assert!(lease.is_idle(LEASE_IDLE), "not spent for a minute");
        assert!(lease.spend());
        assert!(!lease.is_idle(LEASE_IDLE), "spending keeps it");
        assert!(
            lease.is_idle(Duration::ZERO),
            "at shutdown every unit goes back"
        );
        assert!(lease.spend());
        assert!(!lease.spend(), "two units, two requests");
        assert!(!lease.is_idle(Duration::ZERO), "nothing left to give back");
    }

    #[test]
    fn large_blocks_are_refilled_when_a_quarter_is_left() {
        let now = OffsetDateTime::now_utc();
        let lease = |units, block| Lease {
            hour_start: now,
            day_start: now,
            units,
            block,
            last_used: Instant::now(),
        };
        assert!(!lease(17, 64).wants_refill());
        assert!(lease(16, 64).wants_refill());
        assert!(lease(0, 64).wants_refill());
        assert!(lease(2, 8).wants_refill());
        assert!(
            !lease(0, 7).wants_refill(),
            "near the limit: no units ahead"
        );
        assert!(!lease(0, 1).wants_refill());
    }

    #[test]
    fn units_go_back_when_nothing_is_left() {
        let limits = limits(Some(100), Some(1000));
        assert!(
            !must_give_back(&limits, 99, 99),
            "one left: nobody is refused"
        );
        assert!(must_give_back(&limits, 100, 100), "the hour is spent");
        assert!(must_give_back(&limits, 50, 1000), "the day is spent");
        assert!(must_give_back(
            &Limits {
                req_hour: None,
                ..limits
            },
            5,
            1000
        ));
        assert!(!must_give_back(&Limits::default(), 5, 5), "no limit");
    }

    /// Servers sharing one row pair, modelled as the SQL function and the
    /// book treat them: each request spends a unit of its server's lease or
    /// asks for a block (the next one ahead when a quarter of a large one
    /// is left); flushes give unspent units back when nothing is left.
    /// Whatever the order, the servers together admit at most the limit;
    /// once the units are given back, exactly the limit; and while they are
    /// out, the refusals are bounded by what the others hold.
    #[test]
    fn servers_together_admit_at_most_the_limit_and_exactly_it_after_returns() {
        let now = OffsetDateTime::now_utc();
        for (servers, limit, seed) in [
            (3, 10, 1),
            (3, 100, 7),
            (5, 1000, 42),
            (2, 37, 3),
            (3, 5000, 9),
        ] {
            let limits = limits(Some(limit), Some(limit * 3));
            let (mut hour, mut day) = (0u64, 0u64);
            let mut leases = vec![
                Lease {
                    hour_start: now,
                    day_start: now,
                    units: 0,
                    block: 0,
                    last_used: Instant::now(),
                };
                servers
            ];
            let mut admitted = 0u64;
            let mut rng: u64 = seed;
            let mut next = || {
                rng = rng
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (rng >> 33) as usize
            };
            let take = |lease: &mut Lease, hour: &mut u64, day: &mut u64| {
                // The server's view of what is left is the rows' totals.
                let wanted = block_size(room(&limits, *hour, *day).unwrap_or(u64::MAX));
                let granted = grant(wanted, &limits, *hour, *day);
                assert!(granted <= MAX_BLOCK && granted <= wanted);
                *hour += granted;
                *day += granted;
                lease.units += granted;
                lease.block = granted;
            };
            for _ in 0..limit * 4 {
                let s = next() % servers;
                if leases[s].units == 0 {
                    take(&mut leases[s], &mut hour, &mut day);
                }
                if leases[s].spend() {
                    admitted += 1;
                    if leases[s].wants_refill() {
                        take(&mut leases[s], &mut hour, &mut day);
                    }
                } else {
                    // Refused: only while others hold units, at most a
                    // block and a quarter each.
                    let out: u64 = leases.iter().map(|l| l.units).sum();
                    assert_eq!(admitted + out, limit, "refused with room left");
                    assert!(out <= (servers as u64 - 1) * (MAX_BLOCK + MAX_BLOCK / 4));
                }
                assert!(admitted <= limit, "never more than the limit");
                assert_eq!(hour, admitted + leases.iter().map(|l| l.units).sum::<u64>());
                if next() % 7 == 0 {
                    // A flush on one server: it gives its unspent units back
                    // if nothing is left (or, now and then, as idle).
                    let s = next() % servers;
                    if must_give_back(&limits, hour, day) || next() % 5 == 0 {
                        hour -= leases[s].units;
                        day -= leases[s].units;
                        leases[s].units = 0;
                    }
                }
            }
            for lease in &mut leases {
                hour -= lease.units;
                lease.units = 0;
            }
            let mut left = 0;
            while grant(1, &limits, hour, day) == 1 {
                hour += 1;
                day += 1;
                left += 1;
            }
            assert_eq!(
                admitted + left,
                limit,
                "after the returns, exactly the limit"
            );
        }
    }
}
