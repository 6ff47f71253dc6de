//! Where a visitor came from: the page's URL (its `utm_*`, `ref` and
//! `source` parameters) and the referrer.
//!
//! The source is, first, what the URL says (`utm_source`, else `source`,
//! else `ref`), then a known site's name for the referrer's host
//! ([`SITES`]: search engines, social networks, assistants, mail), then the
//! referrer's host itself. A page reached from the site itself, or with no
//! referrer at all, has none (`Direct / None` in answers). The table is
//! evtrack's own, kept short on purpose: the sites that bring most traffic,
//! under the names their users know.

use url::Url;

/// What an event's URL and referrer say about where its visitor came from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Origin {
    /// The page's path (fragment kept when asked: hash-based routing).
    pub path: Option<String>,
    pub hostname: Option<String>,
    /// Without scheme, leading `www.`, query and fragment.
    pub referrer: Option<String>,
    pub source: Option<String>,
    pub utm_source: Option<String>,
    pub utm_medium: Option<String>,
    pub utm_campaign: Option<String>,
    pub utm_content: Option<String>,
    pub utm_term: Option<String>,
}

/// Known sites: a host (matched with its subdomains) or a host's first
/// label followed by any public suffix (`google.` matches `google.de` and
/// `google.co.uk`), and the source's name.
pub const SITES: &[(&str, &str)] = &[
    // Search engines.
    ("google.", "Google"),
    ("bing.com", "Bing"),
    ("duckduckgo.com", "DuckDuckGo"),
    ("yahoo.", "Yahoo!"),
    ("yandex.", "Yandex"),
    ("ya.ru", "Yandex"),
    ("baidu.com", "Baidu"),
    ("ecosia.org", "Ecosia"),
    ("search.brave.com", "Brave"),
    ("startpage.com", "Startpage"),
    ("qwant.com", "Qwant"),
    ("naver.com", "Naver"),
    ("seznam.cz", "Seznam"),
    ("kagi.com", "Kagi"),
    // Social networks and communities.
    ("facebook.com", "Facebook"),
    ("fb.me", "Facebook"),
    ("instagram.com", "Instagram"),
    ("t.co", "Twitter"),
    ("twitter.com", "Twitter"),
    ("x.com", "Twitter"),
    ("linkedin.com", "LinkedIn"),
    ("lnkd.in", "LinkedIn"),
    ("reddit.com", "Reddit"),
    ("news.ycombinator.com", "Hacker News"),
    ("youtube.com", "YouTube"),
    ("youtu.be", "YouTube"),
    ("pinterest.", "Pinterest"),
    ("tiktok.com", "TikTok"),
    ("threads.net", "Threads"),
    ("bsky.app", "Bluesky"),
    ("mastodon.social", "Mastodon"),
    ("quora.com", "Quora"),
    ("medium.com", "Medium"),
    ("vk.com", "VKontakte"),
    ("t.me", "Telegram"),
    ("discord.com", "Discord"),
    ("producthunt.com", "Product Hunt"),
    ("github.com", "GitHub"),
    ("stackoverflow.com", "Stack Overflow"),
    ("wikipedia.org", "Wikipedia"),
    // Assistants.
    ("chatgpt.com", "ChatGPT"),
    ("chat.openai.com", "ChatGPT"),
    ("perplexity.ai", "Perplexity"),
    ("claude.ai", "Claude"),
    ("gemini.google.com", "Gemini"),
    ("copilot.microsoft.com", "Copilot"),
    // Mail.
    ("mail.google.com", "Gmail"),
    ("outlook.live.com", "Outlook"),
];

/// Short names people put in `utm_source` for the sites above.
const ALIASES: &[(&str, &str)] = &[
    ("fb", "Facebook"),
    ("ig", "Instagram"),
    ("tw", "Twitter"),
    ("x", "Twitter"),
    ("hn", "Hacker News"),
    ("li", "LinkedIn"),
    ("yt", "YouTube"),
];

/// Most bytes of a value read from a URL (a parameter, a referrer).
const MAX_VALUE_BYTES: usize = 256;

