//! Configuration: one typed struct, [`Settings`], filled from command-line
//! flags and environment variables (a `.env` file in the working directory is
//! read first, as the original did). Tests build a `Settings` directly.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::TypedValueParser;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::access::{Access, SiteList, StatsTokens};
use crate::queue::redis::{ConsumerConfig, RedisConfig};
use crate::ratelimit::{ClientLimit, Rate, RateLimit, TrustedProxies};
use crate::worker::WorkerConfig;

pub const DEFAULT_PORT: u16 = 3000;
pub const DEFAULT_HOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
pub const DEFAULT_REDIS_PREFIX: &str = "evtrack:";
/// Most streams `QUEUE_PARTITIONS` may split the Redis queue into.
pub const MAX_QUEUE_PARTITIONS: u16 = 256;
pub const DEFAULT_QUEUE_MAX_LEN: u64 = 1_000_000;
pub const DEFAULT_QUEUE_MAX_BYTES: u64 = 1024 * 1024 * 1024;
/// The smallest `QUEUE_MAX_BYTES`. The limit refuses a request whole, so a
/// request larger than the limit could never be accepted and its client would
/// retry a `queue_full` for ever. The largest request the API takes is a
/// `MAX_BATCH_BYTES` body, a little more once its events are serialized (ids
/// and receive times are added: at most a few hundred KiB for 1,000 events),
/// so the limit must leave room for that in an empty queue.
pub const MIN_QUEUE_MAX_BYTES: u64 = 8 * 1024 * 1024;
const _: () =
    assert!(MIN_QUEUE_MAX_BYTES >= crate::routes::ingest::MAX_BATCH_BYTES as u64 + 2 * 1024 * 1024);
pub const DEFAULT_DEAD_LETTER_MAX_LEN: u64 = 100_000;
pub const DEFAULT_DATA_DIR: &str = "./data";
/// Large batches matter most for SQLite: a batch's random inserts into the
/// aggregate tables dirty pages that are written once per commit, so the cost
/// per event falls as the batch grows (see "Profiles" in bench/README.md).
pub const DEFAULT_BATCH_SIZE: usize = 5_000;
pub const DEFAULT_CLAIM_IDLE_MS: u64 = 30_000;
pub const DEFAULT_STATS_TIMEOUT_MS: u64 = 5_000;
pub const DEFAULT_STATS_TIMEOUT: Duration = Duration::from_millis(DEFAULT_STATS_TIMEOUT_MS);
pub const DEFAULT_WORKER_STALL_MS: u64 = 60_000;
pub const DEFAULT_MAX_REQUESTS_IN_FLIGHT: usize = 10_000;
pub const DEFAULT_MAX_BODY_BYTES_IN_FLIGHT: usize = 256 * 1024 * 1024;
pub const DEFAULT_MAX_DELIVERIES: u32 = 5;

#[derive(Debug, Parser)]
#[command(
    name = "evtrack",
    version,
    about = "Event tracking service: HTTP ingest, a queue, a worker, a store, and stats.",
    long_about = "Event tracking service: HTTP ingest, a queue, a worker, a store, and stats.\n\n\
                  With no REDIS_URL and no MONGO_URI it runs self-contained: an in-process \
                  queue and a SQLite file in DATA_DIR."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub settings: Settings,
}

#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum Command {
    /// The API and the worker in one process (the default).
    Run,
    /// The HTTP API only (needs REDIS_URL).
    Api,
    /// The worker only (needs REDIS_URL).
    Worker,
    /// Drop the rollups of the embedded store and count its raw events into
    /// them again, then exit.
    RebuildAggregates,
    /// Copy the embedded store (DATA_DIR) into a new file, while the
    /// service runs, then exit.
    Backup {
        /// The file to write; it must not exist.
        file: PathBuf,
    },
    /// Erase every event of one person on a site (a userid, or a cookieless
    /// visitor id), with what the rollups and visits hold of them, then
    /// exit. The same as `POST /api/sites/{site_id}/erase`.
    Erase {
        site_id: String,
        /// The userid or cookieless visitor id.
        visitor: String,
    },
    /// Make a backup file the embedded store of an empty DATA_DIR (stop the
    /// service and move the old directory aside first), then exit.
    Restore {
        /// A file written by `evtrack backup`.
        file: PathBuf,
    },
    /// The site registry: time zone, public flag, hostnames, excluded
    /// addresses and goals of each site (as `/api/sites/{site_id}/settings`).
    #[command(subcommand)]
    Sites(SitesCommand),
    /// Read tokens made at run time (as `/api/tokens`).
    #[command(subcommand)]
    Tokens(TokensCommand),
}

