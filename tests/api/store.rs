//! The store conformance suite: every `Store` implementation, on a real
//! backend, must give the answers of the in-memory reference.

use std::sync::Arc;

use chrono::NaiveDate;
use evtrack::event::Event;
use evtrack::stats::{StatsQuery, aggregate};
use evtrack::store::mongo::MongoStore;
use evtrack::store::sqlite::SqliteStore;
use evtrack::store::{InsertOutcome, Store};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::backends::MongoServer;

/// A store under test and what keeps its backend alive.
struct Subject {
    store: Arc<dyn Store>,
    _mongo: Option<MongoServer>,
    _dir: tempfile::TempDir,
}

async fn sqlite() -> Subject {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).expect("open");
    Subject {
        store: Arc::new(store),
        _mongo: None,
        _dir: dir,
    }
}

async fn mongo() -> Subject {
    let server = MongoServer::start();
    let db = format!("conformance_{}", uuid::Uuid::now_v7().simple());
    let store = MongoStore::connect(&server.uri, Some(&db))
        .await
        .expect("connect");
    Subject {
        store: Arc::new(store),
        _mongo: Some(server),
        _dir: tempfile::tempdir().unwrap(),
    }
}

macro_rules! store_tests {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() { super::$name(super::sqlite().await).await }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn mongo() { super::$name(super::mongo().await).await }
            }
        )*
    };
}

store_tests!(
    inserts_are_idempotent,
    the_same_event_id_on_two_sites_is_two_events,
    stats_match_the_reference_on_random_data,
    empty_and_checks
);

const DAY: &str = "2025-11-23";

fn day_start() -> i64 {
    NaiveDate::parse_from_str(DAY, "%Y-%m-%d")
        .unwrap()
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc()
        .timestamp_millis()
}

fn event(id: &str, site: &str, path: Option<&str>, user: Option<&str>, ts: i64) -> Event {
    Event {
        id: id.into(),
        site_id: site.into(),
        event_type: "page_view".into(),
        path: path.map(Into::into),
        userid: user.map(Into::into),
        ts,
        created_at: ts,
        props: None,
    }
}

fn query(site: &str, limit: u32) -> StatsQuery {
    StatsQuery {
        site_id: site.into(),
        date: NaiveDate::parse_from_str(DAY, "%Y-%m-%d").unwrap(),
        event_type: "page_view".into(),
        limit,
    }
}

async fn inserts_are_idempotent(s: Subject) {
    use InsertOutcome::{Duplicate, Inserted};
    let t = day_start();
    let mut props = serde_json::Map::new();
    props.insert("plan".into(), serde_json::json!("pro"));
    props.insert("n".into(), serde_json::json!(2.5));
    let mut with_props = event("a", "s", Some("/x"), Some("u"), t);
    with_props.props = Some(props);
    let batch = vec![with_props, event("b", "s", None, None, t + 1)];
    assert_eq!(s.store.insert(&batch).await.unwrap(), [Inserted, Inserted]);
    // A redelivered batch, partly new: one outcome per event, in order.
    let again = vec![
        batch[1].clone(),
        event("c", "s", Some("/y"), Some("v"), t + 2),
        batch[0].clone(),
    ];
    assert_eq!(
        s.store.insert(&again).await.unwrap(),
        [Duplicate, Inserted, Duplicate]
    );
    // The same id twice in one batch.
    let twice = vec![
        event("d", "s", None, None, t),
        event("d", "s", None, None, t),
    ];
    assert_eq!(s.store.insert(&twice).await.unwrap(), [Inserted, Duplicate]);
    assert_eq!(s.store.count_all().await.unwrap(), 4);
    let ids = ["a", "b", "c", "d", "zz"].map(String::from);
    assert_eq!(s.store.count_ids("s", &ids).await.unwrap(), 4);
    let stats = s.store.stats(&query("s", 10)).await.unwrap();
    assert_eq!((stats.total_views, stats.unique_users), (4, 2));
}

