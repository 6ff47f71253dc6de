//! The site registry: what the owner of a site sets about it, kept in the
//! store and managed by `evtrack sites …` and the admin API.
//!
//! - [`SiteSettings`]: a site's time zone (the default of its queries and
//!   dashboard), whether it is public (readable without a token), the
//!   hostnames its events may come from, the client addresses whose events
//!   are dropped (the owner's own visits), and its [`Goal`]s.
//! - [`TokenRecord`]: a read token made at run time, scoped to sites, kept as
//!   a digest; made, listed and revoked without a restart.
//! - [`Registry`]: both, as every handler sees them: a snapshot in memory,
//!   read again from the store every [`REFRESH_EVERY`] (other processes'
//!   changes) and at once after a change made through this one. The ingest
//!   path reads the snapshot only, never the store.
//!
//! A site not in the registry keeps the defaults: UTC, private, events from
//! anywhere, no goals.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::access::StatsTokens;
use crate::event::SiteId;
use crate::query::Zone;
use crate::store::{Store, StoreError};

/// Most goals a site has.
pub const MAX_GOALS: usize = 100;
/// Most allowed hostnames, and most excluded networks, of a site.
pub const MAX_HOSTNAMES: usize = 100;
pub const MAX_EXCLUDED: usize = 100;
/// Most sites the registry holds, and most read tokens.
pub const MAX_SITES: usize = 1_000;
pub const MAX_TOKENS: usize = 1_000;
/// Longest goal event name or page pattern, and longest token label.
const MAX_GOAL_CHARS: usize = 200;
const MAX_LABEL_CHARS: usize = 200;
/// Why events are dropped (the `X-Evtrack-Dropped` header, the
/// `events_dropped` metric's reason).
pub const EXCLUDED_IP: &str = "excluded_ip";
pub const HOSTNAME_NOT_ALLOWED: &str = "hostname_not_allowed";
/// How often a process reads the registry again.
pub const REFRESH_EVERY: Duration = Duration::from_secs(5);

/// What a goal counts, as Plausible has them: events of one name, or
/// pageviews of the paths a pattern matches (`*`: any characters but `/`;
/// `**`: any characters).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Goal {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page: Option<String>,
}

impl Goal {
    /// The goal's name in answers and filters (`event:goal`): the event
    /// name, or `Visit ` and the pattern (Plausible's names).
    pub fn name(&self) -> String {
        match (&self.event, &self.page) {
            (Some(e), _) => e.clone(),
            (None, Some(p)) => format!("Visit {p}"),
            (None, None) => String::new(),
        }
    }
}

/// A site's settings, as the admin API takes and gives them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteSettings {
    /// IANA name; `None`: UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    #[serde(default)]
    pub public: bool,
    /// Events from other hostnames are dropped; empty: any. `*.example.com`
    /// is any subdomain of example.com. Compared as events store them:
    /// lowercase, without a leading `www.`.
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// Addresses or networks (`203.0.113.7`, `2001:db8::/48`) whose events
    /// are dropped.
    #[serde(default)]
    pub exclude_ips: Vec<String>,
    #[serde(default)]
    pub goals: Vec<Goal>,
}

/// A setting that is not right, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingsError {
    pub field: String,
    pub message: String,
}

impl SettingsError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl std::fmt::Display for SettingsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

fn hostname_ok(h: &str) -> bool {
    let bare = h.strip_prefix("*.").unwrap_or(h);
    !bare.is_empty()
        && bare.len() <= 253
        && bare
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        && !bare.starts_with('.')
        && !bare.ends_with('.')
}

fn text_ok(s: &str, max: usize) -> bool {
    !s.trim().is_empty() && s.chars().count() <= max && !s.chars().any(char::is_control)
}

impl SiteSettings {
    /// Reads and checks settings sent as JSON; hostnames are stored as
    /// events are (lowercase, no leading `www.`).
    pub fn parse(value: &Value) -> Result<SiteSettings, SettingsError> {
        if !value.is_object() {
            return Err(SettingsError::new("", "the settings are a JSON object"));
        }
        let mut s: SiteSettings = serde_json::from_value(value.clone()).map_err(|e| {
            // serde's message names the field, never more than the input's
            // key (values are not echoed).
            let text = e.to_string();
            SettingsError::new("", text.split(" at line").next().unwrap_or("").to_owned())
        })?;
        s.check()?;
        s.hostnames = s
            .hostnames
            .iter()
            .map(|h| {
                let h = h.trim().to_ascii_lowercase();
                match h.strip_prefix("www.") {
                    Some(rest) if !rest.is_empty() => rest.to_owned(),
                    _ => h,
                }
            })
            .collect();
        Ok(s)
    }

