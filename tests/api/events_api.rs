//! `POST /api/event` (Plausible's Events API), cookieless visitors and their
//! salts, on every backend combination.

use std::sync::Arc;

use evtrack::visitor::{GRACE, SaltSource, VisitorIds};
use serde_json::{Value, json};

use crate::helpers::{
    Backend, TestEnv, assert_error, backend_tests, first_dimensions, json_of, metric, query_today,
    spawn_app_with, wait_events,
};

backend_tests!(
    both_forms_are_recorded_with_what_the_request_says,
    bots_and_other_sites_are_dropped_with_a_reason,
    salts_rotate_at_midnight_and_yesterdays_is_deleted_after_the_grace_period,
);

const CHROME: &str = "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36";
const IPHONE: &str = "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Mobile/15E148 Safari/604.1";

/// A service that trusts loopback as its proxy: tests name the client in
/// `X-Forwarded-For`, as a server-side sender passes on its visitors.
fn env(backend: Backend) -> TestEnv {
    let mut env = TestEnv::new(backend);
    env.settings.trusted_proxies = "127.0.0.1/32".parse().unwrap();
    env
}

async fn send(
    app: &crate::helpers::TestApp,
    ua: &str,
    ip: &str,
    content_type: &str,
    body: &Value,
) -> reqwest::Response {
    app.client
        .post(format!("{}/api/event", app.address))
        .header("User-Agent", ua)
        .header("X-Forwarded-For", ip)
        .header("Content-Type", content_type)
        .header("Origin", "https://shop.example")
        .body(body.to_string())
        .send()
        .await
        .expect("request sent")
}

async fn both_forms_are_recorded_with_what_the_request_says(backend: Backend) {
    let app = spawn_app_with(env(backend), evtrack::startup::Role::All).await;
    // The trackers' short form, as text/plain (what sendBeacon sends).
    let r = send(&app, CHROME, "8.8.8.8", "text/plain;charset=UTF-8",
        &json!({"n": "pageview", "u": "https://www.shop.example/pricing?utm_source=newsletter&utm_campaign=bf&token=secret#top",
                "d": "shop.example", "r": "https://www.google.com/search?q=x", "v": 36, "w": 1280})).await;
    assert_eq!(r.status(), 202);
    assert_eq!(r.headers()["access-control-allow-origin"], "*");
    assert!(r.headers().get("x-evtrack-dropped").is_none());
    assert_eq!(json_of(r, 202).await, json!({"success": true}));
    // The documented long form, from a server passing its visitor on.
    let r = send(
        &app,
        CHROME,
        "8.8.8.8",
        "application/json",
        &json!({"name": "Signup", "url": "https://shop.example/signup", "domain": "shop.example",
                "props": {"plan": "pro"}, "revenue": {"amount": 10, "currency": "EUR"}}),
    )
    .await;
    assert_eq!(r.status(), 202);
    // Engagement: stored with its visit, never counted as an event.
    let r = send(&app, CHROME, "8.8.8.8", "text/plain",
        &json!({"n": "engagement", "u": "https://shop.example/signup", "d": "shop.example", "sd": 80, "e": 4200})).await;
    assert_eq!(r.status(), 202);
    // Another visitor: another address and device; hash routing keeps the fragment.
    let r = send(&app, IPHONE, "1.0.16.1", "text/plain",
        &json!({"n": "pageview", "u": "https://shop.example/app#/cart", "d": "shop.example", "h": 1})).await;
    assert_eq!(r.status(), 202);
    wait_events(&app, "shop.example", 3).await;

    let totals = query_today(&app, "shop.example", json!({})).await;
    assert_eq!(
        totals["results"][0]["metrics"],
        json!([2, 2, 3]),
        "two visitors, two pageviews, three events"
    );
    let pages = query_today(
        &app,
        "shop.example",
        json!({"dimensions": ["event:page"], "order_by": [["event:page", "asc"]]}),
    )
    .await;
    let pages = first_dimensions(&pages);
    assert_eq!(pages, ["/app#/cart", "/pricing", "/signup"]);

    // Each visit's source, country and device, from its first event.
    let by = |d: &str| {
        json!({"metrics": ["visitors", "visits", "bounce_rate"], "dimensions": [d],
                              "order_by": [[d, "asc"]]})
    };
    let sources = query_today(&app, "shop.example", by("visit:source")).await;
    assert_eq!(
        sources["results"],
        json!([{"dimensions": ["Direct / None"], "metrics": [1, 1, 100]},
               {"dimensions": ["newsletter"], "metrics": [1, 1, 0]}]),
        "the signup makes the newsletter visit more than a bounce"
    );
    let countries = query_today(&app, "shop.example", by("visit:country")).await;
    let countries = first_dimensions(&countries);
    assert_eq!(countries, ["JP", "US"]);
    let devices = query_today(&app, "shop.example", by("visit:device")).await;
    let devices = first_dimensions(&devices);
    assert_eq!(devices, ["Desktop", "Mobile"]);
    // What was kept of each request (never the address itself).
    let rows = stored_contexts(&app, "shop.example").await;
    let pricing = &rows["/pricing"];
    assert_eq!(
        pricing.source.as_deref(),
        Some("newsletter"),
        "utm_source names the source"
    );
    assert_eq!(pricing.referrer.as_deref(), Some("google.com/search"));
    assert_eq!(pricing.utm_campaign.as_deref(), Some("bf"));
    assert_eq!(pricing.hostname.as_deref(), Some("shop.example"));
    assert_eq!(
        (
            pricing.browser.as_deref(),
            pricing.os.as_deref(),
            pricing.device.as_deref(),
            pricing.country.as_deref()
        ),
        (Some("Chrome"), Some("macOS"), Some("Desktop"), Some("US"))
    );
    let cart = &rows["/app#/cart"];
    assert_eq!(
        (
            cart.browser.as_deref(),
            cart.os.as_deref(),
            cart.device.as_deref(),
            cart.country.as_deref()
        ),
        (Some("Safari"), Some("iOS"), Some("Mobile"), Some("JP"))
    );
    assert_eq!(cart.source, None, "no referrer: direct");
    let engagement = &rows["engagement"];
    assert_eq!(
        (engagement.scroll_depth, engagement.engaged_ms),
        (Some(80), Some(4200))
    );

    // Malformed bodies are 400 JSON errors; nothing is stored from them.
    for (body, code, field) in [
        (
            json!({"u": "https://shop.example/", "d": "shop.example"}),
            "missing_field",
            None,
        ),
        (
            json!({"n": "x", "u": "https://shop.example/", "d": "shop.example", "p": {"a": [1]}}),
            "invalid_type",
            Some("props.a"),
        ),
        (
            json!({"n": "x", "u": format!("https://shop.example/{}", "a".repeat(3_000)), "d": "shop.example"}),
            "invalid_value",
            Some("url"),
        ),
    ] {
        let r = send(&app, CHROME, "8.8.8.8", "text/plain", &body).await;
        assert_error(&json_of(r, 400).await, code, field);
    }
    let r = app.post_raw("/api/event", "text/plain", "{not json").await;
    assert_error(&json_of(r, 400).await, "invalid_json", None);
    assert_eq!(
        query_today(&app, "shop.example", json!({})).await["results"][0]["metrics"][2],
        3
    );
    app.app.stop().await;
}

