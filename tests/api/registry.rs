//! The site registry over HTTP and the command line: settings that shape
//! ingestion (hostnames, excluded addresses) and queries (time zone,
//! goals), public sites, and read tokens made, used and revoked at run
//! time.

use std::time::Duration;

use evtrack::config::Settings;
use evtrack::startup::Role;
use serde_json::{Value, json};

use crate::helpers::{
    Backend, TestApp, TestEnv, assert_error, backend_tests, json_of, query_today, spawn_app_with,
    wait_events,
};

const ADMIN: &str = "admin-every-site-0123456";
const ADMIN_SHOP: &str = "admin-shop-only-0123456";
const READER: &str = "read-every-site-01234567";

backend_tests!(settings_shape_what_is_counted_and_how_it_is_asked);

async fn app_with(backend: Backend, change: impl FnOnce(&mut Settings)) -> TestApp {
    let mut env = TestEnv::new(backend);
    change(&mut env.settings);
    spawn_app_with(env, Role::All).await
}

async fn send(
    app: &TestApp,
    method: reqwest::Method,
    path: &str,
    body: Option<&Value>,
    token: Option<&str>,
) -> reqwest::Response {
    let mut request = app.client.request(method, format!("{}{path}", app.address));
    if let Some(b) = body {
        request = request.json(b);
    }
    if let Some(t) = token {
        request = request.bearer_auth(t);
    }
    request.send().await.expect("request sent")
}

/// A browser's pageview or event, from `ip` (behind the trusted proxy)
/// with `agent`; the `X-Evtrack-Dropped` reason when it is dropped.
async fn browse(app: &TestApp, name: &str, url: &str, ip: &str, agent: &str) -> Option<String> {
    let r = app
        .client
        .post(format!("{}/api/event", app.address))
        .header("user-agent", agent)
        .header("x-forwarded-for", ip)
        .body(json!({"n": name, "u": url, "d": "shop"}).to_string())
        .send()
        .await
        .expect("request sent");
    assert_eq!(r.status(), 202);
    r.headers()
        .get("x-evtrack-dropped")
        .map(|v| v.to_str().unwrap().to_owned())
}

const FIREFOX: &str = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0";
const CHROME: &str = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36";

