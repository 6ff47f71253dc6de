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
//! Rollups ([`crate::rollup`]) live in collection `rollups`, one document
//! per row, `_id` joining its key fields with U+001F; visitor ids in
//! `visitors` (`_id`: site and visitor) and each site's next id in `sites`.
//! An insert is one multi-document transaction: it finds which events are
//! new, stores them with their visitor ids (`vid`), and folds them into the
//! rollups by reading, merging and rewriting the rows they touch. Two
//! workers writing the same event or the same row conflict, and the loser's
//! transaction is retried from the start (MongoDB labels such errors
//! `TransientTransactionError`), so every stored event is counted exactly
//! once, whatever crashes or races. Transactions need a replica set (a
//! single-node one will do) or a sharded cluster: every managed MongoDB is
//! one.
//!
//! A database written before rollups existed is brought up to date when
//! evtrack first connects to it: one process rebuilds the rollups from the
//! raw events while the others wait (`evtrack_meta`).
//!
//! Queries carry a server-side time limit (`maxTimeMS`): a slow query is
//! stopped by the server rather than left running after its client gave up.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use async_trait::async_trait;
use futures::TryStreamExt;
use mongodb::bson::{Binary, Bson, DateTime, Document, doc, spec::BinarySubtype};
use mongodb::error::{ErrorKind, TRANSIENT_TRANSACTION_ERROR, UNKNOWN_TRANSACTION_COMMIT_RESULT};
use mongodb::options::{ClientOptions, IndexOptions, ReturnDocument, WriteConcern};
use mongodb::{Client, ClientSession, Collection, Database, IndexModel};

use super::{EventSink, InsertOutcome, QueryStore, StoreAdmin, StoreError};
use crate::event::Event;
use crate::query::engine::{Aggregator, Plan, RollupRead, RowRef};
use crate::rollup::{self, Deltas, Level, RowKey};

pub const COLLECTION: &str = "events";
pub const ROLLUPS: &str = "rollups";
pub const VISITORS: &str = "visitors";
pub const SITES: &str = "sites";
pub const META: &str = "evtrack_meta";
pub const DEFAULT_DATABASE: &str = "evtrack";
const TIME_INDEX: &str = "evtrack_site_time";
const ROLLUP_INDEX: &str = "evtrack_rollup_buckets";
const ROLLUP_VALUE_INDEX: &str = "evtrack_rollup_values";
const DUPLICATE_KEY: i32 = 11000;
/// The server's code for an operation stopped by `maxTimeMS`.
const MAX_TIME_EXPIRED: i32 = 50;
/// Between site id and event id in `_id`.
pub const ID_SEPARATOR: char = '\u{1f}';
/// How many times an insert transaction is tried before the batch is
/// reported unavailable (the worker then retries it later).
const TRANSACTION_ATTEMPTS: usize = 20;
/// How long a process waits for another to finish rebuilding the rollups.
const REBUILD_WAIT: Duration = Duration::from_secs(30 * 60);

/// The `_id` of an event: site and event id, joined unambiguously.
pub fn document_id(site_id: &str, event_id: &str) -> String {
    format!("{site_id}{ID_SEPARATOR}{event_id}")
}

/// The `_id` of a rollup row. Only the value may hold the separator (a
/// `keys` list), and it is the one field with a fixed number on each side.
fn rollup_id(k: &RowKey<'_>) -> String {
    let s = ID_SEPARATOR;
    format!(
        "{}{s}{}{s}{}{s}{}{s}{}{s}{}",
        k.site_id,
        k.dim,
        k.level.code(),
        k.bucket,
        k.value,
        k.name
    )
}

#[derive(Clone)]
pub struct MongoStore {
    client: Client,
    db: Database,
    events: Collection<Document>,
    rollups: Collection<Document>,
    visitors: Collection<Document>,
    sites: Collection<Document>,
    /// `maxTimeMS` of queries.
    query_timeout: Duration,
}

