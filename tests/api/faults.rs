//! Fault injection at scale, with the service as separate OS processes
//! (`evtrack`, `evtrack api`, `evtrack worker`) on real backends: a worker
//! killed with SIGKILL mid-drain, MongoDB stopped under steady ingest, the
//! queue limit under a flood, SIGTERM under steady load.
//!
//! Each case ends by checking what a user of the service sees against what
//! the service acknowledged (a 202, or an enqueue that returned `Ok`):
//!
//! - each site's stats for the day (`GET /stats` while an API is up, else the
//!   store's own stats query) equal [`evtrack::stats::aggregate`], the
//!   project's in-memory reference, over the acknowledged events: total
//!   views, unique users, and every path's views and users (the limit is
//!   above the number of paths sent, so no path is cut off);
//! - every acknowledged (site, event id) is stored (`count_ids`, per site),
//!   and the store holds exactly as many events as were acknowledged
//!   (`count_all`).
//!
//! Why both: the store keys events by (site, id), so counting stored ids
//! shows a loss but can never show a double. A doubled event shows in the
//! stats instead: the totals are counted from the stored events (MongoDB) or
//! from daily aggregates updated as events are inserted (SQLite), which a
//! redelivery counted twice would inflate. The events alternate between two
//! sites, and pairs of them share an event id across the sites (the same id
//! on two sites is two events), so confusing the sites also loses an event;
//! 17 paths and 101 users make a lost or doubled event move some path's
//! figures, not only a total. In Redis mode the checks wait for an empty
//! stream and no dead letters first: once every entry is acknowledged, no
//! redelivery can still change a figure.
//!
//! The SIGKILL case also checks the mechanism it relies on: entries were
//! pending with the killed worker at the kill, and the next worker claimed
//! them (they leave the pending list and the stream, the killed consumer
//! holds none, and the new worker's `/metrics` counts them).
//!
//! Related cases elsewhere: Redis stopped and restarted, a malformed stream
//! entry, and a dead worker's entries claimed by another are in
//! `redis_queue.rs`; embedded mode killed with SIGKILL after acknowledged
//! events is in `lifecycle.rs`.

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chrono::NaiveDate;
use evtrack::event::{Event, now_ms, parse_event};
use evtrack::queue::Queue;
use evtrack::queue::redis::{FIELD, GROUP, RedisQueue};
use evtrack::stats::{MAX_LIMIT, StatsQuery, aggregate};
use evtrack::store::Store;
use evtrack::store::mongo::MongoStore;
use redis::AsyncCommands;
use redis::streams::{StreamPendingCountReply, StreamPendingReply, StreamRangeReply};
use serde_json::{Value, json};

use crate::backends::free_port;
use crate::helpers::{Backend, Service, TestEnv, ids_of, metric, wait_until_up};

const DAY: &str = "2025-11-23";
/// Every event goes to one of these, alternately.
const SITES: [&str; 2] = ["faults-a", "faults-b"];

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
        ("QUEUE_PARTITIONS", s.queue_partitions.to_string()),
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

/// The `n`th event of a series. Sites alternate, and events `2k` and `2k+1`
/// share the event id `<prefix>-<k>` on the two sites: two distinct events
/// that a mix-up of sites would collapse into one. Paths and users cycle with
/// different periods, so each path has its own mix of users.
fn view(prefix: &str, n: usize) -> Value {
    let k = n / 2;
    json!({"site_id": SITES[n % 2], "event_type": "page_view",
           "path": format!("/p{}", (k + 5 * (n % 2)) % 17),
           "userid": format!("u{}", k % 101),
           "timestamp": format!("{DAY}T{:02}:{:02}:00Z", k % 24, k % 60),
           "event_id": format!("{prefix}-{k}")})
}

/// The event the service makes of `view(prefix, n)`, for the reference
/// aggregation (the receive time does not enter the stats).
fn event(value: Value) -> Event {
    parse_event(value, now_ms()).expect("a valid event")
}

