//! `evtrack-bench store-insert`: the SQLite store alone, without Redis, HTTP
//! or the worker — the events of one site-day inserted batch by batch into a
//! fresh database. For profiling the store (`perf record` on this command)
//! and comparing schema or settings changes; not part of `run`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use evtrack::store::EventSink;
use evtrack::store::sqlite::{Durability, SqliteOptions, SqliteStore};

use crate::data::DayEvents;

#[derive(Debug, clap::Args)]
pub struct StoreInsertArgs {
    /// Events in all.
    #[arg(long, default_value_t = 1_000_000)]
    events: usize,
    /// Events per insert (one transaction each), as the worker's batch.
    #[arg(long, default_value_t = 5_000)]
    batch: usize,
    /// Distinct users and paths of the day.
    #[arg(long, default_value_t = 100_000)]
    users: usize,
    #[arg(long, default_value_t = 1_000)]
    paths: usize,
    /// Directory of the database (default: a temporary one, removed after).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Sync every commit to disk (`synchronous=FULL`), as the store is opened
    /// behind the Redis queue; default: as in embedded mode (`NORMAL`).
    #[arg(long)]
    durable: bool,
    /// Spread the events over this many sites (in turn), e.g. 10,000 sites
    /// of 100 events against one site of 1,000,000.
    #[arg(long, default_value_t = 1)]
    sites: usize,
    /// Then fold them all into the rollups and report the fold's rate and
    /// the store's size per million events.
    #[arg(long)]
    fold: bool,
}

pub async fn run(args: StoreInsertArgs) -> anyhow::Result<()> {
    let tmp = tempfile::tempdir().context("temporary directory")?;
    let dir = args.dir.clone().unwrap_or_else(|| tmp.path().to_owned());
    let options = SqliteOptions {
        durability: if args.durable {
            Durability::Disk
        } else {
            Durability::Process
        },
        ..SqliteOptions::default()
    };
    let store = SqliteStore::open_with(&dir, options).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut gen_ = DayEvents::new(1, args.users, args.paths, "si-");
    let batch = args.batch.max(1);
    let (mut done, mut in_store) = (0, 0.0);
    let start = Instant::now();
    while done < args.events {
        let mut events = gen_.take(batch.min(args.events - done));
        if args.sites > 1 {
            for (i, e) in events.iter_mut().enumerate() {
                e.site_id = crate::data::parse(format!("site-{:06}", (done + i) % args.sites));
            }
        }
        let t = Instant::now();
        let outcomes = store.insert(&events).await.context("insert")?;
        in_store += t.elapsed().as_secs_f64();
        let inserted = evtrack::store::InsertCounts::of(&outcomes).inserted;
        anyhow::ensure!(inserted == events.len(), "not all inserted");
        done += events.len();
    }
    let size = || {
        std::fs::metadata(dir.join(evtrack::store::sqlite::FILE_NAME))
            .map(|m| m.len() as f64 / (1024.0 * 1024.0))
            .unwrap_or(0.0)
    };
    println!(
        "{done} events in batches of {batch} over {} site(s): {:.0} events/s in the store ({in_store:.2} s; {:.2} s in all), database {:.0} MiB",
        args.sites,
        done as f64 / in_store,
        start.elapsed().as_secs_f64(),
        size()
    );
    if args.fold {
        let t = Instant::now();
        let folded = evtrack::store::fold_all(&store).await.context("fold")?;
        let fold_s = t.elapsed().as_secs_f64();
        // Closing the last connection checkpoints the WAL into the file, so
        // that the file's size is the store's.
        drop(store);
        println!(
            "folded {folded} events in {fold_s:.2} s ({:.0} events/s); database {:.0} MiB, {:.0} MiB per million events",
            folded as f64 / fold_s.max(1e-9),
            size(),
            size() / (done.max(1) as f64 / 1e6)
        );
    }
    Ok(())
}
