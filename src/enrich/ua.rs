//! The browser, operating system and device class of a User-Agent, and
//! whether it is a bot.
//!
//! Parsed by `ua-parser` with the rules of uap-core (`uap/regexes.json`,
//! converted once from uap-core 0.18.0's `regexes.yaml`, Apache-2.0: see
//! `uap/LICENSE`). The rules ship inside the binary: nothing is read or
//! downloaded at build or run time. Parsing runs a few hundred regular
//! expressions (prefiltered), some microseconds; results are cached per
//! distinct User-Agent ([`Agents`]), and real traffic repeats a few
//! thousand of them, so most events cost one hash lookup. The compiled
//! rules take about 14 MiB (`evtrack-bench enrich` measures all three).

use std::sync::{Arc, LazyLock};

/// What a User-Agent says.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Agent {
    pub browser: Option<String>,
    /// `major.minor`, as far as the User-Agent gives it.
    pub browser_version: Option<String>,
    pub os: Option<String>,
    pub os_version: Option<String>,
    pub device: Option<Device>,
    /// A crawler, a monitor, a headless browser: its events are dropped.
    pub bot: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Desktop,
    Mobile,
    Tablet,
}

impl Device {
    pub fn name(self) -> &'static str {
        match self {
            Device::Desktop => "Desktop",
            Device::Mobile => "Mobile",
            Device::Tablet => "Tablet",
        }
    }
}

/// The compiled rules, built on first use (about a quarter of a second;
/// the service builds them at start-up, see [`warm_up`]).
///
/// Of uap-core's device rules only those naming crawlers (`Spider`) are
/// kept: the others name phone and tablet models, which evtrack does not
/// show, and would cost 16 MiB of compiled expressions (the browser and
/// system rules take 12 MiB).
static EXTRACTOR: LazyLock<Option<ua_parser::Extractor<'static>>> = LazyLock::new(|| {
    let compiled =
        serde_json::from_str::<ua_parser::Regexes<'static>>(include_str!("uap/regexes.json"))
            .map_err(|e| e.to_string())
            .and_then(|mut regexes| {
                regexes
                    .device_parsers
                    .retain(|p| p.device_replacement.as_deref() == Some("Spider"));
                ua_parser::Extractor::try_from(regexes).map_err(|e| e.to_string())
            });
    match compiled {
        Ok(x) => Some(x),
        Err(e) => {
            tracing::error!(error = %e, "the User-Agent rules do not load");
            None
        }
    }
});

/// Compiles the rules now rather than on the first event.
pub fn warm_up() {
    LazyLock::force(&EXTRACTOR);
}

/// Words that mark an automated client where uap-core's rules do not (its
/// device rules already class most crawlers as `Spider`). Lower case.
const BOT_WORDS: [&str; 12] = [
    "headless",
    "bot",
    "crawler",
    "spider",
    "lighthouse",
    "phantomjs",
    "puppeteer",
    "playwright",
    "selenium",
    "pingdom",
    "uptime",
    "python-requests",
];

/// Parses a User-Agent (no cache: see [`Agents`]).
pub fn parse(ua: &str) -> Agent {
    let ua = ua.trim();
    if ua.is_empty() {
        return Agent::default();
    }
    let lower = ua.to_ascii_lowercase();
    let Some(x) = EXTRACTOR.as_ref() else {
        return Agent {
            bot: BOT_WORDS.iter().any(|w| lower.contains(w)),
            ..Agent::default()
        };
    };
    let (browser, os, device) = x.extract(ua);
    let mut bot = BOT_WORDS.iter().any(|w| lower.contains(w));
    if device.as_ref().is_some_and(|d| d.device == "Spider") {
        bot = true;
    }
    let browser = browser.filter(|b| b.family != "Other");
    if browser.as_ref().is_some_and(|b| {
        matches!(
            b.family.as_ref(),
            "HeadlessChrome" | "PhantomJS" | "Googlebot" | "Bingbot"
        )
    }) {
        bot = true;
    }
    let os = os.filter(|o| o.os != "Other");
    let version = |major: Option<&str>, minor: Option<&str>| {
        major.filter(|m| !m.is_empty()).map(|m| match minor {
            Some(n) if !n.is_empty() => format!("{m}.{n}"),
            _ => m.to_owned(),
        })
    };
    let os_name = os.as_ref().map(|o| os_name(&o.os).to_owned());
    let device = Some(device_class(&lower, os_name.as_deref()));
    Agent {
        browser: browser.as_ref().map(|b| browser_name(&b.family).to_owned()),
        browser_version: browser.as_ref().and_then(|b| version(b.major, b.minor)),
        os: os_name,
        os_version: os
            .as_ref()
            .and_then(|o| version(o.major.as_deref(), o.minor.as_deref())),
        device,
        bot,
    }
}

/// One name per browser whatever the platform: the same Chrome on a phone
/// and on a desktop (the device says which).
fn browser_name(family: &str) -> &str {
    match family {
        "Chrome Mobile" | "Chrome Mobile iOS" | "Chrome Mobile WebView" => "Chrome",
        "Mobile Safari" | "Mobile Safari UI/WKWebView" => "Safari",
        "Firefox Mobile" | "Firefox iOS" => "Firefox",
        "Edge Mobile" => "Edge",
        "Opera Mobile" => "Opera",
        "Samsung Internet" => "Samsung Internet",
        other => other,
    }
}

fn os_name(family: &str) -> &str {
    match family {
        "Mac OS X" => "macOS",
        other => other,
    }
}

