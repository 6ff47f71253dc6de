//! The store: where events end up, and where stats are computed.
//!
//! One trait, one implementation per backend, picked at start-up:
//! [`sqlite::SqliteStore`] (embedded default, one file in `DATA_DIR`) and
//! [`mongo::MongoStore`] (`MONGO_URI`). Both are idempotent by event id: storing
//! an event twice stores it once, which is what makes redelivery from the queue
//! safe. Stats are computed by the store so that each backend can use what it
//! is good at; `tests/api/store.rs` holds the conformance suite both must pass.

pub mod mongo;
pub mod sqlite;

use async_trait::async_trait;

use crate::event::Event;
use crate::stats::{Stats, StatsQuery};

/// What happened to each event of an insert.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct InsertReport {
    /// Newly stored.
    pub inserted: usize,
    /// Already there (same id): counts as stored.
    pub duplicates: usize,
    /// Refused one by one (index into the input, reason). Not stored; the
    /// worker retries them and dead-letters them if they keep failing.
    pub failed: Vec<(usize, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend did not answer or refused the whole operation; retrying
    /// later may work. Nothing of the operation is half-applied.
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Stores events; safe to call again with the same events.
    async fn insert(&self, events: &[Event]) -> Result<InsertReport, StoreError>;
    /// Aggregates one site-day.
    async fn stats(&self, query: &StatsQuery) -> Result<Stats, StoreError>;
    /// Recomputes derived data (aggregates) from the raw events. Returns
    /// `false` when the store keeps none (it aggregates at query time).
    async fn rebuild_aggregates(&self) -> Result<bool, StoreError> {
        Ok(false)
    }
    /// Answers when the backend is reachable (for `/ready`).
    async fn check(&self) -> Result<(), StoreError>;
    /// How many events with these ids are stored (tests and tooling).
    async fn count_ids(&self, ids: &[String]) -> Result<u64, StoreError>;
    /// Total number of stored events.
    async fn count_all(&self) -> Result<u64, StoreError>;
    /// A short name for logs and `/ready`.
    fn kind(&self) -> &'static str;
}
