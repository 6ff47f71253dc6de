//! Queries (`POST /api/v2/query`): many days of events seeded into the
//! store and folded into its rollups, then the service answers totals, top
//! pages, a daily series, a one-page filter and a filtered breakdown (read
//! from the raw events). Beside it, in the same run: PostgreSQL aggregating
//! the same raw events at query time with covering indexes (its own server,
//! `initdb` + `pg_ctl` on a free port), and, for MongoDB, the original
//! design's `$group` pipelines on the same server. Every answer is checked
//! against the truth the generator kept (exact bitmaps per page and day).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use evtrack::event::Event;
use evtrack::store::Store;
use evtrack::store::mongo::MongoStore;
use evtrack::store::sqlite::SqliteStore;
use futures::TryStreamExt as _;
use mongodb::bson::{Bson, DateTime, Document, doc};
use roaring::RoaringBitmap;
use serde::Serialize;
use serde_json::{Value, json};

use crate::data::{Rng, Zipf};
use crate::procs::{self, Usage};
use crate::run::Ctx;
use crate::stats::percentile;

pub(crate) const SITE: &str = "bench-query";
const DAY_MS: i64 = 86_400_000;
const ONE_PAGE: &str = "/docs/page-2";

/// The benchmark's first day; a fixed one keeps runs comparable.
fn first_day_ms() -> i64 {
    chrono::NaiveDate::from_ymd_opt(2025, 10, 1)
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc().timestamp_millis())
        .unwrap_or(0)
}

fn date_of(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d").to_string())
        .unwrap_or_default()
}

/// Page views (and a few signups) of one site over `days` days, `per_day`
/// a day, visitors uniform from a pool, pages Zipf, `plan` on some events.
pub(crate) struct Generator {
    rng: Rng,
    zipf: Zipf,
    visitors: u64,
    per_day: usize,
    days: usize,
    next: usize,
    truth: Truth,
}

/// What every answer must be, kept while generating.
#[derive(Default)]
struct Truth {
    visitors: RoaringBitmap,
    pageviews: u64,
    pages: BTreeMap<String, (RoaringBitmap, u64)>,
    days: BTreeMap<String, (RoaringBitmap, u64)>,
    pro_pages: BTreeMap<String, (RoaringBitmap, u64)>,
}

impl Generator {
    pub(crate) fn new(
        seed: u64,
        days: usize,
        per_day: usize,
        visitors: usize,
        pages: usize,
    ) -> Self {
        Generator {
            rng: Rng::new(seed),
            zipf: Zipf::new(pages),
            visitors: visitors.max(1) as u64,
            per_day,
            days,
            next: 0,
            truth: Truth::default(),
        }
    }

    fn total(&self) -> usize {
        self.days * self.per_day
    }

    /// The next `n` events (fewer at the end), in arrival order.
    pub(crate) fn take(&mut self, n: usize) -> Vec<Event> {
        let n = n.min(self.total() - self.next);
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let i = self.next;
            self.next += 1;
            let day = (i / self.per_day) as i64;
            let ts = first_day_ms() + day * DAY_MS + self.rng.below(DAY_MS as u64) as i64;
            let page = format!("/docs/page-{}", self.zipf.sample(&mut self.rng));
            let visitor = self.rng.below(self.visitors) as u32;
            let name = if self.rng.below(20) == 0 {
                "signup"
            } else {
                "page_view"
            };
            let plan = match self.rng.below(10) {
                0 => Some("pro"),
                1..=3 => Some("free"),
                _ => None,
            };
            let pv = u64::from(name == "page_view");
            let t = &mut self.truth;
            t.visitors.insert(visitor);
            t.pageviews += pv;
            let p = t.pages.entry(page.clone()).or_default();
            p.0.insert(visitor);
            p.1 += pv;
            let d = t.days.entry(date_of(ts)).or_default();
            d.0.insert(visitor);
            d.1 += pv;
            if plan == Some("pro") {
                let p = t.pro_pages.entry(page.clone()).or_default();
                p.0.insert(visitor);
                p.1 += pv;
            }
            out.push(Event {
                id: crate::data::parse(format!("q{i:010}")),
                site_id: crate::data::parse(SITE),
                event_type: crate::data::parse(name),
                path: Some(page),
                userid: Some(format!("visitor-{visitor:07}")),
                ts,
                created_at: ts + 100,
                props: plan.map(|p| {
                    let mut m = serde_json::Map::new();
                    m.insert("plan".into(), json!(p));
                    m
                }),
                visitor: None,
                ctx: None,
            });
        }
        out
    }
}

/// One query shape: the request, and its exact answer (`results`).
struct Shape {
    name: &'static str,
    body: Value,
    expected: Value,
}

fn top10(groups: &BTreeMap<String, (RoaringBitmap, u64)>) -> Value {
    let mut rows: Vec<(&String, u64, u64)> = groups
        .iter()
        .map(|(k, (v, pv))| (k, v.len(), *pv))
        .collect();
    rows.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    rows.into_iter()
        .take(10)
        .map(|(k, v, pv)| json!({"metrics": [v, pv], "dimensions": [k]}))
        .collect()
}

