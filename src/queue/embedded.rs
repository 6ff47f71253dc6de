//! The embedded queue: a bounded in-process channel from the API handlers to
//! the store writer.
//!
//! Each `enqueue` call waits on a one-shot reply that the consumer sends once
//! all of the call's events are committed (or refused). The writer takes
//! whatever has piled up while the previous commit ran, so under load many
//! requests share one transaction (group commit) and latency stays at about
//! one commit.
//!
//! Every wait is bounded, and the answer stays true: a request the writer
//! has not taken within [`MAX_WAIT`] is withdrawn (the writer will skip it)
//! and answered `Full`, so nothing of it is stored; a request the writer has
//! taken is part of a commit already running, and is answered when that
//! commit ends, or `StoreUnavailable` after [`MAX_COMMIT_WAIT`] (a stalled
//! disk), in which case the commit may still land: the README tells clients
//! to send an `event_id` so that a retry cannot count twice.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{Consumer, Delivery, Depth, Queue, QueueError};
use crate::event::Event;

/// How long a request may wait for the writer to start on it. Past that the
/// writer is behind (or the disk is stalled) and the client is better told
/// 503 than kept waiting: the API must not hang for more than about a second.
pub const MAX_WAIT: Duration = Duration::from_secs(1);

/// How long a request waits for the commit that holds it, once the writer
/// has taken it.
pub const MAX_COMMIT_WAIT: Duration = Duration::from_secs(10);

/// Where a request stands with the writer; moves once, from `WAITING`.
const WAITING: u8 = 0;
/// The writer has it in a batch: it is committed or refused with the batch.
const TAKEN: u8 = 1;
/// Its client stopped waiting before the writer took it: the writer skips it.
const WITHDRAWN: u8 = 2;

/// What is waiting, for [`Queue::depth`]: shared by both sides.
#[derive(Debug, Default)]
struct Backlog {
    /// Events of requests not yet answered.
    events: AtomicU64,
    /// When the oldest request of the batch in the writer's hands was
    /// enqueued (requests still in the channel are younger).
    in_flight_since: Mutex<Option<Instant>>,
}

impl Backlog {
    fn set_in_flight(&self, since: Option<Instant>) {
        // std Mutex: held for an assignment, never across an await.
        *self
            .in_flight_since
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = since;
    }
}

/// One `enqueue` call: its events until the writer takes them, and the
/// reply, shared by those events once taken.
#[derive(Debug)]
pub struct Waiter {
    /// `WAITING`, `TAKEN` or `WITHDRAWN`.
    state: AtomicU8,
    /// The request's events, until the writer takes them or the request is
    /// withdrawn: a withdrawn request frees them at once, not when the
    /// writer (stalled, perhaps) gets to its place in the channel.
    events: Mutex<Option<Vec<Event>>>,
    remaining: AtomicUsize,
    reply: Mutex<Option<oneshot::Sender<Result<(), QueueError>>>>,
    count: u64,
    backlog: Arc<Backlog>,
}

impl Waiter {
    fn finish(&self, result: Result<(), QueueError>) {
        // std Mutex: held for a `take()`, never across an await.
        let sender = self.reply.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(tx) = sender {
            // Answered once, whatever the answer: no longer waiting.
            self.backlog.events.fetch_sub(self.count, Ordering::AcqRel);
            // The handler may have gone (client disconnected): nothing to do.
            let _ = tx.send(result);
        }
    }

    /// Moves from `WAITING` to `to`; false when another side moved it first.
    fn settle(&self, to: u8) -> bool {
        self.state
            .compare_exchange(WAITING, to, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Takes the events out, for the writer or to drop them.
    fn take_events(&self) -> Vec<Event> {
        // std Mutex: held for a `take()`, never across an await.
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or_default()
    }

    /// The client stopped waiting (its bound passed, or it went away): if
    /// the writer has not taken the request, it never will, and its events
    /// are freed now. True when withdrawn.
    fn withdraw(&self, answer: QueueError) -> bool {
        if !self.settle(WITHDRAWN) {
            return false;
        }
        drop(self.take_events());
        self.finish(Err(answer));
        true
    }

    fn one_done(&self) {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.finish(Ok(()));
        }
    }
}

struct Item {
    waiter: Arc<Waiter>,
    enqueued: Instant,
}

/// Withdraws its request when dropped while still waiting: the handler's
/// future is dropped when its client disconnects.
struct WithdrawOnDrop(Arc<Waiter>);

impl Drop for WithdrawOnDrop {
    fn drop(&mut self) {
        self.0.withdraw(QueueError::Closed);
    }
}

#[derive(Clone)]
pub struct EmbeddedQueue {
    tx: mpsc::Sender<Item>,
    backlog: Arc<Backlog>,
}

pub struct EmbeddedConsumer {
    rx: mpsc::Receiver<Item>,
    /// Set once the API has stopped: from then on, drain what is left and close.
    producers_done: CancellationToken,
    backlog: Arc<Backlog>,
}

/// A queue and its consumer. `capacity` counts enqueue calls waiting for the
/// writer; beyond it `enqueue` answers `Full` at once.
pub fn channel(
    capacity: usize,
    producers_done: CancellationToken,
) -> (EmbeddedQueue, EmbeddedConsumer) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let backlog = Arc::new(Backlog::default());
    (
        EmbeddedQueue {
            tx,
            backlog: Arc::clone(&backlog),
        },
        EmbeddedConsumer {
            rx,
            producers_done,
            backlog,
        },
    )
}

