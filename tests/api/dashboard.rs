//! The dashboard in a real browser (Debian's Chromium, driven by Playwright
//! from `tests/browser/dashboard.mjs`), checked against the query API: what
//! the page shows at each step equals what the API answers for the same
//! question. Also the pages and listings it is served from.

use std::time::Duration;

use serde_json::{Value, json};

use evtrack::startup::Role;

use crate::browser::run_script;
use crate::helpers::{Backend, TestApp, TestEnv, spawn_app, spawn_app_with};

const SITE: &str = "dash.test";
/// The site's zone, half an hour off UTC: the page's days are not UTC
/// days, nor the browser's (it runs in another zone, [`BROWSER_ZONE`]).
const ZONE: &str = "Asia/Kolkata";
const BROWSER_ZONE: &str = "America/Los_Angeles";
/// The test's own read token (the page reads with a share link's).
const READER: &str = "dashboard-test-reader-01";
const ADMIN: &str = "dashboard-test-admin-001";
const MINUTE: i64 = 60_000;
const DAY: i64 = 24 * 60 * MINUTE;

/// Visits of a few visitors: recent ones (today, most likely, in any zone
/// but within minutes of its midnight), some days ago, and some in the
/// previous 30 days, from several sources, countries and browsers.
async fn seed(app: &TestApp) -> usize {
    let now = chrono::Utc::now().timestamp_millis();
    let mut events = Vec::new();
    let mut id = 0;
    let mut visit = |user: &str, at: i64, pages: &[&str], ctx: Value, signup: Option<&str>| {
        for (i, page) in pages.iter().enumerate() {
            id += 1;
            let mut e = json!({"site_id": SITE, "event_type": "page_view", "path": page,
                               "userid": user, "timestamp": at + i as i64 * MINUTE,
                               "event_id": format!("e{id}")});
            if let (Some(e), Some(ctx)) = (e.as_object_mut(), ctx.as_object()) {
                e.extend(ctx.clone());
            }
            events.push(e);
        }
        if let Some(plan) = signup {
            id += 1;
            events.push(
                json!({"site_id": SITE, "event_type": "Signup", "path": pages[pages.len() - 1],
                               "userid": user, "timestamp": at + pages.len() as i64 * MINUTE,
                               "event_id": format!("e{id}"), "props": {"plan": plan}}),
            );
        }
    };
    let google = json!({"source": "Google", "referrer": "google.com", "country": "IN",
                        "browser": "Chrome", "os": "Android", "device": "Mobile"});
    let hn = json!({"source": "Hacker News", "referrer": "news.ycombinator.com", "country": "US",
                    "browser": "Firefox", "os": "Linux", "device": "Desktop",
                    "utm_campaign": "launch"});
    let direct = json!({"country": "DE", "browser": "Safari", "os": "Mac", "device": "Desktop"});
    visit(
        "u1",
        now - 20 * MINUTE,
        &["/", "/pricing"],
        google.clone(),
        Some("pro"),
    );
    visit("u2", now - 15 * MINUTE, &["/pricing"], hn.clone(), None);
    visit(
        "u3",
        now - 10 * MINUTE,
        &["/", "/blog/launch", "/pricing"],
        hn.clone(),
        Some("team"),
    );
    visit("u4", now - 3 * MINUTE, &["/"], direct.clone(), None);
    visit("u5", now - 3 * DAY, &["/blog/launch"], google.clone(), None);
    visit("u1", now - 3 * DAY, &["/", "/docs"], google.clone(), None);
    visit(
        "u6",
        now - 12 * DAY,
        &["/pricing", "/docs"],
        direct.clone(),
        Some("pro"),
    );
    // The previous 30 days.
    visit(
        "u7",
        now - 40 * DAY,
        &["/", "/pricing"],
        google.clone(),
        None,
    );
    visit("u8", now - 45 * DAY, &["/"], hn.clone(), None);
    let n = events.len();
    let r = app.post_events(&Value::Array(events)).await;
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap_or_default());
    n
}

/// `POST /api/v2/query` with the test's read token.
async fn query(app: &TestApp, body: &Value) -> Value {
    let r = app
        .client
        .post(format!("{}/api/v2/query", app.address))
        .bearer_auth(READER)
        .json(body)
        .send()
        .await
        .expect("request sent");
    crate::helpers::json_of(r, 200).await
}