#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum SitesCommand {
    /// Print every registered site's settings, one JSON object per line.
    List,
    /// Set a site's settings (replacing them), e.g.
    /// `evtrack sites set shop.example '{"timezone": "Europe/Paris", "goals": [{"event": "Signup"}]}'`.
    Set {
        site_id: String,
        /// The settings as JSON, or `@FILE` to read them from a file.
        settings: String,
    },
    /// Remove a site's settings (its events stay).
    Delete { site_id: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum TokensCommand {
    /// Make a read token for some sites; prints it once, with share links.
    Create {
        /// A site it may read (repeat for more).
        #[arg(long = "site", required = true)]
        sites: Vec<String>,
        /// A note on what it is for.
        #[arg(long)]
        label: Option<String>,
    },
    /// List the read tokens (never the tokens themselves).
    List,
    /// Revoke a read token by its id.
    Revoke { id: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Every setting, each a flag and an environment variable.
///
/// `Debug` is not for logs: URLs may carry passwords.
#[derive(Debug, Clone, Args)]
pub struct Settings {
    /// HTTP port.
    #[arg(long, env = "PORT", default_value_t = DEFAULT_PORT, global = true)]
    pub port: u16,

    /// Address to bind; 0.0.0.0 (all interfaces) must be asked for.
    #[arg(long, env = "HOST", default_value_t = DEFAULT_HOST, global = true)]
    pub host: IpAddr,

    /// Redis URL (`redis://` or `rediss://` for TLS, password in the URL).
    /// Unset: the embedded in-process queue.
    #[arg(long, env = "REDIS_URL", global = true)]
    pub redis_url: Option<String>,

    /// PEM file with the CA certificate of a `rediss://` server signed by a
    /// private CA.
    #[arg(long, env = "REDIS_CA_CERT", global = true)]
    pub redis_ca_cert: Option<PathBuf>,

    /// Prefix of every Redis key evtrack uses.
    #[arg(long, env = "REDIS_PREFIX", default_value = DEFAULT_REDIS_PREFIX, global = true)]
    pub redis_prefix: String,

    /// Streams the Redis queue is split into, each a key of its own (hash
    /// tagged, so that on a Redis Cluster they spread over the masters).
    /// Every process of one deployment must use the same number; change it
    /// only once the queue is empty (a process refuses to start while the
    /// streams of another number still hold events).
    #[arg(long, env = "QUEUE_PARTITIONS", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=MAX_QUEUE_PARTITIONS as i64).map(usize::from),
          global = true)]
    pub queue_partitions: usize,

    /// Most events waiting in the Redis stream; beyond it ingestion answers
    /// 503 `queue_full`.
    #[arg(long, env = "QUEUE_MAX_LEN", default_value_t = DEFAULT_QUEUE_MAX_LEN, global = true)]
    pub queue_max_len: u64,

    /// Most bytes of event payload (the events' JSON) waiting in the Redis
    /// stream; a request that would go beyond it is refused whole with 503
    /// `queue_full`. Counts payload, not Redis memory, which needs more.
    #[arg(long, env = "QUEUE_MAX_BYTES", default_value_t = DEFAULT_QUEUE_MAX_BYTES,
          value_parser = clap::value_parser!(u64).range(MIN_QUEUE_MAX_BYTES..), global = true)]
    pub queue_max_bytes: u64,

    /// Most entries kept in the Redis dead-letter stream; the oldest are
    /// dropped (and counted in `evtrack_dead_letters_trimmed_total`).
    #[arg(long, env = "DEAD_LETTER_MAX_LEN", default_value_t = DEFAULT_DEAD_LETTER_MAX_LEN,
          value_parser = clap::value_parser!(u64).range(1..), global = true)]
    pub dead_letter_max_len: u64,

    /// MongoDB connection string. Unset: the embedded SQLite store.
    #[arg(long, env = "MONGO_URI", global = true)]
    pub mongo_uri: Option<String>,

    /// MongoDB database; default: the one named in MONGO_URI, else `evtrack`.
    #[arg(long, env = "MONGO_DB", global = true)]
    pub mongo_db: Option<String>,

    /// Directory of the embedded store's file.
    #[arg(long, env = "DATA_DIR", default_value = DEFAULT_DATA_DIR, global = true)]
    pub data_dir: PathBuf,

    /// Most events the worker writes to the store at once.
    #[arg(long, env = "WORKER_BATCH_SIZE", default_value_t = DEFAULT_BATCH_SIZE,
          value_parser = clap::value_parser!(u16).range(1..=10_000).map(usize::from), global = true)]
    pub worker_batch_size: usize,

    /// Milliseconds an event may stay with a silent worker before another
    /// worker takes it over.
    #[arg(long, env = "WORKER_CLAIM_IDLE_MS", default_value_t = DEFAULT_CLAIM_IDLE_MS,
          value_parser = clap::value_parser!(u64).range(100..), global = true)]
    pub worker_claim_idle_ms: u64,

    /// Deliveries after which an event is moved to the dead-letter stream.
    #[arg(long, env = "WORKER_MAX_DELIVERIES", default_value_t = DEFAULT_MAX_DELIVERIES,
          value_parser = clap::value_parser!(u32).range(1..), global = true)]
    pub worker_max_deliveries: u32,

    /// Milliseconds a stats query may run; past it the query is stopped
    /// (MongoDB: `maxTimeMS`; SQLite: interrupted) and the answer is 503
    /// `query_timeout` with Retry-After.
    #[arg(long, env = "STATS_TIMEOUT_MS", default_value_t = DEFAULT_STATS_TIMEOUT_MS,
          value_parser = clap::value_parser!(u64).range(1..=600_000), global = true)]
    pub stats_timeout_ms: u64,

    /// Milliseconds without a completed poll (queue read, batch stored)
    /// after which a process running a worker answers 503 on `/health`.
    /// At least 5,000: an idle worker completes a poll about every second.
    #[arg(long, env = "WORKER_STALL_MS", default_value_t = DEFAULT_WORKER_STALL_MS,
          value_parser = clap::value_parser!(u64).range(5_000..), global = true)]
    pub worker_stall_ms: u64,

    /// Most HTTP requests being answered at once; beyond it 503 `overloaded`.
    #[arg(long, env = "MAX_REQUESTS_IN_FLIGHT", default_value_t = DEFAULT_MAX_REQUESTS_IN_FLIGHT,
          value_parser = clap::value_parser!(u32).range(1..).map(|n| n as usize), global = true)]
    pub max_requests_in_flight: usize,

    /// Most bytes of ingest bodies being read or held at once, across all
    /// connections (counted as they arrive); beyond it 503 `overloaded`.
    #[arg(long, env = "MAX_BODY_BYTES_IN_FLIGHT", default_value_t = DEFAULT_MAX_BODY_BYTES_IN_FLIGHT,
          value_parser = clap::value_parser!(u64).range(5 * 1024 * 1024..=(1u64 << 40)).map(|n| n as usize),
          global = true)]
    pub max_body_bytes_in_flight: usize,

    /// Port on which `evtrack worker` serves `GET /metrics` and
    /// `GET /health` (on HOST). Unset: the worker serves no HTTP.
    #[arg(long, env = "METRICS_PORT", global = true)]
    pub metrics_port: Option<u16>,

    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    /// Read tokens for `GET /stats`, separated by commas: `token` (every
    /// site) or `token=site-a|site-b`; 16+ characters of letters, digits and
    /// `-._~+/`. Unset: stats need no token, which a HOST other than loopback
    /// allows only with PUBLIC_STATS.
    #[arg(
        long,
        env = "STATS_TOKENS",
        default_value = "",
        hide_env_values = true,
        hide_default_value = true,
        global = true
    )]
    pub stats_tokens: StatsTokens,

    /// Admin tokens, same form as STATS_TOKENS: the raw event export and the
    /// other data owner's controls (`token=site-a|site-b` limits one to
    /// those sites). Unset: those controls are open only where stats are
    /// (no STATS_TOKENS, no PUBLIC_STATS: loopback), and refused otherwise.
    #[arg(
        long,
        env = "ADMIN_TOKENS",
        default_value = "",
        hide_env_values = true,
        hide_default_value = true,
        global = true
    )]
    pub admin_tokens: StatsTokens,

    /// Serve stats to anyone on a HOST other than loopback, without tokens.
    #[arg(long, env = "PUBLIC_STATS", action = clap::ArgAction::Set, num_args = 0..=1,
          default_value_t = false, default_missing_value = "true",
          value_parser = clap::builder::BoolishValueParser::new(), global = true)]
    pub public_stats: bool,

    /// Only these site ids (separated by commas) may send events; the others
    /// get 403 `site_not_allowed`. Unset: every site.
    #[arg(long, env = "INGEST_SITES", global = true)]
    pub ingest_sites: Option<SiteList>,

    /// Origins (separated by commas) whose pages may read stats from a
    /// browser (CORS), e.g. `https://dash.example.com`; `*` for any.
    /// Ingestion accepts every origin.
    #[arg(long, env = "STATS_CORS_ORIGINS", value_delimiter = ',', global = true)]
    pub stats_cors_origins: Vec<String>,

    /// Ingest requests per client IP (IPv6: per /64), as `100/s`, `600/min`
    /// or `5000/h`; beyond it 429 `rate_limited` with Retry-After. Unset: no
    /// limit.
    #[arg(long, env = "RATE_LIMIT", global = true)]
    pub rate_limit: Option<Rate>,

    /// Requests a client may send at once before RATE_LIMIT's pace applies;
    /// default: RATE_LIMIT's count (100 for `100/s`).
    #[arg(long, env = "RATE_LIMIT_BURST",
          value_parser = clap::value_parser!(u32).range(1..), global = true)]
    pub rate_limit_burst: Option<u32>,

    /// Addresses or networks (separated by commas) of proxies whose
    /// X-Forwarded-For names the client, e.g. `10.0.0.0/8,::1`. Unset: the
    /// header is ignored and the client is the connection's peer.
    #[arg(
        long,
        env = "TRUSTED_PROXIES",
        default_value = "",
        hide_default_value = true,
        global = true
    )]
    pub trusted_proxies: TrustedProxies,

    /// Keep raw events this many days (whole UTC days, today included):
    /// older ones are deleted every hour, in steps, with what was derived
    /// from them. Unset: kept for ever.
    #[arg(long, env = "RETENTION_DAYS",
          value_parser = clap::value_parser!(u32).range(1..=36_500), global = true)]
    pub retention_days: Option<u32>,

    /// Path prefix to serve everything under (the dashboard, the API, the
    /// tracker), for a reverse proxy that mounts evtrack at e.g.
    /// `/analytics/`. Unset: the root.
    #[arg(
        long,
        env = "BASE_PATH",
        default_value = "",
        hide_default_value = true,
        global = true
    )]
    pub base_path: crate::routes::dashboard::BasePath,
}

