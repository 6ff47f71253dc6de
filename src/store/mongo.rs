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
//! A new event is stored with `pending: true`: it is not in the rollups yet.
//!
//! Rollups ([`crate::rollup`]) live in the collection `rollups`, one document
//! per (site, dimension, level, bucket, name, value) with its number of
//! events and its visitors' bitmap, and at the day and month levels one
//! more per (site, dimension, level, bucket, value) of every name together
//! ([`ANY_NAME_LEVELS`]); visitor ids come from `visitor_ids`
//! (one document per site and visitor) and per-site counters in
//! `visitor_counters`. [`MongoStore::fold`] counts pending events into them
//! in one multi-document transaction, which also takes them out of
//! `pending`, so each stored event is counted exactly once however the
//! process or the server dies and however many workers fold at once:
//! - the transaction first writes the state document `rollup_state/fold`,
//!   so concurrent folds conflict there at once and only one goes on (the
//!   others find nothing left to do, or fold the next events later);
//! - it reads the oldest pending events in `_id` order through a partial
//!   index, and takes them out of `pending` by the same `_id` range in the
//!   same snapshot: an event inserted meanwhile is not in the snapshot and
//!   stays pending;
//! - the rollup documents it changes are read, merged and written back in
//!   it; a crash before the commit changes nothing.
//!
//! Transactions need a replica set (a single-node one will do) or a sharded
//! cluster: [`MongoStore::connect`] refuses a standalone server.
//!
//! Resetting the rollups (at the first start on a database written by an
//! older evtrack, and by `evtrack rebuild-aggregates`) marks folding as not
//! ready in the state document, empties `rollups`, puts every event back
//! into `pending`, then marks folding ready again. Each of those batches is
//! a transaction that checks the state is still not ready, so a reset that
//! overlaps another one's end can never empty or mark what is being folded.
//!
//! Queries are answered by the query engine ([`crate::query::engine`]) from
//! the rollups, read through the index `evtrack_rollups`, and from the raw
//! events of the slivers no bucket covers (or of the whole range, for
//! filters the rollups cannot serve) through `(site_id, timestamp)`, all in
//! one read-only snapshot transaction. Raw events still pending are left
//! out, as are their counts in the rollups.
//! Reads carry a server-side time limit (`maxTimeMS`): a slow query is
//! stopped by the server rather than left running after its client gave up.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use mongodb::bson::{Binary, Bson, DateTime, Document, doc, spec::BinarySubtype};
use mongodb::error::{ErrorKind, TRANSIENT_TRANSACTION_ERROR, UNKNOWN_TRANSACTION_COMMIT_RESULT};
use mongodb::options::{
    ClientOptions, Hint, IndexOptions, ReadConcern, ReturnDocument, WriteConcern,
};
use mongodb::{Client, ClientSession, Collection, Database, IndexModel};

use super::{
    EventPage, EventSink, InsertOutcome, PageAfter, QueryStore, RegistryStore, StoreAdmin,
    StoreError, VisitorCache,
};
use crate::event::{Event, EventId, EventName, SiteId};
use crate::query::engine::{Aggregator, Bits, Plan, RowRef};
use crate::rollup::{self, DayState, Deltas, Density, Level, RowKey, SiteDays};

pub const COLLECTION: &str = "events";
pub const ROLLUPS: &str = "rollups";
pub const VISITOR_IDS: &str = "visitor_ids";
pub const VISITOR_COUNTERS: &str = "visitor_counters";
pub const STATE: &str = "rollup_state";
/// What each site's UTC day keeps (see `crate::rollup`, "Sparse days").
pub const SITE_DAYS: &str = "site_days";
const SITE_DAYS_INDEX: &str = "evtrack_site_days";
/// Visits ([`crate::session`]), one document per visit, kept by the fold.
pub const VISITS: &str = "visits";
/// Erasures in force (`StoreAdmin::erase`): `{_id: digest, erased_at}`.
pub const ERASURES: &str = "erasures";
/// The site registry ([`crate::sites`]): settings and run-time read tokens,
/// as JSON text (the records are small and read whole).
pub const SITES: &str = "site_settings";
pub const READ_TOKENS: &str = "read_tokens";
/// A visitor's visits by their end: what a fold looks up for new events.
const VISITS_VISITOR_INDEX: &str = "evtrack_visits_visitor";
/// A site's visits by their start: what queries read.
const VISITS_START_INDEX: &str = "evtrack_visits_start";
pub const DEFAULT_DATABASE: &str = "evtrack";
const TIME_INDEX: &str = "evtrack_site_time";
/// Partial index of the events not yet folded (`pending: true`).
pub const PENDING_INDEX: &str = "evtrack_pending";
pub const ROLLUP_INDEX: &str = "evtrack_rollups";
/// The state document's `_id`: folds and resets write it (see the module docs).
const FOLD_STATE: &str = "fold";
/// Retention's state document in `rollup_state`: `{kept_from, cleaned_to}`.
const RETENTION_STATE: &str = "retention";
/// The layout of the rollups this evtrack folds (in the state document): a
/// database folded by another layout is reset at start-up. 2: sparse days
/// (`site_days`); 3: rows of every name together ([`ANY_NAME_LEVELS`]);
/// 4: visits ([`VISITS`]).
const ROLLUP_VERSION: i32 = 4;
/// The levels at which a fold also keeps, per (dimension, value, bucket),
/// one row of every event name together, with its page views
/// (`pageviews`), under the dimension [`any_name_dim`] and the name `""`.
/// A query that looks at no name (top pages, totals, a daily series)
/// reads those: one document per page and day instead of one per page,
/// name and day. A server's cost is per document read, and these levels
/// serve every range of whole days; hours and quarters, which serve only
/// a range's edges, are many more documents for little gain.
const ANY_NAME_LEVELS: [Level; 2] = [Level::Day, Level::Month];

/// The dimension of the rows of every name together (no dimension starts
/// with `any:`).
fn any_name_dim(dim: &str) -> String {
    format!("any:{dim}")
}
const DUPLICATE_KEY: i32 = 11000;
/// The server's code for an operation stopped by `maxTimeMS`.
const MAX_TIME_EXPIRED: i32 = 50;
const WRITE_CONFLICT: i32 = 112;
/// Between site id and event id in `_id`.
pub const ID_SEPARATOR: char = '\u{1f}';
/// Events per fold transaction (up to some ten thousand rollup documents,
/// those of every name together included): a
/// transaction must stay well within the server's 60 s lifetime, its size
/// limits and its cache (the test stand-in, SecantusDB, stalls a commit for
/// good when a transaction outgrows its cache).
const FOLD_BATCH: usize = 2_000;
/// Documents per batch of a reset, and ids per `$in` lookup (servers answer
/// a long `$in` list slower than several short ones).
const RESET_BATCH: i64 = 5_000;
const IN_CHUNK: usize = 500;
/// Update statements per `update` command of a fold (well within the
/// 48 MB message limit, bitmaps included, for all but huge sites).
const UPDATE_CHUNK: usize = 1_000;

/// The `_id` of an event: site and event id, joined unambiguously.
pub fn document_id(site_id: &str, event_id: &str) -> String {
    format!("{site_id}{ID_SEPARATOR}{event_id}")
}

/// The `_id` of a rollup document. Site, dimension and name hold no control
/// character; the value (a `keys` list may hold U+001F) comes last, so the
/// join stays unambiguous.
fn rollup_id(k: &RowKey<'_>) -> String {
    let s = ID_SEPARATOR;
    format!(
        "{}{s}{}{s}{}{s}{}{s}{}{s}{}",
        k.site_id,
        k.dim,
        k.level.code(),
        k.bucket,
        k.name,
        k.value
    )
}

#[derive(Clone)]
pub struct MongoStore {
    client: Client,
    db: Database,
    events: Collection<Document>,
    rollups: Collection<Document>,
    visitor_ids: Collection<Document>,
    visitor_counters: Collection<Document>,
    state: Collection<Document>,
    site_days: Collection<Document>,
    visits: Collection<Document>,
    erasures: Collection<Document>,
    sites: Collection<Document>,
    read_tokens: Collection<Document>,
    /// `maxTimeMS` of the stats queries.
    query_timeout: Duration,
    density: Density,
    /// Committed (site, visitor) → id mappings; bounded.
    visitors: Arc<Mutex<VisitorCache>>,
}

impl MongoStore {
    /// Connects, checks the server answers and can run transactions, creates
    /// the indexes (idempotently: creating an existing identical index is a
    /// no-op), and resets the rollups if folding is not ready (a database
    /// written by an older evtrack, or an interrupted rebuild).
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
        let hello = db
            .run_command(doc! {"hello": 1})
            .await
            .map_err(|e| format!("cannot reach the server: {e}"))?;
        if !hello.contains_key("setName") && hello.get_str("msg") != Ok("isdbgrid") {
            return Err(
                "the server is a standalone mongod: evtrack keeps its rollups with \
                        multi-document transactions, which need a replica set (a single-node \
                        one will do: start mongod with --replSet rs0, then run rs.initiate()) \
                        or a sharded cluster"
                    .into(),
            );
        }
        let store = Self {
            events: db.collection(COLLECTION),
            rollups: db.collection(ROLLUPS),
            visitor_ids: db.collection(VISITOR_IDS),
            visitor_counters: db.collection(VISITOR_COUNTERS),
            state: db.collection(STATE),
            site_days: db.collection(SITE_DAYS),
            visits: db.collection(VISITS),
            erasures: db.collection(ERASURES),
            sites: db.collection(SITES),
            read_tokens: db.collection(READ_TOKENS),
            client,
            db,
            query_timeout,
            density: Density::default(),
            visitors: Arc::default(),
        };
        let indexes =
            |e: mongodb::error::Error| format!("cannot create indexes in database `{name}`: {e}");
        let index = |keys: Document, name: &str| {
            IndexModel::builder()
                .keys(keys)
                .options(IndexOptions::builder().name(name.to_owned()).build())
                .build()
        };
        store
            .events
            .create_index(index(doc! {"site_id": 1, "timestamp": 1}, TIME_INDEX))
            .await
            .map_err(indexes)?;
        let pending = IndexModel::builder()
            .keys(doc! {"pending": 1, "_id": 1})
            .options(
                IndexOptions::builder()
                    .name(PENDING_INDEX.to_owned())
                    .partial_filter_expression(doc! {"pending": true})
                    .build(),
            )
            .build();
        store.events.create_index(pending).await.map_err(indexes)?;
        store
            .rollups
            .create_index(index(
                doc! {"site_id": 1, "dim": 1, "level": 1, "bucket": 1, "value": 1},
                ROLLUP_INDEX,
            ))
            .await
            .map_err(indexes)?;
        store
            .site_days
            .create_index(index(doc! {"site_id": 1, "day": 1}, SITE_DAYS_INDEX))
            .await
            .map_err(indexes)?;
        store
            .visits
            .create_index(index(
                doc! {"site_id": 1, "visitor": 1, "end": 1},
                VISITS_VISITOR_INDEX,
            ))
            .await
            .map_err(indexes)?;
        store
            .visits
            .create_index(index(doc! {"site_id": 1, "start": 1}, VISITS_START_INDEX))
            .await
            .map_err(indexes)?;
        let ready = store
            .state
            .find_one(doc! {"_id": FOLD_STATE, "ready": true, "version": ROLLUP_VERSION})
            .await
            .map_err(|e| format!("cannot read `{STATE}`: {e}"))?;
        if ready.is_none() {
            tracing::info!(
                database = %name,
                "resetting the rollups (first start on this database, or an interrupted rebuild)"
            );
            store
                .reset()
                .await
                .map_err(|e| format!("cannot reset the rollups: {e}"))?;
        }
        Ok(store)
    }
}

