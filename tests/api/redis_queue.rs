//! Redis mode: delivery guarantees of the stream, with real redis-servers.

use std::time::Duration;

use evtrack::event::parse_event;
use evtrack::queue::redis::{RedisConsumer, RedisQueue};
use evtrack::queue::{Consumer, Queue};
use evtrack::startup::Role;
use evtrack::store::sqlite::SqliteStore;
use evtrack::worker::{WorkerConfig, process_batch};
use redis::AsyncCommands;
use serde_json::{Value, json};

use crate::backends::RedisServer;
use crate::helpers::{
    Backend, RunningApp, TestEnv, assert_error, ids_of, json_of, metric, spawn_app, spawn_app_with,
    wait_stored,
};
use crate::queue::{consumer_config, redis_config};

fn view(i: usize) -> Value {
    json!({"site_id": "drain", "event_type": "page_view", "path": format!("/p{}", i % 7),
           "userid": format!("u{}", i % 13), "timestamp": "2025-11-23T12:00:00Z"})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_drain_one_queue_exactly_once() {
    let env = TestEnv::new(Backend::RedisSqlite);
    let mut settings = env.settings.clone();
    settings.worker_batch_size = 50;
    let w1 = RunningApp::start(settings.clone(), Role::Worker).await;
    let w2 = RunningApp::start(settings, Role::Worker).await;
    let api = spawn_app_with(env, Role::Api).await;
    let mut ids = Vec::new();
    for chunk in 0..6 {
        let batch: Vec<Value> = (chunk * 500..(chunk + 1) * 500).map(view).collect();
        let body = json_of(api.post_events(&Value::Array(batch)).await, 202).await;
        ids.extend(ids_of(&body));
    }
    api.wait_stored("drain", &ids).await;
    assert_eq!(
        api.store.count_all().await.unwrap(),
        3000,
        "nothing stored twice"
    );
    let mut conn = api.env.redis_conn().await;
    let left: u64 = conn.xlen(api.env.stream_key()).await.unwrap();
    assert_eq!(left, 0, "acknowledged entries are removed from the stream");
    let dead: u64 = conn.xlen(api.env.dead_key()).await.unwrap();
    assert_eq!(dead, 0);
    let pending: redis::streams::StreamPendingReply = conn
        .xpending(api.env.stream_key(), "workers")
        .await
        .unwrap();
    assert_eq!(pending.count(), 0, "nothing left unacknowledged");
    // Both workers took part.
    let consumers: Vec<redis::Value> = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(api.env.stream_key())
        .arg("workers")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(consumers.len(), 2);
    let stats = api.stats("site_id=drain&date=2025-11-23").await;
    assert_eq!(
        (
            stats["total_views"].as_u64(),
            stats["unique_users"].as_u64()
        ),
        (Some(3000), Some(13))
    );
    w1.stop().await;
    w2.stop().await;
    api.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_workers_entries_are_claimed_and_poison_is_dead_lettered() {
    let redis = RedisServer::start();
    let config = redis_config(&redis, 1000);
    let queue = RedisQueue::connect(&config).await.unwrap();
    let sent: Vec<_> = (0..3)
        .map(|i| parse_event(view(i), evtrack::event::now_ms()).unwrap())
        .collect();
    queue.enqueue(sent.clone()).await.unwrap();

    // A worker reads the entries and dies before acknowledging them.
    let mut dead = RedisConsumer::connect(&config, consumer_config(Duration::from_millis(200)))
        .await
        .unwrap();
    assert_eq!(dead.fetch(10).await.unwrap().len(), 3);
    drop(dead);

    // Another worker takes them over once they have been idle long enough.
    let mut live = RedisConsumer::connect(&config, consumer_config(Duration::from_millis(200)))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let claimed = live.fetch(10).await.unwrap();
    assert_eq!(claimed.len(), 3);
    assert!(claimed.iter().all(|d| d.attempts == 2), "second delivery");
    let got: Vec<_> = claimed.iter().map(|d| d.event.clone().unwrap()).collect();
    assert_eq!(got, sent);
    drop(claimed); // this worker dies too

    // A third delivery is over the limit of 2: dead-lettered, not stored.
    let mut third = RedisConsumer::connect(&config, consumer_config(Duration::from_millis(200)))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let batch = third.fetch(10).await.unwrap();
    assert_eq!(batch.len(), 3);
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).unwrap();
    let config_w = WorkerConfig {
        batch_size: 10,
        max_attempts: 2,
    };
    let outcome = process_batch(&mut third, &store, batch, &config_w).await;
    assert_eq!((outcome.stored, outcome.dead_lettered), (0, 3));
    let mut conn = redis::Client::open(redis.url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let dead_len: u64 = conn.xlen(format!("{}dead", config.prefix)).await.unwrap();
    let left: u64 = conn.xlen(format!("{}events", config.prefix)).await.unwrap();
    assert_eq!((dead_len, left), (3, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_entries_are_dead_lettered_and_the_worker_goes_on() {
    let app = spawn_app(Backend::RedisSqlite).await;
    let mut conn = app.env.redis_conn().await;
    let stream = app.env.stream_key();
    let _: String = conn.xadd(&stream, "*", &[("e", "not json")]).await.unwrap();
    let _: String = conn
        .xadd(&stream, "*", &[("other", "field")])
        .await
        .unwrap();
    let _: String = conn
        .xadd(
            &stream,
            "*",
            &[(
                "e",
                r#"{"id":"x","site_id":"","event_type":"t","ts":1,"created_at":1}"#,
            )],
        )
        .await
        .unwrap();
    let body = json_of(app.post_event(&view(1)).await, 202).await;
    app.wait_stored("drain", &[body["id"].as_str().unwrap().to_owned()])
        .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let dead: u64 = conn.xlen(app.env.dead_key()).await.unwrap();
        let left: u64 = conn.xlen(&stream).await.unwrap();
        if (dead, left) == (3, 0) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "dead {dead}, left {left}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The raw entry is kept for inspection, with the reason.
    let entries: redis::streams::StreamRangeReply =
        conn.xrange_all(app.env.dead_key()).await.unwrap();
    let first = &entries.ids[0];
    assert!(first.map.contains_key("reason"));
    assert_eq!(first.get::<String>("raw.e").as_deref(), Some("not json"));
    assert_eq!(app.store.count_all().await.unwrap(), 1);
    let metrics = app.metrics().await;
    assert_eq!(metric(&metrics, "evtrack_events_dead_lettered_total"), 3.0);
    assert_eq!(metric(&metrics, "evtrack_events_stored_total"), 1.0);
    app.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_503_with_retry_after() {
    let mut env = TestEnv::new(Backend::RedisSqlite);
    env.settings.queue_max_len = 3;
    // API only: nothing drains the stream.
    let app = spawn_app_with(env, Role::Api).await;
    for i in 0..3 {
        json_of(app.post_event(&view(i)).await, 202).await;
    }
    let r = app.post_event(&view(4)).await;
    assert_eq!(
        r.headers().get("retry-after").and_then(|v| v.to_str().ok()),
        Some("1")
    );
    assert_error(&json_of(r, 503).await, "queue_full", None);
    let r = app.post_events(&json!([view(5)])).await;
    assert_error(&json_of(r, 503).await, "queue_full", None);
    // A worker catches up; ingestion resumes.
    let worker = RunningApp::start(app.env.settings.clone(), Role::Worker).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = app.post_event(&view(6)).await;
        if r.status() == 202 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still {}",
            r.status()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    worker.stop().await;
    app.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_means_a_quick_503_and_recovery_without_restart() {
    let mut app = spawn_app(Backend::RedisSqlite).await;
    json_of(app.post_event(&view(0)).await, 202).await;
    app.env.redis.as_mut().unwrap().stop();
    let started = std::time::Instant::now();
    let r = app.post_event(&view(1)).await;
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "answered in {:?}",
        started.elapsed()
    );
    assert_error(&json_of(r, 503).await, "queue_unavailable", None);
    let ready = json_of(app.get("/ready").await, 503).await;
    assert_eq!(ready["checks"]["queue"]["status"], "unavailable");
    assert_eq!(ready["checks"]["store"]["status"], "ok");
    assert!(
        ready["error"]["message"]
            .as_str()
            .unwrap()
            .contains("redis")
    );
    app.env.redis.as_mut().unwrap().restart();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let id = loop {
        let r = app.post_event(&view(2)).await;
        if r.status() == 202 {
            break json_of(r, 202).await["id"].as_str().unwrap().to_owned();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no recovery: {}",
            r.status()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    app.wait_stored("drain", &[id]).await;
    json_of(app.get("/ready").await, 200).await;
    app.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_password_works() {
    let redis = RedisServer::start_tls();
    let mut env = TestEnv::new(Backend::EmbeddedSqlite);
    env.settings.redis_url = Some(redis.url.clone());
    env.settings.redis_ca_cert = redis.ca_cert_path().map(Into::into);
    assert!(redis.url.starts_with("rediss://:"));
    let app = spawn_app_with(env, Role::All).await;
    let body = json_of(app.post_event(&view(3)).await, 202).await;
    app.wait_stored("drain", &[body["id"].as_str().unwrap().to_owned()])
        .await;
    let ready = json_of(app.get("/ready").await, 200).await;
    assert_eq!(ready["checks"]["queue"]["backend"], "redis");
    app.app.stop().await;
    // Without the password the server refuses, and start-up says which setting.
    let mut bad = TestEnv::new(Backend::EmbeddedSqlite).settings;
    bad.redis_url = Some(format!("rediss://:wrong-password@localhost:{}", redis.port));
    bad.redis_ca_cert = redis.ca_cert_path().map(Into::into);
    let err = evtrack::startup::Application::build(bad, Role::All)
        .await
        .err()
        .expect("refused");
    assert_eq!(err.setting, "REDIS_URL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_outage_keeps_events_pending_until_it_returns() {
    // Redis + MongoDB: the store goes away while events keep coming.
    let mut app = spawn_app(Backend::RedisMongo).await;
    app.env.mongo.as_mut().unwrap().stop();
    let mut ids = Vec::new();
    for i in 0..5 {
        let body = json_of(app.post_event(&view(i)).await, 202).await;
        ids.push(body["id"].as_str().unwrap().to_owned());
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut conn = app.env.redis_conn().await;
    let left: u64 = conn.xlen(app.env.stream_key()).await.unwrap();
    assert_eq!(left, 5, "nothing is acknowledged while the store is down");
    let ready = json_of(app.get("/ready").await, 503).await;
    assert_eq!(ready["checks"]["store"]["status"], "unavailable");
    assert_eq!(ready["checks"]["queue"]["status"], "ok");
    assert!(
        ready["error"]["message"]
            .as_str()
            .unwrap()
            .contains("mongodb")
    );
    let r = app.get("/stats?site_id=drain&date=2025-11-23").await;
    assert!(r.headers().contains_key("retry-after"));
    assert_error(&json_of(r, 503).await, "store_unavailable", None);
    app.env.mongo.as_mut().unwrap().restart();
    wait_stored(&*app.store, "drain", &ids).await;
    let dead: u64 = conn.xlen(app.env.dead_key()).await.unwrap();
    assert_eq!(dead, 0, "an outage does not dead-letter events");
    app.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_a_worker_keeps_retrying_are_not_claimed_by_others() {
    let redis = RedisServer::start();
    let config = redis_config(&redis, 1000);
    let queue = RedisQueue::connect(&config).await.unwrap();
    let sent: Vec<_> = (0..2)
        .map(|i| parse_event(view(i), evtrack::event::now_ms()).unwrap())
        .collect();
    queue.enqueue(sent).await.unwrap();
    let idle = Duration::from_millis(400);
    let mut holder = RedisConsumer::connect(&config, consumer_config(idle))
        .await
        .unwrap();
    let mut other = RedisConsumer::connect(&config, consumer_config(idle))
        .await
        .unwrap();
    let mut held = holder.fetch(10).await.unwrap();
    assert_eq!(held.len(), 2);
    // The store is down: the holder keeps the entries and retries them for
    // longer than the claim timeout, while the other worker keeps looking.
    let retrying = tokio::spawn(async move {
        for _ in 0..15 {
            held = holder.release(held, "store down").await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        (held, holder)
    });
    while !retrying.is_finished() {
        assert!(
            other.fetch(10).await.unwrap().is_empty(),
            "taken from a live worker"
        );
    }
    let (held, holder) = retrying.await.unwrap();
    // The holder dies: now they are claimed, and the retries were not
    // counted as deliveries.
    drop((held, holder));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut claimed = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while claimed.len() < 2 && tokio::time::Instant::now() < deadline {
        claimed.extend(other.fetch(10).await.unwrap());
    }
    assert_eq!(claimed.len(), 2);
    assert!(claimed.iter().all(|d| d.attempts == 2));
}

/// The group's consumers as XINFO CONSUMERS lists them: name and pending.
async fn consumers(
    conn: &mut redis::aio::MultiplexedConnection,
    stream: &str,
) -> Vec<(String, usize)> {
    let info: redis::streams::StreamInfoConsumersReply =
        conn.xinfo_consumers(stream, "workers").await.unwrap();
    info.consumers
        .into_iter()
        .map(|c| (c.name, c.pending))
        .collect()
}

/// Entries in the stream and the bytes of their event fields.
async fn payload(
    conn: &mut redis::aio::MultiplexedConnection,
    stream: &str,
) -> (usize, Vec<usize>) {
    let all: redis::streams::StreamRangeReply = conn.xrange_all(stream).await.unwrap();
    let sizes: Vec<usize> = all
        .ids
        .iter()
        .map(|e| match e.map.get("e") {
            Some(redis::Value::BulkString(b)) => b.len(),
            other => panic!("entry without an event: {other:?}"),
        })
        .collect();
    (sizes.len(), sizes)
}

/// An event of about 34 KB (the longest path and 32 of the longest
/// properties), all of one serialized size: the numbers in it have a fixed
/// number of digits.
fn big(i: usize) -> Value {
    let props: serde_json::Map<String, Value> = (0..32)
        .map(|k| (format!("k{k:02}"), json!("x".repeat(1000))))
        .collect();
    json!({"site_id": "bytes", "event_type": "page_view",
           "path": format!("/{i:06}/{}", "p".repeat(2000)), "props": props})
}

fn bigs(from: usize, n: usize) -> Value {
    Value::Array((from..from + n).map(big).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_max_bytes_refuses_a_request_whole_and_ingestion_resumes_once_drained() {
    let mut env = TestEnv::new(Backend::RedisSqlite);
    let limit = evtrack::config::MIN_QUEUE_MAX_BYTES as usize;
    env.settings.queue_max_bytes = limit as u64;
    // Far more entries than the test sends: only the byte limit can bite.
    env.settings.queue_max_len = 1_000_000;
    // API only: nothing drains the stream.
    let app = spawn_app_with(env, Role::Api).await;
    let mut conn = app.env.redis_conn().await;
    let stream = app.env.stream_key();

    let mut sent = 0;
    json_of(app.post_events(&bigs(sent, 30)).await, 202).await;
    sent += 30;
    let (_, sizes) = payload(&mut conn, &stream).await;
    let size = sizes[0];
    assert!(sizes.iter().all(|&s| s == size), "{sizes:?}");
    // Fill, 30 events at a time, while that leaves room for at least one
    // more event: then between 1 and 30 events still fit.
    while sent * size + 30 * size <= limit - size {
        json_of(app.post_events(&bigs(sent, 30)).await, 202).await;
        sent += 30;
    }
    let room = (limit - sent * size) / size;
    assert!((1..=30).contains(&room), "{room}");

    // One event more than fits: refused whole, although `room` would fit.
    let r = app.post_events(&bigs(sent, room + 1)).await;
    assert_eq!(
        r.headers().get("retry-after").and_then(|v| v.to_str().ok()),
        Some("1")
    );
    assert_error(&json_of(r, 503).await, "queue_full", None);
    let (entries, _) = payload(&mut conn, &stream).await;
    assert_eq!(entries, sent, "nothing of the refused request was queued");
    // Exactly what fits is accepted; then not one event more.
    json_of(app.post_events(&bigs(sent, room)).await, 202).await;
    sent += room;
    let r = app.post_event(&big(sent)).await;
    assert_error(&json_of(r, 503).await, "queue_full", None);
    let (entries, sizes) = payload(&mut conn, &stream).await;
    assert_eq!(entries, sent);
    let queued: usize = sizes.iter().sum();
    assert!(queued <= limit, "{queued} bytes queued, limit {limit}");
    assert!(queued + size > limit);
    // Operators see the bytes waiting.
    let metrics = app.metrics().await;
    assert_eq!(
        metric(&metrics, "evtrack_queue_depth_bytes"),
        queued as f64,
        "{metrics}"
    );

    // A worker drains the stream; the bytes it acknowledged are taken off
    // the count, and ingestion resumes.
    let worker = RunningApp::start(app.env.settings.clone(), Role::Worker).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let left: u64 = conn.xlen(&stream).await.unwrap();
        if left == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{left} left");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Counted down by the acknowledgements themselves, not reset by the next
    // enqueue.
    let counted: Option<u64> = conn
        .get(format!("{}bytes", app.env.settings.redis_prefix))
        .await
        .unwrap();
    assert_eq!(counted.unwrap_or(0), 0);
    let metrics = app.metrics().await;
    assert_eq!(metric(&metrics, "evtrack_queue_depth_bytes"), 0.0);
    assert_eq!(app.store.count_all().await.unwrap(), sent as u64);
    json_of(app.post_events(&bigs(sent, 30)).await, 202).await;
    worker.stop().await;
    app.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_byte_count_left_behind_by_a_lost_stream_does_not_keep_the_queue_full() {
    let env = TestEnv::new(Backend::RedisSqlite);
    let app = spawn_app_with(env, Role::Api).await;
    let mut conn = app.env.redis_conn().await;
    json_of(app.post_event(&view(0)).await, 202).await;
    // The stream goes away without its counter (deleted by hand, evicted),
    // and the counter says the queue is full.
    let _: () = conn.del(app.env.stream_key()).await.unwrap();
    let full = app.env.settings.queue_max_bytes;
    let _: () = conn
        .set(format!("{}bytes", app.env.settings.redis_prefix), full)
        .await
        .unwrap();
    json_of(app.post_event(&view(1)).await, 202).await;
    let (entries, sizes) = payload(&mut conn, &app.env.stream_key()).await;
    assert_eq!(entries, 1);
    let metrics = app.metrics().await;
    assert_eq!(
        metric(&metrics, "evtrack_queue_depth_bytes"),
        sizes[0] as f64
    );
    app.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dead_letter_stream_keeps_its_newest_entries_and_counts_what_it_dropped() {
    let mut env = TestEnv::new(Backend::RedisSqlite);
    env.settings.dead_letter_max_len = 3;
    let mut conn = env.redis_conn().await;
    let stream = env.stream_key();
    let mut ids = Vec::new();
    for i in 0..7 {
        let id: String = conn
            .xadd(&stream, "*", &[("e", format!("not json {i}"))])
            .await
            .unwrap();
        ids.push(id);
    }
    let app = spawn_app_with(env, Role::All).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let metrics = app.metrics().await;
        let left: u64 = conn.xlen(&stream).await.unwrap();
        if left == 0 && metric(&metrics, "evtrack_events_dead_lettered_total") == 7.0 {
            break metrics;
        }
        assert!(tokio::time::Instant::now() < deadline, "{left} left");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let dead: redis::streams::StreamRangeReply = conn.xrange_all(app.env.dead_key()).await.unwrap();
    let kept: Vec<String> = dead
        .ids
        .iter()
        .map(|e| e.get::<String>("source_id").unwrap())
        .collect();
    assert_eq!(kept, ids[4..], "the newest three are kept, oldest first");
    assert_eq!(
        dead.ids[2].get::<String>("raw.e").as_deref(),
        Some("not json 6")
    );
    assert_eq!(
        metric(&metrics, "evtrack_dead_letters_trimmed_total"),
        4.0,
        "{metrics}"
    );
    app.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_stops_leaves_the_consumer_group() {
    let app = spawn_app(Backend::RedisSqlite).await;
    let body = json_of(app.post_event(&view(0)).await, 202).await;
    app.wait_stored("drain", &[body["id"].as_str().unwrap().to_owned()])
        .await;
    let mut conn = app.env.redis_conn().await;
    let stream = app.env.stream_key();
    // The worker acknowledges right after the store has the event.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let before = consumers(&mut conn, &stream).await;
        assert_eq!(before.len(), 1, "{before:?}");
        if before[0].1 == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{before:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    app.app.stop().await;
    assert_eq!(consumers(&mut conn, &stream).await, []);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_with_entries_pending_stays_in_the_group_until_they_are_taken_over() {
    let mut env = TestEnv::new(Backend::RedisMongo);
    env.settings.worker_claim_idle_ms = 500;
    let mut app = spawn_app_with(env, Role::All).await;
    app.env.mongo.as_mut().unwrap().stop();
    let body = json_of(
        app.post_events(&json!([view(0), view(1), view(2)])).await,
        202,
    )
    .await;
    let ids = ids_of(&body);
    let mut conn = app.env.redis_conn().await;
    let stream = app.env.stream_key();
    // The worker has read them and keeps retrying the store.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while consumers(&mut conn, &stream).await.first().map(|c| c.1) != Some(3) {
        assert!(tokio::time::Instant::now() < deadline, "never pending");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let settings = app.env.settings.clone();
    app.app.stop().await;
    // Leaving would drop the entries from the group's pending list: no
    // worker could claim them, and they would never be stored.
    let after = consumers(&mut conn, &stream).await;
    assert_eq!(after.len(), 1, "{after:?}");
    assert_eq!(after[0].1, 3, "{after:?}");
    let stopped = after[0].0.clone();

    app.env.mongo.as_mut().unwrap().restart();
    let worker = RunningApp::start(settings, Role::Worker).await;
    wait_stored(&*app.store, "drain", &ids).await;
    // Once its entries were taken over, the stopped worker's consumer is
    // removed as idle; the live worker's stays.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = consumers(&mut conn, &stream).await;
        if now.len() == 1 && now[0].0 != stopped {
            assert_eq!(now[0].1, 0);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{now:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    worker.stop().await;
    assert_eq!(consumers(&mut conn, &stream).await, []);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_consumers_are_removed_but_not_before_their_pending_entries_are_taken_over() {
    let mut env = TestEnv::new(Backend::RedisSqlite);
    env.settings.worker_claim_idle_ms = 200;
    // Two entries per claim: the dead consumer's twenty take ten passes.
    env.settings.worker_batch_size = 2;
    let api = spawn_app_with(env, Role::Api).await;
    let mut conn = api.env.redis_conn().await;
    let stream = api.env.stream_key();
    // A consumer left behind with nothing pending.
    let created: u64 = redis::cmd("XGROUP")
        .arg("CREATECONSUMER")
        .arg(&stream)
        .arg("workers")
        .arg("stale")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(created, 1);
    // A worker that read twenty entries and died.
    let batch: Vec<Value> = (0..20).map(view).collect();
    let ids = ids_of(&json_of(api.post_events(&Value::Array(batch)).await, 202).await);
    let read: redis::streams::StreamReadReply = conn
        .xread_options(
            &[&stream],
            &[">"],
            &redis::streams::StreamReadOptions::default()
                .group("workers", "dead")
                .count(100),
        )
        .await
        .unwrap();
    assert_eq!(read.keys[0].ids.len(), 20);
    // Both idle for longer than twice the claim timeout.
    tokio::time::sleep(Duration::from_millis(600)).await;

    let worker = RunningApp::start(api.env.settings.clone(), Role::Worker).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut seen_dead_kept = false;
    let live = loop {
        let now = consumers(&mut conn, &stream).await;
        let has = |name: &str| now.iter().find(|c| c.0 == name).map(|c| c.1);
        if has("stale").is_none() && has("dead").is_some_and(|pending| pending > 0) {
            seen_dead_kept = true;
        }
        if has("stale").is_none() && has("dead").is_none() {
            break now;
        }
        assert!(tokio::time::Instant::now() < deadline, "{now:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(
        seen_dead_kept,
        "the idle consumer with nothing pending went first; the one with entries pending stayed"
    );
    // The dead worker's entries were all taken over before it was removed:
    // removed earlier, the rest would have left the pending list for good.
    api.wait_stored("drain", &ids).await;
    assert_eq!(live.len(), 1, "only the live worker: {live:?}");
    worker.stop().await;
    api.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_acknowledged_by_two_workers_after_a_claim_free_their_bytes_once() {
    let redis = RedisServer::start();
    let config = redis_config(&redis, 1000);
    let queue = RedisQueue::connect(&config).await.unwrap();
    let event = |i| parse_event(view(i), evtrack::event::now_ms()).unwrap();
    queue.enqueue(vec![event(0), event(1)]).await.unwrap();
    let idle = Duration::from_millis(200);
    let mut slow = RedisConsumer::connect(&config, consumer_config(idle))
        .await
        .unwrap();
    let held = slow.fetch(10).await.unwrap();
    assert_eq!(held.len(), 2);
    // One more event, which nobody reads: what should stay counted.
    queue.enqueue(vec![event(2)]).await.unwrap();
    let waiting = queue.depth().await.unwrap();
    let per_event = waiting.bytes.unwrap() / 3;
    // The first worker is slow, not dead: another takes its entries over,
    // and both acknowledge them.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut other = RedisConsumer::connect(&config, consumer_config(idle))
        .await
        .unwrap();
    let claimed = other.fetch(2).await.unwrap();
    assert_eq!(claimed.len(), 2);
    slow.ack(held).await.unwrap();
    other.ack(claimed).await.unwrap();
    let depth = queue.depth().await.unwrap();
    assert_eq!(depth.events, 1);
    assert_eq!(
        depth.bytes,
        Some(per_event),
        "the two entries' bytes were taken off once"
    );
}
