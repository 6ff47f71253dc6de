//! `evtrack-bench run`: starts the backends, runs every case, reports.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

use crate::procs::{self, Mongo, Proc, Redis};
use crate::report::{self, Machine, Report};
use crate::wrk::WrkSettings;
use crate::{drain, ingest, query, stats};

/// The original design's API, relative to the workspace root, and the list
/// it pushes to.
pub const ORIGINAL_SERVER: &str = "bench/original/server.js";
pub const ORIGINAL_LIST: &str = "events";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Section {
    Ingest,
    Drain,
    Stats,
    Query,
    /// Batches until visible in queries (reported with the queries).
    Visible,
    /// Many small sites against one big one: disk and fold per event.
    Sites,
    /// The raw NDJSON export of one site's events.
    Export,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Seconds instead of minutes: small sizes, 1 s load, 8 connections.
    #[arg(long)]
    pub tiny: bool,
    /// Where the JSON and the chart go.
    #[arg(long, default_value_os_t = crate::default_out())]
    pub out: PathBuf,
    /// Where `evtrack` and `evtrack-bench` (release builds) are.
    #[arg(long, default_value = "target/release")]
    pub bin_dir: PathBuf,
    /// Run only these sections (default: all), e.g. `--only ingest,stats`.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub only: Vec<Section>,
    /// Also the 30-day query case (30 × 1,000,000 events): hours of
    /// seeding on a 2-core machine, so not part of a default full run.
    #[arg(long, conflicts_with = "tiny")]
    pub large: bool,
}

/// Sizes and durations of one run.
#[derive(Debug, Clone, Serialize)]
pub struct Params {
    pub mode: &'static str,
    pub wrk: WrkSettings,
    pub batch_events: usize,
    pub drain_sqlite_events: usize,
    pub drain_mongo_events: usize,
    pub stats_sqlite_sizes: Vec<usize>,
    pub stats_mongo_sizes: Vec<usize>,
    pub stats_users: usize,
    pub stats_paths: usize,
    pub stats_requests: usize,
    pub stats_mongo_requests: usize,
    pub plain_repeats: usize,
    pub seed_batch: usize,
    pub baseline_batch: usize,
    /// Query cases: (days, events per day) for SQLite beside PostgreSQL, the
    /// larger SQLite case (only with `--large`), and MongoDB.
    pub query_small: (usize, usize),
    pub query_large: Option<(usize, usize)>,
    pub query_mongo: (usize, usize),
    pub query_visitors: usize,
    pub query_requests: usize,
    pub query_mongo_requests: usize,
    /// Events sent in batches until visible in queries (embedded).
    pub visible_events: usize,
    /// Many small sites: (sites, events per site and day, days), against
    /// one site of as many events a day as all of them.
    pub sites_case: (usize, usize, usize),
    /// Events of the raw export case.
    pub export_events: usize,
}

impl Params {
    fn new(tiny: bool) -> Self {
        if tiny {
            Params {
                mode: "tiny",
                wrk: WrkSettings {
                    threads: 2,
                    connections: 8,
                    duration_s: 1,
                },
                batch_events: 100,
                drain_sqlite_events: 2_000,
                drain_mongo_events: 1_000,
                stats_sqlite_sizes: vec![1_000],
                stats_mongo_sizes: vec![1_000],
                stats_users: 100,
                stats_paths: 20,
                stats_requests: 5,
                stats_mongo_requests: 2,
                plain_repeats: 3,
                seed_batch: 5_000,
                baseline_batch: 500,
                query_small: (3, 2_000),
                query_large: None,
                query_mongo: (3, 300),
                query_visitors: 500,
                query_requests: 3,
                query_mongo_requests: 1,
                visible_events: 20_000,
                sites_case: (20, 50, 3),
                export_events: 20_000,
            }
        } else {
            Params {
                mode: "full",
                wrk: WrkSettings {
                    threads: 2,
                    connections: 64,
                    duration_s: 10,
                },
                batch_events: 100,
                drain_sqlite_events: 1_000_000,
                // SecantusDB stores ~4k documents/s: 1,000,000 would take over an hour.
                drain_mongo_events: 50_000,
                stats_sqlite_sizes: vec![10_000, 100_000, 1_000_000],
                // SecantusDB stores a few thousand documents a second, and
                // folds 100,000 events of one day into rollups in tens of
                // minutes (each fold rewrites its rollup documents in a
                // transaction): 10,000 events give the ratio to the pipeline.
                stats_mongo_sizes: vec![10_000],
                stats_users: 100_000,
                stats_paths: 1_000,
                stats_requests: 50,
                stats_mongo_requests: 3,
                plain_repeats: 5,
                seed_batch: 5_000,
                baseline_batch: 500,
                query_small: (10, 300_000),
                query_large: Some((30, 1_000_000)),
                query_mongo: (3, 20_000),
                query_visitors: 50_000,
                query_requests: 10,
                query_mongo_requests: 5,
                visible_events: 1_000_000,
                // 3,000,000 events either way: a month of the issue's
                // "sites of 100 events a day" (1,000 of them rather than
                // 10,000, to keep the run short; a site's rows depend on
                // its own events, not on how many other sites there are).
                sites_case: (1_000, 100, 30),
                // The figure: 10 million events streamed.
                export_events: 10_000_000,
            }
        }
    }
}

