//! The queue between the API and the worker.
//!
//! Two sides, two traits: the API holds a [`Queue`] and only enqueues; the
//! worker holds a [`Consumer`] and fetches, acknowledges and dead-letters.
//! An event leaves the queue only when the worker acknowledges it, after the
//! store has it. Implementations, picked at start-up:
//!
//! - [`redis::RedisQueue`] (`REDIS_URL` set): a Redis Stream with a consumer
//!   group. Entries stay pending until acknowledged; a dead worker's pending
//!   entries are claimed by a live one after a timeout.
//! - [`embedded::EmbeddedQueue`] (default): an in-process bounded channel.
//!   `enqueue` returns only after the store committed the events, so an
//!   acknowledged event survives the process being killed.

pub mod embedded;
pub mod redis;

use async_trait::async_trait;

use crate::event::Event;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum QueueError {
    /// Too many events waiting: the client should retry later.
    #[error("queue is full")]
    Full,
    /// The queue backend does not answer (or answered with an error).
    #[error("queue unavailable: {0}")]
    Unavailable(String),
    /// Embedded mode: the store refused the events, so they were not accepted.
    #[error("store unavailable: {0}")]
    StoreUnavailable(String),
    /// The consumer side is closed for good (shutdown): stop the worker.
    #[error("queue closed")]
    Closed,
}

/// The API's side of the queue.
#[async_trait]
pub trait Queue: Send + Sync + 'static {
    /// Hands events over. On `Ok` the queue is responsible for them.
    async fn enqueue(&self, events: Vec<Event>) -> Result<(), QueueError>;
    /// Answers when the queue backend is reachable (for `/ready`).
    async fn check(&self) -> Result<(), QueueError>;
    /// How much is waiting to be stored, for `/metrics`.
    async fn depth(&self) -> Result<Depth, QueueError>;
    /// A short name for logs and `/ready`.
    fn kind(&self) -> &'static str;
}

/// Events accepted but not yet stored (acknowledged by the worker).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Depth {
    pub events: u64,
    /// Payload bytes of those events, when the queue keeps count (Redis).
    pub bytes: Option<u64>,
    /// How long the oldest of them has waited; `None` when there is none.
    pub oldest_age: Option<std::time::Duration>,
}

/// One entry handed to the worker.
#[derive(Debug)]
pub struct Delivery<T> {
    /// The event, or why the entry could not be read as one (dead-lettered).
    pub event: Result<Event, String>,
    /// How many times this entry has been handed out, this time included.
    pub attempts: u32,
    /// What the queue needs to acknowledge the entry.
    pub tag: T,
}

/// The worker's side of the queue.
#[async_trait]
pub trait Consumer: Send + 'static {
    type Tag: Send + 'static;

    /// Up to `max` entries; an empty batch when nothing came within a short
    /// wait (so the worker can look at its shutdown signal), `Closed` when the
    /// queue will never deliver again.
    async fn fetch(&mut self, max: usize) -> Result<Vec<Delivery<Self::Tag>>, QueueError>;

    /// The store has these events: remove them from the queue.
    async fn ack(&mut self, deliveries: Vec<Delivery<Self::Tag>>) -> Result<(), QueueError>;

    /// These entries can never be stored: move them aside with a reason.
    /// Returns how many of the oldest entries set aside earlier were dropped
    /// to keep the dead letters within their bound.
    async fn dead_letter(
        &mut self,
        deliveries: Vec<(Delivery<Self::Tag>, String)>,
    ) -> Result<u64, QueueError>;

    /// The store is unavailable. Returns the entries the worker should keep
    /// and retry itself; entries not returned went back to their producer.
    /// Called again before each retry, so a queue can mark kept entries as
    /// still being worked on.
    async fn release(
        &mut self,
        deliveries: Vec<Delivery<Self::Tag>>,
        reason: &str,
    ) -> Vec<Delivery<Self::Tag>>;

    /// How often [`Consumer::keep_alive`] must be called while the worker
    /// holds entries (during a store write); `None` when the queue never
    /// hands a held entry to anyone else.
    fn keep_alive_every(&self) -> Option<std::time::Duration> {
        None
    }

    /// These entries are still being worked on: another worker must not take
    /// them over as if this one had died. Best effort.
    async fn keep_alive(&mut self, _deliveries: &[Delivery<Self::Tag>]) {}

    /// The worker is stopping for good, possibly still holding entries it
    /// was retrying: leave the queue tidy without losing those (a Redis
    /// consumer leaves its group only when nothing is pending with it).
    /// Best effort.
    async fn close(&mut self) {}
}