/// The name of the site at `host` (lower case, without `www.`), if known.
/// Longer (more specific) entries win: `mail.google.com` is Gmail, not
/// Google.
pub fn known_site(host: &str) -> Option<&'static str> {
    let mut best: Option<(&str, &str)> = None;
    for &(pattern, name) in SITES {
        let hit = match pattern.strip_suffix('.') {
            // `google.`: a label `google` followed by one or two labels
            // (`google.de`, `google.co.uk`, `www.google.com.br`).
            Some(label) => host.split('.').enumerate().any(|(i, l)| {
                let rest = host.split('.').count() - i - 1;
                l == label && (1..=2).contains(&rest)
            }),
            None => {
                host == pattern
                    || host
                        .strip_suffix(pattern)
                        .is_some_and(|sub| sub.ends_with('.'))
            }
        };
        if hit && best.is_none_or(|(p, _)| pattern.len() > p.len()) {
            best = Some((pattern, name));
        }
    }
    best.map(|(_, name)| name)
}

/// A source named in a URL parameter: a known site's name if it names one
/// (`google`, `fb`), else as written.
pub fn named_source(value: &str) -> String {
    let lower = value.to_ascii_lowercase();
    if let Some((_, name)) = ALIASES.iter().find(|(alias, _)| *alias == lower) {
        return (*name).to_owned();
    }
    if let Some((_, name)) = SITES
        .iter()
        .find(|(_, name)| name.to_ascii_lowercase() == lower)
    {
        return (*name).to_owned();
    }
    if let Some(name) = known_site(&lower) {
        return name.to_owned();
    }
    value.to_owned()
}

/// `host` without a leading `www.`, lower case.
fn bare_host(host: &str) -> String {
    let host = host.to_ascii_lowercase();
    match host.strip_prefix("www.") {
        Some(rest) if !rest.is_empty() => rest.to_owned(),
        _ => host,
    }
}

/// Cuts text from a URL to what is stored: bounded, no control characters.
fn clean(value: &str) -> Option<String> {
    let value = value.trim();
    if value.is_empty() {
        return None;
    }
    let mut end = value.len().min(MAX_VALUE_BYTES);
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    let v: String = value[..end].chars().filter(|c| !c.is_control()).collect();
    (!v.is_empty()).then_some(v)
}

