//! The load generator: wrk with a Lua script, and the parser of its
//! `--latency` report.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;

use crate::procs::Proc;

/// One realistic page view per request; path and user vary with a
/// per-thread counter (threads are told apart in `setup`).
const SINGLE_LUA: &str = r#"-- evtrack-bench: POST /event, one realistic page view per request.
local threads = 0
function setup(thread)
  thread:set("tid", threads)
  threads = threads + 1
end

local counter = 0
local ts = "@TS@"
local headers = { ["Content-Type"] = "application/json" }

function request()
  counter = counter + 1
  local n = counter * 8 + (tid or 0)
  local body = string.format(
    '{"site_id":"site-001","event_type":"page_view","path":"/blog/post-%d","userid":"user-%d",' ..
    '"timestamp":"%s","props":{"plan":"pro","referrer":"https://news.example.com/"}}',
    n % 1000, (n * 7919) % 100000, ts)
  return wrk.format("POST", "/event", headers, body)
end
"#;

/// POST /events with a JSON array of @N@ events, each body built per request
/// (a thousand requests/s: cheap for wrk) so that paths and users keep
/// varying as in the single-event script — repeated bodies would flatter the
/// store's per-day aggregates.
const BATCH_LUA: &str = r#"-- evtrack-bench: POST /events, @N@ page views per request.
local threads = 0
function setup(thread)
  thread:set("tid", threads)
  threads = threads + 1
end

local ts = "@TS@"
local headers = { ["Content-Type"] = "application/json" }
local counter = 0
local events = {}

function request()
  for i = 1, @N@ do
    counter = counter + 1
    local n = counter * 8 + (tid or 0)
    events[i] = string.format(
      '{"site_id":"site-001","event_type":"page_view","path":"/blog/post-%d","userid":"user-%d",' ..
      '"timestamp":"%s","props":{"plan":"pro","referrer":"https://news.example.com/"}}',
      n % 1000, (n * 7919) % 100000, ts)
  end
  return wrk.format("POST", "/events", headers, "[" .. table.concat(events, ",") .. "]")
end
"#;

/// Writes the two scripts into `dir`; `ts` is the events' timestamp (RFC 3339).
pub fn write_scripts(dir: &Path, ts: &str, batch: usize) -> anyhow::Result<(PathBuf, PathBuf)> {
    let single = dir.join("single.lua");
    let batches = dir.join("batch.lua");
    std::fs::write(&single, SINGLE_LUA.replace("@TS@", ts))?;
    std::fs::write(
        &batches,
        BATCH_LUA
            .replace("@TS@", ts)
            .replace("@N@", &batch.to_string()),
    )?;
    Ok((single, batches))
}

#[derive(Debug, Clone, Serialize)]
pub struct WrkSettings {
    pub threads: u32,
    pub connections: u32,
    pub duration_s: u32,
}

/// What wrk reported.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WrkResult {
    /// Completed requests (any status).
    pub requests: u64,
    pub duration_s: f64,
    pub req_per_s: f64,
    /// Requests answered 2xx (`requests - non_2xx`).
    pub ok: u64,
    pub non_2xx: u64,
    pub socket_errors: SocketErrors,
    pub latency_avg_ms: f64,
    pub latency_max_ms: f64,
    pub p50_ms: f64,
    pub p75_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct SocketErrors {
    pub connect: u64,
    pub read: u64,
    pub write: u64,
    pub timeout: u64,
}

/// Runs wrk to completion against `url` (a child like any other: killed if
/// we are interrupted). The raw report is kept in `log`.
pub async fn run(
    url: &str,
    script: &Path,
    s: &WrkSettings,
    log: &Path,
) -> anyhow::Result<WrkResult> {
    let mut cmd = Command::new("wrk");
    cmd.arg(format!("-t{}", s.threads))
        .arg(format!("-c{}", s.connections))
        .arg(format!("-d{}s", s.duration_s))
        .arg("--latency")
        .arg("-s")
        .arg(script)
        .arg(url);
    let _ = std::fs::remove_file(log);
    let mut proc = Proc::spawn("wrk", &mut cmd, log)
        .context("wrk is needed (apt-get install wrk; scripts/bench.sh installs it)")?;
    let status = proc
        .wait(Duration::from_secs(u64::from(s.duration_s) + 60))
        .await?;
    let text = std::fs::read_to_string(log).unwrap_or_default();
    if !status.success() {
        bail!("wrk failed ({status}):\n{text}");
    }
    parse(&text).with_context(|| format!("cannot read wrk's report:\n{text}"))
}

