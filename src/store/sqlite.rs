//! The embedded store: SQLite in WAL mode, one file in `DATA_DIR`.
//!
//! rusqlite is synchronous, so every call runs on tokio's blocking pool. There
//! is one writer connection (SQLite allows one writer at a time anyway, and a
//! single connection lets a whole batch commit in one transaction) and one
//! reader connection; in WAL mode readers never block the writer.
//!
//! Queries read rollups ([`crate::rollup`]), kept beside the raw events.
//! The insert writes raw events only, so ingest pays for three append-mostly
//! b-trees (the table in arrival order, the identity index, the time index)
//! and nothing else. [`SqliteStore::fold`] then counts new events into the
//! rollups, in arrival order (`seq`), and moves a watermark (`fold_state`)
//! in the same transaction: a crash at any point leaves every event counted
//! once or not yet, and the next fold, in this process or another, takes up
//! from the watermark. Queries read one snapshot and leave out events past
//! the watermark, so raw events and rollups always agree. The raw `events`
//! table stays the source of truth: [`SqliteStore::rebuild_rollups`] drops
//! the rollups and folds everything again.
//!
//! Visitor ids (for the rollups' bitmaps) come from a dictionary table,
//! `visitors`, given out per site in order by the fold. A bounded cache in
//! memory spares most lookups; a mapping never changes once committed, so a
//! cache is never stale, whichever process wrote the mapping.
//!
//! Durability ([`Durability`]): `synchronous=NORMAL` in WAL mode makes a
//! commit survive the process being killed (`kill -9`), but a power loss or
//! OS crash can lose the last commits, which sat in the OS's cache. That is
//! the embedded mode's choice, said so in the README. Behind a Redis queue the
//! worker deletes entries from Redis once the store has them, so there every
//! commit is synced to disk first (`synchronous=FULL`): nothing acknowledged to
//! Redis lives only in the OS cache.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, params};

use super::{
    EventPage, EventSink, InsertOutcome, PageAfter, QueryStore, RegistryStore, StoreAdmin,
    StoreError,
};
use crate::event::{Event, EventId, EventName, SiteId};
use crate::query::engine::{Aggregator, Bits, Plan, RowRef};
use crate::rollup::{self, DayState, Deltas, Density, Level, SiteDays};
use crate::visit_rollup::Deltas as VisitDeltas;

pub const FILE_NAME: &str = "evtrack.sqlite3";

/// See [`SqliteStore::open`].
const WAL_AUTOCHECKPOINT_PAGES: i64 = 16_384;
/// See [`SqliteStore::open_with`].
const READER_MMAP_BYTES: i64 = 1 << 40;

/// Schema migrations, applied in order; `PRAGMA user_version` records how many
/// have run. Never edit a released entry: append a new one.
pub const MIGRATIONS: &[&str] = &[
    // 1: raw events keyed by event id (the idempotency key; WITHOUT ROWID
    // keeps one b-tree instead of a table plus a unique index), and the daily
    // aggregates. `day` is the UTC day number, `ts` div 86,400,000.
    "CREATE TABLE events (
        id         TEXT PRIMARY KEY NOT NULL,
        site_id    TEXT NOT NULL,
        event_type TEXT NOT NULL,
        path       TEXT,
        userid     TEXT,
        ts         INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        props      TEXT
    ) WITHOUT ROWID;
    CREATE TABLE day_totals (
        site_id TEXT NOT NULL, event_type TEXT NOT NULL, day INTEGER NOT NULL,
        views INTEGER NOT NULL, users INTEGER NOT NULL,
        PRIMARY KEY (site_id, event_type, day)
    ) WITHOUT ROWID;
    CREATE TABLE day_users (
        site_id TEXT NOT NULL, event_type TEXT NOT NULL, day INTEGER NOT NULL, userid TEXT NOT NULL,
        PRIMARY KEY (site_id, event_type, day, userid)
    ) WITHOUT ROWID;
    CREATE TABLE day_paths (
        site_id TEXT NOT NULL, event_type TEXT NOT NULL, day INTEGER NOT NULL, path TEXT NOT NULL,
        views INTEGER NOT NULL, users INTEGER NOT NULL,
        PRIMARY KEY (site_id, event_type, day, path)
    ) WITHOUT ROWID;
    CREATE INDEX day_paths_top ON day_paths (site_id, event_type, day, views DESC, users DESC, path);
    CREATE TABLE day_path_users (
        site_id TEXT NOT NULL, event_type TEXT NOT NULL, day INTEGER NOT NULL, path TEXT NOT NULL,
        userid TEXT NOT NULL,
        PRIMARY KEY (site_id, event_type, day, path, userid)
    ) WITHOUT ROWID;",
    // 2: an event's identity is (site_id, id): two sites may use the same
    // event id (and one site must not be able to pre-claim another's ids).
    // SQLite cannot change a primary key in place: copy into a new table.
    "CREATE TABLE events_v2 (
        site_id    TEXT NOT NULL,
        id         TEXT NOT NULL,
        event_type TEXT NOT NULL,
        path       TEXT,
        userid     TEXT,
        ts         INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        props      TEXT,
        PRIMARY KEY (site_id, id)
    ) WITHOUT ROWID;
    INSERT INTO events_v2 (site_id, id, event_type, path, userid, ts, created_at, props)
        SELECT site_id, id, event_type, path, userid, ts, created_at, props FROM events;
    DROP TABLE events;
    ALTER TABLE events_v2 RENAME TO events;",
    // 3: rollups replace the daily aggregates. Raw events get an arrival
    // sequence (the fold's watermark follows it; AUTOINCREMENT: a sequence
    // number is never given out twice, even after the newest rows are
    // deleted), an identity index and a time index. The fold starts at 0,
    // so the first start after this migration rebuilds the rollups from
    // the raw events.
    "ALTER TABLE events RENAME TO events_v2;
    CREATE TABLE events (
        seq        INTEGER PRIMARY KEY AUTOINCREMENT,
        site_id    TEXT NOT NULL,
        id         TEXT NOT NULL,
        event_type TEXT NOT NULL,
        path       TEXT,
        userid     TEXT,
        ts         INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        props      TEXT
    );
    INSERT INTO events (site_id, id, event_type, path, userid, ts, created_at, props)
        SELECT site_id, id, event_type, path, userid, ts, created_at, props FROM events_v2 ORDER BY ts;
    DROP TABLE events_v2;
    CREATE UNIQUE INDEX events_identity ON events (site_id, id);
    CREATE INDEX events_time ON events (site_id, ts);
    DROP TABLE day_totals; DROP TABLE day_users; DROP TABLE day_paths; DROP TABLE day_path_users;
    CREATE TABLE visitors (
        site_id TEXT NOT NULL, visitor TEXT NOT NULL, vid INTEGER NOT NULL,
        PRIMARY KEY (site_id, visitor)
    ) WITHOUT ROWID;
    CREATE TABLE sites (site_id TEXT PRIMARY KEY NOT NULL, next_vid INTEGER NOT NULL) WITHOUT ROWID;
    CREATE TABLE rollups (
        id       INTEGER PRIMARY KEY,
        site_id  TEXT NOT NULL,
        dim      TEXT NOT NULL,
        level    INTEGER NOT NULL,
        bucket   INTEGER NOT NULL,
        value    TEXT NOT NULL,
        name     TEXT NOT NULL,
        events   INTEGER NOT NULL,
        visitors BLOB NOT NULL
    );
    CREATE UNIQUE INDEX rollups_key ON rollups (site_id, dim, level, bucket, value, name);
    CREATE INDEX rollups_value ON rollups (site_id, dim, value, level, bucket);
    CREATE TABLE fold_state (one INTEGER PRIMARY KEY CHECK (one = 1), folded INTEGER NOT NULL);
    INSERT INTO fold_state VALUES (1, 0);",
    // 4: rollup rows keep their visitors' count, and their bitmap in a table
    // of its own: a query reads the rows in key order from one b-tree
    // (WITHOUT ROWID, no lookup per row into a second one), with counts
    // and cardinalities, and reads bitmaps only for the groups it must
    // count exactly (a top 10 of 1,000 pages: a few dozen). The rollups are
    // folded again from the raw events on the next start.
    "DROP TABLE rollups;
    CREATE TABLE rollup_bitmaps (id INTEGER PRIMARY KEY, visitors BLOB NOT NULL);
    CREATE TABLE rollups (
        site_id  TEXT NOT NULL,
        dim      TEXT NOT NULL,
        level    INTEGER NOT NULL,
        bucket   INTEGER NOT NULL,
        value    TEXT NOT NULL,
        name     TEXT NOT NULL,
        events   INTEGER NOT NULL,
        visitors INTEGER NOT NULL,
        bitmap   INTEGER NOT NULL,
        PRIMARY KEY (site_id, dim, level, bucket, value, name)
    ) WITHOUT ROWID;
    CREATE INDEX rollups_value ON rollups (site_id, dim, value, level, bucket);
    UPDATE fold_state SET folded = 0;",
    // 5: sparse days (see `crate::rollup`): what each site's UTC day keeps.
    // `finest` is the code of the finest level it keeps rows of. The
    // rollups are folded again from the raw events on the next start.
    "CREATE TABLE site_days (
        site_id TEXT NOT NULL,
        day     INTEGER NOT NULL,
        events  INTEGER NOT NULL,
        finest  INTEGER NOT NULL,
        PRIMARY KEY (site_id, day)
    ) WITHOUT ROWID;
    DELETE FROM rollups;
    DELETE FROM rollup_bitmaps;
    UPDATE fold_state SET folded = 0;",
    // 6: the identity index by event id first: ids are mostly given out in
    // order (time-ordered UUIDs, counters), so a batch's new entries land
    // at the end of one index instead of at the end of each site's part of
    // it (with many sites, a page per site and batch).
    "DROP INDEX events_identity;
    CREATE UNIQUE INDEX events_identity ON events (id, site_id);",
    // 7: the cookieless visitor id of an event without a `userid`, and
    // what is known of where it came from (`Context`, as JSON).
    // The salts of cookieless visitor ids (`crate::visitor`), by UTC day.
    "ALTER TABLE events ADD COLUMN visitor TEXT;
    ALTER TABLE events ADD COLUMN ctx TEXT;
    CREATE TABLE salts (day INTEGER PRIMARY KEY, salt BLOB NOT NULL);",
    // 8: visits (`crate::session`), kept by the fold beside the rollups:
    // each a summary (`data`, JSON), found by its visitor and first event.
    // A rowid table (rows of a few hundred bytes): a visit that grows is
    // updated in place, and the indexes stay small. Folded again from the
    // raw events on the next start.
    "CREATE TABLE visits (
        id       INTEGER PRIMARY KEY,
        site_id  TEXT NOT NULL,
        visitor  TEXT NOT NULL,
        start_ts INTEGER NOT NULL,
        start_id TEXT NOT NULL,
        end_ts   INTEGER NOT NULL,
        data     TEXT NOT NULL
    );
    CREATE UNIQUE INDEX visits_visitor ON visits (site_id, visitor, start_ts, start_id);
    CREATE INDEX visits_start ON visits (site_id, start_ts);
    DELETE FROM rollups;
    DELETE FROM rollup_bitmaps;
    DELETE FROM site_days;
    UPDATE fold_state SET folded = 0;",
    // 9: erasures in force (`StoreAdmin::erase`): a digest of the person,
    // never the id, and when; and retention's state: the start of what is
    // kept (`kept_from`) and how far the rollups, site-days and visits have
    // been cleaned (`cleaned_to`).
    "CREATE TABLE erasures (
        digest    BLOB PRIMARY KEY NOT NULL,
        erased_at INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE retention (
        one        INTEGER PRIMARY KEY CHECK (one = 1),
        kept_from  INTEGER NOT NULL,
        cleaned_to INTEGER NOT NULL
    );",
    // 10: the site registry (`crate::sites`): settings as JSON, and read
    // tokens made at run time, by their digests.
    "CREATE TABLE site_settings (
        site_id  TEXT PRIMARY KEY NOT NULL,
        settings TEXT NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE read_tokens (
        id     TEXT PRIMARY KEY NOT NULL,
        record TEXT NOT NULL
    ) WITHOUT ROWID;",
    // 11: visit rollups (`crate::visit_rollup`), kept by the fold: every
    // derived table is made again from the raw events, the visits and
    // their rollups together (the next open folds them all).
    "CREATE TABLE visit_rollups (
        id          INTEGER PRIMARY KEY,
        site_id     TEXT NOT NULL,
        dim         TEXT NOT NULL,
        level       INTEGER NOT NULL,
        bucket      INTEGER NOT NULL,
        value       TEXT NOT NULL,
        visits      INTEGER NOT NULL,
        bounces     INTEGER NOT NULL,
        duration_ms INTEGER NOT NULL,
        pageviews   INTEGER NOT NULL,
        events      INTEGER NOT NULL,
        visitors    BLOB NOT NULL,
        counts      BLOB NOT NULL
    );
    CREATE UNIQUE INDEX visit_rollups_key ON visit_rollups (site_id, dim, level, bucket, value);
    DELETE FROM rollups;
    DELETE FROM rollup_bitmaps;
    DELETE FROM site_days;
    DELETE FROM visits;
    UPDATE fold_state SET folded = 0;",
];
/// When a commit is on disk. See the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// `synchronous=NORMAL`: survives a process kill, not an OS crash.
    #[default]
    Process,
    /// `synchronous=FULL`: every commit is synced to disk before it returns.
    Disk,
}

