//! The embedded store: SQLite in WAL mode, one file in `DATA_DIR`.
//!
//! rusqlite is synchronous, so every call runs on tokio's blocking pool. There
//! is one writer connection (SQLite allows one writer at a time anyway, and a
//! single connection lets a whole batch commit in one transaction) and one
//! reader connection; in WAL mode readers never block the writer.
//!
//! Stats come from daily aggregates that the insert maintains in the same
//! transaction as the raw events, so a stats request reads a handful of rows
//! however many events the day holds (aggregating a day of a million events
//! at query time takes the better part of a second). The raw `events` table
//! stays the source of truth: the aggregates are counted only for events that
//! were newly inserted (a redelivered event changes nothing), unique users
//! are kept exact by one row per (day, user) and per (day, path, user), and
//! [`SqliteStore::rebuild_aggregates`] recomputes everything from the raw events.
//!
//! Durability ([`Durability`]): `synchronous=NORMAL` in WAL mode makes a
//! commit survive the process being killed (`kill -9`), but a power loss or
//! OS crash can lose the last commits, which sat in the OS's cache. That is
//! the embedded mode's choice, said so in the README. Behind a Redis queue the
//! worker deletes entries from Redis once the store has them, so there every
//! commit is synced to disk first (`synchronous=FULL`): nothing acknowledged to
//! Redis lives only in the OS cache.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, Transaction, params};

use super::{InsertOutcome, Store, StoreError};
use crate::event::Event;
use crate::stats::{PathStats, Stats, StatsQuery, counted_path, counted_user, day_number};

pub const FILE_NAME: &str = "evtrack.sqlite3";

/// See [`SqliteStore::open`].
const WAL_AUTOCHECKPOINT_PAGES: i64 = 16_384;

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
];

/// Recomputes every aggregate from the raw events.
const REBUILD: &str = "
    DELETE FROM day_totals; DELETE FROM day_users; DELETE FROM day_paths; DELETE FROM day_path_users;
    INSERT INTO day_users
        SELECT DISTINCT site_id, event_type, ts / 86400000, userid FROM events WHERE userid <> '';
    INSERT INTO day_path_users
        SELECT DISTINCT site_id, event_type, ts / 86400000, path, userid FROM events
        WHERE path <> '' AND userid <> '';
    INSERT INTO day_totals
        SELECT site_id, event_type, ts / 86400000, COUNT(*), COUNT(DISTINCT NULLIF(userid, ''))
        FROM events GROUP BY 1, 2, 3;
    INSERT INTO day_paths
        SELECT site_id, event_type, ts / 86400000, path, COUNT(*), COUNT(DISTINCT NULLIF(userid, ''))
        FROM events WHERE path <> '' GROUP BY 1, 2, 3, 4;";

