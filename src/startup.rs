//! Builds the application from [`Settings`]: picks the queue and store
//! backends, connects to them, binds the HTTP listener and starts the tasks.
//!
//! Shutdown order (why it is this way): the HTTP server stops accepting and
//! finishes requests in flight first. In embedded mode those requests wait for
//! their events to be committed, so the writer must outlive the server: it is
//! told the API is done only after the server returned, then drains what is
//! left in the channel into the store and exits. A Redis worker finishes and
//! acknowledges the batch in hand, then exits; entries it still holds stay
//! pending in Redis for another worker.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::metrics::Metrics;
use crate::queue::Queue;
use crate::queue::embedded;
use crate::queue::redis::{RedisConsumer, RedisQueue};
use crate::ratelimit::ClientLimit;
use crate::routes::{AppState, InFlight, StateParts, router};
use crate::store::Store;
use crate::store::mongo::MongoStore;
use crate::store::sqlite::{Durability, SqliteOptions, SqliteStore};
use crate::visitor::{SaltSource, VisitorIds};
use crate::worker::{self, Liveness};

/// How often stored events are counted into the rollups: what a query may
/// lag behind the store.
const FOLD_EVERY: Duration = Duration::from_millis(200);

/// Enqueue calls that may wait for the embedded writer before `queue_full`.
const EMBEDDED_QUEUE_CAPACITY: usize = 10_000;

/// The worker side picked at start-up.
enum Worker {
    Embedded(embedded::EmbeddedConsumer),
    Redis(RedisConsumer),
}

/// Which parts run in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// API and worker (`evtrack`, `evtrack run`).
    All,
    Api,
    Worker,
}

/// A start-up failure: one line naming the setting at fault.
#[derive(Debug, thiserror::Error)]
#[error("{setting}: {message}")]
pub struct StartupError {
    pub setting: &'static str,
    pub message: String,
}

impl StartupError {
    fn new(setting: &'static str, message: impl Into<String>) -> Self {
        Self {
            setting,
            message: message.into(),
        }
    }
}

/// A task the process needs ended on its own (before shutdown was asked
/// for), or panicked.
#[derive(Debug, thiserror::Error)]
#[error("the {task} task {how}")]
pub struct TaskFailed {
    pub task: &'static str,
    pub how: String,
}

/// The tasks the process needs, watched together: when one ends before
/// shutdown was asked for, or panics, the others are told to stop (through
/// the shutdown token) and the process reports the failure, instead of
/// living on with a part missing (a server with no worker draining, or the
/// reverse).
pub struct Tasks {
    set: JoinSet<()>,
    names: HashMap<tokio::task::Id, &'static str>,
    shutdown: CancellationToken,
}

impl Tasks {
    pub fn new(shutdown: CancellationToken) -> Self {
        Self {
            set: JoinSet::new(),
            names: HashMap::new(),
            shutdown,
        }
    }

    pub fn spawn(&mut self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        let handle = self.set.spawn(task);
        self.names.insert(handle.id(), name);
    }

    /// Waits until every task has ended. The first failure cancels the
    /// shutdown token (the others stop gracefully) and is returned.
    pub async fn wait(mut self) -> Result<(), TaskFailed> {
        let mut failure = None;
        while let Some(ended) = self.set.join_next_with_id().await {
            let (id, how) = match ended {
                Ok((id, ())) if self.shutdown.is_cancelled() => {
                    self.names.remove(&id);
                    continue;
                }
                Ok((id, ())) => (id, "ended on its own".to_owned()),
                Err(e) if e.is_panic() => (e.id(), "panicked".to_owned()),
                Err(e) => (e.id(), format!("failed: {e}")),
            };
            let task = self.names.remove(&id).unwrap_or("unnamed");
            tracing::error!(task, how, "a task the process needs stopped; shutting down");
            self.shutdown.cancel();
            failure.get_or_insert(TaskFailed { task, how });
        }
        failure.map_or(Ok(()), Err)
    }
}

pub struct Application {
    addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    tasks: Tasks,
    queue_kind: &'static str,
    store_kind: &'static str,
}

