//! Stats: one site-day of page views seeded straight into the store, then
//! sequential `GET /stats` requests against the running service; beside it,
//! the same answer computed by a plain query-time aggregation.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use evtrack::store::Store;
use evtrack::store::mongo::MongoStore;
use evtrack::store::sqlite::SqliteStore;
use futures::TryStreamExt as _;
use mongodb::bson::{Bson, DateTime, Document, doc};
use serde::Serialize;

use crate::data::{self, DayEvents};
use crate::procs::{self, Usage};
use crate::run::Ctx;

/// One day's answer, in a comparable form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Answer {
    pub total_views: u64,
    pub unique_users: u64,
    /// (path, views, unique users), best first.
    pub top_paths: Vec<(String, u64, u64)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Plain {
    pub description: String,
    pub runs: usize,
    pub median_ms: f64,
    pub min_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct StatsCase {
    pub store: String,
    /// Page views in the site-day.
    pub events: usize,
    pub user_pool: usize,
    pub paths: usize,
    pub seed_s: f64,
    /// The first request, not counted in the percentiles.
    pub first_ms: f64,
    pub requests: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub mean_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    pub plain: Plain,
    /// The service's answer equals the plain aggregation's, and counts all events.
    pub exact: bool,
    pub answer: Answer,
    /// The evtrack process that answered.
    pub service: Usage,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct StatsSection {
    pub cases: Vec<StatsCase>,
}

/// The value at quantile `q` of sorted samples (nearest rank).
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn query_path() -> String {
    format!(
        "/stats?site_id={}&date={}",
        data::SITE,
        data::day().format("%Y-%m-%d")
    )
}

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<StatsSection> {
    let mut out = StatsSection::default();
    for n in ctx.p.stats_sqlite_sizes.clone() {
        out.cases.push(sqlite_case(ctx, n).await?);
    }
    if ctx.p.stats_mongo_sizes.last() < ctx.p.stats_sqlite_sizes.last() {
        ctx.notes.push(format!(
            "stats on MongoDB only for {:?} events per day, not {:?}: seeding a million \
             documents into SecantusDB (the MongoDB stand-in, a few thousand documents/s) \
             and aggregating them {} times takes too long for one run",
            ctx.p.stats_mongo_sizes,
            ctx.p.stats_sqlite_sizes.last().copied().unwrap_or(0),
            ctx.p.stats_mongo_requests + 1
        ));
    }
    for n in ctx.p.stats_mongo_sizes.clone() {
        out.cases.push(mongo_case(ctx, n).await?);
    }
    Ok(out)
}

async fn seed(ctx: &Ctx, store: &dyn Store, n: usize, tag: &str) -> anyhow::Result<f64> {
    let mut events = DayEvents::new(
        n as u64,
        ctx.p.stats_users,
        ctx.p.stats_paths,
        &format!("stats-{tag}-{n}-"),
    );
    let start = Instant::now();
    let mut left = n;
    while left > 0 {
        let take = left.min(ctx.p.seed_batch);
        left -= take;
        let outcomes = store.insert(&events.take(take)).await?;
        let inserted = evtrack::store::InsertCounts::of(&outcomes).inserted;
        if inserted != take {
            bail!("seeding stored {inserted} of {take}");
        }
    }
    // Counted into the rollups before the service starts, as its folder
    // would have done while they arrived.
    evtrack::store::fold_all(store).await?;
    Ok(start.elapsed().as_secs_f64())
}

/// Times sequential `GET /stats`; returns the first request's time, the
/// timed samples and the answer.
async fn measure(ctx: &Ctx, port: u16, requests: usize) -> anyhow::Result<(f64, Vec<f64>, Answer)> {
    let url = format!("http://127.0.0.1:{port}{}", query_path());
    let mut first_ms = 0.0;
    let mut samples = Vec::with_capacity(requests);
    let mut answer = None;
    for i in 0..=requests {
        let t = Instant::now();
        let resp = ctx
            .http
            .get(&url)
            .timeout(Duration::from_secs(300))
            .send()
            .await?;
        let status = resp.status();
        let body = resp.bytes().await?;
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        if !status.is_success() {
            bail!(
                "GET /stats answered {status}: {}",
                String::from_utf8_lossy(&body)
            );
        }
        if i == 0 {
            first_ms = ms;
            let v: serde_json::Value = serde_json::from_slice(&body)?;
            answer = Some(parse_answer(&v["stats"]).context("GET /stats answer")?);
        } else {
            samples.push(ms);
        }
    }
    Ok((first_ms, samples, answer.expect("one request at least")))
}

fn parse_answer(s: &serde_json::Value) -> Option<Answer> {
    let top_paths = s["top_paths"]
        .as_array()?
        .iter()
        .map(|p| {
            Some((
                p["path"].as_str()?.to_owned(),
                p["views"].as_u64()?,
                p["unique_users"].as_u64()?,
            ))
        })
        .collect::<Option<Vec<_>>>()?;
    Some(Answer {
        total_views: s["total_views"].as_u64()?,
        unique_users: s["unique_users"].as_u64()?,
        top_paths,
    })
}

#[allow(clippy::too_many_arguments)]
fn case(
    store: &str,
    n: usize,
    ctx: &Ctx,
    seed_s: f64,
    first_ms: f64,
    mut samples: Vec<f64>,
    answer: Answer,
    plain: (Plain, Answer),
    service: Usage,
) -> StatsCase {
    samples.sort_by(f64::total_cmp);
    let mean = samples.iter().sum::<f64>() / samples.len().max(1) as f64;
    let exact = answer == plain.1 && answer.total_views == n as u64;
    let c = StatsCase {
        store: store.to_owned(),
        events: n,
        user_pool: ctx.p.stats_users,
        paths: ctx.p.stats_paths,
        seed_s,
        first_ms,
        requests: samples.len(),
        p50_ms: percentile(&samples, 0.50),
        p99_ms: percentile(&samples, 0.99),
        mean_ms: mean,
        min_ms: samples.first().copied().unwrap_or(0.0),
        max_ms: samples.last().copied().unwrap_or(0.0),
        plain: plain.0,
        exact,
        answer,
        service,
    };
    eprintln!(
        "    {store} {n:>9} events: p50 {:.2} ms  p99 {:.2} ms  (first {:.1} ms; plain aggregation {:.2} ms; exact: {})",
        c.p50_ms, c.p99_ms, c.first_ms, c.plain.median_ms, c.exact
    );
    c
}

async fn sqlite_case(ctx: &mut Ctx, n: usize) -> anyhow::Result<StatsCase> {
    let dir = ctx.dir(&format!("stats-sqlite-{n}"))?;
    let data = dir.join("data");
    let store = SqliteStore::open(&data)?;
    eprintln!("    sqlite: seeding {n} events");
    let seed_s = seed(ctx, &store, n, "sqlite").await?;
    drop(store);

    let port = procs::free_port()?;
    let mut app = ctx.evtrack(
        "evtrack",
        None,
        &dir,
        &[
            ("PORT", port.to_string()),
            ("DATA_DIR", data.display().to_string()),
        ],
    )?;
    procs::wait_http(&mut app, &ctx.http, port).await?;
    let (first_ms, samples, answer) = measure(ctx, port, ctx.p.stats_requests).await?;
    app.check_alive()?;
    let mem = procs::usage(&app, "evtrack");
    app.stop(Duration::from_secs(30)).await;

    let path = data.join(evtrack::store::sqlite::FILE_NAME);
    let runs = ctx.p.plain_repeats;
    let plain = tokio::task::spawn_blocking(move || sqlite_plain(&path, runs))
        .await
        .context("plain sqlite task")??;
    let c = case(
        "sqlite", n, ctx, seed_s, first_ms, samples, answer, plain, mem,
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(c)
}

fn summarize(description: String, mut times: Vec<f64>) -> Plain {
    times.sort_by(f64::total_cmp);
    Plain {
        description,
        runs: times.len(),
        median_ms: percentile(&times, 0.5),
        min_ms: times.first().copied().unwrap_or(0.0),
    }
}

/// The plain query-time aggregation over the raw rows, with rusqlite on the
/// same file (the service is stopped by then).
fn sqlite_plain(path: &Path, runs: usize) -> anyhow::Result<(Plain, Answer)> {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let start = data::day_start_ms();
    let end = start + 86_400_000;
    let mut times = Vec::with_capacity(runs);
    let mut answer = None;
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        let (total, users): (i64, i64) = conn.query_row(
            "SELECT COUNT(*), COUNT(DISTINCT userid) FROM events
             WHERE site_id = ?1 AND event_type = ?2 AND ts >= ?3 AND ts < ?4",
            rusqlite::params![data::SITE, data::EVENT_TYPE, start, end],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let mut stmt = conn.prepare(
            "SELECT path, COUNT(*) AS views, COUNT(DISTINCT userid) AS users FROM events
             WHERE site_id = ?1 AND event_type = ?2 AND ts >= ?3 AND ts < ?4 AND path IS NOT NULL
             GROUP BY path ORDER BY views DESC, users DESC, path ASC LIMIT 10",
        )?;
        let top = stmt
            .query_map(
                rusqlite::params![data::SITE, data::EVENT_TYPE, start, end],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)? as u64,
                        r.get::<_, i64>(2)? as u64,
                    ))
                },
            )?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        answer = Some(Answer {
            total_views: total as u64,
            unique_users: users as u64,
            top_paths: top,
        });
    }
    let plain = summarize(
        "rusqlite on the same file: SELECT COUNT(*), COUNT(DISTINCT userid) …; \
         SELECT path, COUNT(*), COUNT(DISTINCT userid) … GROUP BY path ORDER BY … LIMIT 10"
            .into(),
        times,
    );
    Ok((plain, answer.expect("one run at least")))
}

