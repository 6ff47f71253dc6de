//! The worker: moves events from the queue into the store, in batches.
//!
//! [`process_batch`] is the unit of work (one batch: store, then acknowledge,
//! dead-letter or keep for retry) and can be called directly by tests;
//! [`run`] loops over it until shutdown.
//!
//! Order matters: events are acknowledged only after the store has them, so a
//! crash between the two redelivers them, and the idempotent store makes the
//! redelivery harmless (at-least-once delivery, exactly-once storage).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::event::Event;
use crate::metrics::Metrics;
use crate::queue::{Consumer, Delivery, QueueError};
use crate::store::{EventSink, InsertOutcome, StoreError};

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Most events written to the store in one go.
    pub batch_size: usize,
    /// Attempts after which an event the store keeps refusing is dead-lettered.
    pub max_attempts: u32,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            batch_size: crate::config::DEFAULT_BATCH_SIZE,
            max_attempts: 5,
        }
    }
}

/// What became of one batch.
#[derive(Debug)]
pub struct BatchOutcome<T> {
    /// Stored now or earlier (duplicates), and acknowledged.
    pub stored: usize,
    /// Of `stored`, those the store already had (redeliveries).
    pub duplicates: usize,
    /// How long the store write took, when there was one.
    pub store_time: Option<Duration>,
    pub dead_lettered: usize,
    /// Older dead letters the queue dropped to make room for these.
    pub dead_letters_trimmed: u64,
    /// Not stored; to be tried again.
    pub retry: Vec<Delivery<T>>,
    /// Set when the store failed as a whole (every entry is in `retry`).
    pub store_error: Option<StoreError>,
    /// Set when acknowledging failed: the events are stored and will be
    /// redelivered, which the store absorbs.
    pub queue_error: Option<QueueError>,
}

/// Stores one batch and settles each entry with the queue.
pub async fn process_batch<C: Consumer>(
    consumer: &mut C,
    store: &dyn EventSink,
    batch: Vec<Delivery<C::Tag>>,
    config: &WorkerConfig,
) -> BatchOutcome<C::Tag> {
    let mut dead = Vec::new();
    let mut good = Vec::with_capacity(batch.len());
    for d in batch {
        match &d.event {
            Err(reason) => {
                let reason = reason.clone();
                dead.push((d, reason));
            }
            Ok(_) if d.attempts > config.max_attempts => {
                let reason = format!("delivered {} times without being stored", d.attempts);
                dead.push((d, reason));
            }
            Ok(_) => good.push(d),
        }
    }
    let mut outcome = BatchOutcome {
        stored: 0,
        duplicates: 0,
        store_time: None,
        dead_lettered: 0,
        dead_letters_trimmed: 0,
        retry: Vec::new(),
        store_error: None,
        queue_error: None,
    };
    if !good.is_empty() {
        let events: Vec<_> = good
            .iter()
            .filter_map(|d| d.event.as_ref().ok().cloned())
            .collect();
        let started = Instant::now();
        let inserted = write_keeping_alive(consumer, store, &events, &good).await;
        outcome.store_time = Some(started.elapsed());
        match inserted {
            Err(e) => {
                outcome.retry = good;
                outcome.store_error = Some(e);
            }
            Ok(outcomes) => {
                let mut stored = Vec::with_capacity(good.len());
                for (mut d, result) in good.into_iter().zip(outcomes) {
                    match result {
                        InsertOutcome::Inserted => stored.push(d),
                        // An erased person's late event is done with, as a
                        // redelivered one is: acknowledged, not new.
                        InsertOutcome::Duplicate | InsertOutcome::Erased => {
                            outcome.duplicates += 1;
                            stored.push(d);
                        }
                        InsertOutcome::Failed(reason) if d.attempts >= config.max_attempts => {
                            dead.push((d, reason))
                        }
                        InsertOutcome::Failed(reason) => {
                            tracing::warn!(attempts = d.attempts, %reason, "store refused an event; will retry");
                            d.attempts += 1;
                            outcome.retry.push(d);
                        }
                    }
                }
                outcome.stored = stored.len();
                if let Err(e) = consumer.ack(stored).await {
                    outcome.queue_error = Some(e);
                }
            }
        }
    }
    if !dead.is_empty() {
        outcome.dead_lettered = dead.len();
        for (_, reason) in &dead {
            tracing::warn!(%reason, "dead-lettering an entry");
        }
        match consumer.dead_letter(dead).await {
            Ok(trimmed) => outcome.dead_letters_trimmed = trimmed,
            Err(e) => {
                // Not acknowledged: the entries stay pending and come back.
                outcome.dead_lettered = 0;
                outcome.queue_error = Some(e);
            }
        }
    }
    outcome
}

