//! The queue conformance suite: every queue, on a real backend, hands over
//! what was enqueued, in order, and forgets it once acknowledged.

use std::sync::Arc;
use std::time::Duration;

use evtrack::event::{Event, parse_event};
use evtrack::queue::embedded;
use evtrack::queue::redis::{ConsumerConfig, RedisConfig, RedisConsumer, RedisQueue};
use evtrack::queue::{Consumer, Delivery, Queue};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::backends::RedisServer;

fn events(n: usize) -> Vec<Event> {
    (0..n)
        .map(|i| {
            parse_event(
                json!({"site_id": "q", "event_type": "page_view", "path": format!("/{i}")}),
                0,
            )
            .unwrap()
        })
        .collect()
}

async fn fetch_n<C: Consumer>(consumer: &mut C, n: usize) -> Vec<Delivery<C::Tag>> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while got.len() < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {n} delivered",
            got.len()
        );
        got.extend(consumer.fetch(n - got.len()).await.expect("fetch"));
    }
    got
}

/// Enqueue (concurrently: the embedded queue answers only after the ack),
/// fetch in order, ack, and see nothing more.
async fn hands_over_in_order_and_forgets_acked<C: Consumer>(
    queue: Arc<dyn Queue>,
    mut consumer: C,
) {
    let sent = events(5);
    let producer = {
        let queue = Arc::clone(&queue);
        let sent = sent.clone();
        tokio::spawn(async move { queue.enqueue(sent).await })
    };
    let got = fetch_n(&mut consumer, 5).await;
    let received: Vec<Event> = got
        .iter()
        .map(|d| d.event.clone().expect("valid"))
        .collect();
    assert_eq!(received, sent);
    assert!(got.iter().all(|d| d.attempts == 1));
    // Fetch may hand out fewer than asked.
    consumer.ack(got).await.expect("ack");
    producer
        .await
        .unwrap()
        .expect("enqueue succeeds once acknowledged");
    let more = consumer.fetch(10).await.expect("fetch");
    assert!(more.is_empty(), "acknowledged entries are gone");
    queue.check().await.expect("queue answers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_queue_conforms() {
    let (queue, consumer) = embedded::channel(100, CancellationToken::new());
    hands_over_in_order_and_forgets_acked(Arc::new(queue), consumer).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_queue_conforms() {
    let redis = RedisServer::start();
    let config = redis_config(&redis, 1000);
    let queue = RedisQueue::connect(&config).await.unwrap();
    let consumer = RedisConsumer::connect(&config, consumer_config(Duration::from_secs(30)))
        .await
        .unwrap();
    hands_over_in_order_and_forgets_acked(Arc::new(queue), consumer).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_requests_are_never_split_across_commits() {
    let (queue, mut consumer) = embedded::channel(100, CancellationToken::new());
    let queue = Arc::new(queue);
    let first = events(7);
    let p1 = {
        let (q, s) = (Arc::clone(&queue), first.clone());
        tokio::spawn(async move { q.enqueue(s).await })
    };
    // The first request is in the channel before the second.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let p2 = {
        let q = Arc::clone(&queue);
        tokio::spawn(async move { q.enqueue(events(2)).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    // A batch of at most 4 still takes the 7-event request whole.
    let batch = consumer.fetch(4).await.unwrap();
    let got: Vec<Event> = batch.iter().map(|d| d.event.clone().unwrap()).collect();
    assert_eq!(got, first);
    consumer.ack(batch).await.unwrap();
    p1.await.unwrap().unwrap();
    let rest = fetch_n(&mut consumer, 2).await;
    consumer.ack(rest).await.unwrap();
    p2.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_requests_not_started_within_a_second_are_refused_not_stored() {
    let (queue, mut consumer) = embedded::channel(100, CancellationToken::new());
    let started = std::time::Instant::now();
    let producer = tokio::spawn(async move { queue.enqueue(events(1)).await });
    // The writer is busy elsewhere for longer than the bound.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let batch = consumer.fetch(10).await.unwrap();
    assert!(
        batch.is_empty(),
        "an expired request is not handed to the store"
    );
    assert_eq!(
        producer.await.unwrap(),
        Err(evtrack::queue::QueueError::Full)
    );
    assert!(started.elapsed() < Duration::from_secs(3));
}

/// A writer that never comes (stuck on a stalled disk): the request is
/// still answered within the bound, and withdrawn, so a writer that comes
/// back later does not store what its client was told was refused.
#[tokio::test(start_paused = true)]
async fn embedded_enqueue_is_answered_within_a_second_when_the_writer_never_takes_it() {
    let (queue, mut consumer) = embedded::channel(100, CancellationToken::new());
    let started = tokio::time::Instant::now();
    let answer = tokio::time::timeout(Duration::from_secs(60), queue.enqueue(events(3))).await;
    assert_eq!(answer, Ok(Err(evtrack::queue::QueueError::Full)));
    assert_eq!(started.elapsed(), embedded::MAX_WAIT);
    let batch = consumer.fetch(10).await.unwrap();
    assert!(batch.is_empty(), "a withdrawn request is not stored");
    assert_eq!(queue.depth().await.unwrap().events, 0);
}

/// A commit that never ends: the request the writer took is answered
/// within the commit bound, not held forever.
#[tokio::test(start_paused = true)]
async fn embedded_enqueue_is_answered_within_the_bound_when_its_commit_stalls() {
    let (queue, mut consumer) = embedded::channel(100, CancellationToken::new());
    let started = tokio::time::Instant::now();
    let producer = tokio::spawn(async move { queue.enqueue(events(2)).await });
    let held = fetch_n(&mut consumer, 2).await;
    let answer = tokio::time::timeout(Duration::from_secs(60), producer)
        .await
        .expect("answered within a minute")
        .unwrap();
    assert!(
        matches!(answer, Err(evtrack::queue::QueueError::StoreUnavailable(_))),
        "{answer:?}"
    );
    assert_eq!(
        started.elapsed(),
        embedded::MAX_WAIT + embedded::MAX_COMMIT_WAIT
    );
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_queue_closes_after_the_api_is_done() {
    let done = CancellationToken::new();
    let (queue, mut consumer) = embedded::channel(100, done.clone());
    let producer = tokio::spawn(async move { queue.enqueue(events(2)).await });
    let got = fetch_n(&mut consumer, 2).await;
    consumer.ack(got).await.unwrap();
    producer.await.unwrap().unwrap();
    done.cancel();
    assert_eq!(
        consumer.fetch(10).await.unwrap_err(),
        evtrack::queue::QueueError::Closed
    );
}

/// A worker keeping its entries alive must not take back those another
/// worker has claimed meanwhile (its refresh came late): that worker is
/// storing them, and taking them back would have them stored twice over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeping_entries_alive_leaves_alone_those_another_worker_claimed() {
    let redis = RedisServer::start();
    let config = redis_config(&redis, 1000);
    let queue = RedisQueue::connect(&config).await.unwrap();
    let mut worker = RedisConsumer::connect(&config, consumer_config(Duration::from_secs(30)))
        .await
        .unwrap();
    queue.enqueue(events(4)).await.unwrap();
    let held = fetch_n(&mut worker, 4).await;
    // Another worker took two of them over.
    let stream = format!("{}events", config.prefix);
    let mut conn = redis::Client::open(config.url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let taken: Vec<String> = redis::cmd("XCLAIM")
        .arg(&stream)
        .arg(evtrack::queue::redis::GROUP)
        .arg("other-worker")
        .arg(0)
        .arg(&held[0].tag.id)
        .arg(&held[1].tag.id)
        .arg("JUSTID")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(taken.len(), 2);
    worker.keep_alive(&held).await;
    let owners: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
        .arg(&stream)
        .arg(evtrack::queue::redis::GROUP)
        .arg("-")
        .arg("+")
        .arg(10)
        .query_async(&mut conn)
        .await
        .unwrap();
    let owner_of = |id: &str| {
        owners
            .iter()
            .find(|o| o.0 == id)
            .map(|o| o.1.clone())
            .unwrap()
    };
    assert_eq!(owner_of(&held[0].tag.id), "other-worker");
    assert_eq!(owner_of(&held[1].tag.id), "other-worker");
    assert_eq!(owner_of(&held[2].tag.id), worker.name());
    assert_eq!(owner_of(&held[3].tag.id), worker.name());
}

pub fn redis_config(redis: &RedisServer, max_len: u64) -> RedisConfig {
    RedisConfig {
        url: redis.url.clone(),
        ca_cert: None,
        prefix: format!("q-{}:", uuid::Uuid::now_v7().simple()),
        partitions: 1,
        max_len,
        max_bytes: evtrack::config::DEFAULT_QUEUE_MAX_BYTES,
    }
}

pub fn consumer_config(claim_idle: Duration) -> ConsumerConfig {
    ConsumerConfig {
        claim_idle,
        dead_letter_max_len: evtrack::config::DEFAULT_DEAD_LETTER_MAX_LEN,
    }
}