    fn check(&self) -> Result<(), SettingsError> {
        if let Some(tz) = &self.timezone
            && Zone::parse(tz).is_none()
        {
            return Err(SettingsError::new(
                "timezone",
                "not an IANA time zone name (e.g. Europe/Paris)",
            ));
        }
        if self.hostnames.len() > MAX_HOSTNAMES {
            return Err(SettingsError::new(
                "hostnames",
                format!("at most {MAX_HOSTNAMES} hostnames"),
            ));
        }
        for (i, h) in self.hostnames.iter().enumerate() {
            if !hostname_ok(h.trim()) {
                return Err(SettingsError::new(
                    format!("hostnames[{i}]"),
                    "a hostname like example.com, or *.example.com for its subdomains",
                ));
            }
        }
        if self.exclude_ips.len() > MAX_EXCLUDED {
            return Err(SettingsError::new(
                "exclude_ips",
                format!("at most {MAX_EXCLUDED} addresses or networks"),
            ));
        }
        for (i, ip) in self.exclude_ips.iter().enumerate() {
            if parse_net(ip).is_none() {
                return Err(SettingsError::new(
                    format!("exclude_ips[{i}]"),
                    "an IP address or a network in CIDR form (203.0.113.0/24)",
                ));
            }
        }
        if self.goals.len() > MAX_GOALS {
            return Err(SettingsError::new(
                "goals",
                format!("at most {MAX_GOALS} goals"),
            ));
        }
        let mut names = HashSet::new();
        for (i, g) in self.goals.iter().enumerate() {
            let field = format!("goals[{i}]");
            match (&g.event, &g.page) {
                (Some(e), None) if text_ok(e, MAX_GOAL_CHARS) => {}
                (None, Some(p)) if text_ok(p, MAX_GOAL_CHARS) && p.starts_with('/') => {}
                (Some(_), Some(_)) | (None, None) => {
                    return Err(SettingsError::new(
                        field,
                        "a goal is {\"event\": NAME} or {\"page\": PATTERN}",
                    ));
                }
                _ => {
                    return Err(SettingsError::new(
                        field,
                        format!(
                            "a goal's event name is 1-{MAX_GOAL_CHARS} characters; a page \
                             pattern starts with / (`*` within a segment, `**` across)"
                        ),
                    ));
                }
            }
            if !names.insert(g.name()) {
                return Err(SettingsError::new(field, "the same goal twice"));
            }
        }
        Ok(())
    }

    /// The zone of the site's queries when they name none.
    pub fn zone(&self) -> Zone {
        self.timezone
            .as_deref()
            .and_then(Zone::parse)
            .unwrap_or_default()
    }

    /// Whether events from `hostname` (as stored: lowercase, no `www.`)
    /// count for the site.
    pub fn allows_hostname(&self, hostname: &str) -> bool {
        self.hostnames.is_empty()
            || self.hostnames.iter().any(|h| match h.strip_prefix("*.") {
                Some(parent) => hostname
                    .strip_suffix(parent)
                    .is_some_and(|sub| sub.len() > 1 && sub.ends_with('.')),
                None => h == hostname,
            })
    }
}

fn parse_net(s: &str) -> Option<IpNet> {
    let s = s.trim();
    s.parse::<IpNet>()
        .ok()
        .or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
}

/// A registered site, checked and ready for the hot path.
#[derive(Debug, Clone)]
pub struct SiteConfig {
    pub site_id: SiteId,
    pub settings: SiteSettings,
    excluded: Vec<IpNet>,
}

impl SiteConfig {
    pub fn new(site_id: SiteId, settings: SiteSettings) -> Self {
        let excluded = settings
            .exclude_ips
            .iter()
            .filter_map(|s| parse_net(s))
            .collect();
        Self {
            site_id,
            settings,
            excluded,
        }
    }

    /// Whether events from the client `ip` are dropped.
    pub fn excludes(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.excluded.iter().any(|n| n.contains(&ip))
    }