fn shapes(truth: &Truth, days: usize) -> Vec<Shape> {
    let range = json!([
        date_of(first_day_ms()),
        date_of(first_day_ms() + (days as i64 - 1) * DAY_MS)
    ]);
    let base = |extra: Value| {
        let mut b =
            json!({"site_id": SITE, "metrics": ["visitors", "pageviews"], "date_range": range});
        for (k, v) in extra.as_object().into_iter().flatten() {
            b[k] = v.clone();
        }
        b
    };
    let one = truth.pages.get(ONE_PAGE).cloned().unwrap_or_default();
    vec![
        Shape {
            name: "totals",
            body: base(json!({})),
            expected: json!([{"metrics": [truth.visitors.len(), truth.pageviews], "dimensions": []}]),
        },
        Shape {
            name: "top 10 pages",
            body: base(json!({"dimensions": ["event:page"], "pagination": {"limit": 10}})),
            expected: top10(&truth.pages),
        },
        Shape {
            name: "daily series",
            body: base(json!({"dimensions": ["time:day"]})),
            expected: truth
                .days
                .iter()
                .map(|(d, (v, pv))| json!({"metrics": [v.len(), pv], "dimensions": [d]}))
                .collect(),
        },
        Shape {
            name: "one-page filter",
            body: base(json!({"filters": [["is", "event:page", [ONE_PAGE]]]})),
            expected: json!([{"metrics": [one.0.len(), one.1], "dimensions": []}]),
        },
        Shape {
            name: "top pages where plan = pro (raw events)",
            body: base(
                json!({"dimensions": ["event:page"], "filters": [["is", "event:props:plan", ["pro"]]],
                "pagination": {"limit": 10}}),
            ),
            expected: top10(&truth.pro_pages),
        },
    ]
}

