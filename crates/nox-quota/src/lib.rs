//! Fair use: rate limits, GCRA with a burst (`governor`), per user for
//! authenticated requests and per client address for the others (an IPv6
//! client by its /64, since one host usually holds a whole /64; an
//! IPv4-mapped IPv6 address as the IPv4 address it is); and quotas
//! ([`limits`], [`book`]): requests per calendar UTC hour and day (exact
//! across servers sharing a database, through [`lease`]s), CPU per day,
//! memory per run, storage and files.
//!
//! Build one [`RateLimits`] and one [`book::QuotaBook`] per process and share
//! them: every worker must see the same counters.

pub mod book;
pub mod lease;
pub mod limits;
pub mod store;

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

    /// Charges `ip`'s limit: an IPv4 address's own, an IPv6 address's /64's.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), Limited> {
        self.check(self.per_ip.as_ref(), &address_key(ip), Scope::Ip)
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

/// The key an address is limited under: an IPv4 address itself (also when
/// written IPv4-mapped, `::ffff:a.b.c.d`), an IPv6 address's /64 prefix
/// (a host is usually given a whole /64 and picks addresses in it freely).
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from_bits(
                v6.to_bits() & !((1u128 << 64) - 1),
            )),
        },
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

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("an address")
    }

    fn per_ip(burst: u32) -> RateLimits {
        RateLimits::new(
            Rate {
                per_minute: 0,
                burst: 0,
            },
            Rate {
                per_minute: 1,
                burst,
            },
        )
    }

    #[test]
    fn ipv6_clients_share_their_64_and_ipv4_is_per_address() {
        let limits = per_ip(2);
        // Two addresses of one /64 share one bucket.
        assert!(limits.check_ip(ip("2001:db8:1:2::1")).is_ok());
        assert!(
            limits
                .check_ip(ip("2001:db8:1:2:ffff:ffff:ffff:fffe"))
                .is_ok()
        );
        let refused = limits
            .check_ip(ip("2001:db8:1:2:1234:5678:9abc:def0"))
            .expect_err("the /64's burst is spent");
        assert_eq!(refused.scope, Scope::Ip);
        // The neighbouring /64s have buckets of their own.
        assert!(limits.check_ip(ip("2001:db8:1:3::1")).is_ok());
        assert!(limits.check_ip(ip("2001:db8:1:1::1")).is_ok());

        // IPv4: per address; the mapped form is the same client.
        assert!(limits.check_ip(ip("192.0.2.1")).is_ok());
        assert!(limits.check_ip(ip("::ffff:192.0.2.1")).is_ok());
        assert!(limits.check_ip(ip("192.0.2.1")).is_err());
        assert!(limits.check_ip(ip("192.0.2.2")).is_ok());
    }

    #[test]
    fn address_keys() {
        assert_eq!(
            address_key(ip("2001:db8::aaaa:bbbb:cccc:dddd")),
            ip("2001:db8::")
        );
        assert_eq!(address_key(ip("::ffff:10.0.0.1")), ip("10.0.0.1"));
        assert_eq!(address_key(ip("10.0.0.1")), ip("10.0.0.1"));
        assert_eq!(address_key(ip("::1")), ip("::"));
    }
}
