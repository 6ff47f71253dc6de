//! `spawn_app()`: the real application on a free port, on real backends that
//! the test starts for itself, with typed request helpers.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use evtrack::config::Settings;
use evtrack::startup::{Application, Role};
use evtrack::store::Store;
use evtrack::store::mongo::MongoStore;
use evtrack::store::sqlite::SqliteStore;
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::backends::{MongoServer, RedisCluster, RedisServer};

/// The queue and store combinations every API test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    EmbeddedSqlite,
    RedisSqlite,
    RedisMongo,
    /// A 3-master Redis Cluster, the queue in 6 partitions, and SQLite.
    RedisClusterSqlite,
}

impl Backend {
    pub fn redis(self) -> bool {
        self != Backend::EmbeddedSqlite
    }
    pub fn mongo(self) -> bool {
        self == Backend::RedisMongo
    }
    pub fn cluster(self) -> bool {
        self == Backend::RedisClusterSqlite
    }
}

/// Runs one `async fn(Backend)` test against every backend combination.
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                use crate::helpers::Backend;
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn embedded_sqlite() { super::$name(Backend::EmbeddedSqlite).await }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn redis_sqlite() { super::$name(Backend::RedisSqlite).await }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn redis_mongo() { super::$name(Backend::RedisMongo).await }
            }
        )*
    };
}
pub(crate) use backend_tests;

/// The backends of one test, and settings pointing at them (port 0, a fresh
/// data directory, a fresh key prefix and database name).
pub struct TestEnv {
    pub settings: Settings,
    pub redis: Option<RedisServer>,
    pub cluster: Option<RedisCluster>,
    pub mongo: Option<MongoServer>,
    pub dir: TempDir,
}

impl TestEnv {
    pub fn new(backend: Backend) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let id = uuid::Uuid::now_v7().simple().to_string();
        let cluster = backend.cluster().then(|| RedisCluster::start(3));
        let redis = (backend.redis() && !backend.cluster()).then(RedisServer::start);
        let mongo = backend.mongo().then(MongoServer::start);
        let settings = Settings {
            port: 0,
            data_dir: dir.path().join("data"),
            redis_url: (redis.as_ref().map(|r| r.url.clone()))
                .or_else(|| cluster.as_ref().map(|c| c.url.clone())),
            queue_partitions: if cluster.is_some() { 6 } else { 1 },
            redis_prefix: format!("test-{id}:"),
            mongo_uri: mongo.as_ref().map(|m| m.uri.clone()),
            mongo_db: mongo.as_ref().map(|_| format!("evtrack_test_{id}")),
            ..Settings::default()
        };
        Self {
            settings,
            redis,
            cluster,
            mongo,
            dir,
        }
    }

    /// A store handle of the test's own, to look at what was stored.
    pub async fn store(&self) -> Arc<dyn Store> {
        match self.settings.mongo_uri() {
            Some(uri) => Arc::new(
                MongoStore::connect(uri, self.settings.mongo_db.as_deref())
                    .await
                    .expect("connect to mongo"),
            ),
            None => Arc::new(SqliteStore::open(&self.settings.data_dir).expect("open sqlite")),
        }
    }

    /// A direct Redis connection, for looking into the stream.
    pub async fn redis_conn(&self) -> redis::aio::MultiplexedConnection {
        let url = self.settings.redis_url.as_deref().expect("a redis backend");
        redis::Client::open(url)
            .expect("redis url")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to redis")
    }

    /// A connection as evtrack's queue makes it (to the server or to the
    /// cluster), and the keys of the queue's partitions.
    pub async fn queue_conn(&self) -> (evtrack::queue::redis::Conn, evtrack::queue::redis::Layout) {
        let config = self.settings.redis().expect("a redis backend");
        let conn = evtrack::queue::redis::connect(&config, Duration::from_secs(5))
            .await
            .expect("connect to redis");
        let layout = evtrack::queue::redis::Layout::new(
            &config.prefix,
            config.partitions,
            self.cluster.is_some(),
        );
        (conn, layout)
    }

    pub fn stream_key(&self) -> String {
        format!("{}events", self.settings.redis_prefix)
    }

    pub fn dead_key(&self) -> String {
        format!("{}dead", self.settings.redis_prefix)
    }
}