/// An event's identity is (site, event id): one site's ids cannot hide
/// another site's events, in one batch or across batches.
async fn the_same_event_id_on_two_sites_is_two_events(s: Subject) {
    use InsertOutcome::{Duplicate, Inserted};
    let t = day_start();
    let first = vec![event("order-1", "shop-a", Some("/buy"), Some("u1"), t)];
    assert_eq!(s.store.insert(&first).await.unwrap(), [Inserted]);
    let mixed = vec![
        event("order-1", "shop-b", Some("/buy"), Some("u2"), t + 1),
        event("order-1", "shop-a", Some("/buy"), Some("u1"), t),
        event("order-2", "shop-b", Some("/buy"), Some("u2"), t + 2),
        event("order-2", "shop-a", Some("/buy"), Some("u3"), t + 3),
        event("order-2", "shop-b", Some("/buy"), Some("u2"), t + 2),
    ];
    assert_eq!(
        s.store.insert(&mixed).await.unwrap(),
        [Inserted, Duplicate, Inserted, Inserted, Duplicate]
    );
    let ids = ["order-1", "order-2"].map(String::from);
    assert_eq!(s.store.count_ids("shop-a", &ids).await.unwrap(), 2);
    assert_eq!(s.store.count_ids("shop-b", &ids).await.unwrap(), 2);
    assert_eq!(s.store.count_all().await.unwrap(), 4);
    for (site, users) in [("shop-a", 2), ("shop-b", 1)] {
        let stats = s.store.stats(&query(site, 10)).await.unwrap();
        assert_eq!(
            (stats.total_views, stats.unique_users),
            (2, users),
            "{site}"
        );
    }
}

async fn stats_match_the_reference_on_random_data(s: Subject) {
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let t = day_start();
    let paths = ["/", "/a", "/b", "/c", "/d", "/é", "/Z", ""];
    let users = ["u1", "u2", "u3", "u4", "u5", "u6", ""];
    let mut events = Vec::new();
    for i in 0..1500 {
        let site = if rng.random_range(0..5) == 0 {
            "other"
        } else {
            "site"
        };
        let path = (rng.random_range(0..6) != 0).then(|| paths[rng.random_range(0..paths.len())]);
        let user = (rng.random_range(0..4) != 0).then(|| users[rng.random_range(0..users.len())]);
        // Mostly inside the day, some just outside either end.
        let ts = t + rng.random_range(-3_600_000..86_400_000 + 3_600_000);
        let mut e = event(&format!("e{i}"), site, path, user, ts);
        if rng.random_range(0..10) == 0 {
            e.event_type = "click".into();
        }
        events.push(e);
    }
    for chunk in events.chunks(500) {
        s.store.insert(chunk).await.unwrap();
    }
    // Redelivered events, some mixed with new ones, change nothing.
    s.store.insert(&events[100..700]).await.unwrap();
    s.store.insert(&events[1400..]).await.unwrap();
    assert_eq!(s.store.count_all().await.unwrap(), events.len() as u64);
    for limit in [1, 3, 100] {
        for site in ["site", "other", "none"] {
            let q = query(site, limit);
            let expected = aggregate(&events, &q);
            let actual = s.store.stats(&q).await.unwrap();
            assert_eq!(actual, expected, "site {site}, limit {limit}");
        }
    }
    let mut q = query("site", 10);
    q.event_type = "click".into();
    assert_eq!(s.store.stats(&q).await.unwrap(), aggregate(&events, &q));
}

async fn empty_and_checks(s: Subject) {
    s.store.check().await.unwrap();
    let stats = s.store.stats(&query("nobody", 10)).await.unwrap();
    assert_eq!(
        (stats.total_views, stats.unique_users, stats.top_paths.len()),
        (0, 0, 0)
    );
    assert_eq!(s.store.count_all().await.unwrap(), 0);
}