/// Reads an event's page URL and referrer. `hash_routing`: the fragment is
/// part of the page (single-page apps that route by `#/path`).
pub fn origin(url: Option<&str>, referrer: Option<&str>, hash_routing: bool) -> Origin {
    let mut o = Origin::default();
    let page = url.and_then(|u| Url::parse(u).ok());
    if let Some(page) = &page {
        let mut path = page.path().to_owned();
        if hash_routing && let Some(f) = page.fragment() {
            path.push('#');
            path.push_str(f);
        }
        o.path = Some(path);
        o.hostname = page.host_str().map(bare_host);
        let mut named = [None, None, None];
        for (k, v) in page.query_pairs() {
            let v = clean(&v);
            match k.as_ref() {
                "utm_source" => o.utm_source = v,
                "utm_medium" => o.utm_medium = v,
                "utm_campaign" => o.utm_campaign = v,
                "utm_content" => o.utm_content = v,
                "utm_term" => o.utm_term = v,
                "source" => named[1] = v,
                "ref" => named[2] = v,
                _ => {}
            }
        }
        named[0] = o.utm_source.clone();
        o.source = named.into_iter().flatten().next().map(|s| named_source(&s));
    }
    let from = referrer
        .and_then(|r| Url::parse(r.trim()).ok())
        .filter(|r| {
            matches!(r.scheme(), "http" | "https" | "android-app") && r.host_str().is_some()
        });
    if let Some(from) = from {
        let host = bare_host(from.host_str().unwrap_or_default());
        // A page of the site itself is internal navigation, not a source.
        let internal = o.hostname.as_deref() == Some(host.as_str());
        if !internal {
            let path = from.path().trim_end_matches('/');
            o.referrer = clean(&format!("{host}{path}"));
            if o.source.is_none() {
                o.source = Some(known_site(&host).map_or_else(|| host.clone(), str::to_owned));
            }
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn referrers_and_parameters_name_the_source() {
        // (page URL, referrer, source, referrer as stored)
        type Case<'a> = (&'a str, Option<&'a str>, Option<&'a str>, Option<&'a str>);
        let cases: &[Case] = &[
            ("https://shop.example/", None, None, None),
            (
                "https://shop.example/",
                Some("https://www.google.com/"),
                Some("Google"),
                Some("google.com"),
            ),
            (
                "https://shop.example/",
                Some("https://www.google.co.uk/search?q=x"),
                Some("Google"),
                Some("google.co.uk/search"),
            ),
            (
                "https://shop.example/",
                Some("https://www.google.com.br/"),
                Some("Google"),
                Some("google.com.br"),
            ),
            (
                "https://shop.example/",
                Some("https://mail.google.com/mail/u/0/"),
                Some("Gmail"),
                Some("mail.google.com/mail/u/0"),
            ),
            (
                "https://shop.example/",
                Some("https://l.facebook.com/l.php?u=x"),
                Some("Facebook"),
                Some("l.facebook.com/l.php"),
            ),
            (
                "https://shop.example/",
                Some("https://t.co/abc"),
                Some("Twitter"),
                Some("t.co/abc"),
            ),
            (
                "https://shop.example/",
                Some("https://news.ycombinator.com/item?id=1"),
                Some("Hacker News"),
                Some("news.ycombinator.com/item"),
            ),
            (
                "https://shop.example/",
                Some("https://en.m.wikipedia.org/wiki/X"),
                Some("Wikipedia"),
                Some("en.m.wikipedia.org/wiki/X"),
            ),
            (
                "https://shop.example/",
                Some("https://duckduckgo.com/"),
                Some("DuckDuckGo"),
                Some("duckduckgo.com"),
            ),
            (
                "https://shop.example/",
                Some("https://chatgpt.com/"),
                Some("ChatGPT"),
                Some("chatgpt.com"),
            ),
            // Unknown sites are their host; `x.com` is not `notx.com`.
            (
                "https://shop.example/",
                Some("https://blog.friend.example/post/1"),
                Some("blog.friend.example"),
                Some("blog.friend.example/post/1"),
            ),
            (
                "https://shop.example/",
                Some("https://notx.com/"),
                Some("notx.com"),
                Some("notx.com"),
            ),
            (
                "https://shop.example/",
                Some("https://googleusercontent.example.org/"),
                Some("googleusercontent.example.org"),
                Some("googleusercontent.example.org"),
            ),
            // The site itself is not a source.
            (
                "https://shop.example/b",
                Some("https://shop.example/a"),
                None,
                None,
            ),
            (
                "https://www.shop.example/b",
                Some("https://shop.example/a"),
                None,
                None,
            ),
            // Parameters win over the referrer; known names are normalised.
            (
                "https://shop.example/?utm_source=newsletter&utm_medium=email",
                Some("https://www.google.com/"),
                Some("newsletter"),
                Some("google.com"),
            ),
            (
                "https://shop.example/?ref=producthunt.com",
                None,
                Some("Product Hunt"),
                None,
            ),
            (
                "https://shop.example/?source=fb",
                None,
                Some("Facebook"),
                None,
            ),
            (
                "https://shop.example/?utm_source=google",
                None,
                Some("Google"),
                None,
            ),
            // Not a web referrer.
            ("https://shop.example/", Some("about:blank"), None, None),
            ("https://shop.example/", Some("not a url"), None, None),
        ];
        for (url, referrer, source, stored) in cases {
            let o = origin(Some(url), *referrer, false);
            assert_eq!(
                (o.source.as_deref(), o.referrer.as_deref()),
                (*source, *stored),
                "{url} from {referrer:?}"
            );
        }
    }

    #[test]
    fn the_page_is_the_path_with_campaign_parameters_read_and_the_rest_dropped() {
        let o = origin(
            Some(
                "https://www.Shop.example/pricing?utm_campaign=black%20friday&utm_term=shoes&utm_content=a&token=secret#plans",
            ),
            None,
            false,
        );
        assert_eq!(o.path.as_deref(), Some("/pricing"));
        assert_eq!(o.hostname.as_deref(), Some("shop.example"));
        assert_eq!(o.utm_campaign.as_deref(), Some("black friday"));
        assert_eq!(
            (o.utm_term.as_deref(), o.utm_content.as_deref()),
            (Some("shoes"), Some("a"))
        );
        let o = origin(
            Some("https://shop.example/app#/settings/profile"),
            None,
            true,
        );
        assert_eq!(o.path.as_deref(), Some("/app#/settings/profile"));
        assert_eq!(origin(Some("nonsense"), None, false), Origin::default());
        // Values are bounded, whatever the URL holds.
        let long = format!("https://shop.example/?utm_source={}", "a".repeat(5_000));
        assert_eq!(
            origin(Some(&long), None, false).source.map(|s| s.len()),
            Some(MAX_VALUE_BYTES)
        );
    }
}
