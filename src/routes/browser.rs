//! `POST /api/event`: Plausible's Events API, for browsers (evtrack's
//! script, Plausible's trackers) and for servers that speak it.
//!
//! It takes both forms of the body: the documented long names (`name`,
//! `url`, `domain`, `referrer`, `props`, `interactive`) and the short keys
//! the trackers send (`n`, `u`, `d`, `r`, `p`, `i`, `h`; the legacy
//! script's `m` and `p` as JSON text; engagement events with `sd` and `e`).
//! Fields it does not use (`v`, `w`, `$`/`revenue`, …) are ignored, not
//! refused: trackers add fields over time, and a browser cannot be told to
//! change.
//!
//! Unlike `/event`, the visitor is the request's: the cookieless id
//! ([`crate::visitor`]) from its address and User-Agent, with the browser,
//! device and country found from them ([`crate::enrich`]). Bots are dropped
//! and answered 202 like everything else (as Plausible answers its
//! shields), with `X-Evtrack-Dropped` naming why.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use super::ingest::{Tally, invalid_json, read_body};
use super::{ApiError, AppState};
use crate::event::{
    Context, ENGAGEMENT, Event, EventId, EventName, FieldError, SiteId, check_props, now_ms,
};

/// The header of a 202 that recorded nothing on purpose.
pub const DROPPED: HeaderName = HeaderName::from_static("x-evtrack-dropped");
/// Most sites one event may name (`d: "a.com,b.com"`).
pub const MAX_DOMAINS: usize = 10;
/// What Plausible's clients call a pageview.
const PAGEVIEW: &str = "pageview";

/// Who sent a request: the client's address (the peer, or the nearest
/// untrusted `X-Forwarded-For` hop behind `TRUSTED_PROXIES`) and its
/// User-Agent.
pub struct Client {
    pub ip: IpAddr,
    pub user_agent: String,
}

impl Client {
    pub fn of(state: &AppState, request: &Request) -> Self {
        let peer = request
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.0.ip());
        let ip = state.proxies.client_ip(peer, request.headers());
        let user_agent = request
            .headers()
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        Self { ip, user_agent }
    }
}

/// The visitor ids of `client` on `site` now; 503 when the salts cannot
/// be read (Redis or the store is down: retryable).
pub async fn visitor_ids(
    state: &AppState,
    client: &Client,
    site: &str,
    now: i64,
) -> Result<crate::visitor::Ids, ApiError> {
    state
        .visitors
        .ids(now, site, client.ip, &client.user_agent)
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "no visitor salt");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the service cannot take events right now; retry later",
            )
        })
}

/// How long the lookup of a visit open at midnight may take before the
/// event is counted under the new day's id: ingestion does not wait on a
/// slow or absent store.
const OPEN_VISIT_LOOKUP: std::time::Duration = std::time::Duration::from_millis(50);

/// The visitor id of `client` on `site` now. Within the grace period after
/// midnight, a visitor whose visit under yesterday's id is still open
/// (its last folded event within the visit gap) keeps that id, so that the
/// visit is not cut in two at midnight.
pub async fn visitor_id(
    state: &AppState,
    client: &Client,
    site: &str,
    now: i64,
) -> Result<String, ApiError> {
    let ids = visitor_ids(state, client, site, now).await?;
    if let Some(previous) = ids.previous {
        let since = now - crate::session::GAP_MS;
        let open = tokio::time::timeout(
            OPEN_VISIT_LOOKUP,
            state.store.visit_open(site, &previous, since),
        )
        .await;
        if let Ok(Ok(true)) = open {
            return Ok(previous);
        }
    }
    Ok(ids.current)
}