/// The embedded store keeps daily aggregates; they can be rebuilt from the
/// raw events and then give the same answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_aggregates_rebuild_from_raw_events() {
    let s = sqlite().await;
    let t = day_start();
    let events: Vec<Event> = (0..300)
        .map(|i| {
            let path = format!("/p{}", i % 11);
            let user = format!("u{}", i % 17);
            event(
                &format!("r{i}"),
                "site",
                Some(&path),
                Some(&user),
                t + i * 60_000,
            )
        })
        .collect();
    s.store.insert(&events).await.unwrap();
    let q = query("site", 100);
    let expected = aggregate(&events, &q);
    assert_eq!(s.store.stats(&q).await.unwrap(), expected);
    // Damage the aggregates behind the store's back.
    let conn =
        rusqlite::Connection::open(s._dir.path().join(evtrack::store::sqlite::FILE_NAME)).unwrap();
    conn.execute_batch("DELETE FROM day_paths; UPDATE day_totals SET views = 1, users = 99;")
        .unwrap();
    assert_ne!(s.store.stats(&q).await.unwrap(), expected);
    assert!(s.store.rebuild_aggregates().await.unwrap());
    assert_eq!(s.store.stats(&q).await.unwrap(), expected);
    // Rebuilt aggregates keep counting new events exactly.
    let more = vec![
        event("n1", "site", Some("/p1"), Some("new-user"), t),
        event("r0", "site", Some("/p0"), Some("u0"), t),
    ];
    s.store.insert(&more).await.unwrap();
    let all: Vec<Event> = events.iter().chain(&more[..1]).cloned().collect();
    assert_eq!(s.store.stats(&q).await.unwrap(), aggregate(&all, &q));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongo_has_no_aggregates_to_rebuild() {
    let s = mongo().await;
    assert!(!s.store.rebuild_aggregates().await.unwrap());
}

