//! The store conformance suite: every `Store` implementation, on a real
//! backend, must give the answers of the in-memory reference.

use std::sync::Arc;

use chrono::NaiveDate;
use evtrack::event::Event;
use evtrack::rollup::{Density, Level};
use evtrack::stats::{StatsQuery, aggregate};
use evtrack::store::mongo::MongoStore;
use evtrack::store::sqlite::{SqliteOptions, SqliteStore};
use evtrack::store::{EventSink, InsertOutcome, Store};
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
    sqlite_with(Density::default()).await
}

async fn sqlite_with(density: Density) -> Subject {
    let dir = tempfile::tempdir().unwrap();
    let options = SqliteOptions {
        density,
        ..SqliteOptions::default()
    };
    let store = SqliteStore::open_with(dir.path(), options).expect("open");
    Subject {
        store: Arc::new(store),
        _mongo: None,
        _dir: dir,
    }
}

async fn mongo() -> Subject {
    mongo_with(Density::default()).await
}

async fn mongo_with(density: Density) -> Subject {
    let server = MongoServer::start();
    let db = format!("conformance_{}", uuid::Uuid::now_v7().simple());
    let store = MongoStore::connect(&server.uri, Some(&db))
        .await
        .expect("connect")
        .with_density(density);
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
    empty_and_checks,
    a_top_list_over_part_months_counts_every_month,
    visits_match_the_reference_in_any_arrival_order,
    export_pages_give_a_range_once_in_time_order,
    retention_keeps_every_answer_that_of_the_events_left,
    the_registry_keeps_sites_and_tokens,
);

/// Site settings and run-time tokens: kept as given, replaced, removed;
/// what a process reads back is what it would enforce.
async fn the_registry_keeps_sites_and_tokens(s: Subject) {
    use evtrack::sites::{SiteSettings, Snapshot, TokenRecord};
    use serde_json::json;
    let empty = s.store.registry().await.unwrap();
    assert!(empty.sites.is_empty() && empty.tokens.is_empty());
    let shop = SiteSettings::parse(&json!({
        "timezone": "Europe/Paris", "public": true, "hostnames": ["shop.example"],
        "exclude_ips": ["203.0.113.0/24"], "goals": [{"event": "Signup"}, {"page": "/blog/**"}],
    }))
    .unwrap();
    let value = |s: &SiteSettings| serde_json::to_value(s).unwrap();
    s.store.put_site("shop", &value(&shop)).await.unwrap();
    s.store
        .put_site("blog", &value(&SiteSettings::default()))
        .await
        .unwrap();
    let (record, token) =
        TokenRecord::create(vec!["shop".parse().unwrap()], Some("a".into()), 1).unwrap();
    s.store.put_token(&record).await.unwrap();
    let stored = s.store.registry().await.unwrap();
    assert_eq!(stored.tokens, std::slice::from_ref(&record));
    let ids: Vec<&str> = stored.sites.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids, ["blog", "shop"]);
    let snapshot = Snapshot::from_stored(stored);
    let read = snapshot.site("shop").expect("shop is registered");
    assert_eq!(read.settings, shop);
    assert!(snapshot.is_public("shop") && !snapshot.is_public("blog"));
    assert!(read.excludes("203.0.113.9".parse().unwrap()));
    let header = format!("Bearer {token}");
    let i = snapshot
        .tokens
        .authenticate(Some(header.as_bytes()))
        .unwrap()
        .expect("the token is known by its digest");
    assert!(snapshot.tokens.authorize(i, "shop").is_ok());
    assert!(snapshot.tokens.authorize(i, "blog").is_err());
    // Replaced whole; removed; revoked.
    let private = SiteSettings {
        public: false,
        ..shop.clone()
    };
    s.store.put_site("shop", &value(&private)).await.unwrap();
    assert!(s.store.delete_site("blog").await.unwrap());
    assert!(!s.store.delete_site("blog").await.unwrap());
    assert!(s.store.revoke_token(&record.id).await.unwrap());
    assert!(!s.store.revoke_token(&record.id).await.unwrap());
    let snapshot = Snapshot::from_stored(s.store.registry().await.unwrap());
    assert_eq!(snapshot.sites().len(), 1);
    assert!(!snapshot.is_public("shop"));
    assert!(snapshot.tokens.is_empty());
}

