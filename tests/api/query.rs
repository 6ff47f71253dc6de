//! `POST /api/v2/query` over HTTP, on every backend combination: the shape
//! Plausible's clients read, time zones, errors, access, and how soon an
//! acknowledged event shows.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::helpers::{Backend, TestApp, TestEnv, assert_error, backend_tests, ids_of, json_of};

backend_tests!(answers_in_plausibles_shape, queries_need_a_token_like_stats);

fn ev(name: &str, path: &str, user: &str, at: &str, props: Value) -> Value {
    json!({"site_id": "shop", "event_type": name, "path": path, "userid": user,
           "timestamp": at, "props": props})
}

async fn post_all(app: &TestApp, events: &[Value]) {
    let body = json_of(app.post_events(&Value::Array(events.to_vec())).await, 202).await;
    assert_eq!(body["rejected"], json!([]));
    let ids = ids_of(&body);
    let sites: std::collections::BTreeSet<&str> = events
        .iter()
        .filter_map(|e| e["site_id"].as_str())
        .collect();
    for site in sites {
        let of_site: Vec<String> = events
            .iter()
            .zip(&ids)
            .filter(|(e, _)| e["site_id"] == site)
            .map(|(_, id)| id.clone())
            .collect();
        app.wait_stored(site, &of_site).await;
    }
}

async fn answers_in_plausibles_shape(backend: Backend) {
    let app = crate::helpers::spawn_app(backend).await;
    post_all(
        &app,
        &[
            // 2025-11-03 in Kolkata (+05:30) runs from 2025-11-02T18:30Z.
            ev("page_view", "/", "u1", "2025-11-02T18:29:59Z", json!(null)),
            ev("page_view", "/", "u1", "2025-11-02T18:30:00Z", json!(null)),
            ev(
                "page_view",
                "/pricing",
                "u2",
                "2025-11-03T04:10:00Z",
                json!({"plan": "pro"}),
            ),
            ev(
                "page_view",
                "/pricing",
                "u1",
                "2025-11-03T05:00:00Z",
                json!(null),
            ),
            ev(
                "signup",
                "/pricing",
                "u2",
                "2025-11-03T05:01:00Z",
                json!({"plan": "pro"}),
            ),
            ev(
                "signup",
                "/pricing",
                "u3",
                "2025-11-04T18:29:59Z",
                json!({"plan": 3}),
            ),
            ev(
                "page_view",
                "/blog",
                "u3",
                "2025-11-04T18:30:00Z",
                json!(null),
            ),
            json!({"site_id": "elsewhere", "event_type": "page_view", "path": "/",
                   "timestamp": "2025-11-03T05:00:00Z"}),
        ],
    )
    .await;

    let body = app
        .query(
            &json!({"site_id": "shop", "metrics": ["visitors", "pageviews", "events"],
            "date_range": ["2025-11-03", "2025-11-04"], "timezone": "Asia/Kolkata"}),
        )
        .await;
    assert_eq!(
        body,
        json!({
            "results": [{"metrics": [3, 3, 5], "dimensions": []}],
            "meta": {},
            "query": {
                "site_id": "shop", "metrics": ["visitors", "pageviews", "events"],
                "date_range": ["2025-11-03T00:00:00+05:30", "2025-11-04T23:59:59+05:30"],
                "timezone": "Asia/Kolkata", "dimensions": [], "filters": [],
                "order_by": [["visitors", "desc"]], "include": {},
                "pagination": {"limit": 10000, "offset": 0}
            }
        })
    );

    // A daily trend in the zone, with every label.
    let body = app
        .query(
            &json!({"site_id": "shop", "metrics": ["events"], "timezone": "Asia/Kolkata",
            "date_range": ["2025-11-02", "2025-11-05"], "dimensions": ["time:day"],
            "include": {"time_labels": true, "total_rows": true}}),
        )
        .await;
    assert_eq!(
        body["results"],
        json!([
            {"metrics": [1], "dimensions": ["2025-11-02"]},
            {"metrics": [4], "dimensions": ["2025-11-03"]},
            {"metrics": [1], "dimensions": ["2025-11-04"]},
            {"metrics": [1], "dimensions": ["2025-11-05"]},
        ])
    );
    assert_eq!(
        body["meta"],
        json!({"total_rows": 4, "time_labels": ["2025-11-02", "2025-11-03", "2025-11-04", "2025-11-05"]})
    );

    // Top pages for a custom event's property, Plausible's `pageview` in a
    // filter, `(none)` for events without the property.
    let body = app
        .query(
            &json!({"site_id": "shop", "metrics": ["visitors", "events"],
            "date_range": ["2025-11-01", "2025-11-30"], "dimensions": ["event:props:plan"]}),
        )
        .await;
    assert_eq!(
        body["results"],
        json!([
            {"metrics": [2, 4], "dimensions": ["(none)"]},
            {"metrics": [1, 1], "dimensions": ["3"]},
            {"metrics": [1, 2], "dimensions": ["pro"]},
        ])
    );
    let body = app
        .query(&json!({"site_id": "shop", "metrics": ["visitors", "pageviews"],
            "date_range": ["2025-11-01", "2025-11-30"], "dimensions": ["event:page"],
            "filters": [["is", "event:name", ["pageview"]], ["contains", "event:page", ["PRIC", "/b"], {"case_sensitive": false}]]}))
        .await;
    assert_eq!(
        body["results"],
        json!([
            {"metrics": [2, 2], "dimensions": ["/pricing"]},
            {"metrics": [1, 1], "dimensions": ["/blog"]},
        ])
    );
    // Filtered by one dimension, grouped by another: read from the raw events.
    let body = app
        .query(&json!({"site_id": "shop", "metrics": ["events"],
            "date_range": ["2025-11-01", "2025-11-30"], "dimensions": ["event:name"],
            "filters": [["is", "event:props:plan", ["pro", "3"]], ["is_not", "event:page", ["/"]]]}))
        .await;
    assert_eq!(
        body["results"],
        json!([
            {"metrics": [2], "dimensions": ["signup"]},
            {"metrics": [1], "dimensions": ["page_view"]},
        ])
    );
    // `all` starts at the site's first event, on the zone's calendar.
    let body = app
        .query(
            &json!({"site_id": "shop", "metrics": ["events"], "date_range": "all",
            "timezone": "Asia/Kolkata"}),
        )
        .await;
    assert_eq!(body["query"]["date_range"][0], "2025-11-02T00:00:00+05:30");
    assert_eq!(body["results"][0]["metrics"], json!([7]));
    app.app.stop().await;
}

