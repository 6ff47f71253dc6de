//! The store: where events end up, and where queries are answered from.
//!
//! Three traits, by who uses them, one implementation of each per backend,
//! picked at start-up: [`sqlite::SqliteStore`] (embedded default, one file
//! in `DATA_DIR`) and [`mongo::MongoStore`] (`MONGO_URI`).
//! - [`EventSink`]: the worker's insert, one outcome per event;
//! - [`QueryStore`]: reads for the query engine ([`crate::query::engine`]):
//!   rollup rows and raw events, in one snapshot;
//! - [`StoreAdmin`]: keeping the rollups, and what tests and tools ask.
//!
//! An event's identity is the pair (`site_id`, `event_id`): the same id sent
//! by two sites is two events, the same id sent twice by one site is one.
//! Storing an event twice stores it once, which is what makes redelivery from
//! the queue safe, and it is counted in the rollups once.
//! `tests/api/store.rs` holds the conformance suite both must pass.

pub mod mongo;
pub mod sqlite;

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;

use crate::event::Event;
use crate::query::engine::{Aggregator, Plan};

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
    /// Not stored: its visitor was erased ([`StoreAdmin::erase`]) after it
    /// was received. Done with, as a stored event is.
    Erased,
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
                InsertOutcome::Duplicate | InsertOutcome::Erased => c.duplicates += 1,
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

/// Where the worker puts events.
#[async_trait]
pub trait EventSink: Send + Sync + 'static {
    /// Stores events; safe to call again with the same events.
    ///
    /// On `Ok`, exactly one outcome per input event, in input order:
    /// `outcomes[i]` is what happened to `events[i]`. Events with the same
    /// (`site_id`, `id`) within one call are stored once (the first is
    /// `Inserted`, unless it was already there, the others `Duplicate`).
    /// Each newly stored event is counted in the rollups exactly once, in
    /// the same transaction or by a later [`StoreAdmin::fold`].
    async fn insert(&self, events: &[Event]) -> Result<Vec<InsertOutcome>, StoreError>;
}

/// What the query engine reads.
#[async_trait]
pub trait QueryStore: Send + Sync + 'static {
    /// Reads what the plan names, in one consistent snapshot, into `agg`:
    /// each rollup row of `plan.reads` × `plan.spans` of the site
    /// ([`Aggregator::add_row`]), and of `plan.bound_spans` if it chooses
    /// to, and each raw event of the site in
    /// `plan.raw` ([`Aggregator::add_event`]), with its visitor id when
    /// `plan.raw_vids`. Raw events not yet counted in the rollups are left
    /// out, so that rollups and raw events agree. A store that hands rows'
    /// bitmaps as [`crate::query::engine::Bits::Stored`] (their
    /// cardinality and an id) calls [`Aggregator::select`] before its
    /// snapshot ends, reading the bitmaps it asks for by id. Stopped with
    /// [`StoreError::Timeout`] past the query time limit.
    async fn fetch(&self, plan: Plan, agg: Aggregator) -> Result<Aggregator, StoreError>;
    /// The time (epoch ms) of the site's first stored event.
    async fn first_event(&self, site_id: &str) -> Result<Option<i64>, StoreError>;
    /// The sites with events in the rollups, in id order, at most `limit`.
    async fn sites(&self, limit: usize) -> Result<Vec<String>, StoreError>;
    /// The property keys the site's events carry (only those named `name`,
    /// when given), as counted in the rollups: each key once, sorted, at
    /// most [`MAX_PROPERTY_KEYS`].
    async fn property_keys(
        &self,
        site_id: &str,
        name: Option<&str>,
    ) -> Result<Vec<String>, StoreError>;
    /// The site's visits ([`crate::session`]) that start in `[start, end)`,
    /// as folded so far (visits grow with the events folded after them).
    /// Stopped with [`StoreError::Timeout`] past the query time limit.
    async fn visits(
        &self,
        site_id: &str,
        start: i64,
        end: i64,
    ) -> Result<Vec<crate::session::Visit>, StoreError>;
    /// The start (epoch ms, a UTC day) of what retention keeps: raw events
    /// before it are deleted or being deleted ([`StoreAdmin::delete_expired`]),
    /// so queries start no earlier. `None`: nothing deleted.
    async fn kept_from(&self) -> Result<Option<i64>, StoreError>;
    /// Visit rollup rows ([`crate::visit_rollup`]) of the site and `dim` in
    /// `spans`, and the site's visits that start in the `raw` ranges, each
    /// with its visitor's dictionary id, in one snapshot (as folded so
    /// far). `None`: the store keeps no visit rollups, and the engine reads
    /// the visits instead ([`QueryStore::visits`]). Stopped with
    /// [`StoreError::Timeout`] past the query time limit.
    async fn visit_rollups(
        &self,
        site_id: &str,
        dim: &'static str,
        spans: Vec<crate::query::engine::Span>,
        raw: Vec<(i64, i64)>,
    ) -> Result<Option<VisitRollupRead>, StoreError> {
        let _ = (site_id, dim, spans, raw);
        Ok(None)
    }
    /// Whether the visitor has a (folded) visit whose last event is at or
    /// after `since`: whether a visit of theirs is still open.
    async fn visit_open(
        &self,
        site_id: &str,
        visitor: &str,
        since: i64,
    ) -> Result<bool, StoreError>;
}