/// Waits until the site's events (all time) are `n` in the query API.
async fn wait_all(app: &TestApp, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = query(
            app,
            &json!({"site_id": SITE, "metrics": ["events"], "date_range": "all"}),
        )
        .await;
        if r["results"][0]["metrics"][0] == n {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{r}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The API's answer to what the page asked at one step.
async fn api(app: &TestApp, range: &str, filters: &Value, extra: Value) -> Value {
    let mut body =
        json!({"site_id": SITE, "date_range": range, "timezone": ZONE, "filters": filters});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    query(app, &body).await
}

/// Numbers as numbers, whether written `50` or `50.0`.
fn numeric(rows: &Value) -> Value {
    match rows {
        Value::Array(a) => Value::Array(a.iter().map(numeric).collect()),
        Value::Number(n) => json!(n.as_f64()),
        other => other.clone(),
    }
}

/// Checks one step of the browser's report against the API.
async fn check_step(app: &TestApp, step: &Value, range: &str, filters: Value) {
    let name = &step["name"];
    let events = api(
        app,
        range,
        &filters,
        json!({"metrics": ["visitors", "pageviews"]}),
    )
    .await;
    let visits = api(
        app,
        range,
        &filters,
        json!({"metrics": ["visits", "bounce_rate", "visit_duration"]}),
    )
    .await;
    let totals = [&events, &visits]
        .iter()
        .flat_map(|a| {
            a["results"][0]["metrics"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .map(|v| v.as_f64().expect("a number"))
        .collect::<Vec<_>>();
    let shown: Vec<f64> = [
        "visitors",
        "pageviews",
        "visits",
        "bounce_rate",
        "visit_duration",
    ]
    .iter()
    .map(|m| step["stats"][m].as_f64().unwrap_or(f64::NAN))
    .collect();
    assert_eq!(shown, totals, "{name}: headline figures");
    // Panels: each row's value and numbers, as the API ranks them.
    let panels = [
        (
            "panel-pages",
            "event:page",
            json!(["visitors", "pageviews"]),
            json!([["is", "event:name", ["pageview"]]]),
        ),
        (
            "panel-sources",
            "visit:source",
            json!(["visitors", "visits"]),
            json!([]),
        ),
        (
            "panel-countries",
            "visit:country",
            json!(["visitors", "visits"]),
            json!([]),
        ),
        (
            "panel-devices",
            "visit:device",
            json!(["visitors", "visits"]),
            json!([]),
        ),
        (
            "panel-events",
            "event:name",
            json!(["visitors", "events"]),
            json!([["is_not", "event:name", ["pageview"]]]),
        ),
        (
            "panel-goals",
            "event:goal",
            json!(["visitors", "events", "conversion_rate"]),
            json!([]),
        ),
    ];
    for (panel, dim, metrics, own) in panels {
        let mut all = filters.as_array().cloned().unwrap_or_default();
        all.extend(own.as_array().cloned().unwrap_or_default());
        let answer = api(
            app,
            range,
            &Value::Array(all),
            json!({"metrics": metrics, "dimensions": [dim], "pagination": {"limit": 10}}),
        )
        .await;
        let expected: Vec<Value> = answer["results"]
            .as_array()
            .expect("rows")
            .iter()
            .map(|r| {
                let mut row = vec![r["dimensions"][0].clone()];
                row.extend(r["metrics"].as_array().cloned().unwrap_or_default());
                Value::Array(row)
            })
            .collect();
        let shown = &step["panels"][panel];
        if expected.is_empty() {
            assert!(
                shown["empty"].is_string(),
                "{name}: {panel} is empty: {shown}"
            );
        } else {
            assert_eq!(shown["dimension"], dim, "{name}: {panel}");
            assert_eq!(
                numeric(&shown["rows"]),
                numeric(&json!(expected)),
                "{name}: {panel} rows"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_what_the_query_api_answers_and_filters_by_a_click() {
    // Stats need tokens; the page reads with a share link's, scoped to the
    // site. The site has a time zone and goals in the registry.
    let mut env = TestEnv::new(Backend::EmbeddedSqlite);
    env.settings.stats_tokens = READER.parse().unwrap();
    env.settings.admin_tokens = ADMIN.parse().unwrap();
    let app = spawn_app_with(env, Role::All).await;
    let admin = |r: reqwest::RequestBuilder| r.bearer_auth(ADMIN).send();
    let settings = json!({"timezone": ZONE, "goals": [{"event": "Signup"}, {"page": "/pricing"}]});
    let r = admin(
        app.client
            .put(format!("{}/api/sites/{SITE}/settings", app.address))
            .json(&settings),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let r = admin(
        app.client
            .post(format!("{}/api/tokens", app.address))
            .json(&json!({"sites": [SITE], "label": "dashboard test"})),
    )
    .await
    .unwrap();
    let made = crate::helpers::json_of(r, 201).await;
    let n = seed(&app).await;
    wait_all(&app, n).await;
    let shot = app.env.dir.path().join("dashboard.png");
    let url = format!(
        "{}{}",
        app.address,
        made["share_links"][SITE].as_str().expect("a share link")
    );
    let report = run_script(
        "dashboard.mjs",
        &[url.as_ref(), BROWSER_ZONE.as_ref(), shot.as_os_str()],
    )
    .await;
    assert_eq!(report["errors"], json!([]), "no console errors");
    assert_eq!(report["failed"], json!([]), "no failed or refused requests");
    assert!(shot.exists(), "a screenshot");
    let steps = report["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), 5, "{report}");
    let pricing = json!([["is", "event:page", ["/pricing"]]]);

    let loaded = &steps[0];
    assert_eq!(loaded["title"], format!("{SITE} · evtrack"));
    assert_eq!(
        loaded["period"], "30d",
        "the default range: the last 30 days, today included"
    );
    assert_eq!(loaded["filters"], json!([]));
    assert_eq!(loaded["zone"], ZONE, "the site's zone, not the browser's");
    assert!(
        loaded["panels"]["panel-goals"]["rows"]
            .as_array()
            .is_some_and(|r| r.len() == 2),
        "both goals reached: {}",
        loaded["panels"]["panel-goals"]
    );
    assert_eq!(loaded["chartPoints"], 30, "a point per day of the range");
    check_step(&app, loaded, "30d", json!([])).await;
    assert_eq!(
        loaded["stats"]["visitors"], 6,
        "six visitors in the last 30 days"
    );

    // The Pages panel's CSV button saves the query API's CSV answer for
    // the panel, every row of it.
    let csv = app
        .client
        .post(format!("{}/api/v2/query", app.address))
        .bearer_auth(READER)
        .header("Accept", "text/csv")
        .json(
            &json!({"site_id": SITE, "date_range": "30d", "timezone": ZONE,
                      "metrics": ["visitors", "pageviews"], "dimensions": ["event:page"],
                      "filters": [["is", "event:name", ["pageview"]]]}),
        )
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(csv.starts_with("event:page,visitors,pageviews\n"), "{csv}");
    assert_eq!(report["csv"]["text"], csv, "the downloaded file");
    let name = report["csv"]["name"].as_str().unwrap();
    assert!(
        name.starts_with(&format!("{SITE}-event-page-")) && name.ends_with(".csv"),
        "{name}"
    );

    let filtered = &steps[1];
    assert_eq!(filtered["filters"], json!(["Page is /pricing"]));
    assert!(
        filtered["url"]
            .as_str()
            .unwrap()
            .contains("f=event%3Apage%7Cis%7C%2Fpricing"),
        "the filter is in the URL: {}",
        filtered["url"]
    );
    check_step(&app, filtered, "30d", pricing.clone()).await;
    assert_eq!(
        filtered["stats"]["visitors"], 4,
        "four of them saw /pricing"
    );

    let today = &steps[2];
    assert_eq!(today["period"], "day");
    assert_eq!(today["filters"], json!(["Page is /pricing"]));
    assert_eq!(today["chartPoints"], 24, "a point per hour of the day");
    check_step(&app, today, "day", pricing.clone()).await;

    // Back in history: the filtered 30 days again.
    assert_eq!(steps[3]["url"], filtered["url"]);
    check_step(&app, &steps[3], "30d", pricing).await;

    let unfiltered = &steps[4];
    assert_eq!(unfiltered["filters"], json!([]));
    assert_eq!(unfiltered["stats"], loaded["stats"]);
}

#[tokio::test]
async fn the_home_page_lists_readable_sites_and_assets_are_served() {
    let app = spawn_app(Backend::EmbeddedSqlite).await;
    // Before any event: the page, and an empty list it explains.
    let home = app.get("/").await;
    assert_eq!(home.status(), 200);
    let csp = home.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(csp.contains("script-src 'self'"), "{csp}");
    let html = home.text().await.unwrap();
    assert!(html.contains(r#"src="/assets/app.js"#), "{html}");
    let sites: Value = app.get("/api/sites").await.json().await.unwrap();
    assert_eq!(sites, json!({"sites": []}));

    let n = seed(&app).await;
    wait_all(&app, n).await;
    let sites: Value = app.get("/api/sites").await.json().await.unwrap();
    assert_eq!(
        sites,
        json!({"sites": [{"site_id": SITE, "timezone": null, "public": false, "goals": []}]})
    );
    let props: Value = app
        .get(&format!("/api/sites/{SITE}/properties?event=Signup"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(props, json!({"site_id": SITE, "properties": ["plan"]}));
    let none: Value = app
        .get(&format!("/api/sites/{SITE}/properties?event=pageview"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(none["properties"], json!([]), "pageviews carry no property");
    let bad = app
        .get(&format!("/api/sites/{SITE}/properties?evnt=x"))
        .await;
    assert_eq!(bad.status(), 400);

    for (path, kind) in [
        ("/assets/app.js", "text/javascript"),
        ("/assets/app.css", "text/css"),
        ("/assets/favicon.svg", "image/svg+xml"),
        ("/favicon.ico", "image/svg+xml"),
    ] {
        let r = app.get(path).await;
        assert_eq!(r.status(), 200, "{path}");
        assert!(
            r.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with(kind),
            "{path}"
        );
        let etag = r.headers()["etag"].clone();
        let again = app
            .client
            .get(format!("{}{path}", app.address))
            .header("if-none-match", etag)
            .send()
            .await
            .unwrap();
        assert_eq!(again.status(), 304, "{path} revalidated");
    }
    assert_eq!(app.get("/assets/nope.js").await.status(), 404);
    let page = app.get(&format!("/dashboard/{SITE}")).await;
    assert_eq!(page.status(), 200);
}

#[tokio::test]
async fn a_token_sees_only_its_sites_and_a_base_path_moves_every_route() {
    let mut env = TestEnv::new(Backend::EmbeddedSqlite);
    env.settings.stats_tokens = "reader-of-dash-0001=dash.test,reader-of-all-00001"
        .parse()
        .unwrap();
    env.settings.base_path = "/analytics".parse().unwrap();
    let app = spawn_app_with(env, Role::All).await;
    let post = app
        .client
        .post(format!("{}/analytics/events", app.address))
        .json(&json!([{"site_id": SITE, "event_type": "page_view", "userid": "u", "path": "/"},
                      {"site_id": "other.test", "event_type": "page_view", "userid": "u", "path": "/"}]))
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), 202);
    let list = |token: Option<&'static str>| {
        let mut r = app
            .client
            .get(format!("{}/analytics/api/sites", app.address));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let all: Value = list(Some("reader-of-all-00001"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if all["sites"].as_array().is_some_and(|s| s.len() == 2) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{all}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mine: Value = list(Some("reader-of-dash-0001"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(mine["sites"].as_array().map(Vec::len), Some(1), "{mine}");
    assert_eq!(mine["sites"][0]["site_id"], SITE);
    assert_eq!(list(None).await.unwrap().status(), 401);
    let other = app
        .client
        .get(format!(
            "{}/analytics/api/sites/other.test/properties",
            app.address
        ))
        .bearer_auth("reader-of-dash-0001")
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 403);

    let page = app.get("/analytics/").await;
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(html.contains(r#"content="/analytics""#), "{html}");
    assert!(html.contains(r#"src="/analytics/assets/app.js"#), "{html}");
    assert_eq!(app.get("/analytics/assets/app.css").await.status(), 200);
    assert_eq!(app.get("/analytics/js/script.js").await.status(), 200);
    // Nothing outside the prefix.
    let outside = app.get("/api/sites").await;
    assert_eq!(outside.status(), 404);
    let body: Value = outside.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found");
}
