//! The data owner's controls over HTTP: the raw NDJSON export of a site's
//! events, CSV answers of the query API, and who may use them.

use evtrack::config::Settings;
use evtrack::startup::Role;
use serde_json::{Value, json};

use crate::helpers::{
    Backend, TestApp, TestEnv, assert_error, backend_tests, ids_of, json_of, spawn_app_with,
};

const ADMIN: &str = "admin-every-site-0123456";
const ADMIN_SHOP: &str = "admin-shop-only-0123456";
const READER: &str = "read-every-site-01234567";

backend_tests!(
    an_export_streams_every_event_of_the_range_once,
    an_erasure_removes_one_person_from_every_answer
);

async fn erase(app: &TestApp, site: &str, body: &Value, token: Option<&str>) -> reqwest::Response {
    let mut request = app
        .client
        .post(format!("{}/api/sites/{site}/erase", app.address))
        .json(body);
    if let Some(t) = token {
        request = request.bearer_auth(t);
    }
    request.send().await.expect("request sent")
}

async fn an_erasure_removes_one_person_from_every_answer(backend: Backend) {
    let app = app_with(backend, |_| {}).await;
    let mut batch = Vec::new();
    for (i, user) in ["ann", "bob", "bob", "cy", "bob", "ann"].iter().enumerate() {
        batch.push(
            json!({"site_id": "shop", "event_type": "page_view", "userid": user,
                          "path": format!("/p{}", i % 2), "props": {"plan": "pro"},
                          "timestamp": format!("2025-11-23T10:0{i}:00Z")}),
        );
    }
    let body = json_of(app.post_events(&json!(batch)).await, 202).await;
    app.wait_stored("shop", &ids_of(&body)).await;
    let q = json!({"site_id": "shop", "metrics": ["visitors", "pageviews", "visits"],
                   "date_range": ["2025-11-23", "2025-11-23"]});
    assert_eq!(
        app.query(&q).await["results"][0]["metrics"],
        json!([3, 6, 3])
    );

    let r = erase(&app, "shop", &json!({"visitor": "bob"}), None).await;
    assert_eq!(
        json_of(r, 200).await,
        json!({"site_id": "shop", "erased": 3})
    );
    // Every answer is that of the events that remain.
    assert_eq!(
        app.query(&q).await["results"][0]["metrics"],
        json!([2, 3, 2])
    );
    let by_plan = json!({"site_id": "shop", "metrics": ["visitors", "events"],
                         "date_range": ["2025-11-23", "2025-11-23"], "dimensions": ["event:props:plan"]});
    assert_eq!(
        app.query(&by_plan).await["results"],
        json!([{"metrics": [2, 3], "dimensions": ["pro"]}])
    );
    let exported = export(&app, "shop/events", None)
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(exported.lines().count(), 3);
    assert!(!exported.contains("bob"));
    // Again: nothing left to erase.
    let r = erase(&app, "shop", &json!({"visitor": "bob"}), None).await;
    assert_eq!(json_of(r, 200).await["erased"], 0);
    for bad in [json!({"visitor": ""}), json!({"visitor": "x\u{1}"})] {
        let r = erase(&app, "shop", &bad, None).await;
        assert_error(&json_of(r, 400).await, "invalid_visitor", Some("visitor"));
    }
    let r = erase(&app, "shop", &json!({"userid": "ann"}), None).await;
    assert_error(&json_of(r, 400).await, "invalid_json", None);
    app.app.stop().await;
}

async fn app_with(backend: Backend, change: impl FnOnce(&mut Settings)) -> TestApp {
    let mut env = TestEnv::new(backend);
    change(&mut env.settings);
    spawn_app_with(env, Role::All).await
}

async fn export(app: &TestApp, query: &str, token: Option<&str>) -> reqwest::Response {
    let mut request = app.client.get(format!("{}/api/sites/{query}", app.address));
    if let Some(t) = token {
        request = request.bearer_auth(t);
    }
    request.send().await.expect("request sent")
}

