//! Access control: who may read stats, which sites may send events.
//!
//! - **Stats tokens** (`STATS_TOKENS`): once any is configured, `GET /stats`
//!   needs `Authorization: Bearer <token>`, and a token may be limited to some
//!   sites. No token, or one that is not configured, is 401; a configured
//!   token asking for a site outside its list is 403 (RFC 6750's
//!   `invalid_token` and `insufficient_scope`).
//! - **Ingest allow-list** (`INGEST_SITES`): when set, events of other sites
//!   are refused with 403 and never queued.
//!
//! Tokens are kept only as SHA-256 digests, compared in constant time against
//! every configured digest (no early exit, so the time taken says nothing
//! about how close a guess was), and never logged: `Debug` prints how many
//! there are, not what they are.

use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};

use crate::event::MAX_NAME_CHARS;
use crate::sites::Snapshot;

/// Shortest token accepted: a guessable token is no protection.
pub const MIN_TOKEN_CHARS: usize = 16;
const MAX_TOKEN_CHARS: usize = 512;

/// Characters of an RFC 6750 bearer token (`b64token`), less `=`, which
/// separates a token from its sites in `STATS_TOKENS`.
fn token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-._~+/".contains(c)
}

/// A site id as events carry it: 1-100 characters, no control characters.
fn valid_site(s: &str) -> bool {
    !s.is_empty() && s.chars().count() <= MAX_NAME_CHARS && !s.chars().any(char::is_control)
}

#[derive(Clone)]
struct StatsToken {
    digest: [u8; 32],
    /// `None`: every site.
    sites: Option<HashSet<String>>,
}

/// The configured read tokens. Empty: stats need no token.
#[derive(Clone, Default)]
pub struct StatsTokens(Vec<StatsToken>);

impl fmt::Debug for StatsTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StatsTokens({} configured, redacted)", self.0.len())
    }
}

/// SHA-256 of a token: what is kept of it.
pub fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Why a stats request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// No `Authorization` header: 401.
    Missing,
    /// Not a bearer token, or one that is not configured: 401.
    Invalid,
    /// A configured token that may not read this site: 403.
    Forbidden,
}

impl FromStr for StatsTokens {
    type Err = String;

    /// `token`, `token=*` (every site) or `token=site-a|site-b`, separated by
    /// commas or whitespace. Error messages name the entry by position, never
    /// by its text.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut tokens = Vec::new();
        let mut seen = HashSet::new();
        let entries = s
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|e| !e.is_empty());
        for (i, entry) in entries.enumerate() {
            let n = i + 1;
            let (token, sites) = match entry.split_once('=') {
                None => (entry, None),
                Some((t, "*")) => (t, None),
                Some((t, list)) => {
                    let sites: HashSet<String> =
                        list.split('|').map(str::to_owned).collect::<HashSet<_>>();
                    if sites.iter().any(|s| !valid_site(s)) {
                        return Err(format!(
                            "entry {n}: sites must be `*` or site ids separated by `|`"
                        ));
                    }
                    (t, Some(sites))
                }
            };
            let chars = token.chars().count();
            if !(MIN_TOKEN_CHARS..=MAX_TOKEN_CHARS).contains(&chars) {
                return Err(format!(
                    "entry {n}: a token must be {MIN_TOKEN_CHARS} to {MAX_TOKEN_CHARS} characters"
                ));
            }
            if !token.chars().all(token_char) {
                return Err(format!(
                    "entry {n}: a token may hold only letters, digits and - . _ ~ + /"
                ));
            }
            let digest = digest(token);
            if !seen.insert(digest) {
                return Err(format!("entry {n}: the same token is listed twice"));
            }
            tokens.push(StatsToken { digest, sites });
        }
        Ok(StatsTokens(tokens))
    }
}