/// Aggregate changes of one batch, gathered in memory first so that a key
/// repeated in the batch (a popular path, a busy user) costs one statement.
#[derive(Default)]
struct Deltas<'a> {
    views: HashMap<(&'a str, &'a str, i64), i64>,
    users: HashSet<(&'a str, &'a str, i64, &'a str)>,
    path_views: HashMap<(&'a str, &'a str, i64, &'a str), i64>,
    path_users: HashSet<(&'a str, &'a str, i64, &'a str, &'a str)>,
}

impl<'a> Deltas<'a> {
    fn add(&mut self, e: &'a Event) {
        let day = day_number(e.ts);
        let (site, ty) = (e.site_id.as_str(), e.event_type.as_str());
        let user = counted_user(e.userid.as_deref());
        *self.views.entry((site, ty, day)).or_default() += 1;
        if let Some(u) = user {
            self.users.insert((site, ty, day, u));
        }
        if let Some(p) = counted_path(e.path.as_deref()) {
            *self.path_views.entry((site, ty, day, p)).or_default() += 1;
            if let Some(u) = user {
                self.path_users.insert((site, ty, day, p, u));
            }
        }
    }

    /// Applies the changes; new users are those whose row did not exist yet.
    fn apply(self, tx: &Transaction<'_>) -> rusqlite::Result<()> {
        let mut new_users: HashMap<(&str, &str, i64), i64> = HashMap::new();
        let mut stmt =
            tx.prepare_cached("INSERT OR IGNORE INTO day_users VALUES (?1, ?2, ?3, ?4)")?;
        for (site, ty, day, user) in self.users {
            if stmt.execute(params![site, ty, day, user])? == 1 {
                *new_users.entry((site, ty, day)).or_default() += 1;
            }
        }
        let mut stmt = tx.prepare_cached(
            "INSERT INTO day_totals VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT DO UPDATE SET views = views + excluded.views, users = users + excluded.users",
        )?;
        for ((site, ty, day), views) in self.views {
            let users = new_users.get(&(site, ty, day)).copied().unwrap_or(0);
            stmt.execute(params![site, ty, day, views, users])?;
        }
        let mut new_path_users: HashMap<(&str, &str, i64, &str), i64> = HashMap::new();
        let mut stmt =
            tx.prepare_cached("INSERT OR IGNORE INTO day_path_users VALUES (?1, ?2, ?3, ?4, ?5)")?;
        for (site, ty, day, path, user) in self.path_users {
            if stmt.execute(params![site, ty, day, path, user])? == 1 {
                *new_path_users.entry((site, ty, day, path)).or_default() += 1;
            }
        }
        let mut stmt = tx.prepare_cached(
            "INSERT INTO day_paths VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT DO UPDATE SET views = views + excluded.views, users = users + excluded.users",
        )?;
        for ((site, ty, day, path), views) in self.path_views {
            let users = new_path_users
                .get(&(site, ty, day, path))
                .copied()
                .unwrap_or(0);
            stmt.execute(params![site, ty, day, path, views, users])?;
        }
        Ok(())
    }
}

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
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self {
            durability: Durability::default(),
            query_timeout: crate::config::DEFAULT_STATS_TIMEOUT,
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
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct OpenError(String);

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
        // The aggregate tables take inserts at random places (users, paths):
        // a page cache of 32 MiB instead of SQLite's 2 MiB keeps their hot
        // pages in memory instead of re-reading them from the OS per batch.
        writer
            .pragma_update(None, "cache_size", -32 * 1024)
            .map_err(fail)?;
        // Checkpoint every 16,384 WAL pages (64 MiB) instead of SQLite's
        // 1,000: a checkpoint writes every page the WAL holds back into the
        // database and fsyncs both files, and the aggregate pages are
        // rewritten by almost every batch, so the rarer the checkpoint, the
        // fewer times each page is written (measured with `evtrack-bench
        // store-insert`: 55k → 73k events/s at 10,000 pages, 83k at 50,000).
        writer
            .pragma_update(None, "wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES)
            .map_err(fail)?;
        migrate(&mut writer).map_err(fail)?;
        let reader = Connection::open(&path).map_err(fail)?;
        configure(&reader).map_err(fail)?;
        Ok(Self {
            writer: Arc::new(Mutex::new(writer)),
            reader: Arc::new(Mutex::new(reader)),
            query_timeout: options.query_timeout,
        })
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

#[async_trait]
impl Store for SqliteStore {
    async fn insert(&self, events: &[Event]) -> Result<Vec<InsertOutcome>, StoreError> {
        let events = events.to_vec();
        Self::with_conn(&self.writer, move |conn| {
            // One transaction per batch: the events and their aggregates are
            // stored together or not at all.
            let tx = conn.transaction()?;
            let mut outcomes = Vec::with_capacity(events.len());
            let mut deltas = Deltas::default();
            {
                let mut stmt = tx.prepare_cached(
                    "INSERT INTO events (id, site_id, event_type, path, userid, ts, created_at, props)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT (site_id, id) DO NOTHING",
                )?;
                for e in &events {
                    let props = e.props.as_ref().map(|p| serde_json::Value::Object(p.clone()).to_string());
                    let n = stmt.execute(params![
                        e.id,
                        e.site_id,
                        e.event_type,
                        e.path,
                        e.userid,
                        e.ts,
                        e.created_at,
                        props
                    ])?;
                    if n == 1 {
                        outcomes.push(InsertOutcome::Inserted);
                        // Only new events count: a redelivery changes nothing.
                        deltas.add(e);
                    } else {
                        outcomes.push(InsertOutcome::Duplicate);
                    }
                }
            }
            deltas.apply(&tx)?;
            tx.commit()?;
            Ok(outcomes)
        })
        .await
    }

    async fn stats(&self, query: &StatsQuery) -> Result<Stats, StoreError> {
        let q = query.clone();
        self.read(move |conn| {
            let day = q.day_number();
            // Both statements read one snapshot so the totals and the paths agree.
            let tx = conn.transaction()?;
            let (total, users): (i64, i64) = tx
                .prepare_cached(
                    "SELECT views, users FROM day_totals WHERE site_id = ?1 AND event_type = ?2 AND day = ?3",
                )?
                .query_row(params![q.site_id, q.event_type, day], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?
                .unwrap_or((0, 0));
            let mut stmt = tx.prepare_cached(
                "SELECT path, views, users FROM day_paths
                 WHERE site_id = ?1 AND event_type = ?2 AND day = ?3
                 ORDER BY views DESC, users DESC, path ASC
                 LIMIT ?4",
            )?;
            let paths = stmt
                .query_map(params![q.site_id, q.event_type, day, q.limit], |r| {
                    Ok(PathStats {
                        path: r.get(0)?,
                        views: r.get::<_, i64>(1)? as u64,
                        unique_users: r.get::<_, i64>(2)? as u64,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            drop(stmt);
            tx.commit()?;
            Ok(Stats::new(&q, total as u64, users as u64, paths))
        })
        .await
    }

    async fn rebuild_aggregates(&self) -> Result<bool, StoreError> {
        Self::with_conn(&self.writer, |conn| {
            let tx = conn.transaction()?;
            tx.execute_batch(REBUILD)?;
            tx.commit()?;
            Ok(true)
        })
        .await
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

    fn kind(&self) -> &'static str {
        "sqlite"
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
}