impl Application {
    pub async fn build(settings: Settings, role: Role) -> Result<Self, StartupError> {
        let redis = settings.redis();
        if role != Role::All && redis.is_none() {
            return Err(StartupError::new(
                "REDIS_URL",
                "`evtrack api` and `evtrack worker` share work through Redis: set REDIS_URL \
                 (or run plain `evtrack` for the embedded queue)",
            ));
        }
        if let Some(config) = &redis {
            // Each partition holds its share of the byte limit, and the
            // largest request must fit an empty one.
            let least = crate::config::MIN_QUEUE_MAX_BYTES * config.partitions as u64;
            if config.max_bytes < least {
                return Err(StartupError::new(
                    "QUEUE_MAX_BYTES",
                    format!(
                        "{} is below {least}: with QUEUE_PARTITIONS={} each partition holds \
                         QUEUE_MAX_BYTES / QUEUE_PARTITIONS, which must be at least {} so that \
                         the largest request fits an empty partition",
                        config.max_bytes,
                        config.partitions,
                        crate::config::MIN_QUEUE_MAX_BYTES
                    ),
                ));
            }
        }
        if role != Role::Worker {
            check_exposure(&settings)?;
        }
        if redis.is_none() && settings.mongo_uri().is_some() {
            // The embedded queue answers each request after its events are
            // committed together; MongoDB cannot commit a batch as one unit
            // without a replica set's transactions, so a request could be
            // partly stored yet answered 503 (and counted twice on retry).
            return Err(StartupError::new(
                "MONGO_URI",
                "the MongoDB store needs the Redis queue: set REDIS_URL too \
                 (or unset MONGO_URI for the embedded SQLite store)",
            ));
        }
        let stats_origins = crate::routes::stats_cors(&settings.stats_cors_origins)
            .map_err(|e| StartupError::new("STATS_CORS_ORIGINS", e))?;
        // Everything that can fail is connected or bound first; tasks are
        // spawned only once start-up can no longer fail, so a failed start
        // leaves nothing running.
        // Behind Redis, the worker deletes entries once the store has them:
        // the store's commit must then be on disk, not in the OS's cache.
        let durability = match redis {
            Some(_) => Durability::Disk,
            None => Durability::Process,
        };
        let (store, store_salts) = open_backend(&settings, durability).await?;
        let store_kind = store.kind();
        let shutdown = CancellationToken::new();
        let api_done = CancellationToken::new();
        let redis_err = |e: String| StartupError::new("REDIS_URL", e);

        // Salts live where every API process reaches them: in Redis when
        // there is one, else in the SQLite file.
        let mut salts = store_salts;
        let (queue, worker): (Option<Arc<dyn Queue>>, Option<Worker>) = match &redis {
            None => {
                let (queue, consumer) =
                    embedded::channel(EMBEDDED_QUEUE_CAPACITY, api_done.clone());
                (Some(Arc::new(queue)), Some(Worker::Embedded(consumer)))
            }
            Some(config) => {
                let worker = match role {
                    Role::Api => None,
                    _ => {
                        let consumer = RedisConsumer::connect(config, settings.consumer())
                            .await
                            .map_err(redis_err)?;
                        tracing::info!(consumer = consumer.name(), "worker connected to redis");
                        Some(Worker::Redis(consumer))
                    }
                };
                let queue: Option<Arc<dyn Queue>> = match role {
                    Role::Worker => None,
                    _ => {
                        let queue = Arc::new(RedisQueue::connect(config).await.map_err(redis_err)?);
                        salts = Some(Arc::clone(&queue) as Arc<dyn SaltSource>);
                        Some(queue)
                    }
                };
                (queue, worker)
            }
        };
        let queue_kind = if redis.is_some() { "redis" } else { "embedded" };
        // The API listens on PORT; a worker alone on METRICS_PORT, if set.
        let (setting, port) = match (&queue, settings.metrics_port) {
            (Some(_), _) => ("PORT", Some(settings.port)),
            (None, port) => ("METRICS_PORT", port),
        };
        let listener =
            match port {
                None => None,
                Some(port) => Some(TcpListener::bind((settings.host, port)).await.map_err(
                    |e| {
                        StartupError::new(
                            setting,
                            format!("cannot listen on {}:{port}: {e}", settings.host),
                        )
                    },
                )?),
            };
        let addr = match &listener {
            None => None,
            Some(l) => Some(
                l.local_addr()
                    .map_err(|e| StartupError::new(setting, e.to_string()))?,
            ),
        };

        // What the API needs before its first event: the User-Agent rules
        // compiled (a tenth of a second), the day's salt read or made (in
        // embedded mode from the same file the writer locks: a store busy
        // at start-up does not fail the first requests).
        let visitors = salts.map(|salts| Arc::new(VisitorIds::new(salts)));
        if let Some(visitors) = &visitors {
            let _ = tokio::task::spawn_blocking(crate::enrich::ua::warm_up).await;
            if let Err(e) = visitors.prefetch(crate::event::now_ms()).await {
                tracing::warn!(error = %e, "visitor salts not read at start-up; retried per request");
            }
        }

        let metrics = Arc::new(Metrics::new());
        let mut tasks = Tasks::new(shutdown.clone());
        let liveness = worker
            .is_some()
            .then(|| Arc::new(Liveness::new(settings.worker_stall())));
        if worker.is_some() {
            // This process writes events: it also counts them into the
            // rollups (any number of processes may; each event is counted
            // once).
            tasks.spawn(
                "rollup folder",
                crate::store::run_folder(Arc::clone(&store), FOLD_EVERY, shutdown.clone()),
            );
            if let Some(days) = settings.retention_days {
                // Queries that started before the start moved end within
                // their time limit: deletion waits that long.
                let grace = settings.stats_timeout() + Duration::from_secs(1);
                tasks.spawn(
                    "retention",
                    crate::store::run_retention(Arc::clone(&store), days, grace, shutdown.clone()),
                );
            }
        }
        match (worker, &liveness) {
            // Not tied to `shutdown`: it stops when the API is done and the
            // channel is drained (see the module docs).
            (Some(Worker::Embedded(consumer)), Some(liveness)) => tasks.spawn(
                "worker",
                worker::run(
                    consumer,
                    Arc::clone(&store) as Arc<dyn crate::store::EventSink>,
                    settings.worker(),
                    Arc::clone(&metrics),
                    Arc::clone(liveness),
                    CancellationToken::new(),
                ),
            ),
            (Some(Worker::Redis(consumer)), Some(liveness)) => tasks.spawn(
                "worker",
                worker::run(
                    consumer,
                    Arc::clone(&store) as Arc<dyn crate::store::EventSink>,
                    settings.worker(),
                    Arc::clone(&metrics),
                    Arc::clone(liveness),
                    shutdown.clone(),
                ),
            ),
            _ => {}
        }
        match (queue, listener, visitors) {
            (Some(queue), Some(listener), Some(visitors)) => {
                let limit = settings.client_limit().map(Arc::new);
                if let Some(limit) = &limit {
                    tasks.spawn(
                        "rate limiter",
                        forget_idle_clients(Arc::clone(limit), shutdown.clone()),
                    );
                }
                // The registry as it is now, then kept fresh: a site's
                // settings apply to the first request.
                let registry = Arc::new(crate::sites::Registry::default());
                if let Err(e) = registry.refresh(&*store).await {
                    return Err(StartupError::new(
                        "DATA_DIR",
                        format!("cannot read the site registry: {e}"),
                    ));
                }
                tasks.spawn(
                    "site registry",
                    crate::sites::run_refresh(
                        Arc::clone(&registry),
                        Arc::clone(&store),
                        shutdown.clone(),
                    ),
                );
                let state = AppState::new(StateParts {
                    queue,
                    store,
                    registry,
                    access: Arc::new(settings.access()),
                    metrics,
                    limit,
                    liveness,
                    limits: Arc::new(InFlight::new(
                        settings.max_requests_in_flight,
                        settings.max_body_bytes_in_flight,
                    )),
                    stats_timeout: settings.stats_timeout(),
                    proxies: Arc::new(settings.trusted_proxies.clone()),
                    agents: Arc::new(crate::enrich::ua::Agents::default()),
                    visitors,
                    base_path: Arc::new(settings.base_path.clone()),
                });
                let app = router(state, stats_origins);
                let stop = shutdown.clone();
                tasks.spawn("server", async move {
                    // Also when the server panics: the embedded writer waits
                    // for this before it drains and stops.
                    let _api_done = api_done.drop_guard();
                    crate::server::serve(listener, app, stop).await;
                });
            }
            (None, Some(listener), _) => {
                let app = crate::routes::metrics::worker_router(metrics, liveness);
                tasks.spawn(
                    "metrics server",
                    crate::server::serve(listener, app, shutdown.clone()),
                );
            }
            _ => {}
        }
        Ok(Self {
            addr,
            shutdown,
            tasks,
            queue_kind,
            store_kind,
        })
    }