/// How the store is opened.
#[derive(Debug, Clone, Copy)]
pub struct SqliteOptions {
    pub durability: Durability,
    /// A stats query running longer than this is interrupted.
    pub query_timeout: Duration,
    /// Which levels of rollups a site's day keeps (see [`crate::rollup`]).
    pub density: Density,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self {
            durability: Durability::default(),
            query_timeout: crate::config::DEFAULT_STATS_TIMEOUT,
            density: Density::default(),
        }
    }
}

#[derive(Clone)]
pub struct SqliteStore {
    // std Mutex, not tokio's: the lock is only ever taken inside
    // `spawn_blocking`, never held across an `.await`.
    writer: Arc<Mutex<Connection>>,
    reader: Arc<Mutex<Connection>>,
    query_timeout: Duration,
    density: Density,
    /// Committed (site, visitor) → id mappings; bounded.
    visitors: Arc<Mutex<super::VisitorCache>>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct OpenError(String);

/// What a backup or a restore copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupSummary {
    pub events: u64,
    pub bytes: u64,
}

impl std::fmt::Display for BackupSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} events, {} bytes", self.events, self.bytes)
    }
}

fn summary_of(conn: &Connection, file: &Path) -> rusqlite::Result<BackupSummary> {
    let events: i64 = conn.query_row("SELECT count(*) FROM events", [], |r| r.get(0))?;
    Ok(BackupSummary {
        events: events as u64,
        bytes: std::fs::metadata(file).map_or(0, |m| m.len()),
    })
}

impl SqliteStore {
    /// Opens (creating if needed) the database in `dir` and runs migrations,
    /// with the default options.
    pub fn open(dir: &Path) -> Result<Self, OpenError> {
        Self::open_with(dir, SqliteOptions::default())
    }

    /// Opens (creating if needed) the database in `dir` and runs migrations.
    pub fn open_with(dir: &Path, options: SqliteOptions) -> Result<Self, OpenError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| OpenError(format!("cannot create {}: {e}", dir.display())))?;
        let path = dir.join(FILE_NAME);
        let fail = |e: rusqlite::Error| OpenError(format!("cannot open {}: {e}", path.display()));
        let mut writer = Connection::open(&path).map_err(fail)?;
        configure(&writer).map_err(fail)?;
        let synchronous = match options.durability {
            Durability::Process => "NORMAL",
            Durability::Disk => "FULL",
        };
        writer
            .pragma_update(None, "synchronous", synchronous)
            .map_err(fail)?;
        // Folds rewrite rollup rows and look visitors up all over their
        // b-trees: a page cache of 32 MiB instead of SQLite's 2 MiB keeps
        // the hot pages in memory instead of re-reading them from the OS.
        writer
            .pragma_update(None, "cache_size", -32 * 1024)
            .map_err(fail)?;
        // Checkpoint every 16,384 WAL pages (64 MiB) instead of SQLite's
        // 1,000: a checkpoint writes every page the WAL holds back into the
        // database and fsyncs both files, and the rollup pages are
        // rewritten by almost every fold, so the rarer the checkpoint, the
        // fewer times each page is written (measured with `evtrack-bench
        // store-insert` when the aggregates were in the insert's
        // transaction: 55k → 73k events/s at 10,000 pages, 83k at 50,000).
        writer
            .pragma_update(None, "wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES)
            .map_err(fail)?;
        // Deleted and moved content is zeroed where that costs no I/O (a
        // page that splits or whose cells are deleted is rewritten zeroed),
        // so that an erasure, which turns this to ON while it runs, does
        // not leave the person's rows in the unused space of a page that
        // split long before.
        writer
            .pragma_update(None, "secure_delete", "FAST")
            .map_err(fail)?;
        migrate(&mut writer).map_err(fail)?;
        let reader = Connection::open(&path).map_err(fail)?;
        configure(&reader).map_err(fail)?;
        // Queries read many rollup pages: mapped, SQLite reads them in place
        // from the OS's cache instead of copying each page through a read
        // call (which took half of a top-pages query's time). Only address
        // space: the pages are the OS's file cache, shared, not the
        // process's own memory.
        reader
            .pragma_update(None, "mmap_size", READER_MMAP_BYTES)
            .map_err(fail)?;
        Ok(Self {
            writer: Arc::new(Mutex::new(writer)),
            reader: Arc::new(Mutex::new(reader)),
            query_timeout: options.query_timeout,
            density: options.density,
            visitors: Arc::default(),
        })
    }

    /// Copies the database in `dir` into a new file `to`, while the service
    /// may be running: SQLite's online backup API in one step, which reads
    /// one consistent snapshot (in WAL mode, a reader: writers go on
    /// meanwhile) and writes it page by page, so memory stays small. The
    /// copy is a complete database file that `restore` (or `sqlite3`)
    /// opens. Refuses to overwrite a file.
    pub fn backup(dir: &Path, to: &Path) -> Result<BackupSummary, OpenError> {
        let path = dir.join(FILE_NAME);
        if !path.is_file() {
            return Err(OpenError(format!("no database at {}", path.display())));
        }
        if to.exists() {
            return Err(OpenError(format!(
                "{} exists: back up into a new file",
                to.display()
            )));
        }
        let fail = |e: rusqlite::Error| OpenError(format!("backup failed: {e}"));
        // Read-only: a backup never migrates or writes the live file.
        let src = Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(fail)?;
        src.busy_timeout(Duration::from_secs(5)).map_err(fail)?;
        let mut dst = Connection::open(to).map_err(fail)?;
        let copied = (|| {
            {
                let backup = rusqlite::backup::Backup::new(&src, &mut dst)?;
                // -1: every page in one step, from one snapshot (steps of a
                // few pages would restart whenever the service writes).
                while backup.step(-1)? != rusqlite::backup::StepResult::Done {}
            }
            summary_of(&dst, to)
        })();
        if copied.is_err() {
            drop(dst);
            let _ = std::fs::remove_file(to);
        }
        copied.map_err(fail)
    }

    /// Makes `from` (a file made by [`SqliteStore::backup`]) the database of
    /// `dir`, which must hold none: stop the service and move the old data
    /// directory aside first. The file is checked first (an SQLite database
    /// that passes `quick_check`, of a schema this evtrack knows).
    pub fn restore(from: &Path, dir: &Path) -> Result<BackupSummary, OpenError> {
        let path = dir.join(FILE_NAME);
        if path.exists() {
            return Err(OpenError(format!(
                "{} exists: stop the service and move its data directory aside first",
                path.display()
            )));
        }
        let bad =
            |e: rusqlite::Error| OpenError(format!("{} is not a backup: {e}", from.display()));
        let src = Connection::open_with_flags(from, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(bad)?;
        let check: String = src
            .query_row("PRAGMA quick_check", [], |r| r.get(0))
            .map_err(bad)?;
        if check != "ok" {
            return Err(OpenError(format!(
                "{} is damaged: quick_check says {check}",
                from.display()
            )));
        }
        let version: i64 = src
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(bad)?;
        let has_events: bool = src
            .query_row(
                "SELECT count(*) > 0 FROM sqlite_schema WHERE type = 'table' AND name = 'events'",
                [],
                |r| r.get(0),
            )
            .map_err(bad)?;
        if version < 1 || version as usize > MIGRATIONS.len() || !has_events {
            return Err(OpenError(format!(
                "{} is not an evtrack database this version can open (schema {version})",
                from.display()
            )));
        }
        std::fs::create_dir_all(dir)
            .map_err(|e| OpenError(format!("cannot create {}: {e}", dir.display())))?;
        let fail = |e: rusqlite::Error| OpenError(format!("restore failed: {e}"));
        let mut dst = Connection::open(&path).map_err(fail)?;
        let copied = (|| {
            {
                let backup = rusqlite::backup::Backup::new(&src, &mut dst)?;
                while backup.step(-1)? != rusqlite::backup::StepResult::Done {}
            }
            summary_of(&dst, &path)
        })();
        if copied.is_err() {
            drop(dst);
            let _ = std::fs::remove_file(&path);
        }
        copied.map_err(fail)
    }

    /// Runs a read on the reader connection within the query time limit,
    /// counted from the call: a read that waited its turn past the limit does
    /// not start, and one that runs past it is stopped at its next few
    /// thousand steps (a progress handler of this call alone, so that one
    /// read's limit never stops another's).
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let limit = self.query_timeout;
        let deadline = std::time::Instant::now() + limit;
        let conn = Arc::clone(&self.reader);
        let run = tokio::task::spawn_blocking(move || {
            let mut conn = conn.lock().unwrap_or_else(|p| p.into_inner());
            if std::time::Instant::now() >= deadline {
                return Err(StoreError::Timeout(limit));
            }
            conn.progress_handler(
                PROGRESS_STEPS,
                Some(move || std::time::Instant::now() >= deadline),
            )
            .map_err(sqlite_error)?;
            let result = f(&mut conn);
            let _ = conn.progress_handler(0, None::<fn() -> bool>);
            result.map_err(|e| match e.sqlite_error_code() {
                Some(rusqlite::ErrorCode::OperationInterrupted) => StoreError::Timeout(limit),
                _ => sqlite_error(e),
            })
        });
        // The closure gives up by itself at the deadline; this bound only
        // covers a thread that never gets to run it.
        match tokio::time::timeout(limit + Duration::from_millis(100), run).await {
            Ok(Ok(result)) => result,
            Ok(Err(e)) => Err(StoreError::Unavailable(format!("sqlite task failed: {e}"))),
            Err(_) => Err(StoreError::Timeout(limit)),
        }
    }

    async fn with_conn<T: Send + 'static>(
        conn: &Arc<Mutex<Connection>>,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let conn = Arc::clone(conn);
        tokio::task::spawn_blocking(move || {
            // A panic while holding the lock cannot leave a half-applied
            // transaction (SQLite rolls it back), so a poisoned lock is usable.
            let mut guard = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut guard)
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("sqlite task failed: {e}")))?
        .map_err(sqlite_error)
    }
}

