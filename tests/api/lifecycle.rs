//! Start-up, health, graceful shutdown, and the binary as separate processes.

use std::process::{Command, Stdio};
use std::time::Duration;

use evtrack::config::Settings;
use evtrack::startup::{Application, Role};
use serde_json::{Value, json};

use crate::helpers::{
    Backend, RunningApp, Service, TestEnv, backend_tests, ids_of, json_of, spawn_app, wait_stored,
    wait_until_up,
};

backend_tests!(health_and_readiness);

pub(crate) async fn health_and_readiness(backend: Backend) {
    let app = spawn_app(backend).await;
    let body = json_of(app.get("/health").await, 200).await;
    assert_eq!(body["success"], true);
    let body = json_of(app.get("/ready").await, 200).await;
    let (queue, store) = match backend {
        Backend::EmbeddedSqlite => ("embedded", "sqlite"),
        Backend::RedisSqlite | Backend::RedisClusterSqlite => ("redis", "sqlite"),
        Backend::RedisMongo => ("redis", "mongodb"),
    };
    assert_eq!(
        body["checks"]["queue"],
        json!({"backend": queue, "status": "ok"})
    );
    assert_eq!(
        body["checks"]["store"],
        json!({"backend": store, "status": "ok"})
    );
    app.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_settings_fail_start_up_naming_the_setting() {
    let env = TestEnv::new(Backend::EmbeddedSqlite);
    let expect = |settings: Settings, role: Role, setting: &'static str| async move {
        let err = Application::build(settings, role)
            .await
            .err()
            .expect("start-up fails");
        assert_eq!(err.setting, setting, "{err}");
        assert!(!err.to_string().contains('\n'), "one line: {err}");
    };
    expect(env.settings.clone(), Role::Api, "REDIS_URL").await;
    expect(env.settings.clone(), Role::Worker, "REDIS_URL").await;
    let unreachable = Settings {
        redis_url: Some(format!(
            "redis://127.0.0.1:{}",
            crate::backends::free_port()
        )),
        ..env.settings.clone()
    };
    expect(unreachable, Role::All, "REDIS_URL").await;
    let nonsense = Settings {
        redis_url: Some("http://example".into()),
        ..env.settings.clone()
    };
    expect(nonsense, Role::All, "REDIS_URL").await;
    // Each partition must have room for the largest request.
    let thin = Settings {
        redis_url: Some("redis://127.0.0.1:1".into()),
        queue_partitions: 4,
        queue_max_bytes: 3 * evtrack::config::MIN_QUEUE_MAX_BYTES,
        ..env.settings.clone()
    };
    expect(thin, Role::All, "QUEUE_MAX_BYTES").await;
    // The embedded queue in front of MongoDB is refused before anything is
    // connected: a request could be partly stored yet answered 503.
    let embedded_mongo = Settings {
        mongo_uri: Some("mongodb://127.0.0.1:1/".into()),
        ..env.settings.clone()
    };
    let err = Application::build(embedded_mongo, Role::All)
        .await
        .err()
        .expect("embedded queue + MongoDB is refused");
    assert_eq!(err.setting, "MONGO_URI");
    assert!(err.message.contains("REDIS_URL"), "{err}");
    // With Redis, MongoDB settings are checked by connecting.
    let redis = crate::backends::RedisServer::start();
    let mongo = Settings {
        redis_url: Some(redis.url.clone()),
        mongo_uri: Some(format!(
            "mongodb://127.0.0.1:{}/?serverSelectionTimeoutMS=300",
            crate::backends::free_port()
        )),
        ..env.settings.clone()
    };
    expect(mongo, Role::All, "MONGO_URI").await;
    let bad_uri = Settings {
        redis_url: Some(redis.url.clone()),
        mongo_uri: Some("mysql://nope".into()),
        ..env.settings.clone()
    };
    expect(bad_uri, Role::All, "MONGO_URI").await;
    let file = env.dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let data_dir = Settings {
        data_dir: file.join("sub"),
        ..env.settings.clone()
    };
    expect(data_dir, Role::All, "DATA_DIR").await;
}

