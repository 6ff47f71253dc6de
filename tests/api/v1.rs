//! Plausible's Stats API v1 over HTTP: the same answers as the v2 queries
//! they translate to, in v1's shapes.

use serde_json::{Value, json};

use crate::helpers::{Backend, TestApp, assert_error, ids_of, json_of, spawn_app};

async fn v1(app: &TestApp, path_and_query: &str, status: u16) -> Value {
    json_of(
        app.get(&format!("/api/v1/stats/{path_and_query}")).await,
        status,
    )
    .await
}

/// Three days of a small site: ann reads two pages on the 21st (one
/// visit), bob one page on the 21st and one on the 23rd (two bounces), cy
/// signs up on the 23rd.
async fn seeded() -> TestApp {
    let app = spawn_app(Backend::EmbeddedSqlite).await;
    let e = |user: &str, name: &str, page: &str, at: &str| {
        json!({"site_id": "shop", "event_type": name, "userid": user, "path": page,
               "timestamp": at})
    };
    let batch = json!([
        e("ann", "page_view", "/a", "2025-11-21T10:00:00Z"),
        e("ann", "page_view", "/b", "2025-11-21T10:05:00Z"),
        e("bob", "page_view", "/a", "2025-11-21T12:00:00Z"),
        e("bob", "page_view", "/a", "2025-11-23T09:00:00Z"),
        e("cy", "signup", "/b", "2025-11-23T11:00:00Z"),
    ]);
    let body = json_of(app.post_events(&batch).await, 202).await;
    app.wait_stored("shop", &ids_of(&body)).await;
    app
}

