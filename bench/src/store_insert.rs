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
        let events = gen_.take(batch.min(args.events - done));
        let t = Instant::now();
        let outcomes = store.insert(&events).await.context("insert")?;
        in_store += t.elapsed().as_secs_f64();
        let inserted = evtrack::store::InsertCounts::of(&outcomes).inserted;
        anyhow::ensure!(inserted == events.len(), "not all inserted");
        done += events.len();
    }
    let db = std::fs::metadata(dir.join(evtrack::store::sqlite::FILE_NAME))
        .map(|m| m.len())
        .unwrap_or(0);
    println!(
        "{done} events in batches of {batch}: {:.0} events/s in the store ({in_store:.2} s; {:.2} s in all), database {:.0} MiB",
        done as f64 / in_store,
        start.elapsed().as_secs_f64(),
        db as f64 / (1024.0 * 1024.0)
    );
    Ok(())
}
