//! Fair use: rate limits, GCRA with a burst (`governor`), per user for
//! authenticated requests and per client address for the others; and quotas
//! ([`limits`], [`book`]): requests per calendar UTC hour and day, CPU per
//! day, memory per run, storage and files.
//!
//! Build one [`RateLimits`] and one [`book::QuotaBook`] per process and share
//! them: every worker must see the same counters.

pub mod book;
pub mod limits;

pub use book::{QuotaBook, WindowUsage};
pub use limits::{Limits, Violation, tier_limits};

use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};
use uuid::Uuid;

type Keyed<K> = RateLimiter<K, DashMapStateStore<K>, DefaultClock>;

/// Requests per minute and burst; a rate of 0 switches the limit off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_minute: u32,
    pub burst: u32,
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    User,
    Ip,
}

impl Scope {
    /// The `quota_type` the API and the audit trail report.
    pub fn quota_type(self) -> &'static str {
        match self {
            Scope::User => "rate_limit_user",
            Scope::Ip => "rate_limit_ip",
        }
    }
}

/// A refusal: which limit, its rate, and when a request would pass again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    pub scope: Scope,
    pub rate: Rate,
    pub retry_after: Duration,
}

#[derive(Debug)]
pub struct RateLimits {
    per_user: Option<(Keyed<Uuid>, Rate)>,
    per_ip: Option<(Keyed<IpAddr>, Rate)>,
    clock: DefaultClock,
}

fn limiter<K: Hash + Eq + Clone>(rate: Rate) -> Option<(Keyed<K>, Rate)> {
    let per_minute = NonZeroU32::new(rate.per_minute)?;
    let burst = NonZeroU32::new(rate.burst.max(1)).unwrap_or(NonZeroU32::MIN);
    Some((
        RateLimiter::dashmap(Quota::per_minute(per_minute).allow_burst(burst)),
        rate,
    ))
}

impl RateLimits {
    pub fn new(per_user: Rate, per_ip: Rate) -> Self {
        RateLimits {
            per_user: limiter(per_user),
            per_ip: limiter(per_ip),
            clock: DefaultClock::default(),
        }
    }

    pub fn check_user(&self, user: Uuid) -> Result<(), Limited> {
        self.check(self.per_user.as_ref(), &user, Scope::User)
    }

    pub fn check_ip(&self, ip: IpAddr) -> Result<(), Limited> {
        self.check(self.per_ip.as_ref(), &ip, Scope::Ip)
    }

    fn check<K: Hash + Eq + Clone>(
        &self,
        limiter: Option<&(Keyed<K>, Rate)>,
        key: &K,
        scope: Scope,
    ) -> Result<(), Limited> {
        let Some((limiter, rate)) = limiter else {
            return Ok(());
        };
        limiter.check_key(key).map_err(|not_until| Limited {
            scope,
            rate: *rate,
            retry_after: not_until.wait_time_from(self.clock.now()),
        })
    }

    /// Forgets keys whose state is back to full; call periodically so idle
    /// users and addresses do not accumulate.
    pub fn retain_recent(&self) {
        if let Some((limiter, _)) = &self.per_user {
            limiter.retain_recent();
        }
        if let Some((limiter, _)) = &self.per_ip {
            limiter.retain_recent();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_burst_passes_then_the_limit_refuses_with_a_wait() {
        let limits = RateLimits::new(
            Rate {
                per_minute: 60,
                burst: 3,
            },
            Rate {
                per_minute: 0,
                burst: 0,
            },
        );
        let user = Uuid::new_v4();
        for _ in 0..3 {
            assert!(limits.check_user(user).is_ok());
        }
        let refused = limits.check_user(user).expect_err("over the burst");
        assert_eq!(refused.scope, Scope::User);
        assert!(
            refused.retry_after > Duration::ZERO && refused.retry_after <= Duration::from_secs(1)
        );
        assert!(
            limits.check_user(Uuid::new_v4()).is_ok(),
            "others are not affected"
        );
        for _ in 0..1000 {
            assert!(
                limits.check_ip("127.0.0.1".parse().expect("ip")).is_ok(),
                "0 switches it off"
            );
        }
    }
}