/// Retention deletes whole UTC days from the oldest; every answer after it
/// (and while it runs: the start moves first) equals the reference's over
/// the events left, for ranges across the cutoff, whole months around it
/// and visits that run over it.
async fn retention_keeps_every_answer_that_of_the_events_left(s: Subject) {
    use evtrack::query::{engine, parse_request, reference};
    use serde_json::json;
    let mut rng = StdRng::seed_from_u64(11);
    // 50 days around a cutoff in the middle of a month, visits of a few
    // events minutes apart, some of them over the cutoff's midnight.
    let cutoff = day_start() - 10 * 86_400_000;
    let base = cutoff - 25 * 86_400_000;
    let mut events = Vec::new();
    for i in 0..1_500 {
        let mut ts = base + rng.random_range(0..50 * 86_400_000i64);
        if i % 10 == 0 {
            ts = cutoff + rng.random_range(-1_200_000..1_200_000);
        }
        let site = if i % 7 == 0 { "other" } else { "site" };
        let user = format!("u{}", rng.random_range(0..40));
        let mut e = event(
            &format!("r{i}"),
            site,
            Some(["/a", "/b", "/c"][rng.random_range(0..3)]),
            Some(&user),
            ts,
        );
        if rng.random_range(0..4) == 0 {
            e.event_type = "signup".parse().unwrap();
        }
        events.push(e);
        // Visits of several events: the next one a few minutes later.
        if i % 3 == 0 {
            let mut next = events[events.len() - 1].clone();
            next.id = format!("r{i}-next").parse().unwrap();
            next.ts += rng.random_range(60_000..600_000);
            next.created_at = next.ts;
            events.push(next);
        }
    }
    s.store.insert(&events[..1_200]).await.unwrap();
    crate::helpers::fold_all(&*s.store).await;
    s.store.set_kept_from(cutoff).await.unwrap();
    assert_eq!(s.store.kept_from().await.unwrap(), Some(cutoff));
    // It never moves back.
    s.store.set_kept_from(cutoff - 86_400_000).await.unwrap();
    assert_eq!(s.store.kept_from().await.unwrap(), Some(cutoff));
    let kept = |events: &[Event]| -> Vec<Event> {
        events.iter().filter(|e| e.ts >= cutoff).cloned().collect()
    };
    let left = kept(&events);
    assert!(left.len() < events.len() && !left.is_empty());

    let now = day_start() + 12 * 3_600_000;
    let check = |events: Vec<Event>, stage: &'static str| {
        let store = Arc::clone(&s.store);
        let mut rng = StdRng::seed_from_u64(12);
        async move {
            for n in 0..40 {
                let site = if n % 5 == 0 { "other" } else { "site" };
                let over_visits = n % 3 == 0;
                let metrics = if over_visits {
                    json!(["visits", "bounce_rate", "visit_duration", "views_per_visit"])
                } else {
                    json!(["visitors", "pageviews", "events"])
                };
                let from = chrono::DateTime::from_timestamp_millis(
                    cutoff + rng.random_range(-40..10i64) * 86_400_000,
                )
                .unwrap()
                .format("%Y-%m-%d")
                .to_string();
                let date_range = match n % 4 {
                    0 => json!("all"),
                    1 => json!("month"),
                    _ => json!([from, "2025-12-31"]),
                };
                let dims = [
                    json!([]),
                    json!(["time:day"]),
                    json!(["time:month"]),
                    json!(["event:page"]),
                    json!(["visit:entry_page"]),
                ];
                let mut dimensions = dims[rng.random_range(0..dims.len())].clone();
                if !over_visits && dimensions == json!(["visit:entry_page"]) {
                    dimensions = json!(["event:page"]);
                }
                if over_visits && dimensions == json!(["event:page"]) {
                    dimensions = json!(["visit:entry_page"]);
                }
                let zone = ["UTC", "Asia/Kolkata", "America/Santiago"][n % 3];
                let mut body = json!({"site_id": site, "metrics": metrics,
                                      "date_range": date_range, "dimensions": dimensions,
                                      "timezone": zone});
                if dimensions.as_array().is_some_and(|d| {
                    d.iter()
                        .any(|x| x.as_str().is_some_and(|x| x.starts_with("time")))
                }) {
                    body["include"] = json!({"time_labels": true});
                }
                let request = parse_request(&body).unwrap();
                let first = store.first_event(site).await.unwrap();
                let query = Arc::new(request.resolve(now, first).unwrap());
                let actual = engine::run(&*store, Arc::clone(&query)).await.unwrap();
                let expected = reference::evaluate(&events, &query);
                assert_eq!(
                    actual, expected,
                    "{stage}, query {n}: {body}\nresolved: {}",
                    query.echo
                );
            }
        }
    };
    // The start has moved, nothing is deleted yet: answers are already
    // those of the events after the cutoff.
    check(kept(&events[..1_200]), "before deletion").await;
    // Some stored, not folded yet, when the deletion runs.
    s.store.insert(&events[1_200..]).await.unwrap();
    let mut deleted = 0;
    loop {
        let n = s.store.delete_expired(100).await.unwrap();
        if n == 0 {
            break;
        }
        assert!(n <= 100, "steps are bounded");
        deleted += n;
    }
    assert_eq!(deleted, events.len() - left.len());
    crate::helpers::fold_all(&*s.store).await;
    assert_eq!(s.store.count_all().await.unwrap(), left.len() as u64);
    check(left, "after deletion").await;
}

