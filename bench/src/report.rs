//! The report: JSON (every figure), the printed table, the SVG chart.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::drain::Drain;
use crate::ingest::{Ingest, IngestCase};
use crate::procs;
use crate::query::QuerySection;
use crate::run::Params;
use crate::stats::{StatsCase, StatsSection};

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// `nproc`.
    pub cores: u32,
    /// MemTotal from /proc/meminfo, MiB.
    pub ram_mib: u64,
    pub cpu_model: String,
    pub kernel: String,
    pub git_commit: String,
    /// Uncommitted changes in the work tree when the run started.
    pub git_dirty: bool,
    pub wrk: String,
    pub redis_server: String,
}

impl Machine {
    pub fn probe() -> Machine {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let ram_kib = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_else(|| "unknown".into());
        let wrk = std::process::Command::new("wrk")
            .arg("-v")
            .output()
            .map(|o| {
                let text = [o.stdout, o.stderr].concat();
                String::from_utf8_lossy(&text)
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_owned()
            })
            .unwrap_or_default();
        Machine {
            cores: procs::output("nproc", &[]).parse().unwrap_or(0),
            ram_mib: ram_kib / 1024,
            cpu_model,
            kernel: procs::output("uname", &["-r"]),
            git_commit: procs::output("git", &["rev-parse", "--short", "HEAD"]),
            git_dirty: !procs::output("git", &["status", "--porcelain"]).is_empty(),
            wrk,
            redis_server: procs::output("redis-server", &["--version"]),
        }
    }
}

/// Peak RSS of one process under one case (section e).
#[derive(Debug, Clone, Serialize)]
pub struct MemoryRow {
    pub case: String,
    pub process: String,
    pub peak_rss_mib: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub tool: &'static str,
    pub schema: u32,
    pub mode: &'static str,
    pub started_at: String,
    pub finished_at: String,
    pub wall_s: f64,
    pub machine: Machine,
    pub params: Params,
    pub ingest: Option<Ingest>,
    pub drain: Option<Drain>,
    pub stats: Option<StatsSection>,
    pub query: Option<QuerySection>,
    pub sites: Option<crate::sites::SitesSection>,
    pub export: Option<crate::export::ExportCase>,
    pub memory: Vec<MemoryRow>,
    pub notes: Vec<String>,
    #[serde(skip)]
    started: DateTime<Utc>,
}

impl Report {
    pub fn new(p: &Params, machine: Machine, started: DateTime<Utc>) -> Report {
        Report {
            tool: "evtrack-bench",
            schema: 1,
            mode: p.mode,
            started_at: started.to_rfc3339(),
            finished_at: String::new(),
            wall_s: 0.0,
            machine,
            params: p.clone(),
            ingest: None,
            drain: None,
            stats: None,
            query: None,
            sites: None,
            export: None,
            memory: Vec::new(),
            notes: Vec::new(),
            started,
        }
    }

    pub fn finish(&mut self, wall_s: f64) {
        self.finished_at = Utc::now().to_rfc3339();
        self.wall_s = wall_s;
        let mut rows = Vec::new();
        if let Some(ingest) = &self.ingest {
            for c in ingest.single.iter().chain(&ingest.batches) {
                for m in &c.processes {
                    rows.push(MemoryRow {
                        case: format!("ingest {} {}", c.case, c.endpoint),
                        process: m.process.clone(),
                        peak_rss_mib: m.peak_rss_mib,
                    });
                }
            }
        }
        if let Some(drain) = &self.drain {
            for c in &drain.cases {
                rows.push(MemoryRow {
                    case: format!("drain {}", c.store),
                    process: c.worker.process.clone(),
                    peak_rss_mib: c.worker.peak_rss_mib,
                });
            }
        }
        if let Some(stats) = &self.stats {
            for c in &stats.cases {
                rows.push(MemoryRow {
                    case: format!("stats {} {}", c.store, c.events),
                    process: c.service.process.clone(),
                    peak_rss_mib: c.service.peak_rss_mib,
                });
            }
        }
        if let Some(query) = &self.query {
            for c in &query.cases {
                rows.push(MemoryRow {
                    case: format!("query {} {}", c.store, c.events),
                    process: c.service.process.clone(),
                    peak_rss_mib: c.service.peak_rss_mib,
                });
            }
        }
        self.memory = rows;
    }
}