/// Virtual-machine steps between two looks at a read's deadline: a few
/// microseconds of work, so a stopped query ends within a millisecond or so.
const PROGRESS_STEPS: std::ffi::c_int = 10_000;

fn sqlite_error(e: rusqlite::Error) -> StoreError {
    StoreError::Unavailable(format!("sqlite: {e}"))
}

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    // First: switching to WAL needs the file to itself for a moment, and
    // another process (`evtrack api` and `evtrack worker` on one file) may be
    // holding it; without a busy timeout that is an immediate SQLITE_BUSY.
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    // Two connections switching a new file to WAL at once can deadlock (both
    // hold a shared lock and want the exclusive one); SQLite then answers
    // BUSY at once instead of waiting, so the wait is here.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match conn.pragma_update(None, "journal_mode", "WAL") {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            result => break result?,
        }
    }
    // Readers write nothing; the writer sets its own level (see `open_with`).
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    Ok(())
}

fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    // IMMEDIATE takes the write lock before the version is read: two
    // processes opening a new file at once must not both see version 0 and
    // both create the tables (the second would fail on "already exists").
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let version: usize =
        tx.pragma_query_value(None, "user_version", |r| r.get::<_, i64>(0))? as usize;
    if version > MIGRATIONS.len() {
        return Err(rusqlite::Error::InvalidParameterName(format!(
            "database schema version {version} is newer than this evtrack ({}); upgrade evtrack",
            MIGRATIONS.len()
        )));
    }
    for sql in MIGRATIONS.iter().skip(version) {
        tx.execute_batch(sql)?;
    }
    tx.pragma_update(None, "user_version", MIGRATIONS.len() as i64)?;
    tx.commit()
}

/// The ids of events as SQLite values: text, parsed again when read.
macro_rules! sql_text_id {
    ($($t:ty),*) => {$(
        impl rusqlite::types::ToSql for $t {
            fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
                Ok(self.as_str().into())
            }
        }

        impl rusqlite::types::FromSql for $t {
            fn column_result(v: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
                <$t>::parse(v.as_str()?).map_err(|e| rusqlite::types::FromSqlError::Other(Box::new(e)))
            }
        }
    )*};
}
sql_text_id!(SiteId, EventId, EventName);

/// Columns of an event row, in the order [`event_from_row`] reads them.
const EVENT_COLUMNS: &str = "e.id, e.site_id, e.event_type, e.path, e.userid, e.ts, e.created_at, e.props, e.visitor, e.ctx";

fn event_from_row(r: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<Event> {
    let props: Option<String> = r.get(first + 7)?;
    Ok(Event {
        id: r.get(first)?,
        site_id: r.get(first + 1)?,
        event_type: r.get(first + 2)?,
        path: r.get(first + 3)?,
        userid: r.get(first + 4)?,
        ts: r.get(first + 5)?,
        created_at: r.get(first + 6)?,
        // Written by `insert` from a JSON object; anything else is no props.
        props: props.and_then(|p| serde_json::from_str(&p).ok()),
        visitor: r.get(first + 8)?,
        ctx: context_from(r.get_ref(first + 9)?.as_str_or_null()?),
    })
}

/// A `ctx` column as written by `insert`; anything else is no context.
fn context_from(text: Option<&str>) -> Option<Box<crate::event::Context>> {
    text.and_then(|c| serde_json::from_str(c).ok())
}

/// One fold: up to `max` events past the watermark into the rollups, and
/// the watermark past them, in one transaction. See the module docs.
fn fold(
    conn: &mut Connection,
    cache: &Mutex<super::VisitorCache>,
    density: Density,
    max: usize,
) -> rusqlite::Result<usize> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let folded: i64 = tx.query_row("SELECT folded FROM fold_state", [], |r| r.get(0))?;

    let mut events = Vec::new();
    let mut last = folded;
    {
        let mut stmt = tx.prepare_cached(&format!(
            "SELECT e.seq, {EVENT_COLUMNS} FROM events e WHERE e.seq > ?1 ORDER BY e.seq LIMIT ?2"
        ))?;
        let mut rows = stmt.query(params![folded, max as i64])?;
        while let Some(r) = rows.next()? {
            last = r.get(0)?;
            events.push(event_from_row(r, 1)?);
        }
    }
    if events.is_empty() {
        return Ok(0);
    }
    // The site-days the events fall on, and the earlier events of those
    // that now keep finer levels (see `crate::rollup`, "Sparse days").
    let counts = rollup::day_counts(&events);
    let stored = stored_days(&tx, &counts)?;
    let changes = rollup::day_changes(&counts, &stored, density);
    let mut earlier = Vec::new();
    {
        let mut stmt = tx.prepare_cached(&format!(
            "SELECT {EVENT_COLUMNS} FROM events e
             WHERE e.site_id = ?1 AND e.ts >= ?2 AND e.ts < ?3 AND e.seq <= ?4"
        ))?;
        for (site, days) in &changes {
            for (&day, change) in days {
                if change.backfill().is_empty() || change.before.events == 0 {
                    continue;
                }
                let mut rows = stmt.query(params![site, day, Level::Day.next(day), folded])?;
                while let Some(r) = rows.next()? {
                    earlier.push(event_from_row(r, 0)?);
                }
            }
        }
    }
    // Visitor ids: the cache, else the dictionary, else new ones.
    let mut ids: HashMap<(String, String), u32> = HashMap::new();
    let mut fresh: Vec<(String, String)> = Vec::new();
    {
        let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
        let mut lookup =
            tx.prepare_cached("SELECT vid FROM visitors WHERE site_id = ?1 AND visitor = ?2")?;
        for e in events.iter().chain(&earlier) {
            let Some(visitor) = crate::query::visitor_of(e) else {
                continue;
            };
            let key = (e.site_id.as_str().to_owned(), visitor.to_owned());
            if ids.contains_key(&key) {
                continue;
            }
            let known = match cache.get(&key) {
                Some(v) => Some(v),
                None => lookup
                    .query_row(params![key.0, key.1], |r| r.get::<_, i64>(0))
                    .optional()?
                    .map(|v| v as u32),
            };
            match known {
                Some(v) => {
                    ids.insert(key, v);
                }
                None => {
                    ids.insert(key.clone(), u32::MAX);
                    fresh.push(key);
                }
            }
        }
    }
    if !fresh.is_empty() {
        let mut next_of: HashMap<String, i64> = HashMap::new();
        let mut get_next = tx.prepare_cached("SELECT next_vid FROM sites WHERE site_id = ?1")?;
        let mut add = tx.prepare_cached("INSERT INTO visitors VALUES (?1, ?2, ?3)")?;
        for key in &fresh {
            let next = match next_of.get_mut(&key.0) {
                Some(n) => n,
                None => {
                    let n = get_next
                        .query_row([&key.0], |r| r.get::<_, i64>(0))
                        .optional()?
                        .unwrap_or(0);
                    next_of.entry(key.0.clone()).or_insert(n)
                }
            };
            let vid = u32::try_from(*next)
                .map_err(|_| rusqlite::Error::IntegralValueOutOfRange(0, *next))?;
            *next += 1;
            add.execute(params![key.0, key.1, vid])?;
            ids.insert(key.clone(), vid);
        }
        let mut set_next = tx.prepare_cached(
            "INSERT INTO sites VALUES (?1, ?2) ON CONFLICT DO UPDATE SET next_vid = excluded.next_vid",
        )?;
        for (site, next) in &next_of {
            set_next.execute(params![site, next])?;
        }
    }
    let deltas = Deltas::of(&events, &earlier, &changes, &ids);
    {
        let mut put = tx.prepare_cached(
            "INSERT INTO site_days VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT DO UPDATE SET events = excluded.events, finest = excluded.finest",
        )?;
        for (site, days) in &changes {
            for (&day, change) in days {
                put.execute(params![
                    site,
                    day,
                    change.after.events as i64,
                    change.after.finest.code()
                ])?;
            }
        }
    }
    {
        let mut read = tx.prepare_cached(
            "SELECT bitmap FROM rollups
             WHERE site_id = ?1 AND dim = ?2 AND level = ?3 AND bucket = ?4 AND value = ?5 AND name = ?6",
        )?;
        let mut read_bitmap =
            tx.prepare_cached("SELECT visitors FROM rollup_bitmaps WHERE id = ?1")?;
        let mut write_bitmap =
            tx.prepare_cached("UPDATE rollup_bitmaps SET visitors = ?2 WHERE id = ?1")?;
        let mut add_bitmap =
            tx.prepare_cached("INSERT INTO rollup_bitmaps (visitors) VALUES (?1)")?;
        let mut update = tx.prepare_cached(
            "UPDATE rollups SET events = events + ?7, visitors = ?8
             WHERE site_id = ?1 AND dim = ?2 AND level = ?3 AND bucket = ?4 AND value = ?5 AND name = ?6",
        )?;
        let mut insert = tx.prepare_cached(
            "INSERT INTO rollups (site_id, dim, level, bucket, value, name, events, visitors, bitmap)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )?;
        let not_a_bitmap = || {
            rusqlite::Error::InvalidColumnType(
                0,
                "visitors (not a roaring bitmap; rebuild the rollups)".into(),
                rusqlite::types::Type::Blob,
            )
        };
        for (k, n, bitmap) in deltas.rows() {
            let key = params![k.site_id, k.dim, k.level.code(), k.bucket, k.value, k.name];
            let existing = read.query_row(key, |r| r.get::<_, i64>(0)).optional()?;
            match existing {
                Some(id) => {
                    let old = read_bitmap
                        .query_row([id], |r| r.get::<_, Vec<u8>>(0))
                        .optional()?
                        .ok_or_else(not_a_bitmap)?;
                    let mut merged = rollup::decode(&old).ok_or_else(not_a_bitmap)?;
                    merged |= bitmap;
                    write_bitmap.execute(params![id, rollup::encode(&merged)])?;
                    update.execute(params![
                        k.site_id,
                        k.dim,
                        k.level.code(),
                        k.bucket,
                        k.value,
                        k.name,
                        n as i64,
                        merged.len() as i64
                    ])?;
                }
                None => {
                    add_bitmap.execute([rollup::encode(bitmap)])?;
                    let id = tx.last_insert_rowid();
                    insert.execute(params![
                        k.site_id,
                        k.dim,
                        k.level.code(),
                        k.bucket,
                        k.value,
                        k.name,
                        n as i64,
                        bitmap.len() as i64,
                        id
                    ])?;
                }
            }
        }
    }
    fold_visits(&tx, &events, &ids, VisitDeltas::default())?;
    tx.execute("UPDATE fold_state SET folded = ?1", [last])?;
    tx.commit()?;
    // Only committed mappings are cached: a rolled-back id may be given to
    // another visitor by the next fold.
    let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
    for key in fresh {
        if let Some(&vid) = ids.get(&key) {
            cache.put(key, vid);
        }
    }
    Ok(events.len())
}

/// The stored state of the site-days in `counts` (absent: no event yet).
fn stored_days(
    tx: &rusqlite::Transaction<'_>,
    counts: &SiteDays<u64>,
) -> rusqlite::Result<SiteDays<DayState>> {
    let mut stored: SiteDays<DayState> = HashMap::new();
    let mut get =
        tx.prepare_cached("SELECT events, finest FROM site_days WHERE site_id = ?1 AND day = ?2")?;
    for (site, days) in counts {
        for &day in days.keys() {
            let state = get
                .query_row(params![site, day], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
                })
                .optional()?;
            if let Some((n, finest)) = state {
                let finest = Level::from_code(finest)
                    .ok_or(rusqlite::Error::IntegralValueOutOfRange(1, finest))?;
                stored.entry(site.clone()).or_default().insert(
                    day,
                    DayState {
                        events: n.max(0) as u64,
                        finest,
                    },
                );
            }
        }
    }
    Ok(stored)
}