    /// The bound address (port 0 in settings picks a free one), if serving HTTP.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.addr
    }

    pub fn port(&self) -> Option<u16> {
        self.addr.map(|a| a.port())
    }

    pub fn backends(&self) -> (&'static str, &'static str) {
        (self.queue_kind, self.store_kind)
    }

    /// Cancelling it shuts the application down gracefully.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits until every task has ended: after the shutdown token fired, or
    /// after a task the process needs stopped on its own or panicked (then
    /// the others are stopped, and the failure returned).
    pub async fn run_until_stopped(self) -> Result<(), TaskFailed> {
        self.tasks.wait().await
    }
}

/// Stats are readable by anyone who reaches the port unless tokens are
/// configured. On loopback that is only this machine; on any other address
/// it must be asked for explicitly.
/// Keeps the rate limiter's table to the clients seen in the last few
/// seconds, so that many passing addresses cannot grow it without bound.
async fn forget_idle_clients(limit: Arc<ClientLimit>, stop: CancellationToken) {
    let mut every = tokio::time::interval(Duration::from_secs(10));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => limit.rate.forget_idle(),
            _ = stop.cancelled() => return,
        }
    }
}

fn check_exposure(settings: &Settings) -> Result<(), StartupError> {
    let open = settings.stats_tokens.is_empty();
    if settings.public_stats && !open {
        return Err(StartupError::new(
            "PUBLIC_STATS",
            "PUBLIC_STATS makes stats readable without a token, but STATS_TOKENS is set: \
             unset one of them",
        ));
    }
    if open && !settings.public_stats && !settings.host.is_loopback() {
        return Err(StartupError::new(
            "STATS_TOKENS",
            format!(
                "listening on {} with no STATS_TOKENS would let anyone who reaches the port \
                 read every site's stats: set STATS_TOKENS, or PUBLIC_STATS=true to make \
                 them public on purpose",
                settings.host
            ),
        ));
    }
    Ok(())
}