/// What [`QueryStore::visit_rollups`] reads: rows, and visits with their
/// visitors' ids.
pub type VisitRollupRead = (
    Vec<crate::visit_rollup::RowRead>,
    Vec<(crate::session::Visit, u32)>,
);

/// Keeping derived data, and what tests and tools ask.
#[async_trait]
pub trait StoreAdmin: Send + Sync + 'static {
    /// Counts stored events not yet in the rollups into them, at most
    /// `max_events` of them, exactly once whatever the number of processes
    /// doing the same. Returns how many it counted (0: up to date).
    async fn fold(&self, max_events: usize) -> Result<usize, StoreError>;
    /// Most events one [`StoreAdmin::fold`] counts: fewer means caught up.
    fn fold_batch(&self) -> usize {
        FOLD_BATCH
    }
    /// How many stored events are not in the rollups yet.
    async fn unfolded(&self) -> Result<u64, StoreError>;
    /// Drops the rollups and counts every stored event into them again.
    /// Returns the number of events.
    async fn rebuild_rollups(&self) -> Result<u64, StoreError>;
    /// Answers when the backend is reachable (for `/ready`).
    async fn check(&self) -> Result<(), StoreError>;
    /// How many of these event ids of one site are stored (tests and tooling).
    async fn count_ids(&self, site_id: &str, ids: &[String]) -> Result<u64, StoreError>;
    /// Total number of stored events.
    async fn count_all(&self) -> Result<u64, StoreError>;
    /// A site's stored events, oldest first, at most `limit` (tests and
    /// tooling).
    async fn site_events(&self, site_id: &str, limit: usize) -> Result<Vec<Event>, StoreError> {
        Ok(self
            .events_page(site_id, i64::MIN, i64::MAX, None, limit)
            .await?
            .events)
    }
    /// One page of a raw export: the site's stored events with
    /// `start <= ts < end`, folded or not, in a total order (time first;
    /// the store's own key breaks ties), those after `after` (the previous
    /// page's [`EventPage::next`]), at most `limit`. Each page is read on
    /// its own: events stored between two pages appear if they sort after
    /// the first one's end. Stopped with [`StoreError::Timeout`] past the
    /// query time limit.
    async fn events_page(
        &self,
        site_id: &str,
        start: i64,
        end: i64,
        after: Option<PageAfter>,
        limit: usize,
    ) -> Result<EventPage, StoreError>;
    /// Retention, first step: queries start at `cutoff` (a UTC day start)
    /// from now on ([`QueryStore::kept_from`]); it never moves back.
    async fn set_kept_from(&self, cutoff: i64) -> Result<(), StoreError>;
    /// Retention, second step, in bounded steps: deletes at most
    /// `max_events` raw events from before [`QueryStore::kept_from`]; once
    /// none is left, the rollup rows, site-days and visits of that time
    /// (a visit that runs over the cutoff is made again from its events
    /// after it). Returns how many events it deleted (0: done).
    async fn delete_expired(&self, max_events: usize) -> Result<usize, StoreError>;
    /// Erases one person from a site: every stored event whose visitor (a
    /// `userid`, else the cookieless id: what queries count) is `visitor`,
    /// with what the rollups, visits and visitor ids hold of them, in one
    /// transaction, so that every answer equals aggregating the events
    /// that remain. Records the erasure ([`erasure_digest`], never the id
    /// itself) for [`ERASURE_KEPT_MS`], so that events of that person
    /// received up to `now_ms` and still queued are dropped when they
    /// arrive ([`InsertOutcome::Erased`]). Returns how many events it
    /// deleted.
    async fn erase(&self, site_id: &str, visitor: &str, now_ms: i64) -> Result<u64, StoreError>;
    /// A short name for logs and `/ready`.
    fn kind(&self) -> &'static str;
}