impl MongoStore {
    /// The same store, keeping the rollup levels of each day as `density`
    /// says (see [`crate::rollup`]); the default is [`Density::default`].
    pub fn with_density(mut self, density: Density) -> Self {
        self.density = density;
        self
    }
}

/// The `_id` of a site-day's document.
fn site_day_id(site_id: &str, day: i64) -> String {
    format!("{site_id}{ID_SEPARATOR}{day}")
}

/// The document stored for an event (the original schema plus `props`),
/// without the `pending` mark the insert adds.
pub fn to_document(e: &Event) -> Result<Document, String> {
    let mut d = doc! {
        "_id": document_id(&e.site_id, &e.id),
        "event_id": e.id.as_str(),
        "site_id": e.site_id.as_str(),
        "event_type": e.event_type.as_str(),
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
    if let Some(v) = &e.visitor {
        d.insert("visitor", v);
    }
    if let Some(ctx) = &e.ctx {
        let ctx = mongodb::bson::to_bson(ctx).map_err(|err| format!("ctx: {err}"))?;
        d.insert("ctx", ctx);
    }
    Ok(d)
}

/// An event read back; `None` for a document that is not one.
pub fn from_document(d: &Document) -> Option<Event> {
    let site_id = SiteId::parse(d.get_str("site_id").ok()?).ok()?;
    let id = match d.get_str("event_id") {
        Ok(id) => id,
        // Stored before ids were per site: `_id` is the event id.
        Err(_) => d.get_str("_id").ok()?,
    };
    let id = EventId::parse(id).ok()?;
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
        event_type: EventName::parse(d.get_str("event_type").ok()?).ok()?,
        path: text("path"),
        userid: text("userid"),
        ts: d.get_datetime("timestamp").ok()?.timestamp_millis(),
        created_at: d
            .get_datetime("createdAt")
            .map(|t| t.timestamp_millis())
            .unwrap_or(0),
        props,
        visitor: text("visitor"),
        ctx: match d.get("ctx") {
            Some(Bson::Document(c)) => mongodb::bson::from_document(c.clone()).ok(),
            _ => None,
        },
    })
}

/// A site's raw events in `[start, end)`. (Those still pending are skipped
/// as they are read: a condition on `pending` here would keep some
/// servers' planners off the time index.)
fn raw_filter(site_id: &str, start: i64, end: i64) -> Document {
    doc! {
        "site_id": site_id,
        "timestamp": {"$gte": DateTime::from_millis(start), "$lt": DateTime::from_millis(end)},
    }
}

/// [`raw_filter`] with the plan's cheap test of pages ([`Plan::raw_pages`]).
fn raw_plan_filter(plan: &Plan, start: i64, end: i64) -> Document {
    let mut filter = raw_filter(&plan.site_id, start, end);
    if let Some(pages) = &plan.raw_pages {
        filter.insert("path", doc! {"$in": pages.clone()});
    }
    filter
}

/// Which buckets of one level a rollup read takes.
#[derive(Debug, Clone)]
enum Buckets {
    /// Bucket starts in `[from, to)`.
    Range(i64, i64),
    /// These bucket starts.
    Starts(Vec<i64>),
}

impl Buckets {
    /// Every bucket start, at `level`.
    fn starts(&self, level: Level) -> Vec<i64> {
        match self {
            Buckets::Starts(starts) => starts.clone(),
            Buckets::Range(from, to) => {
                let mut out = Vec::new();
                let mut b = *from;
                while b < *to {
                    out.push(b);
                    b = level.next(b);
                }
                out
            }
        }
    }
}

/// Most bucket starts one read lists (`$in`); beyond, one read per run.
const MAX_LISTED_BUCKETS: usize = 2_000;

/// The reads of a plan's buckets, per level: a query covering its range
/// with buckets of several levels, in many runs (the edges of each local
/// day), lists each level's buckets in one read instead of a round trip per
/// run.
fn bucket_reads(plan: &Plan) -> Vec<(Level, Buckets)> {
    let mut reads = Vec::new();
    for level in Level::ALL {
        let spans: Vec<_> = plan.spans.iter().filter(|s| s.level == level).collect();
        if spans.is_empty() {
            continue;
        }
        let mut starts = Vec::new();
        'all: for span in &spans {
            let mut b = span.from;
            while b < span.to {
                if starts.len() == MAX_LISTED_BUCKETS {
                    starts.clear();
                    break 'all;
                }
                starts.push(b);
                b = level.next(b);
            }
        }
        if starts.is_empty() || spans.len() == 1 {
            reads.extend(spans.iter().map(|s| (level, Buckets::Range(s.from, s.to))));
        } else {
            reads.push((level, Buckets::Starts(starts)));
        }
    }
    reads
}

/// The rollup documents of one read of a plan, over some buckets of one
/// level. The read's values, if it names some, are not part of it: every
/// value's rows of those buckets are read, and the aggregator keeps those
/// that pass the query's filters. (A condition on `value` kept the test's
/// stand-in server off the index altogether.)
fn rollup_filter(site_id: &str, dim: &str, level: Level, buckets: &Buckets) -> Document {
    let mut filter = doc! {
        "site_id": site_id,
        "dim": dim,
        "level": level.code(),
    };
    match buckets {
        Buckets::Range(from, to) => filter.insert("bucket", doc! {"$gte": from, "$lt": to}),
        Buckets::Starts(starts) => filter.insert("bucket", doc! {"$in": starts}),
    };
    filter
}

/// The oldest events not yet folded.
fn pending_filter() -> Document {
    doc! {"pending": true}
}

/// The server's plans (`explain`) for the reads a query and a fold make: raw
/// events of a site over `[start, end)`, its page rollups over the same
/// buckets, and the pending events. For tests and for checking a
/// deployment's indexes.
pub async fn explain_reads(
    db: &Database,
    site_id: &str,
    start: i64,
    end: i64,
) -> mongodb::error::Result<Vec<Document>> {
    let page = rollup::DIM_PAGE;
    let finds = [
        doc! {"find": COLLECTION, "filter": raw_filter(site_id, start, end)},
        doc! {"find": ROLLUPS, "filter": rollup_filter(site_id, page, Level::Day, &Buckets::Range(start, end))},
        doc! {"find": ROLLUPS, "filter": rollup_filter(site_id, &any_name_dim(page), Level::Day, &Buckets::Range(start, end))},
        doc! {"find": ROLLUPS, "filter": rollup_filter(site_id, page, Level::Hour,
        &Buckets::Starts(vec![start, start + 2 * crate::query::time::HOUR_MS]))},
        doc! {"find": COLLECTION, "filter": pending_filter(), "sort": {"pending": 1, "_id": 1},
        "hint": PENDING_INDEX, "limit": 10},
    ];
    let mut plans = Vec::new();
    for find in finds {
        plans.push(
            db.run_command(doc! {"explain": find, "verbosity": "queryPlanner"})
                .await?,
        );
    }
    Ok(plans)
}

/// A rollup row a fold adds to: its `_id`, key, and what the fold adds.
struct FoldRow<'a> {
    id: String,
    key: RowKey<'a>,
    events: u64,
    /// Rows of every name together only.
    pageviews: Option<u64>,
    visitors: &'a roaring::RoaringBitmap,
}

/// A fold's rows of every name together ([`ANY_NAME_LEVELS`]), keyed by
/// site, dimension ([`any_name_dim`]), level, bucket and value: events,
/// page views and visitors. Made from the fold's own deltas, so they follow
/// the same density rules and backfills as the rows by name.
type AnyNameRows<'a> =
    HashMap<(&'a str, String, Level, i64, &'a str), (u64, u64, roaring::RoaringBitmap)>;

fn any_name_rows(deltas: &Deltas) -> AnyNameRows<'_> {
    let mut rows: AnyNameRows<'_> = HashMap::new();
    for (k, events, visitors) in deltas.rows() {
        if !ANY_NAME_LEVELS.contains(&k.level) {
            continue;
        }
        let row = rows
            .entry((k.site_id, any_name_dim(k.dim), k.level, k.bucket, k.value))
            .or_default();
        row.0 += events;
        if k.name == crate::query::PAGEVIEW {
            row.1 += events;
        }
        row.2 |= visitors;
    }
    rows
}

/// Why a query's reads in a transaction stopped.
enum ReadFailure {
    /// The server labelled it transient: the whole transaction may be run
    /// again.
    Retry(mongodb::error::Error),
    Fail(StoreError),
}

impl From<StoreError> for ReadFailure {
    fn from(e: StoreError) -> Self {
        ReadFailure::Fail(e)
    }
}

/// What runs in a transaction holding the fold (see `holding_fold`).
#[derive(Debug, Clone, Copy)]
enum Held<'a> {
    Erase {
        site: &'a str,
        visitor: &'a str,
        now_ms: i64,
    },
    /// Retention's cleaning of what was derived from old events.
    Clean(i64),
    /// Retention's move of the start of what queries read.
    MoveStart(i64),
}

