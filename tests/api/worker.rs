//! The worker against a real Redis stream and a real SQLite store, driven
//! through `worker::run` with a store that writes slowly.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::NaiveDate;
use evtrack::event::{Event, now_ms, parse_event};
use evtrack::metrics::Metrics;
use evtrack::queue::Queue;
use evtrack::queue::redis::{RedisConsumer, RedisQueue};
use evtrack::stats::StatsQuery;
use evtrack::store::sqlite::SqliteStore;
use evtrack::store::{EventSink, InsertOutcome, StoreAdmin, StoreError};
use evtrack::worker::{self, Liveness, WorkerConfig};
use redis::AsyncCommands;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::helpers::{Backend, TestEnv};

/// A real store whose writes take `delay` longer (a busy disk, a slow
/// MongoDB, a batch larger than usual), and fail until `down_until` (an
/// outage).
struct SlowWrites {
    inner: SqliteStore,
    delay: Duration,
    down_until: tokio::time::Instant,
}

#[async_trait]
impl EventSink for SlowWrites {
    async fn insert(&self, events: &[Event]) -> Result<Vec<InsertOutcome>, StoreError> {
        tokio::time::sleep(self.delay).await;
        if tokio::time::Instant::now() < self.down_until {
            return Err(StoreError::Unavailable("down for the test".into()));
        }
        self.inner.insert(events).await
    }
}

/// A claim timeout far below the store's write time: the worker writing a
/// batch keeps its entries alive, so the other worker does not take them as
/// a dead worker's, they are not delivered over and over, and no good event
/// ends up dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_slower_than_the_claim_timeout_dead_letter_nothing() {
    two_workers_under_a_short_claim_timeout(Duration::from_millis(1_500), Duration::ZERO).await;
}

/// The same through a store outage of several seconds: between retries the
/// worker waits longer than the claim timeout, and still keeps its entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_longer_than_the_claim_timeout_dead_letters_nothing() {
    two_workers_under_a_short_claim_timeout(Duration::ZERO, Duration::from_secs(4)).await;
}

async fn two_workers_under_a_short_claim_timeout(delay: Duration, outage: Duration) {
    const N: usize = 300;
    let mut env = TestEnv::new(Backend::RedisSqlite);
    env.settings.worker_claim_idle_ms = 300;
    let redis = env.settings.redis().unwrap();
    let store = Arc::new(SlowWrites {
        inner: SqliteStore::open(&env.settings.data_dir).unwrap(),
        delay,
        down_until: tokio::time::Instant::now() + outage,
    });
    // A claim counts as a delivery: one claim of a batch that is still being
    // written would dead-letter it.
    let config = WorkerConfig {
        batch_size: 100,
        max_attempts: 1,
    };
    let shutdown = CancellationToken::new();
    let metrics = Arc::new(Metrics::new());
    let mut workers = Vec::new();
    for _ in 0..2 {
        let consumer = RedisConsumer::connect(&redis, env.settings.consumer())
            .await
            .unwrap();
        workers.push(tokio::spawn(worker::run(
            consumer,
            Arc::clone(&store) as Arc<dyn EventSink>,
            config.clone(),
            Arc::clone(&metrics),
            Arc::new(Liveness::new(Duration::from_secs(60))),
            shutdown.clone(),
        )));
    }
    let queue = RedisQueue::connect(&redis).await.unwrap();
    let now = now_ms();
    let events: Vec<Event> = (0..N)
        .map(|i| {
            parse_event(
                json!({"site_id": "slow", "event_type": "page_view", "event_id": format!("e{i}"),
                       "path": format!("/{}", i % 7), "userid": format!("u{}", i % 11),
                       "timestamp": "2025-11-23T12:00:00Z"}),
                now,
            )
            .unwrap()
        })
        .collect();
    for chunk in events.chunks(100) {
        queue.enqueue(chunk.to_vec()).await.unwrap();
    }

    let mut conn = env.redis_conn().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while conn.xlen::<_, u64>(env.stream_key()).await.unwrap() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not drained in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let dead: u64 = conn.xlen(env.dead_key()).await.unwrap();
    assert_eq!(dead, 0, "good events were dead-lettered");
    let ids: Vec<String> = (0..N).map(|i| format!("e{i}")).collect();
    assert_eq!(store.inner.count_ids("slow", &ids).await.unwrap(), N as u64);
    crate::helpers::fold_all(&store.inner).await;
    let query = StatsQuery {
        site_id: "slow".parse().expect("valid"),
        date: NaiveDate::from_ymd_opt(2025, 11, 23).unwrap(),
        event_type: "page_view".parse().expect("valid"),
        limit: 10,
    };
    let stats = evtrack::stats::compute(&store.inner, &query).await.unwrap();
    assert_eq!(stats, evtrack::stats::aggregate(&events, &query));
    // No worker took over another's batch.
    let text = metrics.encode();
    assert_eq!(
        crate::helpers::metric(&text, "evtrack_events_duplicate_total"),
        0.0,
        "{text}"
    );
    shutdown.cancel();
    for w in workers {
        w.await.unwrap();
    }
}