/// Writes `events` (those of `deliveries`) to the store. While the write
/// runs, the queue is told now and then that the entries are still being
/// worked on ([`Consumer::keep_alive`]), so that a slow write is not taken
/// for a dead worker whatever the claim timeout. A write is given up after
/// [`MAX_STORE_WRITE`] (a hung connection must not hold its entries for
/// ever) and counts as a store failure. Checks that the store kept its
/// contract of one outcome per event.
async fn write_keeping_alive<C: Consumer>(
    consumer: &mut C,
    store: &dyn EventSink,
    events: &[Event],
    deliveries: &[Delivery<C::Tag>],
) -> Result<Vec<InsertOutcome>, StoreError> {
    let write = async {
        tokio::time::timeout(MAX_STORE_WRITE, store.insert(events))
            .await
            .unwrap_or_else(|_| {
                Err(StoreError::Unavailable(format!(
                    "the store did not finish a write within {} s",
                    MAX_STORE_WRITE.as_secs()
                )))
            })
    };
    tokio::pin!(write);
    let result = match consumer.keep_alive_every() {
        None => write.await,
        Some(every) => {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    result = &mut write => break result,
                    _ = tick.tick() => consumer.keep_alive(deliveries).await,
                }
            }
        }
    };
    match result {
        Ok(outcomes) if outcomes.len() != events.len() => Err(StoreError::Unavailable(format!(
            "the store answered {} outcomes for {} events",
            outcomes.len(),
            events.len()
        ))),
        other => other,
    }
}

/// Longest a store write may take before the worker gives up on it and
/// retries (the store is idempotent); far above any healthy batch write.
pub const MAX_STORE_WRITE: Duration = Duration::from_secs(120);

/// When the worker last completed a poll, for `/health`: a worker that
/// cannot read its queue or write its store stops beating, and once it has
/// not beaten for the stall bound the process reports itself unhealthy, so a
/// supervisor notices a process that looks alive but moves nothing.
#[derive(Debug)]
pub struct Liveness {
    started: tokio::time::Instant,
    /// Milliseconds after `started` of the last beat.
    last_ms: AtomicU64,
    stall: Duration,
}

impl Liveness {
    pub fn new(stall: Duration) -> Self {
        Self {
            started: tokio::time::Instant::now(),
            last_ms: AtomicU64::new(0),
            stall,
        }
    }

    /// A poll completed: the queue answered, and whatever it handed out was
    /// settled with the store.
    pub fn beat(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// How long since the last beat, when that is longer than the bound.
    pub fn stalled_for(&self) -> Option<Duration> {
        let since = self
            .started
            .elapsed()
            .saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::Relaxed)));
        (since > self.stall).then_some(since)
    }
}

