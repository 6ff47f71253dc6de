//! Cookieless visitors: an id for the visitor of an event sent without a
//! `userid`, that the service itself cannot trace back or recompute later.
//!
//! The id is SipHash-2-4, keyed by the day's salt, of the site, the
//! client's address and its User-Agent: the same browser on the same
//! network is one visitor for a day, on every site a different one.
//! Salts are 128 random bits, one per UTC day, made by whichever process
//! needs the day's first ([`SaltSource::salts`]: every process gets the
//! same one, kept in Redis in Redis mode and in the SQLite file in
//! embedded mode). The day before's salt is kept for [`GRACE`] after
//! midnight, so that a visit open at midnight keeps its visitor (its
//! events are looked up under both ids, see [`VisitorIds`]); then it is
//! deleted, and with it every way to tell whose the ids of that day were.
//! The address is never stored, only used to compute the id.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use crate::query::time::DAY_MS;

/// How long after midnight (UTC) the day before's salt is kept.
pub const GRACE: Duration = Duration::from_secs(2 * 60 * 60);

/// One day's random key.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Salt(pub [u8; 16]);

impl std::fmt::Debug for Salt {
    // Never printed: with it, a day's ids could be recomputed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Salt(..)")
    }
}

impl Salt {
    pub fn random() -> Result<Self, SaltError> {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes).map_err(|e| SaltError(format!("no randomness: {e}")))?;
        Ok(Self(bytes))
    }

    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Self)
    }
}

/// The salts in use at some instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Salts {
    /// The UTC day number (days since the epoch) of `current`.
    pub day: i64,
    pub current: Salt,
    /// The day before's, within [`GRACE`] after midnight.
    pub previous: Option<Salt>,
}

#[derive(Debug, thiserror::Error)]
#[error("visitor salts: {0}")]
pub struct SaltError(pub String);

/// The day number of an instant, and whether it is within the grace period.
pub fn day_of(now_ms: i64) -> (i64, bool) {
    let day = now_ms.div_euclid(DAY_MS);
    let grace = now_ms - day * DAY_MS < GRACE.as_millis() as i64;
    (day, grace)
}

/// Where salts live: one implementation per backend, shared by every
/// process that computes ids.
#[async_trait]
pub trait SaltSource: Send + Sync {
    /// The salts at `now_ms`: the day's (made now if there is none yet,
    /// the same for every caller), and the day before's within the grace
    /// period. Salts no longer in use are deleted.
    async fn salts(&self, now_ms: i64) -> Result<Salts, SaltError>;
}

/// The id of a visitor: 16 hex digits.
pub fn visitor_id(salt: &Salt, site: &str, ip: IpAddr, user_agent: &str) -> String {
    use std::hash::Hasher;
    let mut h = siphasher::sip::SipHasher24::new_with_key(&salt.0);
    // Lengths first, so that no two different inputs hash the same bytes.
    h.write_usize(site.len());
    h.write(site.as_bytes());
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    match ip {
        IpAddr::V4(v4) => h.write(&v4.octets()),
        IpAddr::V6(v6) => h.write(&v6.octets()),
    }
    h.write(user_agent.as_bytes());
    format!("{:016x}", h.finish())
}

/// Computes visitor ids with the salts of the moment, asking the
/// [`SaltSource`] once per period (the salts change only at midnight and
/// at the end of the grace period).
pub struct VisitorIds {
    source: Arc<dyn SaltSource>,
    /// The salts, and until when (epoch ms) they hold.
    cached: Mutex<Option<(Salts, i64)>>,
}

/// A visitor's id under today's salt, and under yesterday's while it is
/// kept (a visit open at midnight goes on under that one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ids {
    pub current: String,
    pub previous: Option<String>,
}

impl VisitorIds {
    pub fn new(source: Arc<dyn SaltSource>) -> Self {
        Self {
            source,
            cached: Mutex::new(None),
        }
    }

    async fn salts(&self, now_ms: i64) -> Result<Salts, SaltError> {
        if let Some((salts, until)) = *self.cached.lock().unwrap_or_else(|p| p.into_inner())
            && now_ms < until
            && now_ms.div_euclid(DAY_MS) == salts.day
        {
            return Ok(salts);
        }
        let salts = self.source.salts(now_ms).await?;
        let midnight = (salts.day + 1) * DAY_MS;
        let until = match salts.previous {
            Some(_) => salts.day * DAY_MS + GRACE.as_millis() as i64,
            None => midnight,
        };
        *self.cached.lock().unwrap_or_else(|p| p.into_inner()) = Some((salts, until));
        Ok(salts)
    }

    /// Reads (or makes) the salts of `now_ms` ahead of the first event.
    pub async fn prefetch(&self, now_ms: i64) -> Result<(), SaltError> {
        self.salts(now_ms).await.map(|_| ())
    }

    /// The ids of the visitor at `ip` with `user_agent` on `site`, at `now_ms`.
    pub async fn ids(
        &self,
        now_ms: i64,
        site: &str,
        ip: IpAddr,
        user_agent: &str,
    ) -> Result<Ids, SaltError> {
        let salts = self.salts(now_ms).await?;
        Ok(Ids {
            current: visitor_id(&salts.current, site, ip, user_agent),
            previous: salts.previous.map(|s| visitor_id(&s, site, ip, user_agent)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_differ_by_site_address_agent_and_salt() {
        let salt = Salt([7; 16]);
        let ip: IpAddr = "203.0.113.9".parse().unwrap();
        let id = visitor_id(&salt, "a.example", ip, "UA");
        assert_eq!(id.len(), 16);
        assert_eq!(id, visitor_id(&salt, "a.example", ip, "UA"));
        assert_ne!(id, visitor_id(&salt, "b.example", ip, "UA"));
        assert_ne!(
            id,
            visitor_id(&salt, "a.example", "203.0.113.10".parse().unwrap(), "UA")
        );
        assert_ne!(id, visitor_id(&salt, "a.example", ip, "UA2"));
        assert_ne!(id, visitor_id(&Salt([8; 16]), "a.example", ip, "UA"));
        // An IPv4 address is one visitor however the socket reports it.
        let mapped: IpAddr = "::ffff:203.0.113.9".parse().unwrap();
        assert_eq!(id, visitor_id(&salt, "a.example", mapped, "UA"));
        // Lengths are part of the input: ("ab", "c") is not ("a", "bc").
        assert_ne!(
            visitor_id(&salt, "ab", ip, "c"),
            visitor_id(&salt, "a", ip, "bc")
        );
        assert_eq!(format!("{salt:?}"), "Salt(..)");
    }

    #[test]
    fn the_grace_period_is_the_start_of_each_utc_day() {
        let midnight = 20_000 * DAY_MS;
        assert_eq!(day_of(midnight), (20_000, true));
        assert_eq!(day_of(midnight - 1), (19_999, false));
        let end = midnight + GRACE.as_millis() as i64;
        assert_eq!(day_of(end - 1), (20_000, true));
        assert_eq!(day_of(end), (20_000, false));
    }
}
