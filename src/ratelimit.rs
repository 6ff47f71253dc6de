//! Who a client is, and how often it may send events.
//!
//! - [`TrustedProxies`] (`TRUSTED_PROXIES`): the client of a request is the
//!   connection's peer, unless the peer is a proxy the operator trusts; then
//!   it is the last address in `X-Forwarded-For` that is not itself a trusted
//!   proxy. The header is never read from anyone else: any client can write
//!   it, so believing it would let each request pick its own rate-limit key.
//! - [`RateLimit`] (`RATE_LIMIT`, `RATE_LIMIT_BURST`): a GCRA (leaky bucket)
//!   per client from the `governor` crate. IPv6 clients are keyed by their
//!   /64, the block one subscriber usually gets, so that one host cannot
//!   step around its limit by rotating addresses inside it.

use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::str::FromStr;
use std::time::Duration;

use axum::http::HeaderMap;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};
use ipnet::IpNet;

/// Addresses and networks (`10.0.0.0/8`, `::1`) of the proxies in front of
/// the service, from a comma-separated list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

impl FromStr for TrustedProxies {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| {
                p.parse::<IpNet>()
                    .or_else(|_| p.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| {
                        format!("`{p}` is neither an IP address nor a network like 10.0.0.0/8")
                    })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Self)
    }
}

impl TrustedProxies {
    fn trusts(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// The client's address: `peer`, or, when `peer` is a trusted proxy, the
    /// nearest address in `X-Forwarded-For` (read from the right, across
    /// every such header) that is not one. When every address is trusted the
    /// leftmost is the client; an unparsable entry ends the walk there, since
    /// what lies beyond it came from the untrusted side.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = peer.to_canonical();
        if !self.trusts(peer) {
            return peer;
        }
        let hops: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect();
        let mut client = peer;
        for hop in hops.iter().rev() {
            let Some(ip) = parse_hop(hop) else { break };
            client = ip;
            if !self.trusts(ip) {
                break;
            }
        }
        client
    }
}

/// One `X-Forwarded-For` entry: an address, possibly with a port
/// (`1.2.3.4:5678`, `[::1]:80`).
fn parse_hop(hop: &str) -> Option<IpAddr> {
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    hop.parse::<std::net::SocketAddr>()
        .ok()
        .map(|s| s.ip().to_canonical())
}

/// The rate-limit key of a client: its IPv4 address, or its IPv6 /64.
fn key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
    }
}

/// A pace: `N/s`, `N/min` or `N/h` (a bare `N` is per second).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: NonZeroU32,
    pub per: Duration,
}

impl FromStr for Rate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("`{s}` is not a rate like 100/s, 600/min or 5000/h");
        let (count, unit) = s.trim().split_once('/').unwrap_or((s.trim(), "s"));
        let per = match unit.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            _ => return Err(bad()),
        };
        let count = count.trim().parse::<NonZeroU32>().map_err(|_| bad())?;
        Ok(Self { count, per })
    }
}

/// Requests per client at a [`Rate`], with a burst allowance.
pub struct RateLimit<C: Clock + Clone = DefaultClock> {
    limiter: RateLimiter<IpAddr, DashMapStateStore<IpAddr>, C, NoOpMiddleware<C::Instant>>,
    clock: C,
}

impl RateLimit<DefaultClock> {
    pub fn new(rate: Rate, burst: NonZeroU32) -> Self {
        Self::with_clock(rate, burst, DefaultClock::default())
    }
}

impl<C: Clock + Clone> RateLimit<C> {
    pub fn with_clock(rate: Rate, burst: NonZeroU32, clock: C) -> Self {
        // One request's worth of allowance comes back every `per / count`
        // (at least a nanosecond: governor refuses a zero period).
        let period = (rate.per / rate.count.get()).max(Duration::from_nanos(1));
        let quota = Quota::with_period(period)
            .unwrap_or_else(|| Quota::per_second(rate.count))
            .allow_burst(burst);
        Self {
            limiter: RateLimiter::dashmap_with_clock(quota, clock.clone()),
            clock,
        }
    }

    /// Takes one request from `client`'s allowance; `Err` holds how long to
    /// wait before the next one would be accepted.
    pub fn check(&self, client: IpAddr) -> Result<(), Duration> {
        self.limiter
            .check_key(&key(client))
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// Forgets clients whose allowance is full again, so that the table holds
    /// only recently active clients (call it now and then).
    pub fn forget_idle(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    /// Clients currently remembered.
    pub fn clients(&self) -> usize {
        self.limiter.len()
    }
}

/// The ingest limit as the routes use it: who the client is, and its
/// allowance.
pub struct ClientLimit {
    pub proxies: TrustedProxies,
    pub rate: RateLimit,
}

/// Whole seconds for a `Retry-After` header: rounded up, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use governor::clock::FakeRelativeClock;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn xff(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn forwarded_for_is_ignored_from_untrusted_peers() {
        let none = TrustedProxies::default();
        let h = xff(&["203.0.113.9"]);
        assert_eq!(none.client_ip(ip("198.51.100.1"), &h), ip("198.51.100.1"));
        let proxies: TrustedProxies = "10.0.0.0/8".parse().unwrap();
        assert_eq!(
            proxies.client_ip(ip("198.51.100.1"), &h),
            ip("198.51.100.1")
        );
    }

