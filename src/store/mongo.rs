//! The MongoDB store, faithful to the original schema so existing tools read it:
//! collection `events`, documents
//! `{_id, event_id, site_id, event_type, path, userid, timestamp: Date, createdAt: Date, props}`.
//!
//! An event's identity is (`site_id`, `event_id`), so `_id` joins the two with
//! U+001F (the ASCII unit separator) between them: neither a site id nor an
//! event id may contain a control character, so the join is unambiguous, and
//! uniqueness costs no index beyond `_id`'s own. (Documents stored before
//! evtrack 0.1's identity change have the bare event id as `_id` and no
//! `event_id`; they stay readable and counted.)
//!
//! Inserts are unordered `insertMany` batches. A duplicate `_id` (E11000) means
//! the event was stored by an earlier delivery and counts as stored; any other
//! per-document error is reported back so the worker retries that event.
//! Queries are answered by the query engine ([`crate::query::engine`]) from
//! the raw events of their range, read through the `(site_id, timestamp)`
//! index and aggregated by evtrack: exact, and as fast as the server streams
//! documents. (Rollups, as the SQLite store keeps, are not kept here yet.)
//! Reads carry a server-side time limit (`maxTimeMS`): a slow query is
//! stopped by the server rather than left running after its client gave up.

use std::time::Duration;

use async_trait::async_trait;
use futures::TryStreamExt;
use mongodb::bson::{Bson, DateTime, Document, doc};
use mongodb::error::ErrorKind;
use mongodb::options::{ClientOptions, IndexOptions, WriteConcern};
use mongodb::{Client, Collection, Database, IndexModel};

use super::{EventSink, InsertOutcome, QueryStore, StoreAdmin, StoreError};
use crate::event::Event;
use crate::query::engine::{Aggregator, Plan};

pub const COLLECTION: &str = "events";
pub const DEFAULT_DATABASE: &str = "evtrack";
const TIME_INDEX: &str = "evtrack_site_time";
const DUPLICATE_KEY: i32 = 11000;
/// The server's code for an operation stopped by `maxTimeMS`.
const MAX_TIME_EXPIRED: i32 = 50;
/// Between site id and event id in `_id`.
pub const ID_SEPARATOR: char = '\u{1f}';

/// The `_id` of an event: site and event id, joined unambiguously.
pub fn document_id(site_id: &str, event_id: &str) -> String {
    format!("{site_id}{ID_SEPARATOR}{event_id}")
}

#[derive(Clone)]
pub struct MongoStore {
    db: Database,
    events: Collection<Document>,
    /// `maxTimeMS` of the stats queries.
    query_timeout: Duration,
}

impl MongoStore {
    /// Connects, checks the server answers, and creates the indexes
    /// (idempotently: creating an existing identical index is a no-op).
    /// `database` overrides the one named in the URI; the default is `evtrack`.
    pub async fn connect(uri: &str, database: Option<&str>) -> Result<Self, String> {
        Self::connect_with(uri, database, crate::config::DEFAULT_STATS_TIMEOUT).await
    }

    /// As [`Self::connect`], with the time limit of reads (`maxTimeMS`).
    pub async fn connect_with(
        uri: &str,
        database: Option<&str>,
        query_timeout: Duration,
    ) -> Result<Self, String> {
        let mut options = ClientOptions::parse(uri)
            .await
            .map_err(|e| format!("invalid connection string: {e}"))?;
        if options.server_selection_timeout.is_none() {
            // Fail fast at start-up and on `/ready` instead of the driver's 30 s.
            options.server_selection_timeout = Some(Duration::from_secs(5));
        }
        if options.write_concern.is_none() {
            // Acknowledged means on disk: the worker removes events from the
            // queue once the store acknowledges them.
            options.write_concern = Some(WriteConcern::builder().journal(true).build());
        }
        if options.app_name.is_none() {
            options.app_name = Some("evtrack".into());
        }
        let name = database
            .map(str::to_owned)
            .or_else(|| options.default_database.clone())
            .unwrap_or_else(|| DEFAULT_DATABASE.to_owned());
        let client = Client::with_options(options).map_err(|e| format!("invalid options: {e}"))?;
        let db = client.database(&name);
        db.run_command(doc! {"ping": 1})
            .await
            .map_err(|e| format!("cannot reach the server: {e}"))?;
        let events = db.collection::<Document>(COLLECTION);
        let index = IndexModel::builder()
            .keys(doc! {"site_id": 1, "timestamp": 1})
            .options(IndexOptions::builder().name(TIME_INDEX.to_owned()).build())
            .build();
        events
            .create_index(index)
            .await
            .map_err(|e| format!("cannot create indexes in database `{name}`: {e}"))?;
        Ok(Self {
            db,
            events,
            query_timeout,
        })
    }
}