/// Runs until `shutdown` fires (the batch in hand is finished first) or the
/// queue closes. Beats `liveness` after each completed poll.
pub async fn run<C: Consumer>(
    mut consumer: C,
    store: Arc<dyn EventSink>,
    config: WorkerConfig,
    metrics: Arc<Metrics>,
    liveness: Arc<Liveness>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::default();
    let mut retry: Vec<Delivery<C::Tag>> = Vec::new();
    // Whether the last store write failed. An empty poll is not progress
    // while it did: with the embedded queue the failed request's client is
    // answered 503 and nothing is held for retry, so the loop goes back to
    // polling, and sparse traffic would otherwise look healthy throughout.
    let mut store_failing = false;
    liveness.beat();
    loop {
        let batch = if !retry.is_empty() {
            std::mem::take(&mut retry)
        } else {
            if shutdown.is_cancelled() {
                break;
            }
            match consumer.fetch(config.batch_size).await {
                Ok(batch) => {
                    backoff.reset();
                    if batch.is_empty() && !store_failing {
                        liveness.beat();
                    }
                    batch
                }
                Err(QueueError::Closed) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the queue; retrying");
                    if backoff.wait(&shutdown).await.is_err() {
                        break;
                    }
                    continue;
                }
            }
        };
        if batch.is_empty() {
            continue;
        }
        let outcome = process_batch(&mut consumer, &*store, batch, &config).await;
        record(&metrics, &outcome);
        tracing::debug!(
            stored = outcome.stored,
            dead = outcome.dead_lettered,
            "batch done"
        );
        store_failing = outcome.store_error.is_some();
        if let Some(e) = &outcome.queue_error {
            tracing::warn!(error = %e, "cannot settle entries with the queue; they will be redelivered");
        } else if !store_failing {
            liveness.beat();
        }
        if outcome.retry.is_empty() {
            backoff.reset();
            continue;
        }
        // The whole store failed, or it refused some events one by one: in
        // both cases wait before trying again (a write conflict or a failover
        // passes; five immediate retries would dead-letter good events).
        let reason = match &outcome.store_error {
            Some(e) => {
                tracing::warn!(error = %e, events = outcome.retry.len(), "store unavailable; retrying");
                e.to_string()
            }
            None => "the store refused some events".to_owned(),
        };
        retry = consumer.release(outcome.retry, &reason).await;
        // On shutdown, entries still held stay pending in the queue (Redis)
        // for another worker; nothing is acknowledged.
        if wait_keeping_alive(&mut consumer, &retry, &mut backoff, &shutdown)
            .await
            .is_err()
        {
            break;
        }
    }
    consumer.close().await;
    tracing::info!("worker stopped");
}

/// Waits out the backoff before retrying the entries the worker holds,
/// telling the queue along the way that they are still being worked on: a
/// backoff may be longer than the claim timeout, and a live worker's entries
/// must not be taken for a dead one's (each claim counts as a delivery, and
/// enough of them would dead-letter good events during a store outage).
async fn wait_keeping_alive<C: Consumer>(
    consumer: &mut C,
    held: &[Delivery<C::Tag>],
    backoff: &mut Backoff,
    shutdown: &CancellationToken,
) -> Result<(), ()> {
    let total = backoff.next_delay();
    let step = consumer
        .keep_alive_every()
        .filter(|_| !held.is_empty())
        .unwrap_or(total);
    let deadline = tokio::time::Instant::now() + total;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(step.min(left)) => {}
            _ = shutdown.cancelled() => return Err(()),
        }
        if tokio::time::Instant::now() < deadline {
            consumer.keep_alive(held).await;
        }
    }
}

fn record<T>(metrics: &Metrics, outcome: &BatchOutcome<T>) {
    let new = outcome.stored.saturating_sub(outcome.duplicates);
    metrics.events_stored.inc_by(new as u64);
    metrics.events_duplicate.inc_by(outcome.duplicates as u64);
    metrics
        .events_dead_lettered
        .inc_by(outcome.dead_lettered as u64);
    metrics
        .dead_letters_trimmed
        .inc_by(outcome.dead_letters_trimmed);
    metrics.events_retried.inc_by(outcome.retry.len() as u64);
    if let Some(t) = outcome.store_time {
        metrics.store_write_seconds.observe(t.as_secs_f64());
    }
}

/// Longest wait between retries. The entries a worker keeps retrying are
/// refreshed during the wait (see [`wait_keeping_alive`]), whatever the claim
/// timeout.
const MAX_BACKOFF_MS: u64 = 2_000;

/// Exponential backoff from 100 ms to `MAX_BACKOFF_MS`, cut short by shutdown.
#[derive(Default)]
struct Backoff {
    failures: u32,
}