/// A running application, stopped (gracefully) on `stop` or on drop.
pub struct RunningApp {
    pub address: Option<String>,
    shutdown: CancellationToken,
    handle: Option<JoinHandle<Result<(), evtrack::startup::TaskFailed>>>,
}

impl RunningApp {
    pub async fn start(settings: Settings, role: Role) -> Self {
        let app = Application::build(settings, role)
            .await
            .expect("application starts");
        let address = app.port().map(|p| format!("http://127.0.0.1:{p}"));
        let shutdown = app.shutdown_token();
        let handle = tokio::spawn(app.run_until_stopped());
        Self {
            address,
            shutdown,
            handle: Some(handle),
        }
    }

    /// Graceful shutdown; waits until every task has ended.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(h) = self.handle.take() {
            tokio::time::timeout(Duration::from_secs(30), h)
                .await
                .expect("application stops within 30 s")
                .expect("application task")
                .expect("every part of the application ran until shutdown");
        }
    }
}

impl Drop for RunningApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub struct TestApp {
    pub env: TestEnv,
    pub app: RunningApp,
    pub address: String,
    pub client: reqwest::Client,
    pub store: Arc<dyn Store>,
}

/// The whole service (API and worker) on the given backends.
pub async fn spawn_app(backend: Backend) -> TestApp {
    spawn_app_with(TestEnv::new(backend), Role::All).await
}

pub async fn spawn_app_with(env: TestEnv, role: Role) -> TestApp {
    let app = RunningApp::start(env.settings.clone(), role).await;
    let address = app.address.clone().expect("the API listens");
    let store = env.store().await;
    TestApp {
        env,
        app,
        address,
        client: reqwest::Client::new(),
        store,
    }
}