/// The document stored for an event (the original schema plus `props`).
pub fn to_document(e: &Event) -> Result<Document, String> {
    let mut d = doc! {
        "_id": document_id(&e.site_id, &e.id),
        "event_id": &e.id,
        "site_id": &e.site_id,
        "event_type": &e.event_type,
    };
    if let Some(p) = &e.path {
        d.insert("path", p);
    }
    if let Some(u) = &e.userid {
        d.insert("userid", u);
    }
    d.insert("timestamp", DateTime::from_millis(e.ts));
    d.insert("createdAt", DateTime::from_millis(e.created_at));
    if let Some(props) = &e.props {
        let props = mongodb::bson::to_bson(props).map_err(|err| format!("props: {err}"))?;
        d.insert("props", props);
    }
    Ok(d)
}

/// An event read back; `None` for a document that is not one.
pub fn from_document(d: &Document) -> Option<Event> {
    let site_id = d.get_str("site_id").ok()?.to_owned();
    let id = match d.get_str("event_id") {
        Ok(id) => id.to_owned(),
        // Stored before ids were per site: `_id` is the event id.
        Err(_) => d.get_str("_id").ok()?.to_owned(),
    };
    let text = |k: &str| d.get_str(k).ok().map(str::to_owned);
    let props = match d.get("props") {
        Some(Bson::Document(p)) => match Bson::Document(p.clone()).into_relaxed_extjson() {
            serde_json::Value::Object(m) => Some(m),
            _ => None,
        },
        _ => None,
    };
    Some(Event {
        id,
        site_id,
        event_type: d.get_str("event_type").ok()?.to_owned(),
        path: text("path"),
        userid: text("userid"),
        ts: d.get_datetime("timestamp").ok()?.timestamp_millis(),
        created_at: d
            .get_datetime("createdAt")
            .map(|t| t.timestamp_millis())
            .unwrap_or(0),
        props,
    })
}

/// A site's raw events in `[start, end)`.
fn raw_filter(site_id: &str, start: i64, end: i64) -> Document {
    doc! {
        "site_id": site_id,
        "timestamp": {"$gte": DateTime::from_millis(start), "$lt": DateTime::from_millis(end)},
    }
}

/// The server's plan (`explain`) for the read a query makes over
/// `[start, end)` of a site. For tests and for checking a deployment's indexes.
pub async fn explain_read(
    db: &Database,
    site_id: &str,
    start: i64,
    end: i64,
) -> mongodb::error::Result<Document> {
    db.run_command(doc! {
        "explain": {"find": COLLECTION, "filter": raw_filter(site_id, start, end)},
        "verbosity": "queryPlanner",
    })
    .await
}

fn unavailable(e: mongodb::error::Error) -> StoreError {
    StoreError::Unavailable(format!("mongodb: {e}"))
}

impl MongoStore {
    /// A read's error: its time limit, or the server's trouble.
    fn read_error(&self, e: mongodb::error::Error) -> StoreError {
        if matches!(&*e.kind, ErrorKind::Command(c) if c.code == MAX_TIME_EXPIRED) {
            StoreError::Timeout(self.query_timeout)
        } else {
            unavailable(e)
        }
    }
}