/// What every case needs.
pub struct Ctx {
    pub p: Params,
    pub evtrack_bin: PathBuf,
    pub bench_bin: PathBuf,
    pub scratch: PathBuf,
    pub http: reqwest::Client,
    pub redis: Redis,
    pub redis_conn: redis::aio::MultiplexedConnection,
    pub mongo: Option<Mongo>,
    secantusd: PathBuf,
    pub notes: Vec<String>,
}

impl Ctx {
    /// A fresh directory under the scratch directory.
    pub fn dir(&self, name: &str) -> anyhow::Result<PathBuf> {
        let d = self.scratch.join(name);
        if d.exists() {
            std::fs::remove_dir_all(&d)?;
        }
        std::fs::create_dir_all(&d)?;
        Ok(d)
    }

    /// Starts `evtrack [role]` in `dir` (its working directory, so no stray
    /// `.env` is read) with exactly the settings in `env` (the defaults
    /// otherwise, log level included).
    pub fn evtrack(
        &self,
        name: &str,
        role: Option<&str>,
        dir: &Path,
        env: &[(&str, String)],
    ) -> anyhow::Result<Proc> {
        let mut cmd = Command::new(&self.evtrack_bin);
        cmd.args(role).current_dir(dir);
        // Children get only our settings (and our log level).
        for k in evtrack::config::env_names() {
            cmd.env_remove(k);
        }
        cmd.env_remove("RUST_LOG");
        for (k, v) in env {
            cmd.env(k, v);
        }
        Proc::spawn(name, &mut cmd, &dir.join(format!("{name}.log")))
    }

    /// Starts a ceiling server on a free port; returns it once it answers.
    pub async fn ceiling(&self, stream: Option<&str>) -> anyhow::Result<(Proc, u16)> {
        let port = procs::free_port()?;
        let mut cmd = Command::new(&self.bench_bin);
        cmd.args(["ceiling", "--port", &port.to_string()]);
        if let Some(stream) = stream {
            cmd.args(["--redis-url", &self.redis.url, "--stream", stream]);
        }
        let dir = self.dir(&format!("ceiling-{port}"))?;
        cmd.current_dir(&dir);
        let mut proc = Proc::spawn("ceiling", &mut cmd, &dir.join("ceiling.log"))?;
        procs::wait_http(&mut proc, &self.http, port).await?;
        Ok((proc, port))
    }

    /// Starts the original design's API (`bench/original`, Node.js) on a
    /// free port, pushing to our Redis; returns it once it answers.
    pub async fn original(&self) -> anyhow::Result<(Proc, u16)> {
        let server = std::env::current_dir()?.join(ORIGINAL_SERVER);
        let modules = server.with_file_name("node_modules");
        if !server.is_file() || !modules.is_dir() {
            bail!(
                "{} and its node_modules are needed: run from the workspace root after \
                 `scripts/bench.sh` (or `npm ci` in bench/original) installed them",
                ORIGINAL_SERVER
            );
        }
        let port = procs::free_port()?;
        let dir = self.dir(&format!("original-{port}"))?;
        let mut cmd = Command::new("node");
        cmd.arg(&server)
            .current_dir(&dir)
            .env("PORT", port.to_string())
            .env("REDIS_URL", &self.redis.url)
            .env("NODE_ENV", "production");
        let mut proc = Proc::spawn("original", &mut cmd, &dir.join("original.log"))
            .context("node is needed for the original design's API (apt-get install nodejs)")?;
        procs::wait_http(&mut proc, &self.http, port).await?;
        Ok((proc, port))
    }

    pub async fn llen(&mut self, key: &str) -> anyhow::Result<u64> {
        Ok(redis::cmd("LLEN")
            .arg(key)
            .query_async(&mut self.redis_conn)
            .await?)
    }

    /// The MongoDB stand-in, started on first use.
    pub async fn mongo(&mut self) -> anyhow::Result<String> {
        if self.mongo.is_none() {
            let t = Instant::now();
            let dir = self.dir("secantusd")?;
            self.mongo = Some(Mongo::start(&self.secantusd, &dir).await?);
            eprintln!("    secantusd ready in {:.1} s", t.elapsed().as_secs_f64());
        }
        Ok(self.mongo.as_ref().expect("started").uri.clone())
    }