/// Pages of a raw export, of any size, chained by their `next`, give every
/// event of the site in the range exactly once, oldest first, with all
/// their fields, even where many share a millisecond; folded or not.
async fn export_pages_give_a_range_once_in_time_order(s: Subject) {
    let mut rng = StdRng::seed_from_u64(7);
    let t = day_start();
    let mut events = Vec::new();
    for i in 0..600 {
        let site = if i % 3 == 0 { "other" } else { "s" };
        // 40 distinct times: about ten events on each millisecond.
        let ts = t + rng.random_range(0..40i64) * 1_000;
        let mut e = event(
            &format!("e{:03}", rng.random_range(0..1000)),
            site,
            Some("/p"),
            None,
            ts,
        );
        e.id = format!("id-{i}-{}", rng.random_range(0..1_000_000))
            .parse()
            .unwrap();
        if i % 5 == 0 {
            let mut props = serde_json::Map::new();
            props.insert("n".into(), serde_json::json!(i));
            e.props = Some(props);
        }
        events.push(e);
    }
    // Half folded, half only stored: an export reads the raw events.
    s.store.insert(&events[..300]).await.unwrap();
    crate::helpers::fold_all(&*s.store).await;
    s.store.insert(&events[300..]).await.unwrap();
    let (start, end) = (t + 5_000, t + 30_000);
    let mut want: Vec<&Event> = events
        .iter()
        .filter(|e| e.site_id == "s" && (start..end).contains(&e.ts))
        .collect();
    want.sort_by(|a, b| (a.ts, a.id.as_str()).cmp(&(b.ts, b.id.as_str())));
    assert!(want.len() > 200, "the range holds many events");
    for size in [1, 7, 50, 10_000] {
        let mut got: Vec<Event> = Vec::new();
        let mut after = None;
        let mut pages = 0;
        loop {
            let page = s
                .store
                .events_page("s", start, end, after, size)
                .await
                .unwrap();
            assert!(page.events.len() <= size);
            pages += 1;
            got.extend(page.events);
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        assert!(pages >= want.len() / size, "pages of {size}");
        assert!(
            got.windows(2).all(|w| w[0].ts <= w[1].ts),
            "pages of {size}: oldest first"
        );
        let mut got_sorted: Vec<&Event> = got.iter().collect();
        got_sorted.sort_by(|a, b| (a.ts, a.id.as_str()).cmp(&(b.ts, b.id.as_str())));
        assert_eq!(
            got_sorted, want,
            "pages of {size}: each event once, as stored"
        );
    }
    let none = s.store.events_page("s", end, end, None, 10).await.unwrap();
    assert!(none.events.is_empty() && none.next.is_none());
}

/// The time of a visitor's last event.
fn want_last(events: &[Event], site: &str, visitor: &str) -> i64 {
    events
        .iter()
        .filter(|e| e.site_id == site && evtrack::query::visitor_of(e) == Some(visitor))
        .map(|e| e.ts)
        .max()
        .expect("the visitor has events")
}

/// Visits as the fold keeps them equal those of the whole set of events
/// (`evtrack::session::visits_of`), however the events arrive: shuffled
/// over hours, in batches folded one by one, some redelivered, engagement
/// and non-interactive events among them, two sites.
async fn visits_match_the_reference_in_any_arrival_order(s: Subject) {
    use evtrack::session::{Visit, visits_of};
    use rand::seq::SliceRandom;
    let mut rng = StdRng::seed_from_u64(0x5e55_1045);
    let base = day_start();
    let minute = 60_000i64;
    let names = ["page_view", "page_view", "signup", "engagement", "video"];
    let mut events: Vec<Event> = (0..600)
        .map(|i| {
            let site = if i % 7 == 0 { "other" } else { "site" };
            let user = format!("u{}", rng.random_range(0..12));
            let mut e = event(
                &format!("v{i:04}"),
                site,
                Some(&format!("/p{}", rng.random_range(0..5))),
                None,
                base + rng.random_range(0..(16 * 60 * minute)),
            );
            e.event_type = names[rng.random_range(0..names.len())].parse().unwrap();
            // Some share an instant: ids order them.
            if rng.random_range(0..6) == 0 {
                e.ts -= e.ts % (20 * minute);
            }
            match rng.random_range(0..3) {
                0 => e.userid = Some(user),
                _ => e.visitor = Some(user),
            }
            let mut ctx = evtrack::event::Context {
                source: Some(format!("src{}", rng.random_range(0..3))),
                browser: Some("Firefox".into()),
                ..Default::default()
            };
            ctx.non_interactive = e.event_type == "video";
            e.ctx = Some(Box::new(ctx));
            e
        })
        .collect();
    events.shuffle(&mut rng);
    let mut at = 0;
    while at < events.len() {
        let n = rng.random_range(1..120).min(events.len() - at);
        s.store.insert(&events[at..at + n]).await.unwrap();
        crate::helpers::fold_all(&*s.store).await;
        at += n;
    }
    s.store.insert(&events[100..250]).await.unwrap();
    crate::helpers::fold_all(&*s.store).await;
    let key = |v: &Visit| (v.visitor.clone(), v.start, v.start_id.clone());
    for site in ["site", "other"] {
        let mut want: Vec<Visit> = visits_of(events.iter().filter(|e| e.site_id == site));
        want.sort_by_key(key);
        let mut got = s
            .store
            .visits(site, base - 86_400_000, base + 2 * 86_400_000)
            .await
            .unwrap();
        got.sort_by_key(key);
        assert!(want.len() > 30, "{} visits", want.len());
        assert_eq!(got, want, "{site}");
    }
    // A visit is open while its last event is within the gap: what keeps
    // a cookieless visitor's id across midnight.
    let last = want_last(&events, "site", "u3");
    assert!(s.store.visit_open("site", "u3", last).await.unwrap());
    assert!(!s.store.visit_open("site", "u3", last + 1).await.unwrap());
    assert!(!s.store.visit_open("site", "nobody", 0).await.unwrap());
    // A range holds the visits that start in it.
    let noon = base + 12 * 60 * minute;
    let late = s
        .store
        .visits("site", noon, base + 86_400_000)
        .await
        .unwrap();
    assert!(!late.is_empty() && late.iter().all(|v| v.start >= noon));
}

/// A top list by visitors over a range that owns one whole month and parts
/// of the two around it: month rows bound a page's visitors only when every
/// month the range overlaps is read. Page `/a` has 100 visitors in late
/// January and one in February, `/b` ten in February: the February rows
/// alone would "bound" `/a` at 1 and put `/b` first.
async fn a_top_list_over_part_months_counts_every_month(s: Subject) {
    use evtrack::query::{engine, parse_request};
    let at = |d: &str| {
        chrono::DateTime::parse_from_rfc3339(d)
            .unwrap()
            .timestamp_millis()
    };
    let mut events = Vec::new();
    for i in 0..100 {
        let u = format!("jan-{i}");
        events.push(event(
            &u,
            "s",
            Some("/a"),
            Some(&u),
            at("2025-01-20T10:00:00Z"),
        ));
    }
    events.push(event(
        "feb-a",
        "s",
        Some("/a"),
        Some("feb-a"),
        at("2025-02-10T10:00:00Z"),
    ));
    for i in 0..10 {
        let u = format!("feb-{i}");
        events.push(event(
            &u,
            "s",
            Some("/b"),
            Some(&u),
            at("2025-02-11T10:00:00Z"),
        ));
    }
    s.store.insert(&events).await.unwrap();
    crate::helpers::fold_all(&*s.store).await;
    let request = parse_request(&serde_json::json!({
        "site_id": "s", "metrics": ["visitors", "pageviews"],
        "date_range": ["2025-01-15", "2025-03-15"], "dimensions": ["event:page"],
        "pagination": {"limit": 1}
    }))
    .unwrap();
    let query = Arc::new(request.resolve(at("2025-06-01T00:00:00Z"), None).unwrap());
    let answer = engine::run(&*s.store, Arc::clone(&query)).await.unwrap();
    assert_eq!(
        answer.to_json(&query)["results"],
        serde_json::json!([{"metrics": [101, 101], "dimensions": ["/a"]}])
    );
}

/// The property test, with days on both sides of the rollups' density
/// thresholds (see `evtrack::rollup`, "Sparse days"): the random data has
/// about 30 events a day on its main site, so some days keep every level,
/// some hours and days only, some months only, and many turn finer between
/// two folds. On SQLite also with every level kept from the first event,
/// and with the default thresholds (every day read raw).
mod queries_match_the_reference_on_random_data {
    use evtrack::rollup::Density;

    const MIXED: Density = Density {
        hour: 25,
        quarter: 35,
    };

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        super::queries_match_the_reference_on_random_data(super::sqlite_with(MIXED).await).await
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mongo() {
        super::queries_match_the_reference_on_random_data(super::mongo_with(MIXED).await).await
    }
    /// Every day keeps day rows: top lists of pages over whole UTC days
    /// are read page by page, best bound first (`Aggregator::bounded_page_top`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mongo_every_level() {
        let s = super::mongo_with(Density::ALL_LEVELS).await;
        super::queries_match_the_reference_on_random_data(s).await
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mongo_top_pages() {
        let s = super::mongo_with(Density::ALL_LEVELS).await;
        super::top_pages_match_the_reference(s).await
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_top_pages() {
        let s = super::sqlite_with(Density::ALL_LEVELS).await;
        super::top_pages_match_the_reference(s).await
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_every_level() {
        let s = super::sqlite_with(Density::ALL_LEVELS).await;
        super::queries_match_the_reference_on_random_data(s).await
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_default_density() {
        super::queries_match_the_reference_on_random_data(super::sqlite().await).await
    }
}

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
        id: id.parse().unwrap(),
        site_id: site.parse().unwrap(),
        event_type: "page_view".parse().unwrap(),
        path: path.map(Into::into),
        userid: user.map(Into::into),
        ts,
        created_at: ts,
        props: None,
        visitor: None,
        ctx: None,
    }
}

fn query(site: &str, limit: u32) -> StatsQuery {
    StatsQuery {
        site_id: site.parse().expect("valid"),
        date: NaiveDate::parse_from_str(DAY, "%Y-%m-%d").unwrap(),
        event_type: "page_view".parse().expect("valid"),
        limit,
    }
}

/// `GET /stats`'s answer from a store, once everything stored is folded.
async fn stats(store: &Arc<dyn Store>, q: &StatsQuery) -> evtrack::stats::Stats {
    crate::helpers::fold_all(&**store).await;
    evtrack::stats::compute(&**store, q).await.unwrap()
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
    let stats = stats(&s.store, &query("s", 10)).await;
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
        let stats = stats(&s.store, &query(site, 10)).await;
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
            e.event_type = "click".parse().unwrap();
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
            let actual = stats(&s.store, &q).await;
            assert_eq!(actual, expected, "site {site}, limit {limit}");
        }
    }
    let mut q = query("site", 10);
    q.event_type = "click".parse().expect("valid");
    assert_eq!(stats(&s.store, &q).await, aggregate(&events, &q));
}