/// The site registry's records ([`crate::sites`]): small, read whole.
#[async_trait]
pub trait RegistryStore: Send + Sync + 'static {
    /// Every registered site (its settings as given to
    /// [`RegistryStore::put_site`]) and every run-time read token.
    async fn registry(&self) -> Result<crate::sites::Stored, StoreError>;
    /// Creates or replaces a site's settings (checked JSON,
    /// [`crate::sites::SiteSettings`]).
    async fn put_site(&self, site_id: &str, settings: &serde_json::Value)
    -> Result<(), StoreError>;
    /// Removes a site from the registry (its events stay); whether it was
    /// there.
    async fn delete_site(&self, site_id: &str) -> Result<bool, StoreError>;
    /// Keeps a new read token.
    async fn put_token(&self, token: &crate::sites::TokenRecord) -> Result<(), StoreError>;
    /// Revokes a read token by its id; whether it was there.
    async fn revoke_token(&self, id: &str) -> Result<bool, StoreError>;
}

/// How long an erasure is remembered, to drop events of the erased person
/// that were received before it and arrive later (from a queue that was
/// down, or redelivered).
pub const ERASURE_KEPT_MS: i64 = 30 * 86_400_000;

/// What an erasure record keeps of the person: SHA-256 of the site and the
/// visitor, enough to recognise their late events, not to read the id.
pub fn erasure_digest(site_id: &str, visitor: &str) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(site_id.as_bytes());
    h.update([0u8]);
    h.update(visitor.as_bytes());
    h.finalize().into()
}

/// The erasures in force: by digest, when each was made (epoch ms).
#[derive(Debug, Default)]
pub(crate) struct Erasures(HashMap<[u8; 32], i64>);

impl Erasures {
    pub(crate) fn new(records: impl IntoIterator<Item = ([u8; 32], i64)>) -> Self {
        Self(records.into_iter().collect())
    }

    /// Whether `e` belongs to an erased person and was received before the
    /// erasure.
    pub(crate) fn drops(&self, e: &Event) -> bool {
        if self.0.is_empty() {
            return false;
        }
        let Some(visitor) = crate::query::visitor_of(e) else {
            return false;
        };
        self.0
            .get(&erasure_digest(e.site_id.as_str(), visitor))
            .is_some_and(|&at| e.created_at <= at)
    }
}

/// Where a page of [`StoreAdmin::events_page`] ended: the last event's time
/// and the store's tie-breaking key (opaque to callers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageAfter {
    pub(crate) ts: i64,
    pub(crate) key: String,
}

/// A page of events, and where the next one starts (`None`: this was the
/// last: it held fewer than asked).
#[derive(Debug, Default)]
pub struct EventPage {
    pub events: Vec<Event>,
    pub next: Option<PageAfter>,
}

/// A whole store.
pub trait Store: EventSink + QueryStore + StoreAdmin + RegistryStore {}

impl<T: EventSink + QueryStore + StoreAdmin + RegistryStore> Store for T {}

/// How long shutdown waits for a fold under way to end by itself.
///
/// A fold is one bounded transaction. Dropping it half-way is harmless for
/// SQLite (the transaction rolls back with the connection's statement), but
/// not for MongoDB: the driver can only abort a dropped session's
/// transaction from a task of a runtime that is shutting down, so the
/// server keeps it open, holding the fold's documents until it reaps it
/// (60 s on MongoDB; never on some wire-compatible servers). Every other
/// process's fold waits meanwhile.
pub const FOLD_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Folds in a loop until `shutdown`: what a process that writes events runs
/// beside its worker, so that stored events show in queries within
/// `every` or so.
pub async fn run_folder(
    store: std::sync::Arc<dyn Store>,
    every: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    fold_loop(
        store.fold_batch(),
        |batch| {
            let store = std::sync::Arc::clone(&store);
            async move { store.fold(batch).await }
        },
        every,
        shutdown,
    )
    .await
}