    /// Deletes every key of our own Redis (between cases: frees memory).
    pub async fn flush_redis(&mut self) -> anyhow::Result<()> {
        let _: () = redis::cmd("FLUSHALL")
            .query_async(&mut self.redis_conn)
            .await?;
        Ok(())
    }

    pub async fn xlen(&mut self, key: &str) -> anyhow::Result<u64> {
        Ok(redis::cmd("XLEN")
            .arg(key)
            .query_async(&mut self.redis_conn)
            .await?)
    }
}

fn require_file(path: &Path, hint: &str) -> anyhow::Result<PathBuf> {
    if !path.is_file() {
        bail!("{} not found: {hint}", path.display());
    }
    Ok(std::fs::canonicalize(path)?)
}

fn secantusd_path() -> PathBuf {
    std::env::var_os("EVTRACK_SECANTUSD")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(".venv-test/bin/secantusd-py"))
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let started = chrono::Utc::now();
    let clock = Instant::now();
    let mut p = Params::new(args.tiny);
    if !args.large {
        p.query_large = None;
    }
    let build_hint = "build first: cargo build --release --workspace \
                      (scripts/bench.sh does), and run from the workspace root";
    let evtrack_bin = require_file(&args.bin_dir.join("evtrack"), build_hint)?;
    let bench_bin = require_file(&args.bin_dir.join("evtrack-bench"), build_hint)?;
    let sections = if args.only.is_empty() {
        vec![
            Section::Ingest,
            Section::Drain,
            Section::Stats,
            Section::Query,
            Section::Visible,
            Section::Sites,
            Section::Export,
        ]
    } else {
        args.only.clone()
    };
    let wants_mongo = sections.iter().any(|s| {
        !matches!(
            s,
            Section::Ingest | Section::Visible | Section::Sites | Section::Export
        )
    });
    let mut secantusd = secantusd_path();
    if wants_mongo {
        secantusd = require_file(
            &secantusd,
            "SecantusDB is needed (scripts/bench.sh installs it into .venv-test; \
             or set EVTRACK_SECANTUSD)",
        )?;
    }
    if Command::new("wrk").arg("-v").output().is_err() {
        bail!("wrk not found: apt-get install wrk (scripts/bench.sh installs it)");
    }

    let scratch = tempfile::Builder::new()
        .prefix("evtrack-bench-")
        .tempdir()
        .context("create a scratch directory")?;
    procs::set_scratch(scratch.path());
    procs::install_signal_handler();

    let machine = Machine::probe();
    eprintln!(
        "evtrack-bench {} run: {} cores, {:.1} GiB, {}; commit {}",
        p.mode,
        machine.cores,
        machine.ram_mib as f64 / 1024.0,
        machine.cpu_model,
        machine.git_commit
    );

    let redis = Redis::start(&scratch.path().join("redis")).await?;
    let redis_conn = redis.connect().await?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(4)
        .build()?;
    let mut ctx = Ctx {
        p: p.clone(),
        evtrack_bin,
        bench_bin,
        scratch: scratch.path().to_path_buf(),
        http,
        redis,
        redis_conn,
        mongo: None,
        secantusd,
        notes: Vec::new(),
    };

    let mut report = Report::new(&p, machine, started);
    if sections.contains(&Section::Ingest) {
        section("ingest");
        report.ingest = Some(ingest::run(&mut ctx).await?);
    }
    if sections.contains(&Section::Drain) {
        section("drain");
        report.drain = Some(drain::run(&mut ctx).await?);
    }
    if sections.contains(&Section::Stats) {
        section("stats");
        report.stats = Some(stats::run(&mut ctx).await?);
    }
    let (queries, visible) = (
        sections.contains(&Section::Query),
        sections.contains(&Section::Visible),
    );
    if queries || visible {
        section("query");
        report.query = Some(query::run(&mut ctx, queries, visible).await?);
    }
    if sections.contains(&Section::Sites) {
        section("sites");
        report.sites = Some(crate::sites::run(&ctx).await?);
    }
    if sections.contains(&Section::Export) {
        section("export");
        report.export = Some(crate::export::run(&mut ctx).await?);
    }
    report.notes = std::mem::take(&mut ctx.notes);
    report.finish(clock.elapsed().as_secs_f64());

    // Children first, then their directories.
    if let Some(mut m) = ctx.mongo.take() {
        m.proc.stop(Duration::from_secs(5)).await;
    }
    ctx.redis.proc.stop(Duration::from_secs(5)).await;
    drop(ctx);
    drop(scratch);

    println!("{}", report::table(&report));
    let paths = report::write(&report, &args.out)?;
    for path in paths {
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn section(name: &str) {
    eprintln!("==> {name}");
}