impl Backoff {
    /// The next wait, longer after each failure.
    fn next_delay(&mut self) -> Duration {
        let ms = 100u64
            .saturating_mul(1 << self.failures.min(6))
            .min(MAX_BACKOFF_MS);
        self.failures += 1;
        Duration::from_millis(ms)
    }

    async fn wait(&mut self, shutdown: &CancellationToken) -> Result<(), ()> {
        tokio::select! {
            _ = tokio::time::sleep(self.next_delay()) => Ok(()),
            _ = shutdown.cancelled() => Err(()),
        }
    }

    fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    //! `process_batch` with in-memory stand-ins: the settling logic alone.
    //! The real queues and stores are exercised in `tests/api/`.
    use super::*;
    use async_trait::async_trait;
    use std::sync::Mutex;

    /// Answers each insert with the outcomes it is given.
    struct Scripted(Mutex<Vec<Vec<InsertOutcome>>>);

    #[async_trait]
    impl EventSink for Scripted {
        async fn insert(&self, _events: &[Event]) -> Result<Vec<InsertOutcome>, StoreError> {
            Ok(self.0.lock().unwrap().remove(0))
        }
    }

    /// Records what was acknowledged and dead-lettered, by tag.
    #[derive(Default)]
    struct Recorder {
        acked: Vec<u32>,
        dead: Vec<u32>,
    }

    #[async_trait]
    impl Consumer for Recorder {
        type Tag = u32;
        async fn fetch(&mut self, _max: usize) -> Result<Vec<Delivery<u32>>, QueueError> {
            Ok(Vec::new())
        }
        async fn ack(&mut self, d: Vec<Delivery<u32>>) -> Result<(), QueueError> {
            self.acked.extend(d.iter().map(|d| d.tag));
            Ok(())
        }
        async fn dead_letter(
            &mut self,
            d: Vec<(Delivery<u32>, String)>,
        ) -> Result<u64, QueueError> {
            self.dead.extend(d.iter().map(|(d, _)| d.tag));
            Ok(0)
        }
        async fn release(&mut self, d: Vec<Delivery<u32>>, _r: &str) -> Vec<Delivery<u32>> {
            d
        }
    }

    fn batch(n: u32) -> Vec<Delivery<u32>> {
        (0..n)
            .map(|tag| Delivery {
                event: crate::event::parse_event(
                    serde_json::json!({"site_id": "s", "event_type": "t"}),
                    0,
                )
                .map_err(|e| e.message),
                attempts: 1,
                tag,
            })
            .collect()
    }

    #[tokio::test]
    async fn each_outcome_settles_the_event_at_its_position() {
        use InsertOutcome::{Duplicate, Failed, Inserted};
        let store = Scripted(Mutex::new(vec![vec![
            Failed("conflict".into()),
            Inserted,
            Failed("conflict".into()),
            Duplicate,
        ]]));
        let mut consumer = Recorder::default();
        let config = WorkerConfig::default();
        let outcome = process_batch(&mut consumer, &store, batch(4), &config).await;
        assert_eq!(consumer.acked, [1, 3]);
        let retried: Vec<u32> = outcome.retry.iter().map(|d| d.tag).collect();
        assert_eq!(retried, [0, 2]);
        assert_eq!((outcome.stored, outcome.duplicates), (2, 1));
        assert!(outcome.retry.iter().all(|d| d.attempts == 2));
    }

    #[tokio::test]
    async fn a_store_answering_the_wrong_number_of_outcomes_settles_nothing() {
        let store = Scripted(Mutex::new(vec![vec![InsertOutcome::Inserted]]));
        let mut consumer = Recorder::default();
        let config = WorkerConfig::default();
        let outcome = process_batch(&mut consumer, &store, batch(3), &config).await;
        assert!(consumer.acked.is_empty() && consumer.dead.is_empty());
        assert_eq!(outcome.retry.len(), 3);
        assert!(outcome.store_error.is_some());
    }
}