/// Writes `<UTC timestamp>.json`, `latest.json` and `latest.svg` into `out`.
pub fn write(report: &Report, out: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out).with_context(|| format!("create {}", out.display()))?;
    let json = serde_json::to_string_pretty(report)? + "\n";
    let stamp = report.started.format("%Y%m%dT%H%M%SZ");
    let dated = out.join(format!("{stamp}.json"));
    let latest = out.join("latest.json");
    let svg = out.join("latest.svg");
    std::fs::write(&dated, &json)?;
    std::fs::write(&latest, &json)?;
    std::fs::write(&svg, chart(report))?;
    Ok(vec![dated, latest, svg])
}

// ---------------------------------------------------------------- table

fn n0(v: f64) -> String {
    let s = format!("{:.0}", v.max(0.0));
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Renders rows as aligned columns (first column left, the rest right).
fn grid(out: &mut String, header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::from("  ");
        for (i, c) in cells.iter().enumerate() {
            let pad = widths[i] - c.chars().count();
            if i == 0 {
                s.push_str(c);
                s.push_str(&" ".repeat(pad));
            } else {
                s.push_str("  ");
                s.push_str(&" ".repeat(pad));
                s.push_str(c);
            }
        }
        s.trim_end().to_owned()
    };
    let _ = writeln!(
        out,
        "{}",
        line(header.iter().map(|h| h.to_string()).collect())
    );
    let _ = writeln!(
        out,
        "  {}",
        "-".repeat(widths.iter().sum::<usize>() + 2 * (widths.len() - 1))
    );
    for r in rows {
        let _ = writeln!(out, "{}", line(r.clone()));
    }
}

fn errors(c: &IngestCase) -> u64 {
    let s = &c.wrk.socket_errors;
    s.connect + s.read + s.write + s.timeout
}

fn cpu_s(c: &IngestCase) -> String {
    c.processes
        .iter()
        .map(|m| format!("{:.1}", m.cpu_s))
        .collect::<Vec<_>>()
        .join("+")
}