/// What a reset batch may do.
enum Guard {
    /// Go on, in this transaction.
    Go(Box<ClientSession>),
    /// Another process holds the state document for a moment: try again.
    Retry,
    /// Folding is ready: another reset finished, touch nothing more.
    Ready,
}

fn unavailable(e: mongodb::error::Error) -> StoreError {
    StoreError::Unavailable(format!("mongodb: {e}"))
}

fn is_duplicate_key(e: &mongodb::error::Error) -> bool {
    match &*e.kind {
        ErrorKind::Write(mongodb::error::WriteFailure::WriteError(w)) => w.code == DUPLICATE_KEY,
        ErrorKind::Command(c) => c.code == DUPLICATE_KEY,
        _ => false,
    }
}

fn is_write_conflict(e: &mongodb::error::Error) -> bool {
    matches!(&*e.kind, ErrorKind::Command(c) if c.code == WRITE_CONFLICT)
}

/// A number a document holds, whichever integer or float type it came as.
fn number(d: &Document, key: &str) -> Option<i64> {
    match d.get(key)? {
        Bson::Int32(v) => Some(i64::from(*v)),
        Bson::Int64(v) => Some(*v),
        Bson::Double(v) => Some(*v as i64),
        _ => None,
    }
}

/// An erasure document as `erase` writes it; anything else is skipped.
fn erasure_record(d: &Document) -> Option<([u8; 32], i64)> {
    let digest = <[u8; 32]>::try_from(d.get_binary_generic("_id").ok()?.as_slice()).ok()?;
    Some((digest, number(d, "erased_at")?))
}

fn binary(bytes: Vec<u8>) -> Binary {
    Binary {
        subtype: BinarySubtype::Generic,
        bytes,
    }
}

/// Runs `update` statements in a transaction, checking each was applied
/// (the command answers `ok` even when single statements failed).
async fn run_updates(
    db: &Database,
    collection: &str,
    statements: Vec<Document>,
    session: &mut ClientSession,
) -> mongodb::error::Result<()> {
    let mut statements = statements.into_iter().peekable();
    while statements.peek().is_some() {
        let chunk: Vec<Document> = statements.by_ref().take(UPDATE_CHUNK).collect();
        let reply = db
            .run_command(doc! {"update": collection, "updates": chunk, "ordered": true})
            .session(&mut *session)
            .await?;
        if let Ok(errors) = reply.get_array("writeErrors")
            && !errors.is_empty()
        {
            return Err(mongodb::error::Error::custom(format!(
                "update of `{collection}` failed: {errors:?}"
            )));
        }
    }
    Ok(())
}

impl MongoStore {
    /// A read's error: its time limit, or the server's trouble.
    /// A query's read failed: to retry if the server says its transaction
    /// may succeed when run again.
    fn read_failure(&self, e: mongodb::error::Error) -> ReadFailure {
        // No server to select is labelled transient too, but the driver
        // has waited its whole server selection timeout already: a store
        // that is down answers as such, at once.
        let no_server = matches!(&*e.kind, ErrorKind::ServerSelection { .. });
        if e.contains_label(TRANSIENT_TRANSACTION_ERROR) && !no_server {
            ReadFailure::Retry(e)
        } else {
            ReadFailure::Fail(self.read_error(e))
        }
    }

    fn read_error(&self, e: mongodb::error::Error) -> StoreError {
        if matches!(&*e.kind, ErrorKind::Command(c) if c.code == MAX_TIME_EXPIRED) {
            StoreError::Timeout(self.query_timeout)
        } else {
            unavailable(e)
        }
    }

    async fn start_transaction(&self) -> mongodb::error::Result<ClientSession> {
        let mut session = self.client.start_session().await?;
        session
            .start_transaction()
            .read_concern(ReadConcern::snapshot())
            .await?;
        Ok(session)
    }

    /// Commits, retrying once when the outcome is unknown (the commit is
    /// idempotent: the driver's spec says to retry it).
    async fn commit(session: &mut ClientSession) -> mongodb::error::Result<()> {
        match session.commit_transaction().await {
            Err(e) if e.contains_label(UNKNOWN_TRANSACTION_COMMIT_RESULT) => {
                session.commit_transaction().await
            }
            other => other,
        }
    }

    /// Sets whether folds may run (the state document).
    async fn set_ready(&self, ready: bool) -> mongodb::error::Result<()> {
        for attempt in 0.. {
            let result = self
                .state
                .update_one(
                    doc! {"_id": FOLD_STATE},
                    doc! {"$set": {"ready": ready, "version": ROLLUP_VERSION}},
                )
                .upsert(true)
                .await;
            match result {
                // A fold or a reset batch holds the document: wait for it.
                // (Or another process created it at the same moment: the
                // next attempt updates it.)
                Err(e)
                    if (is_write_conflict(&e)
                        || e.contains_label(TRANSIENT_TRANSACTION_ERROR)
                        || is_duplicate_key(&e))
                        && attempt < 600 =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => return other.map(|_| ()),
            }
        }
        Ok(())
    }

    /// Starts a reset batch: a transaction in which folding is checked to
    /// be still not ready (and the state document written, so that the end
    /// of another reset conflicts with it). See [`Guard`].
    async fn reset_guard(&self) -> mongodb::error::Result<Guard> {
        let mut session = self.start_transaction().await?;
        let guard = self
            .state
            .find_one_and_update(
                doc! {"_id": FOLD_STATE, "ready": false},
                doc! {"$inc": {"resets": 1}},
            )
            .session(&mut session)
            .await;
        match guard {
            Ok(Some(_)) => Ok(Guard::Go(Box::new(session))),
            Ok(None) => {
                let _ = session.abort_transaction().await;
                Ok(Guard::Ready)
            }
            // Another process resetting at the same time (every process
            // that starts on a new database does) holds the state document.
            Err(e) if is_write_conflict(&e) || e.contains_label(TRANSIENT_TRANSACTION_ERROR) => {
                let _ = session.abort_transaction().await;
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok(Guard::Retry)
            }
            Err(e) => {
                let _ = session.abort_transaction().await;
                Err(e)
            }
        }
    }