#[derive(Debug, Clone, Serialize)]
pub struct Timed {
    pub query: String,
    pub requests: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub exact: bool,
    /// The reference's median over its runs, ms, when one ran.
    pub reference_ms: Option<f64>,
    pub reference_exact: Option<bool>,
    /// Reference ÷ evtrack (p50).
    pub speedup: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct QueryCase {
    pub store: String,
    pub days: usize,
    pub events_per_day: usize,
    pub events: usize,
    pub visitors: usize,
    pub pages: usize,
    /// Inserting the raw events straight into the store.
    pub insert_s: f64,
    /// Folding them all into the rollups afterwards.
    pub fold_s: f64,
    pub fold_events_per_s: f64,
    /// Store files on disk after the run, MiB, and per million events.
    pub disk_mib: Option<f64>,
    pub disk_mib_per_million: Option<f64>,
    pub reference: Option<String>,
    pub queries: Vec<Timed>,
    /// What the dashboard asks when it opens on the whole range, all its
    /// requests at once as a browser sends them (SQLite cases).
    pub dashboard: Option<DashboardLoad>,
    /// The evtrack process that answered (its memory after the queries).
    pub service: Usage,
}

/// The dashboard's opening requests over a case's whole range, sent at
/// once (as the page sends them): the time until the last answer.
#[derive(Debug, Clone, Serialize)]
pub struct DashboardLoad {
    pub requests: usize,
    /// Median and worst of `runs` loads, ms.
    pub unfiltered_p50_ms: f64,
    pub unfiltered_max_ms: f64,
    /// The same with a filter on one page (visits that saw it: read from
    /// the visits and raw events, not from rollups), one load, not warmed
    /// up; `None`: it did not end within [`FILTERED_LIMIT`].
    pub filtered_ms: Option<f64>,
    pub runs: usize,
}

/// How long the filtered dashboard load may take before the bench reports
/// that it did not end (a month of a busy site reads every visit and
/// event of the range for each of the page's visit figures).
pub const FILTERED_LIMIT: Duration = Duration::from_secs(300);

/// The bodies the dashboard posts when it opens (`assets/dashboard/app.js`):
/// headline figures over events and over visits for the range and the
/// one before it, the chart, and the first tab of every panel.
fn dashboard_bodies(days: usize, filters: &Value) -> Vec<Value> {
    let first = first_day_ms();
    let last = first + (days as i64 - 1) * DAY_MS;
    let range = json!([date_of(first), date_of(last)]);
    let before = json!([
        date_of(first - days as i64 * DAY_MS),
        date_of(first - DAY_MS)
    ]);
    let body = |range: &Value, extra: Value| {
        let mut b =
            json!({"site_id": SITE, "date_range": range, "timezone": "UTC", "filters": filters});
        for (k, v) in extra.as_object().into_iter().flatten() {
            b[k] = v.clone();
        }
        b
    };
    let events = json!({"metrics": ["visitors", "pageviews"]});
    let visits = json!({"metrics": ["visits", "bounce_rate", "visit_duration"]});
    let panel = |dim: &str, metrics: Value| json!({"metrics": metrics, "dimensions": [dim], "pagination": {"limit": 11}});
    vec![
        body(&range, events.clone()),
        body(&range, visits.clone()),
        body(&before, events),
        body(&before, visits),
        body(
            &range,
            json!({"metrics": ["visitors"], "dimensions": ["time:day"],
                            "include": {"time_labels": true}}),
        ),
        body(
            &range,
            panel("event:page", json!(["visitors", "pageviews"])),
        ),
        body(&range, panel("visit:source", json!(["visitors", "visits"]))),
        body(
            &range,
            panel("visit:country", json!(["visitors", "visits"])),
        ),
        body(&range, panel("visit:device", json!(["visitors", "visits"]))),
        body(&range, panel("event:name", json!(["visitors", "events"]))),
    ]
}

/// Times `runs` dashboard loads (after one untimed), all requests at once.
async fn dashboard_load(
    http: &reqwest::Client,
    port: u16,
    days: usize,
    runs: usize,
) -> anyhow::Result<DashboardLoad> {
    let url = format!("http://127.0.0.1:{port}/api/v2/query");
    // Samples of `runs` loads after `warm` untimed ones; `None` if a
    // request did not end within `limit`.
    let time = |filters: Value, warm: usize, runs: usize, limit: Duration| {
        let bodies = dashboard_bodies(days, &filters);
        let url = url.clone();
        async move {
            let mut samples = Vec::new();
            for i in 0..warm + runs {
                let t = Instant::now();
                let answers = futures::future::join_all(
                    bodies
                        .iter()
                        .map(|b| http.post(&url).json(b).timeout(limit).send()),
                )
                .await;
                for a in answers {
                    let a = match a {
                        Err(e) if e.is_timeout() => return Ok(None),
                        other => other?,
                    };
                    if !a.status().is_success() {
                        bail!(
                            "dashboard load: {} {}",
                            a.status(),
                            a.text().await.unwrap_or_default()
                        );
                    }
                    match a.bytes().await {
                        Err(e) if e.is_timeout() => return Ok(None),
                        other => other?,
                    };
                }
                if i >= warm {
                    samples.push(t.elapsed().as_secs_f64() * 1000.0);
                }
            }
            samples.sort_by(f64::total_cmp);
            Ok::<_, anyhow::Error>(Some(samples))
        }
    };
    let unfiltered = time(json!([]), 1, runs, Duration::from_secs(600))
        .await?
        .unwrap_or_default();
    let filtered = time(
        json!([["is", "event:page", [ONE_PAGE]]]),
        0,
        1,
        FILTERED_LIMIT,
    )
    .await?;
    let max = |s: &[f64]| s.last().copied().unwrap_or(0.0);
    Ok(DashboardLoad {
        requests: dashboard_bodies(days, &json!([])).len(),
        unfiltered_p50_ms: percentile(&unfiltered, 0.5),
        unfiltered_max_ms: max(&unfiltered),
        filtered_ms: filtered.map(|s| max(&s)),
        runs,
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct VisibleCase {
    pub events: usize,
    pub batch: usize,
    pub senders: usize,
    /// From the first request until a query counts every event.
    pub seconds: f64,
    pub events_per_s: f64,
    /// Of `seconds`, until the last 202.
    pub accepted_s: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct QuerySection {
    pub cases: Vec<QueryCase>,
    pub visible: Option<VisibleCase>,
}

pub async fn run(ctx: &mut Ctx, queries: bool, visible: bool) -> anyhow::Result<QuerySection> {
    let mut out = QuerySection::default();
    if queries {
        let (days, per_day) = ctx.p.query_small;
        out.cases.push(sqlite_case(ctx, days, per_day, true).await?);
        if let Some((days, per_day)) = ctx.p.query_large {
            out.cases
                .push(sqlite_case(ctx, days, per_day, false).await?);
        }
        let (days, per_day) = ctx.p.query_mongo;
        out.cases.push(mongo_case(ctx, days, per_day).await?);
    }
    if visible {
        out.visible = Some(visible_case(ctx).await?);
    }
    Ok(out)
}

async fn seed(store: &dyn Store, generator: &mut Generator) -> anyhow::Result<(f64, f64)> {
    let t = Instant::now();
    loop {
        let batch = generator.take(5_000);
        if batch.is_empty() {
            break;
        }
        store.insert(&batch).await?;
    }
    let insert_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    evtrack::store::fold_all(store).await?;
    Ok((insert_s, t.elapsed().as_secs_f64()))
}

/// Times `requests` sequential queries of each shape (after one untimed).
async fn measure(
    ctx: &Ctx,
    port: u16,
    shapes: &[Shape],
    requests: usize,
) -> anyhow::Result<Vec<Timed>> {
    let url = format!("http://127.0.0.1:{port}/api/v2/query");
    let mut out = Vec::new();
    for shape in shapes {
        let mut samples = Vec::with_capacity(requests);
        let mut exact = false;
        // Raw-event shapes take seconds a request at the larger sizes:
        // three timed runs are enough for their median.
        let requests = if shape.name.contains("raw events") {
            requests.min(3)
        } else {
            requests
        };
        for i in 0..=requests {
            let t = Instant::now();
            let resp = ctx
                .http
                .post(&url)
                .json(&shape.body)
                .timeout(Duration::from_secs(300))
                .send()
                .await?;
            let status = resp.status();
            let body: Value = resp.json().await?;
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            if !status.is_success() {
                bail!("{}: {status} {body}", shape.name);
            }
            if i == 0 {
                exact = body["results"] == shape.expected;
                if !exact {
                    eprintln!(
                        "    {}: NOT EXACT\n      got {}\n      want {}",
                        shape.name, body["results"], shape.expected
                    );
                }
            } else {
                samples.push(ms);
            }
        }
        samples.sort_by(f64::total_cmp);
        out.push(Timed {
            query: shape.name.to_owned(),
            requests: samples.len(),
            p50_ms: percentile(&samples, 0.5),
            p99_ms: percentile(&samples, 0.99),
            exact,
            reference_ms: None,
            reference_exact: None,
            speedup: None,
        });
    }
    Ok(out)
}

fn dir_mib(path: &Path) -> f64 {
    let mut total = 0u64;
    if let Ok(entries) = std::fs::read_dir(path) {
        for e in entries.flatten() {
            if let Ok(m) = e.metadata() {
                total += if m.is_dir() {
                    (dir_mib(&e.path()) * 1_048_576.0) as u64
                } else {
                    m.len()
                };
            }
        }
    }
    total as f64 / 1_048_576.0
}

async fn sqlite_case(
    ctx: &mut Ctx,
    days: usize,
    per_day: usize,
    postgres: bool,
) -> anyhow::Result<QueryCase> {
    let dir = ctx.dir(&format!("query-sqlite-{days}x{per_day}"))?;
    let data = dir.join("data");
    let mut generator = Generator::new(21, days, per_day, ctx.p.query_visitors, 1_000);
    let store = SqliteStore::open(&data)?;
    eprintln!("    sqlite: {days} days × {per_day} events: seeding and folding");
    let (insert_s, fold_s) = seed(&store, &mut generator).await?;
    drop(store);
    let truth = std::mem::take(&mut generator.truth);
    let shapes = shapes(&truth, days);

    let port = procs::free_port()?;
    let mut app = ctx.evtrack(
        "evtrack",
        None,
        &dir,
        &[
            ("PORT", port.to_string()),
            ("DATA_DIR", data.display().to_string()),
            // The raw-event shape runs past the default 5 s limit at these
            // sizes, and the point is to time it.
            ("STATS_TIMEOUT_MS", "600000".into()),
        ],
    )?;
    procs::wait_http(&mut app, &ctx.http, port).await?;
    let mut queries = measure(ctx, port, &shapes, ctx.p.query_requests).await?;
    let dashboard = dashboard_load(&ctx.http, port, days, ctx.p.query_requests.min(5)).await?;
    eprintln!(
        "    sqlite {:>10} events, dashboard load ({} requests at once): p50 {:.0} ms, max {:.0} ms; \
         filtered by a page: {}",
        days * per_day,
        dashboard.requests,
        dashboard.unfiltered_p50_ms,
        dashboard.unfiltered_max_ms,
        dashboard.filtered_ms.map_or_else(
            || "did not end in time".to_owned(),
            |ms| format!("{ms:.0} ms")
        ),
    );
    app.check_alive()?;
    let service = procs::usage(&app, "evtrack");
    app.stop(Duration::from_secs(30)).await;
    let disk = dir_mib(&data);
    let events = days * per_day;

    let mut reference = None;
    if postgres {
        let mut generator = Generator::new(21, days, per_day, ctx.p.query_visitors, 1_000);
        match postgres_reference(ctx, &mut generator, &shapes).await {
            Ok((description, results)) => {
                reference = Some(description);
                for (q, (ms, exact)) in queries.iter_mut().zip(results) {
                    q.reference_ms = Some(ms);
                    q.reference_exact = Some(exact);
                    q.speedup = Some(ms / q.p50_ms.max(1e-9));
                }
            }
            Err(e) => ctx
                .notes
                .push(format!("PostgreSQL reference skipped: {e:#}")),
        }
    }
    for q in &queries {
        eprintln!(
            "    sqlite {:>10} events, {:<42} p50 {:>8.2} ms  exact {}  {}",
            events,
            q.query,
            q.p50_ms,
            q.exact,
            q.reference_ms
                .map(|r| format!("PostgreSQL {r:.1} ms ({:.0}×)", r / q.p50_ms.max(1e-9)))
                .unwrap_or_default()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(QueryCase {
        store: "sqlite".into(),
        days,
        events_per_day: per_day,
        events,
        visitors: ctx.p.query_visitors,
        pages: 1_000,
        insert_s,
        fold_s,
        fold_events_per_s: events as f64 / fold_s.max(1e-9),
        disk_mib: Some(disk),
        disk_mib_per_million: Some(disk / (events as f64 / 1e6)),
        reference,
        queries,
        dashboard: Some(dashboard),
        service,
    })
}

/// Debian's PostgreSQL server binaries (`postgresql` package), newest first.
fn pg_bin() -> anyhow::Result<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .context("no /usr/lib/postgresql: install Debian's postgresql package")?
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").is_file())
        .collect();
    dirs.sort();
    dirs.pop().context("no initdb under /usr/lib/postgresql")
}

/// Runs a PostgreSQL tool, as the `postgres` user when we are root (the
/// server refuses to run as root).
fn pg_command(bin: &Path, tool: &str, args: &[&str]) -> anyhow::Result<()> {
    let root = unsafe { libc::geteuid() } == 0;
    let mut cmd = if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin.join(tool));
        c
    } else {
        Command::new(bin.join(tool))
    };
    let out = cmd
        .args(args)
        .output()
        .with_context(|| format!("run {tool}"))?;
    if !out.status.success() {
        bail!("{tool} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

struct Postgres {
    bin: PathBuf,
    data: PathBuf,
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.data.display().to_string();
        let _ = pg_command(
            &self.bin,
            "pg_ctl",
            &["-D", &data, "-m", "immediate", "stop"],
        );
    }
}

/// The same events in PostgreSQL, with covering indexes, and the same
/// questions asked in SQL: returns a description and, per shape, the median
/// time and whether its answer is exact.
async fn postgres_reference(
    ctx: &Ctx,
    generator: &mut Generator,
    shapes: &[Shape],
) -> anyhow::Result<(String, Vec<(f64, bool)>)> {
    let bin = pg_bin()?;
    let dir = ctx.dir("postgres")?;
    let data = dir.join("data");
    if unsafe { libc::geteuid() } == 0 {
        let status = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir)
            .status()?;
        if !status.success() {
            bail!("chown of the PostgreSQL directory failed");
        }
    }
    let port = procs::free_port()?;
    let data_s = data.display().to_string();
    pg_command(
        &bin,
        "initdb",
        &[
            "-D",
            &data_s,
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
        ],
    )?;
    let options = format!(
        "-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c fsync=off \
         -c synchronous_commit=off -c full_page_writes=off -c shared_buffers=1GB -c work_mem=256MB \
         -c max_wal_size=8GB",
        dir.display()
    );
    let log = dir.join("postgres.log").display().to_string();
    pg_command(
        &bin,
        "pg_ctl",
        &["-D", &data_s, "-o", &options, "-l", &log, "-w", "start"],
    )?;
    let _server = Postgres {
        bin: bin.clone(),
        data,
    };
    let (client, connection) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={port} user=postgres dbname=postgres"),
        tokio_postgres::NoTls,
    )
    .await?;
    tokio::spawn(connection);
    client
        .batch_execute(
            "CREATE TABLE events (site_id text NOT NULL, id text NOT NULL, event_type text NOT NULL,
             path text, userid text, ts bigint NOT NULL, props jsonb)",
        )
        .await?;
    let t = Instant::now();
    loop {
        let batch = generator.take(50_000);
        if batch.is_empty() {
            break;
        }
        let mut text = String::with_capacity(batch.len() * 120);
        for e in &batch {
            let props = e
                .props
                .as_ref()
                .map(|p| Value::Object(p.clone()).to_string());
            text.push_str(&format!(
                "{}\t{}\t{}\t{}\t{}\t{}\t{}\n",
                e.site_id,
                e.id,
                e.event_type,
                e.path.as_deref().unwrap_or("\\N"),
                e.userid.as_deref().unwrap_or("\\N"),
                e.ts,
                props.as_deref().unwrap_or("\\N")
            ));
        }
        let sink = client.copy_in("COPY events FROM STDIN").await?;
        futures::pin_mut!(sink);
        use futures::SinkExt;
        sink.send(bytes::Bytes::from(text)).await?;
        sink.close().await?;
    }
    client
        .batch_execute(
            "CREATE INDEX events_time ON events (site_id, ts) INCLUDE (event_type, path, userid);
             CREATE INDEX events_page ON events (site_id, path, ts) INCLUDE (event_type, userid);",
        )
        .await?;
    // Alone: VACUUM cannot run in the implicit transaction of a batch.
    client.batch_execute("VACUUM ANALYZE events").await?;
    eprintln!(
        "    postgresql: loaded and indexed in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let days = generator.days as i64;
    let (a, b) = (first_day_ms(), first_day_ms() + days * DAY_MS);
    let agg =
        "COUNT(DISTINCT userid)::bigint, COUNT(*) FILTER (WHERE event_type = 'page_view')::bigint";
    let where_ = format!("site_id = '{SITE}' AND ts >= {a} AND ts < {b}");
    let sqls = [
        format!("SELECT NULL::text, {agg} FROM events WHERE {where_}"),
        format!(
            "SELECT path, {agg} FROM events WHERE {where_} GROUP BY path ORDER BY 2 DESC, path LIMIT 10"
        ),
        format!(
            "SELECT to_char(to_timestamp(ts / 1000) AT TIME ZONE 'UTC', 'YYYY-MM-DD') AS d, {agg}
             FROM events WHERE {where_} GROUP BY d ORDER BY d"
        ),
        format!("SELECT NULL::text, {agg} FROM events WHERE {where_} AND path = '{ONE_PAGE}'"),
        format!(
            "SELECT path, {agg} FROM events WHERE {where_} AND props->>'plan' = 'pro'
             GROUP BY path ORDER BY 2 DESC, path LIMIT 10"
        ),
    ];
    let mut results = Vec::new();
    for (sql, shape) in sqls.iter().zip(shapes) {
        let mut times = Vec::new();
        let mut exact = false;
        for i in 0..=ctx.p.plain_repeats {
            let t = Instant::now();
            let rows = client.query(sql.as_str(), &[]).await?;
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            if i == 0 {
                let got: Vec<Value> = rows
                    .iter()
                    .map(|r| {
                        let dim: Option<String> = r.get(0);
                        let (v, pv): (i64, i64) = (r.get(1), r.get(2));
                        json!({"metrics": [v, pv], "dimensions": dim.map_or(vec![], |d| vec![d])})
                    })
                    .collect();
                exact = Value::Array(got) == shape.expected;
            } else {
                times.push(ms);
            }
        }
        times.sort_by(f64::total_cmp);
        results.push((percentile(&times, 0.5), exact));
    }
    let description =
        "PostgreSQL (its own server: initdb + pg_ctl, fsync off), the same raw events, \
         covering indexes (site_id, ts) INCLUDE (event_type, path, userid) and (site_id, path, ts) \
         INCLUDE (event_type, userid), aggregated at query time with COUNT(DISTINCT userid)"
            .to_owned();
    Ok((description, results))
}

async fn mongo_case(ctx: &mut Ctx, days: usize, per_day: usize) -> anyhow::Result<QueryCase> {
    let uri = ctx.mongo().await?;
    let db_name = format!("bench_query_{days}x{per_day}");
    let dir = ctx.dir(&format!("query-mongo-{days}x{per_day}"))?;
    let client = mongodb::Client::with_uri_str(&uri).await?;
    let db = client.database(&db_name);
    db.drop().await?;
    let store = MongoStore::connect(&uri, Some(&db_name))
        .await
        .map_err(anyhow::Error::msg)?;
    let mut generator = Generator::new(22, days, per_day, ctx.p.query_visitors, 1_000);
    eprintln!("    mongodb: {days} days × {per_day} events: seeding and folding");
    let (insert_s, fold_s) = seed(&store, &mut generator).await?;
    drop(store);
    let truth = std::mem::take(&mut generator.truth);
    let shapes: Vec<Shape> = shapes(&truth, days).into_iter().take(2).collect();

    let port = procs::free_port()?;
    let mut api = ctx.evtrack(
        "evtrack-api",
        Some("api"),
        &dir,
        &[
            ("PORT", port.to_string()),
            ("REDIS_URL", ctx.redis.url.clone()),
            ("REDIS_PREFIX", "bench-query:".into()),
            ("MONGO_URI", uri.clone()),
            ("MONGO_DB", db_name.clone()),
            ("DATA_DIR", dir.join("data").display().to_string()),
            ("STATS_TIMEOUT_MS", "600000".into()),
        ],
    )?;
    procs::wait_http(&mut api, &ctx.http, port).await?;
    let mut queries = measure(ctx, port, &shapes, ctx.p.query_mongo_requests).await?;
    api.check_alive()?;
    let service = procs::usage(&api, "evtrack api");
    api.stop(Duration::from_secs(30)).await;

    // The original design's pipelines on the same raw documents.
    let coll = db.collection::<Document>(evtrack::store::mongo::COLLECTION);
    let range = doc! {
        "site_id": SITE,
        "timestamp": {"$gte": DateTime::from_millis(first_day_ms()),
                      "$lt": DateTime::from_millis(first_day_ms() + days as i64 * DAY_MS)},
    };
    let pv = doc! {"$cond": [{"$eq": ["$event_type", "page_view"]}, 1, 0]};
    let pipelines = [
        vec![
            doc! {"$match": range.clone()},
            doc! {"$group": {"_id": "$userid", "pv": {"$sum": pv.clone()}}},
            doc! {"$group": {"_id": Bson::Null, "visitors": {"$sum": 1}, "pv": {"$sum": "$pv"}}},
        ],
        vec![
            doc! {"$match": range},
            doc! {"$group": {"_id": {"p": "$path", "u": "$userid"}, "pv": {"$sum": pv}}},
            doc! {"$group": {"_id": "$_id.p", "visitors": {"$sum": 1}, "pv": {"$sum": "$pv"}}},
            doc! {"$sort": {"visitors": -1, "_id": 1}},
            doc! {"$limit": 10},
        ],
    ];
    let num = |d: &Document, k: &str| match d.get(k) {
        Some(Bson::Int32(v)) => i64::from(*v),
        Some(Bson::Int64(v)) => *v,
        _ => 0,
    };
    for ((pipeline, q), shape) in pipelines.iter().zip(queries.iter_mut()).zip(&shapes) {
        let mut times = Vec::new();
        let mut exact = false;
        for i in 0..=ctx.p.plain_repeats.min(3) {
            let t = Instant::now();
            let rows: Vec<Document> = coll
                .aggregate(pipeline.clone())
                .allow_disk_use(true)
                .await?
                .try_collect()
                .await?;
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            if i == 0 {
                let got: Vec<Value> = rows
                    .iter()
                    .map(|d| {
                        let dims = d.get_str("_id").map_or(vec![], |p| vec![p.to_owned()]);
                        json!({"metrics": [num(d, "visitors"), num(d, "pv")], "dimensions": dims})
                    })
                    .collect();
                exact = Value::Array(got) == shape.expected;
            } else {
                times.push(ms);
            }
        }
        times.sort_by(f64::total_cmp);
        let ms = percentile(&times, 0.5);
        q.reference_ms = Some(ms);
        q.reference_exact = Some(exact);
        q.speedup = Some(ms / q.p50_ms.max(1e-9));
        eprintln!(
            "    mongodb {:>8} events, {:<14} p50 {:>8.2} ms  exact {}  $group pipeline {:.1} ms ({:.0}×)",
            days * per_day,
            q.query,
            q.p50_ms,
            q.exact,
            ms,
            ms / q.p50_ms.max(1e-9)
        );
    }
    db.drop().await?;
    ctx.flush_redis().await?;
    let _ = std::fs::remove_dir_all(&dir);
    let events = days * per_day;
    Ok(QueryCase {
        store: "mongodb".into(),
        days,
        events_per_day: per_day,
        events,
        visitors: ctx.p.query_visitors,
        pages: 1_000,
        insert_s,
        fold_s,
        fold_events_per_s: events as f64 / fold_s.max(1e-9),
        disk_mib: None,
        disk_mib_per_million: None,
        reference: Some(
            "the original design's $group pipelines on the same MongoDB server and documents"
                .into(),
        ),
        queries,
        dashboard: None,
        service,
    })
}

/// Embedded mode: batches of 100 from concurrent senders, timed until a
/// query counts every event.
async fn visible_case(ctx: &mut Ctx) -> anyhow::Result<VisibleCase> {
    let events = ctx.p.visible_events;
    let (batch, senders) = (100usize, 16usize);
    let dir = ctx.dir("query-visible")?;
    let port = procs::free_port()?;
    let mut app = ctx.evtrack(
        "evtrack",
        None,
        &dir,
        &[
            ("PORT", port.to_string()),
            ("DATA_DIR", dir.join("data").display().to_string()),
        ],
    )?;
    procs::wait_http(&mut app, &ctx.http, port).await?;
    let mut generator = Generator::new(23, 1, events, ctx.p.query_visitors, 1_000);
    // Live traffic: the events of the last ten minutes, in time order (as
    // a server forwarding its visitors' events sends them), not a backfill
    // of a day (the query cases' fold rate is that).
    let now = chrono::Utc::now().timestamp_millis();
    let span = 600_000i64;
    let mut bodies = Vec::new();
    let mut sent = 0i64;
    loop {
        let b = generator.take(batch);
        if b.is_empty() {
            break;
        }
        let items: Vec<Value> = b
            .iter()
            .map(|e| {
                let ts = now - span + sent * span / events.max(1) as i64;
                sent += 1;
                json!({"site_id": e.site_id, "event_type": e.event_type, "path": e.path,
                       "userid": e.userid, "timestamp": ts, "event_id": e.id, "props": e.props})
            })
            .collect();
        bodies.push(bytes::Bytes::from(Value::Array(items).to_string()));
    }
    // Taken from the end: the oldest first.
    bodies.reverse();
    let bodies = std::sync::Arc::new(std::sync::Mutex::new(bodies));
    let url = format!("http://127.0.0.1:{port}/events");
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..senders {
        let (bodies, http, url) = (bodies.clone(), ctx.http.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let Some(body) = bodies
                    .lock()
                    .map_err(|_| anyhow::anyhow!("poisoned"))?
                    .pop()
                else {
                    return Ok::<(), anyhow::Error>(());
                };
                loop {
                    let r = http
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .send()
                        .await?;
                    if r.status().as_u16() == 202 {
                        break;
                    }
                    // Back-pressure (503 queue_full): as a client would, retry.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    let accepted_s = t.elapsed().as_secs_f64();
    let query = json!({"site_id": SITE, "metrics": ["events"], "date_range": "all"});
    loop {
        let body: Value = ctx
            .http
            .post(format!("http://127.0.0.1:{port}/api/v2/query"))
            .json(&query)
            .send()
            .await?
            .json()
            .await?;
        if body["results"][0]["metrics"][0].as_u64() == Some(events as u64) {
            break;
        }
        if t.elapsed() > Duration::from_secs(600) {
            bail!("not all events visible after 600 s: {body}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seconds = t.elapsed().as_secs_f64();
    app.stop(Duration::from_secs(30)).await;
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!(
        "    embedded, batches of {batch} until visible in queries: {events} events in {seconds:.1} s = {:.0} events/s (202s done at {accepted_s:.1} s)",
        events as f64 / seconds
    );
    Ok(VisibleCase {
        events,
        batch,
        senders,
        seconds,
        events_per_s: events as f64 / seconds,
        accepted_s,
    })
}

/// `evtrack-bench query-local`: the query shapes answered in process by the
/// engine over a SQLite store (no HTTP), seeded once into `--dir` and kept
/// there between runs, for profiling the engine and the store's reads.
#[derive(Debug, clap::Args)]
pub struct QueryLocalArgs {
    #[arg(long, default_value_t = 10)]
    days: usize,
    #[arg(long, default_value_t = 300_000)]
    per_day: usize,
    #[arg(long, default_value_t = 50_000)]
    visitors: usize,
    /// Timed runs of each shape.
    #[arg(long, default_value_t = 10)]
    requests: usize,
    /// Only shapes whose name contains this.
    #[arg(long)]
    only: Option<String>,
    /// Directory of the database; seeded when it holds none.
    #[arg(long)]
    dir: PathBuf,
    /// A MongoDB server to answer from instead of SQLite (database
    /// `bench_local_<days>x<per_day>`, seeded when it holds no events).
    #[arg(long)]
    mongo_uri: Option<String>,
    /// Then time the dashboard's opening over HTTP, as `run --only query`
    /// does: `evtrack` from `--bin-dir` serving the seeded SQLite store.
    #[arg(long)]
    dashboard: bool,
    /// Where `evtrack` is (with `--dashboard`).
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
}

pub async fn local(args: QueryLocalArgs) -> anyhow::Result<()> {
    let data = &args.dir;
    let mut generator = Generator::new(21, args.days, args.per_day, args.visitors, 1_000);
    let (store, fresh): (Box<dyn Store>, bool) = match &args.mongo_uri {
        Some(uri) => {
            let name = format!("bench_local_{}x{}", args.days, args.per_day);
            let store = MongoStore::connect(uri, Some(&name))
                .await
                .map_err(anyhow::Error::msg)?;
            let fresh = evtrack::store::StoreAdmin::count_all(&store).await? == 0;
            (Box::new(store), fresh)
        }
        None => {
            let fresh = !data.join(evtrack::store::sqlite::FILE_NAME).exists();
            (Box::new(SqliteStore::open(data)?), fresh)
        }
    };
    let store = &*store;
    if fresh {
        let (insert_s, fold_s) = seed(store, &mut generator).await?;
        eprintln!("seeded: insert {insert_s:.1} s, fold {fold_s:.1} s");
    } else {
        // The truth, without storing again.
        while !generator.take(50_000).is_empty() {}
        // Rollups dropped by a migration are folded again.
        let t = Instant::now();
        let n = evtrack::store::fold_all(store).await?;
        if n > 0 {
            eprintln!("folded {n} events in {:.1} s", t.elapsed().as_secs_f64());
        }
    }
    let truth = std::mem::take(&mut generator.truth);
    for shape in shapes(&truth, args.days) {
        if args
            .only
            .as_ref()
            .is_some_and(|o| !shape.name.contains(o.as_str()))
        {
            continue;
        }
        let mut samples = Vec::new();
        let mut exact = false;
        for i in 0..=args.requests {
            let request = evtrack::query::parse::parse_request(&shape.body)
                .map_err(|e| anyhow::anyhow!("{e:?}"))?;
            let query = std::sync::Arc::new(
                request
                    .resolve(first_day_ms() + 365 * DAY_MS, None)
                    .map_err(|e| anyhow::anyhow!("{e:?}"))?,
            );
            let t = Instant::now();
            let answer = evtrack::query::engine::run(store, query.clone()).await?;
            samples.push(t.elapsed().as_secs_f64() * 1000.0);
            if i == 0 {
                exact = answer.to_json(&query)["results"] == shape.expected;
                samples.clear();
            }
        }
        samples.sort_by(f64::total_cmp);
        eprintln!(
            "{:<42} p50 {:>8.2} ms  min {:>8.2} ms  exact {exact}",
            shape.name,
            percentile(&samples, 0.5),
            samples.first().copied().unwrap_or_default()
        );
    }
    // Resident memory: the process's own (anonymous) and the database
    // pages the reader maps (the OS's file cache, shared and reclaimable).
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
            .unwrap_or_default()
    };
    eprintln!(
        "resident: {} anonymous, {} of mapped files (peak {})",
        field("RssAnon:"),
        field("RssFile:"),
        field("VmHWM:")
    );
    if args.dashboard && args.mongo_uri.is_none() {
        local_dashboard(&args).await?;
    }
    Ok(())
}

/// `query-local --dashboard`: the dashboard's opening, timed over HTTP
/// against `evtrack` serving the seeded store (default settings, the query
/// time limit raised as in the run's query cases).
async fn local_dashboard(args: &QueryLocalArgs) -> anyhow::Result<()> {
    let port = procs::free_port()?;
    // Absolute: the child runs in the store's directory.
    let bin = std::fs::canonicalize(&args.bin_dir)?.join("evtrack");
    let mut cmd = std::process::Command::new(bin);
    cmd.current_dir(&args.dir);
    for k in evtrack::config::env_names() {
        cmd.env_remove(k);
    }
    cmd.env_remove("RUST_LOG")
        .env("PORT", port.to_string())
        .env("DATA_DIR", &args.dir)
        .env("STATS_TIMEOUT_MS", "600000");
    let mut app = procs::Proc::spawn("evtrack", &mut cmd, &args.dir.join("evtrack.log"))?;
    let http = reqwest::Client::new();
    procs::wait_http(&mut app, &http, port).await?;
    let load = dashboard_load(&http, port, args.days, 5).await;
    app.stop(Duration::from_secs(30)).await;
    let load = load?;
    eprintln!(
        "dashboard load ({} requests at once): p50 {:.0} ms, max {:.0} ms of {} loads; \
         filtered by a page: {}",
        load.requests,
        load.unfiltered_p50_ms,
        load.unfiltered_max_ms,
        load.runs,
        load.filtered_ms.map_or_else(
            || format!("did not end within {} s", FILTERED_LIMIT.as_secs()),
            |ms| format!("{ms:.0} ms")
        ),
    );
    Ok(())
}