/// What `/event` and `/events` add to a server's events: a cookieless
/// visitor id to each without a `userid` (from the request's client, which
/// a server passes on in `X-Forwarded-For` from a trusted proxy address,
/// and `User-Agent`: one id per site for the whole request), and a sent
/// referrer read as a browser's.
pub async fn identify(
    state: &AppState,
    client: &Client,
    events: &mut [Event],
    now: i64,
) -> Result<(), ApiError> {
    let mut ids: HashMap<SiteId, String> = HashMap::new();
    for event in events {
        if crate::query::visitor_of(event).is_none() {
            let id = match ids.get(&event.site_id) {
                Some(id) => id.clone(),
                None => {
                    let id = visitor_id(state, client, &event.site_id, now).await?;
                    ids.insert(event.site_id.clone(), id.clone());
                    id
                }
            };
            event.visitor = Some(id);
        }
        if let Some(ctx) = event.ctx.as_deref_mut() {
            crate::enrich::complete(ctx);
        }
    }
    Ok(())
}

/// An event as Plausible's clients send it, read and checked.
#[derive(Debug)]
struct Sent {
    name: EventName,
    url: String,
    domains: Vec<SiteId>,
    referrer: Option<String>,
    props: Option<Map<String, Value>>,
    hash_routing: bool,
    interactive: bool,
    scroll_depth: Option<u8>,
    engaged_ms: Option<u64>,
}

/// The first of `keys` present (and not null) in `body`.
fn field<'a>(body: &'a Map<String, Value>, keys: &[&str]) -> Option<&'a Value> {
    keys.iter()
        .filter_map(|k| body.get(*k))
        .find(|v| !v.is_null())
}

fn text<'a>(body: &'a Map<String, Value>, keys: &[&str]) -> Result<Option<&'a str>, FieldError> {
    match field(body, keys) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(FieldError::document(
            "invalid_type",
            format!("`{}` must be a string", keys[0]),
        )),
    }
}

fn required<'a>(body: &'a Map<String, Value>, keys: &[&str]) -> Result<&'a str, FieldError> {
    text(body, keys)?
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| FieldError::document("missing_field", format!("`{}` is required", keys[0])))
}

/// A flag sent as `true`/`false`, `1`/`0`.
fn flag(body: &Map<String, Value>, keys: &[&str]) -> Option<bool> {
    match field(body, keys)? {
        Value::Bool(b) => Some(*b),
        Value::Number(n) => Some(n.as_f64() != Some(0.0)),
        _ => None,
    }
}

/// Reads a body of Plausible's Events API.
fn read(body: &[u8]) -> Result<Sent, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| invalid_json(&e))?;
    let Value::Object(body) = value else {
        return Err(ApiError::bad_request(
            "invalid_event",
            "an event must be a JSON object",
        ));
    };
    let name = required(&body, &["name", "n"])?;
    let name = if name == PAGEVIEW {
        crate::query::PAGEVIEW
    } else {
        name
    };
    let name = EventName::parse(name).map_err(|e| FieldError::document(e.code, e.message))?;
    let url = required(&body, &["url", "u"])?.to_owned();
    if url.len() > crate::event::MAX_PATH_BYTES * 4 {
        return Err(ApiError::bad_request("invalid_value", "`url` is too long"));
    }
    let domains: Vec<SiteId> = required(&body, &["domain", "d"])?
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .take(MAX_DOMAINS + 1)
        .map(SiteId::parse)
        .collect::<Result<_, _>>()
        .map_err(|e| FieldError::document(e.code, e.message.replace("site_id", "domain")))?;
    if domains.len() > MAX_DOMAINS {
        return Err(ApiError::bad_request(
            "invalid_value",
            format!("`domain` names at most {MAX_DOMAINS} sites"),
        ));
    }
    // Props: an object, or (the legacy script's `m` and `p`) its JSON text.
    let props = match field(&body, &["props", "p", "m"]) {
        None => None,
        Some(Value::Object(m)) => Some(m.clone()),
        Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
            Ok(Value::Object(m)) => Some(m),
            Ok(Value::Null) => None,
            _ => {
                return Err(ApiError::bad_request(
                    "invalid_type",
                    "`props` must be a JSON object",
                ));
            }
        },
        Some(_) => {
            return Err(ApiError::bad_request(
                "invalid_type",
                "`props` must be a JSON object",
            ));
        }
    };
    // Plausible keeps only scalar props; an empty value is no value.
    let props = props
        .map(|m| {
            m.into_iter()
                .filter(|(_, v)| !matches!(v, Value::Null) && v.as_str() != Some(""))
                .collect::<Map<_, _>>()
        })
        .filter(|m| !m.is_empty());
    if let Some(p) = &props {
        check_props(p)?;
    }
    let engagement = name.as_str() == ENGAGEMENT;
    let number = |keys: &[&str]| field(&body, keys).and_then(Value::as_f64);
    Ok(Sent {
        referrer: text(&body, &["referrer", "r"])?.map(str::to_owned),
        props,
        hash_routing: flag(&body, &["hash", "h"]).unwrap_or(false),
        interactive: flag(&body, &["interactive", "i"]).unwrap_or(true),
        scroll_depth: engagement
            .then(|| number(&["sd"]))
            .flatten()
            .map(|d| d.clamp(0.0, 100.0) as u8),
        engaged_ms: engagement
            .then(|| number(&["e"]))
            .flatten()
            .map(|e| e.clamp(0.0, 1e12) as u64),
        name,
        url,
        domains,
    })
}