/// [`StoreAdmin::erase`] on SQLite, in one write transaction. Deleted
/// content is overwritten in the file (`secure_delete`), and the WAL is
/// checkpointed and truncated afterwards so that its older copies of the
/// pages go too (when no reader holds it back; otherwise at the next
/// checkpoint).
fn erase(
    conn: &mut Connection,
    cache: &Mutex<super::VisitorCache>,
    site: &str,
    visitor: &str,
    now_ms: i64,
) -> rusqlite::Result<u64> {
    conn.pragma_update(None, "secure_delete", "ON")?;
    let erased = erase_in(conn, site, visitor, now_ms);
    // The writer's usual mode (see `salts`).
    let restored = conn.pragma_update(None, "secure_delete", "FAST");
    let erased = erased?;
    restored?;
    let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
    cache.remove(&(site.to_owned(), visitor.to_owned()));
    drop(cache);
    let _ = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
    Ok(erased)
}

fn erase_in(
    conn: &mut Connection,
    site: &str,
    visitor: &str,
    now_ms: i64,
) -> rusqlite::Result<u64> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let folded: i64 = tx.query_row("SELECT folded FROM fold_state", [], |r| r.get(0))?;
    let mut seqs = Vec::new();
    let mut counted = Vec::new();
    {
        let mut stmt = tx.prepare(&format!(
            "SELECT e.seq, {EVENT_COLUMNS} FROM events e
             WHERE e.site_id = ?1 AND (e.userid = ?2 OR e.visitor = ?2)"
        ))?;
        let mut rows = stmt.query(params![site, visitor])?;
        while let Some(r) = rows.next()? {
            let seq: i64 = r.get(0)?;
            let e = event_from_row(r, 1)?;
            // A cookieless id equal to someone's userid is not theirs.
            if crate::query::visitor_of(&e) != Some(visitor) {
                continue;
            }
            seqs.push(seq);
            if seq <= folded {
                counted.push(e);
            }
        }
    }
    // What the fold counted of them, at the levels their days keep now
    // (a day keeps every one of its events at each level it keeps).
    let counts = rollup::day_counts(&counted);
    let changes = rollup::unchanged(&counts, &stored_days(&tx, &counts)?);
    let vid: Option<u32> = tx
        .query_row(
            "SELECT vid FROM visitors WHERE site_id = ?1 AND visitor = ?2",
            params![site, visitor],
            |r| r.get::<_, i64>(0),
        )
        .optional()?
        .and_then(|v| u32::try_from(v).ok());
    let ids: HashMap<(String, String), u32> = vid
        .map(|v| ((site.to_owned(), visitor.to_owned()), v))
        .into_iter()
        .collect();
    let deltas = Deltas::of(&counted, &[], &changes, &ids);
    {
        let mut read = tx.prepare_cached(
            "SELECT events, bitmap FROM rollups
             WHERE site_id = ?1 AND dim = ?2 AND level = ?3 AND bucket = ?4 AND value = ?5 AND name = ?6",
        )?;
        let mut read_bitmap =
            tx.prepare_cached("SELECT visitors FROM rollup_bitmaps WHERE id = ?1")?;
        let mut write_bitmap =
            tx.prepare_cached("UPDATE rollup_bitmaps SET visitors = ?2 WHERE id = ?1")?;
        let mut drop_bitmap = tx.prepare_cached("DELETE FROM rollup_bitmaps WHERE id = ?1")?;
        let mut update = tx.prepare_cached(
            "UPDATE rollups SET events = ?7, visitors = ?8
             WHERE site_id = ?1 AND dim = ?2 AND level = ?3 AND bucket = ?4 AND value = ?5 AND name = ?6",
        )?;
        let mut drop_row = tx.prepare_cached(
            "DELETE FROM rollups
             WHERE site_id = ?1 AND dim = ?2 AND level = ?3 AND bucket = ?4 AND value = ?5 AND name = ?6",
        )?;
        for (k, n, _) in deltas.rows() {
            let key = params![k.site_id, k.dim, k.level.code(), k.bucket, k.value, k.name];
            let Some((events, bitmap_id)) = read
                .query_row(key, |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))
                .optional()?
            else {
                continue;
            };
            let left = events - n as i64;
            if left <= 0 {
                drop_row.execute(key)?;
                drop_bitmap.execute([bitmap_id])?;
                continue;
            }
            // The person has no event left on the site: out of every
            // bitmap their events were counted in.
            let bytes: Option<Vec<u8>> = read_bitmap
                .query_row([bitmap_id], |r| r.get(0))
                .optional()?;
            let mut bitmap = bytes
                .as_deref()
                .and_then(rollup::decode)
                .unwrap_or_default();
            if let Some(v) = vid {
                bitmap.remove(v);
            }
            write_bitmap.execute(params![bitmap_id, rollup::encode(&bitmap)])?;
            update.execute(params![
                k.site_id,
                k.dim,
                k.level.code(),
                k.bucket,
                k.value,
                k.name,
                left,
                bitmap.len() as i64
            ])?;
        }
    }
    {
        let mut less = tx.prepare_cached(
            "UPDATE site_days SET events = events - ?3 WHERE site_id = ?1 AND day = ?2",
        )?;
        for (s, days) in &counts {
            for (&day, &n) in days {
                less.execute(params![s, day, n as i64])?;
            }
        }
        tx.execute(
            "DELETE FROM site_days WHERE site_id = ?1 AND events <= 0",
            [site],
        )?;
    }
    {
        let mut delete = tx.prepare_cached("DELETE FROM events WHERE seq = ?1")?;
        for seq in &seqs {
            delete.execute([seq])?;
        }
    }
    if let Some(vid) = vid {
        let mut deltas = VisitDeltas::default();
        for v in load_visits(&tx, "site_id = ?1 AND visitor = ?2", params![site, visitor])? {
            deltas.add(&v, vid, -1);
        }
        apply_visit_deltas(&tx, deltas)?;
    }
    tx.execute(
        "DELETE FROM visits WHERE site_id = ?1 AND visitor = ?2",
        params![site, visitor],
    )?;
    tx.execute(
        "DELETE FROM visitors WHERE site_id = ?1 AND visitor = ?2",
        params![site, visitor],
    )?;
    tx.execute(
        "INSERT INTO erasures VALUES (?1, ?2)
         ON CONFLICT DO UPDATE SET erased_at = excluded.erased_at",
        params![super::erasure_digest(site, visitor), now_ms],
    )?;
    tx.execute(
        "DELETE FROM erasures WHERE erased_at < ?1",
        [now_ms - super::ERASURE_KEPT_MS],
    )?;
    tx.commit()?;
    Ok(seqs.len() as u64)
}

