//! Raw export: N events of one site over 10 days stored by the embedded
//! store, then `GET /api/sites/{site}/events` of the whole range, read to
//! its end by a client that only counts lines and bytes.
//!
//! `evtrack api` serves it: the API role runs no fold, so the time and the
//! memory are the export's alone (the events are stored, not folded: an
//! export reads raw events either way). Beside it, the ceiling: the same
//! rows read by plain rusqlite in this process, in the same order, without
//! JSON or HTTP. Memory: the serving process's anonymous resident memory
//! (heap and stacks), sampled during the export, against the size of the
//! export; it must not grow with the event count. (Its peak RSS is
//! reported too, but counts the database pages the store maps.)

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

use crate::procs;
use crate::query::{Generator, SITE};
use crate::run::Ctx;

#[derive(Debug, Clone, Serialize)]
pub struct ExportCase {
    pub events: usize,
    pub days: usize,
    pub seed_s: f64,
    pub export_s: f64,
    pub events_per_s: f64,
    pub mib_exported: f64,
    pub lines: u64,
    /// The serving process's VmHWM once up, and after the export, MiB:
    /// these count the database pages it maps (the store reads through
    /// mmap), which are the OS's file cache, not the process's memory.
    pub rss_before_mib: f64,
    pub rss_peak_mib: f64,
    /// Its anonymous resident memory (heap, stacks) once up, and the most
    /// sampled every 50 ms during the export, MiB: what the export holds.
    pub anon_before_mib: f64,
    pub anon_peak_mib: f64,
    /// The database file, MiB.
    pub db_mib: f64,
    /// Plain rusqlite reading the same rows, events/s, and export ÷ that.
    pub ceiling_events_per_s: f64,
    pub ratio_to_ceiling: f64,
}

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<ExportCase> {
    let events = ctx.p.export_events;
    let days = 10;
    let dir = ctx.dir("export")?;
    let data = dir.join("data");
    eprintln!("    export: storing {events} events over {days} days");
    let t = Instant::now();
    {
        let store = evtrack::store::sqlite::SqliteStore::open(&data)?;
        let mut generator = Generator::new(31, days, events / days, ctx.p.query_visitors, 1_000);
        loop {
            let batch = generator.take(ctx.p.seed_batch);
            if batch.is_empty() {
                break;
            }
            evtrack::store::EventSink::insert(&store, &batch).await?;
        }
    }
    let seed_s = t.elapsed().as_secs_f64();
    let db_mib = std::fs::metadata(data.join(evtrack::store::sqlite::FILE_NAME))
        .map_or(0.0, |m| m.len() as f64 / 1_048_576.0);

    let port = procs::free_port()?;
    let mut api = ctx.evtrack(
        "evtrack-api",
        Some("api"),
        &dir,
        &[
            ("PORT", port.to_string()),
            ("DATA_DIR", data.display().to_string()),
            ("REDIS_URL", ctx.redis.url.clone()),
            ("REDIS_PREFIX", "bench-export:".into()),
        ],
    )?;
    procs::wait_http(&mut api, &ctx.http, port).await?;
    let rss_before_mib = procs::usage(&api, "evtrack api").peak_rss_mib;
    let pid = api.pid();
    let anon_before_mib = procs::anon_kib(pid).unwrap_or(0) as f64 / 1024.0;
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let sampling = std::sync::Arc::clone(&sampling);
        tokio::spawn(async move {
            let mut peak = 0u64;
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(procs::anon_kib(pid).unwrap_or(0));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            peak
        })
    };
    let t = Instant::now();
    let response = ctx
        .http
        .get(format!(
            "http://127.0.0.1:{port}/api/sites/{SITE}/events?date_range=all"
        ))
        .timeout(Duration::from_secs(3_600))
        .send()
        .await?;
    if !response.status().is_success() {
        bail!("export: {}", response.status());
    }
    let (mut lines, mut bytes) = (0u64, 0u64);
    let mut response = response;
    while let Some(chunk) = response.chunk().await.context("export body")? {
        bytes += chunk.len() as u64;
        lines += chunk.iter().filter(|&&b| b == b'\n').count() as u64;
    }
    let export_s = t.elapsed().as_secs_f64();
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let anon_peak_mib = sampler.await.context("memory sampler")? as f64 / 1024.0;
    api.check_alive()?;
    let rss_peak_mib = procs::usage(&api, "evtrack api").peak_rss_mib;
    api.stop(Duration::from_secs(30)).await;
    if lines != events as u64 {
        bail!("export: {lines} lines for {events} events");
    }
    let path = data.join(evtrack::store::sqlite::FILE_NAME);
    let ceiling_s = tokio::task::spawn_blocking(move || plain_read(&path, events))
        .await
        .context("plain read task")??;
    let _ = std::fs::remove_dir_all(&dir);
    let events_per_s = events as f64 / export_s;
    let ceiling_events_per_s = events as f64 / ceiling_s;
    let case = ExportCase {
        events,
        days,
        seed_s,
        export_s,
        events_per_s,
        mib_exported: bytes as f64 / 1_048_576.0,
        lines,
        rss_before_mib,
        rss_peak_mib,
        anon_before_mib,
        anon_peak_mib,
        db_mib,
        ceiling_events_per_s,
        ratio_to_ceiling: events_per_s / ceiling_events_per_s,
    };
    eprintln!(
        "    export: {events} events, {:.0} MiB in {export_s:.1} s = {events_per_s:.0} events/s \
         (plain read {ceiling_events_per_s:.0}/s); heap and stacks {anon_before_mib:.1} → at most \
         {anon_peak_mib:.1} MiB (peak RSS with the mapped database {rss_before_mib:.1} → {rss_peak_mib:.1})",
        case.mib_exported
    );
    Ok(case)
}

/// Every column of the site's events in export order, by plain rusqlite:
/// the store's read without JSON, pages or HTTP. Seconds.
fn plain_read(path: &Path, want: usize) -> anyhow::Result<f64> {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let t = Instant::now();
    let mut stmt = conn.prepare(
        "SELECT id, site_id, event_type, path, userid, ts, created_at, props, visitor, ctx
         FROM events WHERE site_id = ?1 ORDER BY ts, id",
    )?;
    let mut rows = stmt.query([SITE])?;
    let mut n = 0usize;
    let mut len = 0usize;
    while let Some(r) = rows.next()? {
        // Touch the text columns, as a reader that uses them would.
        len += r.get_ref(0)?.as_str()?.len() + r.get_ref(3)?.as_str_or_null()?.map_or(0, str::len);
        n += 1;
    }
    let secs = t.elapsed().as_secs_f64();
    if n != want || len == 0 {
        bail!("plain read: {n} rows for {want} events");
    }
    Ok(secs)
}