fn query(site: &str) -> StatsQuery {
    StatsQuery {
        site_id: site.parse().expect("valid"),
        date: NaiveDate::parse_from_str(DAY, "%Y-%m-%d").unwrap(),
        event_type: "page_view".parse().expect("valid"),
        limit: MAX_LIMIT,
    }
}

/// A store handle for the checks. On MongoDB with a generous query time
/// limit: the test's stand-in server takes seconds to aggregate tens of
/// thousands of events, and these checks are about content, not speed.
async fn checking_store(env: &TestEnv) -> Arc<dyn Store> {
    match env.settings.mongo_uri() {
        Some(uri) => Arc::new(
            MongoStore::connect_with(
                uri,
                env.settings.mongo_db.as_deref(),
                Duration::from_secs(120),
            )
            .await
            .expect("connect to mongo"),
        ),
        None => env.store().await,
    }
}

/// Waits until the service has settled what it acknowledged (`acked`), then
/// checks what a user sees: per-site stats equal the reference aggregation
/// of `acked`, every acknowledged (site, id) is stored, and nothing else is.
/// In Redis mode it first waits for an empty stream, and checks that nothing
/// was dead-lettered. `api`: the base URL of a running API, whose `GET
/// /stats` answer is checked too.
async fn assert_user_sees_exactly(
    env: &TestEnv,
    store: &dyn Store,
    acked: &[Event],
    api: Option<&str>,
    within: Duration,
) {
    let mut by_site: HashMap<&str, Vec<String>> = HashMap::new();
    for e in acked {
        by_site
            .entry(&e.site_id)
            .or_default()
            .push(e.id.as_str().to_owned());
    }
    let distinct: HashSet<(&str, &str)> = acked
        .iter()
        .map(|e| (e.site_id.as_str(), e.id.as_str()))
        .collect();
    assert_eq!(
        distinct.len(),
        acked.len(),
        "acknowledged (site, id) pairs are distinct"
    );

    let deadline = Instant::now() + within;
    loop {
        let stored = store.count_all().await.expect("count");
        let queued = if env.redis.is_some() {
            stream_len(env).await
        } else {
            0
        };
        if stored >= acked.len() as u64 && queued == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{stored} of {} acknowledged events stored, {queued} still queued after {within:?}",
            acked.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if env.redis.is_some() {
        assert_eq!(dead_letters(env).await, 0, "nothing dead-lettered");
    }
    assert_eq!(
        store.count_all().await.unwrap(),
        acked.len() as u64,
        "the store holds exactly the acknowledged events"
    );

    // Whoever folds (the service, or this test beside it), each stored event
    // is counted once.
    crate::helpers::fold_all(store).await;
    let client = reqwest::Client::new();
    for site in SITES {
        let ids = by_site.get(site).map(Vec::as_slice).unwrap_or_default();
        // By id, in slices: one 25,000-id `$in` is slow on the test's MongoDB
        // stand-in.
        let mut stored = 0;
        for slice in ids.chunks(1_000) {
            stored += store.count_ids(site, slice).await.unwrap();
        }
        assert_eq!(
            stored,
            ids.len() as u64,
            "acknowledged events of {site} stored"
        );

        let q = query(site);
        let expected = aggregate(acked, &q);
        assert!(expected.total_views > 0, "{site} was sent events");
        assert!(
            expected.top_paths.len() < MAX_LIMIT as usize,
            "every path is in the answer"
        );
        let seen = evtrack::stats::compute(store, &q).await.expect("stats");
        assert_eq!(seen, expected, "stats of {site}");
        if let Some(base) = api {
            let r = client
                .get(format!(
                    "{base}/stats?site_id={site}&date={DAY}&limit={MAX_LIMIT}"
                ))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            let body: Value = r.json().await.unwrap();
            assert_eq!(
                body["stats"],
                serde_json::to_value(&expected).unwrap(),
                "GET /stats of {site}"
            );
        }
    }
}

async fn dead_letters(env: &TestEnv) -> u64 {
    env.redis_conn().await.xlen(env.dead_key()).await.unwrap()
}

/// Entries in the queue, over every partition.
async fn stream_len(env: &TestEnv) -> u64 {
    let (mut conn, layout) = env.queue_conn().await;
    let mut total = 0u64;
    for keys in &layout.partitions {
        let n: u64 = conn.xlen(&keys.stream).await.unwrap();
        total += n;
    }
    total
}

/// The groups' pending summary: each consumer holding entries, and how
/// many (over every partition).
async fn pending_by_consumer(env: &TestEnv) -> HashMap<String, usize> {
    let (mut conn, layout) = env.queue_conn().await;
    let mut holds = HashMap::new();
    for keys in &layout.partitions {
        let reply: StreamPendingReply = conn.xpending(&keys.stream, GROUP).await.unwrap();
        if let StreamPendingReply::Data(d) = reply {
            for c in d.consumers {
                *holds.entry(c.name).or_insert(0) += c.pending;
            }
        }
    }
    holds
}

/// The entries (stream, id) pending with `consumer`, and the events in them.
async fn held_by(env: &TestEnv, consumer: &str) -> (Vec<(String, String)>, Vec<Event>) {
    let (mut conn, layout) = env.queue_conn().await;
    let mut held = Vec::new();
    for keys in &layout.partitions {
        let reply: StreamPendingCountReply = redis::cmd("XPENDING")
            .arg(&keys.stream)
            .arg(GROUP)
            .arg("-")
            .arg("+")
            .arg(10_000)
            .arg(consumer)
            .query_async(&mut conn)
            .await
            .unwrap();
        held.extend(reply.ids.into_iter().map(|p| (keys.stream.clone(), p.id)));
    }
    let events = entries(&mut conn, &held)
        .await
        .iter()
        .map(|entry| match entry.map.get(FIELD) {
            Some(redis::Value::BulkString(json)) => serde_json::from_slice(json).unwrap(),
            other => panic!("entry {} holds {other:?}", entry.id),
        })
        .collect();
    (held, events)
}

/// Those of `ids` (stream, id) still in their streams.
async fn entries(
    conn: &mut evtrack::queue::redis::Conn,
    ids: &[(String, String)],
) -> Vec<redis::streams::StreamId> {
    let mut found = Vec::new();
    for (stream, id) in ids {
        let r: StreamRangeReply = redis::cmd("XRANGE")
            .arg(stream)
            .arg(id)
            .arg(id)
            .query_async(conn)
            .await
            .unwrap();
        found.extend(r.ids);
    }
    found
}

/// How many of `ids` (stream, id) are still in their streams.
async fn still_there(env: &TestEnv, ids: &[(String, String)]) -> usize {
    let (mut conn, _) = env.queue_conn().await;
    entries(&mut conn, ids).await.len()
}

/// Sends a signal to a process this test started.
fn signal(pid: u32, name: &str) {
    let sent = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .expect("kill(1)");
    assert!(sent.success(), "SIG{name} to {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_drain_of_50000_into_mongodb_loses_and_doubles_nothing() {
    killed_worker_mid_drain(Backend::RedisMongo).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_drain_of_50000_into_sqlite_loses_and_doubles_nothing() {
    killed_worker_mid_drain(Backend::RedisSqlite).await;
}

/// The same on a 3-master Redis Cluster, the queue in 6 partitions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_drain_on_a_redis_cluster_loses_and_doubles_nothing() {
    killed_worker_mid_drain(Backend::RedisClusterSqlite).await;
}

async fn killed_worker_mid_drain(backend: Backend) {
    const N: usize = 50_000;
    let env = TestEnv::new(backend);
    let queue = RedisQueue::connect(&env.settings.redis().unwrap())
        .await
        .unwrap();
    let events: Vec<Event> = (0..N).map(|n| event(view("k9", n))).collect();
    for chunk in events.chunks(1_000) {
        queue.enqueue(chunk.to_vec()).await.unwrap();
    }
    assert_eq!(stream_len(&env).await, N as u64);
    let store = checking_store(&env).await;

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
    let pid = first.child.id();
    let deadline = Instant::now() + Duration::from_secs(120);
    while store.count_all().await.unwrap() < 2_000 {
        assert!(Instant::now() < deadline, "the first worker stored nothing");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The kill must land while the worker holds entries, not in the instant
    // between acknowledging a batch and reading the next. So the worker is
    // frozen (SIGSTOP) and looked at first: killed if it holds entries, let
    // go for a moment and looked at again if not. Its consumer is named
    // `<pid>-<uuid>`.
    let mine = |name: &String| name.starts_with(&format!("{pid}-"));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        signal(pid, "STOP");
        // Commands the worker sent just before it froze still land.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let holds = pending_by_consumer(&env).await;
        if holds.iter().any(|(name, &n)| mine(name) && n > 0) {
            break;
        }
        signal(pid, "CONT");
        assert!(Instant::now() < deadline, "the worker never held entries");
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    first.child.kill().expect("SIGKILL");
    first.child.wait().unwrap();

    // (a) Right after the kill, the dead worker's consumer holds entries.
    let holds = pending_by_consumer(&env).await;
    let (consumer, held_count) = holds
        .iter()
        .find(|(name, _)| mine(name))
        .map(|(name, &n)| (name.clone(), n))
        .unwrap_or_else(|| panic!("no pending entries of pid {pid}: {holds:?}"));
    assert!(held_count > 0, "the killed worker held nothing");
    let (held, held_events) = held_by(&env, &consumer).await;
    assert_eq!(held.len(), held_count);
    assert_eq!(
        held_events.len(),
        held.len(),
        "held entries are in the stream"
    );
    let at_kill = store.count_all().await.unwrap();
    assert!(
        at_kill < N as u64,
        "the worker finished before it could be killed ({at_kill} stored)"
    );
    let left = stream_len(&env).await;
    // Those of the held events the store already has (written, not yet
    // acknowledged): the next worker must meet them as duplicates. On
    // MongoDB a write the dead worker had sent may still land after this
    // count, so it is a lower bound.
    let mut already = 0;
    for site in SITES {
        let ids: Vec<String> = held_events
            .iter()
            .filter(|e| e.site_id == site)
            .map(|e| e.id.as_str().to_owned())
            .collect();
        already += store.count_ids(site, &ids).await.unwrap();
    }
    eprintln!(
        "killed with {held_count} entries held, {at_kill} events stored ({already} of the held), \
         {left} entries in the stream"
    );

    let metrics_port = free_port();
    let mut second_vars = vars.clone();
    second_vars.push(("METRICS_PORT", metrics_port.to_string()));
    let second = Service::spawn_quiet(&["worker"], &second_vars);
    assert_user_sees_exactly(&env, &*store, &events, None, Duration::from_secs(300)).await;

    // (b) Another worker claimed them: the dead consumer holds nothing, and
    // none of its entries is pending with anyone or left in the stream. An
    // entry is deleted only once stored and acknowledged, or dead-lettered
    // (there are none), and a pending entry moves to another consumer only
    // by a claim.
    let holds = pending_by_consumer(&env).await;
    assert!(holds.is_empty(), "entries still pending: {holds:?}");
    assert_eq!(still_there(&env, &held).await, 0, "held entries left");
    // The second worker wrote every entry left in the stream, the held ones
    // included: each counted once as stored or as a duplicate (a
    // redelivery of an event the dead worker had written).
    // The counters move just after the acknowledgement: poll briefly.
    let deadline = Instant::now() + Duration::from_secs(5);
    let (new, duplicates) = loop {
        let text = reqwest::get(format!("http://127.0.0.1:{metrics_port}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let new = metric(&text, "evtrack_events_stored_total") as u64;
        let duplicates = metric(&text, "evtrack_events_duplicate_total") as u64;
        if new + duplicates >= left || Instant::now() > deadline {
            break (new, duplicates);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("second worker: {new} stored, {duplicates} duplicates");
    assert!(
        new + duplicates >= left,
        "the second worker wrote {new} + {duplicates} of {left} entries"
    );
    assert!(
        duplicates >= already,
        "{already} held events were already stored; {duplicates} duplicates counted"
    );
    assert!(second.terminate().success());
}

/// Sends events one by one (`view(prefix, n)`, n = 0, 1, …) until `stop`;
/// returns the events answered 202, and every other status seen.
fn steady_sender(
    base: String,
    prefix: String,
    pause: Duration,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(Vec<Event>, Vec<u16>)> {
    tokio::spawn(async move {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let (mut acked, mut other) = (Vec::new(), Vec::new());
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            let body = view(&prefix, n);
            match client
                .post(format!("{base}/event"))
                .json(&body)
                .send()
                .await
            {
                Ok(r) if r.status() == 202 => acked.push(event(body)),
                Ok(r) => other.push(r.status().as_u16()),
                Err(_) => other.push(0),
            }
            n += 1;
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
        "outage".into(),
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

    let store = checking_store(&env).await;
    assert_user_sees_exactly(&env, &*store, &acked, Some(&base), Duration::from_secs(120)).await;
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
    let rss_before = crate::helpers::memory_mib(pid, "VmRSS");

    // 32 clients, 800 batches of 100 events: 40 times what the queue holds.
    let mut tasks = Vec::new();
    for c in 0..32 {
        let (client, base) = (client.clone(), base.clone());
        tasks.push(tokio::spawn(async move {
            let (mut acked, mut full) = (Vec::new(), 0);
            for b in 0..25 {
                let prefix = format!("flood-{c}-{b}");
                let batch: Vec<Value> = (0..100).map(|n| view(&prefix, n)).collect();
                let r = client
                    .post(format!("{base}/events"))
                    .json(&batch)
                    .send()
                    .await
                    .unwrap();
                match r.status().as_u16() {
                    202 => {
                        let body: Value = r.json().await.unwrap();
                        let sent: Vec<String> = batch
                            .iter()
                            .map(|v| v["event_id"].as_str().unwrap().to_owned())
                            .collect();
                        assert_eq!(ids_of(&body), sent, "ids answered in order");
                        acked.extend(batch.into_iter().map(event));
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
    let rss_after = crate::helpers::memory_mib(pid, "VmRSS");
    assert!(
        rss_after < rss_before + 32.0,
        "RSS grew from {rss_before:.1} MiB to {rss_after:.1} MiB"
    );

    // A worker catches up: ingestion resumes, and every accepted event is
    // stored once.
    let worker = Service::spawn_quiet(&["worker"], &service_env(&env, 0, &[]));
    let deadline = Instant::now() + Duration::from_secs(60);
    let late = view("flood-late", 0);
    loop {
        let r = client
            .post(format!("{base}/event"))
            .json(&late)
            .send()
            .await
            .unwrap();
        if r.status() == 202 {
            break;
        }
        assert_eq!(r.status(), 503);
        assert!(Instant::now() < deadline, "ingestion did not resume");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    acked.push(event(late));
    let store = env.store().await;
    assert_user_sees_exactly(&env, &*store, &acked, Some(&base), Duration::from_secs(60)).await;
    assert!(api.terminate().success());
    assert!(worker.terminate().success());
}

/// `clients` senders in a loop until SIGTERM takes the service down; returns
/// the events answered 202 and how long the process took to exit.
async fn sigterm_under_load(
    service: Service,
    base: &str,
    clients: usize,
) -> (Vec<Event>, Duration) {
    let stop = Arc::new(AtomicBool::new(false));
    let senders: Vec<_> = (0..clients)
        .map(|c| {
            steady_sender(
                base.to_owned(),
                format!("term-{c}"),
                Duration::ZERO,
                stop.clone(),
            )
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
    // The process is gone: what it answered 202 must already be stored.
    let store = env.store().await;
    assert_user_sees_exactly(&env, &*store, &acked, None, Duration::from_secs(5)).await;
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
    assert_user_sees_exactly(&env, &*store, &acked, None, Duration::from_secs(60)).await;
    assert!(worker.terminate().success());
}