async fn mongo_case(ctx: &mut Ctx, n: usize) -> anyhow::Result<StatsCase> {
    let uri = ctx.mongo().await?;
    let db_name = format!("bench_stats_{n}");
    let dir = ctx.dir(&format!("stats-mongo-{n}"))?;
    let client = mongodb::Client::with_uri_str(&uri).await?;
    let db = client.database(&db_name);
    db.drop().await?;
    let store = MongoStore::connect(&uri, Some(&db_name))
        .await
        .map_err(anyhow::Error::msg)?;
    eprintln!("    mongodb: seeding {n} events");
    let seed_s = seed(ctx, &store, n, "mongo").await?;

    let port = procs::free_port()?;
    let mut api = ctx.evtrack(
        "evtrack-api",
        Some("api"),
        &dir,
        &[
            ("PORT", port.to_string()),
            ("REDIS_URL", ctx.redis.url.clone()),
            ("REDIS_PREFIX", "bench-stats:".into()),
            ("MONGO_URI", uri.clone()),
            ("MONGO_DB", db_name.clone()),
            ("DATA_DIR", dir.join("data").display().to_string()),
            // The stand-in scans every matching document: far past the
            // default 5 s limit at this size, and the point is to time it.
            ("STATS_TIMEOUT_MS", "600000".into()),
        ],
    )?;
    procs::wait_http(&mut api, &ctx.http, port).await?;
    // The MongoDB store reads a day's raw events per request (it keeps no
    // rollups yet), which the stand-in streams at some 10,000 a second.
    let (first_ms, samples, answer) = measure(ctx, port, ctx.p.stats_mongo_requests).await?;
    api.check_alive()?;
    let mem = procs::usage(&api, "evtrack api");
    api.stop(Duration::from_secs(30)).await;

    drop(store);
    let plain = mongo_plain(&db, ctx.p.plain_repeats).await?;
    db.drop().await?;
    ctx.flush_redis().await?;
    let c = case(
        "mongodb", n, ctx, seed_s, first_ms, samples, answer, plain, mem,
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(c)
}

/// The plain `$group` pipelines over the raw documents.
async fn mongo_plain(db: &mongodb::Database, runs: usize) -> anyhow::Result<(Plain, Answer)> {
    let coll = db.collection::<Document>(evtrack::store::mongo::COLLECTION);
    let start = DateTime::from_millis(data::day_start_ms());
    let end = DateTime::from_millis(data::day_start_ms() + 86_400_000);
    let day = doc! {
        "site_id": data::SITE,
        "event_type": data::EVENT_TYPE,
        "timestamp": {"$gte": start, "$lt": end},
    };
    let totals = vec![
        doc! {"$match": day.clone()},
        doc! {"$group": {"_id": "$userid", "n": {"$sum": 1}}},
        doc! {"$group": {"_id": Bson::Null, "total": {"$sum": "$n"}, "users": {"$sum": 1}}},
    ];
    let paths = vec![
        doc! {"$match": day},
        doc! {"$group": {"_id": {"p": "$path", "u": "$userid"}, "n": {"$sum": 1}}},
        doc! {"$group": {"_id": "$_id.p", "views": {"$sum": "$n"}, "users": {"$sum": 1}}},
        doc! {"$sort": {"views": -1, "users": -1, "_id": 1}},
        doc! {"$limit": 10},
    ];
    let num = |d: &Document, k: &str| match d.get(k) {
        Some(Bson::Int32(v)) => *v as u64,
        Some(Bson::Int64(v)) => *v as u64,
        Some(Bson::Double(v)) => *v as u64,
        _ => 0,
    };
    let mut times = Vec::with_capacity(runs);
    let mut answer = None;
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        let total: Vec<Document> = coll
            .aggregate(totals.clone())
            .allow_disk_use(true)
            .await?
            .try_collect()
            .await?;
        let top: Vec<Document> = coll
            .aggregate(paths.clone())
            .allow_disk_use(true)
            .await?
            .try_collect()
            .await?;
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        let (total_views, unique_users) = total
            .first()
            .map_or((0, 0), |d| (num(d, "total"), num(d, "users")));
        let top_paths = top
            .iter()
            .map(|d| {
                (
                    d.get_str("_id").unwrap_or_default().to_owned(),
                    num(d, "views"),
                    num(d, "users"),
                )
            })
            .collect();
        answer = Some(Answer {
            total_views,
            unique_users,
            top_paths,
        });
    }
    let plain = summarize(
        "mongodb crate on the same database: $match day, $group per user then $group total; \
         $group per (path, user) then per path, $sort, $limit 10"
            .into(),
        times,
    );
    Ok((plain, answer.expect("one run at least")))
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v[..50], 0.99), 50.0);
        assert_eq!(percentile(&[3.0], 0.5), 3.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }
}
