//! `GET /stats`, on every backend combination.

use serde_json::{Value, json};

use crate::helpers::{Backend, assert_error, backend_tests, ids_of, json_of, spawn_app};

backend_tests!(
    the_design_documents_sample_response,
    parameters_are_checked_and_named,
    empty_days_and_filters,
);

fn view(path: &str, user: &str, at: &str) -> Value {
    json!({"site_id": "site-001", "event_type": "page_view", "path": path, "userid": user, "timestamp": at})
}

async fn post_all(app: &crate::helpers::TestApp, events: Vec<Value>) {
    let body = json_of(app.post_events(&Value::Array(events.clone())).await, 202).await;
    assert_eq!(body["rejected"], json!([]));
    let ids: Vec<String> = ids_of(&body);
    for (event, id) in events.iter().zip(&ids) {
        let site = event["site_id"].as_str().unwrap();
        app.wait_stored(site, std::slice::from_ref(id)).await;
    }
}

async fn the_design_documents_sample_response(backend: Backend) {
    let app = spawn_app(backend).await;
    post_all(
        &app,
        vec![
            view("/pricing", "user-1", "2025-11-23T08:00:00Z"),
            view("/pricing", "user-1", "2025-11-23T08:05:00Z"),
            view("/pricing", "user-2", "2025-11-23T09:00:00+02:00"),
            view("/contact", "user-2", "2025-11-23T10:00:00Z"),
            view("/contact", "user-3", "2025-11-23T11:00:00Z"),
            view("/blog", "user-1", "2025-11-23T00:00:00Z"),
            view("/blog", "user-3", "2025-11-23T23:59:59.999Z"),
            // Outside the UTC day, another site, another type: not counted.
            view("/blog", "user-9", "2025-11-22T23:59:59.999Z"),
            view("/blog", "user-9", "2025-11-24T00:00:00Z"),
            view("/blog", "user-9", "2025-11-24T00:30:00-01:00"),
            json!({"site_id": "site-002", "event_type": "page_view", "path": "/blog", "userid": "user-9",
                   "timestamp": "2025-11-23T12:00:00Z"}),
            json!({"site_id": "site-001", "event_type": "click", "path": "/blog", "userid": "user-9",
                   "timestamp": "2025-11-23T12:00:00Z"}),
        ],
    )
    .await;
    let r = app.get("/stats?site_id=site-001&date=2025-11-23").await;
    let body = json_of(r, 200).await;
    assert_eq!(
        body,
        json!({"success": true, "stats": {
        "site_id": "site-001", "date": "2025-11-23", "event_type": "page_view",
        "total_views": 7, "unique_users": 3,
        "top_paths": [
            {"path": "/pricing", "views": 3, "unique_users": 2},
            {"path": "/blog", "views": 2, "unique_users": 2},
            {"path": "/contact", "views": 2, "unique_users": 2}
        ]}})
    );
    let stats = app.stats("site_id=site-001&date=2025-11-23&limit=1").await;
    assert_eq!(
        stats["top_paths"],
        json!([{"path": "/pricing", "views": 3, "unique_users": 2}])
    );
    let stats = app
        .stats("site_id=site-001&date=2025-11-23&event_type=click")
        .await;
    assert_eq!(
        (
            stats["total_views"].as_u64(),
            stats["unique_users"].as_u64()
        ),
        (Some(1), Some(1))
    );
    app.app.stop().await;
}

async fn parameters_are_checked_and_named(backend: Backend) {
    let app = spawn_app(backend).await;
    for (query, code, field) in [
        ("", "missing_parameter", "site_id"),
        ("date=2025-11-23", "missing_parameter", "site_id"),
        ("site_id=s&date=2025-02-30", "invalid_parameter", "date"),
        ("site_id=s&date=23-11-2025", "invalid_parameter", "date"),
        ("site_id=s&limit=0", "invalid_parameter", "limit"),
        ("site_id=s&limit=101", "invalid_parameter", "limit"),
        ("site_id=s&limit=-3", "invalid_parameter", "limit"),
        ("site_id=s&event_type=", "invalid_parameter", "event_type"),
    ] {
        let r = app.get(&format!("/stats?{query}")).await;
        assert_error(&json_of(r, 400).await, code, Some(field));
    }
    app.app.stop().await;
}

async fn empty_days_and_filters(backend: Backend) {
    let app = spawn_app(backend).await;
    let stats = app.stats("site_id=nobody&date=2025-11-23").await;
    assert_eq!(
        stats,
        json!({"site_id": "nobody", "date": "2025-11-23", "event_type": "page_view",
               "total_views": 0, "unique_users": 0, "top_paths": []})
    );
    // Without a date: today (UTC). Events without a path count as views
    // only; without a userid (or an empty one), as the request's cookieless
    // visitor (here one client: one visitor besides `u`).
    post_all(
        &app,
        vec![
            json!({"site_id": "today", "event_type": "page_view"}),
            json!({"site_id": "today", "event_type": "page_view", "path": "", "userid": ""}),
            json!({"site_id": "today", "event_type": "page_view", "path": "/x", "userid": "u"}),
        ],
    )
    .await;
    let stats = app.stats("site_id=today").await;
    assert_eq!(
        stats["date"],
        chrono::Utc::now().format("%Y-%m-%d").to_string()
    );
    assert_eq!(
        (
            stats["total_views"].as_u64(),
            stats["unique_users"].as_u64()
        ),
        (Some(3), Some(2))
    );
    assert_eq!(
        stats["top_paths"],
        json!([{"path": "/x", "views": 1, "unique_users": 1}])
    );
    app.app.stop().await;
}