/// One step of [`StoreAdmin::delete_expired`] on SQLite, in one write
/// transaction.
fn delete_expired(conn: &mut Connection, max: usize) -> rusqlite::Result<usize> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let Some((cutoff, cleaned_to)) = tx
        .query_row("SELECT kept_from, cleaned_to FROM retention", [], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
        })
        .optional()?
    else {
        return Ok(0);
    };
    // Site by site (a skip-scan of the time index), each site's oldest.
    let mut seqs: Vec<i64> = Vec::new();
    {
        let mut next_site = tx.prepare_cached(
            "SELECT site_id FROM events WHERE site_id > ?1 ORDER BY site_id LIMIT 1",
        )?;
        let mut old =
            tx.prepare_cached("SELECT seq FROM events WHERE site_id = ?1 AND ts < ?2 LIMIT ?3")?;
        let mut site = String::new();
        while seqs.len() < max {
            match next_site
                .query_row([&site], |r| r.get::<_, String>(0))
                .optional()?
            {
                Some(s) => site = s,
                None => break,
            }
            let left = (max - seqs.len()) as i64;
            let found = old
                .query_map(params![site, cutoff, left], |r| r.get::<_, i64>(0))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            seqs.extend(found);
        }
        let mut delete = tx.prepare_cached("DELETE FROM events WHERE seq = ?1")?;
        for seq in &seqs {
            delete.execute([seq])?;
        }
    }
    if seqs.len() < max && cleaned_to < cutoff {
        clean_before(&tx, cutoff)?;
        tx.execute("UPDATE retention SET cleaned_to = ?1", [cutoff])?;
    }
    tx.commit()?;
    Ok(seqs.len())
}

/// What was derived from the events before `cutoff`: rollup rows of the
/// buckets that end by then (a month that runs over the cutoff keeps its
/// rows, which queries no longer read whole: they start at the cutoff),
/// site-days, and visits.
fn clean_before(tx: &rusqlite::Transaction<'_>, cutoff: i64) -> rusqlite::Result<()> {
    let month = Level::Month.start(cutoff);
    let old_rows = "(level < 3 AND bucket < ?1) OR (level = 3 AND bucket < ?2)";
    tx.execute(
        &format!(
            "DELETE FROM rollup_bitmaps WHERE id IN (SELECT bitmap FROM rollups WHERE {old_rows})"
        ),
        params![cutoff, month],
    )?;
    tx.execute(
        &format!("DELETE FROM rollups WHERE {old_rows}"),
        params![cutoff, month],
    )?;
    tx.execute(
        &format!("DELETE FROM visit_rollups WHERE {old_rows}"),
        params![cutoff, month],
    )?;
    tx.execute("DELETE FROM site_days WHERE day < ?1", [cutoff])?;
    // What is left of them ended before the cutoff (see `remake_visits_over`).
    tx.execute("DELETE FROM visits WHERE start_ts < ?1", [cutoff])?;
    Ok(())
}

/// Visits that start before `cutoff` and end after it, made again from
/// their (folded) events from the cutoff on: what the visits of the events
/// kept are. Done as the start of what queries read moves, so that queries
/// over visits are exact before anything is deleted.
fn remake_visits_over(tx: &rusqlite::Transaction<'_>, cutoff: i64) -> rusqlite::Result<()> {
    let folded: i64 = tx.query_row("SELECT folded FROM fold_state", [], |r| r.get(0))?;
    let old = load_visits(
        tx,
        "start_ts < ?1 AND end_ts >= ?1",
        rusqlite::params_from_iter([cutoff]),
    )?;
    let over: Vec<(String, String, i64)> = old
        .iter()
        .map(|v| (v.site_id.clone(), v.visitor.clone(), v.end))
        .collect();
    let mut deltas = VisitDeltas::default();
    for v in &old {
        if let Some(vid) = vid_of(tx, &v.site_id, &v.visitor)? {
            deltas.add(v, vid, -1);
        }
    }
    tx.execute(
        "DELETE FROM visits WHERE start_ts < ?1 AND end_ts >= ?1",
        [cutoff],
    )?;
    let mut events = Vec::new();
    {
        let mut stmt = tx.prepare_cached(&format!(
            "SELECT {EVENT_COLUMNS} FROM events e
             WHERE e.site_id = ?1 AND e.ts >= ?2 AND e.ts <= ?3 AND e.seq <= ?4
               AND (e.userid = ?5 OR e.visitor = ?5)"
        ))?;
        for (site, visitor, end) in &over {
            let mut rows = stmt.query(params![site, cutoff, end, folded, visitor])?;
            while let Some(r) = rows.next()? {
                let e = event_from_row(r, 0)?;
                if crate::query::visitor_of(&e) == Some(visitor.as_str()) {
                    events.push(e);
                }
            }
        }
    }
    fold_visits(tx, &events, &HashMap::new(), deltas)
}

/// The visits `filter` (SQL on the `visits` table) selects, whole.
fn load_visits(
    tx: &rusqlite::Transaction<'_>,
    filter: &str,
    args: impl rusqlite::Params,
) -> rusqlite::Result<Vec<crate::session::Visit>> {
    let mut stmt = tx.prepare(&format!(
        "SELECT site_id, visitor, start_ts, start_id, end_ts, data FROM visits WHERE {filter}"
    ))?;
    let mut rows = stmt.query(args)?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        let mut v: crate::session::Visit =
            serde_json::from_str(r.get_ref(5)?.as_str()?).map_err(|e| {
                rusqlite::Error::FromSqlConversionFailure(
                    5,
                    rusqlite::types::Type::Text,
                    Box::new(e),
                )
            })?;
        v.site_id = r.get(0)?;
        v.visitor = r.get(1)?;
        v.start = r.get(2)?;
        v.start_id = r.get(3)?;
        v.end = r.get(4)?;
        out.push(v);
    }
    Ok(out)
}

/// A visitor's dictionary id, if they have one.
fn vid_of(
    tx: &rusqlite::Transaction<'_>,
    site: &str,
    visitor: &str,
) -> rusqlite::Result<Option<u32>> {
    Ok(tx
        .prepare_cached("SELECT vid FROM visitors WHERE site_id = ?1 AND visitor = ?2")?
        .query_row(params![site, visitor], |r| r.get::<_, i64>(0))
        .optional()?
        .and_then(|v| u32::try_from(v).ok()))
}

/// Writes the changes of visit rollup rows (`crate::visit_rollup`): rows
/// with no visit left are deleted.
fn apply_visit_deltas(tx: &rusqlite::Transaction<'_>, deltas: VisitDeltas) -> rusqlite::Result<()> {
    use crate::visit_rollup::Counted;
    if deltas.is_empty() {
        return Ok(());
    }
    let mut read = tx.prepare_cached(
        "SELECT id, visits, bounces, duration_ms, pageviews, events, visitors, counts
         FROM visit_rollups
         WHERE site_id = ?1 AND dim = ?2 AND level = ?3 AND bucket = ?4 AND value = ?5",
    )?;
    let mut update = tx.prepare_cached(
        "UPDATE visit_rollups SET visits = ?2, bounces = ?3, duration_ms = ?4, pageviews = ?5,
             events = ?6, visitors = ?7, counts = ?8
         WHERE id = ?1",
    )?;
    let mut insert = tx.prepare_cached(
        "INSERT INTO visit_rollups
             (site_id, dim, level, bucket, value, visits, bounces, duration_ms, pageviews,
              events, visitors, counts)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
    )?;
    let mut delete = tx.prepare_cached("DELETE FROM visit_rollups WHERE id = ?1")?;
    let corrupt = || {
        rusqlite::Error::InvalidColumnType(
            0,
            "visit_rollups (rows that do not add up; rebuild the rollups)".into(),
            rusqlite::types::Type::Blob,
        )
    };
    for ((site, dim, level, bucket, value), d) in deltas.rows() {
        let key = params![site, dim, level.code(), bucket, value];
        let existing = read
            .query_row(key, |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    [
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, i64>(3)?,
                        r.get::<_, i64>(4)?,
                        r.get::<_, i64>(5)?,
                    ],
                    r.get::<_, Vec<u8>>(6)?,
                    r.get::<_, Vec<u8>>(7)?,
                ))
            })
            .optional()?;
        let (id, counts, mut visitors) = match existing {
            Some((id, counts, set, n)) => (
                Some(id),
                counts,
                Counted::decode(&set, &n).ok_or_else(corrupt)?,
            ),
            None => (None, [0; 5], Counted::default()),
        };
        let c = [
            counts[0] + d.visits,
            counts[1] + d.bounces,
            counts[2] + d.duration_ms,
            counts[3] + d.pageviews,
            counts[4] + d.events,
        ];
        if !visitors.apply(&d.visitors) || c.iter().any(|n| *n < 0) {
            return Err(corrupt());
        }
        match (id, c[0]) {
            (Some(id), 0) => {
                delete.execute([id])?;
            }
            (None, 0) => {}
            (Some(id), _) => {
                let (set, n) = visitors.encode();
                update.execute(params![id, c[0], c[1], c[2], c[3], c[4], set, n])?;
            }
            (None, _) => {
                let (set, n) = visitors.encode();
                insert.execute(params![
                    site,
                    dim,
                    level.code(),
                    bucket,
                    value,
                    c[0],
                    c[1],
                    c[2],
                    c[3],
                    c[4],
                    set,
                    n
                ])?;
            }
        }
    }
    Ok(())
}