/// Milliseconds from wrk's time format (`812.00us`, `1.23ms`, `2.00s`, `1.00m`).
fn millis(s: &str) -> Option<f64> {
    let s = s.trim();
    let split = s.find(|c: char| c.is_ascii_alphabetic())?;
    let (num, unit) = s.split_at(split);
    let v: f64 = num.parse().ok()?;
    let factor = match unit {
        "us" => 0.001,
        "ms" => 1.0,
        "s" => 1000.0,
        "m" => 60_000.0,
        "h" => 3_600_000.0,
        _ => return None,
    };
    Some(v * factor)
}

fn seconds(s: &str) -> Option<f64> {
    millis(s).map(|ms| ms / 1000.0)
}

pub fn parse(text: &str) -> anyhow::Result<WrkResult> {
    let mut r = WrkResult::default();
    let mut seen_requests = false;
    let mut seen_rate = false;
    for line in text.lines() {
        let t = line.trim();
        let words: Vec<&str> = t.split_whitespace().collect();
        if t.starts_with("Latency ") && words.len() >= 4 {
            r.latency_avg_ms = millis(words[1]).unwrap_or(0.0);
            r.latency_max_ms = millis(words[3]).unwrap_or(0.0);
        } else if words.len() == 2 && words[0].ends_with('%') {
            let v = millis(words[1]).context("latency percentile")?;
            match words[0] {
                "50%" => r.p50_ms = v,
                "75%" => r.p75_ms = v,
                "90%" => r.p90_ms = v,
                "99%" => r.p99_ms = v,
                _ => {}
            }
        } else if words.len() >= 4 && words[1] == "requests" && words[2] == "in" {
            r.requests = words[0].parse().context("request count")?;
            r.duration_s = seconds(words[3].trim_end_matches(',')).context("duration")?;
            seen_requests = true;
        } else if let Some(rest) = t.strip_prefix("Requests/sec:") {
            r.req_per_s = rest.trim().parse().context("Requests/sec")?;
            seen_rate = true;
        } else if let Some(rest) = t.strip_prefix("Non-2xx or 3xx responses:") {
            r.non_2xx = rest.trim().parse().context("non-2xx count")?;
        } else if let Some(rest) = t.strip_prefix("Socket errors:") {
            for part in rest.split(',') {
                let kv: Vec<&str> = part.split_whitespace().collect();
                if let [k, v] = kv[..] {
                    let v = v.parse().unwrap_or(0);
                    match k {
                        "connect" => r.socket_errors.connect = v,
                        "read" => r.socket_errors.read = v,
                        "write" => r.socket_errors.write = v,
                        "timeout" => r.socket_errors.timeout = v,
                        _ => {}
                    }
                }
            }
        }
    }
    if !seen_requests || !seen_rate {
        bail!("no request count or rate in the report");
    }
    r.ok = r.requests.saturating_sub(r.non_2xx);
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "Running 10s test @ http://127.0.0.1:4000/event
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.23ms  812.00us  50.00ms   90.00%
    Req/Sec    26.10k     1.20k   29.00k    70.00%
  Latency Distribution
     50%    1.07ms
     75%    1.40ms
     90%    1.90ms
     99%    3.45ms
  520000 requests in 10.00s, 80.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 3
  Non-2xx or 3xx responses: 12
Requests/sec:  51999.50
Transfer/sec:      8.00MB
";

    #[test]
    fn parses_a_latency_report() {
        let r = parse(SAMPLE).unwrap();
        assert_eq!(r.requests, 520_000);
        assert_eq!(r.duration_s, 10.0);
        assert_eq!(r.req_per_s, 51_999.5);
        assert_eq!(r.non_2xx, 12);
        assert_eq!(r.ok, 519_988);
        assert_eq!((r.p50_ms, r.p99_ms), (1.07, 3.45));
        assert_eq!(r.latency_max_ms, 50.0);
        assert_eq!((r.socket_errors.read, r.socket_errors.timeout), (2, 3));
        assert!((millis("812.00us").unwrap() - 0.812).abs() < 1e-9);
        assert_eq!(millis("1.00m"), Some(60_000.0));
        assert!(parse("garbage").is_err());
    }
}
