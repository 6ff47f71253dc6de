//! `evtrack-bench enrich`: what finding a browser's request costs per
//! event (`evtrack::enrich`): compiling the User-Agent rules, parsing a
//! User-Agent not seen before, finding a parsed one in the cache, and a
//! country lookup. Figures of one core, in process.

use std::time::Instant;

use evtrack::enrich::{country, ua};

/// User-Agents of the kinds that make most traffic; each is made distinct
/// per round by a build suffix, so that uncached parses are real parses.
const AGENTS: [&str; 6] = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Safari/605.1.15",
    "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
];

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

pub fn run() -> anyhow::Result<()> {
    let before = rss_mib();
    let t = Instant::now();
    ua::warm_up();
    let build = t.elapsed();
    let rules = rss_mib() - before;
    let n = 3_000;
    let t = Instant::now();
    for i in 0..n {
        let agent = format!("{} build/{i}", AGENTS[i % AGENTS.len()]);
        std::hint::black_box(ua::parse(&agent));
    }
    let parse = t.elapsed() / n as u32;
    let agents = ua::Agents::default();
    for a in AGENTS {
        agents.get(a);
    }
    let m = 1_000_000;
    let t = Instant::now();
    for i in 0..m {
        std::hint::black_box(agents.get(AGENTS[i % AGENTS.len()]));
    }
    let cached = t.elapsed() / m as u32;
    let t = Instant::now();
    for i in 0..m as u32 {
        std::hint::black_box(country(std::net::IpAddr::V4(std::net::Ipv4Addr::from(
            i.wrapping_mul(2_654_435_761),
        ))));
    }
    let geo = t.elapsed() / m as u32;
    println!("User-Agent rules compiled in {build:.0?}, {rules:.1} MiB");
    println!("a new User-Agent parsed in {parse:.1?}");
    println!("a known User-Agent found in the cache in {cached:.0?}");
    println!("a country looked up in {geo:.0?}");
    Ok(())
}