/// What the store holds of each of a site's events: its context, by page
/// (engagement events under `engagement`).
async fn stored_contexts(
    app: &crate::helpers::TestApp,
    site: &str,
) -> std::collections::HashMap<String, evtrack::event::Context> {
    let events = app
        .store
        .site_events(site, 1_000)
        .await
        .expect("read events");
    events
        .into_iter()
        .map(|e| {
            let key = if e.is_engagement() {
                "engagement".to_owned()
            } else {
                e.path.clone().unwrap_or_default()
            };
            assert!(e.userid.is_none() && e.visitor.as_deref().is_some_and(|v| v.len() == 16));
            (key, e.context().clone())
        })
        .collect()
}

async fn bots_and_other_sites_are_dropped_with_a_reason(backend: Backend) {
    let mut env = env(backend);
    env.settings.ingest_sites = Some("shop.example,blog.example".parse().unwrap());
    let app = spawn_app_with(env, evtrack::startup::Role::All).await;
    let page = |d: &str| json!({"n": "pageview", "u": "https://shop.example/", "d": d});
    for bot in [
        "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/131.0.0.0 Safari/537.36",
    ] {
        let r = send(&app, bot, "8.8.8.8", "text/plain", &page("shop.example")).await;
        assert_eq!(r.status(), 202);
        assert_eq!(r.headers()["x-evtrack-dropped"], "bot");
    }
    let r = send(
        &app,
        CHROME,
        "8.8.8.8",
        "text/plain",
        &page("elsewhere.example"),
    )
    .await;
    assert_eq!(r.status(), 202);
    assert_eq!(r.headers()["x-evtrack-dropped"], "site_not_allowed");
    // Several sites at once: recorded for each allowed one, once.
    let r = send(
        &app,
        CHROME,
        "8.8.8.8",
        "text/plain",
        &page("shop.example, elsewhere.example,blog.example"),
    )
    .await;
    assert_eq!(r.status(), 202);
    assert!(r.headers().get("x-evtrack-dropped").is_none());
    wait_events(&app, "shop.example", 1).await;
    wait_events(&app, "blog.example", 1).await;
    let metrics = app.metrics().await;
    assert_eq!(
        metric(&metrics, r#"evtrack_events_dropped_total{reason="bot"}"#),
        2.0
    );
    assert_eq!(
        metric(
            &metrics,
            r#"evtrack_events_dropped_total{reason="site_not_allowed"}"#
        ),
        1.0
    );
    // The same client is another visitor on another site.
    let shop = app.store.site_events("shop.example", 10).await.unwrap();
    let blog = app.store.site_events("blog.example", 10).await.unwrap();
    assert_ne!(shop[0].visitor, blog[0].visitor);
    assert_eq!(shop[0].id, blog[0].id, "one event, recorded for both sites");
    app.app.stop().await;
}

/// Salts under a clock the test moves: the day's salt is the same for every
/// process and call, a new day gets a new one, yesterday's is kept for the
/// grace period only, and then it is gone from the backend.
pub(crate) async fn salts_rotate_at_midnight_and_yesterdays_is_deleted_after_the_grace_period(
    backend: Backend,
) {
    let env = TestEnv::new(backend);
    let (a, b): (Arc<dyn SaltSource>, Arc<dyn SaltSource>) = match env.settings.redis() {
        Some(config) => (
            Arc::new(
                evtrack::queue::redis::RedisQueue::connect(&config)
                    .await
                    .unwrap(),
            ),
            Arc::new(
                evtrack::queue::redis::RedisQueue::connect(&config)
                    .await
                    .unwrap(),
            ),
        ),
        None => {
            let dir = &env.settings.data_dir;
            (
                Arc::new(evtrack::store::sqlite::SqliteStore::open(dir).unwrap()),
                Arc::new(evtrack::store::sqlite::SqliteStore::open(dir).unwrap()),
            )
        }
    };
    // Days to come: Redis expires keys by its own clock.
    let day = evtrack::event::now_ms() / 86_400_000 + 30;
    let ms = |d: i64, offset: i64| d * 86_400_000 + offset;
    let grace = GRACE.as_millis() as i64;
    let first = a.salts(ms(day, 10 * 3_600_000)).await.unwrap();
    assert_eq!(first.day, day);
    assert_eq!(first.previous, None, "nothing before the first day");
    let again = b.salts(ms(day, 23 * 3_600_000)).await.unwrap();
    assert_eq!(
        again.current, first.current,
        "one salt per day for every process"
    );
    // Just after midnight: a new salt, and yesterday's for a visit still open.
    let next = b.salts(ms(day + 1, 60_000)).await.unwrap();
    assert_ne!(next.current, first.current);
    assert_eq!(next.previous, Some(first.current));
    // After the grace period, yesterday's is no longer given out…
    let later = a.salts(ms(day + 1, grace)).await.unwrap();
    assert_eq!((later.current, later.previous), (next.current, None));
    // …and no longer stored anywhere.
    match env.settings.redis() {
        Some(_) => {
            // Expiry is Redis's own clock: the key's deadline is the end of
            // the grace period after its day.
            let (mut conn, layout) = env.queue_conn().await;
            let key = format!("{}{day}", layout.salt);
            let at: i64 = redis::cmd("PEXPIRETIME")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap();
            assert_eq!(at, ms(day + 1, grace));
        }
        None => {
            let db = rusqlite::Connection::open(
                env.settings
                    .data_dir
                    .join(evtrack::store::sqlite::FILE_NAME),
            )
            .unwrap();
            let days: Vec<i64> = db
                .prepare("SELECT day FROM salts ORDER BY day")
                .unwrap()
                .query_map([], |r| r.get(0))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            assert_eq!(days, [day + 1]);
        }
    }
    // Visitor ids follow: the same client is another visitor tomorrow, and
    // its id under yesterday's salt is offered only within the grace period.
    let ids = VisitorIds::new(Arc::clone(&a));
    let ip = "203.0.113.7".parse().unwrap();
    let yesterday = ids
        .ids(ms(day + 1, grace + 5), "s", ip, CHROME)
        .await
        .unwrap();
    assert_eq!(yesterday.previous, None);
    let today = ids.ids(ms(day + 2, 5), "s", ip, CHROME).await.unwrap();
    assert_ne!(today.current, yesterday.current);
    assert_eq!(today.previous, Some(yesterday.current));
    let after = ids.ids(ms(day + 2, grace), "s", ip, CHROME).await.unwrap();
    assert_eq!((after.current, after.previous), (today.current, None));
}