async fn open_store(
    settings: &Settings,
    durability: Durability,
) -> Result<Arc<dyn Store>, StartupError> {
    Ok(open_backend(settings, durability).await?.0)
}

/// The store, and the salts of visitor ids when it keeps them (SQLite:
/// embedded mode, one process).
async fn open_backend(
    settings: &Settings,
    durability: Durability,
) -> Result<(Arc<dyn Store>, Option<Arc<dyn SaltSource>>), StartupError> {
    match settings.mongo_uri() {
        Some(uri) => {
            let store = MongoStore::connect_with(
                uri,
                settings.mongo_db.as_deref(),
                settings.stats_timeout(),
            )
            .await
            .map_err(|e| StartupError::new("MONGO_URI", e))?;
            Ok((Arc::new(store), None))
        }
        None => {
            let dir = settings.data_dir.clone();
            let options = SqliteOptions {
                durability,
                query_timeout: settings.stats_timeout(),
                ..SqliteOptions::default()
            };
            let store = tokio::task::spawn_blocking(move || SqliteStore::open_with(&dir, options))
                .await
                .map_err(|e| StartupError::new("DATA_DIR", e.to_string()))?
                .map_err(|e| StartupError::new("DATA_DIR", e.to_string()))?;
            Ok((Arc::new(store.clone()), Some(Arc::new(store))))
        }
    }
}

/// `evtrack rebuild-aggregates`: drops the rollups and counts every stored
/// event into them again, safely beside running processes: SQLite
/// serialises it with their folds, MongoDB stops folding while it resets.
pub async fn rebuild_aggregates(settings: &Settings) -> Result<String, StartupError> {
    let store = open_store(settings, Durability::Disk).await?;
    let events = store
        .rebuild_rollups()
        .await
        .map_err(|e| StartupError::new("DATA_DIR", e.to_string()))?;
    Ok(format!("rollups rebuilt from {events} events"))
}

