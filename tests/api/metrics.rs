//! `GET /metrics`: the counts follow what happened to the events.

use std::time::Duration;

use evtrack::startup::Role;
use serde_json::{Value, json};

use crate::helpers::{
    Backend, RunningApp, TestEnv, backend_tests, ids_of, json_of, metric, spawn_app, spawn_app_with,
};

backend_tests!(counters_follow_the_events);

fn view(i: usize) -> Value {
    json!({"site_id": "metrics", "event_type": "page_view", "path": format!("/{i}")})
}

async fn counters_follow_the_events(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut ids = Vec::new();
    let one = json_of(app.post_event(&view(0)).await, 202).await;
    ids.push(one["id"].as_str().unwrap().to_owned());
    json_of(app.post_event(&json!({"site_id": "metrics"})).await, 400).await;
    json_of(app.post_raw("/event", "application/json", "{").await, 400).await;
    let batch = json!([view(1), {"event_type": "x"}, view(2)]);
    ids.extend(ids_of(&json_of(app.post_events(&batch).await, 202).await));
    json_of(app.get("/no-such-route").await, 404).await;
    app.wait_stored("metrics", &ids).await;

    // The worker records a batch right after acknowledging it: poll briefly.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = app.metrics().await;
        if metric(&text, "evtrack_events_stored_total") >= 3.0 {
            break text;
        }
        assert!(tokio::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        metric(&text, "evtrack_events_received_total"),
        6.0,
        "{text}"
    );
    assert_eq!(metric(&text, "evtrack_events_queued_total"), 3.0);
    assert_eq!(metric(&text, "evtrack_events_stored_total"), 3.0);
    assert_eq!(
        metric(
            &text,
            r#"evtrack_events_rejected_total{reason="missing_field"}"#
        ),
        2.0,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            r#"evtrack_events_rejected_total{reason="invalid_json"}"#
        ),
        1.0
    );
    assert_eq!(metric(&text, "evtrack_events_dead_lettered_total"), 0.0);
    assert_eq!(metric(&text, "evtrack_queue_depth_events"), 0.0);
    assert!(metric(&text, "evtrack_store_write_seconds_count") >= 1.0);
    let route = |method: &str, route: &str, status: u16| {
        format!(
            r#"evtrack_http_request_duration_seconds_count{{method="{method}",route="{route}",status="{status}"}}"#
        )
    };
    assert_eq!(metric(&text, &route("POST", "/event", 202)), 1.0, "{text}");
    assert_eq!(metric(&text, &route("POST", "/event", 400)), 2.0);
    assert_eq!(metric(&text, &route("POST", "/events", 202)), 1.0);
    assert_eq!(metric(&text, &route("GET", "unmatched", 404)), 1.0);
    assert!(
        !text.contains("no-such-route"),
        "raw paths never become labels"
    );
    app.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_depth_and_age_show_what_waits_for_a_worker() {
    // The API alone: nothing drains the stream.
    let app = spawn_app_with(TestEnv::new(Backend::RedisSqlite), Role::Api).await;
    for i in 0..3 {
        json_of(app.post_event(&view(i)).await, 202).await;
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let text = app.metrics().await;
    assert_eq!(metric(&text, "evtrack_queue_depth_events"), 3.0, "{text}");
    let age = metric(&text, "evtrack_queue_oldest_event_age_seconds");
    assert!((1.0..30.0).contains(&age), "{age}");
    app.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_alone_serves_its_counts_on_metrics_port() {
    let app = spawn_app_with(TestEnv::new(Backend::RedisSqlite), Role::Api).await;
    let mut settings = app.env.settings.clone();
    settings.metrics_port = Some(0);
    let worker = RunningApp::start(settings.clone(), Role::Worker).await;
    let base = worker.address.clone().expect("the worker listens");
    let body = json_of(app.post_events(&json!([view(0), view(1)])).await, 202).await;
    app.wait_stored("metrics", &ids_of(&body)).await;
    let client = reqwest::Client::new();
    let text = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(metric(&text, "evtrack_events_stored_total"), 2.0, "{text}");
    assert!(metric(&text, "evtrack_store_write_seconds_count") >= 1.0);
    let health = client.get(format!("{base}/health")).send().await.unwrap();
    json_of(health, 200).await;
    let stats = client
        .get(format!("{base}/stats?site_id=x"))
        .send()
        .await
        .unwrap();
    json_of(stats, 404).await;
    worker.stop().await;
    // Without METRICS_PORT the worker listens nowhere.
    settings.metrics_port = None;
    let quiet = RunningApp::start(settings, Role::Worker).await;
    assert!(quiet.address.is_none());
    quiet.stop().await;
    app.app.stop().await;
}
