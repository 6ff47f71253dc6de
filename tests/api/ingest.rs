//! `POST /event` and `POST /events`, on every backend combination.

use serde_json::{Value, json};

use crate::helpers::{Backend, assert_error, backend_tests, ids_of, json_of, spawn_app};

backend_tests!(
    the_design_example_is_accepted_and_stored,
    every_field_rule_is_enforced_and_nothing_bad_is_stored,
    body_format_errors_have_their_codes,
    a_retried_event_id_is_stored_once,
    one_sites_event_id_does_not_hide_another_sites_event,
    batches_accept_good_events_and_report_bad_ones,
    ndjson_batches_work,
    batch_limits_are_enforced,
    unknown_routes_answer_in_json,
);

fn example() -> Value {
    json!({"site_id": "site-001", "event_type": "page_view", "path": "/blog",
           "userid": "user-115", "timestamp": "2025-11-23T16:44:31.123Z"})
}

pub(crate) async fn the_design_example_is_accepted_and_stored(backend: Backend) {
    let app = spawn_app(backend).await;
    let body = json_of(app.post_event(&example()).await, 202).await;
    assert_eq!(body["success"], true);
    let id = body["id"].as_str().expect("an id").to_owned();
    assert!(
        uuid::Uuid::parse_str(&id).is_ok(),
        "server ids are UUIDs: {id}"
    );
    app.wait_stored("site-001", std::slice::from_ref(&id)).await;
    let stats = app.stats("site_id=site-001&date=2025-11-23").await;
    assert_eq!(
        stats,
        json!({"site_id": "site-001", "date": "2025-11-23", "event_type": "page_view",
               "total_views": 1, "unique_users": 1,
               "top_paths": [{"path": "/blog", "views": 1, "unique_users": 1}]})
    );
    // sendBeacon sends text/plain; props and epoch-millisecond timestamps too.
    let beacon = json!({"site_id": "site-001", "event_type": "signup", "timestamp": 1_763_916_271_123_i64,
                        "props": {"plan": "pro", "seats": 3, "trial": false, "ref": null}});
    let r = app
        .post_raw("/event", "text/plain;charset=UTF-8", beacon.to_string())
        .await;
    let id = json_of(r, 202).await["id"].as_str().unwrap().to_owned();
    app.wait_stored("site-001", &[id]).await;
    let stats = app
        .stats("site_id=site-001&date=2025-11-23&event_type=signup")
        .await;
    // Without a userid, the visitor is the cookieless one of the request's
    // client (its address and User-Agent).
    assert_eq!(
        (stats["total_views"].clone(), stats["unique_users"].clone()),
        (json!(1), json!(1))
    );
    app.app.stop().await;
}

async fn every_field_rule_is_enforced_and_nothing_bad_is_stored(backend: Backend) {
    let app = spawn_app(backend).await;
    let base = example();
    let with = |key: &str, value: Value| {
        let mut e = base.clone();
        e[key] = value;
        e
    };
    let without = |key: &str| {
        let mut e = base.clone();
        e.as_object_mut().unwrap().remove(key);
        e
    };
    let future = chrono::Utc::now().timestamp_millis() + 25 * 3600 * 1000;
    let cases: Vec<(Value, &str, Option<&str>)> = vec![
        (without("site_id"), "missing_field", Some("site_id")),
        (without("event_type"), "missing_field", Some("event_type")),
        (with("site_id", json!(1)), "invalid_type", Some("site_id")),
        (with("site_id", json!("")), "invalid_value", Some("site_id")),
        (
            with("site_id", json!("x".repeat(101))),
            "invalid_value",
            Some("site_id"),
        ),
        (
            with("event_type", json!("a\u{7}b")),
            "invalid_value",
            Some("event_type"),
        ),
        (
            with("path", json!("/".repeat(2049))),
            "invalid_value",
            Some("path"),
        ),
        (with("path", json!(["/a"])), "invalid_type", Some("path")),
        (
            with("userid", json!("u".repeat(257))),
            "invalid_value",
            Some("userid"),
        ),
        (with("userid", json!(115)), "invalid_type", Some("userid")),
        (
            with("timestamp", json!("23/11/2025")),
            "invalid_value",
            Some("timestamp"),
        ),
        (
            with("timestamp", json!("2025-11-23T16:44:31")),
            "invalid_value",
            Some("timestamp"),
        ),
        (
            with("timestamp", json!(future)),
            "invalid_value",
            Some("timestamp"),
        ),
        (
            with("timestamp", json!(1.5)),
            "invalid_value",
            Some("timestamp"),
        ),
        (
            with("event_id", json!("")),
            "invalid_value",
            Some("event_id"),
        ),
        (
            with("event_id", json!("e".repeat(129))),
            "invalid_value",
            Some("event_id"),
        ),
        (
            with("props", json!({"nested": {"a": 1}})),
            "invalid_type",
            Some("props.nested"),
        ),
        (
            with("props", json!({"s": "x".repeat(1001)})),
            "invalid_value",
            Some("props.s"),
        ),
        (with("props", json!([1, 2])), "invalid_type", Some("props")),
        (
            with("userId", json!("user-115")),
            "unknown_field",
            Some("userId"),
        ),
        (json!([example()]), "invalid_event", None),
        (json!("hello"), "invalid_event", None),
    ];
    for (body, code, field) in cases {
        let r = json_of(app.post_event(&body).await, 400).await;
        assert_error(&r, code, field);
    }
    let too_many: serde_json::Map<String, Value> =
        (0..33).map(|i| (format!("k{i}"), json!(i))).collect();
    let r = json_of(
        app.post_event(&with("props", Value::Object(too_many)))
            .await,
        400,
    )
    .await;
    assert_error(&r, "invalid_value", Some("props"));
    // Limits are inclusive.
    let edge = json!({"site_id": "s".repeat(100), "event_type": "t".repeat(100), "path": "/".repeat(2048),
                      "userid": "u".repeat(256), "event_id": "e".repeat(128)});
    let id = json_of(app.post_event(&edge).await, 202).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    app.wait_stored(&"s".repeat(100), &[id]).await;
    assert_eq!(
        app.store.count_all().await.unwrap(),
        1,
        "only the valid event is stored"
    );
    app.app.stop().await;
}

