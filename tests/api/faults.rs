//! Fault injection at scale, with the service as separate OS processes
//! (`evtrack`, `evtrack api`, `evtrack worker`) on real backends: a worker
//! killed with SIGKILL mid-drain, MongoDB stopped under steady ingest, the
//! queue limit under a flood, SIGTERM under steady load. Each case ends by
//! counting stored events by id: every acknowledged event stored, none twice
//! (the stats, which count from the stored events or from aggregates the
//! worker maintains, must equal the number of distinct acknowledged ids).
//!
//! Related cases elsewhere: Redis stopped and restarted, a malformed stream
//! entry, and a dead worker's entries claimed by another are in
//! `redis_queue.rs`; embedded mode killed with SIGKILL after acknowledged
//! events is in `lifecycle.rs`.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chrono::NaiveDate;
use evtrack::event::{Event, now_ms, parse_event};
use evtrack::queue::Queue;
use evtrack::queue::redis::RedisQueue;
use evtrack::stats::StatsQuery;
use evtrack::store::Store;
use redis::AsyncCommands;
use serde_json::{Value, json};

use crate::backends::free_port;
use crate::helpers::{Backend, Service, TestEnv, wait_until_up};

const DAY: &str = "2025-11-23";

/// Environment for the binary: the test's backends, a free port.
fn service_env(
    env: &TestEnv,
    port: u16,
    extra: &[(&'static str, &str)],
) -> Vec<(&'static str, String)> {
    let s = &env.settings;
    let mut vars = vec![
        ("PORT", port.to_string()),
        ("DATA_DIR", s.data_dir.display().to_string()),
        ("REDIS_PREFIX", s.redis_prefix.clone()),
    ];
    if let Some(url) = &s.redis_url {
        vars.push(("REDIS_URL", url.clone()));
    }
    if let (Some(uri), Some(db)) = (&s.mongo_uri, &s.mongo_db) {
        vars.push(("MONGO_URI", uri.clone()));
        vars.push(("MONGO_DB", db.clone()));
    }
    vars.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
    vars
}

fn view(id: &str, i: usize) -> Value {
    json!({"site_id": "faults", "event_type": "page_view", "path": format!("/p{}", i % 17),
           "userid": format!("u{}", i % 101), "timestamp": format!("{DAY}T12:00:00Z"),
           "event_id": id})
}

async fn total_views(store: &dyn Store) -> u64 {
    let query = StatsQuery {
        site_id: "faults".into(),
        date: NaiveDate::parse_from_str(DAY, "%Y-%m-%d").unwrap(),
        event_type: "page_view".into(),
        limit: 10,
    };
    store.stats(&query).await.expect("stats").total_views
}

/// Waits until every id is stored, then checks that nothing is there twice
/// or extra: the store holds exactly `ids`, and the day's stats count each
/// once.
async fn assert_stored_exactly_once(store: &dyn Store, ids: &[String], within: Duration) {
    let distinct: HashSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len(), "acknowledged ids are distinct");
    // Counting all is cheap; counting by id is done once, at the end.
    let deadline = Instant::now() + within;
    loop {
        let stored = store.count_all().await.expect("count");
        if stored >= ids.len() as u64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{stored} of {} acknowledged events stored after {within:?}",
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(store.count_all().await.unwrap(), ids.len() as u64);
    // By id, in slices: one 50,000-id `$in` is slow on the test's MongoDB
    // stand-in.
    let mut by_id = 0;
    for slice in ids.chunks(1_000) {
        by_id += store.count_ids("faults", slice).await.unwrap();
    }
    assert_eq!(by_id, ids.len() as u64);
    assert_eq!(total_views(store).await, ids.len() as u64);
}

async fn dead_letters(env: &TestEnv) -> u64 {
    env.redis_conn().await.xlen(env.dead_key()).await.unwrap()
}

async fn stream_len(env: &TestEnv) -> u64 {
    env.redis_conn().await.xlen(env.stream_key()).await.unwrap()
}

/// Resident memory of a process, from `/proc` (Linux).
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kib / 1024.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_drain_of_50000_into_mongodb_loses_and_doubles_nothing() {
    killed_worker_mid_drain(Backend::RedisMongo).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_drain_of_50000_into_sqlite_loses_and_doubles_nothing() {
    killed_worker_mid_drain(Backend::RedisSqlite).await;
}

async fn killed_worker_mid_drain(backend: Backend) {
    const N: usize = 50_000;
    let env = TestEnv::new(backend);
    let queue = RedisQueue::connect(&env.settings.redis().unwrap())
        .await
        .unwrap();
    let now = now_ms();
    let ids: Vec<String> = (0..N).map(|i| format!("k9-{i}")).collect();
    for (n, chunk) in ids.chunks(1_000).enumerate() {
        let events: Vec<Event> = chunk
            .iter()
            .enumerate()
            .map(|(i, id)| parse_event(view(id, n * 1_000 + i), now).unwrap())
            .collect();
        queue.enqueue(events).await.unwrap();
    }
    assert_eq!(stream_len(&env).await, N as u64);
    let store = env.store().await;

    // Small batches, so that the kill lands with a batch in hand; a short
    // claim time, so that the next worker takes over that batch promptly.
    let vars = service_env(
        &env,
        0,
        &[
            ("WORKER_BATCH_SIZE", "500"),
            ("WORKER_CLAIM_IDLE_MS", "1000"),
        ],
    );
    let mut first = Service::spawn_quiet(&["worker"], &vars);
    let deadline = Instant::now() + Duration::from_secs(120);
    while store.count_all().await.unwrap() < 2_000 {
        assert!(Instant::now() < deadline, "the first worker stored nothing");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.child.kill().expect("SIGKILL");
    first.child.wait().unwrap();
    let at_kill = store.count_all().await.unwrap();
    assert!(
        at_kill < N as u64,
        "the worker finished before it could be killed ({at_kill} stored)"
    );

    let second = Service::spawn_quiet(&["worker"], &vars);
    assert_stored_exactly_once(&*store, &ids, Duration::from_secs(300)).await;
    assert_eq!(dead_letters(&env).await, 0);
    // Every entry acknowledged and deleted, the killed worker's included.
    let deadline = Instant::now() + Duration::from_secs(10);
    while stream_len(&env).await > 0 {
        assert!(Instant::now() < deadline, "entries left in the stream");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(second.terminate().success());
}

/// Sends events one by one with sequential ids until `stop`; returns the
/// ids answered 202, and every other status seen.
fn steady_sender(
    base: String,
    prefix: &'static str,
    pause: Duration,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(Vec<String>, Vec<u16>)> {
    tokio::spawn(async move {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let (mut acked, mut other) = (Vec::new(), Vec::new());
        let mut i = 0;
        while !stop.load(Ordering::Relaxed) {
            let id = format!("{prefix}-{i}");
            match client
                .post(format!("{base}/event"))
                .json(&view(&id, i))
                .send()
                .await
            {
                Ok(r) if r.status() == 202 => acked.push(id),
                Ok(r) => other.push(r.status().as_u16()),
                Err(_) => other.push(0),
            }
            i += 1;
            tokio::time::sleep(pause).await;
        }
        (acked, other)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_down_for_10_s_under_steady_ingest_loses_nothing() {
    let mut env = TestEnv::new(Backend::RedisMongo);
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let api = Service::spawn_quiet(&["api"], &service_env(&env, port, &[]));
    let worker = Service::spawn_quiet(&["worker"], &service_env(&env, 0, &[]));
    let client = reqwest::Client::new();
    wait_until_up(&client, &base).await;

    let stop = Arc::new(AtomicBool::new(false));
    let sender = steady_sender(
        base.clone(),
        "outage",
        Duration::from_millis(10),
        stop.clone(),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    env.mongo.as_mut().unwrap().stop();
    let stopped = stream_len(&env).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    // The API kept taking events, and the worker acknowledged none of them.
    let waiting = stream_len(&env).await;
    assert!(
        waiting > stopped + 100,
        "the queue should grow while the store is down ({stopped} -> {waiting})"
    );
    let ready: Value = client
        .get(format!("{base}/ready"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["checks"]["store"]["status"], "unavailable", "{ready}");
    env.mongo.as_mut().unwrap().restart();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let (acked, other) = sender.await.unwrap();
    assert!(other.is_empty(), "the API refused events: {other:?}");
    assert!(acked.len() > 500, "only {} events sent", acked.len());

    let store = env.store().await;
    assert_stored_exactly_once(&*store, &acked, Duration::from_secs(120)).await;
    assert_eq!(
        dead_letters(&env).await,
        0,
        "an outage dead-letters nothing"
    );
    assert!(api.terminate().success());
    assert!(worker.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_against_the_queue_limit_is_refused_cleanly_and_recovers() {
    const MAX: u64 = 2_000;
    let env = TestEnv::new(Backend::RedisSqlite);
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let max = MAX.to_string();
    // The API alone: nothing drains the stream.
    let api = Service::spawn_quiet(
        &["api"],
        &service_env(&env, port, &[("QUEUE_MAX_LEN", &max)]),
    );
    let client = reqwest::Client::new();
    wait_until_up(&client, &base).await;
    let pid = api.child.id();
    let rss_before = rss_mib(pid);

    // 32 clients, 800 batches of 100 events: 40 times what the queue holds.
    let mut tasks = Vec::new();
    for c in 0..32 {
        let (client, base) = (client.clone(), base.clone());
        tasks.push(tokio::spawn(async move {
            let (mut acked, mut full) = (Vec::new(), 0);
            for b in 0..25 {
                let batch: Vec<Value> = (0..100)
                    .map(|i| view(&format!("flood-{c}-{b}-{i}"), i))
                    .collect();
                let r = client
                    .post(format!("{base}/events"))
                    .json(&batch)
                    .send()
                    .await
                    .unwrap();
                match r.status().as_u16() {
                    202 => {
                        let body: Value = r.json().await.unwrap();
                        acked.extend(crate::helpers::ids_of(&body));
                    }
                    503 => {
                        assert_eq!(r.headers()["retry-after"], "1");
                        let body: Value = r.json().await.unwrap();
                        assert_eq!(body["error"]["code"], "queue_full", "{body}");
                        full += 1;
                    }
                    s => panic!("unexpected status {s}"),
                }
            }
            (acked, full)
        }));
    }
    let (mut acked, mut full) = (Vec::new(), 0);
    for t in tasks {
        let (a, f) = t.await.unwrap();
        acked.extend(a);
        full += f;
    }
    assert!(full > 700, "only {full} batches refused");
    // A request is queued whole or not at all, and never beyond the limit.
    let queued = stream_len(&env).await;
    assert_eq!(queued, acked.len() as u64);
    assert!(queued <= MAX, "{queued} queued with a limit of {MAX}");
    // What was refused was not kept: memory stays near its starting point.
    let rss_after = rss_mib(pid);
    assert!(
        rss_after < rss_before + 32.0,
        "RSS grew from {rss_before:.1} MiB to {rss_after:.1} MiB"
    );

    // A worker catches up: ingestion resumes, and every accepted event is
    // stored once.
    let worker = Service::spawn_quiet(&["worker"], &service_env(&env, 0, &[]));
    let deadline = Instant::now() + Duration::from_secs(60);
    let late = loop {
        let r = client
            .post(format!("{base}/event"))
            .json(&view("flood-late", 0))
            .send()
            .await
            .unwrap();
        if r.status() == 202 {
            break "flood-late".to_owned();
        }
        assert_eq!(r.status(), 503);
        assert!(Instant::now() < deadline, "ingestion did not resume");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    acked.push(late);
    let store = env.store().await;
    assert_stored_exactly_once(&*store, &acked, Duration::from_secs(60)).await;
    assert!(api.terminate().success());
    assert!(worker.terminate().success());
}

/// `clients` senders in a loop until SIGTERM takes the service down; returns
/// the ids answered 202 and how long the process took to exit.
async fn sigterm_under_load(
    service: Service,
    base: &str,
    clients: usize,
) -> (Vec<String>, Duration) {
    let stop = Arc::new(AtomicBool::new(false));
    let senders: Vec<_> = (0..clients)
        .map(|c| {
            let prefix: &'static str = Box::leak(format!("term-{c}").into_boxed_str());
            steady_sender(base.to_owned(), prefix, Duration::ZERO, stop.clone())
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = Instant::now();
    let status = tokio::task::spawn_blocking(move || service.terminate())
        .await
        .unwrap();
    let took = started.elapsed();
    assert!(status.success(), "exit status {status}");
    stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    for s in senders {
        acked.extend(s.await.unwrap().0);
    }
    (acked, took)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_steady_load_embedded_loses_nothing() {
    let env = TestEnv::new(Backend::EmbeddedSqlite);
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let service = Service::spawn_quiet(&[], &service_env(&env, port, &[]));
    wait_until_up(&reqwest::Client::new(), &base).await;
    let (acked, took) = sigterm_under_load(service, &base, 16).await;
    assert!(
        acked.len() > 100,
        "only {} events acknowledged",
        acked.len()
    );
    // Requests get 10 s to send their bodies; shutdown waits for no more.
    assert!(took < Duration::from_secs(12), "exit took {took:?}");
    let store = env.store().await;
    assert_stored_exactly_once(&*store, &acked, Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_steady_load_redis_loses_nothing() {
    let env = TestEnv::new(Backend::RedisSqlite);
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let claim = [("WORKER_CLAIM_IDLE_MS", "1000")];
    let api = Service::spawn_quiet(&["api"], &service_env(&env, port, &[]));
    let worker = Service::spawn_quiet(&["worker"], &service_env(&env, 0, &claim));
    wait_until_up(&reqwest::Client::new(), &base).await;
    // The worker is stopped while it drains, then the API while it takes
    // events.
    let stopping_worker = tokio::task::spawn_blocking(move || {
        std::thread::sleep(Duration::from_millis(700));
        let started = Instant::now();
        (worker.terminate(), started.elapsed())
    });
    let (acked, took) = sigterm_under_load(api, &base, 16).await;
    let (status, worker_took) = stopping_worker.await.unwrap();
    assert!(status.success(), "worker exit status {status}");
    assert!(
        worker_took < Duration::from_secs(12),
        "worker exit took {worker_took:?}"
    );
    assert!(took < Duration::from_secs(12), "api exit took {took:?}");
    assert!(
        acked.len() > 100,
        "only {} events acknowledged",
        acked.len()
    );
    // A new worker finds everything the old one left.
    let worker = Service::spawn_quiet(&["worker"], &service_env(&env, 0, &claim));
    let store = env.store().await;
    assert_stored_exactly_once(&*store, &acked, Duration::from_secs(60)).await;
    assert!(worker.terminate().success());
}