impl MongoStore {
    /// Connects, checks the server answers, creates the indexes
    /// (idempotently: creating an existing identical index is a no-op) and
    /// brings the rollups up to date with the raw events if they predate
    /// them. `database` overrides the one named in the URI; the default is
    /// `evtrack`.
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
        let store = Self {
            client,
            events: db.collection(COLLECTION),
            rollups: db.collection(ROLLUPS),
            visitors: db.collection(VISITORS),
            sites: db.collection(SITES),
            db,
            query_timeout,
        };
        let index = |keys: Document, name: &str| {
            IndexModel::builder()
                .keys(keys)
                .options(IndexOptions::builder().name(name.to_owned()).build())
                .build()
        };
        let fail = |e: mongodb::error::Error| format!("cannot create indexes in database `{name}`: {e}");
        store
            .events
            .create_index(index(doc! {"site_id": 1, "timestamp": 1}, TIME_INDEX))
            .await
            .map_err(fail)?;
        store
            .rollups
            .create_index(index(
                doc! {"site_id": 1, "dim": 1, "level": 1, "bucket": 1},
                ROLLUP_INDEX,
            ))
            .await
            .map_err(fail)?;
        store
            .rollups
            .create_index(index(
                doc! {"site_id": 1, "dim": 1, "value": 1, "level": 1, "bucket": 1},
                ROLLUP_VALUE_INDEX,
            ))
            .await
            .map_err(fail)?;
        store.ensure_rollups().await?;
        Ok(store)
    }

    /// Rollups for events stored before they existed: the first process to
    /// claim the rebuild does it, the others wait until it is done.
    async fn ensure_rollups(&self) -> Result<(), String> {
        let meta = self.db.collection::<Document>(META);
        let fail = |e: mongodb::error::Error| format!("cannot prepare the rollups: {e}");
        let state = |d: Option<Document>| d.and_then(|d| d.get_str("state").ok().map(str::to_owned));
        if state(meta.find_one(doc! {"_id": "rollups"}).await.map_err(fail)?).as_deref()
            == Some("ready")
        {
            return Ok(());
        }
        let empty = self
            .events
            .find_one(doc! {})
            .await
            .map_err(fail)?
            .is_none();
        if empty {
            meta.update_one(doc! {"_id": "rollups"}, doc! {"$set": {"state": "ready"}})
                .upsert(true)
                .await
                .map_err(fail)?;
            return Ok(());
        }
        match meta
            .insert_one(doc! {"_id": "rollups", "state": "building"})
            .await
        {
            Ok(_) => {
                tracing::warn!("building rollups from the stored events; this can take a while");
                let n = self
                    .rebuild()
                    .await
                    .map_err(|e| format!("cannot build the rollups: {e}"))?;
                meta.update_one(doc! {"_id": "rollups"}, doc! {"$set": {"state": "ready"}})
                    .await
                    .map_err(fail)?;
                tracing::info!(events = n, "rollups built");
                Ok(())
            }
            Err(e) if is_duplicate(&e) => {
                let deadline = std::time::Instant::now() + REBUILD_WAIT;
                while std::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    if state(meta.find_one(doc! {"_id": "rollups"}).await.map_err(fail)?).as_deref()
                        == Some("ready")
                    {
                        return Ok(());
                    }
                }
                Err("another process has been building the rollups for 30 minutes; \
                     if it died, run `evtrack rebuild-aggregates`"
                    .into())
            }
            Err(e) => Err(fail(e)),
        }
    }

    /// Drops the rollups and folds every stored event into them again,
    /// giving events without one their visitor id. Not a transaction: run
    /// it while no worker writes (`evtrack rebuild-aggregates` with the
    /// workers stopped, or at the first start, before any worker runs).
    async fn rebuild(&self) -> Result<u64, StoreError> {
        self.rollups
            .delete_many(doc! {})
            .await
            .map_err(unavailable)?;
        let mut total = 0u64;
        let mut after: Option<String> = None;
        loop {
            let filter = match &after {
                None => doc! {},
                Some(id) => doc! {"_id": {"$gt": id}},
            };
            let docs: Vec<Document> = self
                .events
                .find(filter)
                .sort(doc! {"_id": 1})
                .limit(10_000)
                .await
                .map_err(unavailable)?
                .try_collect()
                .await
                .map_err(unavailable)?;
            let Some(last) = docs.last() else {
                return Ok(total);
            };
            after = last.get_str("_id").ok().map(str::to_owned);
            let events: Vec<Event> = docs.iter().filter_map(from_document).collect();
            let vids = assign_vids(self, None, &events).await.map_err(unavailable)?;
            for (e, d) in events.iter().zip(docs.iter().filter(|d| from_document(d).is_some())) {
                if d.get("vid").is_none()
                    && let Some(vid) = vid_of(&vids, e)
                    && let Ok(id) = d.get_str("_id")
                {
                    self.events
                        .update_one(doc! {"_id": id}, doc! {"$set": {"vid": i64::from(vid)}})
                        .await
                        .map_err(unavailable)?;
                }
            }
            let mut deltas = Deltas::default();
            for e in &events {
                deltas.add(e, vid_of(&vids, e));
            }
            merge_rollups(self, None, &deltas).await.map_err(unavailable)?;
            total += events.len() as u64;
            if after.is_none() {
                return Ok(total);
            }
        }
    }

    /// One attempt at inserting a batch in a transaction (see the module
    /// docs). `docs[i]` is `Some` for events to store.
    async fn insert_once(
        &self,
        session: &mut ClientSession,
        events: &[Event],
        docs: &[Option<Document>],
    ) -> mongodb::error::Result<Vec<InsertOutcome>> {
        session.start_transaction().await?;
        let ids: Vec<String> = events
            .iter()
            .map(|e| document_id(&e.site_id, &e.id))
            .collect();
        let mut existing: HashSet<String> = HashSet::new();
        let mut cursor = self
            .events
            .find(doc! {"_id": {"$in": &ids}})
            .projection(doc! {"_id": 1})
            .session(&mut *session)
            .await?;
        while let Some(d) = cursor.next(&mut *session).await.transpose()? {
            if let Ok(id) = d.get_str("_id") {
                existing.insert(id.to_owned());
            }
        }
        drop(cursor);
        let mut outcomes = Vec::with_capacity(events.len());
        let mut fresh = Vec::new();
        let mut seen = HashSet::new();
        for i in 0..events.len() {
            let outcome = match &docs[i] {
                None => InsertOutcome::Failed("cannot be written as a document".into()),
                Some(_) if existing.contains(&ids[i]) || !seen.insert(ids[i].as_str()) => {
                    InsertOutcome::Duplicate
                }
                Some(_) => {
                    fresh.push(i);
                    InsertOutcome::Inserted
                }
            };
            outcomes.push(outcome);
        }
        if !fresh.is_empty() {
            let new_events: Vec<Event> = fresh.iter().map(|&i| events[i].clone()).collect();
            let vids = assign_vids(self, Some(&mut *session), &new_events).await?;
            let mut to_insert = Vec::with_capacity(fresh.len());
            let mut deltas = Deltas::default();
            for (&i, e) in fresh.iter().zip(&new_events) {
                let mut d = docs[i].clone().unwrap_or_default();
                let vid = vid_of(&vids, e);
                if let Some(v) = vid {
                    d.insert("vid", i64::from(v));
                }
                to_insert.push(d);
                deltas.add(e, vid);
            }
            self.events
                .insert_many(to_insert)
                .session(&mut *session)
                .await?;
            merge_rollups(self, Some(&mut *session), &deltas).await?;
        }
        loop {
            match session.commit_transaction().await {
                Err(e) if e.contains_label(UNKNOWN_TRANSACTION_COMMIT_RESULT) => continue,
                result => break result?,
            }
        }
        Ok(outcomes)
    }
}

