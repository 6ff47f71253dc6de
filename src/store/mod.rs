//! The store: where events end up, and where stats are computed.
//!
//! One trait, one implementation per backend, picked at start-up:
//! [`sqlite::SqliteStore`] (embedded default, one file in `DATA_DIR`) and
//! [`mongo::MongoStore`] (`MONGO_URI`). An event's identity is the pair
//! (`site_id`, `event_id`): the same id sent by two sites is two events, the
//! same id sent twice by one site is one. Storing an event twice stores it
//! once, which is what makes redelivery from the queue safe. Stats are
//! computed by the store so that each backend can use what it is good at;
//! `tests/api/store.rs` holds the conformance suite both must pass.

pub mod mongo;
pub mod sqlite;

use std::time::Duration;

use async_trait::async_trait;

use crate::event::Event;
use crate::stats::{Stats, StatsQuery};

/// What happened to one event of an insert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InsertOutcome {
    /// Newly stored.
    Inserted,
    /// Already there (same site and id): counts as stored.
    Duplicate,
    /// Refused on its own (the reason). Not stored; the worker retries it and
    /// dead-letters it if it keeps failing.
    Failed(String),
}

impl InsertOutcome {
    /// Stored now or before.
    pub fn is_stored(&self) -> bool {
        !matches!(self, InsertOutcome::Failed(_))
    }
}

/// Counts of a list of outcomes, for logs, metrics and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct InsertCounts {
    pub inserted: usize,
    pub duplicates: usize,
    pub failed: usize,
}

impl InsertCounts {
    pub fn of(outcomes: &[InsertOutcome]) -> Self {
        let mut c = Self::default();
        for o in outcomes {
            match o {
                InsertOutcome::Inserted => c.inserted += 1,
                InsertOutcome::Duplicate => c.duplicates += 1,
                InsertOutcome::Failed(_) => c.failed += 1,
            }
        }
        c
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend did not answer or refused the operation as a whole;
    /// retrying later may work. An insert may have been applied in part
    /// (MongoDB can report a write-concern error after writing): retrying it
    /// is safe, since inserts are idempotent.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A query did not finish within its time limit and was stopped.
    #[error("store query took longer than {} ms", .0.as_millis())]
    Timeout(Duration),
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Stores events; safe to call again with the same events.
    ///
    /// On `Ok`, exactly one outcome per input event, in input order:
    /// `outcomes[i]` is what happened to `events[i]`. Events with the same
    /// (`site_id`, `id`) within one call are stored once (the first is
    /// `Inserted`, unless it was already there, the others `Duplicate`).
    async fn insert(&self, events: &[Event]) -> Result<Vec<InsertOutcome>, StoreError>;
    /// Aggregates one site-day.
    async fn stats(&self, query: &StatsQuery) -> Result<Stats, StoreError>;
    /// Recomputes derived data (aggregates) from the raw events. Returns
    /// `false` when the store keeps none (it aggregates at query time).
    async fn rebuild_aggregates(&self) -> Result<bool, StoreError> {
        Ok(false)
    }
    /// Answers when the backend is reachable (for `/ready`).
    async fn check(&self) -> Result<(), StoreError>;
    /// How many of these event ids of one site are stored (tests and tooling).
    async fn count_ids(&self, site_id: &str, ids: &[String]) -> Result<u64, StoreError>;
    /// Total number of stored events.
    async fn count_all(&self) -> Result<u64, StoreError>;
    /// A short name for logs and `/ready`.
    fn kind(&self) -> &'static str;
}