    /// Why an event for this site is dropped, if it is: sent from an
    /// excluded address, or from a page of a hostname the site does not
    /// allow. An event without a hostname (a server's, through `/event`)
    /// passes the hostname check unless `needs_hostname` (a browser's).
    pub fn drops(
        &self,
        ip: IpAddr,
        hostname: Option<&str>,
        needs_hostname: bool,
    ) -> Option<&'static str> {
        if self.excludes(ip) {
            return Some(EXCLUDED_IP);
        }
        match hostname {
            Some(h) if !self.settings.allows_hostname(h) => Some(HOSTNAME_NOT_ALLOWED),
            None if needs_hostname && !self.settings.hostnames.is_empty() => {
                Some(HOSTNAME_NOT_ALLOWED)
            }
            _ => None,
        }
    }

    /// The settings as the admin API shows them, with the site id.
    pub fn to_json(&self) -> Value {
        let mut v = serde_json::to_value(&self.settings).unwrap_or_else(|_| json!({}));
        if let Value::Object(m) = &mut v {
            m.insert("site_id".into(), self.site_id.as_str().into());
        }
        v
    }
}

/// A read token made at run time. The token itself is shown once, when it
/// is made; only its digest is kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Public handle, for listing and revoking.
    pub id: String,
    /// SHA-256 of the token, hex.
    pub digest: String,
    /// The sites it may read; never empty.
    pub sites: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Epoch ms.
    pub created_at: i64,
}

impl TokenRecord {
    /// Makes a new token for `sites`: the record to keep, and the token to
    /// hand over once.
    pub fn create(
        sites: Vec<SiteId>,
        label: Option<String>,
        now_ms: i64,
    ) -> Result<(TokenRecord, String), SettingsError> {
        if sites.is_empty() || sites.len() > 100 {
            return Err(SettingsError::new(
                "sites",
                "a read token names 1 to 100 sites",
            ));
        }
        if let Some(l) = &label
            && !text_ok(l, MAX_LABEL_CHARS)
        {
            return Err(SettingsError::new(
                "label",
                format!("a label is 1-{MAX_LABEL_CHARS} characters"),
            ));
        }
        let mut secret = [0u8; 32];
        let mut handle = [0u8; 8];
        getrandom::fill(&mut secret)
            .and_then(|()| getrandom::fill(&mut handle))
            .map_err(|_| SettingsError::new("", "no randomness available"))?;
        // Characters of a bearer token, and of a URL's query value.
        let token = format!("evt_{}", hex(&secret));
        let mut names: Vec<String> = sites.into_iter().map(|s| s.as_str().to_owned()).collect();
        names.sort();
        names.dedup();
        let record = TokenRecord {
            id: hex(&handle),
            digest: hex(&crate::access::digest(&token)),
            sites: names,
            label,
            created_at: now_ms,
        };
        Ok((record, token))
    }

    /// What listings show: never the digest.
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "sites": self.sites,
            "label": self.label,
            "created_at": Zone::default().format_instant(self.created_at),
        })
    }
}

/// The dashboard of `site` with `token` in the link (after the service's
/// address and `base`, the `BASE_PATH`): whoever opens it reads that site.
pub fn share_path(base: &str, site: &str, token: &str) -> String {
    // The site id as one path segment: every byte but the unreserved ones
    // escaped, as the dashboard decodes it (`decodeURIComponent`).
    let segment: String = site
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect();
    format!("{base}/dashboard/{segment}?auth={token}")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if s.len() != 64 {
        return None;
    }
    for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
        let text = std::str::from_utf8(chunk).ok()?;
        out[i] = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}

/// What the store keeps of the registry, read at once.
#[derive(Debug, Clone, Default)]
pub struct Stored {
    /// (site id, settings as JSON).
    pub sites: Vec<(String, Value)>,
    pub tokens: Vec<TokenRecord>,
}

/// The registry as the handlers read it.
#[derive(Debug, Default)]
pub struct Snapshot {
    sites: HashMap<String, Arc<SiteConfig>>,
    /// The run-time read tokens, for [`StatsTokens::authenticate`].
    pub tokens: StatsTokens,
}