fn is_duplicate(e: &mongodb::error::Error) -> bool {
    match &*e.kind {
        ErrorKind::Write(mongodb::error::WriteFailure::WriteError(w)) => w.code == DUPLICATE_KEY,
        ErrorKind::InsertMany(f) => f
            .write_errors
            .as_deref()
            .unwrap_or_default()
            .iter()
            .any(|w| w.code == DUPLICATE_KEY),
        ErrorKind::Command(c) => c.code == DUPLICATE_KEY,
        _ => false,
    }
}

fn vid_of(vids: &HashMap<(String, String), u32>, e: &Event) -> Option<u32> {
    let visitor = crate::query::visitor_of(e)?;
    vids.get(&(e.site_id.clone(), visitor.to_owned())).copied()
}

/// Visitor ids of these events' visitors, new ones given out per site.
async fn assign_vids(
    store: &MongoStore,
    mut session: Option<&mut ClientSession>,
    events: &[Event],
) -> mongodb::error::Result<HashMap<(String, String), u32>> {
    let mut keys: Vec<(String, String)> = events
        .iter()
        .filter_map(|e| crate::query::visitor_of(e).map(|v| (e.site_id.clone(), v.to_owned())))
        .collect();
    keys.sort();
    keys.dedup();
    let mut vids = HashMap::new();
    if keys.is_empty() {
        return Ok(vids);
    }
    let ids: Vec<String> = keys.iter().map(|(s, v)| document_id(s, v)).collect();
    let find = store.visitors.find(doc! {"_id": {"$in": &ids}});
    let found: Vec<Document> = match session.as_deref_mut() {
        Some(s) => {
            let mut cursor = find.session(&mut *s).await?;
            let mut out = Vec::new();
            while let Some(d) = cursor.next(&mut *s).await.transpose()? {
                out.push(d);
            }
            out
        }
        None => find.await?.try_collect().await?,
    };
    let known: HashMap<&str, u32> = found
        .iter()
        .filter_map(|d| Some((d.get_str("_id").ok()?, u32::try_from(as_i64(d, "vid")?).ok()?)))
        .collect();
    let mut missing: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, key) in keys.iter().enumerate() {
        match known.get(ids[i].as_str()) {
            Some(&v) => {
                vids.insert(key.clone(), v);
            }
            None => missing.entry(key.0.as_str()).or_default().push(i),
        }
    }
    let mut new_docs = Vec::new();
    for (site, positions) in missing {
        let n = positions.len() as i64;
        let update = store
            .sites
            .find_one_and_update(doc! {"_id": site}, doc! {"$inc": {"next_vid": n}})
            .upsert(true)
            .return_document(ReturnDocument::After);
        let after = match session.as_deref_mut() {
            Some(s) => update.session(s).await?,
            None => update.await?,
        };
        let next = after.as_ref().and_then(|d| as_i64(d, "next_vid")).unwrap_or(n);
        for (k, &i) in positions.iter().enumerate() {
            let vid = next - n + k as i64;
            let Ok(vid) = u32::try_from(vid) else {
                return Err(mongodb::error::Error::custom(format!(
                    "site {site} has more than 2^32 visitors"
                )));
            };
            vids.insert(keys[i].clone(), vid);
            new_docs.push(doc! {"_id": &ids[i], "vid": i64::from(vid)});
        }
    }
    if !new_docs.is_empty() {
        let insert = store.visitors.insert_many(new_docs);
        match session {
            Some(s) => insert.session(s).await?,
            None => insert.await?,
        };
    }
    Ok(vids)
}