/// MongoDB documents keep the original schema, so existing tools read them:
/// real BSON dates, absent fields left out, plus `event_id`, with `_id` the
/// site and event id joined by U+001F; the database named in the URI is used
/// when MONGO_DB is not set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongo_documents_follow_the_original_schema() {
    use mongodb::bson::{Bson, Document, doc};
    let server = MongoServer::start();
    let db = format!("schema_{}", uuid::Uuid::now_v7().simple());
    let uri = format!("{}/{db}", server.uri.trim_end_matches('/'));
    let store = MongoStore::connect(&uri, None).await.expect("connect");
    let t = day_start();
    let mut full = event("full", "s", Some("/x"), Some("u"), t);
    full.props = Some(
        serde_json::from_str(r#"{"plan": "pro", "n": 3, "f": 1.5, "ok": true, "z": null}"#)
            .unwrap(),
    );
    full.created_at = t + 5;
    let bare = event("bare", "s", None, None, t);
    store.insert(&[full, bare]).await.unwrap();

    let client = mongodb::Client::with_uri_str(&server.uri).await.unwrap();
    let events = client.database(&db).collection::<Document>("events");
    let d = events
        .find_one(doc! {"_id": "s\u{1f}full"})
        .await
        .unwrap()
        .expect("stored in the URI's database");
    assert_eq!(d.get_str("event_id").unwrap(), "full");
    assert_eq!(d.get_str("site_id").unwrap(), "s");
    assert_eq!(d.get_str("event_type").unwrap(), "page_view");
    assert_eq!(d.get_str("path").unwrap(), "/x");
    assert_eq!(d.get_str("userid").unwrap(), "u");
    assert_eq!(d.get_datetime("timestamp").unwrap().timestamp_millis(), t);
    assert_eq!(
        d.get_datetime("createdAt").unwrap().timestamp_millis(),
        t + 5
    );
    let props = d.get_document("props").unwrap();
    assert_eq!(props.get_str("plan").unwrap(), "pro");
    assert_eq!(props.get("n"), Some(&Bson::Int64(3)));
    assert_eq!(props.get("f"), Some(&Bson::Double(1.5)));
    assert_eq!(props.get("ok"), Some(&Bson::Boolean(true)));
    assert_eq!(props.get("z"), Some(&Bson::Null));
    let d = events
        .find_one(doc! {"site_id": "s", "event_id": "bare"})
        .await
        .unwrap()
        .unwrap();
    for absent in ["path", "userid", "props"] {
        assert!(
            !d.contains_key(absent),
            "{absent} is left out when not sent"
        );
    }
    // The stats index exists, and both stats pipelines use it.
    let names = events.list_index_names().await.unwrap();
    assert!(names.iter().any(|n| n == "evtrack_stats"), "{names:?}");
    let q = query("s", 10);
    for pipeline in [
        MongoStore::totals_pipeline(&q),
        MongoStore::paths_pipeline(&q),
    ] {
        let plan = client
            .database(&db)
            .run_command(doc! {
                "explain": {"aggregate": "events", "pipeline": pipeline, "cursor": {}},
                "verbosity": "queryPlanner",
            })
            .await
            .unwrap()
            .to_string();
        assert!(
            plan.contains("IXSCAN") && !plan.contains("COLLSCAN"),
            "{plan}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_rows_keep_every_field() {
    let s = sqlite().await;
    let t = day_start();
    let mut e = event("p1", "s", Some("/x"), Some("u"), t);
    e.props = Some(serde_json::from_str(r#"{"plan": "pro", "n": 3}"#).unwrap());
    e.created_at = t + 7;
    s.store.insert(&[e]).await.unwrap();
    let conn =
        rusqlite::Connection::open(s._dir.path().join(evtrack::store::sqlite::FILE_NAME)).unwrap();
    let row: (String, String, String, String, i64, i64, String) = conn
        .query_row(
            "SELECT site_id, event_type, path, userid, ts, created_at, props FROM events WHERE id = 'p1'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?)),
        )
        .unwrap();
    assert_eq!(
        (
            row.0.as_str(),
            row.1.as_str(),
            row.2.as_str(),
            row.3.as_str(),
            row.4,
            row.5
        ),
        ("s", "page_view", "/x", "u", t, t + 7)
    );
    let props: serde_json::Value = serde_json::from_str(&row.6).unwrap();
    assert_eq!(props, serde_json::json!({"plan": "pro", "n": 3}));
}

#[test]
fn sqlite_opens_from_several_processes_at_once_on_a_new_file() {
    // `evtrack api` and `evtrack worker` started together on one DATA_DIR:
    // one creates the schema, the others wait for it instead of failing.
    // (Separate connections lock the file as separate processes do.)
    for _ in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(4));
        let opened: Vec<_> = (0..4)
            .map(|_| {
                let (dir, barrier) = (dir.path().to_owned(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    SqliteStore::open(&dir)
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                })
            })
            .collect();
        for t in opened {
            assert_eq!(t.join().unwrap(), Ok(()));
        }
    }
}

/// A file written before event identity became (site, id) migrates on open:
/// its events stay, and from then on another site may use the same ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_files_keyed_by_event_id_alone_migrate() {
    use InsertOutcome::{Duplicate, Inserted};
    let dir = tempfile::tempdir().unwrap();
    let t = day_start();
    {
        let conn =
            rusqlite::Connection::open(dir.path().join(evtrack::store::sqlite::FILE_NAME)).unwrap();
        conn.execute_batch(evtrack::store::sqlite::MIGRATIONS[0])
            .unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
        let mut insert = conn
            .prepare(
                "INSERT INTO events (id, site_id, event_type, path, userid, ts, created_at)
                 VALUES (?1, ?2, 'page_view', '/buy', ?3, ?4, ?4)",
            )
            .unwrap();
        for (id, site, user) in [
            ("order-1", "shop-a", "u1"),
            ("order-2", "shop-a", "u2"),
            ("order-3", "shop-b", "u3"),
        ] {
            insert
                .execute(rusqlite::params![id, site, user, t])
                .unwrap();
        }
    }
    let store = SqliteStore::open(dir.path()).expect("the old file opens and migrates");
    assert!(store.rebuild_aggregates().await.unwrap());
    let ids = ["order-1", "order-2", "order-3"].map(String::from);
    assert_eq!(store.count_ids("shop-a", &ids).await.unwrap(), 2);
    assert_eq!(store.count_ids("shop-b", &ids).await.unwrap(), 1);
    let more = vec![
        event("order-1", "shop-b", Some("/buy"), Some("u4"), t),
        event("order-1", "shop-a", Some("/buy"), Some("u1"), t),
    ];
    assert_eq!(store.insert(&more).await.unwrap(), [Inserted, Duplicate]);
    let stats = store.stats(&query("shop-b", 10)).await.unwrap();
    assert_eq!((stats.total_views, stats.unique_users), (2, 2));
    let stats = store.stats(&query("shop-a", 10)).await.unwrap();
    assert_eq!((stats.total_views, stats.unique_users), (2, 2));
}