/// [`run_folder`]'s loop, over any fold function (tests drive it with a
/// clock they control).
async fn fold_loop<F, Fut>(
    batch: usize,
    fold: F,
    every: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<usize, StoreError>>,
{
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        // Catch up in bounded transactions, so that a backlog (a first start
        // on an old file) does not hold the writer for long at a time.
        // Shutdown starts no new fold, and lets the one under way end (see
        // FOLD_SHUTDOWN_GRACE); what is left is folded by the next start.
        loop {
            let folding = fold(batch);
            tokio::pin!(folding);
            let folded = tokio::select! {
                folded = &mut folding => folded,
                _ = shutdown.cancelled() => {
                    if tokio::time::timeout(FOLD_SHUTDOWN_GRACE, folding).await.is_err() {
                        tracing::warn!(
                            grace = ?FOLD_SHUTDOWN_GRACE,
                            "a fold was still running at shutdown; dropped"
                        );
                    }
                    return;
                }
            };
            match folded {
                Ok(n) if n >= batch && !shutdown.is_cancelled() => continue,
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "folding events into rollups failed; retrying");
                    break;
                }
            }
        }
    }
}

/// Events one retention step deletes: a short write transaction.
pub const RETENTION_STEP: usize = 10_000;

/// Deletes raw events older than `days` days (whole UTC days) and what was
/// derived from them, every hour until `shutdown`: first moves the start
/// of what queries read ([`StoreAdmin::set_kept_from`]), then waits for
/// queries that started before (`grace`) and deletes in steps of
/// [`RETENTION_STEP`], so that no query ever reads a day half deleted.
pub async fn run_retention(
    store: std::sync::Arc<dyn Store>,
    days: u32,
    grace: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(RETENTION_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let now = crate::query::time::now_ms();
        let cutoff = crate::rollup::Level::Day.start(now) - i64::from(days) * 86_400_000;
        let moved = match store.kept_from().await {
            Ok(Some(at)) if at >= cutoff => false,
            Ok(_) => match store.set_kept_from(cutoff).await {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(error = %e, "retention: could not move the start of queries");
                    continue;
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "retention: the store did not answer");
                continue;
            }
        };
        if moved {
            tokio::select! {
                _ = tokio::time::sleep(grace) => {}
                _ = shutdown.cancelled() => return,
            }
        }
        let mut deleted = 0u64;
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            match store.delete_expired(RETENTION_STEP).await {
                Ok(0) => break,
                Ok(n) => deleted += n as u64,
                Err(e) => {
                    tracing::warn!(error = %e, "retention: deleting old events failed; retrying later");
                    break;
                }
            }
            // Steps leave room for ingestion between them.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if deleted > 0 {
            tracing::info!(deleted, cutoff, "retention: deleted old events");
        }
    }
}

/// How often retention looks for days to delete.
const RETENTION_EVERY: Duration = Duration::from_secs(3600);