/// Adds deltas to the rollup documents: read the rows, merge, write back.
async fn merge_rollups(
    store: &MongoStore,
    mut session: Option<&mut ClientSession>,
    deltas: &Deltas,
) -> mongodb::error::Result<()> {
    let rows: Vec<(String, RowKey<'_>, u64, &roaring::RoaringBitmap)> = deltas
        .rows()
        .map(|(k, n, b)| (rollup_id(&k), k, n, b))
        .collect();
    for chunk in rows.chunks(5_000) {
        let ids: Vec<&str> = chunk.iter().map(|r| r.0.as_str()).collect();
        let find = store.rollups.find(doc! {"_id": {"$in": &ids}});
        let found: Vec<Document> = match session.as_deref_mut() {
            Some(s) => {
                let mut cursor = find.session(&mut *s).await?;
                let mut out = Vec::new();
                while let Some(d) = cursor.next(&mut *s).await.transpose()? {
                    out.push(d);
                }
                out
            }
            None => find.await?.try_collect().await?,
        };
        let old: HashMap<&str, &Document> = found
            .iter()
            .filter_map(|d| Some((d.get_str("_id").ok()?, d)))
            .collect();
        let mut docs = Vec::with_capacity(chunk.len());
        for (id, k, n, bitmap) in chunk {
            let (events, visitors) = match old.get(id.as_str()) {
                Some(d) => {
                    let mut merged = d
                        .get_binary_generic("visitors")
                        .ok()
                        .and_then(|b| rollup::decode(b))
                        .ok_or_else(|| {
                            mongodb::error::Error::custom(format!(
                                "rollup {id:?} has no readable visitors; rebuild the rollups"
                            ))
                        })?;
                    merged |= *bitmap;
                    (as_i64(d, "events").unwrap_or(0) + *n as i64, merged)
                }
                None => (*n as i64, (*bitmap).clone()),
            };
            docs.push(doc! {
                "_id": id,
                "site_id": k.site_id,
                "dim": k.dim,
                "level": k.level.code(),
                "bucket": k.bucket,
                "value": k.value,
                "name": k.name,
                "events": events,
                "visitors": Binary { subtype: BinarySubtype::Generic, bytes: rollup::encode(&visitors) },
            });
        }
        let existing: Vec<&str> = old.keys().copied().collect();
        if !existing.is_empty() {
            let delete = store.rollups.delete_many(doc! {"_id": {"$in": existing}});
            match session.as_deref_mut() {
                Some(s) => delete.session(s).await?,
                None => delete.await?,
            };
        }
        let insert = store.rollups.insert_many(docs);
        match session.as_deref_mut() {
            Some(s) => insert.session(s).await?,
            None => insert.await?,
        };
    }
    Ok(())
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

/// The rollup queries of one read of a plan: one per run of buckets, or
/// one per level when its runs are dense enough that reading the gaps costs
/// less than more round trips. (One query with an `$or` of runs would do on
/// MongoDB, which plans each clause on the index; the test suite's stand-in
/// does not, and scans the collection.)
fn rollup_filters(plan: &Plan, read: &RollupRead) -> Vec<Document> {
    let mut ranges: Vec<(Level, i64, i64)> = Vec::new();
    for level in Level::ALL {
        let spans: Vec<_> = plan.spans.iter().filter(|s| s.level == level).collect();
        let (Some(first), Some(last)) = (spans.first(), spans.last()) else {
            continue;
        };
        let used: i64 = spans.iter().map(|s| s.to - s.from).sum();
        if last.to - first.from <= 4 * used {
            ranges.push((level, first.from, last.to));
        } else {
            ranges.extend(spans.iter().map(|s| (level, s.from, s.to)));
        }
    }
    // A few values: one equality each (the stand-in plans `$in` as a
    // scan too); many: all rows, and the aggregator keeps the right ones.
    let values: Vec<Option<&String>> = match &read.values {
        Some(values) if values.len() <= 8 => values.iter().map(Some).collect(),
        _ => vec![None],
    };
    let mut filters = Vec::new();
    for (level, from, to) in ranges {
        for value in &values {
            let mut filter = doc! {
                "site_id": &plan.site_id, "dim": &read.dim,
                "level": level.code(), "bucket": {"$gte": from, "$lt": to},
            };
            if let Some(v) = value {
                filter.insert("value", *v);
            }
            filters.push(filter);
        }
    }
    filters
}

/// A site's raw events in `[start, end)`.
fn raw_filter(site_id: &str, start: i64, end: i64) -> Document {
    doc! {
        "site_id": site_id,
        "timestamp": {"$gte": DateTime::from_millis(start), "$lt": DateTime::from_millis(end)},
    }
}

/// The server's plans (`explain`) for the kinds of read a query makes
/// over `[start, end)` of a site: rollups by buckets, rollups by value, raw
/// events by time. For tests and for checking a deployment's indexes.
pub async fn explain_reads(
    db: &Database,
    site_id: &str,
    start: i64,
    end: i64,
) -> mongodb::error::Result<Vec<Document>> {
    let (pieces, _) = rollup::cover(start, end);
    let mut plan = Plan {
        site_id: site_id.to_owned(),
        ..Plan::default()
    };
    for p in pieces {
        plan.spans.push(crate::query::engine::Span {
            level: p.level,
            from: p.bucket,
            to: p.level.next(p.bucket),
        });
    }
    let all = RollupRead {
        dim: rollup::DIM_PAGE.into(),
        values: None,
    };
    let some = RollupRead {
        dim: rollup::DIM_PAGE.into(),
        values: Some(vec!["/".into()]),
    };
    let mut plans = Vec::new();
    let reads = rollup_filters(&plan, &all)
        .into_iter()
        .chain(rollup_filters(&plan, &some))
        .map(|f| (ROLLUPS, f))
        .chain([(COLLECTION, raw_filter(site_id, start, end))]);
    for (collection, filter) in reads {
        plans.push(
            db.run_command(doc! {
                "explain": {"find": collection, "filter": filter},
                "verbosity": "queryPlanner",
            })
            .await?,
        );
    }
    Ok(plans)
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

fn as_i64(doc: &Document, key: &str) -> Option<i64> {
    match doc.get(key) {
        Some(Bson::Int32(n)) => Some(i64::from(*n)),
        Some(Bson::Int64(n)) => Some(*n),
        Some(Bson::Double(n)) if n.fract() == 0.0 => Some(*n as i64),
        _ => None,
    }
}

#[async_trait]
impl EventSink for MongoStore {
    async fn insert(&self, events: &[Event]) -> Result<Vec<InsertOutcome>, StoreError> {
        let docs: Vec<Option<Document>> = events.iter().map(|e| to_document(e).ok()).collect();
        let mut session = self.client.start_session().await.map_err(unavailable)?;
        let mut last = None;
        for _ in 0..TRANSACTION_ATTEMPTS {
            match self.insert_once(&mut session, events, &docs).await {
                Ok(outcomes) => return Ok(outcomes),
                Err(e) => {
                    let _ = session.abort_transaction().await;
                    // Another writer took an event or a row first: try again
                    // from the start, with what it wrote now visible.
                    if e.contains_label(TRANSIENT_TRANSACTION_ERROR) {
                        last = Some(e);
                        continue;
                    }
                    return Err(unavailable(e));
                }
            }
        }
        Err(StoreError::Unavailable(format!(
            "mongodb: the insert transaction conflicted {TRANSACTION_ATTEMPTS} times: {}",
            last.map(|e| e.to_string()).unwrap_or_default()
        )))
    }
}

#[async_trait]
impl QueryStore for MongoStore {
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
        for read in &plan.reads {
            for filter in rollup_filters(&plan, read) {
                let mut cursor = self
                    .rollups
                    .find(filter)
                    .projection(doc! {"level": 1, "bucket": 1, "value": 1, "name": 1, "events": 1, "visitors": 1})
                    .max_time(left()?)
                    .await
                    .map_err(|e| self.read_error(e))?;
                while let Some(d) = cursor.try_next().await.map_err(|e| self.read_error(e))? {
                    let (Some(level), Some(bucket), Ok(value), Ok(name), Ok(visitors)) = (
                        as_i64(&d, "level").and_then(Level::from_code),
                        as_i64(&d, "bucket"),
                        d.get_str("value"),
                        d.get_str("name"),
                        d.get_binary_generic("visitors"),
                    ) else {
                        continue;
                    };
                    agg.add_row(RowRef {
                        dim: &read.dim,
                        level,
                        bucket,
                        value,
                        name,
                        events: as_i64(&d, "events").unwrap_or(0).max(0) as u64,
                        visitors,
                    });
                }
            }
        }
        for &(start, end) in &plan.raw {
            let mut cursor = self
                .events
                .find(raw_filter(&plan.site_id, start, end))
                .max_time(left()?)
                .await
                .map_err(|e| self.read_error(e))?;
            while let Some(d) = cursor.try_next().await.map_err(|e| self.read_error(e))? {
                if let Some(e) = from_document(&d) {
                    let vid = as_i64(&d, "vid").and_then(|v| u32::try_from(v).ok());
                    agg.add_event(&e, vid);
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
        Ok(first.and_then(|d| d.get_datetime("timestamp").ok().map(|t| t.timestamp_millis())))
    }
}

#[async_trait]
impl StoreAdmin for MongoStore {
    /// Nothing to fold: inserts count their events in the same transaction.
    async fn fold(&self, _max_events: usize) -> Result<usize, StoreError> {
        Ok(0)
    }

    /// Always 0: inserts count their events in the same transaction.
    async fn unfolded(&self) -> Result<u64, StoreError> {
        Ok(0)
    }

    async fn rebuild_rollups(&self) -> Result<u64, StoreError> {
        self.rebuild().await
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
