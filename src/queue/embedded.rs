//! The embedded queue: a bounded in-process channel from the API handlers to
//! the store writer.
//!
//! Each `enqueue` call waits on a one-shot reply that the consumer sends once
//! all of the call's events are committed (or refused). The writer takes
//! whatever has piled up while the previous commit ran, so under load many
//! requests share one transaction (group commit) and latency stays at about
//! one commit.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{Consumer, Delivery, Queue, QueueError};
use crate::event::Event;

/// How long a request may wait for the writer to start on it. Past that the
/// writer is behind (or the disk is stalled) and the client is better told
/// 503 than kept waiting: the API must not hang for more than about a second.
const MAX_WAIT: Duration = Duration::from_secs(1);

/// The reply to one `enqueue` call, shared by that call's events.
#[derive(Debug)]
pub struct Waiter {
    remaining: AtomicUsize,
    reply: Mutex<Option<oneshot::Sender<Result<(), QueueError>>>>,
}

impl Waiter {
    fn finish(&self, result: Result<(), QueueError>) {
        // std Mutex: held for a `take()`, never across an await.
        let sender = self.reply.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(tx) = sender {
            // The handler may have gone (client disconnected): nothing to do.
            let _ = tx.send(result);
        }
    }

    fn one_done(&self) {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.finish(Ok(()));
        }
    }
}

struct Item {
    events: Vec<Event>,
    waiter: Arc<Waiter>,
    /// The writer must have started on the request by then.
    deadline: Instant,
}

#[derive(Clone)]
pub struct EmbeddedQueue {
    tx: mpsc::Sender<Item>,
}

pub struct EmbeddedConsumer {
    rx: mpsc::Receiver<Item>,
    /// Set once the API has stopped: from then on, drain what is left and close.
    producers_done: CancellationToken,
}

/// A queue and its consumer. `capacity` counts enqueue calls waiting for the
/// writer; beyond it `enqueue` answers `Full` at once.
pub fn channel(
    capacity: usize,
    producers_done: CancellationToken,
) -> (EmbeddedQueue, EmbeddedConsumer) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    (
        EmbeddedQueue { tx },
        EmbeddedConsumer { rx, producers_done },
    )
}

#[async_trait]
impl Queue for EmbeddedQueue {
    async fn enqueue(&self, events: Vec<Event>) -> Result<(), QueueError> {
        if events.is_empty() {
            return Ok(());
        }
        let (reply, done) = oneshot::channel();
        let waiter = Arc::new(Waiter {
            remaining: AtomicUsize::new(events.len()),
            reply: Mutex::new(Some(reply)),
        });
        self.tx
            .try_send(Item {
                events,
                waiter,
                deadline: Instant::now() + MAX_WAIT,
            })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => QueueError::Full,
                mpsc::error::TrySendError::Closed(_) => QueueError::Closed,
            })?;
        // The writer always replies (ack, dead-letter or release); a dropped
        // reply means the writer is gone.
        done.await.unwrap_or(Err(QueueError::Closed))
    }

    async fn check(&self) -> Result<(), QueueError> {
        if self.tx.is_closed() {
            Err(QueueError::Closed)
        } else {
            Ok(())
        }
    }

    fn kind(&self) -> &'static str {
        "embedded"
    }
}

impl EmbeddedConsumer {
    /// Adds one request's events to the batch, whole: a request is never
    /// split across commits, so it is stored all at once or not at all and
    /// its answer (202 or 503) is true of every event in it. A request that
    /// waited past its deadline is answered 503 and skipped: nothing of it
    /// is stored, and the client, told so within the bound, retries.
    fn take_into(item: Item, out: &mut Vec<Delivery<Arc<Waiter>>>) {
        if Instant::now() > item.deadline {
            item.waiter.finish(Err(QueueError::Full));
            return;
        }
        out.extend(item.events.into_iter().map(|e| Delivery {
            event: Ok(e),
            attempts: 1,
            tag: Arc::clone(&item.waiter),
        }));
    }
}

#[async_trait]
impl Consumer for EmbeddedConsumer {
    type Tag = Arc<Waiter>;

    /// Whole requests until `max` events are reached or passed (a batch may
    /// exceed `max` by less than one request).
    async fn fetch(&mut self, max: usize) -> Result<Vec<Delivery<Self::Tag>>, QueueError> {
        let mut out = Vec::new();
        let first = tokio::select! {
            item = self.rx.recv() => item,
            _ = self.producers_done.cancelled() => self.rx.try_recv().ok(),
            _ = tokio::time::sleep(Duration::from_millis(500)) => return Ok(out),
        };
        match first {
            Some(item) => Self::take_into(item, &mut out),
            None => return Err(QueueError::Closed),
        }
        while out.len() < max {
            match self.rx.try_recv() {
                Ok(item) => Self::take_into(item, &mut out),
                Err(_) => break,
            }
        }
        Ok(out)
    }

    async fn ack(&mut self, deliveries: Vec<Delivery<Self::Tag>>) -> Result<(), QueueError> {
        for d in deliveries {
            d.tag.one_done();
        }
        Ok(())
    }

    async fn dead_letter(
        &mut self,
        deliveries: Vec<(Delivery<Self::Tag>, String)>,
    ) -> Result<(), QueueError> {
        // There is no stream to set entries aside in: the client is told.
        for (d, reason) in deliveries {
            d.tag.finish(Err(QueueError::StoreUnavailable(reason)));
        }
        Ok(())
    }

    async fn release(
        &mut self,
        deliveries: Vec<Delivery<Self::Tag>>,
        reason: &str,
    ) -> Vec<Delivery<Self::Tag>> {
        // The client is waiting: tell it now (503) rather than hold it while
        // the store recovers. Nothing was committed for these events.
        for d in deliveries {
            d.tag
                .finish(Err(QueueError::StoreUnavailable(reason.to_owned())));
        }
        Vec::new()
    }
}
