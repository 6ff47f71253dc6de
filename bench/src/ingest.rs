//! Ingest: wrk against the ceilings and against evtrack, single events
//! (`POST /event`) and batches (`POST /events`).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::{SecondsFormat, Utc};
use serde::Serialize;

use crate::procs::{self, Proc, Usage};
use crate::run::Ctx;
use crate::wrk::{self, WrkResult};

#[derive(Debug, Clone, Serialize)]
pub struct IngestCase {
    /// `ceiling`, `ceiling+redis`, `embedded`, `redis`.
    pub case: String,
    pub description: String,
    pub endpoint: String,
    pub events_per_request: usize,
    pub wrk: WrkResult,
    /// Events accepted per second: 2xx answers × events per request / duration.
    pub events_per_s: f64,
    /// The ceiling this case is compared with, and req/s ÷ the ceiling's req/s.
    pub ceiling: Option<String>,
    pub ratio_to_ceiling: Option<f64>,
    /// Single events: req/s ÷ the original design's req/s.
    pub ratio_to_original: Option<f64>,
    /// Memory and CPU of each server process of the case.
    pub processes: Vec<Usage>,
    /// Events in the store (or the ceiling's stream) once the processes stopped.
    pub stored: Option<u64>,
    /// Redis mode: events still queued when the load stopped, and how long
    /// the worker then took to empty the stream.
    pub queued_after_load: Option<u64>,
    pub drained_after_s: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Ingest {
    pub single: Vec<IngestCase>,
    pub batches: Vec<IngestCase>,
}

pub fn sqlite_count(data_dir: &Path) -> anyhow::Result<u64> {
    let path = data_dir.join(evtrack::store::sqlite::FILE_NAME);
    let conn =
        rusqlite::Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .with_context(|| format!("open {}", path.display()))?;
    let n: i64 = conn.query_row("SELECT COUNT(*) FROM events", [], |r| r.get(0))?;
    Ok(n as u64)
}

/// Queue limits of the Redis batch case (see `redis_mode`).
const BATCH_QUEUE_MAX_LEN: u64 = 20_000_000;
const BATCH_QUEUE_MAX_BYTES: u64 = 8 << 30;

fn case(
    name: &str,
    description: &str,
    endpoint: &str,
    per_request: usize,
    wrk: WrkResult,
) -> IngestCase {
    let events_per_s = if wrk.duration_s > 0.0 {
        (wrk.ok * per_request as u64) as f64 / wrk.duration_s
    } else {
        0.0
    };
    IngestCase {
        case: name.to_owned(),
        description: description.to_owned(),
        endpoint: endpoint.to_owned(),
        events_per_request: per_request,
        wrk,
        events_per_s,
        ceiling: None,
        ratio_to_ceiling: None,
        ratio_to_original: None,
        processes: Vec::new(),
        stored: None,
        queued_after_load: None,
        drained_after_s: None,
    }
}

fn progress(c: &IngestCase) {
    eprintln!(
        "    {:<14} {:>10.0} req/s {:>11.0} events/s  p50 {:>7.2} ms  p99 {:>7.2} ms  non-2xx {}  socket errors {}",
        format!("{}{}", c.case, c.endpoint),
        c.wrk.req_per_s,
        c.events_per_s,
        c.wrk.p50_ms,
        c.wrk.p99_ms,
        c.wrk.non_2xx,
        c.wrk.socket_errors.connect
            + c.wrk.socket_errors.read
            + c.wrk.socket_errors.write
            + c.wrk.socket_errors.timeout
    );
}

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<Ingest> {
    let dir = ctx.dir("wrk")?;
    // Events of "now": valid (not in the future) whenever the load runs.
    let ts = Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
    let (single, batch) = wrk::write_scripts(&dir, &ts, ctx.p.batch_events)?;

    let mut out = Ingest::default();
    let plain = ceiling(ctx, None, &single, &dir).await?;
    let with_redis = ceiling(ctx, Some("bench-ceiling:events"), &single, &dir).await?;
    let original = original(ctx, &single, &dir).await?;
    let mut local = embedded(ctx, "/event", 1, &single, &dir).await?;
    let mut queued = redis_mode(ctx, "/event", 1, &single, &dir, true).await?;
    let mut api_alone = redis_mode(ctx, "/event", 1, &single, &dir, false).await?;
    for (c, base) in [
        (&mut local, &plain),
        (&mut queued, &with_redis),
        (&mut api_alone, &with_redis),
    ] {
        c.ceiling = Some(base.case.clone());
        c.ratio_to_ceiling =
            (base.wrk.req_per_s > 0.0).then(|| c.wrk.req_per_s / base.wrk.req_per_s);
        c.ratio_to_original =
            (original.wrk.req_per_s > 0.0).then(|| c.wrk.req_per_s / original.wrk.req_per_s);
    }
    out.single = vec![plain, with_redis, original, local, queued, api_alone];

    let n = ctx.p.batch_events;
    out.batches = vec![
        embedded(ctx, "/events", n, &batch, &dir).await?,
        redis_mode(ctx, "/events", n, &batch, &dir, true).await?,
    ];
    Ok(out)
}

async fn ceiling(
    ctx: &mut Ctx,
    stream: Option<&str>,
    script: &Path,
    dir: &Path,
) -> anyhow::Result<IngestCase> {
    let (mut proc, port) = ctx.ceiling(stream).await?;
    let (name, description) = match stream {
        None => (
            "ceiling",
            "minimal axum server: parse the JSON body, answer 202",
        ),
        Some(_) => (
            "ceiling+redis",
            "minimal axum server: parse the JSON body, XADD it to Redis, answer 202",
        ),
    };
    let url = format!("http://127.0.0.1:{port}/event");
    let log = dir.join(format!("{name}.wrk.txt"));
    let result = wrk::run(&url, script, &ctx.p.wrk, &log).await?;
    proc.check_alive()?;
    let mut c = case(name, description, "/event", 1, result);
    c.processes
        .push(procs::usage(&proc, "evtrack-bench ceiling"));
    proc.stop(Duration::from_secs(5)).await;
    if let Some(stream) = stream {
        c.stored = Some(ctx.xlen(stream).await?);
        ctx.flush_redis().await?;
    }
    progress(&c);
    Ok(c)
}

/// The original design's API (`bench/original/server.js`: Node.js,
/// Express, one LPUSH per event), on our Redis. Its worker is not run: the
/// reference is its API alone, which flatters it against `redis` (whose
/// worker drains beside it).
async fn original(ctx: &mut Ctx, script: &Path, dir: &Path) -> anyhow::Result<IngestCase> {
    let (mut proc, port) = ctx.original().await?;
    let url = format!("http://127.0.0.1:{port}/event");
    let log = dir.join("original.wrk.txt");
    let result = wrk::run(&url, script, &ctx.p.wrk, &log).await?;
    proc.check_alive()?;
    let mut c = case(
        "original",
        "the original design's API: Node.js + Express, LPUSH per event (its worker not running)",
        "/event",
        1,
        result,
    );
    c.processes
        .push(procs::usage(&proc, "original design: node"));
    proc.stop(Duration::from_secs(5)).await;
    c.stored = Some(ctx.llen(crate::run::ORIGINAL_LIST).await?);
    ctx.flush_redis().await?;
    progress(&c);
    Ok(c)
}

async fn embedded(
    ctx: &mut Ctx,
    endpoint: &str,
    per_request: usize,
    script: &Path,
    wrk_dir: &Path,
) -> anyhow::Result<IngestCase> {
    let kind = if per_request == 1 { "single" } else { "batch" };
    let dir = ctx.dir(&format!("ingest-embedded-{kind}"))?;
    let data = dir.join("data");
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
    let url = format!("http://127.0.0.1:{port}{endpoint}");
    let log = wrk_dir.join(format!("embedded-{kind}.wrk.txt"));
    let result = wrk::run(&url, script, &ctx.p.wrk, &log).await?;
    app.check_alive()?;
    let mut c = case(
        "embedded",
        "evtrack (API + worker in one process): in-process queue, SQLite, 202 after commit",
        endpoint,
        per_request,
        result,
    );
    c.processes.push(procs::usage(&app, "evtrack"));
    // SIGTERM drains the in-process queue into the store before exiting.
    app.stop(Duration::from_secs(60)).await;
    c.stored = Some(sqlite_count(&data)?);
    progress(&c);
    Ok(c)
}

/// Waits until the worker consumes: queues one probe event and waits for the
/// stream to be empty again (the store then holds the probe: one extra row).
async fn wait_worker(ctx: &mut Ctx, stream: &str, worker: &mut Proc) -> anyhow::Result<()> {
    let probe = evtrack::event::Event {
        id: crate::data::parse("bench-probe"),
        site_id: crate::data::parse("bench-probe"),
        event_type: crate::data::parse("probe"),
        path: None,
        userid: None,
        ts: evtrack::event::now_ms(),
        created_at: evtrack::event::now_ms(),
        props: None,
        visitor: None,
        ctx: None,
    };
    let _: String = redis::cmd("XADD")
        .arg(stream)
        .arg("*")
        .arg(evtrack::queue::redis::FIELD)
        .arg(serde_json::to_vec(&probe)?)
        .query_async(&mut ctx.redis_conn)
        .await?;
    wait_empty(ctx, stream, worker, Duration::from_secs(60)).await?;
    Ok(())
}

/// Waits until `stream` is empty; returns the seconds it took.
pub async fn wait_empty(
    ctx: &mut Ctx,
    stream: &str,
    worker: &mut Proc,
    stall: Duration,
) -> anyhow::Result<f64> {
    let start = Instant::now();
    let mut last = u64::MAX;
    let mut last_change = Instant::now();
    loop {
        let len = ctx.xlen(stream).await?;
        if len == 0 {
            return Ok(start.elapsed().as_secs_f64());
        }
        if len != last {
            last = len;
            last_change = Instant::now();
        } else if last_change.elapsed() > stall {
            bail!(
                "the worker made no progress for {stall:?} ({len} events left); log tail:\n{}",
                procs::tail(&worker.log)
            );
        }
        worker.check_alive()?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn redis_mode(
    ctx: &mut Ctx,
    endpoint: &str,
    per_request: usize,
    script: &Path,
    wrk_dir: &Path,
    with_worker: bool,
) -> anyhow::Result<IngestCase> {
    let kind = match (per_request, with_worker) {
        (1, true) => "single",
        (1, false) => "single-api-alone",
        _ => "batch",
    };
    let dir = ctx.dir(&format!("ingest-redis-{kind}"))?;
    let data = dir.join("data");
    let prefix = format!("bench-ingest-{kind}:");
    let stream = format!("{prefix}events");
    let port = procs::free_port()?;
    let env = |extra: Vec<(&'static str, String)>| {
        let mut env = vec![
            ("REDIS_URL", ctx.redis.url.clone()),
            ("REDIS_PREFIX", prefix.clone()),
            ("DATA_DIR", data.display().to_string()),
        ];
        if per_request > 1 {
            // The figure is the rate of acceptance into the queue: at the
            // default limit (1,000,000) the stream fills within seconds,
            // and the 503s that follow would measure the limit instead.
            env.push(("QUEUE_MAX_LEN", BATCH_QUEUE_MAX_LEN.to_string()));
            env.push(("QUEUE_MAX_BYTES", BATCH_QUEUE_MAX_BYTES.to_string()));
        }
        env.extend(extra);
        env
    };
    // The API first: it creates the SQLite schema before the worker opens it.
    let mut api = ctx.evtrack(
        "evtrack-api",
        Some("api"),
        &dir,
        &env(vec![("PORT", port.to_string())]),
    )?;
    procs::wait_http(&mut api, &ctx.http, port).await?;
    let url = format!("http://127.0.0.1:{port}{endpoint}");
    let log = wrk_dir.join(format!("redis-{kind}.wrk.txt"));
    if !with_worker {
        let result = wrk::run(&url, script, &ctx.p.wrk, &log).await?;
        api.check_alive()?;
        let mut c = case(
            "redis, no worker",
            "evtrack api (Redis Stream queue) alone: no worker drains meanwhile",
            endpoint,
            per_request,
            result,
        );
        c.processes.push(procs::usage(&api, "evtrack api"));
        api.stop(Duration::from_secs(30)).await;
        c.stored = Some(ctx.xlen(&stream).await?);
        ctx.flush_redis().await?;
        progress(&c);
        return Ok(c);
    }
    let mut worker = ctx.evtrack("evtrack-worker", Some("worker"), &dir, &env(vec![]))?;
    wait_worker(ctx, &stream, &mut worker).await?;

    let result = wrk::run(&url, script, &ctx.p.wrk, &log).await?;
    api.check_alive()?;
    let mut c = case(
        "redis",
        "evtrack api (Redis Stream queue) while one evtrack worker drains into SQLite",
        endpoint,
        per_request,
        result,
    );
    c.queued_after_load = Some(ctx.xlen(&stream).await?);
    c.drained_after_s =
        Some(wait_empty(ctx, &stream, &mut worker, Duration::from_secs(120)).await?);
    c.processes.push(procs::usage(&api, "evtrack api"));
    c.processes.push(procs::usage(&worker, "evtrack worker"));
    api.stop(Duration::from_secs(30)).await;
    worker.stop(Duration::from_secs(30)).await;
    // Less the probe event.
    c.stored = Some(sqlite_count(&data)?.saturating_sub(1));
    ctx.flush_redis().await?;
    progress(&c);
    Ok(c)
}