/// A 202 that recorded nothing, saying why.
fn dropped(state: &AppState, reason: &'static str, events: u64) -> Response {
    state.metrics.drop_events(reason, events);
    let mut response = accepted();
    response
        .headers_mut()
        .insert(DROPPED, HeaderValue::from_static(reason));
    response
}

fn accepted() -> Response {
    (StatusCode::ACCEPTED, axum::Json(json!({"success": true}))).into_response()
}

pub async fn post_api_event(State(state): State<AppState>, request: Request) -> Response {
    let mut tally = Tally::default();
    let result = accept(&state, request, &mut tally).await;
    tally.record(&state, &result);
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn accept(
    state: &AppState,
    request: Request,
    tally: &mut Tally,
) -> Result<Response, ApiError> {
    let _slot = state.limits.admit()?;
    let client = Client::of(state, &request);
    // Any content type: browsers send text/plain (no preflight), servers
    // JSON.
    let (bytes, _room) = read_body(state, request, super::ingest::MAX_EVENT_BYTES).await?;
    tally.received = 1;
    let sent = read(&bytes)?;
    let sites: Vec<SiteId> = sent
        .domains
        .iter()
        .filter(|d| state.access.ingest_allowed(d))
        .cloned()
        .collect();
    if sites.is_empty() {
        return Ok(dropped(state, "site_not_allowed", 1));
    }
    let origin =
        crate::enrich::source::origin(Some(&sent.url), sent.referrer.as_deref(), sent.hash_routing);
    let mut ctx = Context::default();
    let bot = crate::enrich::from_request(
        &mut ctx,
        &state.agents,
        &client.user_agent,
        Some(client.ip),
        origin.clone(),
    );
    if bot {
        return Ok(dropped(state, "bot", 1));
    }
    // The site owners' rules: their own addresses, their hostnames.
    let registry = state.registry.snapshot();
    let mut reason = None;
    let sites: Vec<SiteId> = sites
        .into_iter()
        .filter(|site| {
            let why = registry
                .site(site)
                .and_then(|c| c.drops(client.ip, ctx.hostname.as_deref(), true));
            reason = reason.or(why);
            why.is_none()
        })
        .collect();
    if let (true, Some(reason)) = (sites.is_empty(), reason) {
        return Ok(dropped(state, reason, 1));
    }
    ctx.non_interactive = !sent.interactive;
    ctx.scroll_depth = sent.scroll_depth;
    ctx.engaged_ms = sent.engaged_ms;
    let now = now_ms();
    let id = EventId::parse(uuid::Uuid::now_v7().to_string())?;
    let mut events = Vec::with_capacity(sites.len());
    for site in sites {
        let visitor = visitor_id(state, &client, &site, now).await?;
        events.push(Event {
            id: id.clone(),
            site_id: site,
            event_type: sent.name.clone(),
            path: origin.path.clone(),
            userid: None,
            ts: now,
            created_at: now,
            props: sent.props.clone(),
            visitor: Some(visitor),
            ctx: Some(Box::new(ctx.clone())),
        });
    }
    // Held to the rules of every event (a URL's path may be longer than a
    // path may be): what is queued is what a worker accepts.
    for e in &events {
        e.check().map_err(|err| match err.field.as_deref() {
            Some("path") => ApiError::bad_request(
                "invalid_value",
                format!(
                    "the URL's path is longer than {} bytes",
                    crate::event::MAX_PATH_BYTES
                ),
            )
            .with_field("url"),
            _ => err.into(),
        })?;
    }
    let n = events.len() as u64;
    state.queue.enqueue(events).await?;
    tally.queued = n;
    Ok(accepted())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(v: Value) -> Result<Sent, ApiError> {
        read(v.to_string().as_bytes())
    }

    #[test]
    fn both_forms_of_the_body_are_read() {
        let short = sent(json!({"n": "pageview", "u": "https://a.example/x?utm_source=y",
            "d": "a.example", "r": "https://t.co/", "p": {"plan": "pro"}, "v": 36, "h": 1, "i": false}))
        .unwrap();
        assert_eq!(short.name.as_str(), "page_view");
        assert_eq!(short.domains, ["a.example"]);
        assert_eq!(short.referrer.as_deref(), Some("https://t.co/"));
        assert_eq!(short.props.unwrap()["plan"], "pro");
        assert!(short.hash_routing && !short.interactive);
        let long = sent(
            json!({"name": "Signup", "url": "https://a.example/", "domain": "a.example,b.example",
            "props": {"n": 3}, "revenue": {"amount": 10, "currency": "EUR"}}),
        )
        .unwrap();
        assert_eq!(long.name.as_str(), "Signup");
        assert_eq!(long.domains, ["a.example", "b.example"]);
        assert!(long.interactive);
        // The legacy script's props as JSON text, under `m` or `p`.
        let legacy = sent(
            json!({"n": "x", "u": "https://a.example/", "d": "a.example",
            "m": "{\"k\":\"v\",\"empty\":\"\",\"nothing\":null}", "w": 1280}),
        )
        .unwrap();
        assert_eq!(
            legacy.props,
            Some(Map::from_iter([("k".into(), json!("v"))]))
        );
        let engagement = sent(
            json!({"n": "engagement", "u": "https://a.example/", "d": "a.example",
            "sd": 140, "e": 5234.7}),
        )
        .unwrap();
        assert_eq!(
            (engagement.scroll_depth, engagement.engaged_ms),
            (Some(100), Some(5234))
        );
    }

    #[test]
    fn malformed_bodies_say_what_is_wrong() {
        let code = |v: Value| sent(v).unwrap_err().code;
        assert_eq!(
            code(json!({"u": "https://a.example/", "d": "a.example"})),
            "missing_field"
        );
        assert_eq!(code(json!({"n": "x", "d": "a.example"})), "missing_field");
        assert_eq!(
            code(json!({"n": "x", "u": "https://a.example/"})),
            "missing_field"
        );
        assert_eq!(
            code(json!({"n": 1, "u": "https://a.example/", "d": "a"})),
            "invalid_type"
        );
        assert_eq!(
            code(json!({"n": "x", "u": "u", "d": "a", "p": "[1]"})),
            "invalid_type"
        );
        assert_eq!(
            code(json!({"n": "x", "u": "u", "d": "a", "p": {"a": {"b": 1}}})),
            "invalid_type"
        );
        assert_eq!(code(json!([1])), "invalid_event");
        let many = ["s"; MAX_DOMAINS + 1].join(",");
        assert_eq!(
            code(json!({"n": "x", "u": "u", "d": many})),
            "invalid_value"
        );
        assert_eq!(read(b"{").unwrap_err().code, "invalid_json");
    }
}
