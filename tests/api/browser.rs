//! A real browser (Debian's Chromium, driven by Playwright from
//! `tests/browser/run.mjs`) on a shop of another origin, counted through
//! evtrack's script tag and through Plausible's npm tracker pointed at
//! evtrack. `scripts/test.sh` installs both (`chromium`, `npm ci`).

use std::path::PathBuf;
use std::time::Duration;

use axum::http::header;
use axum::response::IntoResponse;
use serde_json::{Value, json};

use crate::helpers::{Backend, first_dimensions, query_today, spawn_app, wait_events};

pub fn browser_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

/// Runs one of `tests/browser`'s scripts with Node (at most 2 minutes) and
/// returns the JSON report it prints.
pub async fn run_script(script: &str, args: &[&std::ffi::OsStr]) -> Value {
    let run = tokio::process::Command::new("node")
        .arg(browser_dir().join(script))
        .args(args)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("the browser run ends within 2 minutes")
        .expect("node runs (scripts/test.sh installs it with Chromium and playwright-core)");
    assert!(
        out.status.success(),
        "the browser run failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the run's JSON report")
}

/// Serves the shop's two pages, and Plausible's tracker from npm, on a
/// free loopback port; returns the port.
async fn serve_shop(evtrack: &str) -> u16 {
    let dir = browser_dir();
    let page = |name: &str| {
        std::fs::read_to_string(dir.join("pages").join(name))
            .expect("test page")
            .replace("{{EVTRACK}}", evtrack)
    };
    let (tag, npm) = (page("script-tag.html"), page("plausible-npm.html"));
    let plausible = std::fs::read_to_string(
        dir.join("node_modules/@plausible-analytics/tracker/plausible.js"),
    )
    .expect("Plausible's tracker from npm: run `npm ci` in tests/browser (scripts/test.sh does)");
    let html = |body: String| {
        move || async move { ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], body) }
    };
    let app = axum::Router::new()
        .route("/tag", axum::routing::get(html(tag)))
        .route("/npm", axum::routing::get(html(npm)))
        .route(
            "/plausible.js",
            axum::routing::get(move || async move {
                ([(header::CONTENT_TYPE, "text/javascript")], plausible).into_response()
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_browser_is_counted_through_evtracks_script_and_plausibles_tracker() {
    let app = spawn_app(Backend::EmbeddedSqlite).await;
    let port = serve_shop(&app.address).await;
    let shot = app.env.dir.path().join("shop.png");
    let report = run_script(
        "run.mjs",
        &[
            format!("http://shop.test:{port}").as_ref(),
            shot.as_os_str(),
        ],
    )
    .await;
    assert_eq!(report["errors"], json!([]), "no console errors");
    assert_eq!(report["failed"], json!([]), "no failed requests");
    assert_eq!(report["signupStatus"], 202, "the callback saw the answer");
    assert!(shot.exists(), "a screenshot of the shop");

    // Every event the browser sent is stored and counted: pageviews on
    // load and on pushState, custom events with props, the call queued
    // before the script loaded, the outbound link and the download.
    wait_events(&app, "shop.test", 9).await;
    let totals = query_today(&app, "shop.test", json!({})).await;
    assert_eq!(
        totals["results"][0]["metrics"],
        json!([1, 4, 9]),
        "one cookieless visitor, four pageviews, nine events (engagement is none of them)"
    );
    let pages = query_today(
        &app,
        "shop.test",
        json!({"dimensions": ["event:page"], "order_by": [["event:page", "asc"]]}),
    )
    .await;
    let pages = first_dimensions(&pages);
    assert_eq!(pages, ["/npm", "/npm/next", "/tag", "/tag/next"]);
    let names = query_today(
        &app,
        "shop.test",
        json!({"dimensions": ["event:name"], "order_by": [["event:name", "asc"]]}),
    )
    .await;
    let names: Vec<(&Value, &Value)> = names["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (&r["dimensions"][0], &r["metrics"][2]))
        .collect();
    assert_eq!(
        names,
        [
            (&json!("File Download"), &json!(1)),
            (&json!("Outbound Link: Click"), &json!(1)),
            (&json!("Purchase"), &json!(1)),
            (&json!("Queued"), &json!(1)),
            (&json!("Signup"), &json!(1)),
            (&json!("page_view"), &json!(4)),
        ]
    );
    let plans = query_today(
        &app,
        "shop.test",
        json!({"dimensions": ["event:props:plan"],
                             "filters": [["is_not", "event:props:plan", ["(none)"]]],
                             "order_by": [["event:props:plan", "asc"]]}),
    )
    .await;
    assert_eq!(plans["results"][0]["dimensions"], json!(["pro"]));
    assert_eq!(plans["results"][1]["dimensions"], json!(["team"]));
    let urls = query_today(&app, "shop.test", json!({"dimensions": ["event:props:url"],
                             "filters": [["is", "event:name", ["Outbound Link: Click", "File Download"]]],
                             "order_by": [["event:props:url", "asc"]]})).await;
    let urls = first_dimensions(&urls);
    assert_eq!(
        urls,
        [
            format!("http://shop.test:{port}/files/price-list.pdf"),
            "https://elsewhere.example/x".to_owned(),
        ]
    );
    // One visit, from the browser the User-Agent names, entered on the
    // script tag's page and left on the npm tracker's.
    for (dimension, value) in [
        ("visit:browser", "Chrome"),
        ("visit:os", "Linux"),
        ("visit:device", "Desktop"),
        ("visit:entry_page", "/tag"),
        ("visit:exit_page", "/npm/next"),
        ("visit:source", "Direct / None"),
    ] {
        let r = app
            .query(
                &json!({"site_id": "shop.test", "metrics": ["visitors", "visits", "pageviews"],
                           "date_range": "day", "dimensions": [dimension]}),
            )
            .await;
        assert_eq!(
            r["results"],
            json!([{"dimensions": [value], "metrics": [1, 1, 4]}]),
            "{dimension}"
        );
    }
    // What the request said of the browser, kept with each event (read
    // from the file: the address never is).
    let db = rusqlite::Connection::open(
        app.env
            .settings
            .data_dir
            .join(evtrack::store::sqlite::FILE_NAME),
    )
    .expect("open the store");
    let mut stmt = db
        .prepare("SELECT event_type, userid, visitor, ctx FROM events WHERE site_id = 'shop.test'")
        .unwrap();
    let rows: Vec<(String, Option<String>, Option<String>, String)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(
        rows.iter().any(|r| r.0 == "engagement"),
        "engagement sent on leaving a page"
    );
    let visitors: std::collections::HashSet<_> = rows.iter().map(|r| r.2.clone()).collect();
    assert_eq!(visitors.len(), 1, "one visitor id for both trackers");
    for (name, userid, _, ctx) in &rows {
        let ctx: evtrack::event::Context = serde_json::from_str(ctx).unwrap();
        assert_eq!(
            (
                ctx.browser.as_deref(),
                ctx.os.as_deref(),
                ctx.device.as_deref()
            ),
            (Some("Chrome"), Some("Linux"), Some("Desktop")),
            "{name}"
        );
        assert_eq!(ctx.hostname.as_deref(), Some("shop.test"));
        assert!(userid.is_none());
        assert_eq!(ctx.country, None, "loopback has no country");
    }
    app.app.stop().await;
}