/// A worker that cannot store what it reads (MongoDB gone for good) stops
/// completing polls, and `/health` says so once `WORKER_STALL_MS` has passed,
/// in the all-in-one process and in `evtrack worker` (METRICS_PORT); the API
/// alone, which runs no worker, stays healthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_turns_503_when_the_worker_stops_completing_polls() {
    let mut env = TestEnv::new(Backend::RedisMongo);
    env.settings.worker_stall_ms = 5_000;
    let mut worker_settings = env.settings.clone();
    worker_settings.metrics_port = Some(0);
    let app = crate::helpers::spawn_app_with(env, Role::All).await;
    let worker = RunningApp::start(worker_settings, Role::Worker).await;
    let worker_base = worker.address.clone().expect("METRICS_PORT serves");
    let api = RunningApp::start(app.env.settings.clone(), Role::Api).await;
    let api_base = api.address.clone().expect("the API listens");
    let client = reqwest::Client::new();
    let health = |base: String| {
        let client = client.clone();
        async move {
            let r = client.get(format!("{base}/health")).send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap())
        }
    };
    let first = json_of(
        app.post_event(&json!({"site_id": "h", "event_type": "page_view"}))
            .await,
        202,
    )
    .await;
    app.wait_stored("h", &[first["id"].as_str().unwrap().to_owned()])
        .await;
    // Idle for longer than the bound, but polling: healthy.
    tokio::time::sleep(Duration::from_millis(6_000)).await;
    assert_eq!(health(app.address.clone()).await.0, 200);
    assert_eq!(health(worker_base.clone()).await.0, 200);

    let mut env = app.env;
    env.mongo.as_mut().expect("mongo").stop();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    for base in [app.address.clone(), worker_base.clone()] {
        loop {
            // Events keep coming (into Redis), so that each of the two
            // workers is handed some it cannot store.
            let r = client
                .post(format!("{api_base}/event"))
                .json(&json!({"site_id": "h", "event_type": "page_view"}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 202, "ingestion goes on into Redis");
            let (status, body) = health(base.clone()).await;
            if status == 503 {
                assert_eq!(body["error"]["code"], "worker_stalled", "{body}");
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{base} still healthy: {body}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert_eq!(
        health(api_base).await.0,
        200,
        "the API alone runs no worker"
    );
    api.stop().await;
    worker.stop().await;
    app.app.stop().await;
}

/// Embedded mode, a store that cannot write (another process holds the
/// file's write lock), and sparse traffic: the failed request is answered
/// 503 and nothing is held for retry, yet `/health` must not go back to 200
/// on the next empty poll: the last write failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_turns_503_in_embedded_mode_when_the_store_cannot_write() {
    let mut env = TestEnv::new(Backend::EmbeddedSqlite);
    env.settings.worker_stall_ms = 5_000;
    let app = crate::helpers::spawn_app_with(env, Role::All).await;
    let file = app
        .env
        .settings
        .data_dir
        .join(evtrack::store::sqlite::FILE_NAME);
    let lock = rusqlite::Connection::open(&file).unwrap();
    lock.execute_batch("BEGIN EXCLUSIVE").unwrap();
    // The writer waits for the lock (its 5 s busy timeout) and gives up.
    let r = app
        .post_event(&json!({"site_id": "h", "event_type": "page_view"}))
        .await;
    assert_eq!(r.status(), 503);
    // No more traffic: the worker polls an empty queue.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let r = app.get("/health").await;
        if r.status() == 503 {
            let body: Value = r.json().await.unwrap();
            assert_eq!(body["error"]["code"], "worker_stalled", "{body}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "still healthy");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Still 503 a few polls later: an empty poll is not progress.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(app.get("/health").await.status(), 503);
    // The lock goes away: the next write succeeds and health comes back.
    lock.execute_batch("ROLLBACK").unwrap();
    drop(lock);
    json_of(
        app.post_event(&json!({"site_id": "h", "event_type": "page_view"}))
            .await,
        202,
    )
    .await;
    assert_eq!(app.get("/health").await.status(), 200);
    app.app.stop().await;
}

/// Counts the sync calls (`fsync`, `fdatasync`) an strace log holds so far.
fn syncs_in(log: &std::path::Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("fsync(") || l.contains("fdatasync("))
        .count()
}

/// Redis + SQLite: the worker deletes stream entries once the store has
/// them, so the store's commit must be on disk by then, not in the OS's
/// cache (an OS crash or power loss would lose what Redis no longer holds).
/// Seen from outside, with strace: storing a batch costs the worker process
/// a sync call, made before the stream is empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_mode_syncs_each_sqlite_commit_to_disk_before_acknowledging() {
    use redis::AsyncCommands;
    let env = TestEnv::new(Backend::RedisSqlite);
    let log = env.dir.path().join("strace.log");
    let port = crate::backends::free_port();
    let worker = Service::spawn_quiet(
        &["worker"],
        &[
            ("REDIS_URL", env.settings.redis_url.clone().unwrap()),
            ("REDIS_PREFIX", env.settings.redis_prefix.clone()),
            ("DATA_DIR", env.settings.data_dir.display().to_string()),
            ("METRICS_PORT", port.to_string()),
        ],
    );
    let client = reqwest::Client::new();
    wait_until_up(&client, &format!("http://127.0.0.1:{port}")).await;
    // strace attaches to the running worker (all its threads, and those it
    // starts), so that killing the worker at the end ends both: a worker
    // started by strace would outlive a killed strace.
    let pid = worker.child.id().to_string();
    let _strace = Service {
        child: Command::new("strace")
            .args(["-f", "-qq", "-e", "trace=fsync,fdatasync", "-o"])
            .arg(&log)
            .args(["-p", &pid])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("strace (scripts/test.sh installs it) attaches to the worker"),
    };
    let traced = || {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .any(|l| l.starts_with("TracerPid:") && l.trim_end() != "TracerPid:\t0")
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !traced() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "strace did not attach"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = syncs_in(&log);

    let queue = evtrack::queue::redis::RedisQueue::connect(&env.settings.redis().unwrap())
        .await
        .unwrap();
    let events: Vec<_> = (0..10)
        .map(|i| {
            evtrack::event::parse_event(
                json!({"site_id": "sync", "event_type": "page_view", "event_id": format!("s{i}")}),
                evtrack::event::now_ms(),
            )
            .unwrap()
        })
        .collect();
    use evtrack::queue::Queue;
    queue.enqueue(events).await.unwrap();
    let mut redis = env.redis_conn().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while redis.xlen::<_, u64>(env.stream_key()).await.unwrap() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "not drained");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The entries were deleted after the commit returned: its sync is
    // already in the log.
    let after = syncs_in(&log);
    assert!(
        after > before,
        "no fsync/fdatasync for the stored batch ({before} before, {after} after)"
    );
    let store = env.store().await;
    let ids: Vec<String> = (0..10).map(|i| format!("s{i}")).collect();
    assert_eq!(store.count_ids("sync", &ids).await.unwrap(), 10);
    drop(worker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stores_every_acknowledged_event_and_data_survives_restart() {
    let app = spawn_app(Backend::EmbeddedSqlite).await;
    let client = app.client.clone();
    let url = format!("{}/event", app.address);
    let send = |i: usize| {
        let (client, url) = (client.clone(), url.clone());
        tokio::spawn(async move {
            let event = json!({"site_id": "shut", "event_type": "page_view", "path": format!("/{}", i % 5)});
            let r = client.post(url).json(&event).send().await.ok()?;
            if r.status() != 202 {
                return None;
            }
            let body: Value = r.json().await.ok()?;
            body["id"].as_str().map(str::to_owned)
        })
    };
    let mut acknowledged = Vec::new();
    for r in (0..50).map(send).collect::<Vec<_>>() {
        acknowledged.extend(r.await.unwrap());
    }
    assert_eq!(acknowledged.len(), 50);
    // Requests in flight while shutdown begins.
    let in_flight: Vec<_> = (50..250).map(send).collect();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let env = app.env;
    app.app.stop().await;
    for r in in_flight {
        acknowledged.extend(r.await.unwrap());
    }
    let store = env.store().await;
    assert_eq!(
        store.count_ids("shut", &acknowledged).await.unwrap(),
        acknowledged.len() as u64
    );
    drop(store);
    // Start again on the same data directory: everything is still there.
    let again = RunningApp::start(env.settings.clone(), Role::All).await;
    let store = env.store().await;
    wait_stored(&*store, "shut", &acknowledged).await;
    again.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_and_two_workers_as_processes_on_redis_and_mongodb() {
    let env = TestEnv::new(Backend::RedisMongo);
    let port = crate::backends::free_port();
    let vars = vec![
        ("PORT", port.to_string()),
        ("REDIS_URL", env.settings.redis_url.clone().unwrap()),
        ("REDIS_PREFIX", env.settings.redis_prefix.clone()),
        ("MONGO_URI", env.settings.mongo_uri.clone().unwrap()),
        ("MONGO_DB", env.settings.mongo_db.clone().unwrap()),
    ];
    let api = Service::spawn(&["api"], &vars);
    let w1 = Service::spawn(&["worker"], &vars);
    let w2 = Service::spawn(&["worker"], &vars);
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while client
        .get(format!("{base}/ready"))
        .send()
        .await
        .map(|r| r.status() != 200)
        .unwrap_or(true)
    {
        assert!(tokio::time::Instant::now() < deadline, "api not ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The design document's curl example, then the sample day.
    let example = json!({"site_id": "site-001", "event_type": "page_view", "path": "/blog",
                         "userid": "user-115", "timestamp": "2025-11-23T16:44:31.123Z"});
    let r = client
        .post(format!("{base}/event"))
        .json(&example)
        .send()
        .await
        .unwrap();
    let mut ids = vec![json_of(r, 202).await["id"].as_str().unwrap().to_owned()];
    let batch: Vec<Value> = (0..300)
        .map(|i| {
            json!({"site_id": "site-001", "event_type": "page_view", "path": format!("/p{}", i % 4),
                        "userid": format!("u{}", i % 9), "timestamp": "2025-11-23T10:00:00Z"})
        })
        .collect();
    let r = client
        .post(format!("{base}/events"))
        .json(&batch)
        .send()
        .await
        .unwrap();
    let body = json_of(r, 202).await;
    ids.extend(ids_of(&body));
    let store = env.store().await;
    wait_stored(&*store, "site-001", &ids).await;
    assert_eq!(store.count_all().await.unwrap(), 301);
    let r = client
        .get(format!("{base}/stats?site_id=site-001&date=2025-11-23"))
        .send()
        .await
        .unwrap();
    let stats = json_of(r, 200).await["stats"].clone();
    assert_eq!(stats["total_views"], 301);
    assert_eq!(stats["unique_users"], 10);
    assert_eq!(
        stats["top_paths"][0],
        json!({"path": "/p0", "views": 75, "unique_users": 9})
    );
    for p in [api, w1, w2] {
        assert!(p.terminate().success(), "clean exit on SIGTERM");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_refuses_api_without_redis_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_evtrack"))
        .arg("api")
        .env_remove("REDIS_URL")
        .env("DATA_DIR", dir.path())
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("REDIS_URL"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_acknowledged_events_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let port = crate::backends::free_port();
    let data = dir.path().join("data");
    let mut proc = Service::spawn(
        &[],
        &[
            ("PORT", port.to_string()),
            ("DATA_DIR", data.display().to_string()),
        ],
    );
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while client
        .get(format!("{base}/ready"))
        .send()
        .await
        .map(|r| r.status() != 200)
        .unwrap_or(true)
    {
        assert!(tokio::time::Instant::now() < deadline, "not ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let send = |i: usize| {
        let (client, url) = (client.clone(), format!("{base}/event"));
        tokio::spawn(async move {
            let event =
                json!({"site_id": "k9", "event_type": "page_view", "path": format!("/{i}")});
            let r = client.post(url).json(&event).send().await.ok()?;
            let body: Value = r.json().await.ok()?;
            body["id"].as_str().map(str::to_owned)
        })
    };
    let mut acknowledged = Vec::new();
    let first: Vec<_> = (0..200).map(send).collect();
    for t in first {
        acknowledged.extend(t.await.unwrap());
    }
    assert_eq!(acknowledged.len(), 200);
    // Kill while requests are still arriving.
    let second: Vec<_> = (200..400).map(send).collect();
    tokio::time::sleep(Duration::from_millis(10)).await;
    proc.child.kill().unwrap();
    for t in second {
        acknowledged.extend(t.await.unwrap());
    }
    proc.child.wait().unwrap();
    let conn = rusqlite::Connection::open(data.join(evtrack::store::sqlite::FILE_NAME)).unwrap();
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    drop(conn);
    let store = evtrack::store::sqlite::SqliteStore::open(&data).unwrap();
    use evtrack::store::StoreAdmin;
    assert_eq!(
        store.count_ids("k9", &acknowledged).await.unwrap(),
        acknowledged.len() as u64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_rebuilds_aggregates() {
    let env = TestEnv::new(Backend::EmbeddedSqlite);
    let store = env.store().await;
    let e = evtrack::event::parse_event(json!({"site_id": "cli", "event_type": "page_view"}), 0)
        .unwrap();
    store.insert(&[e]).await.unwrap();
    drop(store);
    let out = Command::new(env!("CARGO_BIN_EXE_evtrack"))
        .arg("rebuild-aggregates")
        .env("DATA_DIR", &env.settings.data_dir)
        .env_remove("MONGO_URI")
        .current_dir(env.dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "rollups rebuilt from 1 events"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_reads_dot_env_and_reports_bad_values_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let port = crate::backends::free_port();
    std::fs::write(
        dir.path().join(".env"),
        format!("PORT={port}\nDATA_DIR=./from-dotenv\n"),
    )
    .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_evtrack"));
    cmd.current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for var in ["PORT", "HOST", "REDIS_URL", "MONGO_URI", "DATA_DIR"] {
        cmd.env_remove(var);
    }
    let proc = Service {
        child: cmd.spawn().unwrap(),
    };
    let client = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while client
        .get(format!("http://127.0.0.1:{port}/health"))
        .send()
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not listening on the .env port"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        dir.path()
            .join("from-dotenv")
            .join(evtrack::store::sqlite::FILE_NAME)
            .exists()
    );
    assert!(proc.terminate().success());

    let out = Command::new(env!("CARGO_BIN_EXE_evtrack"))
        .env("PORT", "eighty")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("eighty") && stderr.contains("PORT"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_bodies_never_reach_the_logs() {
    let dir = tempfile::tempdir().unwrap();
    let port = crate::backends::free_port();
    let token = "never-logged-token-0123456789";
    let secret_path = "/secret-path-in-a-body";
    for format in ["text", "json"] {
        let mut proc = Service::spawn(
            &[],
            &[
                ("PORT", port.to_string()),
                ("DATA_DIR", dir.path().join("data").display().to_string()),
                ("STATS_TOKENS", format!("{token}=site-a")),
                ("LOG_FORMAT", format.to_owned()),
                // As verbose as an operator chasing a problem would set it.
                ("RUST_LOG", "debug".to_owned()),
            ],
        );
        // Read as it comes, so a full pipe never blocks the process.
        let mut stderr = proc.child.stderr.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut logs = String::new();
            std::io::Read::read_to_string(&mut stderr, &mut logs).unwrap();
            logs
        });
        let base = format!("http://127.0.0.1:{port}");
        let client = reqwest::Client::new();
        wait_until_up(&client, &base).await;
        let event = json!({"site_id": "site-a", "event_type": "page_view", "path": secret_path});
        let r = client
            .post(format!("{base}/event"))
            .json(&event)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        for (site, expected) in [("site-a", 200), ("site-b", 403)] {
            let r = client
                .get(format!("{base}/stats?site_id={site}"))
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), expected);
        }
        let r = client
            .get(format!("{base}/stats?site_id=site-a"))
            .bearer_auth(format!("{token}-wrong"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        assert!(proc.terminate().success());
        let logs = reader.join().unwrap();
        assert!(logs.contains("/stats"), "debug logs show requests: {logs}");
        assert!(!logs.contains(token), "a token was logged:\n{logs}");
        assert!(!logs.contains(secret_path), "a body was logged:\n{logs}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_still_stops_the_service_when_its_log_reader_is_gone() {
    // A log collector that died (or `evtrack | head`) closes stderr; logging
    // must not kill the task that handles the signal.
    let dir = tempfile::tempdir().unwrap();
    let port = crate::backends::free_port();
    let mut proc = Service::spawn(
        &[],
        &[
            ("PORT", port.to_string()),
            ("DATA_DIR", dir.path().join("data").display().to_string()),
            ("RUST_LOG", "info".to_owned()),
        ],
    );
    let client = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    wait_until_up(&client, &base).await;
    drop(proc.child.stderr.take());
    let event = json!({"site_id": "s", "event_type": "page_view"});
    let r = client
        .post(format!("{base}/event"))
        .json(&event)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert!(proc.terminate().success());
}
