//! `evtrack-bench`: the benchmark suite of evtrack (see `bench/README.md`).
//!
//! - `evtrack-bench ceiling --port P [--redis-url U --stream K]`: the yardstick
//!   server, the least an HTTP ingest endpoint can do (parse the JSON body,
//!   answer 202, optionally XADD it to Redis).
//! - `evtrack-bench run [--tiny] [--out bench/results]`: the orchestrator. It
//!   starts its own Redis, SecantusDB, ceilings and evtrack processes on free
//!   loopback ports, measures, prints one table, writes JSON and an SVG chart.
//!   It builds nothing: `scripts/bench.sh` builds the release binaries first.
//! - `evtrack-bench enrich`: the cost of finding a request's browser and
//!   country, in process.

mod ceiling;
mod data;
mod drain;
mod enrich;
mod export;
mod ingest;
mod procs;
mod query;
mod report;
mod run;
mod sites;
mod stats;
mod store_insert;
mod wrk;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "evtrack-bench", about = "Benchmarks of evtrack")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// The ceiling reference server: POST /event parses the body and answers 202.
    Ceiling {
        #[arg(long)]
        port: u16,
        /// Also XADD every event to a Redis stream (field `e`) before answering.
        #[arg(long, requires = "stream")]
        redis_url: Option<String>,
        /// The stream key for --redis-url.
        #[arg(long)]
        stream: Option<String>,
    },
    /// Runs the whole benchmark (start it from the workspace root; it uses
    /// target/release/evtrack and target/release/evtrack-bench).
    Run(run::RunArgs),
    /// Inserts one site-day into a fresh SQLite store, batch by batch, and
    /// prints the rate: the store alone, for profiling.
    StoreInsert(store_insert::StoreInsertArgs),
    /// Answers the query benchmark's shapes in process from a SQLite store
    /// seeded once into a directory: the engine alone, for profiling.
    QueryLocal(query::QueryLocalArgs),
    /// What finding a browser's request costs: the User-Agent rules
    /// compiled, a new User-Agent parsed, a known one found, a country.
    Enrich,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("evtrack-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Cmd::Ceiling {
            port,
            redis_url,
            stream,
        } => runtime.block_on(ceiling::serve(port, redis_url, stream)),
        Cmd::StoreInsert(args) => runtime.block_on(store_insert::run(args)),
        Cmd::QueryLocal(args) => runtime.block_on(query::local(args)),
        Cmd::Enrich => enrich::run(),
        Cmd::Run(args) => {
            let r = runtime.block_on(run::run(args));
            // Whatever happened, no child outlives us.
            procs::kill_all();
            r
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("evtrack-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Default output directory, relative to the workspace root.
pub fn default_out() -> PathBuf {
    PathBuf::from("bench/results")
}
