//! Drain: N events preloaded into the Redis stream, then one `evtrack worker`
//! started; the clock runs from its start until the stream is empty. Beside
//! it, the same documents inserted by the plain driver into the same server.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::TryStreamExt as _;
use mongodb::bson::{Document, doc};
use serde::Serialize;

use crate::data::DayEvents;
use crate::ingest::{sqlite_count, wait_empty};
use crate::procs::{self, Usage};
use crate::run::Ctx;

const CHUNK: usize = 10_000;

#[derive(Debug, Clone, Serialize)]
pub struct Baseline {
    pub description: String,
    pub events: usize,
    pub batch: usize,
    /// Time spent in the inserts only (building the documents is not counted).
    pub seconds: f64,
    pub events_per_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DrainCase {
    pub store: String,
    pub events: usize,
    pub preload_s: f64,
    /// From starting `evtrack worker` until XLEN is 0 (start-up included).
    pub drain_s: f64,
    pub events_per_s: f64,
    /// Events in the store afterwards (must equal `events`).
    pub stored: u64,
    pub dead_lettered: u64,
    /// The worker, read once the stream is empty (its CPU: the whole drain).
    pub worker: Usage,
    /// CPU seconds redis-server and the MongoDB server used during the drain.
    pub redis_cpu_s: f64,
    pub mongo_cpu_s: Option<f64>,
    pub baseline: Baseline,
    /// Worker rate ÷ plain insert rate.
    pub ratio_to_baseline: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Drain {
    pub cases: Vec<DrainCase>,
    /// The drain into SQLite by 1, 2 and 4 workers at once.
    pub scaling: Vec<ScalingCase>,
}

/// One drain of the scaling figure: `workers` processes started at once on
/// the same preloaded stream and the same SQLite file.
#[derive(Debug, Clone, Serialize)]
pub struct ScalingCase {
    pub workers: usize,
    pub events: usize,
    pub drain_s: f64,
    pub events_per_s: f64,
    pub stored: u64,
    /// CPU seconds of all the workers together.
    pub workers_cpu_s: f64,
}

fn seed_for(store: &str) -> u64 {
    if store == "sqlite" { 11 } else { 12 }
}

fn generator(ctx: &Ctx, store: &str) -> DayEvents {
    DayEvents::new(
        seed_for(store),
        ctx.p.stats_users,
        ctx.p.stats_paths,
        &format!("drain-{store}-"),
    )
}

/// XADDs `n` events into `stream`, pipelined in chunks; the group exists first.
async fn preload(ctx: &mut Ctx, store: &str, stream: &str, n: usize) -> anyhow::Result<f64> {
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg(evtrack::queue::redis::GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut ctx.redis_conn)
        .await
        .context("create the consumer group")?;
    let start = Instant::now();
    let mut events = generator(ctx, store);
    let mut left = n;
    while left > 0 {
        let take = left.min(CHUNK);
        left -= take;
        let mut pipe = redis::pipe();
        for e in events.take(take) {
            pipe.cmd("XADD")
                .arg(stream)
                .arg("*")
                .arg(evtrack::queue::redis::FIELD)
                .arg(serde_json::to_vec(&e)?)
                .ignore();
        }
        let _: () = pipe.query_async(&mut ctx.redis_conn).await?;
    }
    let secs = start.elapsed().as_secs_f64();
    let len = ctx.xlen(stream).await?;
    if len != n as u64 {
        bail!("preloaded {n} events but the stream holds {len}");
    }
    Ok(secs)
}

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<Drain> {
    let mut out = Drain::default();
    let n = ctx.p.drain_sqlite_events;
    out.cases.push(drain_case(ctx, "sqlite", n).await?);
    let n = ctx.p.drain_mongo_events;
    if n < ctx.p.drain_sqlite_events {
        ctx.notes.push(format!(
            "drain into MongoDB uses {n} events, not {} as for SQLite: SecantusDB, the MongoDB \
             stand-in, stores only a few thousand documents/s, for the worker and the plain \
             driver alike",
            ctx.p.drain_sqlite_events
        ));
    }
    out.cases.push(drain_case(ctx, "mongodb", n).await?);
    let n = ctx.p.drain_sqlite_events / 2;
    for workers in [1, 2, 4] {
        out.scaling.push(scaling_case(ctx, n, workers).await?);
    }
    Ok(out)
}

/// Preloads `n` events, starts `workers` workers on one SQLite file at
/// once, and times them until the stream is empty.
async fn scaling_case(ctx: &mut Ctx, n: usize, workers: usize) -> anyhow::Result<ScalingCase> {
    let dir = ctx.dir(&format!("drain-scaling-{workers}"))?;
    let data = dir.join("data");
    let prefix = format!("bench-scaling-{workers}:");
    let stream = format!("{prefix}events");
    let env = vec![
        ("REDIS_URL", ctx.redis.url.clone()),
        ("REDIS_PREFIX", prefix.clone()),
        ("DATA_DIR", data.display().to_string()),
    ];
    // Made before the workers start: several opening a new file at once
    // would all migrate it (they take turns, but the first drain would
    // include that).
    drop(evtrack::store::sqlite::SqliteStore::open(&data)?);
    preload(ctx, "sqlite", &stream, n).await?;
    let start = Instant::now();
    let mut procs = Vec::new();
    for i in 0..workers {
        procs.push(ctx.evtrack(&format!("evtrack-worker-{i}"), Some("worker"), &dir, &env)?);
    }
    let mut first = procs.remove(0);
    wait_empty(ctx, &stream, &mut first, Duration::from_secs(120)).await?;
    let drain_s = start.elapsed().as_secs_f64();
    procs.insert(0, first);
    let workers_cpu_s = procs
        .iter()
        .map(|p| procs::usage(p, "evtrack worker").cpu_s)
        .sum();
    for mut p in procs {
        p.stop(Duration::from_secs(30)).await;
    }
    let stored = sqlite_count(&data)?;
    ctx.flush_redis().await?;
    let _ = std::fs::remove_dir_all(&dir);
    let events_per_s = n as f64 / drain_s;
    eprintln!(
        "    sqlite, {workers} worker(s): drained {n} in {drain_s:.2} s = {events_per_s:.0} events/s \
         (stored {stored}; CPU s of the workers {workers_cpu_s:.1})"
    );
    Ok(ScalingCase {
        workers,
        events: n,
        drain_s,
        events_per_s,
        stored,
        workers_cpu_s,
    })
}

async fn drain_case(ctx: &mut Ctx, store: &str, n: usize) -> anyhow::Result<DrainCase> {
    let dir = ctx.dir(&format!("drain-{store}"))?;
    let data = dir.join("data");
    let prefix = format!("bench-drain-{store}:");
    let stream = format!("{prefix}events");
    let mut env = vec![
        ("REDIS_URL", ctx.redis.url.clone()),
        ("REDIS_PREFIX", prefix.clone()),
        ("DATA_DIR", data.display().to_string()),
    ];
    let mongo_db = "bench_drain";
    if store == "mongodb" {
        let uri = ctx.mongo().await?;
        env.push(("MONGO_URI", uri));
        env.push(("MONGO_DB", mongo_db.to_owned()));
    }
    eprintln!("    {store}: preloading {n} events");
    let preload_s = preload(ctx, store, &stream, n).await?;

    let redis_cpu0 = procs::cpu_seconds(ctx.redis.proc.pid()).unwrap_or(0.0);
    let mongo_cpu0 = ctx
        .mongo
        .as_ref()
        .and_then(|m| procs::cpu_seconds(m.proc.pid()));
    let start = Instant::now();
    let mut worker = ctx.evtrack("evtrack-worker", Some("worker"), &dir, &env)?;
    wait_empty(ctx, &stream, &mut worker, Duration::from_secs(120)).await?;
    let drain_s = start.elapsed().as_secs_f64();
    let worker_usage = procs::usage(&worker, "evtrack worker");
    let redis_cpu_s = procs::cpu_seconds(ctx.redis.proc.pid()).unwrap_or(0.0) - redis_cpu0;
    let mongo_cpu_s = match (&ctx.mongo, mongo_cpu0) {
        (Some(m), Some(before)) if store == "mongodb" => {
            procs::cpu_seconds(m.proc.pid()).map(|now| now - before)
        }
        _ => None,
    };
    worker.stop(Duration::from_secs(30)).await;
    let dead_lettered = ctx.xlen(&format!("{prefix}dead")).await?;
    let stored = match store {
        "sqlite" => sqlite_count(&data)?,
        _ => {
            let client = mongo_client(&ctx.mongo().await?).await?;
            let n = client
                .database(mongo_db)
                .collection::<Document>(evtrack::store::mongo::COLLECTION)
                .count_documents(doc! {})
                .await?;
            client.database(mongo_db).drop().await?;
            n
        }
    };
    ctx.flush_redis().await?;
    let events_per_s = n as f64 / drain_s;
    eprintln!(
        "    {store}: drained {n} in {drain_s:.2} s = {events_per_s:.0} events/s (stored {stored}, dead {dead_lettered}; \
         CPU s: worker {:.1}, redis {redis_cpu_s:.1}{})",
        worker_usage.cpu_s,
        mongo_cpu_s.map_or(String::new(), |s| format!(", mongodb server {s:.1}"))
    );

    let baseline = match store {
        "sqlite" => sqlite_baseline(ctx, n).await?,
        _ => mongo_baseline(ctx, n).await?,
    };
    eprintln!(
        "    {store}: plain insert {:.0} events/s",
        baseline.events_per_s
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(DrainCase {
        store: store.to_owned(),
        events: n,
        preload_s,
        drain_s,
        events_per_s,
        stored,
        dead_lettered,
        worker: worker_usage,
        redis_cpu_s,
        mongo_cpu_s,
        ratio_to_baseline: events_per_s / baseline.events_per_s,
        baseline,
    })
}

async fn mongo_client(uri: &str) -> anyhow::Result<mongodb::Client> {
    Ok(mongodb::Client::with_uri_str(uri).await?)
}

/// Unordered `insertMany` batches of 500 into a fresh collection with the
/// stats index, journaled like evtrack's default write concern.
async fn mongo_baseline(ctx: &mut Ctx, n: usize) -> anyhow::Result<Baseline> {
    let uri = ctx.mongo().await?;
    let mut options = mongodb::options::ClientOptions::parse(&uri).await?;
    options.write_concern = Some(
        mongodb::options::WriteConcern::builder()
            .journal(true)
            .build(),
    );
    let client = mongodb::Client::with_options(options)?;
    let db = client.database("bench_drain_baseline");
    db.drop().await?;
    let coll = db.collection::<Document>("events");
    coll.create_index(
        mongodb::IndexModel::builder()
            .keys(doc! {"site_id": 1, "event_type": 1, "timestamp": 1, "path": 1, "userid": 1})
            .build(),
    )
    .await?;
    let batch = ctx.p.baseline_batch;
    let mut events = generator(ctx, "mongodb");
    let mut spent = Duration::ZERO;
    let mut left = n;
    while left > 0 {
        let take = left.min(batch);
        left -= take;
        let docs: Vec<Document> = events
            .take(take)
            .iter()
            .map(|e| evtrack::store::mongo::to_document(e).map_err(anyhow::Error::msg))
            .collect::<anyhow::Result<_>>()?;
        let t = Instant::now();
        coll.insert_many(docs).ordered(false).await?;
        spent += t.elapsed();
    }
    let stored = coll.count_documents(doc! {}).await?;
    if stored != n as u64 {
        bail!("plain driver insert stored {stored} of {n}");
    }
    // Sanity: the index exists (the baseline must pay for it like evtrack does).
    let indexes: Vec<_> = coll.list_indexes().await?.try_collect().await?;
    if indexes.len() < 2 {
        bail!("the baseline collection lacks the stats index");
    }
    db.drop().await?;
    let seconds = spent.as_secs_f64();
    Ok(Baseline {
        description: format!(
            "mongodb crate: insertMany, unordered, batches of {batch}, j:true, same index, same server"
        ),
        events: n,
        batch,
        seconds,
        events_per_s: n as f64 / seconds,
    })
}

/// rusqlite: one transaction per batch of 500 into evtrack's schema (created
/// by `SqliteStore::open`), same pragmas as the Redis-mode worker it is
/// compared with (WAL, synchronous=FULL: each commit synced before the
/// worker acknowledges).
async fn sqlite_baseline(ctx: &mut Ctx, n: usize) -> anyhow::Result<Baseline> {
    let dir = ctx.dir("drain-sqlite-baseline")?;
    drop(evtrack::store::sqlite::SqliteStore::open(&dir)?);
    let batch = ctx.p.baseline_batch;
    let events = generator(ctx, "sqlite");
    let path = dir.join(evtrack::store::sqlite::FILE_NAME);
    let spent = tokio::task::spawn_blocking(move || sqlite_insert(&path, events, n, batch))
        .await
        .context("sqlite baseline task")??;
    let stored = sqlite_count(&dir)?;
    if stored != n as u64 {
        bail!("plain rusqlite insert stored {stored} of {n}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    let seconds = spent.as_secs_f64();
    Ok(Baseline {
        description: format!(
            "rusqlite: INSERT … ON CONFLICT DO NOTHING, one transaction per {batch}, WAL, synchronous=FULL, same schema"
        ),
        events: n,
        batch,
        seconds,
        events_per_s: n as f64 / seconds,
    })
}

fn sqlite_insert(
    path: &Path,
    mut events: DayEvents,
    n: usize,
    batch: usize,
) -> anyhow::Result<Duration> {
    let mut conn = rusqlite::Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    let mut spent = Duration::ZERO;
    let mut left = n;
    while left > 0 {
        let take = left.min(batch);
        left -= take;
        let chunk = events.take(take);
        let t = Instant::now();
        let tx = conn.transaction()?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO events (id, site_id, event_type, path, userid, ts, created_at, props)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, NULL) ON CONFLICT (site_id, id) DO NOTHING",
            )?;
            for e in &chunk {
                stmt.execute(rusqlite::params![
                    e.id,
                    e.site_id,
                    e.event_type,
                    e.path,
                    e.userid,
                    e.ts,
                    e.created_at
                ])?;
            }
        }
        tx.commit()?;
        spent += t.elapsed();
    }
    Ok(spent)
}