    /// Ends a reset batch: commits it if it went well. `Ok(None)`: a
    /// transient error, try the batch again.
    async fn end_batch<T>(
        mut session: ClientSession,
        result: mongodb::error::Result<T>,
    ) -> mongodb::error::Result<Option<T>> {
        let result = match result {
            Ok(value) => Self::commit(&mut session).await.map(|_| value),
            Err(e) => {
                let _ = session.abort_transaction().await;
                Err(e)
            }
        };
        match result {
            Ok(value) => Ok(Some(value)),
            Err(e) if e.contains_label(TRANSIENT_TRANSACTION_ERROR) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// The `_id` of the last of the next `RESET_BATCH` documents of
    /// `filter` in `_id` order; `None` when fewer are left.
    async fn batch_end(
        collection: &Collection<Document>,
        filter: Document,
        session: &mut ClientSession,
    ) -> mongodb::error::Result<Option<Bson>> {
        Ok(collection
            .find_one(filter)
            .sort(doc! {"_id": 1})
            .skip(RESET_BATCH as u64 - 1)
            .projection(doc! {"_id": 1})
            .session(session)
            .await?
            .and_then(|d| d.get("_id").cloned()))
    }

    /// Deletes the next batch of documents of `collection` (the rollups
    /// or the site-days); whether more may be left.
    async fn delete_batch(
        collection: &Collection<Document>,
        session: &mut ClientSession,
    ) -> mongodb::error::Result<bool> {
        // Ranges of `_id`, not `$in` lists: one index range per batch.
        let last = Self::batch_end(collection, doc! {}, session).await?;
        let filter = match &last {
            Some(id) => doc! {"_id": {"$lte": id}},
            None => doc! {},
        };
        collection.delete_many(filter).session(session).await?;
        Ok(last.is_some())
    }

    /// Puts the next batch of events (after `after` in `_id` order) into
    /// `pending`; the last `_id` of the batch, `None` at the end.
    async fn mark_pending_batch(
        &self,
        after: Option<&Bson>,
        session: &mut ClientSession,
    ) -> mongodb::error::Result<Option<Bson>> {
        let mut range = Document::new();
        if let Some(after) = after {
            range.insert("$gt", after.clone());
        }
        let from = if range.is_empty() {
            doc! {}
        } else {
            doc! {"_id": range.clone()}
        };
        let last = Self::batch_end(&self.events, from, session).await?;
        if let Some(last) = &last {
            range.insert("$lte", last.clone());
        }
        let mut filter = doc! {"pending": {"$ne": true}};
        if !range.is_empty() {
            filter.insert("_id", range);
        }
        self.events
            .update_many(filter, doc! {"$set": {"pending": true}})
            .session(session)
            .await?;
        Ok(last)
    }

    /// Empties the rollups and puts every event back into `pending`, with
    /// folding stopped meanwhile (see the module docs). The visitor ids stay:
    /// other processes may hold them in their caches, and they stay right.
    async fn reset(&self) -> mongodb::error::Result<()> {
        self.set_ready(false).await?;
        for collection in [&self.rollups, &self.site_days, &self.visits] {
            loop {
                let mut session = match self.reset_guard().await? {
                    Guard::Go(session) => *session,
                    Guard::Retry => continue,
                    Guard::Ready => return Ok(()),
                };
                let result = Self::delete_batch(collection, &mut session).await;
                match Self::end_batch(session, result).await? {
                    Some(true) | None => continue,
                    Some(false) => break,
                }
            }
        }
        let mut after: Option<Bson> = None;
        loop {
            let mut session = match self.reset_guard().await? {
                Guard::Go(session) => *session,
                Guard::Retry => continue,
                Guard::Ready => return Ok(()),
            };
            let result = self.mark_pending_batch(after.as_ref(), &mut session).await;
            match Self::end_batch(session, result).await? {
                None => continue,
                Some(Some(last)) => after = Some(last),
                Some(None) => break,
            }
        }
        self.set_ready(true).await
    }

    /// Visitor ids of the events' visitors: the cache, else the dictionary,
    /// else new ones, written in `session`. Returns the map and the new
    /// mappings (to cache once committed).
    async fn visitor_ids_for(
        &self,
        events: &[&Event],
        session: &mut ClientSession,
    ) -> mongodb::error::Result<(HashMap<(String, String), u32>, Vec<(String, String)>)> {
        let mut ids: HashMap<(String, String), u32> = HashMap::new();
        let mut missing: Vec<(String, String)> = Vec::new();
        {
            let mut cache = self.visitors.lock().unwrap_or_else(|p| p.into_inner());
            for e in events {
                let Some(visitor) = crate::query::visitor_of(e) else {
                    continue;
                };
                let key = (e.site_id.as_str().to_owned(), visitor.to_owned());
                if ids.contains_key(&key) {
                    continue;
                }
                match cache.get(&key) {
                    Some(v) => {
                        ids.insert(key, v);
                    }
                    None => {
                        ids.insert(key.clone(), u32::MAX);
                        missing.push(key);
                    }
                }
            }
        }
        let mut fresh = Vec::new();
        for chunk in missing.chunks(IN_CHUNK) {
            let keys: Vec<String> = chunk.iter().map(|(s, v)| document_id(s, v)).collect();
            let mut known: HashMap<String, u32> = HashMap::new();
            let mut cursor = self
                .visitor_ids
                .find(doc! {"_id": {"$in": &keys}})
                .session(&mut *session)
                .await?;
            while let Some(d) = cursor.next(&mut *session).await.transpose()? {
                if let (Ok(id), Some(vid)) = (d.get_str("_id"), number(&d, "vid")) {
                    known.insert(id.to_owned(), vid as u32);
                }
            }
            for (key, id) in chunk.iter().zip(keys) {
                if let Some(&vid) = known.get(&id) {
                    ids.insert(key.clone(), vid);
                    fresh.push(key.clone());
                }
            }
        }
        // Still unknown: new visitors, numbered per site from its counter.
        let mut new_of: HashMap<&str, Vec<&(String, String)>> = HashMap::new();
        for key in &missing {
            if ids.get(key) == Some(&u32::MAX) {
                new_of.entry(key.0.as_str()).or_default().push(key);
            }
        }
        let mut docs = Vec::new();
        let mut assigned = Vec::new();
        for (site, keys) in new_of {
            let counter = self
                .visitor_counters
                .find_one_and_update(
                    doc! {"_id": site},
                    doc! {"$inc": {"next": keys.len() as i64}},
                )
                .upsert(true)
                .return_document(ReturnDocument::After)
                .session(&mut *session)
                .await?;
            let next = counter
                .as_ref()
                .and_then(|d| number(d, "next"))
                .unwrap_or(0);
            let first = next - keys.len() as i64;
            for (i, key) in keys.into_iter().enumerate() {
                let vid = u32::try_from(first + i as i64).map_err(|_| {
                    mongodb::error::Error::custom(format!(
                        "site {site} has more than 2^32 visitors"
                    ))
                })?;
                docs.push(doc! {"_id": document_id(&key.0, &key.1), "vid": i64::from(vid)});
                assigned.push((key.clone(), vid));
            }
        }
        for chunk in docs.chunks(UPDATE_CHUNK) {
            self.visitor_ids
                .insert_many(chunk.to_vec())
                .session(&mut *session)
                .await?;
        }
        for (key, vid) in assigned {
            ids.insert(key.clone(), vid);
            fresh.push(key);
        }
        Ok((ids, fresh))
    }

    /// Cleans what was derived from events before `cutoff` (see the SQLite
    /// store's `clean_before`), in a transaction holding the fold.
    async fn clean_in(
        &self,
        cutoff: i64,
        session: &mut ClientSession,
    ) -> mongodb::error::Result<()> {
        let month = Level::Month.start(cutoff);
        self.rollups
            .delete_many(doc! {"$or": [
                {"level": {"$lt": Level::Month.code()}, "bucket": {"$lt": cutoff}},
                {"level": Level::Month.code(), "bucket": {"$lt": month}},
            ]})
            .session(&mut *session)
            .await?;
        self.site_days
            .delete_many(doc! {"day": {"$lt": cutoff}})
            .session(&mut *session)
            .await?;
        // What is left of them ended before the cutoff (see
        // `remake_visits_over`).
        self.visits
            .delete_many(doc! {"start": {"$lt": cutoff}})
            .session(&mut *session)
            .await?;
        self.state
            .update_one(
                doc! {"_id": RETENTION_STATE},
                doc! {"$max": {"cleaned_to": cutoff}},
            )
            .session(&mut *session)
            .await?;
        Ok(())
    }

    /// Moves the start of what queries read to `cutoff` (never back) and
    /// makes the visits over it again from their events after it (see the
    /// SQLite store's `remake_visits_over`), in a transaction holding the
    /// fold.
    async fn move_in(
        &self,
        cutoff: i64,
        session: &mut ClientSession,
    ) -> mongodb::error::Result<()> {
        let state = self
            .state
            .find_one(doc! {"_id": RETENTION_STATE})
            .session(&mut *session)
            .await?;
        if state
            .and_then(|d| number(&d, "kept_from"))
            .is_some_and(|at| at >= cutoff)
        {
            return Ok(());
        }
        self.state
            .update_one(
                doc! {"_id": RETENTION_STATE},
                doc! {"$set": {"kept_from": cutoff}, "$setOnInsert": {"cleaned_to": i64::MIN}},
            )
            .upsert(true)
            .session(&mut *session)
            .await?;
        let mut over: Vec<(String, String, i64)> = Vec::new();
        {
            let mut cursor = self
                .visits
                .find(doc! {"start": {"$lt": cutoff}, "end": {"$gte": cutoff}})
                .projection(doc! {"site_id": 1, "visitor": 1, "end": 1})
                .session(&mut *session)
                .await?;
            while let Some(d) = cursor.next(&mut *session).await.transpose()? {
                if let (Ok(site), Ok(visitor), Some(end)) = (
                    d.get_str("site_id"),
                    d.get_str("visitor"),
                    number(&d, "end"),
                ) {
                    over.push((site.to_owned(), visitor.to_owned(), end));
                }
            }
        }
        self.visits
            .delete_many(doc! {"start": {"$lt": cutoff}, "end": {"$gte": cutoff}})
            .session(&mut *session)
            .await?;
        // A visit over the cutoff, made again from its folded events after it.
        let mut events = Vec::new();
        for (site, visitor, end) in &over {
            let mut cursor = self
                .events
                .find(doc! {
                    "site_id": site,
                    "timestamp": {"$gte": DateTime::from_millis(cutoff), "$lte": DateTime::from_millis(*end)},
                    "$or": [{"userid": visitor}, {"visitor": visitor}],
                })
                .session(&mut *session)
                .await?;
            while let Some(d) = cursor.next(&mut *session).await.transpose()? {
                if d.get_bool("pending") == Ok(true) {
                    continue;
                }
                if let Some(e) = from_document(&d)
                    && crate::query::visitor_of(&e) == Some(visitor.as_str())
                {
                    events.push(e);
                }
            }
        }
        self.fold_visits(&events, session).await
    }

    /// The stored state of the site-days in `counts` (absent: no event yet).
    async fn stored_days(
        &self,
        counts: &SiteDays<u64>,
        session: &mut ClientSession,
    ) -> mongodb::error::Result<SiteDays<DayState>> {
        let mut stored: SiteDays<DayState> = HashMap::new();
        let keys: Vec<String> = counts
            .iter()
            .flat_map(|(site, days)| days.keys().map(|&d| site_day_id(site, d)))
            .collect();
        for chunk in keys.chunks(IN_CHUNK) {
            let mut cursor = self
                .site_days
                .find(doc! {"_id": {"$in": chunk}})
                .session(&mut *session)
                .await?;
            while let Some(d) = cursor.next(&mut *session).await.transpose()? {
                let (Ok(site), Some(day), Some(events), Some(finest)) = (
                    d.get_str("site_id"),
                    number(&d, "day"),
                    number(&d, "events"),
                    number(&d, "finest"),
                ) else {
                    return Err(mongodb::error::Error::custom(format!(
                        "`{SITE_DAYS}` holds a document that is not a site-day: {d}; rebuild the rollups"
                    )));
                };
                let finest = Level::from_code(finest).ok_or_else(|| {
                    mongodb::error::Error::custom(format!(
                        "`{SITE_DAYS}` holds an unknown level {finest}; rebuild the rollups"
                    ))
                })?;
                stored.entry(site.to_owned()).or_default().insert(
                    day,
                    DayState {
                        events: events.max(0) as u64,
                        finest,
                    },
                );
            }
        }
        Ok(stored)
    }

    /// The rollup documents of these ids that exist: events, pageviews
    /// and visitors.
    async fn rollup_docs<'a>(
        &self,
        ids: impl Iterator<Item = &'a str>,
        session: &mut ClientSession,
    ) -> mongodb::error::Result<HashMap<String, Document>> {
        let ids: Vec<&str> = ids.collect();
        let mut existing: HashMap<String, Document> = HashMap::new();
        for chunk in ids.chunks(IN_CHUNK) {
            let mut cursor = self
                .rollups
                .find(doc! {"_id": {"$in": chunk}})
                .projection(doc! {"events": 1, "pageviews": 1, "visitors": 1})
                .session(&mut *session)
                .await?;
            while let Some(d) = cursor.next(&mut *session).await.transpose()? {
                if let Ok(id) = d.get_str("_id") {
                    existing.insert(id.to_owned(), d.clone());
                }
            }
        }
        Ok(existing)
    }

    /// One transaction of `job`, holding the fold document (as a fold
    /// does, so that the two never interleave); `Ok(None)`: a fold holds
    /// it, try again.
    async fn held_once(&self, job: Held<'_>) -> mongodb::error::Result<Option<u64>> {
        let mut session = self.start_transaction().await?;
        let result = self.held_in(job, &mut session).await;
        match result {
            Ok(Some(n)) => {
                Self::commit(&mut session).await?;
                Ok(Some(n))
            }
            other => {
                let _ = session.abort_transaction().await;
                other
            }
        }
    }

    async fn held_in(
        &self,
        job: Held<'_>,
        session: &mut ClientSession,
    ) -> mongodb::error::Result<Option<u64>> {
        let lock = self
            .state
            .find_one_and_update(doc! {"_id": FOLD_STATE}, doc! {"$inc": {"held": 1}})
            .session(&mut *session)
            .await;
        match lock {
            Ok(_) => {}
            Err(e) if is_write_conflict(&e) || e.contains_label(TRANSIENT_TRANSACTION_ERROR) => {
                return Ok(None);
            }
            Err(e) => return Err(e),
        }
        match job {
            Held::Erase {
                site,
                visitor,
                now_ms,
            } => self
                .erase_in(site, visitor, now_ms, session)
                .await
                .map(Some),
            Held::Clean(cutoff) => self.clean_in(cutoff, session).await.map(|()| Some(0)),
            Held::MoveStart(cutoff) => self.move_in(cutoff, session).await.map(|()| Some(0)),
        }
    }

    /// Runs `job` until a transaction of it commits, waiting while folds
    /// hold the fold document, for at most a minute.
    async fn holding_fold(&self, job: Held<'_>) -> Result<u64, StoreError> {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let waited = std::time::Instant::now() >= deadline;
            match self.held_once(job).await {
                Ok(Some(n)) => return Ok(n),
                Ok(None) if waited => {
                    return Err(StoreError::Unavailable(
                        "the fold stayed busy for 60 s; try again".into(),
                    ));
                }
                Err(e) if waited || !e.contains_label(TRANSIENT_TRANSACTION_ERROR) => {
                    return Err(unavailable(e));
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// The erasures in force, read in `session`.
    async fn erasures_in(
        &self,
        session: &mut ClientSession,
    ) -> mongodb::error::Result<super::Erasures> {
        let mut records = Vec::new();
        let mut cursor = self.erasures.find(doc! {}).session(&mut *session).await?;
        while let Some(d) = cursor.next(&mut *session).await.transpose()? {
            records.extend(erasure_record(&d));
        }
        Ok(super::Erasures::new(records))
    }

    /// Erases one person (see `StoreAdmin::erase`), in a transaction
    /// holding the fold: no fold counts their events meanwhile, and the
    /// next one sees the erasure.
    async fn erase_in(
        &self,
        site: &str,
        visitor: &str,
        now_ms: i64,
        session: &mut ClientSession,
    ) -> mongodb::error::Result<u64> {
        let mut ids = Vec::new();
        let mut counted = Vec::new();
        {
            let mut cursor = self
                .events
                .find(doc! {"site_id": site, "$or": [{"userid": visitor}, {"visitor": visitor}]})
                .session(&mut *session)
                .await?;
            while let Some(d) = cursor.next(&mut *session).await.transpose()? {
                let Some(e) = from_document(&d) else { continue };
                // A cookieless id equal to someone's userid is not theirs.
                if crate::query::visitor_of(&e) != Some(visitor) {
                    continue;
                }
                if let Some(id) = d.get("_id") {
                    ids.push(id.clone());
                }
                if d.get_bool("pending") != Ok(true) {
                    counted.push(e);
                }
            }
        }
        // What the folds counted of them, at the levels their days keep now.
        let counts = rollup::day_counts(&counted);
        let changes = rollup::unchanged(&counts, &self.stored_days(&counts, session).await?);
        let vid = self
            .visitor_ids
            .find_one(doc! {"_id": document_id(site, visitor)})
            .session(&mut *session)
            .await?
            .and_then(|d| number(&d, "vid"))
            .and_then(|v| u32::try_from(v).ok());
        let vids: HashMap<(String, String), u32> = vid
            .map(|v| ((site.to_owned(), visitor.to_owned()), v))
            .into_iter()
            .collect();
        let deltas = Deltas::of(&counted, &[], &changes, &vids);
        let any_name = any_name_rows(&deltas);
        // (id, events, pageviews) to take away.
        let mut less: Vec<(String, u64, Option<u64>)> = deltas
            .rows()
            .map(|(key, n, _)| (rollup_id(&key), n, None))
            .collect();
        for ((site_id, dim, level, bucket, value), row) in &any_name {
            let key = RowKey {
                site_id,
                dim,
                level: *level,
                bucket: *bucket,
                value,
                name: "",
            };
            less.push((rollup_id(&key), row.0, Some(row.1)));
        }
        let existing = self
            .rollup_docs(less.iter().map(|r| r.0.as_str()), session)
            .await?;
        let mut gone = Vec::new();
        let mut statements = Vec::new();
        for (id, n, pageviews) in &less {
            let Some(old) = existing.get(id) else {
                continue;
            };
            let left = number(old, "events").unwrap_or(0) - *n as i64;
            if left <= 0 {
                gone.push(id.clone());
                continue;
            }
            // The person has no event left on the site: out of every bitmap
            // their events were counted in.
            let mut bitmap = old
                .get_binary_generic("visitors")
                .ok()
                .and_then(|b| rollup::decode(b))
                .unwrap_or_default();
            if let Some(v) = vid {
                bitmap.remove(v);
            }
            let mut set = doc! {"events": left, "visitors": binary(rollup::encode(&bitmap))};
            if let Some(p) = pageviews {
                set.insert(
                    "pageviews",
                    number(old, "pageviews").unwrap_or(0) - *p as i64,
                );
            }
            statements.push(doc! {"q": {"_id": id}, "u": {"$set": set}});
        }
        run_updates(&self.db, ROLLUPS, statements, session).await?;
        for chunk in gone.chunks(IN_CHUNK) {
            self.rollups
                .delete_many(doc! {"_id": {"$in": chunk}})
                .session(&mut *session)
                .await?;
        }
        let mut day_statements = Vec::new();
        for (s, days) in &counts {
            for (&day, &n) in days {
                day_statements.push(doc! {
                    "q": {"_id": site_day_id(s, day)},
                    "u": {"$inc": {"events": -(n as i64)}},
                });
            }
        }
        run_updates(&self.db, SITE_DAYS, day_statements, session).await?;
        self.site_days
            .delete_many(doc! {"site_id": site, "events": {"$lte": 0}})
            .session(&mut *session)
            .await?;
        for chunk in ids.chunks(IN_CHUNK) {
            self.events
                .delete_many(doc! {"_id": {"$in": chunk}})
                .session(&mut *session)
                .await?;
        }
        self.visits
            .delete_many(doc! {"site_id": site, "visitor": visitor})
            .session(&mut *session)
            .await?;
        self.visitor_ids
            .delete_one(doc! {"_id": document_id(site, visitor)})
            .session(&mut *session)
            .await?;
        let digest = binary(super::erasure_digest(site, visitor).to_vec());
        self.erasures
            .update_one(doc! {"_id": digest}, doc! {"$set": {"erased_at": now_ms}})
            .upsert(true)
            .session(&mut *session)
            .await?;
        self.erasures
            .delete_many(doc! {"erased_at": {"$lt": now_ms - super::ERASURE_KEPT_MS}})
            .session(&mut *session)
            .await?;
        Ok(ids.len() as u64)
    }

    /// One fold transaction; `Ok(None)` when another process holds the fold
    /// (or a reset is under way).
    async fn fold_once(&self, max: usize) -> mongodb::error::Result<Option<usize>> {
        let mut session = self.start_transaction().await?;
        let result = self.fold_in(max, &mut session).await;
        match result {
            Ok(Some((n, fresh, ids))) if n > 0 => {
                Self::commit(&mut session).await?;
                // Only committed mappings are cached: a rolled-back id may
                // be given to another visitor by the next fold.
                let mut cache = self.visitors.lock().unwrap_or_else(|p| p.into_inner());
                for key in fresh {
                    if let Some(&vid) = ids.get(&key) {
                        cache.put(key, vid);
                    }
                }
                Ok(Some(n))
            }
            Ok(other) => {
                let _ = session.abort_transaction().await;
                Ok(other.map(|(n, _, _)| n))
            }
            Err(e) => {
                let _ = session.abort_transaction().await;
                Err(e)
            }
        }
    }

    #[allow(clippy::type_complexity)]
    async fn fold_in(
        &self,
        max: usize,
        session: &mut ClientSession,
    ) -> mongodb::error::Result<
        Option<(usize, Vec<(String, String)>, HashMap<(String, String), u32>)>,
    > {
        // Take the fold: concurrent folds conflict here, at once.
        let lock = self
            .state
            .find_one_and_update(
                doc! {"_id": FOLD_STATE, "ready": true, "version": ROLLUP_VERSION},
                doc! {"$inc": {"folds": 1}},
            )
            .session(&mut *session)
            .await;
        match lock {
            Ok(Some(_)) => {}
            Ok(None) => return Ok(None),
            Err(e) if is_write_conflict(&e) => return Ok(None),
            Err(e) => return Err(e),
        }
        let mut events = Vec::new();
        let mut last: Option<Bson> = None;
        let mut count = 0usize;
        {
            let mut cursor = self
                .events
                .find(pending_filter())
                .sort(doc! {"pending": 1, "_id": 1})
                .hint(Hint::Name(PENDING_INDEX.into()))
                .limit(max as i64)
                .session(&mut *session)
                .await?;
            while let Some(d) = cursor.next(&mut *session).await.transpose()? {
                count += 1;
                last = d.get("_id").cloned();
                // A document that is not an event is taken out of pending
                // uncounted, as raw reads skip it too.
                if let Some(e) = from_document(&d) {
                    events.push(e);
                }
            }
        }
        let Some(last) = last else {
            return Ok(Some((0, Vec::new(), HashMap::new())));
        };
        // Events of a person erased after they were received (still queued
        // then, or written beside the erasure) go now, before being counted:
        // the erasure holds the fold while it runs, so every event is
        // either erased by it or checked here.
        let erasures = self.erasures_in(session).await?;
        let (dropped, kept): (Vec<Event>, Vec<Event>) =
            events.into_iter().partition(|e| erasures.drops(e));
        let events = kept;
        if !dropped.is_empty() {
            let ids: Vec<String> = dropped
                .iter()
                .map(|e| document_id(&e.site_id, &e.id))
                .collect();
            self.events
                .delete_many(doc! {"_id": {"$in": ids}})
                .session(&mut *session)
                .await?;
        }
        // The site-days the events fall on, and the earlier (folded)
        // events of those that now keep finer levels (see `crate::rollup`,
        // "Sparse days").
        let counts = rollup::day_counts(&events);
        let stored = self.stored_days(&counts, session).await?;
        let changes = rollup::day_changes(&counts, &stored, self.density);
        let mut earlier = Vec::new();
        for (site, days) in &changes {
            for (&day, change) in days {
                if change.backfill().is_empty() || change.before.events == 0 {
                    continue;
                }
                let mut cursor = self
                    .events
                    .find(raw_filter(site, day, Level::Day.next(day)))
                    .session(&mut *session)
                    .await?;
                while let Some(d) = cursor.next(&mut *session).await.transpose()? {
                    // Pending: this fold's events, or newer ones.
                    if d.get_bool("pending") == Ok(true) {
                        continue;
                    }
                    if let Some(e) = from_document(&d) {
                        earlier.push(e);
                    }
                }
            }
        }
        let all: Vec<&Event> = events.iter().chain(&earlier).collect();
        let (ids, fresh) = self.visitor_ids_for(&all, session).await?;
        let deltas = Deltas::of(&events, &earlier, &changes, &ids);
        let mut day_statements = Vec::new();
        for (site, days) in &changes {
            for (&day, change) in days {
                day_statements.push(doc! {
                    "q": {"_id": site_day_id(site, day)},
                    "u": {"$set": {
                        "site_id": site,
                        "day": day,
                        "events": change.after.events as i64,
                        "finest": change.after.finest.code(),
                    }},
                    "upsert": true,
                });
            }
        }
        run_updates(&self.db, SITE_DAYS, day_statements, session).await?;
        // Read the rows this fold changes, merge, write back.
        let any_name = any_name_rows(&deltas);
        let rows: Vec<FoldRow<'_>> = deltas
            .rows()
            .map(|(key, events, visitors)| FoldRow {
                id: rollup_id(&key),
                key,
                events,
                pageviews: None,
                visitors,
            })
            .chain(
                any_name
                    .iter()
                    .map(|((site_id, dim, level, bucket, value), row)| {
                        let key = RowKey {
                            site_id,
                            dim,
                            level: *level,
                            bucket: *bucket,
                            value,
                            name: "",
                        };
                        FoldRow {
                            id: rollup_id(&key),
                            key,
                            events: row.0,
                            pageviews: Some(row.1),
                            visitors: &row.2,
                        }
                    }),
            )
            .collect();
        let existing = self
            .rollup_docs(rows.iter().map(|r| r.id.as_str()), session)
            .await?;
        // Rows new to the rollups are inserted (no other fold can insert
        // them meanwhile: folds take turns), the others updated.
        let mut inserts = Vec::new();
        let mut statements = Vec::new();
        for row in &rows {
            let (id, k, n) = (&row.id, &row.key, row.events as i64);
            match existing.get(id) {
                Some(old) => {
                    let mut merged = old
                        .get_binary_generic("visitors")
                        .ok()
                        .and_then(|b| rollup::decode(b))
                        .ok_or_else(|| {
                            mongodb::error::Error::custom(format!(
                                "rollup {id:?} holds no roaring bitmap; rebuild the rollups"
                            ))
                        })?;
                    merged |= row.visitors;
                    let mut set = doc! {
                        "events": number(old, "events").unwrap_or(0) + n,
                        "visitors": binary(rollup::encode(&merged)),
                    };
                    if let Some(p) = row.pageviews {
                        set.insert(
                            "pageviews",
                            number(old, "pageviews").unwrap_or(0) + p as i64,
                        );
                    }
                    statements.push(doc! {"q": {"_id": id}, "u": {"$set": set}});
                }
                None => {
                    let mut d = doc! {
                        "_id": id,
                        "site_id": k.site_id,
                        "dim": k.dim,
                        "level": k.level.code(),
                        "bucket": k.bucket,
                        "value": k.value,
                        "name": k.name,
                        "events": n,
                        "visitors": binary(rollup::encode(row.visitors)),
                    };
                    if let Some(p) = row.pageviews {
                        d.insert("pageviews", p as i64);
                    }
                    inserts.push(d);
                }
            }
        }
        for chunk in inserts.chunks(UPDATE_CHUNK) {
            self.rollups
                .insert_many(chunk.to_vec())
                .session(&mut *session)
                .await?;
        }
        run_updates(&self.db, ROLLUPS, statements, session).await?;
        self.fold_visits(&events, session).await?;
        // The same snapshot's pending events up to `last`: exactly those read.
        self.events
            .update_many(
                doc! {"pending": true, "_id": {"$lte": last}},
                doc! {"$unset": {"pending": ""}},
            )
            .session(&mut *session)
            .await?;
        Ok(Some((count, fresh, ids)))
    }
}

/// A visitor's events in a fold: (site, visitor) and the events.
type VisitorEvents<'a> = ((&'a str, &'a str), Vec<&'a Event>);

/// A visit read back; `None` for a document that is not one.
fn visit_from(d: Document) -> Option<crate::session::Visit> {
    let site = d.get_str("site_id").ok()?.to_owned();
    let visitor = d.get_str("visitor").ok()?.to_owned();
    let start_id = d.get_str("start_id").ok()?.to_owned();
    let (start, end) = (number(&d, "start")?, number(&d, "end")?);
    let mut v: crate::session::Visit = mongodb::bson::from_document(d).ok()?;
    v.site_id = site;
    v.visitor = visitor;
    v.start = start;
    v.start_id = start_id;
    v.end = end;
    Some(v)
}

/// A visit document's `_id`: site, visitor and first event, joined
/// unambiguously (none of them holds the separator).
fn visit_id(site_id: &str, visitor: &str, start: i64, start_id: &str) -> String {
    format!("{site_id}{ID_SEPARATOR}{visitor}{ID_SEPARATOR}{start}{ID_SEPARATOR}{start_id}")
}

impl MongoStore {
    /// Adds a fold's events to their visitors' visits (see
    /// [`crate::session`]), in the fold's transaction: one read per
    /// [`IN_CHUNK`] visitors of a site (`$in` on the visitor index), of
    /// their visits that end after the chunk's earliest event less the gap
    /// (a visitor's visits do not overlap, so those hold every one its
    /// events can reach; live traffic's events are all recent, so there
    /// are few others).
    async fn fold_visits(
        &self,
        events: &[Event],
        session: &mut ClientSession,
    ) -> mongodb::error::Result<()> {
        use crate::session::{GAP_MS, Visit, fold_visitor};
        let by_visitor = crate::session::by_visitor(events);
        let mut groups: Vec<VisitorEvents<'_>> = by_visitor.into_iter().collect();
        // Each chunk of one site.
        groups.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut chunks: Vec<&[VisitorEvents<'_>]> = Vec::new();
        for site in groups.chunk_by(|a, b| a.0.0 == b.0.0) {
            chunks.extend(site.chunks(IN_CHUNK));
        }
        let mut deletes: Vec<String> = Vec::new();
        let mut writes = Vec::new();
        for chunk in chunks {
            let site = chunk.first().map_or("", |g| g.0.0);
            let visitors: Vec<&str> = chunk.iter().map(|g| g.0.1).collect();
            let lo = chunk
                .iter()
                .flat_map(|g| g.1.iter().map(|e| e.ts))
                .min()
                .unwrap_or(0);
            let mut stored: HashMap<(String, String), Vec<Visit>> = HashMap::new();
            let mut cursor = self
                .visits
                .find(doc! {
                    "site_id": site,
                    "visitor": {"$in": visitors},
                    "end": {"$gte": lo.saturating_sub(GAP_MS)},
                })
                .session(&mut *session)
                .await?;
            while let Some(d) = cursor.next(&mut *session).await.transpose()? {
                let visit = visit_from(d).ok_or_else(|| {
                    mongodb::error::Error::custom(format!(
                        "`{VISITS}` holds a document that is not a visit; rebuild the rollups"
                    ))
                })?;
                stored
                    .entry((visit.site_id.clone(), visit.visitor.clone()))
                    .or_default()
                    .push(visit);
            }
            for ((site, visitor), list) in chunk {
                let before = stored
                    .remove(&((*site).to_owned(), (*visitor).to_owned()))
                    .unwrap_or_default();
                let change = fold_visitor(before, list);
                for (start, id) in &change.removed {
                    deletes.push(visit_id(site, visitor, *start, id));
                }
                for v in change.written {
                    let id = visit_id(site, visitor, v.start, &v.start_id);
                    let mut d = mongodb::bson::to_document(&v)
                        .map_err(|e| mongodb::error::Error::custom(format!("visit: {e}")))?;
                    d.insert("_id", &id);
                    d.insert("site_id", *site);
                    d.insert("visitor", *visitor);
                    d.insert("start", v.start);
                    d.insert("start_id", &v.start_id);
                    d.insert("end", v.end);
                    writes.push(doc! {"q": {"_id": id}, "u": d, "upsert": true});
                }
            }
        }
        // Removed first: a written visit may reuse a removed one's id
        // (it grew at its end only).
        for chunk in deletes.chunks(IN_CHUNK) {
            self.visits
                .delete_many(doc! {"_id": {"$in": chunk}})
                .session(&mut *session)
                .await?;
        }
        run_updates(&self.db, VISITS, writes, session).await
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
        // Erasures in force (a handful of documents at most): an erased
        // person's event received before the erasure is not stored. One
        // written at the moment of an erasure is dropped by the next fold.
        let erasures = {
            let mut records = Vec::new();
            use futures::TryStreamExt;
            let mut cursor = self.erasures.find(doc! {}).await.map_err(unavailable)?;
            while let Some(d) = cursor.try_next().await.map_err(unavailable)? {
                records.extend(erasure_record(&d));
            }
            super::Erasures::new(records)
        };
        for (i, e) in events.iter().enumerate() {
            if erasures.drops(e) {
                outcomes.push(InsertOutcome::Erased);
                continue;
            }
            match to_document(e) {
                Ok(mut d) => {
                    d.insert("pending", true);
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
    async fn fetch(&self, plan: Plan, agg: Aggregator) -> Result<Aggregator, StoreError> {
        // One limit for the whole answer, retry included: each read gets
        // what the ones before it left.
        let deadline = std::time::Instant::now() + self.query_timeout;
        let mut retried = false;
        loop {
            // Every read in one snapshot (a read-only transaction): the
            // rows, the days' density and the raw events agree with one
            // state of the store, whatever folds commit meanwhile.
            let mut session = self
                .client
                .start_session()
                .await
                .map_err(|e| self.read_error(e))?;
            session
                .start_transaction()
                .read_concern(ReadConcern::snapshot())
                .await
                .map_err(|e| self.read_error(e))?;
            let result = self
                .fetch_in(&plan, agg.clone(), deadline, &mut session)
                .await;
            // Nothing was written: ending it either way only frees the
            // server's snapshot. After a failure the session is dropped
            // instead (the driver ends its transaction in the background):
            // a server that is gone would hold this answer up for another
            // server selection timeout.
            if result.is_ok() {
                let _ = session.abort_transaction().await;
            }
            match result {
                Ok(agg) => return Ok(agg),
                Err(ReadFailure::Fail(e)) => return Err(e),
                // Reads in a transaction are not retried by the driver; the
                // server says when the whole transaction may succeed again
                // (an election, a snapshot older than a new collection).
                Err(ReadFailure::Retry(e)) if retried || std::time::Instant::now() >= deadline => {
                    return Err(self.read_error(e));
                }
                Err(ReadFailure::Retry(e)) => {
                    tracing::debug!(error = %e, "query transaction failed transiently; retrying");
                    retried = true;
                }
            }
        }
    }

    async fn visits(
        &self,
        site_id: &str,
        start: i64,
        end: i64,
    ) -> Result<Vec<crate::session::Visit>, StoreError> {
        use futures::TryStreamExt;
        let docs: Vec<Document> = self
            .visits
            .find(doc! {"site_id": site_id, "start": {"$gte": start, "$lt": end}})
            .max_time(self.query_timeout)
            .await
            .map_err(|e| self.read_error(e))?
            .try_collect()
            .await
            .map_err(|e| self.read_error(e))?;
        // Written by the fold from a `Visit`; anything else is skipped.
        Ok(docs.into_iter().filter_map(visit_from).collect())
    }

    async fn kept_from(&self) -> Result<Option<i64>, StoreError> {
        let state = self
            .state
            .find_one(doc! {"_id": RETENTION_STATE})
            .max_time(self.query_timeout)
            .await
            .map_err(|e| self.read_error(e))?;
        Ok(state.and_then(|d| number(&d, "kept_from")))
    }

    async fn visit_open(
        &self,
        site_id: &str,
        visitor: &str,
        since: i64,
    ) -> Result<bool, StoreError> {
        let found = self
            .visits
            .find_one(doc! {"site_id": site_id, "visitor": visitor, "end": {"$gte": since}})
            .projection(doc! {"_id": 1})
            .max_time(self.query_timeout)
            .await
            .map_err(|e| self.read_error(e))?;
        Ok(found.is_some())
    }

    async fn sites(&self, limit: usize) -> Result<Vec<String>, StoreError> {
        // A distinct scan of the site-days index.
        let mut sites = self
            .distinct_texts(&self.site_days, "site_id", doc! {})
            .await?;
        sites.sort_unstable();
        sites.truncate(limit);
        Ok(sites)
    }

    async fn property_keys(
        &self,
        site_id: &str,
        name: Option<&str>,
    ) -> Result<Vec<String>, StoreError> {
        // Month rows are kept for every day: the key lists of all the
        // site's events.
        let mut filter =
            doc! {"site_id": site_id, "dim": rollup::DIM_KEYS, "level": Level::Month.code()};
        if let Some(name) = name {
            filter.insert("name", name);
        }
        let lists = self.distinct_texts(&self.rollups, "value", filter).await?;
        Ok(super::keys_of(lists.iter().map(String::as_str)))
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
}

impl MongoStore {
    async fn distinct_texts(
        &self,
        collection: &Collection<Document>,
        field: &str,
        filter: Document,
    ) -> Result<Vec<String>, StoreError> {
        let values = collection
            .distinct(field, filter)
            .max_time(self.query_timeout)
            .await
            .map_err(|e| self.read_error(e))?;
        Ok(values
            .into_iter()
            .filter_map(|v| match v {
                mongodb::bson::Bson::String(s) => Some(s),
                _ => None,
            })
            .collect())
    }

    /// [`QueryStore::fetch`]'s reads, in `session`'s transaction.
    async fn fetch_in(
        &self,
        plan: &Plan,
        mut agg: Aggregator,
        deadline: std::time::Instant,
        session: &mut ClientSession,
    ) -> Result<Aggregator, ReadFailure> {
        let left = || {
            deadline
                .checked_duration_since(std::time::Instant::now())
                .filter(|d| d.as_millis() > 0)
                .ok_or(StoreError::Timeout(self.query_timeout))
        };
        // What the days of the range keep, first: rows of the days read raw
        // are ignored from then on, even if a fold makes them meanwhile.
        let mut sparse = Vec::new();
        if let Some((from, to)) = plan.fine_days {
            let mut finest = HashMap::new();
            let mut cursor = self
                .site_days
                .find(doc! {
                    "site_id": plan.site_id.as_str(),
                    "day": {"$gte": from, "$lte": to},
                    "finest": {"$lt": Level::Month.code()},
                })
                .projection(doc! {"_id": 0, "day": 1, "finest": 1})
                .max_time(left()?)
                .session(&mut *session)
                .await
                .map_err(|e| self.read_failure(e))?;
            while let Some(d) = cursor
                .next(&mut *session)
                .await
                .transpose()
                .map_err(|e| self.read_failure(e))?
            {
                if let (Some(day), Some(level)) = (
                    number(&d, "day"),
                    number(&d, "finest").and_then(Level::from_code),
                ) {
                    finest.insert(day, level);
                }
            }
            sparse = agg.use_density(&finest);
        }
        let bucket_reads = bucket_reads(plan);
        // A top list of pages by visitors over whole days: the month rows
        // of every name together first (one document per page), then the
        // rows of the pages that can make the list only, by `_id`.
        if let [read] = plan.reads.as_slice()
            && plan.any_name
            && bucket_reads
                .iter()
                .all(|(level, _)| ANY_NAME_LEVELS.contains(level))
            && let Some(months) = agg.bounded_page_top()
        {
            let any_dim = any_name_dim(&read.dim);
            let months = Buckets::Starts(months);
            let filter = rollup_filter(&plan.site_id, &any_dim, Level::Month, &months);
            self.read_rows(filter, &read.dim, true, &mut agg, left()?, session)
                .await?;
            let candidates = agg.bound_candidates();
            let mut batch = agg.wanted().max(16);
            let mut at = 0;
            while at < candidates.len() {
                let end = (at + batch).min(candidates.len());
                let mut ids = Vec::new();
                for (value, _) in &candidates[at..end] {
                    for (level, buckets) in &bucket_reads {
                        for bucket in buckets.starts(*level) {
                            ids.push(rollup_id(&RowKey {
                                site_id: &plan.site_id,
                                dim: &any_dim,
                                level: *level,
                                bucket,
                                value,
                                name: "",
                            }));
                        }
                    }
                }
                for chunk in ids.chunks(IN_CHUNK) {
                    let filter = doc! {"_id": {"$in": chunk}};
                    self.read_rows(filter, &read.dim, true, &mut agg, left()?, session)
                        .await?;
                }
                at = end;
                // Fewer round trips when the bounds are loose.
                batch *= 2;
                match candidates.get(at) {
                    Some((_, next)) if !agg.top_is_settled(*next) => {}
                    _ => break,
                }
            }
            return Ok(agg);
        }
        // Its reads cost per document: the month rows that only bound
        // visitors are not worth reading (see `Plan::bound_spans`).
        agg.without_month_bounds();
        for read in &plan.reads {
            let any_dim = any_name_dim(&read.dim);
            for (level, buckets) in &bucket_reads {
                let level = *level;
                let any_name = plan.any_name && ANY_NAME_LEVELS.contains(&level);
                let dim = if any_name { &any_dim } else { &read.dim };
                let filter = rollup_filter(&plan.site_id, dim, level, buckets);
                self.read_rows(filter, &read.dim, any_name, &mut agg, left()?, session)
                    .await?;
            }
        }
        let mut raw = Vec::new();
        for &(start, end) in plan.raw.iter().chain(&sparse) {
            let mut cursor = self
                .events
                .find(raw_plan_filter(plan, start, end))
                .max_time(left()?)
                .session(&mut *session)
                .await
                .map_err(|e| self.read_failure(e))?;
            while let Some(d) = cursor
                .next(&mut *session)
                .await
                .transpose()
                .map_err(|e| self.read_failure(e))?
            {
                if d.get_bool("pending") == Ok(true) {
                    continue;
                }
                let Some(e) = from_document(&d) else { continue };
                if !plan.raw_vids {
                    agg.add_event(&e, None);
                } else {
                    raw.push(e);
                }
            }
        }
        if !raw.is_empty() {
            let vids = self
                .known_vids(&plan.site_id, &raw, left()?, session)
                .await?;
            for e in &raw {
                let vid = crate::query::visitor_of(e).and_then(|v| vids.get(v).copied());
                agg.add_event(e, vid);
            }
        }
        Ok(agg)
    }

    /// Reads the rollup documents `filter` selects into `agg`, as rows of
    /// `dim` (the query's dimension, also for the rows of every name
    /// together, `any_name`, whose `pageviews` it reads).
    async fn read_rows(
        &self,
        filter: Document,
        dim: &str,
        any_name: bool,
        agg: &mut Aggregator,
        limit: Duration,
        session: &mut ClientSession,
    ) -> Result<(), ReadFailure> {
        let mut cursor = self
            .rollups
            .find(filter)
            .projection(
                doc! {"_id": 0, "level": 1, "bucket": 1, "value": 1, "name": 1,
                "events": 1, "pageviews": 1, "visitors": 1},
            )
            .max_time(limit)
            .session(&mut *session)
            .await
            .map_err(|e| self.read_failure(e))?;
        while let Some(d) = cursor
            .next(&mut *session)
            .await
            .transpose()
            .map_err(|e| self.read_failure(e))?
        {
            let (Some(level), Some(bucket), Ok(value), Ok(name), Ok(visitors)) = (
                number(&d, "level").and_then(Level::from_code),
                number(&d, "bucket"),
                d.get_str("value"),
                d.get_str("name"),
                d.get_binary_generic("visitors"),
            ) else {
                continue;
            };
            agg.add_row(RowRef {
                dim,
                level,
                bucket,
                value,
                name,
                events: number(&d, "events").unwrap_or(0).max(0) as u64,
                pageviews: any_name.then(|| number(&d, "pageviews").unwrap_or(0).max(0) as u64),
                visitors: Bits::Bytes(visitors),
            });
        }
        Ok(())
    }

    /// The dictionary ids of folded events' visitors (all of them are in the
    /// dictionary), from the cache or the server.
    async fn known_vids(
        &self,
        site_id: &str,
        events: &[Event],
        limit: Duration,
        session: &mut ClientSession,
    ) -> Result<HashMap<String, u32>, ReadFailure> {
        let mut vids = HashMap::new();
        let mut missing = Vec::new();
        {
            let mut cache = self.visitors.lock().unwrap_or_else(|p| p.into_inner());
            for e in events {
                let Some(v) = crate::query::visitor_of(e) else {
                    continue;
                };
                if vids.contains_key(v) {
                    continue;
                }
                match cache.get(&(site_id.to_owned(), v.to_owned())) {
                    Some(id) => {
                        vids.insert(v.to_owned(), id);
                    }
                    None => {
                        vids.insert(v.to_owned(), u32::MAX);
                        missing.push(v.to_owned());
                    }
                }
            }
        }
        for chunk in missing.chunks(IN_CHUNK) {
            let keys: Vec<String> = chunk.iter().map(|v| document_id(site_id, v)).collect();
            let mut cursor = self
                .visitor_ids
                .find(doc! {"_id": {"$in": keys}})
                .max_time(limit)
                .session(&mut *session)
                .await
                .map_err(|e| self.read_failure(e))?;
            while let Some(d) = cursor
                .next(&mut *session)
                .await
                .transpose()
                .map_err(|e| self.read_failure(e))?
            {
                if let (Ok(id), Some(vid)) = (d.get_str("_id"), number(&d, "vid"))
                    && let Some(visitor) = id
                        .strip_prefix(site_id)
                        .and_then(|r| r.strip_prefix(ID_SEPARATOR))
                {
                    vids.insert(visitor.to_owned(), vid as u32);
                }
            }
        }
        // A visitor the dictionary lacks (a document changed behind the
        // store's back) cannot be counted from rollups: leave it out rather
        // than count it as id u32::MAX.
        vids.retain(|_, v| *v != u32::MAX);
        Ok(vids)
    }
}

#[async_trait]
impl StoreAdmin for MongoStore {
    /// One transaction of at most 2,000 events (see the module docs); 0 when
    /// nothing is pending or another process is folding.
    async fn fold(&self, max_events: usize) -> Result<usize, StoreError> {
        let max = max_events.clamp(1, FOLD_BATCH);
        for attempt in 0..3 {
            match self.fold_once(max).await {
                Ok(n) => return Ok(n.unwrap_or(0)),
                Err(e) if e.contains_label(TRANSIENT_TRANSACTION_ERROR) && attempt < 2 => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(unavailable(e)),
            }
        }
        Ok(0)
    }

    fn fold_batch(&self) -> usize {
        FOLD_BATCH
    }

    async fn unfolded(&self) -> Result<u64, StoreError> {
        self.events
            .count_documents(pending_filter())
            .hint(Hint::Name(PENDING_INDEX.into()))
            .await
            .map_err(unavailable)
    }

    /// Empties the rollups, puts every event back into `pending` and folds
    /// them all; returns how many were folded.
    async fn rebuild_rollups(&self) -> Result<u64, StoreError> {
        self.reset().await.map_err(unavailable)?;
        super::fold_all(self).await
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
        for chunk in ids.chunks(IN_CHUNK) {
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

    async fn events_page(
        &self,
        site_id: &str,
        start: i64,
        end: i64,
        after: Option<PageAfter>,
        limit: usize,
    ) -> Result<EventPage, StoreError> {
        use futures::TryStreamExt;
        // Keyset pagination on (timestamp, _id): the time index gives the
        // range, ties on a millisecond are sorted by `_id` (unique).
        let from = after.as_ref().map_or(start, |a| a.ts);
        // Open ends stay open: some servers cannot decode a date in the
        // year 292,278,994, which `i64::MAX` milliseconds is.
        let mut time = Document::new();
        if from > i64::MIN {
            time.insert("$gte", DateTime::from_millis(from));
        }
        if end < i64::MAX {
            time.insert("$lt", DateTime::from_millis(end));
        }
        let mut filter = doc! {"site_id": site_id};
        if !time.is_empty() {
            filter.insert("timestamp", time);
        }
        if let Some(a) = &after {
            filter.insert(
                "$or",
                vec![
                    doc! {"timestamp": {"$gt": DateTime::from_millis(a.ts)}},
                    doc! {"_id": {"$gt": a.key.as_str()}},
                ],
            );
        }
        let docs: Vec<Document> = self
            .events
            .find(filter)
            .sort(doc! {"timestamp": 1, "_id": 1})
            .limit(i64::try_from(limit).unwrap_or(i64::MAX))
            .max_time(self.query_timeout)
            .await
            .map_err(|e| self.read_error(e))?
            .try_collect()
            .await
            .map_err(|e| self.read_error(e))?;
        let next = match docs.last() {
            Some(d) if docs.len() >= limit => {
                let after = (|| {
                    Some(PageAfter {
                        ts: d.get_datetime("timestamp").ok()?.timestamp_millis(),
                        key: d.get_str("_id").ok()?.to_owned(),
                    })
                })();
                // Never end an export early without saying so.
                Some(after.ok_or_else(|| {
                    StoreError::Unavailable(
                        "an event document has no date `timestamp` or text `_id`".into(),
                    )
                })?)
            }
            _ => None,
        };
        // Written by `insert` from an `Event`; anything else is skipped.
        let events = docs.iter().filter_map(from_document).collect();
        Ok(EventPage { events, next })
    }

    async fn set_kept_from(&self, cutoff: i64) -> Result<(), StoreError> {
        self.holding_fold(Held::MoveStart(cutoff)).await.map(|_| ())
    }

    async fn delete_expired(&self, max_events: usize) -> Result<usize, StoreError> {
        use futures::TryStreamExt;
        let Some(state) = self
            .state
            .find_one(doc! {"_id": RETENTION_STATE})
            .await
            .map_err(unavailable)?
        else {
            return Ok(0);
        };
        let (Some(cutoff), cleaned_to) =
            (number(&state, "kept_from"), number(&state, "cleaned_to"))
        else {
            return Ok(0);
        };
        let sites = self
            .distinct_texts(&self.events, "site_id", doc! {})
            .await?;
        let mut deleted = 0usize;
        for site in sites {
            if deleted >= max_events {
                break;
            }
            let ids: Vec<Bson> = self
                .events
                .find(doc! {"site_id": &site, "timestamp": {"$lt": DateTime::from_millis(cutoff)}})
                .projection(doc! {"_id": 1})
                .limit((max_events - deleted) as i64)
                .await
                .map_err(unavailable)?
                .try_collect::<Vec<Document>>()
                .await
                .map_err(unavailable)?
                .into_iter()
                .filter_map(|d| d.get("_id").cloned())
                .collect();
            for chunk in ids.chunks(IN_CHUNK) {
                self.events
                    .delete_many(doc! {"_id": {"$in": chunk}})
                    .await
                    .map_err(unavailable)?;
            }
            deleted += ids.len();
        }
        if deleted < max_events && cleaned_to.is_none_or(|c| c < cutoff) {
            self.holding_fold(Held::Clean(cutoff)).await?;
        }
        Ok(deleted)
    }

    async fn erase(&self, site_id: &str, visitor: &str, now_ms: i64) -> Result<u64, StoreError> {
        let erased = self
            .holding_fold(Held::Erase {
                site: site_id,
                visitor,
                now_ms,
            })
            .await?;
        let mut cache = self.visitors.lock().unwrap_or_else(|p| p.into_inner());
        cache.remove(&(site_id.to_owned(), visitor.to_owned()));
        Ok(erased)
    }

    fn kind(&self) -> &'static str {
        "mongodb"
    }
}

#[async_trait]
impl RegistryStore for MongoStore {
    async fn registry(&self) -> Result<crate::sites::Stored, StoreError> {
        use futures::TryStreamExt;
        let limit = crate::sites::MAX_SITES as i64 * 2;
        let docs: Vec<Document> = self
            .sites
            .find(doc! {})
            .sort(doc! {"_id": 1})
            .limit(limit)
            .max_time(self.query_timeout)
            .await
            .map_err(unavailable)?
            .try_collect()
            .await
            .map_err(unavailable)?;
        let sites = docs
            .iter()
            .filter_map(|d| {
                let id = d.get_str("_id").ok()?.to_owned();
                let text = d.get_str("settings").ok()?;
                Some((
                    id,
                    serde_json::from_str(text).unwrap_or(serde_json::Value::Null),
                ))
            })
            .collect();
        let docs: Vec<Document> = self
            .read_tokens
            .find(doc! {})
            .sort(doc! {"_id": 1})
            .limit(crate::sites::MAX_TOKENS as i64 * 2)
            .max_time(self.query_timeout)
            .await
            .map_err(unavailable)?
            .try_collect()
            .await
            .map_err(unavailable)?;
        let tokens = docs
            .iter()
            .filter_map(|d| serde_json::from_str(d.get_str("record").ok()?).ok())
            .collect();
        Ok(crate::sites::Stored { sites, tokens })
    }

    async fn put_site(
        &self,
        site_id: &str,
        settings: &serde_json::Value,
    ) -> Result<(), StoreError> {
        self.sites
            .replace_one(
                doc! {"_id": site_id},
                doc! {"_id": site_id, "settings": settings.to_string()},
            )
            .upsert(true)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn delete_site(&self, site_id: &str) -> Result<bool, StoreError> {
        let r = self
            .sites
            .delete_one(doc! {"_id": site_id})
            .await
            .map_err(unavailable)?;
        Ok(r.deleted_count > 0)
    }

    async fn put_token(&self, token: &crate::sites::TokenRecord) -> Result<(), StoreError> {
        let text = serde_json::to_string(token)
            .map_err(|e| StoreError::Unavailable(format!("token record: {e}")))?;
        self.read_tokens
            .insert_one(doc! {"_id": &token.id, "record": text})
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn revoke_token(&self, id: &str) -> Result<bool, StoreError> {
        let r = self
            .read_tokens
            .delete_one(doc! {"_id": id})
            .await
            .map_err(unavailable)?;
        Ok(r.deleted_count > 0)
    }
}