async fn settings_shape_what_is_counted_and_how_it_is_asked(backend: Backend) {
    let app = app_with(backend, |s| {
        s.trusted_proxies = "127.0.0.1".parse().unwrap();
    })
    .await;
    let settings = json!({
        "timezone": "Asia/Kathmandu",
        "hostnames": ["shop.example", "*.shop.example"],
        "exclude_ips": ["203.0.113.0/24"],
        "goals": [{"event": "Signup"}, {"page": "/blog/*"}],
    });
    let path = "/api/sites/shop/settings";
    let put = send(&app, reqwest::Method::PUT, path, Some(&settings), None).await;
    let mut stored = settings.clone();
    stored["site_id"] = json!("shop");
    stored["public"] = json!(false);
    assert_eq!(json_of(put, 200).await, stored);
    let got = send(&app, reqwest::Method::GET, path, None, None).await;
    assert_eq!(json_of(got, 200).await, stored);

    // Two visitors on the site's hostnames; the owner's address and another
    // hostname are dropped before they are queued.
    let visits = [
        ("pageview", "https://shop.example/", "198.51.100.1", FIREFOX),
        (
            "pageview",
            "https://www.shop.example/blog/a",
            "198.51.100.1",
            FIREFOX,
        ),
        (
            "pageview",
            "https://en.shop.example/blog/a/b",
            "198.51.100.2",
            CHROME,
        ),
        (
            "Signup",
            "https://shop.example/join",
            "198.51.100.2",
            CHROME,
        ),
    ];
    for (name, url, ip, agent) in visits {
        assert_eq!(browse(&app, name, url, ip, agent).await, None, "{url}");
    }
    assert_eq!(
        browse(
            &app,
            "pageview",
            "https://shop.example/",
            "203.0.113.9",
            FIREFOX
        )
        .await,
        Some("excluded_ip".into())
    );
    assert_eq!(
        browse(
            &app,
            "pageview",
            "https://evil.example/",
            "198.51.100.3",
            FIREFOX
        )
        .await,
        Some("hostname_not_allowed".into())
    );
    // A server's event without a page passes the hostname rule; from an
    // excluded address it is dropped too, and said so.
    let r = app
        .client
        .post(format!("{}/event", app.address))
        .header("x-forwarded-for", "203.0.113.20")
        .json(&json!({"site_id": "shop", "event_type": "Signup", "userid": "u1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(json_of(r, 202).await["dropped"], "excluded_ip");
    // In a batch, each event on its own: one from another hostname is
    // listed as dropped (by its place in the batch), the others taken.
    let batch = json!([
        {"site_id": "shop", "event_type": "Signup", "userid": "u2", "hostname": "evil.example"},
        {"site_id": "blog", "event_type": "Signup", "userid": "u2", "hostname": "evil.example"},
    ]);
    let body = json_of(app.post_events(&batch).await, 202).await;
    assert_eq!(body["accepted"], 1);
    assert_eq!(
        body["dropped"],
        json!([{"index": 0, "id": body["dropped"][0]["id"], "reason": "hostname_not_allowed"}])
    );
    wait_events(&app, "shop", 4).await;

    // Queries without a time zone are in the site's.
    let today = query_today(&app, "shop", json!({})).await;
    assert_eq!(today["query"]["timezone"], "Asia/Kathmandu");
    assert_eq!(today["results"][0]["metrics"], json!([2, 3, 4]));
    // Goals: `/blog/*` is one segment deep (not /blog/a/b); the rate is of
    // the range's two visitors.
    let goals = query_today(
        &app,
        "shop",
        json!({"metrics": ["visitors", "events", "conversion_rate"], "dimensions": ["event:goal"]}),
    )
    .await;
    assert_eq!(
        goals["results"],
        json!([
            {"dimensions": ["Signup"], "metrics": [1, 1, 50.0]},
            {"dimensions": ["Visit /blog/*"], "metrics": [1, 1, 50.0]},
        ])
    );
    let signed_up = query_today(
        &app,
        "shop",
        json!({"metrics": ["visitors", "conversion_rate"], "dimensions": ["event:page"],
               "filters": [["is", "event:goal", ["Signup"]]]}),
    )
    .await;
    assert_eq!(
        signed_up["results"],
        json!([{"dimensions": ["/join"], "metrics": [1, 100.0]}])
    );
    // Stats API v1: goals as a property, with their conversion rate.
    let v1 = app
        .get("/api/v1/stats/breakdown?site_id=shop&period=day&property=event:goal&metrics=visitors,conversion_rate")
        .await;
    assert_eq!(
        json_of(v1, 200).await["results"],
        json!([
            {"goal": "Signup", "visitors": 1, "conversion_rate": 50.0},
            {"goal": "Visit /blog/*", "visitors": 1, "conversion_rate": 50.0},
        ])
    );
    let r = app
        .post_json(
            "/api/v2/query",
            &json!({"site_id": "shop", "metrics": ["visitors"], "date_range": "day",
                    "filters": [["is", "event:goal", ["Purchase"]]]}),
        )
        .await;
    assert_error(&json_of(r, 400).await, "unknown_goal", Some("filters[0]"));
    let r = app
        .post_json(
            "/api/v2/query",
            &json!({"site_id": "shop", "metrics": ["conversion_rate"], "date_range": "day"}),
        )
        .await;
    assert_error(&json_of(r, 400).await, "unsupported_query", Some("metrics"));

    // Without settings, the defaults again: UTC, no goals.
    let r = send(&app, reqwest::Method::DELETE, path, None, None).await;
    assert_eq!(json_of(r, 200).await["deleted"], true);
    let r = send(&app, reqwest::Method::GET, path, None, None).await;
    assert_error(&json_of(r, 404).await, "site_not_registered", None);
    let today = query_today(&app, "shop", json!({})).await;
    assert_eq!(today["query"]["timezone"], "UTC");
    app.app.stop().await;
}

/// With read tokens configured: a public site reads without one, run-time
/// tokens read their sites until revoked, and only admin tokens (scoped
/// ones to their sites) manage settings and tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_sites_and_run_time_tokens() {
    let app = app_with(Backend::EmbeddedSqlite, |s| {
        s.stats_tokens = READER.parse().unwrap();
        s.admin_tokens = format!("{ADMIN}, {ADMIN_SHOP}=shop").parse().unwrap();
    })
    .await;
    for site in ["shop", "blog"] {
        let event = json!({"site_id": site, "event_type": "page_view", "userid": "u1"});
        assert_eq!(app.post_event(&event).await.status(), 202);
    }
    let q = |site: &str| json!({"site_id": site, "metrics": ["events"], "date_range": "day"});
    let read = |site: &'static str, token: Option<String>| {
        let app = &app;
        let body = q(site);
        async move {
            send(
                app,
                reqwest::Method::POST,
                "/api/v2/query",
                Some(&body),
                token.as_deref(),
            )
            .await
        }
    };
    assert_error(
        &json_of(read("shop", None).await, 401).await,
        "unauthorized",
        None,
    );

    // Made public by its scoped admin: readable without a token, listed.
    let path = "/api/sites/shop/settings";
    let public = json!({"public": true});
    let r = send(
        &app,
        reqwest::Method::PUT,
        path,
        Some(&public),
        Some(READER),
    )
    .await;
    assert_error(&json_of(r, 401).await, "invalid_token", None);
    let r = send(
        &app,
        reqwest::Method::PUT,
        "/api/sites/blog/settings",
        Some(&public),
        Some(ADMIN_SHOP),
    )
    .await;
    assert_error(&json_of(r, 403).await, "forbidden", None);
    let bad = json!({"timezone": "Mars/Olympus"});
    let r = send(
        &app,
        reqwest::Method::PUT,
        path,
        Some(&bad),
        Some(ADMIN_SHOP),
    )
    .await;
    assert_error(&json_of(r, 400).await, "invalid_settings", Some("timezone"));
    let r = send(
        &app,
        reqwest::Method::PUT,
        path,
        Some(&public),
        Some(ADMIN_SHOP),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(read("shop", None).await.status(), 200);
    assert_error(
        &json_of(read("blog", None).await, 401).await,
        "unauthorized",
        None,
    );
    let r = send(&app, reqwest::Method::GET, "/api/sites", None, None).await;
    let sites = json_of(r, 200).await;
    assert_eq!(sites["sites"].as_array().unwrap().len(), 1, "{sites}");
    assert_eq!(sites["sites"][0]["site_id"], "shop");

    // A read token for blog, with its share link; shown once.
    let new = json!({"sites": ["blog"], "label": "for the team"});
    let r = send(
        &app,
        reqwest::Method::POST,
        "/api/tokens",
        Some(&new),
        Some(ADMIN_SHOP),
    )
    .await;
    assert_error(&json_of(r, 403).await, "forbidden", None);
    let r = send(
        &app,
        reqwest::Method::POST,
        "/api/tokens",
        Some(&new),
        Some(ADMIN),
    )
    .await;
    let made = json_of(r, 201).await;
    let token = made["token"].as_str().unwrap().to_owned();
    assert_eq!(
        made["share_links"]["blog"],
        format!("/dashboard/blog?auth={token}")
    );
    assert_eq!(read("blog", Some(token.clone())).await.status(), 200);
    let other = read("elsewhere", Some(token.clone())).await;
    assert_error(&json_of(other, 403).await, "forbidden", None);
    // The public site too, with the token of another.
    assert_eq!(read("shop", Some(token.clone())).await.status(), 200);
    let r = send(&app, reqwest::Method::GET, "/api/tokens", None, Some(ADMIN)).await;
    let listed = json_of(r, 200).await;
    assert_eq!(listed["tokens"].as_array().unwrap().len(), 1);
    assert_eq!(listed["tokens"][0]["label"], "for the team");
    assert!(!listed.to_string().contains(&token));
    // A scoped admin does not see tokens of other sites.
    let r = send(
        &app,
        reqwest::Method::GET,
        "/api/tokens",
        None,
        Some(ADMIN_SHOP),
    )
    .await;
    assert_eq!(json_of(r, 200).await["tokens"], json!([]));

    let id = made["id"].as_str().unwrap();
    let r = send(
        &app,
        reqwest::Method::DELETE,
        &format!("/api/tokens/{id}"),
        None,
        Some(ADMIN),
    )
    .await;
    assert_eq!(json_of(r, 200).await["revoked"], true);
    let gone = read("blog", Some(token)).await;
    assert_error(&json_of(gone, 401).await, "invalid_token", None);
    let r = send(
        &app,
        reqwest::Method::DELETE,
        &format!("/api/tokens/{id}"),
        None,
        Some(ADMIN),
    )
    .await;
    assert_error(&json_of(r, 404).await, "token_not_found", None);
    app.app.stop().await;
}

/// A change made through one API process applies in another (same store)
/// within the registry's refresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_process_applies_a_change_within_the_refresh() {
    let env = TestEnv::new(Backend::RedisSqlite);
    let mut settings = env.settings.clone();
    let first = spawn_app_with(env, Role::All).await;
    settings.port = 0;
    let second = evtrack::startup::Application::build(settings, Role::Api)
        .await
        .expect("a second API process starts");
    let address = format!("http://127.0.0.1:{}", second.port().unwrap());
    let stop = second.shutdown_token();
    let running = tokio::spawn(second.run_until_stopped());
    let zone_there = || async {
        let r = first
            .client
            .post(format!("{address}/api/v2/query"))
            .json(&json!({"site_id": "shop", "metrics": ["events"], "date_range": "day"}))
            .send()
            .await
            .unwrap();
        json_of(r, 200).await["query"]["timezone"].clone()
    };
    assert_eq!(zone_there().await, "UTC");
    let r = send(
        &first,
        reqwest::Method::PUT,
        "/api/sites/shop/settings",
        Some(&json!({"timezone": "Europe/Lisbon"})),
        None,
    )
    .await;
    assert_eq!(r.status(), 200);
    let deadline = tokio::time::Instant::now() + evtrack::sites::REFRESH_EVERY * 3;
    while zone_there().await != "Europe/Lisbon" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not applied in time"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.cancel();
    let _ = running.await;
    first.app.stop().await;
}

/// `evtrack sites …` and `evtrack tokens …` on the store a service then
/// opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_manages_the_registry() {
    let env = TestEnv::new(Backend::EmbeddedSqlite);
    let data = env.settings.data_dir.clone();
    let run = |args: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_evtrack"));
        for var in evtrack::config::env_names() {
            cmd.env_remove(var);
        }
        let out = cmd
            .args(args)
            .env("DATA_DIR", &data)
            .env("RUST_LOG", "warn")
            .output()
            .expect("evtrack runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let (ok, text) = run(&["sites", "set", "shop", r#"{"timezone": "Nope/Nowhere"}"#]);
    assert!(!ok && text.contains("timezone"), "{text}");
    let (ok, text) = run(&[
        "sites",
        "set",
        "shop",
        r#"{"timezone": "Europe/Paris", "goals": [{"event": "Signup"}]}"#,
    ]);
    assert!(ok, "{text}");
    let (ok, text) = run(&["sites", "list"]);
    assert!(
        ok && text.contains("Europe/Paris") && text.contains("Signup"),
        "{text}"
    );
    let (ok, text) = run(&["tokens", "create", "--site", "shop", "--label", "ci"]);
    assert!(ok, "{text}");
    let token = text
        .lines()
        .find_map(|l| l.strip_prefix("token "))
        .expect("the token is printed")
        .to_owned();
    let (ok, listed) = run(&["tokens", "list"]);
    assert!(
        ok && listed.contains("\"ci\"") && !listed.contains(&token),
        "{listed}"
    );

    let mut env = env;
    env.settings.stats_tokens = READER.parse().unwrap();
    let app = spawn_app_with(env, Role::All).await;
    let r = app
        .client
        .post(format!("{}/api/v2/query", app.address))
        .bearer_auth(&token)
        .json(&json!({"site_id": "shop", "metrics": ["events"], "date_range": "day"}))
        .send()
        .await
        .unwrap();
    assert_eq!(json_of(r, 200).await["query"]["timezone"], "Europe/Paris");
    app.app.stop().await;
}
