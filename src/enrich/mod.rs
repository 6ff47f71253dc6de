//! What a browser's request says about its visitor: the browser, system
//! and device from the User-Agent ([`ua`]), the country from the client's
//! address ([`country`]), where the visitor came from and the campaign from
//! the page's URL and referrer ([`source`]).
//!
//! Nothing here is downloaded: the User-Agent rules and the address ranges
//! ship inside the binary. The address is only looked up, never kept.

pub mod source;
pub mod ua;

use std::net::IpAddr;

use crate::event::Context;

/// The country (ISO 3166-1 alpha-2) an address is registered in, from the
/// Regional Internet Registries' delegations (the `iptocc` crate embeds
/// them; MIT or Apache-2.0). That is where the block was assigned, which
/// agrees with commercial geolocation for about 95 % of IPv4 addresses.
/// Private, loopback and other unassigned addresses have none.
pub fn country(ip: IpAddr) -> Option<&'static str> {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    iptocc::country_code(ip).filter(|c| c.len() == 2 && *c != "ZZ")
}

/// Fills `ctx` from a browser's request: its User-Agent (parsed by
/// `agents`), its client address and what its URL and referrer said.
/// Returns whether the User-Agent is a bot's.
pub fn from_request(
    ctx: &mut Context,
    agents: &ua::Agents,
    user_agent: &str,
    ip: Option<IpAddr>,
    origin: source::Origin,
) -> bool {
    let agent = agents.get(user_agent);
    ctx.browser.clone_from(&agent.browser);
    ctx.browser_version.clone_from(&agent.browser_version);
    ctx.os.clone_from(&agent.os);
    ctx.os_version.clone_from(&agent.os_version);
    ctx.device = agent.device.map(|d| d.name().to_owned());
    ctx.country = ip.and_then(country).map(str::to_owned);
    ctx.hostname = origin.hostname;
    ctx.referrer = origin.referrer;
    ctx.source = origin.source;
    ctx.utm_source = origin.utm_source;
    ctx.utm_medium = origin.utm_medium;
    ctx.utm_campaign = origin.utm_campaign;
    ctx.utm_content = origin.utm_content;
    ctx.utm_term = origin.utm_term;
    agent.bot
}

/// Completes what a server sent explicitly (`/event`): a referrer given as
/// a URL is stored as a browser's would be, and names the source when the
/// server did not.
pub fn complete(ctx: &mut Context) {
    let Some(referrer) = ctx.referrer.as_deref() else {
        return;
    };
    let o = source::origin(None, Some(referrer), false);
    if o.referrer.is_some() {
        if ctx.source.is_none() {
            ctx.source = o.source;
        }
        ctx.referrer = o.referrer;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn countries_come_from_public_addresses_only() {
        let at = |s: &str| country(s.parse().unwrap());
        assert_eq!(at("8.8.8.8"), Some("US"));
        assert_eq!(at("::ffff:8.8.8.8"), Some("US"));
        assert_eq!(at("2001:4860:4860::8888"), Some("US"));
        assert_eq!(at("1.0.16.1"), Some("JP"));
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "192.168.0.1",
            "::1",
            "fe80::1",
            "0.0.0.0",
        ] {
            assert_eq!(at(private), None, "{private}");
        }
    }

    #[test]
    fn a_sent_referrer_is_stored_as_a_browsers() {
        let mut ctx = Context {
            referrer: Some("https://www.google.com/search?q=secret".into()),
            ..Context::default()
        };
        complete(&mut ctx);
        assert_eq!(ctx.referrer.as_deref(), Some("google.com/search"));
        assert_eq!(ctx.source.as_deref(), Some("Google"));
        // What the server named stays.
        let mut ctx = Context {
            referrer: Some("https://t.co/x".into()),
            source: Some("Campaign".into()),
            ..Context::default()
        };
        complete(&mut ctx);
        assert_eq!(ctx.source.as_deref(), Some("Campaign"));
        // Not a URL: kept as sent.
        let mut ctx = Context {
            referrer: Some("newsletter".into()),
            ..Context::default()
        };
        complete(&mut ctx);
        assert_eq!(ctx.referrer.as_deref(), Some("newsletter"));
    }
}