impl TestApp {
    pub async fn post_event(&self, body: &Value) -> reqwest::Response {
        self.post_raw("/event", "application/json", body.to_string())
            .await
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> reqwest::Response {
        self.post_raw(path, "application/json", body.to_string())
            .await
    }

    /// `POST /api/v2/query`, expecting an answer.
    pub async fn query(&self, body: &Value) -> Value {
        json_of(self.post_json("/api/v2/query", body).await, 200).await
    }

    pub async fn post_events(&self, body: &Value) -> reqwest::Response {
        self.post_raw("/events", "application/json", body.to_string())
            .await
    }

    pub async fn post_raw(
        &self,
        path: &str,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Response {
        self.client
            .post(format!("{}{path}", self.address))
            .header("Content-Type", content_type)
            .body(body)
            .send()
            .await
            .expect("request sent")
    }

    pub async fn get(&self, path_and_query: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path_and_query}", self.address))
            .send()
            .await
            .expect("request sent")
    }

    /// `GET /stats?…`, expecting 200; returns the `stats` object.
    pub async fn stats(&self, query: &str) -> Value {
        let r = self.get(&format!("/stats?{query}")).await;
        assert_eq!(r.status(), 200, "stats answer");
        let body: Value = r.json().await.expect("json");
        assert_eq!(body["success"], true);
        body["stats"].clone()
    }

    /// `GET /metrics`, expecting 200 in the Prometheus text format.
    pub async fn metrics(&self) -> String {
        let r = self.get("/metrics").await;
        assert_eq!(r.status(), 200);
        let content_type = r.headers()["content-type"].to_str().unwrap().to_owned();
        assert!(content_type.starts_with("application/openmetrics-text"));
        r.text().await.unwrap()
    }

    /// Waits until the store holds all these ids (the worker is asynchronous
    /// in Redis mode), failing after 20 s.
    pub async fn wait_stored(&self, site_id: &str, ids: &[String]) {
        wait_stored(&*self.store, site_id, ids).await
    }
}

/// Waits until the store holds all these ids and the service has counted
/// every stored event into the rollups (what queries read).
pub async fn wait_stored(store: &dyn Store, site_id: &str, ids: &[String]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let n = store.count_ids(site_id, ids).await.expect("count");
        let pending = store.unfolded().await.expect("unfolded");
        if n == ids.len() as u64 && pending == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {n} of {} events stored ({pending} not in the rollups) after 20 s",
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Counts every stored event into the rollups, as the service's folder does
/// (for tests that drive a store directly).
pub async fn fold_all(store: &dyn Store) {
    let all = evtrack::store::fold_all(store);
    // A worker killed mid-fold holds the fold until the server ends its
    // transaction (60 s on MongoDB).
    tokio::time::timeout(std::time::Duration::from_secs(300), all)
        .await
        .expect("folded within 5 minutes")
        .expect("fold");
}

/// Reads the JSON body, asserting the status first.
pub async fn json_of(response: reqwest::Response, status: u16) -> Value {
    let actual = response.status().as_u16();
    let text = response.text().await.expect("body");
    assert_eq!(actual, status, "unexpected status; body: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Checks the one error shape of the API.
pub fn assert_error(body: &Value, code: &str, field: Option<&str>) {
    assert_eq!(body["success"], false, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    match field {
        Some(f) => assert_eq!(body["error"]["field"], f, "{body}"),
        None => assert!(body["error"].get("field").is_none(), "{body}"),
    }
}

/// The `ids` of an accepted batch answer.
pub fn ids_of(body: &Value) -> Vec<String> {
    let ids = body["ids"].as_array().expect("an `ids` array");
    ids.iter()
        .map(|v| v.as_str().expect("string ids").to_owned())
        .collect()
}

/// The value of one series (`name` or `name{labels}`, exactly as written in
/// the exposition) in a `/metrics` text; 0 when absent.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            let rest = line.strip_prefix(series)?;
            rest.strip_prefix(' ')?.trim().parse().ok()
        })
        .unwrap_or(0.0)
}

/// The binary, as separate OS processes.
pub struct Service {
    pub child: Child,
}

impl Service {
    pub fn spawn(args: &[&str], env: &[(&str, String)]) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_evtrack"));
        cmd.args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .env("RUST_LOG", "warn");
        for var in evtrack::config::env_names() {
            cmd.env_remove(var);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        Self {
            child: cmd.spawn().expect("spawn evtrack"),
        }
    }

    /// The binary with its logs read and dropped as they come: a pipe nobody
    /// reads would fill and block the process on its next log line.
    pub fn spawn_quiet(args: &[&str], env: &[(&str, String)]) -> Self {
        let mut service = Self::spawn(args, env);
        if let Some(mut stderr) = service.child.stderr.take() {
            std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
        }
        service
    }

    pub fn terminate(mut self) -> std::process::ExitStatus {
        // SIGTERM, as a service manager would send.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no exit 20 s after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn wait_until_up(client: &reqwest::Client, base: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while client.get(format!("{base}/health")).send().await.is_err() {
        assert!(std::time::Instant::now() < deadline, "not up after 20 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A memory figure of a process from `/proc/<pid>/status` (Linux), in MiB:
/// `VmRSS` (resident now) or `VmHWM` (peak resident).
pub fn memory_mib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"));
    kib / 1024.0
}

/// `POST /api/v2/query` for today on `site`, with visitors, pageviews and
/// events, and `extra` fields of the request.
pub async fn query_today(app: &TestApp, site: &str, extra: Value) -> Value {
    let mut body = json!({"site_id": site, "metrics": ["visitors", "pageviews", "events"],
                          "date_range": "day"});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    app.query(&body).await
}

/// Waits until today's events on `site` are `n` in the query API, failing
/// after 20 s.
pub async fn wait_events(app: &TestApp, site: &str, n: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = query_today(app, site, json!({})).await;
        if r["results"][0]["metrics"][2] == n {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{r}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The first dimension's value of each row of an answer.
pub fn first_dimensions(answer: &Value) -> Vec<Value> {
    answer["results"]
        .as_array()
        .map(|rows| rows.iter().map(|r| r["dimensions"][0].clone()).collect())
        .unwrap_or_default()
}