/// Sends `n` events on `site`, one a second from midnight (UTC) of `day`,
/// in batches; returns their ids.
async fn send(app: &TestApp, site: &str, day: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    let events: Vec<Value> = (0..n)
        .map(|i| {
            json!({"site_id": site, "event_type": if i % 4 == 0 { "signup" } else { "page_view" },
                   "path": format!("/p{}", i % 7), "userid": format!("u{}", i % 50),
                   "props": {"i": i},
                   "timestamp": format!("{day}T{:02}:{:02}:{:02}Z", (i / 3600) % 24, (i / 60) % 60, i % 60)})
        })
        .collect();
    for chunk in events.chunks(1_000) {
        let body = json_of(app.post_events(&json!(chunk)).await, 202).await;
        ids.extend(ids_of(&body));
    }
    // Stored is enough: an export reads the raw events, folded or not.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    while app.store.count_ids(site, &ids).await.unwrap() < ids.len() as u64 {
        assert!(tokio::time::Instant::now() < deadline, "events stored");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    ids
}

fn lines(body: &str) -> Vec<Value> {
    body.lines()
        .map(|l| serde_json::from_str(l).expect("each line is a JSON event"))
        .collect()
}

async fn an_export_streams_every_event_of_the_range_once(backend: Backend) {
    let app = app_with(backend, |_| {}).await;
    // More than a page (2,000), so the answer takes several reads: one
    // event a second from midnight on the 23rd, and 50 the day after.
    let n = if backend.mongo() { 2_100 } else { 5_000 };
    let ids = send(&app, "shop", "2025-11-23", n).await;
    let later = send(&app, "shop", "2025-11-24", 50).await;
    send(&app, "blog", "2025-11-23", 30).await;

    let r = export(&app, "shop/events?date_range=2025-11-23,2025-11-23", None).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/x-ndjson");
    assert_eq!(
        r.headers()["content-disposition"],
        "attachment; filename=\"shop-events.ndjson\""
    );
    let got = lines(&r.text().await.unwrap());
    let got_ids: Vec<&str> = got.iter().map(|e| e["id"].as_str().unwrap()).collect();
    let mut want: Vec<&str> = ids.iter().map(String::as_str).collect();
    let mut sorted = got_ids.clone();
    sorted.sort_unstable();
    want.sort_unstable();
    assert_eq!(sorted, want, "each event of the day once, no other");
    assert!(
        got.windows(2)
            .all(|w| w[0]["ts"].as_i64() <= w[1]["ts"].as_i64()),
        "oldest first"
    );
    // Every field as stored: the event sent as i = 5.
    let five = got.iter().find(|e| e["props"]["i"] == 5).expect("event 5");
    assert_eq!(five["event_type"], "page_view");
    assert_eq!(five["path"], "/p5");
    assert_eq!(five["userid"], "u5");
    assert_eq!(five["site_id"], "shop");

    // Instants, both ends included, in a zone: 00:00:10-00:00:19 UTC.
    let r = export(
        &app,
        "shop/events?date_range=2025-11-23T01:00:10%2B01:00,2025-11-23T01:00:19%2B01:00&timezone=Europe/Paris",
        None,
    )
    .await;
    let got = lines(&r.text().await.unwrap());
    let seconds: Vec<i64> = got
        .iter()
        .map(|e| e["props"]["i"].as_i64().unwrap())
        .collect();
    assert_eq!(seconds, (10..20).collect::<Vec<_>>());

    // The default range is everything.
    let all = lines(
        &export(&app, "shop/events", None)
            .await
            .text()
            .await
            .unwrap(),
    );
    assert_eq!(all.len(), ids.len() + later.len());
    // A site without events: an empty export, not an error.
    let r = export(&app, "nobody/events?date_range=30d", None).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "");
    // Bad parameters are the query API's errors, before anything streams.
    let bad = export(&app, "shop/events?date_range=2025-13-01,2025-11-23", None).await;
    assert_error(
        &json_of(bad, 400).await,
        "invalid_date_range",
        Some("date_range"),
    );
    let bad = export(&app, "shop/events?from=2025-11-01", None).await;
    assert_error(&json_of(bad, 400).await, "unknown_parameter", None);
    app.app.stop().await;
}

