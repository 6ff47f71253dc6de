//! The embedded store: SQLite in WAL mode, one file in `DATA_DIR`.
//!
//! rusqlite is synchronous, so every call runs on tokio's blocking pool. There
//! is one writer connection (SQLite allows one writer at a time anyway, and a
//! single connection lets a whole batch commit in one transaction) and one
//! reader connection; in WAL mode readers never block the writer.
//!
//! Durability: `synchronous=NORMAL` in WAL mode makes a commit survive the
//! process being killed (`kill -9`); only a power loss or OS crash can lose the
//! last commits. `synchronous=FULL` would fsync every commit.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, params};

use super::{InsertReport, Store, StoreError};
use crate::event::Event;
use crate::stats::{PathStats, Stats, StatsQuery};

pub const FILE_NAME: &str = "evtrack.sqlite3";

/// Schema migrations, applied in order; `PRAGMA user_version` records how many
/// have run. Never edit a released entry: append a new one.
const MIGRATIONS: &[&str] = &[
    // 1: events, keyed by event id (the idempotency key), and the stats index:
    // it covers the whole stats query, so stats never touch the table rows.
    "CREATE TABLE events (
        id         TEXT PRIMARY KEY NOT NULL,
        site_id    TEXT NOT NULL,
        event_type TEXT NOT NULL,
        path       TEXT,
        userid     TEXT,
        ts         INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        props      TEXT
    );
    CREATE INDEX events_stats ON events (site_id, event_type, ts, path, userid);",
];

#[derive(Clone)]
pub struct SqliteStore {
    // std Mutex, not tokio's: the lock is only ever taken inside
    // `spawn_blocking`, never held across an `.await`.
    writer: Arc<Mutex<Connection>>,
    reader: Arc<Mutex<Connection>>,
    path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct OpenError(String);

impl SqliteStore {
    /// Opens (creating if needed) the database in `dir` and runs migrations.
    pub fn open(dir: &Path) -> Result<Self, OpenError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| OpenError(format!("cannot create {}: {e}", dir.display())))?;
        let path = dir.join(FILE_NAME);
        let fail = |e: rusqlite::Error| OpenError(format!("cannot open {}: {e}", path.display()));
        let mut writer = Connection::open(&path).map_err(fail)?;
        configure(&writer).map_err(fail)?;
        migrate(&mut writer).map_err(fail)?;
        let reader = Connection::open(&path).map_err(fail)?;
        configure(&reader).map_err(fail)?;
        Ok(Self {
            writer: Arc::new(Mutex::new(writer)),
            reader: Arc::new(Mutex::new(reader)),
            path,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
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
        .map_err(|e| StoreError::Unavailable(format!("sqlite: {e}")))
    }
}

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(())
}

fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let version: usize =
        conn.pragma_query_value(None, "user_version", |r| r.get::<_, i64>(0))? as usize;
    if version > MIGRATIONS.len() {
        return Err(rusqlite::Error::InvalidParameterName(format!(
            "database schema version {version} is newer than this evtrack ({}); upgrade evtrack",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}

#[async_trait]
impl Store for SqliteStore {
    async fn insert(&self, events: &[Event]) -> Result<InsertReport, StoreError> {
        let events = events.to_vec();
        Self::with_conn(&self.writer, move |conn| {
            // One transaction per batch: all of it is stored or none of it.
            let tx = conn.transaction()?;
            let mut report = InsertReport::default();
            {
                let mut stmt = tx.prepare_cached(
                    "INSERT INTO events (id, site_id, event_type, path, userid, ts, created_at, props)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT (id) DO NOTHING",
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
                        report.inserted += 1;
                    } else {
                        report.duplicates += 1;
                    }
                }
            }
            tx.commit()?;
            Ok(report)
        })
        .await
    }

    async fn stats(&self, query: &StatsQuery) -> Result<Stats, StoreError> {
        let q = query.clone();
        Self::with_conn(&self.reader, move |conn| {
            let (start, end) = q.day_range_ms();
            // Both statements read one snapshot so the totals and the paths agree.
            let tx = conn.transaction()?;
            let (total, users): (i64, i64) = tx
                .prepare_cached(
                    "SELECT COUNT(*), COUNT(DISTINCT NULLIF(userid, ''))
                 FROM events WHERE site_id = ?1 AND event_type = ?2 AND ts >= ?3 AND ts < ?4",
                )?
                .query_row(params![q.site_id, q.event_type, start, end], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })?;
            let mut stmt = tx.prepare_cached(
                "SELECT path, COUNT(*) AS views, COUNT(DISTINCT NULLIF(userid, '')) AS users
                 FROM events
                 WHERE site_id = ?1 AND event_type = ?2 AND ts >= ?3 AND ts < ?4
                   AND path IS NOT NULL AND path <> ''
                 GROUP BY path
                 ORDER BY views DESC, users DESC, path ASC
                 LIMIT ?5",
            )?;
            let paths = stmt
                .query_map(params![q.site_id, q.event_type, start, end, q.limit], |r| {
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

    async fn check(&self) -> Result<(), StoreError> {
        Self::with_conn(&self.reader, |conn| {
            conn.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))
                .map(|_| ())
        })
        .await
    }

    async fn count_ids(&self, ids: &[String]) -> Result<u64, StoreError> {
        let ids = ids.to_vec();
        Self::with_conn(&self.reader, move |conn| {
            let mut stmt = conn.prepare_cached("SELECT 1 FROM events WHERE id = ?1")?;
            let mut n = 0;
            for id in &ids {
                if stmt.query_row([id], |_| Ok(())).optional()?.is_some() {
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