async fn body_format_errors_have_their_codes(backend: Backend) {
    let app = spawn_app(backend).await;
    let r = app
        .post_raw("/event", "application/json", "{\"site_id\": ")
        .await;
    assert_error(&json_of(r, 400).await, "invalid_json", None);
    let r = app
        .post_raw("/event", "application/json", vec![b'{', 0xff, 0xfe, b'}'])
        .await;
    assert_error(&json_of(r, 400).await, "invalid_json", None);
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let r = app.post_raw("/event", "application/json", deep).await;
    assert_error(&json_of(r, 400).await, "invalid_json", None);
    let big = json!({"site_id": "s", "event_type": "t", "path": "x".repeat(70 * 1024)});
    let r = app.post_event(&big).await;
    assert_error(&json_of(r, 413).await, "payload_too_large", None);
    for ct in [
        "application/x-www-form-urlencoded",
        "text/html",
        "application/x-ndjson",
    ] {
        let r = app.post_raw("/event", ct, example().to_string()).await;
        assert_error(&json_of(r, 415).await, "unsupported_media_type", None);
    }
    let r = app
        .post_raw(
            "/event",
            "application/json; charset=utf-8",
            example().to_string(),
        )
        .await;
    json_of(r, 202).await;
    let r = app.get("/event").await;
    assert_error(&json_of(r, 405).await, "method_not_allowed", None);
    app.app.stop().await;
}

async fn a_retried_event_id_is_stored_once(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut e = example();
    e["event_id"] = json!("client-retry-1");
    for _ in 0..3 {
        let body = json_of(app.post_event(&e).await, 202).await;
        assert_eq!(body["id"], "client-retry-1");
    }
    // The same id inside one batch, and across batches.
    let r = json_of(app.post_events(&json!([e.clone(), e.clone()])).await, 202).await;
    assert_eq!(r["ids"], json!(["client-retry-1", "client-retry-1"]));
    app.wait_stored("site-001", &["client-retry-1".to_owned()])
        .await;
    // Let the worker catch up with every copy before counting.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(app.store.count_all().await.unwrap(), 1);
    let stats = app.stats("site_id=site-001&date=2025-11-23").await;
    assert_eq!(stats["total_views"], 1);
    app.app.stop().await;
}