/// Desktop, mobile or tablet. uap-core names devices, not their class: a
/// tablet is an iPad, a Kindle, or an Android device that does not say
/// `Mobile` (Android's own rule for phones); a phone says `Mobi` (the
/// convention every mobile browser follows), or is an iPhone or iPod.
fn device_class(lower: &str, os: Option<&str>) -> Device {
    let tablet_words = ["ipad", "tablet", "kindle", "silk/", "playbook"];
    if tablet_words.iter().any(|w| lower.contains(w)) {
        return Device::Tablet;
    }
    if os == Some("Android") && !lower.contains("mobile") {
        return Device::Tablet;
    }
    let phone_words = ["mobi", "iphone", "ipod", "windows phone", "opera mini"];
    if phone_words.iter().any(|w| lower.contains(w)) || matches!(os, Some("iOS" | "Android")) {
        return Device::Mobile;
    }
    Device::Desktop
}

/// Parsed User-Agents, by their text; bounded.
pub struct Agents {
    cache: quick_cache::sync::Cache<Box<str>, Arc<Agent>>,
}

/// Distinct User-Agents kept parsed (each a few hundred bytes).
const CACHED_AGENTS: usize = 20_000;
/// Longer User-Agents are parsed as their first this many bytes: a client
/// controls the header, and the rules' cost grows with its length.
pub const MAX_UA_BYTES: usize = 512;

impl Default for Agents {
    fn default() -> Self {
        Self {
            cache: quick_cache::sync::Cache::new(CACHED_AGENTS),
        }
    }
}

impl Agents {
    pub fn get(&self, ua: &str) -> Arc<Agent> {
        let mut end = ua.len().min(MAX_UA_BYTES);
        while !ua.is_char_boundary(end) {
            end -= 1;
        }
        let ua = &ua[..end];
        if let Some(a) = self.cache.get(ua) {
            return a;
        }
        let agent = Arc::new(parse(ua));
        self.cache.insert(ua.into(), Arc::clone(&agent));
        agent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Real User-Agents of the browsers and crawlers that make most
    /// traffic, and what a site owner should see for each.
    #[test]
    fn user_agents_give_browser_os_and_device() {
        type Case<'a> = (&'a str, Option<(&'a str, &'a str, &'a str, Device)>);
        let cases: &[Case] = &[
            (
                "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
                Some(("Chrome", "131.0", "Windows", Device::Desktop)),
            ),
            (
                "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Safari/605.1.15",
                Some(("Safari", "18.1", "macOS", Device::Desktop)),
            ),
            (
                "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
                Some(("Firefox", "133.0", "Ubuntu", Device::Desktop)),
            ),
            (
                "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Mobile/15E148 Safari/604.1",
                Some(("Safari", "18.1", "iOS", Device::Mobile)),
            ),
            (
                "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Mobile Safari/537.36",
                Some(("Chrome", "131.0", "Android", Device::Mobile)),
            ),
            (
                "Mozilla/5.0 (iPad; CPU OS 17_6 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.6 Mobile/15E148 Safari/604.1",
                Some(("Safari", "17.6", "iOS", Device::Tablet)),
            ),
            (
                "Mozilla/5.0 (Linux; Android 13; SM-X710) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/130.0.0.0 Safari/537.36",
                Some(("Chrome", "130.0", "Android", Device::Tablet)),
            ),
            (
                "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36 Edg/131.0.0.0",
                Some(("Edge", "131.0", "Windows", Device::Desktop)),
            ),
            (
                "Mozilla/5.0 (Linux; Android 14; SAMSUNG SM-S918B) AppleWebKit/537.36 (KHTML, like Gecko) SamsungBrowser/26.0 Chrome/122.0.0.0 Mobile Safari/537.36",
                Some(("Samsung Internet", "26.0", "Android", Device::Mobile)),
            ),
            // Crawlers and headless browsers are bots.
            (
                "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
                None,
            ),
            (
                "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm) Chrome/116.0.1938.76 Safari/537.36",
                None,
            ),
            (
                "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/131.0.0.0 Safari/537.36",
                None,
            ),
            (
                "Mozilla/5.0 (Linux; Android 11; moto g power (2022)) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/119.0.0.0 Mobile Safari/537.36 Chrome-Lighthouse",
                None,
            ),
            ("python-requests/2.32.3", None),
        ];
        for (ua, want) in cases {
            let a = parse(ua);
            match want {
                None => assert!(a.bot, "a bot: {ua}\n{a:?}"),
                Some((browser, version, os, device)) => {
                    assert!(!a.bot, "not a bot: {ua}");
                    assert_eq!(
                        (
                            a.browser.as_deref(),
                            a.browser_version.as_deref(),
                            a.os.as_deref(),
                            a.device
                        ),
                        (Some(*browser), Some(*version), Some(*os), Some(*device)),
                        "{ua}"
                    );
                }
            }
        }
        assert_eq!(parse(""), Agent::default());
        assert_eq!(
            parse("Mozilla/5.0 (Windows NT 10.0)").os_version.as_deref(),
            Some("10")
        );
    }

    #[test]
    fn agents_are_cached_and_bounded_in_length() {
        let agents = Agents::default();
        let ua = "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0";
        let a = agents.get(ua);
        assert!(
            Arc::ptr_eq(&a, &agents.get(ua)),
            "the second is the cached one"
        );
        // A huge header costs no more than its first bytes.
        let long = format!("{ua} {}", "é".repeat(10_000));
        assert_eq!(agents.get(&long).browser.as_deref(), Some("Firefox"));
    }
}