/// `evtrack backup FILE`: the embedded store, copied while it runs.
pub async fn backup(settings: &Settings, file: &std::path::Path) -> Result<String, StartupError> {
    embedded_only(settings, "backup")?;
    let (dir, file) = (settings.data_dir.clone(), file.to_owned());
    let done =
        tokio::task::spawn_blocking(move || SqliteStore::backup(&dir, &file).map(|s| (s, file)))
            .await
            .map_err(|e| StartupError::new("DATA_DIR", e.to_string()))?
            .map_err(|e| StartupError::new("DATA_DIR", e.to_string()))?;
    Ok(format!("backed up {} into {}", done.0, done.1.display()))
}

/// `evtrack restore FILE`: a backup made the store of an empty DATA_DIR.
pub async fn restore(settings: &Settings, file: &std::path::Path) -> Result<String, StartupError> {
    embedded_only(settings, "restore")?;
    let (dir, file) = (settings.data_dir.clone(), file.to_owned());
    let done = tokio::task::spawn_blocking(move || SqliteStore::restore(&file, &dir))
        .await
        .map_err(|e| StartupError::new("DATA_DIR", e.to_string()))?
        .map_err(|e| StartupError::new("DATA_DIR", e.to_string()))?;
    Ok(format!(
        "restored {done} into {}",
        settings
            .data_dir
            .join(crate::store::sqlite::FILE_NAME)
            .display()
    ))
}

/// `evtrack erase SITE VISITOR`: as `POST /api/sites/{site_id}/erase`.
pub async fn erase(settings: &Settings, site: &str, visitor: &str) -> Result<String, StartupError> {
    let site =
        crate::event::SiteId::parse(site).map_err(|e| StartupError::new("SITE_ID", e.message))?;
    let store = open_store(settings, Durability::Disk).await?;
    let erased = store
        .erase(site.as_str(), visitor, crate::query::time::now_ms())
        .await
        .map_err(|e| StartupError::new("DATA_DIR", e.to_string()))?;
    Ok(format!(
        "erased {erased} events of one visitor on {}",
        site.as_str()
    ))
}

/// `evtrack sites …`: the site registry, as the admin API keeps it.
pub async fn sites(
    settings: &Settings,
    command: &crate::config::SitesCommand,
) -> Result<String, StartupError> {
    use crate::config::SitesCommand;
    use crate::sites::{SiteConfig, SiteSettings, Snapshot};
    let store = open_store(settings, Durability::Disk).await?;
    let failed = |e: crate::store::StoreError| StartupError::new("DATA_DIR", e.to_string());
    let site_of = |s: &str| {
        crate::event::SiteId::parse(s).map_err(|e| StartupError::new("SITE_ID", e.message))
    };
    match command {
        SitesCommand::List => {
            let snapshot = Snapshot::from_stored(store.registry().await.map_err(failed)?);
            let lines: Vec<String> = snapshot
                .sites()
                .iter()
                .map(|c| c.to_json().to_string())
                .collect();
            Ok(match lines.is_empty() {
                true => "no site has settings".into(),
                false => lines.join("\n"),
            })
        }
        SitesCommand::Set {
            site_id,
            settings: text,
        } => {
            let site = site_of(site_id)?;
            let text = match text.strip_prefix('@') {
                Some(path) => std::fs::read_to_string(path)
                    .map_err(|e| StartupError::new("SETTINGS", format!("{path}: {e}")))?,
                None => text.clone(),
            };
            let value: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| StartupError::new("SETTINGS", format!("not JSON: {e}")))?;
            let parsed = SiteSettings::parse(&value)
                .map_err(|e| StartupError::new("SETTINGS", e.to_string()))?;
            let value = serde_json::to_value(&parsed)
                .map_err(|e| StartupError::new("SETTINGS", e.to_string()))?;
            store
                .put_site(site.as_str(), &value)
                .await
                .map_err(failed)?;
            Ok(SiteConfig::new(site, parsed).to_json().to_string())
        }
        SitesCommand::Delete { site_id } => {
            let site = site_of(site_id)?;
            match store.delete_site(site.as_str()).await.map_err(failed)? {
                true => Ok(format!("removed the settings of {}", site.as_str())),
                false => Err(StartupError::new(
                    "SITE_ID",
                    format!("{} has no settings", site.as_str()),
                )),
            }
        }
    }
}

