//! Fair use: rate limits, GCRA with a burst (`governor`), per user for
//! authenticated requests and per client address for the others (an IPv6
//! client by its /64, since one host usually holds a whole /64; an
//! IPv4-mapped IPv6 address as the IPv4 address it is); and quotas
//! ([`limits`], [`book`]): requests per calendar UTC hour and day (exact
//! across servers sharing a database, through [`lease`]s), CPU per day,
//! memory per run, storage and files.
//!
//! Build one [`RateLimits`] and one [`book::QuotaBook`] per process and share
//! them: every worker must see the same counters. With several servers
//! behind one balancer, tell the limits how many are live
//! ([`RateLimits::set_servers`]): each then admits its share of a user's
//! rate, so the user's total stays the configured one.

pub mod book;
pub mod lease;
pub mod limits;
pub mod store;

pub use book::{QuotaBook, WindowUsage};
pub use limits::{Limits, Violation, tier_limits};

use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{RwLock, RwLockReadGuard};
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
    /// The per-user rate for all servers together.
    per_user_rate: Rate,
    /// This server's share of it.
    per_user: RwLock<UserShare>,
    per_ip: Option<(Keyed<IpAddr>, Rate)>,
    clock: DefaultClock,
}

#[derive(Debug)]
struct UserShare {
    servers: u32,
    limiter: Option<Keyed<Uuid>>,
}

/// A limiter admitting `1/servers` of `rate`: the period between requests
/// `servers` times longer, the burst divided and rounded up (so the
/// servers together allow at most `servers - 1` more than the burst).
fn shared_limiter<K: Hash + Eq + Clone>(rate: Rate, servers: u32) -> Option<Keyed<K>> {
    NonZeroU32::new(rate.per_minute)?;
    let servers = servers.max(1);
    let period = Duration::from_secs(60) * servers / rate.per_minute;
    let burst = rate.burst.max(1).div_ceil(servers);
    let quota =
        Quota::with_period(period)?.allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN));
    Some(RateLimiter::dashmap(quota))
}

impl RateLimits {
    pub fn new(per_user: Rate, per_ip: Rate) -> Self {
        RateLimits {
            per_user_rate: per_user,
            per_user: RwLock::new(UserShare {
                servers: 1,
                limiter: shared_limiter(per_user, 1),
            }),
            per_ip: shared_limiter(per_ip, 1).map(|limiter| (limiter, per_ip)),
            clock: DefaultClock::default(),
        }
    }

    fn user_share(&self) -> RwLockReadGuard<'_, UserShare> {
        self.per_user.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets how many servers share the per-user rate. A change starts every
    /// user's bucket afresh (full), which happens only when servers come
    /// or go. Returns whether the share changed.
    pub fn set_servers(&self, servers: u32) -> bool {
        let servers = servers.max(1);
        if self.user_share().servers == servers {
            return false;
        }
        let mut share = self.per_user.write().unwrap_or_else(|p| p.into_inner());
        *share = UserShare {
            servers,
            limiter: shared_limiter(self.per_user_rate, servers),
        };
        true
    }

    /// How many servers the per-user rate is shared by.
    pub fn servers(&self) -> u32 {
        self.user_share().servers
    }

    pub fn check_user(&self, user: Uuid) -> Result<(), Limited> {
        let share = self.user_share();
        let Some(limiter) = &share.limiter else {
            return Ok(());
        };
        self.check(limiter, self.per_user_rate, &user, Scope::User)
    }

    /// Charges `ip`'s limit: an IPv4 address's own, an IPv6 address's /64's.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), Limited> {
        let Some((limiter, rate)) = &self.per_ip else {
            return Ok(());
        };
        self.check(limiter, *rate, &address_key(ip), Scope::Ip)
    }

    fn check<K: Hash + Eq + Clone>(
        &self,
        limiter: &Keyed<K>,
        rate: Rate,
        key: &K,
        scope: Scope,
    ) -> Result<(), Limited> {
        limiter.check_key(key).map_err(|not_until| Limited {
            scope,
            rate,
            retry_after: not_until.wait_time_from(self.clock.now()),
        })
    }

    /// Forgets keys whose state is back to full; call periodically so idle
    /// users and addresses do not accumulate.
    pub fn retain_recent(&self) {
        if let Some(limiter) = &self.user_share().limiter {
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

    #[test]
    fn servers_share_a_users_rate_and_burst() {
        let limits = RateLimits::new(
            Rate {
                per_minute: 60,
                burst: 10,
            },
            Rate {
                per_minute: 0,
                burst: 0,
            },
        );
        assert!(!limits.set_servers(1), "one server is the default");
        assert!(limits.set_servers(3));
        assert_eq!(limits.servers(), 3);
        let user = Uuid::new_v4();
        // ⌈10 / 3⌉ = 4 here; the three servers together admit 12.
        for _ in 0..4 {
            assert!(limits.check_user(user).is_ok());
        }
        let refused = limits
            .check_user(user)
            .expect_err("over this server's share");
        // One request per 3 s here: 60 a minute over the three servers.
        assert!(refused.retry_after > Duration::from_secs(2));
        assert!(refused.retry_after <= Duration::from_secs(3));
        assert_eq!(
            refused.rate.per_minute, 60,
            "the configured rate is reported"
        );
        assert!(!limits.set_servers(3), "no change, no fresh buckets");
        assert!(limits.check_user(user).is_err());
        assert!(limits.set_servers(0), "at least this server");
        assert_eq!(limits.servers(), 1);
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