/// Adds a fold's events to their visitors' visits (see [`crate::session`]).
/// Adds a fold's events to their visitors' visits (see [`crate::session`]),
/// and what changes of them to the visit rollups, with `deltas` (changes a
/// caller made already); `vids` are visitor ids the caller knows.
fn fold_visits(
    tx: &rusqlite::Transaction<'_>,
    events: &[Event],
    vids: &HashMap<(String, String), u32>,
    mut deltas: VisitDeltas,
) -> rusqlite::Result<()> {
    use crate::session::{GAP_MS, Visit, fold_visitor};
    // A visitor's visits do not overlap: walking back from the last to
    // start before the events' latest (plus the gap), the first that ends
    // before their earliest (less the gap) ends the ones they can reach.
    let mut load = tx.prepare_cached(
        "SELECT id, start_ts, start_id, end_ts, data FROM visits
         WHERE site_id = ?1 AND visitor = ?2 AND start_ts <= ?3
         ORDER BY start_ts DESC, start_id DESC",
    )?;
    let mut delete = tx.prepare_cached("DELETE FROM visits WHERE id = ?1")?;
    let mut update = tx.prepare_cached("UPDATE visits SET end_ts = ?2, data = ?3 WHERE id = ?1")?;
    let mut insert = tx.prepare_cached(
        "INSERT INTO visits (site_id, visitor, start_ts, start_id, end_ts, data)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    let bad = |e: serde_json::Error| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    };
    // In key order: each index page is visited once per fold, not once
    // per visitor.
    let mut groups: Vec<_> = crate::session::by_visitor(events).into_iter().collect();
    groups.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    for ((site, visitor), list) in groups {
        let lo = list.iter().map(|e| e.ts).min().unwrap_or(0);
        let hi = list.iter().map(|e| e.ts).max().unwrap_or(0);
        // (row id, visit), latest first.
        let mut stored: Vec<(i64, Visit)> = Vec::new();
        let mut rows = load.query(params![site, visitor, hi.saturating_add(GAP_MS)])?;
        while let Some(r) = rows.next()? {
            let end: i64 = r.get(3)?;
            if end < lo.saturating_sub(GAP_MS) {
                break;
            }
            let mut v: Visit = serde_json::from_str(r.get_ref(4)?.as_str()?).map_err(bad)?;
            v.site_id = site.to_owned();
            v.visitor = visitor.to_owned();
            v.start = r.get(1)?;
            v.start_id = r.get(2)?;
            v.end = end;
            stored.push((r.get(0)?, v));
        }
        drop(rows);
        let ids: HashMap<(i64, String), i64> = stored
            .iter()
            .map(|(id, v)| ((v.start, v.start_id.clone()), *id))
            .collect();
        let change = fold_visitor(stored.iter().map(|(_, v)| v.clone()).collect(), &list);
        let vid = match vids.get(&(site.to_owned(), visitor.to_owned())) {
            Some(&v) => Some(v),
            None => vid_of(tx, site, visitor)?,
        };
        if let Some(vid) = vid {
            let removed: std::collections::HashSet<&(i64, String)> =
                change.removed.iter().collect();
            for (_, v) in &stored {
                if removed.contains(&(v.start, v.start_id.clone())) {
                    deltas.add(v, vid, -1);
                }
            }
            for v in &change.written {
                deltas.add(v, vid, 1);
            }
        }
        let mut gone: Vec<i64> = change
            .removed
            .iter()
            .filter_map(|k| ids.get(k).copied())
            .collect();
        for v in change.written {
            let data = serde_json::to_string(&v).map_err(bad)?;
            // Grown at its end only: the same row, updated.
            match ids.get(&(v.start, v.start_id.clone())) {
                Some(&id) => {
                    gone.retain(|g| *g != id);
                    update.execute(params![id, v.end, data])?;
                }
                None => {
                    insert.execute(params![site, visitor, v.start, v.start_id, v.end, data])?;
                }
            }
        }
        for id in gone {
            delete.execute([id])?;
        }
    }
    apply_visit_deltas(tx, deltas)
}

/// Reads a plan (see [`QueryStore::fetch`]) in one read transaction.
fn fetch(conn: &mut Connection, plan: &Plan, agg: &mut Aggregator) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    let folded: i64 = tx.query_row("SELECT folded FROM fold_state", [], |r| r.get(0))?;
    // What the days of the range keep; the raw events of what they do not.
    let mut sparse = Vec::new();
    if let Some((from, to)) = plan.fine_days {
        let mut stmt = tx.prepare_cached(
            "SELECT day, finest FROM site_days
             WHERE site_id = ?1 AND day >= ?2 AND day <= ?3 AND finest < ?4",
        )?;
        let mut finest = HashMap::new();
        let mut rows = stmt.query(params![plan.site_id, from, to, Level::Month.code()])?;
        while let Some(r) = rows.next()? {
            if let Some(level) = Level::from_code(r.get(1)?) {
                finest.insert(r.get::<_, i64>(0)?, level);
            }
        }
        sparse = agg.use_density(&finest);
    }
    for read in &plan.reads {
        // Given values are found by the value index (a few rows), not by
        // scanning the range's rows of every value, which the planner
        // prefers without statistics.
        let (index, values_sql) = match &read.values {
            None => ("", String::new()),
            Some(values) => (
                " INDEXED BY rollups_value",
                format!(" AND value IN ({})", vec!["?"; values.len()].join(", ")),
            ),
        };
        let mut stmt = tx.prepare(&format!(
            "SELECT level, bucket, value, name, events, visitors, bitmap FROM rollups{index}
             WHERE site_id = ? AND dim = ? AND level = ? AND bucket >= ? AND bucket < ?{values_sql}"
        ))?;
        for span in plan.spans.iter().chain(&plan.bound_spans) {
            let mut args: Vec<rusqlite::types::Value> = vec![
                plan.site_id.to_string().into(),
                read.dim.clone().into(),
                span.level.code().into(),
                span.from.into(),
                span.to.into(),
            ];
            for v in read.values.iter().flatten() {
                args.push(v.clone().into());
            }
            let mut rows = stmt.query(rusqlite::params_from_iter(args))?;
            while let Some(r) = rows.next()? {
                let Some(level) = Level::from_code(r.get(0)?) else {
                    continue;
                };
                agg.add_row(RowRef {
                    dim: &read.dim,
                    level,
                    bucket: r.get(1)?,
                    value: r.get_ref(2)?.as_str()?,
                    name: r.get_ref(3)?.as_str()?,
                    events: r.get::<_, i64>(4)?.max(0) as u64,
                    pageviews: None,
                    visitors: Bits::Stored {
                        cardinality: r.get::<_, i64>(5)?.max(0) as u64,
                        id: r.get(6)?,
                    },
                });
            }
        }
    }
    if !plan.raw.is_empty() || !sparse.is_empty() {
        // Only the columns a query looks at (no arrival time; the
        // properties only when it groups or filters by one), and the
        // store-side test of the plan's needles: most of a raw read's time
        // is spent per row read.
        let vid = if plan.raw_vids { "v.vid" } else { "NULL" };
        let join = if plan.raw_vids {
            "LEFT JOIN visitors v ON v.site_id = e.site_id
             AND v.visitor = COALESCE(NULLIF(e.userid, ''), e.visitor)"
        } else {
            ""
        };
        let props = if plan.raw_props { "e.props" } else { "NULL" };
        let mut needles_sql = String::new();
        let mut needle_args: Vec<rusqlite::types::Value> = Vec::new();
        for any in &plan.raw_needles {
            let tests = vec!["instr(e.props, ?) > 0"; any.len()].join(" OR ");
            needles_sql.push_str(&format!(" AND e.props IS NOT NULL AND ({tests})"));
            needle_args.extend(any.iter().map(|v| v.clone().into()));
        }
        if let Some(pages) = &plan.raw_pages {
            let marks = vec!["?"; pages.len()].join(", ");
            needles_sql.push_str(&format!(" AND e.path IN ({marks})"));
            needle_args.extend(pages.iter().map(|v| v.clone().into()));
        }
        let mut stmt = tx.prepare(&format!(
            "SELECT e.site_id, e.event_type, e.path, e.userid, e.ts, {props}, {vid}, e.id, e.visitor
             FROM events e {join}
             WHERE e.site_id = ? AND e.ts >= ? AND e.ts < ? AND e.seq <= ?{needles_sql}"
        ))?;
        for (start, end) in plan.raw.iter().chain(&sparse) {
            let mut args: Vec<rusqlite::types::Value> = vec![
                plan.site_id.to_string().into(),
                (*start).into(),
                (*end).into(),
                folded.into(),
            ];
            args.extend(needle_args.iter().cloned());
            let mut rows = stmt.query(rusqlite::params_from_iter(args))?;
            while let Some(r) = rows.next()? {
                let props: Option<&str> = r.get_ref(5)?.as_str_or_null()?;
                let e = Event {
                    id: r.get(7)?,
                    site_id: r.get(0)?,
                    event_type: r.get(1)?,
                    path: r.get(2)?,
                    userid: r.get(3)?,
                    ts: r.get(4)?,
                    created_at: 0,
                    props: props.and_then(|p| serde_json::from_str(p).ok()),
                    visitor: r.get(8)?,
                    ctx: None,
                };
                let vid: Option<i64> = r.get(6)?;
                agg.add_event(&e, vid.and_then(|v| u32::try_from(v).ok()));
            }
        }
    }
    // The bitmaps of the groups that need counting, from the same snapshot.
    let mut failed = None;
    {
        let mut load = tx.prepare_cached("SELECT visitors FROM rollup_bitmaps WHERE id = ?1")?;
        let mut read = |id: i64| match load.query_row([id], |r| r.get::<_, Vec<u8>>(0)) {
            Ok(bytes) => Some(bytes),
            Err(e) => {
                failed.get_or_insert(e);
                None
            }
        };
        if let Err(e) = agg.select(&mut read) {
            return Err(failed.unwrap_or_else(|| {
                rusqlite::Error::InvalidColumnType(0, e.to_string(), rusqlite::types::Type::Blob)
            }));
        }
    }
    tx.commit()
}