/// The environment variables evtrack reads, taken from the flags'
/// definitions so that no hand-kept list can miss one: what a parent clears
/// before starting `evtrack` with its own settings only (tests, benchmark).
pub fn env_names() -> Vec<String> {
    use clap::CommandFactory;
    Cli::command()
        .get_arguments()
        .filter_map(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned())
        .collect()
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            port: DEFAULT_PORT,
            host: DEFAULT_HOST,
            redis_url: None,
            redis_ca_cert: None,
            redis_prefix: DEFAULT_REDIS_PREFIX.to_owned(),
            queue_partitions: 1,
            queue_max_len: DEFAULT_QUEUE_MAX_LEN,
            queue_max_bytes: DEFAULT_QUEUE_MAX_BYTES,
            dead_letter_max_len: DEFAULT_DEAD_LETTER_MAX_LEN,
            mongo_uri: None,
            mongo_db: None,
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            worker_batch_size: DEFAULT_BATCH_SIZE,
            worker_claim_idle_ms: DEFAULT_CLAIM_IDLE_MS,
            worker_max_deliveries: DEFAULT_MAX_DELIVERIES,
            stats_timeout_ms: DEFAULT_STATS_TIMEOUT_MS,
            worker_stall_ms: DEFAULT_WORKER_STALL_MS,
            max_requests_in_flight: DEFAULT_MAX_REQUESTS_IN_FLIGHT,
            max_body_bytes_in_flight: DEFAULT_MAX_BODY_BYTES_IN_FLIGHT,
            metrics_port: None,
            log_format: LogFormat::Text,
            stats_tokens: StatsTokens::default(),
            admin_tokens: StatsTokens::default(),
            public_stats: false,
            ingest_sites: None,
            stats_cors_origins: Vec::new(),
            rate_limit: None,
            rate_limit_burst: None,
            trusted_proxies: TrustedProxies::default(),
            base_path: Default::default(),
            retention_days: None,
        }
    }
}

