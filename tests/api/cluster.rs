//! The Redis queue split into partitions, on a real 3-master Redis Cluster
//! (and on one server): where the partitions live, requests kept whole
//! within the limits, a change of the number of partitions, and the
//! service end to end. The exactly-once fault test on a cluster is in
//! `faults`.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use evtrack::event::{Event, parse_event};
use evtrack::queue::redis::{RedisConfig, RedisConsumer, RedisQueue};
use evtrack::queue::{Consumer, Queue, QueueError};
use redis::streams::StreamRangeReply;
use serde_json::json;

use crate::backends::{RedisCluster, RedisServer};
use crate::helpers::Backend;
use crate::queue::consumer_config;

fn config(url: &str, partitions: usize, max_len: u64) -> RedisConfig {
    RedisConfig {
        url: url.to_owned(),
        ca_cert: None,
        prefix: format!("c-{}:", uuid::Uuid::now_v7().simple()),
        partitions,
        max_len,
        max_bytes: evtrack::config::DEFAULT_QUEUE_MAX_BYTES,
    }
}

/// `n` events of request `r`, told apart by their paths.
fn request(r: usize, n: usize) -> Vec<Event> {
    (0..n)
        .map(|i| {
            let body =
                json!({"site_id": "c", "event_type": "page_view", "path": format!("/{r}/{i}")});
            parse_event(body, 0).unwrap()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_spread_over_the_masters_and_requests_stay_whole_within_the_limit() {
    let cluster = RedisCluster::start(3);
    let config = config(&cluster.url, 6, 60);
    let queue = RedisQueue::connect(&config).await.unwrap();
    let layout = queue.layout().clone();

    // Two partitions on each master.
    let mut per_node: HashMap<u16, usize> = HashMap::new();
    for keys in &layout.partitions {
        let node = cluster.node_of(&keys.stream);
        for other in [&keys.bytes, &keys.dead] {
            assert_eq!(
                cluster.node_of(other),
                node,
                "{other} beside {}",
                keys.stream
            );
        }
        *per_node.entry(node).or_default() += 1;
    }
    assert_eq!(per_node.len(), 3, "{per_node:?}");
    assert!(per_node.values().all(|&n| n == 2), "{per_node:?}");

    // Requests of 7 until the queue refuses: each partition holds at most
    // 60 / 6 = 10 entries, so one request fits per partition.
    let mut accepted = 0;
    let mut refused = 0;
    for r in 0..10 {
        match queue.enqueue(request(r, 7)).await {
            Ok(()) => accepted += 1,
            Err(QueueError::Full) => refused += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!((accepted, refused), (6, 4), "one request per partition");

    // Every request whole in one partition, every partition used, the
    // queue within its limit.
    let mut conn = evtrack::queue::redis::connect(&config, Duration::from_secs(5))
        .await
        .unwrap();
    let mut streams_of: HashMap<String, HashSet<String>> = HashMap::new();
    let mut total = 0;
    for keys in &layout.partitions {
        let entries: StreamRangeReply = redis::cmd("XRANGE")
            .arg(&keys.stream)
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(!entries.ids.is_empty(), "{} is empty", keys.stream);
        for entry in &entries.ids {
            let Some(redis::Value::BulkString(json)) = entry.map.get("e") else {
                panic!("entry without an event");
            };
            let e: Event = serde_json::from_slice(json).unwrap();
            let path = e.path.unwrap_or_default();
            let r = path.split('/').nth(1).unwrap_or_default().to_owned();
            streams_of.entry(r).or_default().insert(keys.stream.clone());
            total += 1;
        }
    }
    assert_eq!(total, 42);
    assert_eq!(streams_of.len(), 6);
    assert!(streams_of.values().all(|s| s.len() == 1), "{streams_of:?}");

    // One consumer drains every partition, and the queue is empty after.
    let mut consumer = RedisConsumer::connect(&config, consumer_config(Duration::from_secs(30)))
        .await
        .unwrap();
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while got.len() < 42 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of 42",
            got.len()
        );
        got.extend(consumer.fetch(100).await.unwrap());
    }
    consumer.ack(got).await.unwrap();
    assert_eq!(queue.depth().await.unwrap().events, 0);
    queue.enqueue(request(99, 7)).await.expect("room again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_number_of_partitions_changes_only_once_the_queue_is_empty() {
    let redis = RedisServer::start();
    let one = config(&redis.url, 1, 1000);
    let three = RedisConfig {
        partitions: 3,
        ..one.clone()
    };
    let queue = RedisQueue::connect(&one).await.unwrap();
    queue.enqueue(request(0, 3)).await.unwrap();
    let refused = RedisQueue::connect(&three).await.err().expect("refused");
    assert!(
        refused.contains("QUEUE_PARTITIONS is 3") && refused.contains("holds 3 events"),
        "{refused}"
    );
    assert!(
        RedisConsumer::connect(&three, consumer_config(Duration::from_secs(30)))
            .await
            .is_err()
    );

    // Drained with the old number, then the new one is taken.
    let mut consumer = RedisConsumer::connect(&one, consumer_config(Duration::from_secs(30)))
        .await
        .unwrap();
    let got = consumer.fetch(10).await.unwrap();
    assert_eq!(got.len(), 3);
    consumer.ack(got).await.unwrap();
    let queue = RedisQueue::connect(&three).await.unwrap();
    assert_eq!(queue.layout().partitions.len(), 3);
    for r in 0..3 {
        queue.enqueue(request(r, 2)).await.unwrap();
    }
    let mut consumer = RedisConsumer::connect(&three, consumer_config(Duration::from_secs(30)))
        .await
        .unwrap();
    let mut got = Vec::new();
    while got.len() < 6 {
        got.extend(consumer.fetch(10).await.unwrap());
    }
    let partitions: HashSet<usize> = got.iter().map(|d| d.tag.partition).collect();
    assert_eq!(partitions.len(), 3, "round robin over the partitions");
    // And the old number is refused in turn while these are pending.
    assert!(RedisQueue::connect(&one).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_on_a_cluster() {
    crate::lifecycle::health_and_readiness(Backend::RedisClusterSqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_stored_through_a_cluster() {
    crate::ingest::the_design_example_is_accepted_and_stored(Backend::RedisClusterSqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_stored_through_a_cluster() {
    crate::ingest::batches_accept_good_events_and_report_bad_ones(Backend::RedisClusterSqlite)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn salts_live_on_a_cluster() {
    crate::events_api::salts_rotate_at_midnight_and_yesterdays_is_deleted_after_the_grace_period(
        Backend::RedisClusterSqlite,
    )
    .await;
}