impl Snapshot {
    pub fn from_stored(stored: Stored) -> Self {
        let mut sites = HashMap::new();
        for (id, value) in stored.sites {
            // A record a newer version wrote, or a hand-edited one, that
            // does not read is left out (and logged), not fatal.
            let parsed = SiteId::parse(id.as_str())
                .ok()
                .zip(SiteSettings::parse(&value).ok());
            match parsed {
                Some((site, settings)) => {
                    sites.insert(id, Arc::new(SiteConfig::new(site, settings)));
                }
                None => {
                    tracing::warn!(site = %id.escape_debug(), "site settings unreadable; ignored")
                }
            }
        }
        let tokens = StatsTokens::from_digests(stored.tokens.iter().filter_map(|t| {
            Some((
                unhex(&t.digest)?,
                Some(t.sites.iter().cloned().collect::<HashSet<String>>()),
            ))
        }));
        Snapshot { sites, tokens }
    }

    pub fn site(&self, site_id: &str) -> Option<&Arc<SiteConfig>> {
        self.sites.get(site_id)
    }

    /// Whether any registered site is public.
    pub fn has_public(&self) -> bool {
        self.sites.values().any(|s| s.settings.public)
    }

    pub fn is_public(&self, site_id: &str) -> bool {
        self.site(site_id).is_some_and(|s| s.settings.public)
    }

    /// Registered sites, in id order.
    pub fn sites(&self) -> Vec<&Arc<SiteConfig>> {
        let mut all: Vec<_> = self.sites.values().collect();
        all.sort_by(|a, b| a.site_id.as_str().cmp(b.site_id.as_str()));
        all
    }

    pub fn is_empty(&self) -> bool {
        self.sites.is_empty() && self.tokens.is_empty()
    }
}

/// The live registry of a process.
pub struct Registry {
    current: RwLock<Arc<Snapshot>>,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            current: RwLock::new(Arc::new(Snapshot::default())),
        }
    }
}

impl Registry {
    /// The registry as last read.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Reads the registry from the store again.
    pub async fn refresh(&self, store: &dyn Store) -> Result<(), StoreError> {
        let stored = store.registry().await?;
        let snapshot = Arc::new(Snapshot::from_stored(stored));
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = snapshot;
        Ok(())
    }
}

/// Reads the registry again every [`REFRESH_EVERY`] until `shutdown`, so
/// that changes made by other processes apply here within that time.
pub async fn run_refresh(
    registry: Arc<Registry>,
    store: Arc<dyn Store>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(REFRESH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        if let Err(e) = registry.refresh(&*store).await {
            tracing::warn!(error = %e, "could not read the site registry; keeping the last one");
        }
    }
}