impl StatsTokens {
    /// Tokens known by their digests (the registry's run-time tokens),
    /// each with its sites (`None`: every site).
    pub fn from_digests(
        tokens: impl IntoIterator<Item = ([u8; 32], Option<HashSet<String>>)>,
    ) -> Self {
        StatsTokens(
            tokens
                .into_iter()
                .map(|(digest, sites)| StatsToken { digest, sites })
                .collect(),
        )
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The index of the configured token equal to `presented`, looking at
    /// every one of them whatever the outcome.
    fn find(&self, presented: &str) -> Option<usize> {
        let presented = digest(presented);
        let mut found = subtle::CtOption::new(0u64, 0u8.into());
        for (i, t) in self.0.iter().enumerate() {
            let candidate = subtle::CtOption::new(i as u64, presented.ct_eq(&t.digest));
            found = subtle::CtOption::conditional_select(&found, &candidate, candidate.is_some());
        }
        Option::<u64>::from(found).map(|i| i as usize)
    }

    /// Checks the `Authorization` header (its raw value, if any) for `site`.
    /// With no token configured every request may read.
    pub fn check(&self, authorization: Option<&[u8]>, site: &str) -> Result<(), Denied> {
        self.authenticate(authorization)?
            .map_or(Ok(()), |i| self.authorize(i, site))
    }

    /// `Ok(None)` when no token is configured; `Ok(Some(i))`: the token
    /// presented is the `i`th.
    pub fn authenticate(&self, authorization: Option<&[u8]>) -> Result<Option<usize>, Denied> {
        if self.is_empty() {
            return Ok(None);
        }
        let presented = authorization
            .ok_or(Denied::Missing)
            .map(|v| std::str::from_utf8(v).ok())?
            .and_then(|v| {
                let (scheme, rest) = v.trim().split_once(' ')?;
                scheme
                    .eq_ignore_ascii_case("bearer")
                    .then(|| rest.trim_start())
            })
            .ok_or(Denied::Invalid)?;
        self.find(presented).map(Some).ok_or(Denied::Invalid)
    }

    /// May the `i`th token read `site`?
    pub fn authorize(&self, i: usize, site: &str) -> Result<(), Denied> {
        match self.0.get(i).map(|t| &t.sites) {
            Some(None) => Ok(()),
            Some(Some(sites)) if sites.contains(site) => Ok(()),
            _ => Err(Denied::Forbidden),
        }
    }
}

/// Who reads stats, as far as the token they present says.
#[derive(Debug, Clone)]
pub enum Reader {
    /// Reads are open (no `STATS_TOKENS`): every site.
    Open,
    /// No token presented: public sites only.
    Anonymous,
    /// A valid token (from `STATS_TOKENS` or made at run time) for these
    /// sites; `None`: every site.
    Token(Option<HashSet<String>>),
}

impl Reader {
    /// May this reader read `site`? Public sites ([`crate::sites`]) need no
    /// token.
    pub fn may_read(&self, site: &str, registry: &Snapshot) -> Result<(), Denied> {
        match self {
            Reader::Open | Reader::Token(None) => Ok(()),
            Reader::Token(Some(sites)) if sites.contains(site) => Ok(()),
            _ if registry.is_public(site) => Ok(()),
            Reader::Anonymous => Err(Denied::Missing),
            Reader::Token(_) => Err(Denied::Forbidden),
        }
    }
}

/// Why a request to the data owner's controls is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminDenied {
    /// No ADMIN_TOKENS, and stats are not open: 403.
    Disabled,
    Token(Denied),
}

/// The sites allowed to send events (`INGEST_SITES`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteList(HashSet<String>);

impl FromStr for SiteList {
    type Err = String;

    /// Site ids separated by commas (spaces around them are ignored).
    fn from_str(s: &str) -> Result<Self, String> {
        let sites: HashSet<String> = s
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(str::to_owned)
            .collect();
        if let Some(bad) = sites.iter().find(|s| !valid_site(s)) {
            return Err(format!(
                "`{}` is not a site id (1-{MAX_NAME_CHARS} characters, no control characters)",
                bad.escape_debug()
            ));
        }
        Ok(SiteList(sites))
    }
}

