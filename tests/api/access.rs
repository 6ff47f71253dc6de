//! Access control over HTTP: read tokens for stats, the ingest allow-list,
//! CORS, and the refusal to expose stats by accident.

use std::net::{IpAddr, Ipv4Addr};

use evtrack::config::Settings;
use evtrack::startup::{Application, Role};
use serde_json::{Value, json};

use crate::helpers::{
    Backend, TestApp, TestEnv, assert_error, backend_tests, ids_of, json_of, spawn_app_with,
};

const TOKEN_A: &str = "read-site-a-0123456789";
const TOKEN_AC: &str = "read-sites-a-and-c-0123";
const TOKEN_ALL: &str = "read-every-site-0123456";

backend_tests!(
    stats_tokens_are_checked_and_scoped,
    ingest_allow_list_refuses_other_sites
);

async fn app_with(backend: Backend, change: impl FnOnce(&mut Settings)) -> TestApp {
    let mut env = TestEnv::new(backend);
    change(&mut env.settings);
    spawn_app_with(env, Role::All).await
}

fn view(site: &str) -> Value {
    json!({"site_id": site, "event_type": "page_view", "path": "/", "userid": "u1",
           "timestamp": "2025-11-23T10:00:00Z"})
}

async fn stats_as(app: &TestApp, site: &str, authorization: Option<&str>) -> reqwest::Response {
    let mut request = app.client.get(format!(
        "{}/stats?site_id={site}&date=2025-11-23",
        app.address
    ));
    if let Some(value) = authorization {
        request = request.header("Authorization", value);
    }
    request.send().await.expect("request sent")
}