#[async_trait]
impl EventSink for MongoStore {
    async fn insert(&self, events: &[Event]) -> Result<Vec<InsertOutcome>, StoreError> {
        let mut outcomes = Vec::with_capacity(events.len());
        let mut docs = Vec::with_capacity(events.len());
        // Positions in `docs` → positions in `events` (a document that cannot
        // be built is reported as failed and never sent).
        let mut positions = Vec::with_capacity(events.len());
        for (i, e) in events.iter().enumerate() {
            match to_document(e) {
                Ok(d) => {
                    docs.push(d);
                    positions.push(i);
                    outcomes.push(InsertOutcome::Inserted);
                }
                Err(err) => outcomes.push(InsertOutcome::Failed(err)),
            }
        }
        if docs.is_empty() {
            return Ok(outcomes);
        }
        match self.events.insert_many(docs).ordered(false).await {
            Ok(_) => {}
            Err(err) => match *err.kind {
                ErrorKind::InsertMany(ref failure) => {
                    if let Some(wce) = &failure.write_concern_error {
                        // The writes were applied but may not be durable:
                        // retry them all (idempotent), never acknowledge on a
                        // doubt.
                        return Err(StoreError::Unavailable(format!(
                            "mongodb write concern error: {}",
                            wce.message
                        )));
                    }
                    for we in failure.write_errors.as_deref().unwrap_or_default() {
                        let Some(&pos) = positions.get(we.index) else {
                            return Err(StoreError::Unavailable(format!(
                                "mongodb reported a write error for unknown index {}",
                                we.index
                            )));
                        };
                        outcomes[pos] = if we.code == DUPLICATE_KEY {
                            InsertOutcome::Duplicate
                        } else {
                            InsertOutcome::Failed(format!(
                                "mongodb error {}: {}",
                                we.code, we.message
                            ))
                        };
                    }
                }
                _ => return Err(unavailable(err)),
            },
        }
        Ok(outcomes)
    }
}

#[async_trait]
impl QueryStore for MongoStore {
    /// Reads the raw events of the plan's ranges (a plan of this store asks
    /// for no rollups: see [`QueryStore::has_rollups`]).
    async fn fetch(&self, plan: Plan, mut agg: Aggregator) -> Result<Aggregator, StoreError> {
        // One limit for the whole answer: each read gets what the ones
        // before it left.
        let deadline = std::time::Instant::now() + self.query_timeout;
        let left = || {
            deadline
                .checked_duration_since(std::time::Instant::now())
                .filter(|d| d.as_millis() > 0)
                .ok_or(StoreError::Timeout(self.query_timeout))
        };
        for &(start, end) in &plan.raw {
            let mut cursor = self
                .events
                .find(raw_filter(&plan.site_id, start, end))
                .max_time(left()?)
                .await
                .map_err(|e| self.read_error(e))?;
            while let Some(d) = cursor.try_next().await.map_err(|e| self.read_error(e))? {
                if let Some(e) = from_document(&d) {
                    agg.add_event(&e, None);
                }
            }
        }
        Ok(agg)
    }

    async fn first_event(&self, site_id: &str) -> Result<Option<i64>, StoreError> {
        let first = self
            .events
            .find_one(doc! {"site_id": site_id})
            .sort(doc! {"timestamp": 1})
            .projection(doc! {"timestamp": 1})
            .max_time(self.query_timeout)
            .await
            .map_err(|e| self.read_error(e))?;
        Ok(first.and_then(|d| {
            d.get_datetime("timestamp")
                .ok()
                .map(|t| t.timestamp_millis())
        }))
    }

    fn has_rollups(&self) -> bool {
        false
    }
}

#[async_trait]
impl StoreAdmin for MongoStore {
    /// Nothing to fold: no rollups are kept.
    async fn fold(&self, _max_events: usize) -> Result<usize, StoreError> {
        Ok(0)
    }

    async fn unfolded(&self) -> Result<u64, StoreError> {
        Ok(0)
    }

    /// Nothing to rebuild: returns the number of events.
    async fn rebuild_rollups(&self) -> Result<u64, StoreError> {
        self.count_all().await
    }

    async fn check(&self) -> Result<(), StoreError> {
        self.db
            .run_command(doc! {"ping": 1})
            .await
            .map(|_| ())
            .map_err(unavailable)
    }

    async fn count_ids(&self, site_id: &str, ids: &[String]) -> Result<u64, StoreError> {
        let mut n = 0;
        for chunk in ids.chunks(10_000) {
            let keys: Vec<String> = chunk.iter().map(|id| document_id(site_id, id)).collect();
            n += self
                .events
                .count_documents(doc! {"_id": {"$in": keys}})
                .await
                .map_err(unavailable)?;
        }
        Ok(n)
    }

    async fn count_all(&self) -> Result<u64, StoreError> {
        self.events
            .count_documents(doc! {})
            .await
            .map_err(unavailable)
    }

    fn kind(&self) -> &'static str {
        "mongodb"
    }
}