impl Settings {
    /// Redis settings, when `REDIS_URL` is set (and not empty).
    pub fn redis(&self) -> Option<RedisConfig> {
        let url = self.redis_url.as_deref().filter(|u| !u.trim().is_empty())?;
        Some(RedisConfig {
            url: url.to_owned(),
            ca_cert: self.redis_ca_cert.clone(),
            prefix: self.redis_prefix.clone(),
            partitions: self.queue_partitions,
            max_len: self.queue_max_len,
            max_bytes: self.queue_max_bytes,
        })
    }

    pub fn mongo_uri(&self) -> Option<&str> {
        self.mongo_uri.as_deref().filter(|u| !u.trim().is_empty())
    }

    pub fn worker(&self) -> WorkerConfig {
        WorkerConfig {
            batch_size: self.worker_batch_size,
            max_attempts: self.worker_max_deliveries,
        }
    }

    pub fn access(&self) -> Access {
        Access {
            stats_tokens: self.stats_tokens.clone(),
            admin_tokens: self.admin_tokens.clone(),
            admin_open: self.stats_tokens.is_empty() && !self.public_stats,
            ingest_sites: self.ingest_sites.clone().filter(|l| !l.is_empty()),
        }
    }

    /// The ingest rate limit, when `RATE_LIMIT` is set.
    pub fn client_limit(&self) -> Option<ClientLimit> {
        let rate = self.rate_limit?;
        let burst = self
            .rate_limit_burst
            .and_then(std::num::NonZeroU32::new)
            .unwrap_or(rate.count);
        Some(ClientLimit {
            proxies: self.trusted_proxies.clone(),
            rate: RateLimit::new(rate, burst),
        })
    }

