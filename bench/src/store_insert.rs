//! `evtrack-bench store-insert`: the SQLite store alone, without Redis, HTTP
//! or the worker — events inserted batch by batch into a fresh database,
//! then optionally folded into the rollups. For profiling the store (`perf
//! record` on this command) and comparing schema or settings changes; the
//! `sites` section of `run` uses it to compare many small sites with one
//! big one.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use evtrack::store::EventSink;
use evtrack::store::sqlite::{Durability, SqliteOptions, SqliteStore};
use serde::Serialize;

use crate::data::DayEvents;

#[derive(Debug, Clone, clap::Args)]
pub struct StoreInsertArgs {
    /// Events in all.
    #[arg(long, default_value_t = 1_000_000)]
    pub events: usize,
    /// Events per insert (one transaction each), as the worker's batch.
    #[arg(long, default_value_t = 5_000)]
    pub batch: usize,
    /// Distinct users and paths of the day.
    #[arg(long, default_value_t = 100_000)]
    pub users: usize,
    #[arg(long, default_value_t = 1_000)]
    pub paths: usize,
    /// Directory of the database (default: a temporary one, removed after).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Sync every commit to disk (`synchronous=FULL`), as the store is opened
    /// behind the Redis queue; default: as in embedded mode (`NORMAL`).
    #[arg(long)]
    pub durable: bool,
    /// Spread the events over this many sites (in turn), e.g. 10,000 sites
    /// of 100 events against one site of 1,000,000; each site has its share
    /// of `--users`.
    #[arg(long, default_value_t = 1)]
    pub sites: usize,
    /// Spread the events over this many consecutive days, oldest first (a
    /// site of 100 events a day over 30 days: `--days 30`).
    #[arg(long, default_value_t = 1)]
    pub days: usize,
    /// Then fold them all into the rollups and report the fold's rate and
    /// the store's size per million events.
    #[arg(long)]
    pub fold: bool,
}

/// What one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Measured {
    pub sites: usize,
    pub days: usize,
    pub events: usize,
    pub events_per_site_day: f64,
    /// Inserting the raw events (time in the store's insert calls).
    pub insert_events_per_s: f64,
    /// Folding them all into the rollups, when asked.
    pub fold_events_per_s: Option<f64>,
    /// The database file after the fold (or the insert), MiB.
    pub disk_mib: f64,
    pub disk_mib_per_million: f64,
}

pub async fn run(args: StoreInsertArgs) -> anyhow::Result<()> {
    let tmp = tempfile::tempdir().context("temporary directory")?;
    let dir = args.dir.clone().unwrap_or_else(|| tmp.path().to_owned());
    let m = measure(&args, &dir).await?;
    println!(
        "{} events in batches of {} over {} site(s) and {} day(s): {:.0} events/s in the store",
        m.events, args.batch, m.sites, m.days, m.insert_events_per_s
    );
    match m.fold_events_per_s {
        Some(rate) => println!(
            "folded at {rate:.0} events/s; database {:.0} MiB, {:.0} MiB per million events",
            m.disk_mib, m.disk_mib_per_million
        ),
        None => println!("database {:.0} MiB", m.disk_mib),
    }
    Ok(())
}

/// Inserts (and folds) the events `args` describe into a new store in `dir`.
pub async fn measure(args: &StoreInsertArgs, dir: &Path) -> anyhow::Result<Measured> {
    let options = SqliteOptions {
        durability: if args.durable {
            Durability::Disk
        } else {
            Durability::Process
        },
        ..SqliteOptions::default()
    };
    let store = SqliteStore::open_with(dir, options).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut gen_ = DayEvents::new(1, args.users, args.paths, "si-");
    let batch = args.batch.max(1);
    let days = args.days.max(1);
    let sites = args.sites.max(1);
    // As many visitors per event on each site as on one: `--users` shared
    // out among the sites.
    let users_per_site = (args.users / sites).max(1);
    let (mut done, mut in_store) = (0, 0.0);
    while done < args.events {
        let mut events = gen_.take(batch.min(args.events - done));
        for (i, e) in events.iter_mut().enumerate() {
            let n = done + i;
            if sites > 1 {
                e.site_id = crate::data::parse(format!("site-{:06}", n % sites));
                let user: usize = e
                    .userid
                    .as_deref()
                    .and_then(|u| u.strip_prefix("user-"))
                    .and_then(|u| u.parse().ok())
                    .unwrap_or(0);
                e.userid = Some(format!("user-{:06}", user % users_per_site));
            }
            let day = (n * days / args.events.max(1)).min(days - 1);
            e.ts -= (days - 1 - day) as i64 * 86_400_000;
        }
        let t = Instant::now();
        let outcomes = store.insert(&events).await.context("insert")?;
        in_store += t.elapsed().as_secs_f64();
        let inserted = evtrack::store::InsertCounts::of(&outcomes).inserted;
        anyhow::ensure!(inserted == events.len(), "not all inserted");
        done += events.len();
    }
    let mut fold_events_per_s = None;
    if args.fold {
        let t = Instant::now();
        let folded = evtrack::store::fold_all(&store).await.context("fold")?;
        fold_events_per_s = Some(folded as f64 / t.elapsed().as_secs_f64().max(1e-9));
    }
    // Closing the last connection checkpoints the WAL into the file, so
    // that the file's size is the store's.
    drop(store);
    let disk_mib = std::fs::metadata(dir.join(evtrack::store::sqlite::FILE_NAME))
        .map(|m| m.len() as f64 / (1024.0 * 1024.0))
        .unwrap_or(0.0);
    Ok(Measured {
        sites,
        days,
        events: done,
        events_per_site_day: done as f64 / (sites * days) as f64,
        insert_events_per_s: done as f64 / in_store.max(1e-9),
        fold_events_per_s,
        disk_mib,
        disk_mib_per_million: disk_mib / (done.max(1) as f64 / 1e6),
    })
}