/// Folds until no stored event is left out of the rollups, waiting while
/// another process holds the fold; returns how many events this call
/// folded. For tools, tests and the benchmark: a running service folds by
/// itself ([`run_folder`]).
pub async fn fold_all(store: &dyn StoreAdmin) -> Result<u64, StoreError> {
    let mut total = 0u64;
    loop {
        let n = store.fold(store.fold_batch()).await?;
        tracing::debug!(folded = n, "fold_all");
        total += n as u64;
        if n == 0 {
            if store.unfolded().await? == 0 {
                return Ok(total);
            }
            // Another process is folding (or a crashed one's transaction
            // still holds the fold until the server ends it).
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Visitor ids most recently used, in two generations: when the young one
/// is full, the old one is dropped and the young one takes its place. Holds
/// at most twice `VISITOR_CACHE` entries, whatever the number of visitors.
#[derive(Default)]
pub(crate) struct VisitorCache {
    young: HashMap<(String, String), u32>,
    old: HashMap<(String, String), u32>,
}

/// Entries per generation of the visitor cache (about 100 bytes each).
const VISITOR_CACHE: usize = 100_000;

impl VisitorCache {
    pub(crate) fn get(&mut self, key: &(String, String)) -> Option<u32> {
        if let Some(&v) = self.young.get(key) {
            return Some(v);
        }
        let v = self.old.remove(key)?;
        self.put(key.clone(), v);
        Some(v)
    }

    pub(crate) fn remove(&mut self, key: &(String, String)) {
        self.young.remove(key);
        self.old.remove(key);
    }

    pub(crate) fn put(&mut self, key: (String, String), vid: u32) {
        if self.young.len() >= VISITOR_CACHE {
            self.old = std::mem::take(&mut self.young);
        }
        self.young.insert(key, vid);
    }
}

/// Most keys [`QueryStore::property_keys`] names.
pub const MAX_PROPERTY_KEYS: usize = 1_000;

/// The keys in rollup values of the `keys` dimension (sorted key lists),
/// each once, sorted, at most [`MAX_PROPERTY_KEYS`].
pub(crate) fn keys_of<'a>(lists: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut keys = std::collections::BTreeSet::new();
    for list in lists {
        for key in list.split(crate::rollup::KEY_SEPARATOR) {
            if !key.is_empty() {
                keys.insert(key);
            }
        }
    }
    keys.into_iter()
        .take(MAX_PROPERTY_KEYS)
        .map(str::to_owned)
        .collect()
}

/// Events per fold transaction.
pub const FOLD_BATCH: usize = 50_000;

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio_util::sync::CancellationToken;

    use super::*;

    /// A fold taking `takes` each time, counting starts and ends.
    type Folding = std::pin::Pin<Box<dyn Future<Output = Result<usize, StoreError>> + Send>>;

    fn slow_fold(
        takes: Duration,
        started: &Arc<AtomicUsize>,
        ended: &Arc<AtomicUsize>,
    ) -> impl Fn(usize) -> Folding + use<> {
        let (started, ended) = (Arc::clone(started), Arc::clone(ended));
        move |batch| {
            let (started, ended) = (Arc::clone(&started), Arc::clone(&ended));
            Box::pin(async move {
                started.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(takes).await;
                ended.fetch_add(1, Ordering::SeqCst);
                // A full batch each time: a backlog, so the loop goes on.
                Ok(batch)
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_lets_the_fold_under_way_end_and_starts_no_other() {
        let (started, ended) = (Arc::default(), Arc::default());
        let shutdown = CancellationToken::new();
        let folder = tokio::spawn(fold_loop(
            100,
            slow_fold(Duration::from_secs(3), &started, &ended),
            Duration::from_millis(200),
            shutdown.clone(),
        ));
        // Into the second fold of the backlog.
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(started.load(Ordering::SeqCst), 2);
        shutdown.cancel();
        folder.await.expect("the folder ends");
        assert_eq!(
            ended.load(Ordering::SeqCst),
            2,
            "the fold under way at shutdown ran to its end (its transaction is not left open)"
        );
        assert_eq!(
            started.load(Ordering::SeqCst),
            2,
            "no fold starts after shutdown"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_fold_that_does_not_end_is_dropped_after_the_grace() {
        let (started, ended) = (Arc::default(), Arc::default());
        let shutdown = CancellationToken::new();
        let t0 = tokio::time::Instant::now();
        let folder = tokio::spawn(fold_loop(
            100,
            slow_fold(Duration::from_secs(3600), &started, &ended),
            Duration::from_millis(200),
            shutdown.clone(),
        ));
        tokio::time::sleep(Duration::from_secs(1)).await;
        shutdown.cancel();
        folder.await.expect("the folder ends");
        let waited = t0.elapsed() - Duration::from_secs(1);
        assert_eq!(ended.load(Ordering::SeqCst), 0);
        assert!(
            waited >= FOLD_SHUTDOWN_GRACE && waited < FOLD_SHUTDOWN_GRACE + Duration::from_secs(1),
            "shutdown waited {waited:?}"
        );
    }
}