/// Exports and the other controls: open like stats on loopback without
/// tokens; refused when stats need tokens but no admin token is set; with
/// admin tokens, only they, scoped to their sites; read tokens never.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_admin_tokens_export_once_tokens_are_configured() {
    let path = "shop/events?date_range=30d";
    let app = app_with(Backend::EmbeddedSqlite, |s| {
        s.stats_tokens = READER.parse().unwrap();
    })
    .await;
    for token in [None, Some(READER)] {
        let r = export(&app, path, token).await;
        assert_error(&json_of(r, 403).await, "admin_disabled", None);
    }
    app.app.stop().await;

    let app = app_with(Backend::EmbeddedSqlite, |s| {
        s.stats_tokens = READER.parse().unwrap();
        s.admin_tokens = format!("{ADMIN}, {ADMIN_SHOP}=shop").parse().unwrap();
    })
    .await;
    assert_error(
        &json_of(export(&app, path, None).await, 401).await,
        "unauthorized",
        None,
    );
    assert_error(
        &json_of(export(&app, path, Some(READER)).await, 401).await,
        "invalid_token",
        None,
    );
    assert_error(
        &json_of(
            export(&app, "blog/events?date_range=30d", Some(ADMIN_SHOP)).await,
            403,
        )
        .await,
        "forbidden",
        None,
    );
    for token in [ADMIN, ADMIN_SHOP] {
        assert_eq!(export(&app, path, Some(token)).await.status(), 200);
    }
    // Erasure: the same rule.
    let who = json!({"visitor": "u1"});
    let r = erase(&app, "shop", &who, Some(READER)).await;
    assert_error(&json_of(r, 401).await, "invalid_token", None);
    let r = erase(&app, "blog", &who, Some(ADMIN_SHOP)).await;
    assert_error(&json_of(r, 403).await, "forbidden", None);
    let r = erase(&app, "shop", &who, Some(ADMIN_SHOP)).await;
    assert_eq!(json_of(r, 200).await["erased"], 0);
    // An admin token is not a read token.
    let q = json!({"site_id": "shop", "metrics": ["events"], "date_range": "30d"});
    let r = app
        .client
        .post(format!("{}/api/v2/query", app.address))
        .bearer_auth(ADMIN)
        .json(&q)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    app.app.stop().await;
}