async fn queries_need_a_token_like_stats(backend: Backend) {
    const TOKEN: &str = "read-shop-0123456789";
    let mut env = TestEnv::new(backend);
    env.settings.stats_tokens = format!("{TOKEN}=shop").parse().unwrap();
    let app = crate::helpers::spawn_app_with(env, evtrack::startup::Role::All).await;
    let body = json!({"site_id": "shop", "metrics": ["events"], "date_range": "day"});
    let send = |auth: Option<&str>, body: &Value| {
        let mut r = app
            .client
            .post(format!("{}/api/v2/query", app.address))
            .json(body);
        if let Some(a) = auth {
            r = r.header("Authorization", format!("Bearer {a}"));
        }
        r.send()
    };
    // No token: 401 before anything about the query is said.
    let r = send(None, &json!({"nonsense": true})).await.unwrap();
    assert_error(&json_of(r, 401).await, "unauthorized", None);
    let r = send(Some("wrong-token-0123456789"), &body).await.unwrap();
    assert_error(&json_of(r, 401).await, "invalid_token", None);
    let mut other = body.clone();
    other["site_id"] = json!("another-shop");
    let r = send(Some(TOKEN), &other).await.unwrap();
    assert_error(&json_of(r, 403).await, "forbidden", None);
    let r = send(Some(TOKEN), &body).await.unwrap();
    assert_eq!(
        json_of(r, 200).await["results"],
        json!([{"metrics": [0], "dimensions": []}])
    );
    app.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_queries_are_answered_400_naming_the_fault() {
    let app = crate::helpers::spawn_app(Backend::EmbeddedSqlite).await;
    let base = json!({"site_id": "shop", "metrics": ["visitors"], "date_range": "7d"});
    let with = |k: &str, v: Value| {
        let mut b = base.clone();
        b[k] = v;
        b
    };
    for (body, code, field) in [
        (
            with("metrics", json!(["visits", "sessions"])),
            "unknown_metric",
            Some("metrics[1]"),
        ),
        (
            with("timezone", json!("Europe/Atlantis")),
            "unknown_time_zone",
            Some("timezone"),
        ),
        (
            with("date_range", json!(["2025-11-31", "2025-12-01"])),
            "invalid_date_range",
            Some("date_range"),
        ),
        (
            with("date_range", json!(["2025-12-02", "2025-12-01"])),
            "invalid_date_range",
            Some("date_range"),
        ),
        (
            with("dimensions", json!(["visit:city"])),
            "unknown_dimension",
            Some("dimensions[0]"),
        ),
        (
            with("dimensions", json!(["visit:country", "event:page"])),
            "unsupported_query",
            Some("dimensions"),
        ),
        (
            with("dimensions", json!(["event:page", "event:props:plan"])),
            "unsupported_query",
            Some("dimensions"),
        ),
        (
            with("filters", json!([["matches", "event:page", ["^/a"]]])),
            "unknown_filter_operator",
            Some("filters[0]"),
        ),
        (
            with("order_by", json!([["events", "desc"]])),
            "invalid_query",
            Some("order_by[0]"),
        ),
        (
            json!({"metrics": ["visitors"], "date_range": "7d"}),
            "missing_field",
            Some("site_id"),
        ),
    ] {
        let r = app.post_json("/api/v2/query", &body).await;
        assert_error(&json_of(r, 400).await, code, field);
    }
    let r = app
        .post_raw(
            "/api/v2/query",
            "application/json",
            "{\"site_id\":".to_owned(),
        )
        .await;
    assert_error(&json_of(r, 400).await, "invalid_json", None);
    let huge = json!({"site_id": "shop", "metrics": ["visitors"], "date_range": "7d",
        "filters": [["is", "event:page", vec!["/x".repeat(1000); 200]]]});
    let r = app.post_json("/api/v2/query", &huge).await;
    assert_error(&json_of(r, 413).await, "body_too_large", None);
    app.app.stop().await;
}

/// An event the embedded mode acknowledged (202 after its commit) shows in
/// queries within a second, counted by the service's own folder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledged_event_shows_in_queries_within_a_second() {
    let app = crate::helpers::spawn_app(Backend::EmbeddedSqlite).await;
    let query = json!({"site_id": "fresh", "metrics": ["events", "visitors"], "date_range": "day"});
    for round in 0..3 {
        let r = app
            .post_event(
                &json!({"site_id": "fresh", "event_type": "page_view", "path": "/",
                "userid": format!("u{round}")}),
            )
            .await;
        json_of(r, 202).await;
        let acked = Instant::now();
        loop {
            let body = app.query(&query).await;
            if body["results"][0]["metrics"] == json!([round + 1, round + 1]) {
                break;
            }
            assert!(
                acked.elapsed() < Duration::from_secs(1),
                "round {round}: not visible a second after 202: {body}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    app.app.stop().await;
}