/// Ingestion is open to every site, so event ids are per site: a site that
/// sends another site's (predictable) ids first must not make that site's
/// events vanish.
async fn one_sites_event_id_does_not_hide_another_sites_event(backend: Backend) {
    let app = spawn_app(backend).await;
    let order = |site: &str, path: &str| {
        json!({"site_id": site, "event_type": "page_view", "path": path, "userid": "buyer",
               "timestamp": "2025-11-23T10:00:00Z", "event_id": "order-1"})
    };
    json_of(app.post_event(&order("shop-a", "/a")).await, 202).await;
    json_of(app.post_event(&order("shop-b", "/b")).await, 202).await;
    // And again, in one batch with a retry of each.
    let batch = json!([order("shop-b", "/b"), order("shop-a", "/a")]);
    json_of(app.post_events(&batch).await, 202).await;
    for site in ["shop-a", "shop-b"] {
        app.wait_stored(site, &["order-1".to_owned()]).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    for (site, path) in [("shop-a", "/a"), ("shop-b", "/b")] {
        let stats = app.stats(&format!("site_id={site}&date=2025-11-23")).await;
        assert_eq!(stats["total_views"], 1, "{site}: {stats}");
        assert_eq!(stats["top_paths"][0]["path"], path, "{site}: {stats}");
    }
    app.app.stop().await;
}

pub(crate) async fn batches_accept_good_events_and_report_bad_ones(backend: Backend) {
    let app = spawn_app(backend).await;
    let good = |n: usize| {
        json!({"site_id": "site-b", "event_type": "page_view", "path": format!("/p{n}"),
                                "userid": format!("u{n}"), "timestamp": "2025-11-23T10:00:00Z"})
    };
    let batch = json!([good(0), {"site_id": "site-b"}, good(1), {"site_id": "site-b", "event_type": "x", "userId": "u"}, 5, good(2)]);
    let body = json_of(app.post_events(&batch).await, 202).await;
    assert_eq!(body["success"], true);
    assert_eq!(body["accepted"], 3);
    let ids: Vec<String> = ids_of(&body);
    assert_eq!(ids.len(), 3);
    let rejected = body["rejected"].as_array().unwrap();
    let positions: Vec<u64> = rejected
        .iter()
        .map(|r| r["index"].as_u64().unwrap())
        .collect();
    assert_eq!(positions, [1, 3, 4]);
    assert_eq!(rejected[0]["error"]["field"], "event_type");
    assert_eq!(rejected[1]["error"]["code"], "unknown_field");
    assert_eq!(rejected[2]["error"]["code"], "invalid_event");
    app.wait_stored("site-b", &ids).await;
    let stats = app.stats("site_id=site-b&date=2025-11-23").await;
    assert_eq!(
        (
            stats["total_views"].as_u64(),
            stats["unique_users"].as_u64()
        ),
        (Some(3), Some(3))
    );

    let all_bad = json!([{"site_id": "x"}, {"event_type": "y"}]);
    let body = json_of(app.post_events(&all_bad).await, 400).await;
    assert_eq!(body["success"], false);
    assert_eq!(body["error"]["code"], "no_valid_events");
    assert_eq!(body["accepted"], 0);
    assert_eq!(body["rejected"].as_array().unwrap().len(), 2);
    assert_eq!(app.store.count_all().await.unwrap(), 3);
    app.app.stop().await;
}

async fn ndjson_batches_work(backend: Backend) {
    let app = spawn_app(backend).await;
    let lines = format!(
        "{}\n\n{}\nnot json\n{}\n",
        json!({"site_id": "nd", "event_type": "page_view", "path": "/a", "timestamp": "2025-11-23T01:00:00Z"}),
        json!({"site_id": "nd", "event_type": "page_view", "path": "/a", "timestamp": "2025-11-23T02:00:00Z"}),
        json!({"site_id": "nd", "event_type": "page_view", "path": "/b", "timestamp": "2025-11-23T03:00:00Z"}),
    );
    let r = app.post_raw("/events", "application/x-ndjson", lines).await;
    let body = json_of(r, 202).await;
    assert_eq!(body["accepted"], 3);
    assert_eq!(body["rejected"][0]["index"], 2);
    assert_eq!(body["rejected"][0]["error"]["code"], "invalid_json");
    let ids: Vec<String> = ids_of(&body);
    app.wait_stored("nd", &ids).await;
    let stats = app.stats("site_id=nd&date=2025-11-23").await;
    assert_eq!(
        stats["top_paths"],
        // One client sent all three, without userids: one cookieless visitor.
        json!([{"path": "/a", "views": 2, "unique_users": 1},
                                          {"path": "/b", "views": 1, "unique_users": 1}])
    );
    app.app.stop().await;
}

async fn batch_limits_are_enforced(backend: Backend) {
    let app = spawn_app(backend).await;
    let one = json!({"site_id": "lim", "event_type": "page_view"});
    let r = app
        .post_events(&Value::Array(vec![one.clone(); 1001]))
        .await;
    assert_error(&json_of(r, 413).await, "too_many_events", None);
    let r = app.post_events(&json!([])).await;
    assert_error(&json_of(r, 400).await, "empty_batch", None);
    let r = app.post_events(&json!({"site_id": "lim"})).await;
    assert_error(&json_of(r, 400).await, "invalid_batch", None);
    let huge =
        vec![json!({"site_id": "lim", "event_type": "page_view", "path": "p".repeat(2000)}); 1000];
    let mut big = serde_json::to_string(&huge).unwrap();
    big.push_str(&" ".repeat(5 * 1024 * 1024 - big.len() + 1));
    let r = app.post_raw("/events", "application/json", big).await;
    assert_error(&json_of(r, 413).await, "payload_too_large", None);
    let r = app.post_raw("/events", "text/csv", "a,b").await;
    assert_error(&json_of(r, 415).await, "unsupported_media_type", None);
    assert_eq!(
        app.store.count_all().await.unwrap(),
        0,
        "nothing stored from refused batches"
    );
    // Exactly 1000 events is allowed.
    let body = json_of(app.post_events(&Value::Array(vec![one; 1000])).await, 202).await;
    assert_eq!(body["accepted"], 1000);
    app.app.stop().await;
}

async fn unknown_routes_answer_in_json(backend: Backend) {
    let app = spawn_app(backend).await;
    assert_error(
        &json_of(app.get("/nope").await, 404).await,
        "not_found",
        None,
    );
    app.app.stop().await;
}