/// Whether `path` matches a page goal's pattern: `*` is any run of
/// characters but `/`, `**` any run at all, the rest literal.
pub fn page_matches(pattern: &str, path: &str) -> bool {
    // Tokens of the pattern: literal chars, Star (no '/'), DoubleStar.
    #[derive(Clone, Copy, PartialEq)]
    enum T {
        Lit(char),
        Star,
        Any,
    }
    let mut tokens = Vec::new();
    let mut chars = pattern.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '*' {
            if chars.peek() == Some(&'*') {
                chars.next();
                while chars.peek() == Some(&'*') {
                    chars.next();
                }
                tokens.push(T::Any);
            } else {
                tokens.push(T::Star);
            }
        } else {
            tokens.push(T::Lit(c));
        }
    }
    let text: Vec<char> = path.chars().collect();
    // reach[j]: the pattern so far can end right before text[j]. O(n·m),
    // both bounded (a pattern is at most 200 characters, a path 2 KiB).
    let mut reach = vec![false; text.len() + 1];
    reach[0] = true;
    for t in tokens {
        let mut next = vec![false; text.len() + 1];
        match t {
            T::Lit(c) => {
                for j in 0..text.len() {
                    if reach[j] && text[j] == c {
                        next[j + 1] = true;
                    }
                }
            }
            T::Star | T::Any => {
                let mut on = false;
                for j in 0..=text.len() {
                    on |= reach[j];
                    next[j] = on;
                    if j < text.len() && t == T::Star && text[j] == '/' {
                        on = false;
                    }
                }
            }
        }
        reach = next;
    }
    reach[text.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_patterns_match_as_plausible_goals_do() {
        for (pattern, path, expected) in [
            ("/blog", "/blog", true),
            ("/blog", "/blog/", false),
            ("/blog/*", "/blog/post-1", true),
            ("/blog/*", "/blog/", true),
            ("/blog/*", "/blog/2024/post", false),
            ("/blog/**", "/blog/2024/post", true),
            ("/blog/**", "/blogs", false),
            ("/*/pricing", "/en/pricing", true),
            ("/*/pricing", "/en/us/pricing", false),
            ("/**/pricing", "/en/us/pricing", true),
            ("/a*b", "/ab", true),
            ("/a*b", "/a/b", false),
            ("/**", "/", true),
        ] {
            assert_eq!(page_matches(pattern, path), expected, "{pattern} {path}");
        }
    }

    #[test]
    fn settings_are_checked_and_named() {
        let ok = SiteSettings::parse(&json!({
            "timezone": "Europe/Paris", "public": true,
            "hostnames": ["WWW.Shop.example", "*.shop.example"],
            "exclude_ips": ["203.0.113.7", "2001:db8::/48"],
            "goals": [{"event": "Signup"}, {"page": "/blog/**"}],
        }))
        .unwrap();
        assert_eq!(ok.hostnames, ["shop.example", "*.shop.example"]);
        assert_eq!(ok.goals[1].name(), "Visit /blog/**");
        for (bad, field) in [
            (json!({"timezone": "Mars/Olympus"}), "timezone"),
            (json!({"hostnames": ["a b"]}), "hostnames[0]"),
            (json!({"exclude_ips": ["10.0.0.0/33"]}), "exclude_ips[0]"),
            (json!({"goals": [{"event": "a", "page": "/b"}]}), "goals[0]"),
            (json!({"goals": [{"page": "blog"}]}), "goals[0]"),
            (
                json!({"goals": [{"event": "a"}, {"event": "a"}]}),
                "goals[1]",
            ),
        ] {
            assert_eq!(SiteSettings::parse(&bad).unwrap_err().field, field, "{bad}");
        }
        assert!(SiteSettings::parse(&json!({"colour": "red"})).is_err());
        assert!(SiteSettings::parse(&json!([])).is_err());
    }

    #[test]
    fn hostnames_and_addresses() {
        let s = SiteSettings::parse(&json!({
            "hostnames": ["shop.example", "*.blog.example"],
            "exclude_ips": ["203.0.113.0/24", "2001:db8::1"],
        }))
        .unwrap();
        assert!(s.allows_hostname("shop.example"));
        assert!(s.allows_hostname("en.blog.example"));
        assert!(!s.allows_hostname("blog.example"));
        assert!(!s.allows_hostname("evilblog.example"));
        assert!(!s.allows_hostname("shop.example.evil"));
        assert!(SiteSettings::default().allows_hostname("anything"));
        let c = SiteConfig::new("s".parse().unwrap(), s);
        assert!(c.excludes("203.0.113.99".parse().unwrap()));
        assert!(c.excludes("::ffff:203.0.113.5".parse().unwrap()));
        assert!(c.excludes("2001:db8::1".parse().unwrap()));
        assert!(!c.excludes("2001:db8::2".parse().unwrap()));
        assert!(!c.excludes("198.51.100.1".parse().unwrap()));
    }

    #[test]
    fn tokens_are_kept_as_digests_and_scoped() {
        let (record, token) =
            TokenRecord::create(vec!["b".parse().unwrap(), "a".parse().unwrap()], None, 0).unwrap();
        assert!(token.starts_with("evt_") && token.len() == 68);
        assert!(!record.to_json().to_string().contains(&token));
        assert!(!record.to_json().to_string().contains(&record.digest));
        let snap = Snapshot::from_stored(Stored {
            sites: vec![],
            tokens: vec![record],
        });
        let header = format!("Bearer {token}");
        let i = snap
            .tokens
            .authenticate(Some(header.as_bytes()))
            .unwrap()
            .unwrap();
        assert!(snap.tokens.authorize(i, "a").is_ok());
        assert!(snap.tokens.authorize(i, "c").is_err());
        assert!(TokenRecord::create(vec![], None, 0).is_err());
    }

    #[test]
    fn share_links_name_the_site_as_one_path_segment() {
        assert_eq!(
            share_path("/analytics", "my site/ü", "evt_1"),
            "/analytics/dashboard/my%20site%2F%C3%BC?auth=evt_1"
        );
        assert_eq!(
            share_path("", "shop.example", "t"),
            "/dashboard/shop.example?auth=t"
        );
    }
}