async fn empty_and_checks(s: Subject) {
    s.store.check().await.unwrap();
    let stats = stats(&s.store, &query("nobody", 10)).await;
    assert_eq!(
        (stats.total_views, stats.unique_users, stats.top_paths.len()),
        (0, 0, 0)
    );
    assert_eq!(s.store.count_all().await.unwrap(), 0);
}

/// The embedded store's rollups can be rebuilt from the raw events and then
/// give the same answers, and keep counting new events exactly.
async fn rollups_rebuild_from_raw_events(s: Subject, damage: impl AsyncFnOnce()) {
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
    assert_eq!(stats(&s.store, &q).await, expected);
    damage().await;
    assert_ne!(stats(&s.store, &q).await, expected);
    assert_eq!(s.store.rebuild_rollups().await.unwrap(), 300);
    assert_eq!(stats(&s.store, &q).await, expected);
    let more = vec![
        event("n1", "site", Some("/p1"), Some("new-user"), t),
        event("r0", "site", Some("/p0"), Some("u0"), t),
    ];
    s.store.insert(&more).await.unwrap();
    let all: Vec<Event> = events.iter().chain(&more[..1]).cloned().collect();
    assert_eq!(stats(&s.store, &q).await, aggregate(&all, &q));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_rollups_rebuild_from_raw_events() {
    // Every level kept, so that the damage is in rows the query reads (a
    // day of 300 events is otherwise read raw).
    let s = sqlite_with(Density::ALL_LEVELS).await;
    let file = s._dir.path().join(evtrack::store::sqlite::FILE_NAME);
    rollups_rebuild_from_raw_events(s, async move || {
        // Damage the rollups behind the store's back.
        let conn = rusqlite::Connection::open(file).unwrap();
        conn.execute_batch(
            "DELETE FROM rollups WHERE dim = 'page'; UPDATE rollups SET events = 1;",
        )
        .unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongo_rollups_rebuild_from_raw_events() {
    use mongodb::bson::doc;
    let server = MongoServer::start();
    let db = format!("rebuild_{}", uuid::Uuid::now_v7().simple());
    let store = MongoStore::connect(&server.uri, Some(&db))
        .await
        .expect("connect")
        .with_density(Density::ALL_LEVELS);
    let client = mongodb::Client::with_uri_str(&server.uri).await.unwrap();
    let rollups = client
        .database(&db)
        .collection::<mongodb::bson::Document>(evtrack::store::mongo::ROLLUPS);
    let s = Subject {
        store: Arc::new(store),
        _mongo: Some(server),
        _dir: tempfile::tempdir().unwrap(),
    };
    rollups_rebuild_from_raw_events(s, async move || {
        // Damage the rollups behind the store's back.
        rollups.delete_many(doc! {"dim": "page"}).await.unwrap();
        rollups
            .update_many(doc! {}, doc! {"$set": {"events": 1}})
            .await
            .unwrap();
    })
    .await;
}

/// A database written by an evtrack without MongoDB rollups (events without
/// the `pending` mark, no rollups) is counted whole after the first start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongo_events_stored_before_rollups_are_counted() {
    let server = MongoServer::start();
    let db = format!("legacy_{}", uuid::Uuid::now_v7().simple());
    let client = mongodb::Client::with_uri_str(&server.uri).await.unwrap();
    let t = day_start();
    let events: Vec<Event> = (0..40)
        .map(|i| {
            let user = format!("u{}", i % 7);
            event(
                &format!("old{i}"),
                "site",
                Some("/old"),
                Some(&user),
                t + i * 1000,
            )
        })
        .collect();
    let docs: Vec<_> = events
        .iter()
        .map(|e| evtrack::store::mongo::to_document(e).unwrap())
        .collect();
    client
        .database(&db)
        .collection(evtrack::store::mongo::COLLECTION)
        .insert_many(docs)
        .await
        .unwrap();
    let store: Arc<dyn Store> = Arc::new(
        MongoStore::connect(&server.uri, Some(&db))
            .await
            .expect("connect"),
    );
    let q = query("site", 10);
    assert_eq!(stats(&store, &q).await, aggregate(&events, &q));
    // A second start does not count them again.
    let again: Arc<dyn Store> = Arc::new(
        MongoStore::connect(&server.uri, Some(&db))
            .await
            .expect("connect"),
    );
    assert_eq!(stats(&again, &q).await, aggregate(&events, &q));
}

/// A standalone server has no transactions, which the rollups need: refused
/// at start-up with a message that says what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongo_refuses_a_standalone_server() {
    let server = MongoServer::start_standalone();
    let err = match MongoStore::connect(&server.uri, Some("standalone")).await {
        Ok(_) => panic!("a standalone server was accepted"),
        Err(e) => e,
    };
    assert!(err.contains("replica set"), "{err}");
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
    // Every read a query or a fold makes uses its index: raw events by
    // (site, time), rollups by (site, dimension, level, bucket), by a range
    // of buckets (one name's rows and every name's) or a list, pending
    // events by the partial index.
    let plans = evtrack::store::mongo::explain_reads(&client.database(&db), "s", t, t + 86_400_000)
        .await
        .unwrap();
    let indexes = [
        "evtrack_site_time",
        evtrack::store::mongo::ROLLUP_INDEX,
        evtrack::store::mongo::ROLLUP_INDEX,
        evtrack::store::mongo::ROLLUP_INDEX,
        evtrack::store::mongo::PENDING_INDEX,
    ];
    assert_eq!(plans.len(), indexes.len());
    for (plan, index) in plans.iter().zip(indexes) {
        let plan = plan.to_string();
        assert!(
            plan.contains("IXSCAN") && plan.contains(index) && !plan.contains("COLLSCAN"),
            "{index}: {plan}"
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

/// A file written before event identity became (site, id) migrates on open
/// (through every later migration): its events stay and are counted in the
/// rollups, and from then on another site may use the same ids.
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
    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(dir.path()).expect("the old file opens and migrates"));
    // No rebuild asked for: the migration leaves every old event to be
    // folded into the rollups.
    let ids = ["order-1", "order-2", "order-3"].map(String::from);
    assert_eq!(store.count_ids("shop-a", &ids).await.unwrap(), 2);
    assert_eq!(store.count_ids("shop-b", &ids).await.unwrap(), 1);
    let more = vec![
        event("order-1", "shop-b", Some("/buy"), Some("u4"), t),
        event("order-1", "shop-a", Some("/buy"), Some("u1"), t),
    ];
    assert_eq!(store.insert(&more).await.unwrap(), [Inserted, Duplicate]);
    let b = stats(&store, &query("shop-b", 10)).await;
    assert_eq!((b.total_views, b.unique_users), (2, 2));
    let stats = stats(&store, &query("shop-a", 10)).await;
    assert_eq!((stats.total_views, stats.unique_users), (2, 2));
}

/// Random events (several sites, names, pages, visitors, properties, over
/// ten weeks), stored in chunks with redeliveries; then random queries
/// (ranges of dates and of instants at odd seconds, zones with offsets of
/// 30 and 45 minutes and daylight saving, every dimension and grain, nested
/// filters, orders, pages). Every answer must equal the in-memory
/// reference over the raw events.
/// Top lists of pages by visitors over whole UTC days, the queries a
/// store may answer page by page from the month rows' bounds (MongoDB:
/// `Aggregator::bounded_page_top`): pages of very different popularity,
/// visitors returning across days and months, ranges within and across
/// months, limits and offsets, filters on the page.
async fn top_pages_match_the_reference(s: Subject) {
    use evtrack::query::{engine, parse_request, reference};
    use serde_json::json;
    let mut rng = StdRng::seed_from_u64(0x70b5);
    let base = day_start() - 60 * 86_400_000;
    let span = 90 * 86_400_000i64;
    let mut events = Vec::new();
    for i in 0..1_500 {
        // Page k about as often as 1/(k+1): a few popular ones, a long tail.
        let page = (0..40)
            .find(|k| rng.random_range(0..k + 2) == 0)
            .unwrap_or(39);
        let mut e = event(
            &format!("t{i}"),
            "site",
            Some(&format!("/p{page}")),
            Some(&format!("u{}", rng.random_range(0..120))),
            base + rng.random_range(0..span),
        );
        if rng.random_range(0..5) == 0 {
            e.event_type = "signup".parse().unwrap();
        }
        events.push(e);
    }
    for chunk in events.chunks(500) {
        s.store.insert(chunk).await.unwrap();
        crate::helpers::fold_all(&*s.store).await;
    }
    for n in 0..60 {
        let a = base + rng.random_range(0..span);
        let b = a + rng.random_range(0..45 * 86_400_000i64);
        let day = |t: i64| {
            chrono::DateTime::from_timestamp_millis(t)
                .unwrap()
                .format("%Y-%m-%d")
                .to_string()
        };
        let mut body = json!({"site_id": "site", "metrics": ["visitors", "pageviews"],
            "date_range": [day(a), day(b)], "dimensions": ["event:page"],
            "pagination": {"limit": rng.random_range(1..12), "offset": rng.random_range(0..4)}});
        if rng.random_range(0..3) == 0 {
            body["filters"] = json!([["contains", "event:page", ["/p1"]]]);
        }
        if rng.random_range(0..3) == 0 {
            body["order_by"] = json!([["visitors", "desc"], ["event:page", "desc"]]);
        }
        let query = Arc::new(
            parse_request(&body)
                .unwrap()
                .resolve(base + 400 * 86_400_000, None)
                .unwrap(),
        );
        let actual = engine::run(&*s.store, Arc::clone(&query)).await.unwrap();
        assert_eq!(
            actual,
            reference::evaluate(&events, &query),
            "query {n}: {body}"
        );
    }
}

async fn queries_match_the_reference_on_random_data(s: Subject) {
    use evtrack::query::{engine, parse_request, reference};
    use serde_json::{Value, json};
    let seed: u64 = std::env::var("EVTRACK_PROPTEST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x0e7_71ac);
    let mut rng = StdRng::seed_from_u64(seed);
    let base = day_start() - 35 * 86_400_000;
    let span = 70 * 86_400_000i64;
    // Engagement events are activity of a visit: in no metric.
    let names = [
        "page_view",
        "page_view",
        "page_view",
        "signup",
        "click",
        "engagement",
    ];
    let pages: Vec<String> = (0..12).map(|i| format!("/p{i}")).collect();
    let plans = [
        json!("pro"),
        json!("free"),
        json!(3),
        json!("3"),
        json!(true),
        // Escaped in the stored JSON: a store looking for the text as sent
        // in the raw JSON would miss it.
        json!("pro \"x\""),
        Value::Null,
    ];
    let mut events = Vec::new();
    for i in 0..2_500 {
        let site = if rng.random_range(0..6) == 0 {
            "other"
        } else {
            "site"
        };
        let path = match rng.random_range(0..14) {
            0 => None,
            1 => Some(String::new()),
            _ => Some(pages[rng.random_range(0..pages.len())].clone()),
        };
        let user = match rng.random_range(0..10) {
            0 => None,
            1 => Some(String::new()),
            _ => Some(format!("u{}", rng.random_range(0..60))),
        };
        let mut e = event(
            &format!("q{i}"),
            site,
            path.as_deref(),
            user.as_deref(),
            base + rng.random_range(0..span),
        );
        e.event_type = names[rng.random_range(0..names.len())].parse().unwrap();
        // Without a userid, mostly a cookieless visitor id; some share one
        // with a userid (a visitor is a visitor, whichever way it is known).
        if e.userid.is_none() && rng.random_range(0..4) != 0 {
            e.visitor = Some(format!("u{}", rng.random_range(50..80)));
        }
        // Where visits come from and on what (their first event's).
        if rng.random_range(0..5) != 0 {
            e.ctx = Some(Box::new(evtrack::event::Context {
                source: [None, Some("src0"), Some("src1")][rng.random_range(0..3)].map(Into::into),
                browser: Some(["Firefox", "Chrome"][rng.random_range(0..2)].into()),
                country: [None, Some("FR")][rng.random_range(0..2)].map(Into::into),
                non_interactive: rng.random_range(0..4) == 0,
                ..Default::default()
            }));
        }
        let mut props = serde_json::Map::new();
        if rng.random_range(0..3) == 0 {
            props.insert(
                "plan".into(),
                plans[rng.random_range(0..plans.len())].clone(),
            );
        }
        if rng.random_range(0..4) == 0 {
            props.insert("seats".into(), json!(rng.random_range(1..4)));
        }
        e.props = (!props.is_empty()).then_some(props);
        events.push(e);
    }
    // Folded chunk by chunk, as a running service folds: days cross the
    // density thresholds between folds.
    for chunk in events[..2_300].chunks(400) {
        s.store.insert(chunk).await.unwrap();
        crate::helpers::fold_all(&*s.store).await;
    }
    // Redeliveries, some mixed with new events.
    s.store.insert(&events[300..900]).await.unwrap();
    crate::helpers::fold_all(&*s.store).await;
    s.store.insert(&events[2_000..2_300]).await.unwrap();
    crate::helpers::fold_all(&*s.store).await;
    // The last ones stored, not folded yet, when three people are erased:
    // a userid, a cookieless id that is also someone's userid, and a
    // userid on the other site. Every answer below is the reference's over
    // the events that remain.
    s.store.insert(&events[2_300..]).await.unwrap();
    let erased_at = base + span + 86_400_000;
    let gone = [("site", "u7"), ("site", "u55"), ("other", "u3")];
    let of = |e: &Event, (site, who): (&str, &str)| {
        e.site_id == site && evtrack::query::visitor_of(e) == Some(who)
    };
    for person in gone {
        let want = events.iter().filter(|e| of(e, person)).count() as u64;
        assert!(want > 0, "{person:?} has events");
        let n = s.store.erase(person.0, person.1, erased_at).await.unwrap();
        assert_eq!(n, want, "{person:?}: every event erased");
    }
    // Their events received before the erasure, arriving again (from a
    // queue), are dropped; a later one is theirs again.
    let late: Vec<Event> = events
        .iter()
        .filter(|e| of(e, gone[0]))
        .take(3)
        .cloned()
        .collect();
    let outcomes = s.store.insert(&late).await.unwrap();
    assert!(
        outcomes.iter().all(|o| *o == InsertOutcome::Erased),
        "{outcomes:?}"
    );
    let mut back = event(
        "after-erasure",
        "site",
        Some("/p1"),
        Some("u7"),
        base + 5_000,
    );
    back.created_at = erased_at + 1;
    assert_eq!(
        s.store.insert(std::slice::from_ref(&back)).await.unwrap(),
        [InsertOutcome::Inserted]
    );
    events.retain(|e| !gone.iter().any(|&p| of(e, p)));
    events.push(back);
    crate::helpers::fold_all(&*s.store).await;
    assert_eq!(s.store.count_all().await.unwrap(), events.len() as u64);

    // Visit rollups, where a store keeps them: each month's row of every
    // visit holds the site's visits that start in it, as the reference has
    // them (and the queries below are answered from them).
    let months = (
        Level::Month.start(base - 86_400_000),
        base + span + 40 * 86_400_000,
    );
    let month_span = evtrack::query::engine::Span {
        level: Level::Month,
        from: months.0,
        to: Level::Month.start(months.1),
    };
    if let Some((rows, _)) = s
        .store
        .visit_rollups("site", "all", vec![month_span], Vec::new())
        .await
        .unwrap()
    {
        let reference = evtrack::session::visits_of(events.iter().filter(|e| e.site_id == "site"));
        let mut want: std::collections::BTreeMap<i64, u64> = Default::default();
        for v in &reference {
            *want.entry(Level::Month.start(v.start)).or_default() += 1;
        }
        let got: std::collections::BTreeMap<i64, u64> =
            rows.iter().map(|r| (r.bucket, r.visits)).collect();
        assert_eq!(got, want, "visits by month in the visit rollups");
    } else {
        assert_ne!(s.store.kind(), "sqlite", "SQLite keeps visit rollups");
    }
    let zones = [
        "UTC",
        "Europe/Paris",
        "Asia/Kolkata",
        "Asia/Kathmandu",
        "America/St_Johns",
        "Australia/Lord_Howe",
        "America/Santiago",
        "Pacific/Chatham",
    ];
    let dims = [
        "event:name",
        "event:page",
        "event:props:plan",
        "event:props:seats",
    ];
    let times = ["time", "time:hour", "time:day", "time:week", "time:month"];
    let values = [
        "/p1",
        "/p2",
        "page_view",
        "pageview",
        "signup",
        "pro",
        "3",
        "(none)",
        "P",
        "true",
        "pro \"x\"",
    ];
    let leaf = |rng: &mut StdRng| -> Value {
        let op = ["is", "is_not", "contains", "contains_not"][rng.random_range(0..4)];
        let dim = dims[rng.random_range(0..dims.len())];
        let n = rng.random_range(1..3);
        let vals: Vec<&str> = (0..n)
            .map(|_| values[rng.random_range(0..values.len())])
            .collect();
        if rng.random_range(0..4) == 0 {
            json!([op, dim, vals, {"case_sensitive": false}])
        } else {
            json!([op, dim, vals])
        }
    };
    // Pinned so that relative ranges land inside the data.
    let now = day_start() + 12 * 3_600_000;
    // The test's MongoDB stand-in answers each read in milliseconds, and a
    // query makes dozens.
    let queries = if s.store.kind() == "sqlite" { 300 } else { 150 };
    let mut served_by_rollups = 0;
    let mut of_events = 0;
    let mut visit_answers = 0;
    let visit_dims = [
        "visit:source",
        "visit:browser",
        "visit:country",
        "visit:entry_page",
        "visit:exit_page",
    ];
    let visit_values = [
        "Direct / None",
        "src1",
        "Firefox",
        "FR",
        "(none)",
        "/p1",
        "/p2",
    ];
    let visit_leaf = |rng: &mut StdRng| {
        let op = ["is", "is_not", "contains", "contains_not"][rng.random_range(0..4)];
        let dim = visit_dims[rng.random_range(0..visit_dims.len())];
        let value = visit_values[rng.random_range(0..visit_values.len())];
        json!([op, dim, [value]])
    };
    let (mut visits_by_events, mut events_by_visits) = (0, 0);
    // The sites' goals: an event's name, and page patterns (`/p1*` is /p1
    // and /p10, /p11; `/**` every page).
    let goals = evtrack::sites::SiteSettings::parse(&json!({"goals": [
        {"event": "signup"}, {"page": "/p1"}, {"page": "/p1*"}, {"page": "/**"},
    ]}))
    .unwrap();
    let goal_names = ["signup", "Visit /p1", "Visit /p1*", "Visit /**"];
    let mut goal_queries = 0;
    let mut goal_answers = 0;
    for n in 0..queries {
        let site = if rng.random_range(0..5) == 0 {
            "other"
        } else {
            "site"
        };
        let mut metrics = vec!["visitors", "pageviews", "events"];
        metrics.retain(|_| rng.random_range(0..3) != 0);
        if metrics.is_empty() {
            metrics.push("visitors");
        }
        let zone = zones[rng.random_range(0..zones.len())];
        let date_range = match rng.random_range(0..6) {
            0 => json!(
                ["day", "7d", "30d", "month", "6mo", "12mo", "year", "all"][rng.random_range(0..8)]
            ),
            1 | 2 => {
                let a = base + rng.random_range(0..span);
                let b = a + rng.random_range(0..20 * 86_400_000i64);
                let fmt = |t: i64| {
                    chrono::DateTime::from_timestamp_millis(t)
                        .unwrap()
                        .format("%Y-%m-%dT%H:%M:%S+00:00")
                        .to_string()
                };
                json!([fmt(a), fmt(b)])
            }
            _ => {
                let a = base + rng.random_range(-86_400_000..span);
                let b = a + rng.random_range(0..40 * 86_400_000i64);
                let fmt = |t: i64| {
                    chrono::DateTime::from_timestamp_millis(t)
                        .unwrap()
                        .format("%Y-%m-%d")
                        .to_string()
                };
                json!([fmt(a), fmt(b)])
            }
        };
        let mut dimensions = Vec::new();
        if rng.random_range(0..2) == 0 {
            dimensions.push(json!(dims[rng.random_range(0..dims.len())]));
        }
        if rng.random_range(0..2) == 0 {
            dimensions.push(json!(times[rng.random_range(0..times.len())]));
        }
        if rng.random_range(0..2) == 0 {
            dimensions.reverse();
        }
        let mut filters = Vec::new();
        for _ in 0..rng.random_range(0..3) {
            filters.push(match rng.random_range(0..8) {
                0 => json!(["or", [leaf(&mut rng), leaf(&mut rng)]]),
                1 => json!(["not", leaf(&mut rng)]),
                2 => json!(["and", [leaf(&mut rng), ["not", leaf(&mut rng)]]]),
                _ => leaf(&mut rng),
            });
        }
        // Filters on the breakdown's own dimension keep the query on the
        // rollups; make that common.
        if let Some(d) = dimensions
            .iter()
            .find(|d| d.as_str().is_some_and(|d| d.starts_with("event:")))
            && rng.random_range(0..2) == 0
        {
            filters.clear();
            filters.push(json!([
                "is_not",
                d,
                [values[rng.random_range(0..values.len())]]
            ]));
        }
        // A third are over visits: visit metrics, visit:* dimensions and
        // filters.
        let over_visits = rng.random_range(0..3) == 0;
        if over_visits {
            metrics = vec![
                "visitors",
                "pageviews",
                "events",
                "visits",
                "bounce_rate",
                "visit_duration",
                "views_per_visit",
            ];
            metrics.retain(|_| rng.random_range(0..2) == 0);
            if metrics.is_empty() {
                metrics.push("visits");
            }
            dimensions.retain(|d| d.as_str().is_some_and(|d| d.starts_with("time")));
            if rng.random_range(0..3) != 0 {
                dimensions.push(json!(visit_dims[rng.random_range(0..visit_dims.len())]));
            }
            filters.clear();
            for _ in 0..rng.random_range(0..3) {
                // Visit filters, and event filters: the visits that hold
                // such an event (with the visit, when both are in one `or`).
                let visit_leaf = visit_leaf(&mut rng);
                filters.push(match rng.random_range(0..6) {
                    0 => json!(["not", visit_leaf]),
                    1 => leaf(&mut rng),
                    2 => json!(["or", [leaf(&mut rng), visit_leaf]]),
                    _ => visit_leaf,
                });
            }
            if filters.iter().any(|f| f.to_string().contains("event:")) {
                visits_by_events += 1;
            }
        } else {
            of_events += 1;
            // Events of visits that pass a visit filter.
            if rng.random_range(0..4) == 0 {
                filters.push(visit_leaf(&mut rng));
                events_by_visits += 1;
            }
        }
        // Goals: grouped by them, or filtered, with the conversion rate.
        if !over_visits && rng.random_range(0..4) == 0 {
            goal_queries += 1;
            let name = |rng: &mut StdRng| goal_names[rng.random_range(0..goal_names.len())];
            match rng.random_range(0..3) {
                0 => {
                    dimensions.retain(|d| d.as_str().is_some_and(|d| d.starts_with("time")));
                    dimensions.push(json!("event:goal"));
                }
                1 => filters.push(json!(["is", "event:goal", [name(&mut rng)]])),
                _ => {
                    let op = ["is_not", "contains", "contains_not"][rng.random_range(0..3)];
                    let needle = match op {
                        "is_not" => name(&mut rng),
                        _ => ["/p1", "signup", "Visit", "/**"][rng.random_range(0..4)],
                    };
                    filters.push(json!([
                        "or",
                        [[op, "event:goal", [needle]], leaf(&mut rng)]
                    ]));
                    filters.push(
                        json!(["is", "event:goal", [name(&mut rng)], {"case_sensitive": false}]),
                    );
                }
            }
            if rng.random_range(0..2) == 0 {
                metrics.push("conversion_rate");
            }
        }
        let mut body = json!({"site_id": site, "metrics": metrics, "date_range": date_range,
            "timezone": zone, "dimensions": dimensions, "filters": filters});
        // Orders by metrics (visitors among them: a top list counts only
        // the groups that can make it) and dimensions, either way.
        if rng.random_range(0..2) == 0 {
            let mut keys: Vec<Value> = metrics.iter().map(|m| json!(m)).collect();
            keys.extend(dimensions.iter().cloned());
            let order: Vec<Value> = (0..rng.random_range(1..3))
                .map(|_| {
                    let key = keys[rng.random_range(0..keys.len())].clone();
                    let direction = ["asc", "desc"][rng.random_range(0..2)];
                    json!([key, direction])
                })
                .collect();
            body["order_by"] = json!(order);
        }
        if rng.random_range(0..3) == 0 {
            body["pagination"] =
                json!({"limit": rng.random_range(1..5), "offset": rng.random_range(0..3)});
        }
        if rng.random_range(0..3) == 0 {
            body["include"] = json!({"total_rows": true});
        }
        let request = match parse_request(&body) {
            Ok(r) => r.for_site(Some(&goals)),
            Err(e) => panic!("query {n} {body}: {e:?}"),
        };
        let first = s.store.first_event(site).await.unwrap();
        let expected_first = events
            .iter()
            .filter(|e| e.site_id == site)
            .map(|e| e.ts)
            .min();
        assert_eq!(first, expected_first, "first event of {site}");
        let query = match request.resolve(now, first) {
            Ok(q) => Arc::new(q),
            // Too many hourly buckets: a 400, nothing to compare.
            Err(e) if e.code == "too_many_buckets" => continue,
            Err(e) => panic!("query {n} {body}: {e:?}"),
        };
        let (plan, _) = engine::plan(Arc::clone(&query));
        if plan.raw_vids {
            served_by_rollups += 1;
        }
        let actual = engine::run(&*s.store, Arc::clone(&query))
            .await
            .unwrap_or_else(|e| panic!("query {n} {body}: {e:?}"));
        let expected = reference::evaluate(&events, &query);
        assert_eq!(
            actual, expected,
            "seed {seed:#x}, query {n}: {body}\nresolved: {}",
            query.echo
        );
        let nonzero = |r: &evtrack::query::Row| r.metrics.iter().any(|m| m.as_f64() != Some(0.0));
        if over_visits && expected.rows.iter().any(nonzero) {
            visit_answers += 1;
        }
        if body.to_string().contains("event:goal") && expected.rows.iter().any(nonzero) {
            goal_answers += 1;
        }
    }
    assert!(
        goal_answers > goal_queries / 3,
        "only {goal_answers} of {goal_queries} queries with goals found any"
    );
    assert!(
        visit_answers > queries / 6,
        "only {visit_answers} queries over visits found any"
    );
    assert!(
        visits_by_events > queries / 20 && events_by_visits > queries / 20,
        "{visits_by_events} queries of visits filtered by events, \
         {events_by_visits} of events filtered by visits"
    );
    assert!(
        served_by_rollups > of_events / 2,
        "only {served_by_rollups} of {of_events} queries of events were served by rollups"
    );
}

/// An erasure leaves no copy of the person's id in the SQLite file or its
/// WAL: deleted content is overwritten, the WAL checkpointed and truncated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_erasure_leaves_no_trace_of_the_id_in_the_files() {
    let s = sqlite_with(Density::ALL_LEVELS).await;
    let who = "erase-me-7c1f9a";
    let t = day_start();
    let events: Vec<Event> = (0..3_000)
        .map(|i| {
            let user = if i % 3 == 0 {
                who.to_owned()
            } else {
                format!("keep-{i}")
            };
            event(
                &format!("e{i}"),
                "s",
                Some("/p"),
                Some(&user),
                t + i * 1_000,
            )
        })
        .collect();
    s.store.insert(&events).await.unwrap();
    crate::helpers::fold_all(&*s.store).await;
    let files = || -> Vec<u8> {
        let mut all = Vec::new();
        for entry in std::fs::read_dir(s._dir.path()).unwrap() {
            all.extend(std::fs::read(entry.unwrap().path()).unwrap());
        }
        all
    };
    let holds = |bytes: &[u8]| bytes.windows(who.len()).any(|w| w == who.as_bytes());
    assert!(holds(&files()), "the id is stored before");
    let n = s.store.erase("s", who, t + 10_000_000).await.unwrap();
    assert_eq!(n, 1_000);
    assert!(!holds(&files()), "no copy of the id is left in the files");
    assert_eq!(s.store.count_all().await.unwrap(), 2_000);
}