fn peak(c: &IngestCase) -> String {
    c.processes
        .iter()
        .map(|m| {
            let name = m.process.split(' ').next_back().unwrap_or(&m.process);
            format!("{name} {:.1}", m.peak_rss_mib)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn cpu(c: &crate::drain::DrainCase) -> String {
    let mut s = format!("{:.1}/{:.1}", c.worker.cpu_s, c.redis_cpu_s);
    if let Some(m) = c.mongo_cpu_s {
        let _ = write!(s, "/{m:.1}");
    }
    s
}

/// One row of the TARGETS table: what was measured, beside the target.
fn target_row(figure: &str, measured: String, target: &str, met: Option<bool>) -> Vec<String> {
    vec![
        figure.to_owned(),
        measured,
        target.to_owned(),
        match met {
            Some(true) => "met".into(),
            Some(false) => "missed".into(),
            None => "—".into(),
        },
    ]
}

/// Issue 13's ingest and drain targets beside what this run measured (the
/// ceilings and the original design are in the tables above).
fn targets(out: &mut String, r: &Report) {
    let mut rows = Vec::new();
    if let Some(ingest) = &r.ingest {
        let single = |name: &str| ingest.single.iter().find(|c| c.case == name);
        let batch = |name: &str| ingest.batches.iter().find(|c| c.case == name);
        if let Some(c) = single("redis") {
            let ratio = c.ratio_to_ceiling.unwrap_or(0.0);
            let original = c.ratio_to_original.unwrap_or(0.0);
            rows.push(target_row(
                "single events, Redis, worker draining",
                format!(
                    "{ratio:.2} × ceiling+redis, p99 {} ms, {original:.1} × original",
                    ms(c.wrk.p99_ms)
                ),
                "≥ 0.9 ×, p99 ≤ 5 ms, ≥ 12 × original",
                Some(ratio >= 0.9 && c.wrk.p99_ms <= 5.0 && original >= 12.0),
            ));
        }
        if let Some(c) = single("embedded") {
            let ratio = c.ratio_to_ceiling.unwrap_or(0.0);
            rows.push(target_row(
                "single events, embedded",
                format!("{ratio:.2} × ceiling, p99 {} ms", ms(c.wrk.p99_ms)),
                "≥ 0.7 ×, p99 ≤ 5 ms",
                Some(ratio >= 0.7 && c.wrk.p99_ms <= 5.0),
            ));
        }
        if let Some(c) = batch("redis") {
            rows.push(target_row(
                "batches of 100, Redis: accepted into the queue",
                format!("{} events/s", n0(c.events_per_s)),
                "≥ 500,000 events/s",
                Some(c.events_per_s >= 500_000.0),
            ));
        }
        if let Some(c) = batch("embedded") {
            rows.push(target_row(
                "batches of 100, embedded: stored",
                format!("{} events/s", n0(c.events_per_s)),
                "≥ 250,000 events/s",
                Some(c.events_per_s >= 250_000.0),
            ));
        }
    }
    if let Some(drain) = &r.drain {
        for c in &drain.cases {
            match c.store.as_str() {
                "sqlite" => rows.push(target_row(
                    "drain into SQLite, folded",
                    format!("{} events/s", n0(c.events_per_s)),
                    "≥ 250,000 events/s",
                    Some(c.events_per_s >= 250_000.0),
                )),
                "mongodb" => rows.push(target_row(
                    "drain into MongoDB",
                    format!("{:.2} × the plain driver", c.ratio_to_baseline),
                    "≥ 0.8 ×",
                    Some(c.ratio_to_baseline >= 0.8),
                )),
                _ => {}
            }
        }
    }
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "\nTARGETS (issue 13): this run's figures; bench/README.md says what limits those missed"
    );
    grid(out, &["figure", "measured", "target", ""], &rows);
}

pub fn table(r: &Report) -> String {
    let mut out = String::new();
    let m = &r.machine;
    let _ = writeln!(
        out,
        "\nevtrack-bench ({}) on {} cores, {:.1} GiB RAM, {} — commit {}{} — {:.0} s",
        r.mode,
        m.cores,
        m.ram_mib as f64 / 1024.0,
        m.cpu_model,
        m.git_commit,
        if m.git_dirty { " (dirty)" } else { "" },
        r.wall_s
    );
    let w = &r.params.wrk;
    if let Some(ingest) = &r.ingest {
        let _ = writeln!(
            out,
            "\nINGEST, single events: POST /event, wrk {} threads × {} connections, {} s each",
            w.threads, w.connections, w.duration_s
        );
        let rows: Vec<Vec<String>> = ingest
            .single
            .iter()
            .map(|c| {
                vec![
                    c.case.clone(),
                    n0(c.wrk.req_per_s),
                    ms(c.wrk.p50_ms),
                    ms(c.wrk.p99_ms),
                    c.wrk.non_2xx.to_string(),
                    errors(c).to_string(),
                    match (&c.ceiling, c.ratio_to_ceiling) {
                        (Some(base), Some(x)) => format!("{x:.2} × {base}"),
                        _ => "—".into(),
                    },
                    c.ratio_to_original
                        .map_or("—".into(), |x| format!("{x:.1} ×")),
                    c.stored.map_or("—".into(), |s| n0(s as f64)),
                    cpu_s(c),
                    peak(c),
                ]
            })
            .collect();
        grid(
            &mut out,
            &[
                "case",
                "req/s",
                "p50 ms",
                "p99 ms",
                "non-2xx",
                "sock err",
                "ratio",
                "× original",
                "stored",
                "CPU s",
                "peak RSS MiB",
            ],
            &rows,
        );
        let _ = writeln!(
            out,
            "\nINGEST, batches: POST /events, {} events per request, same load",
            r.params.batch_events
        );
        let rows: Vec<Vec<String>> = ingest
            .batches
            .iter()
            .map(|c| {
                vec![
                    c.case.clone(),
                    n0(c.events_per_s),
                    n0(c.wrk.req_per_s),
                    ms(c.wrk.p50_ms),
                    ms(c.wrk.p99_ms),
                    c.wrk.non_2xx.to_string(),
                    errors(c).to_string(),
                    c.stored.map_or("—".into(), |s| n0(s as f64)),
                    cpu_s(c),
                    peak(c),
                ]
            })
            .collect();
        grid(
            &mut out,
            &[
                "case",
                "events/s",
                "req/s",
                "p50 ms",
                "p99 ms",
                "non-2xx",
                "sock err",
                "stored",
                "CPU s",
                "peak RSS MiB",
            ],
            &rows,
        );
    }
    if let Some(drain) = &r.drain {
        let _ = writeln!(
            out,
            "\nDRAIN: events preloaded in the stream, one `evtrack worker` started, until XLEN = 0"
        );
        let rows: Vec<Vec<String>> = drain
            .cases
            .iter()
            .map(|c| {
                vec![
                    c.store.clone(),
                    n0(c.events as f64),
                    format!("{:.2}", c.drain_s),
                    n0(c.events_per_s),
                    n0(c.stored as f64),
                    c.dead_lettered.to_string(),
                    n0(c.baseline.events_per_s),
                    format!("{:.2}", c.ratio_to_baseline),
                    format!("{:.1}", c.worker.peak_rss_mib),
                    cpu(c),
                ]
            })
            .collect();
        grid(
            &mut out,
            &[
                "store",
                "events",
                "seconds",
                "events/s",
                "stored",
                "dead",
                "plain insert/s",
                "ratio",
                "worker RSS MiB",
                "CPU s worker/redis/db",
            ],
            &rows,
        );
        if !drain.scaling.is_empty() {
            let _ = writeln!(
                out,
                "\nDRAIN SCALING: the same into one SQLite file by 1, 2 and 4 workers at once (2 cores: \
                 see bench/README.md for what this can show)"
            );
            let one = drain.scaling.first().map_or(1.0, |c| c.events_per_s);
            let rows: Vec<Vec<String>> = drain
                .scaling
                .iter()
                .map(|c| {
                    vec![
                        c.workers.to_string(),
                        n0(c.events as f64),
                        format!("{:.2}", c.drain_s),
                        n0(c.events_per_s),
                        format!("{:.2}", c.events_per_s / one),
                        n0(c.stored as f64),
                        format!("{:.1}", c.workers_cpu_s),
                    ]
                })
                .collect();
            grid(
                &mut out,
                &[
                    "workers",
                    "events",
                    "seconds",
                    "events/s",
                    "÷ 1 worker",
                    "stored",
                    "CPU s workers",
                ],
                &rows,
            );
        }
    }
    if let Some(stats) = &r.stats {
        let _ = writeln!(
            out,
            "\nSTATS: GET /stats for one site-day, {} sequential requests after one untimed (MongoDB: {})",
            r.params.stats_requests, r.params.stats_mongo_requests
        );
        let rows: Vec<Vec<String>> = stats
            .cases
            .iter()
            .map(|c: &StatsCase| {
                vec![
                    c.store.clone(),
                    n0(c.events as f64),
                    n0(c.answer.unique_users as f64),
                    ms(c.first_ms),
                    ms(c.p50_ms),
                    ms(c.p99_ms),
                    ms(c.plain.median_ms),
                    if c.exact { "yes" } else { "NO" }.into(),
                    format!("{:.1}", c.service.peak_rss_mib),
                ]
            })
            .collect();
        grid(
            &mut out,
            &[
                "store",
                "events/day",
                "users",
                "first ms",
                "p50 ms",
                "p99 ms",
                "plain agg ms",
                "exact",
                "RSS MiB",
            ],
            &rows,
        );
    }
    if let Some(q) = &r.query {
        let _ = writeln!(
            out,
            "\nQUERIES: POST /api/v2/query, {} sequential requests after one untimed (MongoDB: {}); \
             reference beside each",
            r.params.query_requests, r.params.query_mongo_requests
        );
        let mut rows: Vec<Vec<String>> = Vec::new();
        for c in &q.cases {
            for t in &c.queries {
                rows.push(vec![
                    c.store.clone(),
                    format!("{} d × {}", c.days, n0(c.events_per_day as f64)),
                    t.query.clone(),
                    ms(t.p50_ms),
                    ms(t.p99_ms),
                    if t.exact { "yes" } else { "NO" }.into(),
                    t.reference_ms.map(ms).unwrap_or_else(|| "-".into()),
                    t.speedup
                        .map(|x| format!("{x:.1}×"))
                        .unwrap_or_else(|| "-".into()),
                    format!("{:.1}", c.service.rss_mib),
                ]);
            }
        }
        grid(
            &mut out,
            &[
                "store",
                "data",
                "query",
                "p50 ms",
                "p99 ms",
                "exact",
                "reference ms",
                "speed-up",
                "RSS MiB",
            ],
            &rows,
        );
        let rows: Vec<Vec<String>> = q
            .cases
            .iter()
            .map(|c| {
                vec![
                    c.store.clone(),
                    n0(c.events as f64),
                    format!("{:.1}", c.insert_s),
                    format!("{:.1}", c.fold_s),
                    n0(c.fold_events_per_s),
                    c.disk_mib
                        .map(|d| format!("{d:.0}"))
                        .unwrap_or_else(|| "-".into()),
                    c.disk_mib_per_million
                        .map(|d| format!("{d:.0}"))
                        .unwrap_or_else(|| "-".into()),
                ]
            })
            .collect();
        grid(
            &mut out,
            &[
                "store",
                "events",
                "insert s",
                "fold s",
                "fold events/s",
                "disk MiB",
                "MiB per million",
            ],
            &rows,
        );
        for c in &q.cases {
            if let Some(d) = &c.dashboard {
                let filtered = match d.filtered_ms {
                    Some(ms) => format!("{ms:.0} ms (one load)"),
                    None => format!(
                        "did not end within {} s",
                        crate::query::FILTERED_LIMIT.as_secs()
                    ),
                };
                let _ = writeln!(
                    out,
                    "dashboard opening on {} d × {} ({} requests at once, {} loads): \
                     p50 {:.0} ms, max {:.0} ms; filtered by one page: {filtered}",
                    c.days,
                    n0(c.events_per_day as f64),
                    d.requests,
                    d.runs,
                    d.unfiltered_p50_ms,
                    d.unfiltered_max_ms,
                );
            }
        }
        if let Some(v) = &q.visible {
            let _ = writeln!(
                out,
                "embedded, POST /events batches of {} from {} senders until a query counts them all: \
                 {} events in {:.1} s = {} events/s (all 202 after {:.1} s)",
                v.batch,
                v.senders,
                n0(v.events as f64),
                v.seconds,
                n0(v.events_per_s),
                v.accepted_s
            );
        }
    }
    if let Some(sites) = &r.sites {
        let _ = writeln!(
            out,
            "\nSITES: the embedded store alone, the same number of events over the same days \
             (evtrack-bench store-insert --sites N --days D --fold)"
        );
        let rows: Vec<Vec<String>> = [&sites.small, &sites.one]
            .into_iter()
            .map(|m| {
                vec![
                    n0(m.sites as f64),
                    n0(m.events_per_site_day),
                    n0(m.days as f64),
                    n0(m.events as f64),
                    n0(m.insert_events_per_s),
                    m.fold_events_per_s.map(n0).unwrap_or_else(|| "-".into()),
                    format!("{:.0}", m.disk_mib_per_million),
                ]
            })
            .collect();
        grid(
            &mut out,
            &[
                "sites",
                "events/site/day",
                "days",
                "events",
                "insert events/s",
                "fold events/s",
                "MiB per million",
            ],
            &rows,
        );
        let _ = writeln!(
            out,
            "many small sites ÷ one: disk per event {:.2}×, fold rate {:.2}×, insert rate {:.2}×",
            sites.disk_ratio, sites.fold_ratio, sites.insert_ratio
        );
    }
    if let Some(e) = &r.export {
        let _ = writeln!(
            out,
            "\nEXPORT: GET /api/sites/{{site}}/events (NDJSON) of one site's events over {} days, \
             served by `evtrack api` from the embedded store, read to the end",
            e.days
        );
        grid(
            &mut out,
            &[
                "events",
                "MiB out",
                "seconds",
                "events/s",
                "plain read events/s",
                "ratio",
                "heap MiB before",
                "heap MiB peak",
                "RSS with mapped db MiB",
                "database MiB",
            ],
            &[vec![
                n0(e.events as f64),
                format!("{:.0}", e.mib_exported),
                format!("{:.1}", e.export_s),
                n0(e.events_per_s),
                n0(e.ceiling_events_per_s),
                format!("{:.2}×", e.ratio_to_ceiling),
                format!("{:.1}", e.anon_before_mib),
                format!("{:.1}", e.anon_peak_mib),
                format!("{:.0}", e.rss_peak_mib),
                format!("{:.0}", e.db_mib),
            ]],
        );
    }
    targets(&mut out, r);
    if !r.memory.is_empty() {
        let _ = writeln!(
            out,
            "\nMEMORY: peak RSS (VmHWM) of each process, read after its load"
        );
        let rows: Vec<Vec<String>> = r
            .memory
            .iter()
            .map(|m| {
                vec![
                    m.case.clone(),
                    m.process.clone(),
                    format!("{:.1}", m.peak_rss_mib),
                ]
            })
            .collect();
        grid(&mut out, &["case", "process", "peak RSS MiB"], &rows);
    }
    for note in &r.notes {
        let _ = writeln!(out, "\nnote: {note}");
    }
    out
}

// ---------------------------------------------------------------- chart

/// A line of the stats panel: name, dash pattern, the figure it plots.
type Series = (&'static str, &'static str, fn(&StatsCase) -> f64);

const COLORS: [&str; 4] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Decades `[10^lo, 10^hi]` covering every positive value.
fn decades(values: impl Iterator<Item = f64>) -> (i32, i32) {
    let (mut lo, mut hi) = (f64::MAX, f64::MIN);
    for v in values.filter(|v| *v > 0.0) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if lo > hi {
        return (0, 1);
    }
    let (a, b) = (lo.log10().floor() as i32, hi.log10().ceil() as i32);
    (a, b.max(a + 1))
}

fn label_pow(e: i32) -> String {
    match e {
        i32::MIN..=-1 => format!("{}", 10f64.powi(e)),
        0..=9 => n0(10f64.powi(e)),
        _ => format!("1e{e}"),
    }
}

/// Two panels: stats latency against events per day (log-log), and ingest
/// throughput against the ceilings (bars).
pub fn chart(r: &Report) -> String {
    let (w, h) = (1000.0, 460.0);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="10" y="18" font-size="13">evtrack-bench {} — {} cores, {} — commit {} — {}</text>"#,
        r.mode,
        r.machine.cores,
        esc(&r.machine.cpu_model),
        esc(&r.machine.git_commit),
        esc(&r.started_at)
    );
    stats_panel(&mut s, r, 60.0, 50.0, 380.0, 300.0);
    ingest_panel(&mut s, r, 580.0, 50.0, 380.0, 300.0);
    s.push_str("</svg>\n");
    s
}

fn stats_panel(s: &mut String, r: &Report, x0: f64, y0: f64, pw: f64, ph: f64) {
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" font-weight="bold">GET /stats latency vs events per day</text>"#,
        x0,
        y0 - 12.0
    );
    let cases: &[StatsCase] = r.stats.as_ref().map_or(&[], |st| &st.cases);
    let (xa, xb) = decades(cases.iter().map(|c| c.events as f64));
    let (ya, yb) = decades(
        cases
            .iter()
            .flat_map(|c| [c.p50_ms, c.p99_ms, c.plain.median_ms]),
    );
    let px = |v: f64| x0 + (v.log10() - f64::from(xa)) / f64::from(xb - xa) * pw;
    let py = |v: f64| y0 + ph - (v.log10() - f64::from(ya)) / f64::from(yb - ya) * ph;
    axes(s, x0, y0, pw, ph);
    for e in xa..=xb {
        let x = px(10f64.powi(e));
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{y0}" x2="{x:.1}" y2="{}" stroke="#eee"/><text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"##,
            y0 + ph,
            y0 + ph + 16.0,
            label_pow(e)
        );
    }
    for e in ya..=yb {
        let y = py(10f64.powi(e));
        let _ = writeln!(
            s,
            r##"<line x1="{x0}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#eee"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            x0 + pw,
            x0 - 6.0,
            y + 4.0,
            label_pow(e)
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">events in the day (log)</text>"#,
        x0 + pw / 2.0,
        y0 + ph + 34.0
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate({},{}) rotate(-90)" text-anchor="middle">ms (log)</text>"#,
        x0 - 42.0,
        y0 + ph / 2.0
    );
    let mut legend = 0;
    for (si, store) in ["sqlite", "mongodb"].iter().enumerate() {
        let pts: Vec<&StatsCase> = cases.iter().filter(|c| c.store == *store).collect();
        if pts.is_empty() {
            continue;
        }
        let series: [Series; 3] = [
            ("p50", "", |c| c.p50_ms),
            ("p99", "6,3", |c| c.p99_ms),
            ("plain agg", "2,3", |c| c.plain.median_ms),
        ];
        for (name, dash, f) in series {
            let color = COLORS[si];
            let d: Vec<String> = pts
                .iter()
                .map(|c| format!("{:.1},{:.1}", px(c.events as f64), py(f(c).max(1e-3))))
                .collect();
            let _ = writeln!(
                s,
                r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2" stroke-dasharray="{dash}"/>"#,
                d.join(" ")
            );
            for c in &pts {
                let _ = writeln!(
                    s,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"><title>{store} {name}: {} ms at {} events</title></circle>"#,
                    px(c.events as f64),
                    py(f(c).max(1e-3)),
                    ms(f(c)),
                    c.events
                );
            }
            // The legend goes under the panel: one column per store.
            let ly = y0 + ph + 56.0 + 15.0 * f64::from(legend % 3);
            let lx = x0 + 190.0 * si as f64;
            let _ = writeln!(
                s,
                r#"<line x1="{lx}" y1="{ly:.1}" x2="{}" y2="{ly:.1}" stroke="{color}" stroke-width="2" stroke-dasharray="{dash}"/><text x="{}" y="{:.1}">{store} {name}</text>"#,
                lx + 22.0,
                lx + 26.0,
                ly + 4.0
            );
            legend += 1;
        }
    }
}