const RANGE: &str = "site_id=shop&period=custom&date=2025-11-21,2025-11-23";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_answers_in_plausibles_shapes() {
    let app = seeded().await;
    let metrics = "visitors,pageviews,events,visits,bounce_rate,visit_duration,views_per_visit";
    let r = v1(&app, &format!("aggregate?{RANGE}&metrics={metrics}"), 200).await;
    // The v2 answers to the same questions.
    let q = |metrics: Value| json!({"site_id": "shop", "metrics": metrics, "date_range": ["2025-11-21", "2025-11-23"]});
    let events = app
        .query(&q(json!(["visitors", "pageviews", "events"])))
        .await;
    let visits = app
        .query(&q(json!([
            "visits",
            "bounce_rate",
            "visit_duration",
            "views_per_visit"
        ])))
        .await;
    let m = |a: &Value, i: usize| a["results"][0]["metrics"][i].clone();
    assert_eq!(
        r["results"],
        json!({
            "visitors": {"value": m(&events, 0)}, "pageviews": {"value": m(&events, 1)},
            "events": {"value": m(&events, 2)}, "visits": {"value": m(&visits, 0)},
            "bounce_rate": {"value": m(&visits, 1)}, "visit_duration": {"value": m(&visits, 2)},
            "views_per_visit": {"value": m(&visits, 3)},
        })
    );
    assert_eq!(r["results"]["visitors"]["value"], 3);
    assert_eq!(r["results"]["visits"]["value"], 4);

    // Against the 3 days before (none): up 100 % from nothing.
    let r = v1(
        &app,
        &format!("aggregate?{RANGE}&metrics=visitors&compare=previous_period"),
        200,
    )
    .await;
    assert_eq!(r["results"]["visitors"], json!({"value": 3, "change": 100}));
    // The 23rd against the 22nd and the 21st... one day against the day before.
    let r = v1(
        &app,
        "aggregate?site_id=shop&period=day&date=2025-11-22&metrics=visitors&compare=previous_period",
        200,
    )
    .await;
    assert_eq!(
        r["results"]["visitors"],
        json!({"value": 0, "change": -100})
    );

    // Every day of the period, the empty one included.
    let r = v1(
        &app,
        &format!("timeseries?{RANGE}&metrics=visitors,visits"),
        200,
    )
    .await;
    assert_eq!(
        r["results"],
        json!([
            {"date": "2025-11-21", "visitors": 2, "visits": 2},
            {"date": "2025-11-22", "visitors": 0, "visits": 0},
            {"date": "2025-11-23", "visitors": 2, "visits": 2},
        ])
    );
    let r = v1(
        &app,
        "timeseries?site_id=shop&period=day&date=2025-11-21",
        200,
    )
    .await;
    let rows = r["results"].as_array().unwrap();
    assert_eq!(rows.len(), 24, "hours of a day");
    assert_eq!(
        rows[10],
        json!({"date": "2025-11-21 10:00:00", "visitors": 1})
    );

    // Top pages, with the bounce rate of the visits that entered on each
    // (as Plausible's v1 has it): bob's two visits bounced, ann's did not.
    let r = v1(
        &app,
        &format!("breakdown?{RANGE}&property=event:page&metrics=visitors,bounce_rate"),
        200,
    )
    .await;
    let entry = app
        .query(&json!({"site_id": "shop", "metrics": ["bounce_rate"],
                       "date_range": ["2025-11-21", "2025-11-23"], "dimensions": ["visit:entry_page"]}))
        .await;
    let bounce_of = |page: &str| {
        entry["results"]
            .as_array()
            .unwrap()
            .iter()
            .find(|row| row["dimensions"][0] == page)
            .map_or(json!(0), |row| row["metrics"][0].clone())
    };
    assert_eq!(bounce_of("/a"), 67);
    assert_eq!(
        r["results"],
        json!([
            {"page": "/a", "visitors": 2, "bounce_rate": 67},
            {"page": "/b", "visitors": 2, "bounce_rate": bounce_of("/b")},
        ])
    );
    let r = v1(
        &app,
        &format!("breakdown?{RANGE}&property=event:page&limit=1&page=2"),
        200,
    )
    .await;
    assert_eq!(r["results"], json!([{"page": "/b", "visitors": 2}]));
    // Filters in v1's syntax.
    let r = v1(
        &app,
        &format!("aggregate?{RANGE}&filters=event:page%3D%3D/b%7C/c;event:name!%3Dsignup"),
        200,
    )
    .await;
    assert_eq!(r["results"]["visitors"]["value"], 1);

    for (query, code, field) in [
        ("aggregate?period=day", "missing_field", Some("site_id")),
        (
            "aggregate?site_id=shop&period=5d",
            "invalid_query",
            Some("period"),
        ),
        (
            "aggregate?site_id=shop&metrics=time_on_page",
            "invalid_query",
            Some("metrics"),
        ),
        (
            "aggregate?site_id=shop&filters=event:page%3D%3D/blog/*",
            "invalid_query",
            Some("filters"),
        ),
        ("breakdown?site_id=shop", "missing_field", Some("property")),
        (
            "breakdown?site_id=shop&property=event:page&limit=5000",
            "invalid_query",
            Some("limit"),
        ),
        (
            "breakdown?site_id=shop&property=event:name&metrics=bounce_rate",
            "invalid_query",
            Some("property"),
        ),
        (
            "timeseries?site_id=shop&interval=week",
            "invalid_query",
            Some("interval"),
        ),
        ("aggregate?site_id=shop&foo=1", "unknown_parameter", None),
    ] {
        assert_error(&v1(&app, query, 400).await, code, field);
    }
    app.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn realtime_visitors_are_the_last_five_minutes() {
    let app = spawn_app(Backend::EmbeddedSqlite).await;
    assert_eq!(
        v1(&app, "realtime/visitors?site_id=live", 200).await,
        json!(0)
    );
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let old = (chrono::Utc::now() - chrono::Duration::minutes(10))
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let batch = json!([
        {"site_id": "live", "event_type": "page_view", "userid": "a", "timestamp": now},
        {"site_id": "live", "event_type": "page_view", "userid": "b", "timestamp": now},
        {"site_id": "live", "event_type": "page_view", "userid": "c", "timestamp": old},
    ]);
    let body = json_of(app.post_events(&batch).await, 202).await;
    app.wait_stored("live", &ids_of(&body)).await;
    assert_eq!(
        v1(&app, "realtime/visitors?site_id=live", 200).await,
        json!(2)
    );
    app.app.stop().await;
}