#[async_trait]
impl EventSink for SqliteStore {
    async fn insert(&self, events: &[Event]) -> Result<Vec<InsertOutcome>, StoreError> {
        let events = events.to_vec();
        Self::with_conn(&self.writer, move |conn| {
            // One transaction per batch: stored together or not at all.
            let tx = conn.transaction()?;
            let mut outcomes = Vec::with_capacity(events.len());
            // A handful of rows at most (each kept for ERASURE_KEPT_MS),
            // none at all on most stores: read with every batch, so that
            // an erasure by another process is seen at once.
            let erasures = super::Erasures::new(
                tx.prepare_cached("SELECT digest, erased_at FROM erasures")?
                    .query_map([], |r| Ok((r.get::<_, [u8; 32]>(0)?, r.get::<_, i64>(1)?)))?
                    .collect::<rusqlite::Result<Vec<_>>>()?,
            );
            {
                let mut stmt = tx.prepare_cached(
                    "INSERT INTO events (site_id, id, event_type, path, userid, ts, created_at, props, visitor, ctx)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) ON CONFLICT (site_id, id) DO NOTHING",
                )?;
                for e in &events {
                    if erasures.drops(e) {
                        outcomes.push(InsertOutcome::Erased);
                        continue;
                    }
                    let props = e.props.as_ref().map(|p| serde_json::Value::Object(p.clone()).to_string());
                    let ctx = e.ctx.as_ref().and_then(|c| serde_json::to_string(c).ok());
                    let n = stmt.execute(params![
                        e.site_id,
                        e.id,
                        e.event_type,
                        e.path,
                        e.userid,
                        e.ts,
                        e.created_at,
                        props,
                        e.visitor,
                        ctx
                    ])?;
                    outcomes.push(if n == 1 {
                        InsertOutcome::Inserted
                    } else {
                        InsertOutcome::Duplicate
                    });
                }
            }
            tx.commit()?;
            Ok(outcomes)
        })
        .await
    }
}

#[async_trait]
impl QueryStore for SqliteStore {
    async fn visits(
        &self,
        site_id: &str,
        start: i64,
        end: i64,
    ) -> Result<Vec<crate::session::Visit>, StoreError> {
        let site = site_id.to_owned();
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT visitor, data, start_ts, start_id, end_ts FROM visits
                 WHERE site_id = ?1 AND start_ts >= ?2 AND start_ts < ?3",
            )?;
            let mut rows = stmt.query(params![site, start, end])?;
            let mut out = Vec::new();
            while let Some(r) = rows.next()? {
                // Written by the fold from a `Visit`; anything else is skipped.
                if let Ok(mut v) =
                    serde_json::from_str::<crate::session::Visit>(r.get_ref(1)?.as_str()?)
                {
                    v.site_id.clone_from(&site);
                    v.visitor = r.get(0)?;
                    v.start = r.get(2)?;
                    v.start_id = r.get(3)?;
                    v.end = r.get(4)?;
                    out.push(v);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn visit_rollups(
        &self,
        site_id: &str,
        dim: &'static str,
        spans: Vec<crate::query::engine::Span>,
        raw: Vec<(i64, i64)>,
    ) -> Result<Option<super::VisitRollupRead>, StoreError> {
        let site = site_id.to_owned();
        self.read(move |conn| {
            use crate::visit_rollup::RowRead;
            let tx = conn.transaction()?;
            let mut rows = Vec::new();
            {
                let mut stmt = tx.prepare_cached(
                    "SELECT bucket, value, visits, bounces, duration_ms, pageviews, events, visitors
                     FROM visit_rollups
                     WHERE site_id = ?1 AND dim = ?2 AND level = ?3 AND bucket >= ?4 AND bucket < ?5",
                )?;
                for span in &spans {
                    let mut q =
                        stmt.query(params![site, dim, span.level.code(), span.from, span.to])?;
                    while let Some(r) = q.next()? {
                        let n = |i: usize| r.get::<_, i64>(i).map(|v| v.max(0) as u64);
                        rows.push(RowRead {
                            level: span.level,
                            bucket: r.get(0)?,
                            value: r.get(1)?,
                            visits: n(2)?,
                            bounces: n(3)?,
                            duration_ms: n(4)?,
                            pageviews: n(5)?,
                            events: n(6)?,
                            visitors: r.get(7)?,
                        });
                    }
                }
            }
            let mut visits = Vec::new();
            {
                let mut stmt = tx.prepare_cached(
                    "SELECT v.visitor, v.data, v.start_ts, v.start_id, v.end_ts, d.vid
                     FROM visits v LEFT JOIN visitors d
                       ON d.site_id = v.site_id AND d.visitor = v.visitor
                     WHERE v.site_id = ?1 AND v.start_ts >= ?2 AND v.start_ts < ?3",
                )?;
                for (a, b) in &raw {
                    let mut q = stmt.query(params![site, a, b])?;
                    while let Some(r) = q.next()? {
                        let Some(vid) = r
                            .get::<_, Option<i64>>(5)?
                            .and_then(|v| u32::try_from(v).ok())
                        else {
                            // A visit whose visitor has no id: not countable
                            // with the rows; the engine reads visits instead.
                            return Ok(None);
                        };
                        let Ok(mut v) =
                            serde_json::from_str::<crate::session::Visit>(r.get_ref(1)?.as_str()?)
                        else {
                            continue;
                        };
                        v.site_id.clone_from(&site);
                        v.visitor = r.get(0)?;
                        v.start = r.get(2)?;
                        v.start_id = r.get(3)?;
                        v.end = r.get(4)?;
                        visits.push((v, vid));
                    }
                }
            }
            Ok(Some((rows, visits)))
        })
        .await
    }

    async fn visit_open(
        &self,
        site_id: &str,
        visitor: &str,
        since: i64,
    ) -> Result<bool, StoreError> {
        let (site, visitor) = (site_id.to_owned(), visitor.to_owned());
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT 1 FROM visits WHERE site_id = ?1 AND visitor = ?2 AND end_ts >= ?3 LIMIT 1",
            )?
            .exists(params![site, visitor, since])
        })
        .await
    }

    async fn fetch(&self, plan: Plan, mut agg: Aggregator) -> Result<Aggregator, StoreError> {
        self.read(move |conn| {
            fetch(conn, &plan, &mut agg)?;
            Ok(agg)
        })
        .await
    }

    async fn kept_from(&self) -> Result<Option<i64>, StoreError> {
        self.read(|conn| {
            conn.query_row("SELECT kept_from FROM retention", [], |r| r.get(0))
                .optional()
        })
        .await
    }

    async fn first_event(&self, site_id: &str) -> Result<Option<i64>, StoreError> {
        let site_id = site_id.to_owned();
        self.read(move |conn| {
            conn.query_row(
                "SELECT MIN(ts) FROM events WHERE site_id = ?1",
                [site_id],
                |r| r.get::<_, Option<i64>>(0),
            )
        })
        .await
    }

    async fn sites(&self, limit: usize) -> Result<Vec<String>, StoreError> {
        self.read(move |conn| {
            // One step of the site-days' key per site, not a scan of every
            // site-day.
            let mut next = conn.prepare_cached(
                "SELECT site_id FROM site_days WHERE site_id > ?1 ORDER BY site_id LIMIT 1",
            )?;
            let mut sites: Vec<String> = Vec::new();
            while sites.len() < limit {
                let after = sites.last().map_or("", String::as_str);
                match next.query_row([after], |r| r.get(0)).optional()? {
                    Some(site) => sites.push(site),
                    None => break,
                }
            }
            Ok(sites)
        })
        .await
    }

    async fn property_keys(
        &self,
        site_id: &str,
        name: Option<&str>,
    ) -> Result<Vec<String>, StoreError> {
        let (site_id, name) = (site_id.to_owned(), name.map(str::to_owned));
        self.read(move |conn| {
            // Month rows are kept for every day (see `rollup`, "Sparse
            // days"): the key lists of all the site's events.
            let mut stmt = conn.prepare_cached(
                "SELECT DISTINCT value FROM rollups
                 WHERE site_id = ?1 AND dim = ?2 AND level = ?3 AND (?4 IS NULL OR name = ?4)
                 LIMIT 100000",
            )?;
            let lists = stmt
                .query_map(
                    params![site_id, rollup::DIM_KEYS, Level::Month.code(), name],
                    |r| r.get::<_, String>(0),
                )?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(super::keys_of(lists.iter().map(String::as_str)))
        })
        .await
    }
}

#[async_trait]
impl StoreAdmin for SqliteStore {
    async fn fold(&self, max_events: usize) -> Result<usize, StoreError> {
        let cache = Arc::clone(&self.visitors);
        let density = self.density;
        Self::with_conn(&self.writer, move |conn| {
            fold(conn, &cache, density, max_events)
        })
        .await
    }

    async fn unfolded(&self) -> Result<u64, StoreError> {
        Self::with_conn(&self.reader, |conn| {
            conn.query_row(
                "SELECT COUNT(*) FROM events WHERE seq > (SELECT folded FROM fold_state)",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as u64)
        })
        .await
    }

    async fn rebuild_rollups(&self) -> Result<u64, StoreError> {
        // The visitor dictionary stays: other processes may hold its ids in
        // their caches, and the ids stay right.
        Self::with_conn(&self.writer, |conn| {
            conn.execute_batch(
                "BEGIN IMMEDIATE; DELETE FROM rollups; DELETE FROM rollup_bitmaps;
                 DELETE FROM site_days; DELETE FROM visits; DELETE FROM visit_rollups;
                 UPDATE fold_state SET folded = 0; COMMIT;",
            )
        })
        .await?;
        let mut total = 0u64;
        loop {
            let n = self.fold(super::FOLD_BATCH).await?;
            total += n as u64;
            if n < super::FOLD_BATCH {
                return Ok(total);
            }
        }
    }