impl SiteList {
    pub fn allows(&self, site: &str) -> bool {
        self.0.contains(site)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Access settings as the handlers use them.
#[derive(Debug, Clone, Default)]
pub struct Access {
    pub stats_tokens: StatsTokens,
    /// Tokens of the data owner's controls (`ADMIN_TOKENS`).
    pub admin_tokens: StatsTokens,
    /// With no admin token configured, whether those controls are open:
    /// only where stats are open without being made public (loopback).
    pub admin_open: bool,
    /// `None`: every site may send events.
    pub ingest_sites: Option<SiteList>,
}

impl Access {
    /// May the bearer of `authorization` use the data owner's controls on
    /// `site`?
    pub fn admin(&self, authorization: Option<&[u8]>, site: &str) -> Result<(), AdminDenied> {
        if self.admin_tokens.is_empty() {
            return match self.admin_open {
                true => Ok(()),
                false => Err(AdminDenied::Disabled),
            };
        }
        self.admin_tokens
            .check(authorization, site)
            .map_err(AdminDenied::Token)
    }

    /// Who presents `authorization`, for reading stats: checked against
    /// `STATS_TOKENS` and the registry's run-time tokens. A request without
    /// a token goes on only if some site is public; an unknown token never.
    pub fn reader(
        &self,
        authorization: Option<&[u8]>,
        registry: &Snapshot,
    ) -> Result<Reader, Denied> {
        if self.stats_tokens.is_empty() {
            return Ok(Reader::Open);
        }
        let scope = |tokens: &StatsTokens, i: usize| tokens.0.get(i).and_then(|t| t.sites.clone());
        match self.stats_tokens.authenticate(authorization) {
            Ok(Some(i)) => Ok(Reader::Token(scope(&self.stats_tokens, i))),
            Ok(None) => Ok(Reader::Open),
            Err(Denied::Missing) if registry.has_public() => Ok(Reader::Anonymous),
            Err(Denied::Invalid) if !registry.tokens.is_empty() => {
                match registry.tokens.authenticate(authorization) {
                    Ok(Some(i)) => Ok(Reader::Token(Some(
                        scope(&registry.tokens, i).unwrap_or_default(),
                    ))),
                    _ => Err(Denied::Invalid),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// The sites the bearer of `authorization` may manage: `None` every
    /// site (an unscoped admin token, or open controls).
    pub fn admin_scope(
        &self,
        authorization: Option<&[u8]>,
    ) -> Result<Option<HashSet<String>>, AdminDenied> {
        if self.admin_tokens.is_empty() {
            return match self.admin_open {
                true => Ok(None),
                false => Err(AdminDenied::Disabled),
            };
        }
        match self.admin_tokens.authenticate(authorization) {
            Ok(Some(i)) => Ok(self.admin_tokens.0.get(i).and_then(|t| t.sites.clone())),
            Ok(None) => Ok(None),
            Err(e) => Err(AdminDenied::Token(e)),
        }
    }

    pub fn ingest_allowed(&self, site: &str) -> bool {
        self.ingest_sites.as_ref().is_none_or(|l| l.allows(site))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "token-for-site-a-0001";
    const ALL: &str = "token-for-everything-01";

    fn tokens() -> StatsTokens {
        format!("{A}=site-a|site-c, {ALL}").parse().unwrap()
    }

    fn bearer(t: &str) -> Vec<u8> {
        format!("Bearer {t}").into_bytes()
    }

    #[test]
    fn no_tokens_means_open() {
        let t: StatsTokens = "".parse().unwrap();
        assert!(t.is_empty());
        assert_eq!(t.check(None, "x"), Ok(()));
    }

    #[test]
    fn tokens_are_scoped_to_their_sites() {
        let t = tokens();
        assert_eq!(t.check(Some(&bearer(A)), "site-a"), Ok(()));
        assert_eq!(t.check(Some(&bearer(A)), "site-c"), Ok(()));
        assert_eq!(t.check(Some(&bearer(A)), "site-b"), Err(Denied::Forbidden));
        assert_eq!(t.check(Some(&bearer(ALL)), "site-b"), Ok(()));
        assert_eq!(
            t.check(Some(b"bearer  token-for-everything-01"), "b"),
            Ok(())
        );
    }

    #[test]
    fn missing_malformed_or_unknown_tokens_are_unauthorized() {
        let t = tokens();
        assert_eq!(t.check(None, "site-a"), Err(Denied::Missing));
        for header in [
            Some(&b""[..]),
            Some(&b"Bearer"[..]),
            Some(&b"Basic dXNlcjpwYXNz"[..]),
            Some(&b"Bearer token-for-site-a-0002"[..]),
            Some(&b"Bearer token-for-site-a-000"[..]),
            Some(&b"Bearer \xff\xfe"[..]),
            Some(&b"token-for-site-a-0001"[..]),
        ] {
            assert_eq!(
                t.check(header, "site-a"),
                Err(Denied::Invalid),
                "{header:?}"
            );
        }
    }

    #[test]
    fn bad_lists_are_refused_without_echoing_the_token() {
        for (list, expected) in [
            ("short", "entry 1: a token must be"),
            (
                "token-for-site-a-0001, token!for-site-a-0002",
                "entry 2: a token may hold only",
            ),
            ("token-for-site-a-0001=", "entry 1: sites"),
            ("token-for-site-a-0001=a||b", "entry 1: sites"),
            (
                "token-for-site-a-0001 token-for-site-a-0001",
                "entry 2: the same token",
            ),
            ("token:for-site-a-0001", "entry 1: a token may hold only"),
        ] {
            let e = list.parse::<StatsTokens>().unwrap_err();
            assert!(e.contains(expected), "{list}: {e}");
            assert!(!e.contains("token-for") && !e.contains("short"), "{e}");
        }
        assert!(!format!("{:?}", tokens()).contains("token-for"));
    }

    #[test]
    fn ingest_allow_list() {
        let open = Access::default();
        assert!(open.ingest_allowed("anything"));
        let access = Access {
            ingest_sites: Some(" site-a, site-b ,".parse().unwrap()),
            ..Access::default()
        };
        assert!(access.ingest_allowed("site-a") && access.ingest_allowed("site-b"));
        assert!(!access.ingest_allowed("site-c") && !access.ingest_allowed(" site-a"));
        assert!("a,\u{7}".parse::<SiteList>().is_err());
    }
}