fn axes(s: &mut String, x0: f64, y0: f64, pw: f64, ph: f64) {
    let _ = writeln!(
        s,
        r##"<rect x="{x0}" y="{y0}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>"##
    );
}

fn ingest_panel(s: &mut String, r: &Report, x0: f64, y0: f64, pw: f64, ph: f64) {
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" font-weight="bold">POST /event throughput vs the ceilings</text>"#,
        x0,
        y0 - 12.0
    );
    axes(s, x0, y0, pw, ph);
    let cases: &[IngestCase] = r.ingest.as_ref().map_or(&[], |i| &i.single);
    let max = cases
        .iter()
        .map(|c| c.wrk.req_per_s)
        .fold(0.0, f64::max)
        .max(1.0);
    // A round top: 1, 2 or 5 × 10^k above the maximum.
    let k = 10f64.powi(max.log10().floor() as i32);
    let top = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * k)
        .find(|t| *t >= max)
        .unwrap_or(10.0 * k);
    for i in 0..=4 {
        let v = top * f64::from(i) / 4.0;
        let y = y0 + ph - v / top * ph;
        let _ = writeln!(
            s,
            r##"<line x1="{x0}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#eee"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            x0 + pw,
            x0 - 6.0,
            y + 4.0,
            n0(v)
        );
    }
    let _ = writeln!(
        s,
        r#"<text transform="translate({},{}) rotate(-90)" text-anchor="middle">requests/s</text>"#,
        x0 - 48.0,
        y0 + ph / 2.0
    );
    let slot = pw / cases.len().max(1) as f64;
    for (i, c) in cases.iter().enumerate() {
        let bw = slot * 0.6;
        let x = x0 + slot * i as f64 + (slot - bw) / 2.0;
        let bh = c.wrk.req_per_s / top * ph;
        let color = if c.case.starts_with("ceiling") || c.case == "original" {
            "#aaaaaa"
        } else {
            COLORS[0]
        };
        let _ = writeln!(
            s,
            r#"<rect x="{x:.1}" y="{:.1}" width="{bw:.1}" height="{bh:.1}" fill="{color}"><title>{}: {} req/s, p99 {} ms</title></rect>"#,
            y0 + ph - bh,
            esc(&c.case),
            n0(c.wrk.req_per_s),
            ms(c.wrk.p99_ms)
        );
        let mut label = n0(c.wrk.req_per_s);
        if let Some(x) = c.ratio_to_ceiling {
            label = format!("{label} ({x:.2}×)");
        }
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="11">{label}</text>"#,
            x + bw / 2.0,
            y0 + ph - bh - 5.0
        );
        // "redis, no worker" is wider than its slot: one line per part.
        let cx = x + bw / 2.0;
        let lines: String = c
            .case
            .split(", ")
            .enumerate()
            .map(|(i, part)| {
                format!(
                    r#"<tspan x="{cx:.1}" dy="{}">{}</tspan>"#,
                    if i == 0 { 0 } else { 12 },
                    esc(part)
                )
            })
            .collect();
        let _ = writeln!(
            s,
            r#"<text x="{cx:.1}" y="{}" text-anchor="middle">{lines}</text>"#,
            y0 + ph + 16.0,
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">grey: ceilings and the original design; blue: evtrack (ratio to its ceiling)</text>"#,
        x0 + pw / 2.0,
        y0 + ph + 42.0
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(n0(0.0), "0");
        assert_eq!(n0(999.4), "999");
        assert_eq!(n0(1000.0), "1,000");
        assert_eq!(n0(1234567.0), "1,234,567");
    }

    #[test]
    fn decades_cover_the_values() {
        assert_eq!(decades([10_000.0, 1_000_000.0].into_iter()), (4, 6));
        assert_eq!(decades([0.5, 3.0].into_iter()), (-1, 1));
        assert_eq!(decades(std::iter::empty()), (0, 1));
    }
}