/// `Accept: text/csv` on the query API: the same rows as the JSON answer,
/// a header of dimensions and metrics, and no cell a spreadsheet would run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_answer_csv_when_asked() {
    let app = app_with(Backend::EmbeddedSqlite, |_| {}).await;
    let mut events = Vec::new();
    for (i, plan) in ["pro", "pro", "=HYPERLINK(\"x\")", "free, \"old\""]
        .iter()
        .enumerate()
    {
        events.push(
            json!({"site_id": "shop", "event_type": "signup", "userid": format!("u{i}"),
                           "props": {"plan": plan}, "timestamp": "2025-11-23T10:00:00Z"}),
        );
    }
    let body = json_of(app.post_events(&json!(events)).await, 202).await;
    app.wait_stored("shop", &ids_of(&body)).await;
    let q = json!({"site_id": "shop", "metrics": ["visitors", "events"],
                   "date_range": ["2025-11-23", "2025-11-23"],
                   "dimensions": ["event:props:plan"]});
    let r = app
        .client
        .post(format!("{}/api/v2/query", app.address))
        .header("Accept", "text/html;q=0.9, text/csv")
        .json(&q)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/csv; charset=utf-8");
    let csv = r.text().await.unwrap();
    assert_eq!(
        csv,
        "event:props:plan,visitors,events\n\
         pro,2,2\n\
         \"'=HYPERLINK(\"\"x\"\")\",1,1\n\
         \"free, \"\"old\"\"\",1,1\n"
    );
    // Without the header, JSON as ever.
    let json = app.query(&q).await;
    assert_eq!(json["results"].as_array().unwrap().len(), 3);
    // Errors stay JSON whatever was asked.
    let bad = app
        .client
        .post(format!("{}/api/v2/query", app.address))
        .header("Accept", "text/csv")
        .json(&json!({"site_id": "shop"}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    assert!(bad.json::<Value>().await.is_ok());
    app.app.stop().await;
}

/// `RETENTION_DAYS` on a store with old events: once the service is up,
/// they are gone from the raw events, the queries and the export, and
/// the recent ones are all there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_days_deletes_old_events_once_up() {
    let day = 86_400_000i64;
    let now = evtrack::query::time::now_ms();
    let at = |ms: i64| {
        chrono::DateTime::from_timestamp_millis(ms)
            .unwrap()
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    };
    let mut env = TestEnv::new(Backend::EmbeddedSqlite);
    env.settings.stats_timeout_ms = 500;
    let settings = env.settings.clone();
    let app = spawn_app_with(env, Role::All).await;
    let mut batch = Vec::new();
    for (i, age) in [40, 35, 31, 29, 3, 0].iter().enumerate() {
        batch.push(
            json!({"site_id": "shop", "event_type": "page_view", "userid": format!("u{i}"),
                          "path": "/", "timestamp": at(now - age * day)}),
        );
    }
    let body = json_of(app.post_events(&json!(batch)).await, 202).await;
    app.wait_stored("shop", &ids_of(&body)).await;
    app.app.stop().await;

    // The same data, now with 30 days kept.
    let mut env = TestEnv::new(Backend::EmbeddedSqlite);
    env.settings = settings;
    env.settings.retention_days = Some(30);
    let app = spawn_app_with(env, Role::All).await;
    let q = json!({"site_id": "shop", "metrics": ["visitors", "events"], "date_range": "all"});
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while app.store.count_all().await.unwrap() > 3 {
        // Meanwhile, once the start has moved, answers are already those
        // of what is kept.
        if app.store.kept_from().await.unwrap().is_some() {
            assert_eq!(app.query(&q).await["results"][0]["metrics"], json!([3, 3]));
        }
        assert!(tokio::time::Instant::now() < deadline, "old events deleted");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(app.query(&q).await["results"][0]["metrics"], json!([3, 3]));
    let exported = export(&app, "shop/events", None)
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(exported.lines().count(), 3);
    app.app.stop().await;
}

/// Redis mode with the worker stopped: a person's events wait in the queue
/// when they are erased; once a worker drains the queue they are dropped,
/// not stored, while everyone else's are stored, and the person's events
/// sent after the erasure are stored as new data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_events_of_an_erased_person_are_dropped_when_they_arrive() {
    use crate::helpers::RunningApp;
    let env = TestEnv::new(Backend::RedisSqlite);
    let settings = env.settings.clone();
    let app = spawn_app_with(env, Role::Api).await;
    let view = |user: &str| json!({"site_id": "shop", "event_type": "page_view", "userid": user, "path": "/"});
    let queued = json_of(
        app.post_events(&json!([view("zed"), view("zed"), view("amy")]))
            .await,
        202,
    )
    .await;
    let queued = ids_of(&queued);
    let r = erase(&app, "shop", &json!({"visitor": "zed"}), None).await;
    assert_eq!(json_of(r, 200).await["erased"], 0, "nothing stored yet");
    let later = json_of(app.post_event(&view("zed")).await, 202).await;
    let later = [later["id"].as_str().unwrap().to_owned()];

    let worker = RunningApp::start(settings, Role::Worker).await;
    app.wait_stored("shop", &[queued[2].clone(), later[0].clone()])
        .await;
    let mut redis = app.env.redis_conn().await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let left: u64 = redis::cmd("XLEN")
            .arg(app.env.stream_key())
            .query_async(&mut redis)
            .await
            .unwrap();
        if left == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the queue drains");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(
        app.store.count_ids("shop", &queued[..2]).await.unwrap(),
        0,
        "the erased person's queued events were dropped"
    );
    let dead: u64 = redis::cmd("XLEN")
        .arg(app.env.dead_key())
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(dead, 0, "dropped, not dead-lettered");
    assert_eq!(app.store.count_all().await.unwrap(), 2);
    worker.stop().await;
    app.app.stop().await;
}