    pub fn stats_timeout(&self) -> Duration {
        Duration::from_millis(self.stats_timeout_ms)
    }

    pub fn worker_stall(&self) -> Duration {
        Duration::from_millis(self.worker_stall_ms)
    }

    pub fn consumer(&self) -> ConsumerConfig {
        ConsumerConfig {
            claim_idle: Duration::from_millis(self.worker_claim_idle_ms),
            dead_letter_max_len: self.dead_letter_max_len,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_defaults_match_settings_default() {
        let cli = Cli::try_parse_from(["evtrack"]).unwrap();
        let (parsed, default) = (cli.settings, Settings::default());
        // Environment variables of the machine running the tests could leak
        // into `parsed`; compare only where none is set.
        if std::env::var_os("PORT").is_none() {
            assert_eq!(parsed.port, default.port);
        }
        if std::env::var_os("HOST").is_none() {
            assert_eq!(parsed.host, default.host);
        }
        assert_eq!(parsed.redis_prefix, default.redis_prefix);
        assert_eq!(parsed.queue_max_len, default.queue_max_len);
        if std::env::var_os("QUEUE_MAX_BYTES").is_none() {
            assert_eq!(parsed.queue_max_bytes, default.queue_max_bytes);
        }
        if std::env::var_os("DEAD_LETTER_MAX_LEN").is_none() {
            assert_eq!(parsed.dead_letter_max_len, default.dead_letter_max_len);
        }
        assert_eq!(parsed.worker_batch_size, default.worker_batch_size);
        assert_eq!(parsed.worker_claim_idle_ms, default.worker_claim_idle_ms);
        assert_eq!(cli.command, None);
    }

    #[test]
    fn every_setting_has_its_environment_variable_listed() {
        let names = env_names();
        for name in [
            "PORT",
            "REDIS_URL",
            "QUEUE_MAX_BYTES",
            "WORKER_STALL_MS",
            "TRUSTED_PROXIES",
        ] {
            assert!(names.iter().any(|n| n == name), "{name} in {names:?}");
        }
    }

    #[test]
    fn subcommands_and_flags_parse() {
        let cli = Cli::try_parse_from([
            "evtrack",
            "worker",
            "--redis-url",
            "redis://x:1",
            "--port",
            "9",
        ])
        .unwrap();
        assert_eq!(cli.command, Some(Command::Worker));
        assert_eq!(cli.settings.port, 9);
        assert!(cli.settings.redis().is_some());
        assert!(Cli::try_parse_from(["evtrack", "--worker-batch-size", "0"]).is_err());
        let min = MIN_QUEUE_MAX_BYTES.to_string();
        let cli = Cli::try_parse_from(["evtrack", "--queue-max-bytes", &min]).unwrap();
        assert_eq!(cli.settings.queue_max_bytes, MIN_QUEUE_MAX_BYTES);
        let below = (MIN_QUEUE_MAX_BYTES - 1).to_string();
        assert!(Cli::try_parse_from(["evtrack", "--queue-max-bytes", &below]).is_err());
        assert!(Cli::try_parse_from(["evtrack", "--dead-letter-max-len", "0"]).is_err());
        let s = Settings {
            redis_url: Some(" ".into()),
            ..Settings::default()
        };
        assert!(
            s.redis().is_none(),
            "an empty REDIS_URL means the embedded queue"
        );
    }
}