/// `evtrack tokens …`: read tokens made at run time.
pub async fn tokens(
    settings: &Settings,
    command: &crate::config::TokensCommand,
) -> Result<String, StartupError> {
    use crate::config::TokensCommand;
    use crate::sites::TokenRecord;
    let store = open_store(settings, Durability::Disk).await?;
    let failed = |e: crate::store::StoreError| StartupError::new("DATA_DIR", e.to_string());
    match command {
        TokensCommand::Create { sites, label } => {
            let sites = sites
                .iter()
                .map(|s| {
                    crate::event::SiteId::parse(s.as_str())
                        .map_err(|e| StartupError::new("SITE_ID", e.message))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let (record, token) =
                TokenRecord::create(sites, label.clone(), crate::query::time::now_ms())
                    .map_err(|e| StartupError::new("TOKEN", e.to_string()))?;
            store.put_token(&record).await.map_err(failed)?;
            let links: Vec<String> = record
                .sites
                .iter()
                .map(|s| {
                    format!(
                        "  {}",
                        crate::sites::share_path(settings.base_path.as_str(), s, &token)
                    )
                })
                .collect();
            Ok(format!(
                "id {}\ntoken {token}\n(shown once: only its digest is kept)\n\
                 share links (after the service's address):\n{}",
                record.id,
                links.join("\n")
            ))
        }
        TokensCommand::List => {
            let tokens = store.registry().await.map_err(failed)?.tokens;
            Ok(match tokens.is_empty() {
                true => "no read token".into(),
                false => tokens
                    .iter()
                    .map(|t| t.to_json().to_string())
                    .collect::<Vec<_>>()
                    .join("\n"),
            })
        }
        TokensCommand::Revoke { id } => match store.revoke_token(id).await.map_err(failed)? {
            true => Ok(format!("revoked {id}")),
            false => Err(StartupError::new("TOKEN", "no read token has this id")),
        },
    }
}

/// Backups are of the embedded store: MongoDB has its own tools.
fn embedded_only(settings: &Settings, what: &str) -> Result<(), StartupError> {
    match settings.mongo_uri() {
        Some(_) => Err(StartupError::new(
            "MONGO_URI",
            format!(
                "`evtrack {what}` is for the embedded store; with MONGO_URI the events are in \
                 MongoDB: use mongodump and mongorestore (see the README)"
            ),
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits for `tasks`, failing the test if that takes more than a minute.
    async fn wait(tasks: Tasks) -> Result<(), TaskFailed> {
        tokio::time::timeout(Duration::from_secs(60), tasks.wait())
            .await
            .expect("every task ended")
    }

    /// A part that stops on shutdown, as the server and the worker do.
    fn until_shutdown(shutdown: &CancellationToken) -> impl Future<Output = ()> + use<> {
        let shutdown = shutdown.clone();
        async move { shutdown.cancelled().await }
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_that_panics_stops_the_others_and_is_reported() {
        let shutdown = CancellationToken::new();
        let mut tasks = Tasks::new(shutdown.clone());
        tasks.spawn("server", until_shutdown(&shutdown));
        tasks.spawn("worker", async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            panic!("the worker's store call panicked");
        });
        let failed = wait(tasks).await.expect_err("a failure is reported");
        assert_eq!((failed.task, failed.how.as_str()), ("worker", "panicked"));
        assert!(shutdown.is_cancelled(), "the server was told to stop");
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_that_ends_on_its_own_stops_the_others_and_is_reported() {
        let shutdown = CancellationToken::new();
        let mut tasks = Tasks::new(shutdown.clone());
        tasks.spawn("worker", until_shutdown(&shutdown));
        tasks.spawn("server", async {
            tokio::time::sleep(Duration::from_secs(1)).await;
        });
        let failed = wait(tasks).await.expect_err("a failure is reported");
        assert_eq!(failed.task, "server");
        assert_eq!(
            failed.to_string(),
            "the server task ended on its own",
            "the line the binary prints before exiting non-zero"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn tasks_that_end_after_shutdown_was_asked_for_are_fine() {
        let shutdown = CancellationToken::new();
        let mut tasks = Tasks::new(shutdown.clone());
        tasks.spawn("server", until_shutdown(&shutdown));
        tasks.spawn("worker", until_shutdown(&shutdown));
        let stop = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            stop.cancel();
        });
        assert!(wait(tasks).await.is_ok());
    }
}