    #[test]
    fn the_client_is_the_nearest_untrusted_hop() {
        let proxies: TrustedProxies = "10.0.0.0/8, 192.0.2.7".parse().unwrap();
        // client, spoofed by the client, then two trusted proxies.
        let h = xff(&["1.1.1.1, 203.0.113.9", "192.0.2.7"]);
        assert_eq!(proxies.client_ip(ip("10.1.2.3"), &h), ip("203.0.113.9"));
        // Every hop trusted: the leftmost is the client.
        let h = xff(&["10.9.9.9, 192.0.2.7"]);
        assert_eq!(proxies.client_ip(ip("10.1.2.3"), &h), ip("10.9.9.9"));
        // No header: the proxy itself.
        assert_eq!(
            proxies.client_ip(ip("10.1.2.3"), &HeaderMap::new()),
            ip("10.1.2.3")
        );
        // Ports and IPv4-mapped peers.
        let h = xff(&["[2001:db8::1]:443", "203.0.113.9:5000"]);
        assert_eq!(
            proxies.client_ip(ip("::ffff:10.1.2.3"), &h),
            ip("203.0.113.9")
        );
        // Garbage stops the walk at the last good hop.
        let h = xff(&["203.0.113.9, not-an-ip, 10.4.4.4"]);
        assert_eq!(proxies.client_ip(ip("10.1.2.3"), &h), ip("10.4.4.4"));
    }

    #[test]
    fn proxy_lists_parse_or_say_what_is_wrong() {
        let p: TrustedProxies = " 10.0.0.0/8 ,::1,, 2001:db8::/32".parse().unwrap();
        assert_eq!(p.0.len(), 3);
        assert!(p.trusts(ip("::1")) && p.trusts(ip("10.200.0.1")));
        assert!(!p.trusts(ip("11.0.0.1")));
        let e = "10.0.0.0/8,proxy.local"
            .parse::<TrustedProxies>()
            .unwrap_err();
        assert!(e.contains("proxy.local"), "{e}");
        assert_eq!(
            "".parse::<TrustedProxies>().unwrap(),
            TrustedProxies::default()
        );
    }

    #[test]
    fn a_client_gets_its_burst_then_waits() {
        let clock = FakeRelativeClock::default();
        let n = |v| NonZeroU32::new(v).unwrap();
        let limit = RateLimit::with_clock("10/s".parse().unwrap(), n(3), clock.clone());
        let a = ip("198.51.100.1");
        for _ in 0..3 {
            assert_eq!(limit.check(a), Ok(()));
        }
        let wait = limit.check(a).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(100));
        assert_eq!(retry_after_secs(wait), 1);
        // Another client is not affected.
        assert_eq!(limit.check(ip("198.51.100.2")), Ok(()));
        clock.advance(Duration::from_millis(100));
        assert_eq!(limit.check(a), Ok(()));
        assert!(limit.check(a).is_err());
        // After a full second the burst is back and the client is forgotten.
        clock.advance(Duration::from_secs(1));
        limit.forget_idle();
        assert_eq!(limit.clients(), 0);
        for _ in 0..3 {
            assert_eq!(limit.check(a), Ok(()));
        }
    }

    #[test]
    fn ipv6_clients_share_their_slash_64() {
        let clock = FakeRelativeClock::default();
        let n = |v| NonZeroU32::new(v).unwrap();
        let limit = RateLimit::with_clock("1/h".parse().unwrap(), n(1), clock);
        assert_eq!(limit.check(ip("2001:db8:1:2::1")), Ok(()));
        assert!(limit.check(ip("2001:db8:1:2:ffff::9")).is_err());
        assert_eq!(limit.check(ip("2001:db8:1:3::1")), Ok(()));
        // IPv4-mapped addresses are the IPv4 client.
        assert_eq!(limit.check(ip("192.0.2.1")), Ok(()));
        assert!(limit.check(ip("::ffff:192.0.2.1")).is_err());
    }

    #[test]
    fn rates_parse_or_say_what_is_wrong() {
        let r: Rate = "600/min".parse().unwrap();
        assert_eq!((r.count.get(), r.per), (600, Duration::from_secs(60)));
        let r: Rate = " 20 ".parse().unwrap();
        assert_eq!((r.count.get(), r.per), (20, Duration::from_secs(1)));
        assert_eq!(
            "5/h".parse::<Rate>().unwrap().per,
            Duration::from_secs(3600)
        );
        for bad in ["0/s", "-1", "ten/s", "5/day", "", "/s"] {
            let e = bad.parse::<Rate>().unwrap_err();
            assert!(e.contains("not a rate"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_slow_rate_refills_one_request_at_a_time() {
        let clock = FakeRelativeClock::default();
        let limit = RateLimit::with_clock(
            "2/min".parse().unwrap(),
            NonZeroU32::new(2).unwrap(),
            clock.clone(),
        );
        let a = ip("198.51.100.1");
        assert!(limit.check(a).is_ok() && limit.check(a).is_ok());
        assert_eq!(limit.check(a), Err(Duration::from_secs(30)));
        clock.advance(Duration::from_secs(29));
        assert_eq!(limit.check(a), Err(Duration::from_secs(1)));
        clock.advance(Duration::from_secs(1));
        assert_eq!(limit.check(a), Ok(()));
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(3)), 3);
    }
}