#[async_trait]
impl Queue for EmbeddedQueue {
    async fn enqueue(&self, events: Vec<Event>) -> Result<(), QueueError> {
        if events.is_empty() {
            return Ok(());
        }
        let (reply, done) = oneshot::channel();
        let n = events.len() as u64;
        let waiter = Arc::new(Waiter {
            state: AtomicU8::new(WAITING),
            remaining: AtomicUsize::new(events.len()),
            events: Mutex::new(Some(events)),
            reply: Mutex::new(Some(reply)),
            count: n,
            backlog: Arc::clone(&self.backlog),
        });
        // Counted before sending: the writer may answer (and subtract)
        // before `try_send` even returns.
        self.backlog.events.fetch_add(n, Ordering::AcqRel);
        self.tx
            .try_send(Item {
                waiter: Arc::clone(&waiter),
                enqueued: Instant::now(),
            })
            .inspect_err(|_| {
                self.backlog.events.fetch_sub(n, Ordering::AcqRel);
            })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => QueueError::Full,
                mpsc::error::TrySendError::Closed(_) => QueueError::Closed,
            })?;
        let _withdraw_if_dropped = WithdrawOnDrop(Arc::clone(&waiter));
        // The writer always replies (ack, dead-letter or release); a dropped
        // reply means the writer is gone.
        let mut done = done;
        if let Ok(reply) = tokio::time::timeout(MAX_WAIT, &mut done).await {
            return reply.unwrap_or(Err(QueueError::Closed));
        }
        if waiter.withdraw(QueueError::Full) {
            // The writer has not taken it and now never will: not stored.
            return Err(QueueError::Full);
        }
        // Taken: its commit is running. Its outcome is the answer, within
        // a bound.
        match tokio::time::timeout(MAX_COMMIT_WAIT, done).await {
            Ok(reply) => reply.unwrap_or(Err(QueueError::Closed)),
            Err(_) => Err(QueueError::StoreUnavailable(format!(
                "the store did not commit within {} s",
                (MAX_WAIT + MAX_COMMIT_WAIT).as_secs()
            ))),
        }
    }

    async fn check(&self) -> Result<(), QueueError> {
        if self.tx.is_closed() {
            Err(QueueError::Closed)
        } else {
            Ok(())
        }
    }

    async fn depth(&self) -> Result<Depth, QueueError> {
        let events = self.backlog.events.load(Ordering::Acquire);
        let since = *self
            .backlog
            .in_flight_since
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        Ok(Depth {
            events,
            bytes: None,
            oldest_age: since.filter(|_| events > 0).map(|t| t.elapsed()),
        })
    }

    fn kind(&self) -> &'static str {
        "embedded"
    }
}

impl EmbeddedConsumer {
    /// Adds one request's events to the batch, whole: a request is never
    /// split across commits, so it is stored all at once or not at all and
    /// its answer (202 or 503) is true of every event in it. A request
    /// withdrawn by its client (it waited past [`MAX_WAIT`]) was answered 503
    /// and is skipped: nothing of it is stored.
    fn take_into(item: Item, out: &mut Vec<Delivery<Arc<Waiter>>>) {
        if !item.waiter.settle(TAKEN) {
            return;
        }
        out.extend(item.waiter.take_events().into_iter().map(|e| Delivery {
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
            Some(item) => {
                self.backlog.set_in_flight(Some(item.enqueued));
                Self::take_into(item, &mut out)
            }
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
        self.backlog.set_in_flight(None);
        for d in deliveries {
            d.tag.one_done();
        }
        Ok(())
    }

    async fn dead_letter(
        &mut self,
        deliveries: Vec<(Delivery<Self::Tag>, String)>,
    ) -> Result<u64, QueueError> {
        // There is no stream to set entries aside in: the client is told.
        self.backlog.set_in_flight(None);
        for (d, reason) in deliveries {
            d.tag.finish(Err(QueueError::StoreUnavailable(reason)));
        }
        Ok(0)
    }

    async fn release(
        &mut self,
        deliveries: Vec<Delivery<Self::Tag>>,
        reason: &str,
    ) -> Vec<Delivery<Self::Tag>> {
        // The client is waiting: tell it now (503) rather than hold it while
        // the store recovers. Nothing was committed for these events.
        self.backlog.set_in_flight(None);
        for d in deliveries {
            d.tag
                .finish(Err(QueueError::StoreUnavailable(reason.to_owned())));
        }
        Vec::new()
    }
}