    async fn check(&self) -> Result<(), StoreError> {
        Self::with_conn(&self.reader, |conn| {
            conn.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))
                .map(|_| ())
        })
        .await
    }

    async fn count_ids(&self, site_id: &str, ids: &[String]) -> Result<u64, StoreError> {
        let ids = ids.to_vec();
        let site_id = site_id.to_owned();
        Self::with_conn(&self.reader, move |conn| {
            let mut stmt =
                conn.prepare_cached("SELECT 1 FROM events WHERE site_id = ?1 AND id = ?2")?;
            let mut n = 0;
            for id in &ids {
                if stmt
                    .query_row([&site_id, id], |_| Ok(()))
                    .optional()?
                    .is_some()
                {
                    n += 1;
                }
            }
            Ok(n)
        })
        .await
    }

    async fn count_all(&self) -> Result<u64, StoreError> {
        Self::with_conn(&self.reader, |conn| {
            conn.query_row("SELECT COUNT(*) FROM events", [], |r| r.get::<_, i64>(0))
                .map(|n| n as u64)
        })
        .await
    }

    async fn events_page(
        &self,
        site_id: &str,
        start: i64,
        end: i64,
        after: Option<PageAfter>,
        limit: usize,
    ) -> Result<EventPage, StoreError> {
        let site = site_id.to_owned();
        let want = limit;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let events = self
            .read(move |conn| {
                // Keyset pagination on (ts, id): the time index gives the
                // range, ties on a millisecond are sorted by id.
                let (from, key) = match &after {
                    Some(a) => (a.ts, Some(a.key.as_str())),
                    None => (start, None),
                };
                let mut stmt = conn.prepare_cached(&format!(
                    "SELECT {EVENT_COLUMNS} FROM events e
                     WHERE e.site_id = ?1 AND e.ts >= ?2 AND e.ts < ?3
                       AND (?4 IS NULL OR e.ts > ?2 OR e.id > ?4)
                     ORDER BY e.ts, e.id LIMIT ?5"
                ))?;
                stmt.query_map(params![site, from, end, key, limit], |r| {
                    event_from_row(r, 0)
                })?
                .collect::<rusqlite::Result<Vec<_>>>()
            })
            .await?;
        let next = (events.len() >= want && want > 0)
            .then(|| events.last())
            .flatten()
            .map(|e| PageAfter {
                ts: e.ts,
                key: e.id.as_str().to_owned(),
            });
        Ok(EventPage { events, next })
    }

    async fn set_kept_from(&self, cutoff: i64) -> Result<(), StoreError> {
        Self::with_conn(&self.writer, move |conn| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let now: Option<i64> = tx
                .query_row("SELECT kept_from FROM retention", [], |r| r.get(0))
                .optional()?;
            if now.is_some_and(|at| at >= cutoff) {
                return Ok(());
            }
            tx.execute(
                "INSERT INTO retention VALUES (1, ?1, 0)
                 ON CONFLICT DO UPDATE SET kept_from = excluded.kept_from",
                [cutoff],
            )?;
            remake_visits_over(&tx, cutoff)?;
            tx.commit()
        })
        .await
    }

    async fn delete_expired(&self, max_events: usize) -> Result<usize, StoreError> {
        Self::with_conn(&self.writer, move |conn| delete_expired(conn, max_events)).await
    }

    async fn erase(&self, site_id: &str, visitor: &str, now_ms: i64) -> Result<u64, StoreError> {
        let (site, visitor) = (site_id.to_owned(), visitor.to_owned());
        let cache = Arc::clone(&self.visitors);
        Self::with_conn(&self.writer, move |conn| {
            erase(conn, &cache, &site, &visitor, now_ms)
        })
        .await
    }

    fn kind(&self) -> &'static str {
        "sqlite"
    }
}

#[async_trait]
impl crate::visitor::SaltSource for SqliteStore {
    async fn salts(&self, now_ms: i64) -> Result<crate::visitor::Salts, crate::visitor::SaltError> {
        use crate::visitor::{Salt, SaltError, Salts, day_of};
        let (day, grace) = day_of(now_ms);
        let fresh = Salt::random()?;
        let read = Self::with_conn(&self.writer, move |conn| {
            // Deleted salts are overwritten in the file, not only unlinked
            // (for the pages this connection frees from now on).
            conn.pragma_update(None, "secure_delete", "FAST")?;
            let tx = conn.transaction()?;
            tx.execute(
                "INSERT INTO salts (day, salt) VALUES (?1, ?2) ON CONFLICT (day) DO NOTHING",
                params![day, fresh.0.as_slice()],
            )?;
            let keep_from = if grace { day - 1 } else { day };
            tx.execute("DELETE FROM salts WHERE day < ?1", [keep_from])?;
            let mut stmt = tx.prepare("SELECT day, salt FROM salts WHERE day >= ?1")?;
            let rows = stmt
                .query_map([keep_from], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            drop(stmt);
            tx.commit()?;
            Ok(rows)
        })
        .await
        .map_err(|e| SaltError(e.to_string()))?;
        let find = |d: i64| {
            read.iter()
                .find(|(x, _)| *x == d)
                .and_then(|(_, s)| Salt::from_slice(s))
        };
        Ok(Salts {
            day,
            current: find(day).ok_or_else(|| SaltError("the day's salt is missing".into()))?,
            previous: if grace { find(day - 1) } else { None },
        })
    }
}

#[async_trait]
impl RegistryStore for SqliteStore {
    async fn registry(&self) -> Result<crate::sites::Stored, StoreError> {
        // On the writer: registry reads are rare, and must see the change
        // this process just made.
        Self::with_conn(&self.writer, |conn| {
            let mut sites = Vec::new();
            let mut q =
                conn.prepare("SELECT site_id, settings FROM site_settings ORDER BY site_id")?;
            let mut rows = q.query([])?;
            while let Some(r) = rows.next()? {
                let text: String = r.get(1)?;
                let value = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
                sites.push((r.get::<_, String>(0)?, value));
            }
            let mut tokens = Vec::new();
            let mut q = conn.prepare("SELECT record FROM read_tokens ORDER BY id")?;
            let mut rows = q.query([])?;
            while let Some(r) = rows.next()? {
                let text: String = r.get(0)?;
                if let Ok(t) = serde_json::from_str(&text) {
                    tokens.push(t);
                }
            }
            Ok(crate::sites::Stored { sites, tokens })
        })
        .await
    }

    async fn put_site(
        &self,
        site_id: &str,
        settings: &serde_json::Value,
    ) -> Result<(), StoreError> {
        let (site_id, text) = (site_id.to_owned(), settings.to_string());
        Self::with_conn(&self.writer, move |conn| {
            conn.execute(
                "INSERT INTO site_settings VALUES (?1, ?2)
                 ON CONFLICT DO UPDATE SET settings = excluded.settings",
                (site_id, text),
            )
            .map(drop)
        })
        .await
    }

    async fn delete_site(&self, site_id: &str) -> Result<bool, StoreError> {
        let site_id = site_id.to_owned();
        Self::with_conn(&self.writer, move |conn| {
            conn.execute("DELETE FROM site_settings WHERE site_id = ?1", [site_id])
                .map(|n| n > 0)
        })
        .await
    }

    async fn put_token(&self, token: &crate::sites::TokenRecord) -> Result<(), StoreError> {
        let id = token.id.clone();
        let text = serde_json::to_string(token)
            .map_err(|e| StoreError::Unavailable(format!("token record: {e}")))?;
        Self::with_conn(&self.writer, move |conn| {
            conn.execute("INSERT INTO read_tokens VALUES (?1, ?2)", (id, text))
                .map(drop)
        })
        .await
    }

    async fn revoke_token(&self, id: &str) -> Result<bool, StoreError> {
        let id = id.to_owned();
        Self::with_conn(&self.writer, move |conn| {
            conn.execute("DELETE FROM read_tokens WHERE id = ?1", [id])
                .map(|n| n > 0)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A query that would run for ever is stopped at its limit, and the next
    /// one on the same connection runs normally.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_past_its_time_limit_is_stopped_and_the_next_one_runs() {
        let dir = tempfile::tempdir().unwrap();
        let options = SqliteOptions {
            query_timeout: Duration::from_millis(200),
            ..SqliteOptions::default()
        };
        let store = SqliteStore::open_with(dir.path(), options).unwrap();
        let endless = |conn: &mut Connection| {
            conn.query_row(
                "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c)
                 SELECT count(*) FROM c",
                [],
                |r| r.get::<_, i64>(0),
            )
        };
        let started = std::time::Instant::now();
        let (a, b) = tokio::join!(store.read(endless), store.read(endless));
        assert!(matches!(a, Err(StoreError::Timeout(_))), "{a:?}");
        assert!(matches!(b, Err(StoreError::Timeout(_))), "{b:?}");
        // Both within their own limit: the second did not run after the first.
        assert!(
            started.elapsed() < Duration::from_millis(800),
            "{:?}",
            started.elapsed()
        );
        let one = store
            .read(|conn| conn.query_row("SELECT 1", [], |r| r.get::<_, i64>(0)))
            .await
            .unwrap();
        assert_eq!(one, 1);
    }

    /// Raw reads test properties in SQL before reading a row; a value that
    /// JSON escapes (quotes, backslashes) must still be found.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn property_filters_on_raw_events_find_escaped_values() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        let event = |id: &str, note: &str| {
            serde_json::from_value::<Event>(serde_json::json!({
                "id": id, "site_id": "s", "event_type": "click", "path": "/a",
                "userid": id, "ts": 1_700_000_000_000i64, "created_at": 0,
                "props": {"note": note}
            }))
            .unwrap()
        };
        let events = [
            event("1", r#"say "hi""#),
            event("2", r"back\slash"),
            event("3", "say hi"),
        ];
        store.insert(&events).await.unwrap();
        crate::store::fold_all(&store).await.unwrap();
        for (op, value, expected) in [
            ("is", r#"say "hi""#, 1),
            ("contains", r#"hi""#, 1),
            ("is", r"back\slash", 1),
            ("contains", "hi", 2),
        ] {
            // Grouped by page and filtered by a property: raw events.
            let body = serde_json::json!({
                "site_id": "s", "metrics": ["events"], "date_range": "all",
                "dimensions": ["event:page"], "filters": [[op, "event:props:note", [value]]]
            });
            let query = crate::query::parse_request(&body)
                .unwrap()
                .resolve(1_800_000_000_000, Some(1_700_000_000_000))
                .unwrap();
            let answer = crate::query::engine::run(&store, std::sync::Arc::new(query))
                .await
                .unwrap();
            let events: u64 = answer
                .rows
                .iter()
                .filter_map(|r| r.metrics[0].as_u64())
                .sum();
            assert_eq!(events, expected, "{op} {value}");
        }
    }
}