async fn stats_tokens_are_checked_and_scoped(backend: Backend) {
    let tokens = format!("{TOKEN_A}=site-a, {TOKEN_AC}=site-a|site-c {TOKEN_ALL}=*");
    let app = app_with(backend, |s| s.stats_tokens = tokens.parse().unwrap()).await;
    for site in ["site-a", "site-b"] {
        let body = json_of(app.post_event(&view(site)).await, 202).await;
        app.wait_stored(site, &[body["id"].as_str().unwrap().to_owned()])
            .await;
    }

    // No token: 401 with a bearer challenge, whatever the parameters.
    for query in ["site-a", "site-b"] {
        let r = stats_as(&app, query, None).await;
        assert_eq!(r.headers()["www-authenticate"], r#"Bearer realm="evtrack""#);
        assert_error(&json_of(r, 401).await, "unauthorized", None);
    }
    let r = app.get("/stats").await;
    assert_error(&json_of(r, 401).await, "unauthorized", None);

    // Not a configured token, or not a bearer token: 401 invalid_token.
    for header in [
        format!("Bearer {TOKEN_A}x"),
        format!("Bearer {}", &TOKEN_A[1..]),
        format!("Basic {TOKEN_ALL}"),
        TOKEN_ALL.to_owned(),
        "Bearer".to_owned(),
    ] {
        let r = stats_as(&app, "site-a", Some(&header)).await;
        assert!(
            r.headers()["www-authenticate"]
                .to_str()
                .unwrap()
                .contains(r#"error="invalid_token""#)
        );
        assert_error(&json_of(r, 401).await, "invalid_token", None);
    }

    // A token for site A reads A, never B: 403.
    let ok = |site: &'static str, token: &'static str| {
        let app = &app;
        async move {
            let r = stats_as(app, site, Some(&format!("Bearer {token}"))).await;
            json_of(r, 200).await["stats"].clone()
        }
    };
    assert_eq!(ok("site-a", TOKEN_A).await["total_views"], 1);
    assert_eq!(ok("site-a", TOKEN_AC).await["total_views"], 1);
    assert_eq!(ok("site-c", TOKEN_AC).await["total_views"], 0);
    assert_eq!(ok("site-b", TOKEN_ALL).await["total_views"], 1);
    assert_eq!(ok("site-a", TOKEN_ALL).await["total_views"], 1);
    for (site, token) in [("site-b", TOKEN_A), ("site-b", TOKEN_AC)] {
        let r = stats_as(&app, site, Some(&format!("Bearer {token}"))).await;
        assert!(
            r.headers()["www-authenticate"]
                .to_str()
                .unwrap()
                .contains("insufficient_scope")
        );
        let body = json_of(r, 403).await;
        assert_error(&body, "forbidden", None);
        assert!(body.get("stats").is_none());
    }
    // A valid token still gets parameter errors.
    let r = stats_as(&app, "", Some(&format!("Bearer {TOKEN_ALL}"))).await;
    assert_error(&json_of(r, 400).await, "missing_parameter", Some("site_id"));

    // Ingestion and health need no token.
    json_of(app.get("/health").await, 200).await;
    json_of(app.post_event(&view("site-c")).await, 202).await;
    app.app.stop().await;
}

async fn ingest_allow_list_refuses_other_sites(backend: Backend) {
    let app = app_with(backend, |s| {
        s.ingest_sites = Some("site-a, site-b".parse().unwrap())
    })
    .await;
    let r = app.post_event(&view("site-x")).await;
    assert_error(&json_of(r, 403).await, "site_not_allowed", Some("site_id"));

    // A batch: the allowed events are queued, the others rejected by index.
    let batch = json!([view("site-a"), view("site-x"), view("site-b")]);
    let body = json_of(app.post_events(&batch).await, 202).await;
    assert_eq!(body["accepted"], 2);
    assert_eq!(body["rejected"][0]["index"], 1);
    assert_eq!(body["rejected"][0]["error"]["code"], "site_not_allowed");
    let ids = ids_of(&body);
    // Only disallowed sites: 403 for the whole batch.
    let r = app
        .post_events(&json!([view("site-x"), view("site-y")]))
        .await;
    assert_error(&json_of(r, 403).await, "site_not_allowed", None);
    // Invalid events and disallowed ones together: the validation error wins.
    let r = app
        .post_events(&json!([view("site-x"), {"site_id": "site-a"}]))
        .await;
    assert_error(&json_of(r, 400).await, "no_valid_events", None);

    app.wait_stored("site-a", &ids[..1]).await;
    app.wait_stored("site-b", &ids[1..]).await;
    // Nothing of the refused sites reached the store.
    let one = json_of(app.post_event(&view("site-a")).await, 202).await;
    app.wait_stored("site-a", &[one["id"].as_str().unwrap().to_owned()])
        .await;
    assert_eq!(app.store.count_all().await.unwrap(), 3);
    app.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_opens_ingest_to_every_origin_and_stats_only_when_configured() {
    let app = app_with(Backend::EmbeddedSqlite, |_| {}).await;
    let preflight = |path: &'static str, method: &'static str, headers: &'static str| {
        let app = &app;
        async move {
            app.client
                .request(reqwest::Method::OPTIONS, format!("{}{path}", app.address))
                .header("Origin", "https://shop.example")
                .header("Access-Control-Request-Method", method)
                .header("Access-Control-Request-Headers", headers)
                .send()
                .await
                .unwrap()
        }
    };
    for path in ["/event", "/events"] {
        let r = preflight(path, "POST", "content-type").await;
        assert!(r.status().is_success(), "{path}: {}", r.status());
        let h = r.headers();
        assert_eq!(h["access-control-allow-origin"], "*");
        assert!(
            h["access-control-allow-methods"]
                .to_str()
                .unwrap()
                .contains("POST")
        );
        assert!(
            h["access-control-allow-headers"]
                .to_str()
                .unwrap()
                .contains("content-type")
        );
        assert!(h.contains_key("access-control-max-age"));
    }
    let r = app
        .client
        .post(format!("{}/event", app.address))
        .header("Origin", "https://shop.example")
        .json(&view("site-a"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["access-control-allow-origin"], "*");
    assert_eq!(r.status(), 202);

    // Stats: no CORS headers for other origins by default.
    let r = preflight("/stats", "GET", "authorization").await;
    assert!(!r.headers().contains_key("access-control-allow-origin"));
    let r = app
        .client
        .get(format!("{}/stats?site_id=site-a", app.address))
        .header("Origin", "https://shop.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(!r.headers().contains_key("access-control-allow-origin"));
    app.app.stop().await;

    // Configured: that origin only, with the Authorization header allowed.
    let app = app_with(Backend::EmbeddedSqlite, |s| {
        s.stats_cors_origins = vec!["https://dash.example".into()]
    })
    .await;
    let ask = |origin: &'static str| {
        let app = &app;
        async move {
            app.client
                .request(reqwest::Method::OPTIONS, format!("{}/stats", app.address))
                .header("Origin", origin)
                .header("Access-Control-Request-Method", "GET")
                .header("Access-Control-Request-Headers", "authorization")
                .send()
                .await
                .unwrap()
        }
    };
    let r = ask("https://dash.example").await;
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://dash.example"
    );
    assert!(
        r.headers()["access-control-allow-headers"]
            .to_str()
            .unwrap()
            .contains("authorization")
    );
    let r = ask("https://evil.example").await;
    assert!(!r.headers().contains_key("access-control-allow-origin"));
    app.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_are_never_exposed_beyond_loopback_by_accident() {
    let env = TestEnv::new(Backend::EmbeddedSqlite);
    let everywhere = Settings {
        host: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        ..env.settings.clone()
    };
    let build = |settings: Settings, role: Role| async move {
        Application::build(settings, role).await.map(|app| {
            app.shutdown_token().cancel();
        })
    };
    let err = build(everywhere.clone(), Role::All).await.unwrap_err();
    assert_eq!(err.setting, "STATS_TOKENS", "{err}");
    assert!(err.to_string().contains("PUBLIC_STATS"), "{err}");

    // Made public on purpose, or protected by tokens: it starts.
    let public = Settings {
        public_stats: true,
        ..everywhere.clone()
    };
    build(public.clone(), Role::All).await.unwrap();
    let protected = Settings {
        stats_tokens: TOKEN_ALL.parse().unwrap(),
        ..everywhere.clone()
    };
    build(protected, Role::All).await.unwrap();
    // Both at once contradict each other.
    let both = Settings {
        stats_tokens: TOKEN_ALL.parse().unwrap(),
        ..public
    };
    let err = build(both, Role::All).await.unwrap_err();
    assert_eq!(err.setting, "PUBLIC_STATS", "{err}");

    // Bad CORS origins are refused at start-up.
    let cors = Settings {
        stats_cors_origins: vec!["dash.example".into()],
        ..env.settings.clone()
    };
    let err = build(cors, Role::All).await.unwrap_err();
    assert_eq!(err.setting, "STATS_CORS_ORIGINS", "{err}");
}

async fn post_from(app: &TestApp, forwarded_for: Option<&str>) -> reqwest::Response {
    let mut request = app
        .client
        .post(format!("{}/event", app.address))
        .json(&view("site-a"));
    if let Some(xff) = forwarded_for {
        request = request.header("X-Forwarded-For", xff);
    }
    request.send().await.expect("request sent")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_is_rate_limited_per_client() {
    // A burst of two, then one a minute: the test never races the refill.
    let app = app_with(Backend::EmbeddedSqlite, |s| {
        s.rate_limit = Some("1/min".parse().unwrap());
        s.rate_limit_burst = Some(2);
        s.trusted_proxies = "10.0.0.0/8".parse().unwrap();
    })
    .await;
    let mut ids = Vec::new();
    for _ in 0..2 {
        let body = json_of(post_from(&app, None).await, 202).await;
        ids.push(body["id"].as_str().unwrap().to_owned());
    }
    let r = post_from(&app, None).await;
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((50..=60).contains(&retry), "Retry-After: {retry}");
    assert_error(&json_of(r, 429).await, "rate_limited", None);
    // The peer (127.0.0.1) is not a trusted proxy: X-Forwarded-For cannot
    // buy a new allowance.
    let r = post_from(&app, Some("203.0.113.7")).await;
    assert_error(&json_of(r, 429).await, "rate_limited", None);
    // Batches share the allowance; preflights, stats and health do not use it.
    let r = app.post_events(&json!([view("site-a")])).await;
    assert_error(&json_of(r, 429).await, "rate_limited", None);
    let preflight = app
        .client
        .request(reqwest::Method::OPTIONS, format!("{}/event", app.address))
        .header("Origin", "https://shop.example")
        .header("Access-Control-Request-Method", "POST")
        .send()
        .await
        .unwrap();
    assert!(preflight.status().is_success(), "{}", preflight.status());
    assert_eq!(app.get("/health").await.status(), 200);

    app.wait_stored("site-a", &ids).await;
    let metrics = app.metrics().await;
    let series = r#"evtrack_events_rejected_total{reason="rate_limited"}"#;
    assert_eq!(crate::helpers::metric(&metrics, series), 3.0);
    let stats = app.stats("site_id=site-a&date=2025-11-23").await;
    assert_eq!(stats["total_views"], 2, "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_names_the_client_behind_a_trusted_proxy() {
    let app = app_with(Backend::EmbeddedSqlite, |s| {
        s.rate_limit = Some("1/h".parse().unwrap());
        s.trusted_proxies = "127.0.0.1, 10.0.0.0/8".parse().unwrap();
    })
    .await;
    // Each client behind the proxy has its own allowance; the proxy's own
    // hops (10.x) are skipped, and what a client wrote to the left of its
    // address is not believed.
    for client in ["203.0.113.7", "198.51.100.1, 203.0.113.8, 10.0.0.2"] {
        json_of(post_from(&app, Some(client)).await, 202).await;
    }
    let r = post_from(&app, Some("198.51.100.99, 203.0.113.7")).await;
    assert_error(&json_of(r, 429).await, "rate_limited", None);
    let r = post_from(&app, Some("203.0.113.8")).await;
    assert_error(&json_of(r, 429).await, "rate_limited", None);
    // No header: the proxy itself is the client.
    json_of(post_from(&app, None).await, 202).await;
    assert_error(
        &json_of(post_from(&app, None).await, 429).await,
        "rate_limited",
        None,
    );
}
