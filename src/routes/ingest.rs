//! `POST /event` and `POST /events`: validate, queue, answer.
//!
//! Bodies are read with a hard size limit before any parsing, so an oversized
//! request costs at most the limit in memory, and its bytes are counted, as
//! they arrive, against a budget shared by all connections
//! (`MAX_BODY_BYTES_IN_FLIGHT`). A
//! batch is split into its items without building them (borrowed slices of
//! the body), the count is checked before any item is parsed, and items are
//! then parsed one at a time, each at most [`MAX_EVENT_BYTES`]: a request
//! costs the body plus one item's parse, whatever the body holds. Nothing is
//! queued from a request unless all of its accepted events are queued
//! together.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tokio::sync::OwnedSemaphorePermit;

use super::browser::{Client, identify};
use super::{ApiError, AppState, InFlight};
use crate::event::{Event, now_ms, parse_event};
use crate::ratelimit::retry_after_secs;

pub const MAX_EVENT_BYTES: usize = 64 * 1024;
pub const MAX_BATCH_BYTES: usize = 5 * 1024 * 1024;
pub const MAX_BATCH_EVENTS: usize = 1_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyKind {
    Json,
    Ndjson,
}

/// `application/json`, or `text/plain` (what `navigator.sendBeacon` sends for
/// a string); NDJSON only where batches are allowed. No header means JSON.
fn body_kind(headers: &HeaderMap, ndjson_allowed: bool) -> Result<BodyKind, ApiError> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Ok(BodyKind::Json);
    };
    let essence = value
        .to_str()
        .ok()
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase())
        .unwrap_or_default();
    match essence.as_str() {
        "application/json" | "text/plain" => Ok(BodyKind::Json),
        "application/x-ndjson" | "application/jsonl" if ndjson_allowed => Ok(BodyKind::Ndjson),
        _ => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            if ndjson_allowed {
                "send Content-Type: application/json, text/plain or application/x-ndjson"
            } else {
                "send Content-Type: application/json or text/plain"
            },
        )),
    }
}

/// A client gets this long to send its body; a slow one must not hold a
/// handler (and graceful shutdown) forever.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads a body of at most `limit` bytes. Its bytes are reserved from the
/// budget shared by all connections (`MAX_BODY_BYTES_IN_FLIGHT`) as they
/// arrive, so the room held is what was received, not what a header
/// promised: clients that declare large bodies and send nothing hold
/// nothing. The reservation is returned with the bytes and released when
/// the handler is done with them.
pub(super) async fn read_body(
    state: &AppState,
    request: Request,
    limit: usize,
) -> Result<(bytes::Bytes, Option<OwnedSemaphorePermit>), ApiError> {
    read_limited(request.into_body(), limit, &state.limits).await
}

/// After refusing a body as too large, how much more of it is read and
/// thrown away, and for how long, so that the client, still sending, gets to
/// read the 413 instead of a reset connection (what nginx calls a lingering
/// close). Bounded: memory is not used, and a client sending for ever is cut
/// off.
const DISCARD_BYTES: usize = 16 * 1024 * 1024;
const DISCARD_TIME: Duration = Duration::from_secs(1);

async fn read_limited(
    mut body: Body,
    limit: usize,
    budget: &InFlight,
) -> Result<(bytes::Bytes, Option<OwnedSemaphorePermit>), ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the body must be at most {limit} bytes"),
        )
    };
    let read = async {
        let mut buf = bytes::BytesMut::new();
        let mut room: Option<OwnedSemaphorePermit> = None;
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else {
                return Err(ApiError::bad_request(
                    "invalid_body",
                    "the request body could not be read",
                ));
            };
            let Ok(data) = frame.into_data() else {
                continue; // trailers
            };
            if buf.len() + data.len() > limit {
                drop((buf, room));
                discard(&mut body, data.len()).await;
                return Err(too_large());
            }
            match budget.reserve_body(data.len()) {
                Ok(more) => match room.as_mut() {
                    Some(held) => held.merge(more),
                    None => room = Some(more),
                },
                Err(overloaded) => {
                    drop((buf, room));
                    discard(&mut body, data.len()).await;
                    return Err(overloaded);
                }
            }
            buf.extend_from_slice(&data);
        }
        Ok((buf.freeze(), room))
    };
    // One timer for the whole body (not one per frame).
    tokio::time::timeout(BODY_TIMEOUT, read)
        .await
        .unwrap_or_else(|_| {
            Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!(
                    "the body did not arrive within {} s",
                    BODY_TIMEOUT.as_secs()
                ),
            ))
        })
}

/// Reads and drops what is left of a refused body, within
/// [`DISCARD_BYTES`] and [`DISCARD_TIME`].
async fn discard(body: &mut Body, mut seen: usize) {
    let deadline = tokio::time::Instant::now() + DISCARD_TIME;
    while seen <= DISCARD_BYTES {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(Ok(frame))) => seen += frame.data_ref().map_or(0, |d| d.len()),
            _ => return,
        }
    }
}

pub(super) fn invalid_json(e: &serde_json::Error) -> ApiError {
    ApiError::bad_request(
        "invalid_json",
        format!(
            "the body is not valid JSON (line {}, column {})",
            e.line(),
            e.column()
        ),
    )
}

const SITE_NOT_ALLOWED: &str = "site_not_allowed";

/// The ingest allow-list (`INGEST_SITES`).
fn check_site(state: &AppState, event: &Event) -> Result<(), ApiError> {
    if state.access.ingest_allowed(&event.site_id) {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        SITE_NOT_ALLOWED,
        "this site may not send events here",
    )
    .with_field("site_id"))
}

/// What one ingest request did, for the metrics: events read, events
/// queued, and each refusal's code with how many events it covers.
#[derive(Default)]
pub(super) struct Tally {
    pub(super) received: u64,
    pub(super) queued: u64,
    pub(super) rejected: Vec<(&'static str, u64)>,
}

impl Tally {
    /// Records the request; an error that refused the request before its
    /// events could be counted (a bad body) counts as one event.
    pub(super) fn record<T>(mut self, state: &AppState, result: &Result<T, ApiError>) {
        if let Err(e) = result {
            if self.received == 0 {
                self.received = 1;
            }
            // Events not already refused one by one share the request's fate.
            let counted: u64 = self.rejected.iter().map(|r| r.1).sum();
            let left = self.received.saturating_sub(counted);
            if left > 0 {
                self.rejected.push((e.code, left));
            }
        }
        let m = &state.metrics;
        m.events_received.inc_by(self.received);
        m.events_queued.inc_by(self.queued);
        for (code, n) in self.rejected {
            m.reject(code, n);
        }
    }
}

/// `RATE_LIMIT`: 429 `rate_limited` with `Retry-After` once a client has
/// used its allowance. The client's address comes from the server loop
/// ([`ConnectInfo`]); a request without one (the router used on its own, as
/// in unit tests) is not limited.
pub async fn rate_limit(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let (Some(limit), Some(ConnectInfo(peer))) = (
        state.limit.as_deref(),
        request.extensions().get::<ConnectInfo<SocketAddr>>(),
    ) else {
        return next.run(request).await;
    };
    let client = limit.proxies.client_ip(peer.ip(), request.headers());
    match limit.rate.check(client) {
        Ok(()) => next.run(request).await,
        Err(wait) => {
            let secs = retry_after_secs(wait);
            let refused: Result<Infallible, ApiError> = Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                RATE_LIMITED,
                format!("too many requests from this address; retry in {secs} s"),
            ));
            Tally::default().record(&state, &refused);
            let Err(error) = refused;
            let mut response = error.into_response();
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            response
        }
    }
}

const RATE_LIMITED: &str = "rate_limited";

fn too_many_events() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_many_events",
        format!("a batch holds at most {MAX_BATCH_EVENTS} events"),
    )
}

/// One item of a batch, not yet parsed: a slice of the body.
enum Item<'a> {
    /// An element of a JSON array (already known to be well-formed JSON).
    Json(&'a serde_json::value::RawValue),
    /// A non-blank NDJSON line.
    Line(&'a [u8]),
}

/// Splits a batch body into its items without building them, and refuses
/// more than [`MAX_BATCH_EVENTS`] as soon as the next one is seen.
fn split_batch<'a>(
    bytes: &'a [u8],
    kind: BodyKind,
    tally: &mut Tally,
) -> Result<Vec<Item<'a>>, ApiError> {
    match kind {
        BodyKind::Json => {
            // A first look at the top level alone: an array, or what else.
            let first = bytes
                .iter()
                .find(|b| !b.is_ascii_whitespace())
                .copied()
                .unwrap_or(b' ');
            if first != b'[' {
                // Not an array: say whether it is JSON at all.
                return Err(
                    match serde_json::from_slice::<serde::de::IgnoredAny>(bytes) {
                        Ok(_) => ApiError::bad_request(
                            "invalid_batch",
                            "a batch must be a JSON array of events (or NDJSON, one event per line)",
                        ),
                        Err(e) => invalid_json(&e),
                    },
                );
            }
            match serde_json::from_slice::<Capped<'a>>(bytes) {
                Ok(Capped(items)) => {
                    tally.received = items.len() as u64;
                    Ok(items.into_iter().map(Item::Json).collect())
                }
                Err(e) if e.to_string().starts_with(TOO_MANY) => {
                    tally.received = (MAX_BATCH_EVENTS + 1) as u64;
                    Err(too_many_events())
                }
                Err(e) => Err(invalid_json(&e)),
            }
        }
        // One event per non-blank line; a bad line is one rejected item, not
        // a rejected batch.
        BodyKind::Ndjson => {
            let mut items = Vec::new();
            for line in bytes.split(|b| *b == b'\n') {
                if line.trim_ascii().is_empty() {
                    continue;
                }
                if items.len() == MAX_BATCH_EVENTS {
                    tally.received = (MAX_BATCH_EVENTS + 1) as u64;
                    return Err(too_many_events());
                }
                items.push(Item::Line(line));
            }
            tally.received = items.len() as u64;
            Ok(items)
        }
    }
}

/// Parses one item into JSON, refusing one larger than a single event may be.
fn parse_item(item: Item<'_>) -> Result<Value, ApiError> {
    let len = match &item {
        Item::Json(raw) => raw.get().len(),
        Item::Line(line) => line.len(),
    };
    if len > MAX_EVENT_BYTES {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "event_too_large",
            format!("an event must be at most {MAX_EVENT_BYTES} bytes"),
        ));
    }
    match item {
        Item::Json(raw) => serde_json::from_str(raw.get()).map_err(|e| invalid_json(&e)),
        Item::Line(line) => serde_json::from_slice(line).map_err(|e| invalid_json(&e)),
    }
}

/// The message that marks a [`Capped`] array cut short.
const TOO_MANY: &str = "evtrack: too many items";

/// A JSON array of at most [`MAX_BATCH_EVENTS`] elements, each kept as a
/// borrowed slice of the input. Reading stops at the element after the last
/// allowed one, so a body of millions of tiny elements costs nothing more.
struct Capped<'a>(Vec<&'a serde_json::value::RawValue>);

impl<'de> serde::Deserialize<'de> for Capped<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Capped<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON array of events")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element::<&'de serde_json::value::RawValue>()? {
                    if items.len() == MAX_BATCH_EVENTS {
                        return Err(serde::de::Error::custom(TOO_MANY));
                    }
                    items.push(item);
                }
                Ok(Capped(items))
            }
        }
        d.deserialize_seq(Visit)
    }
}

/// Why the site's owner drops `e` ([`crate::sites::SiteConfig::drops`]),
/// if they do.
fn owner_drops(
    registry: &crate::sites::Snapshot,
    client: &Client,
    e: &Event,
) -> Option<&'static str> {
    let site = registry.site(&e.site_id)?;
    site.drops(
        client.ip,
        e.ctx.as_deref().and_then(|c| c.hostname.as_deref()),
        false,
    )
}

pub async fn post_event(
    State(state): State<AppState>,
    request: Request,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let mut tally = Tally::default();
    let result = accept_event(&state, request, &mut tally).await;
    tally.record(&state, &result);
    result
}

pub async fn post_events(
    State(state): State<AppState>,
    request: Request,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let mut tally = Tally::default();
    let result = accept_events(&state, request, &mut tally).await;
    tally.record(&state, &result);
    result
}

async fn accept_event(
    state: &AppState,
    request: Request,
    tally: &mut Tally,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let _slot = state.limits.admit()?;
    let kind = body_kind(request.headers(), false)?;
    debug_assert_eq!(kind, BodyKind::Json);
    let client = Client::of(state, &request);
    let (bytes, _room) = read_body(state, request, MAX_EVENT_BYTES).await?;
    let value: Value = serde_json::from_slice(&bytes).map_err(|e| invalid_json(&e))?;
    tally.received = 1;
    let now = now_ms();
    let mut event = parse_event(value, now)?;
    check_site(state, &event)?;
    let id = event.id.clone();
    if let Some(reason) = owner_drops(&state.registry.snapshot(), &client, &event) {
        // Answered as taken, as the browser endpoint answers its drops:
        // the sender has nothing to retry.
        state.metrics.drop_events(reason, 1);
        return Ok((
            StatusCode::ACCEPTED,
            Json(json!({"success": true, "id": id, "dropped": reason})),
        ));
    }
    identify(state, &client, std::slice::from_mut(&mut event), now).await?;
    state.queue.enqueue(vec![event]).await?;
    tally.queued = 1;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"success": true, "id": id})),
    ))
}

async fn accept_events(
    state: &AppState,
    request: Request,
    tally: &mut Tally,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let _slot = state.limits.admit()?;
    let kind = body_kind(request.headers(), true)?;
    let client = Client::of(state, &request);
    let (bytes, _room) = read_body(state, request, MAX_BATCH_BYTES).await?;
    let items = split_batch(&bytes, kind, tally)?;
    if items.is_empty() {
        return Err(ApiError::bad_request(
            "empty_batch",
            "the batch holds no events",
        ));
    }
    let now = now_ms();
    let mut events: Vec<Event> = Vec::with_capacity(items.len());
    let mut rejected = Vec::new();
    let mut not_allowed = 0;
    // The site owners' rules drop some: listed, not refused.
    let registry = state.registry.snapshot();
    let mut dropped = Vec::new();
    for (index, item) in items.into_iter().enumerate() {
        let parsed = parse_item(item).and_then(|v| {
            let event = parse_event(v, now)?;
            check_site(state, &event)?;
            Ok(event)
        });
        match parsed {
            Ok(e) => match owner_drops(&registry, &client, &e) {
                Some(reason) => {
                    state.metrics.drop_events(reason, 1);
                    dropped.push(json!({"index": index, "id": e.id, "reason": reason}));
                }
                None => events.push(e),
            },
            Err(e) => {
                not_allowed += usize::from(e.code == SITE_NOT_ALLOWED);
                tally.rejected.push((e.code, 1));
                rejected.push(json!({"index": index, "error": e.body()}));
            }
        }
    }
    let ids: Vec<String> = events.iter().map(|e| e.id.as_str().to_owned()).collect();
    if events.is_empty() && !dropped.is_empty() {
        // Taken, as far as the sender is concerned: nothing to retry.
        let body = json!({"success": true, "accepted": 0, "ids": ids, "rejected": rejected,
                          "dropped": dropped});
        return Ok((StatusCode::ACCEPTED, Json(body)));
    }
    if events.is_empty() && not_allowed == rejected.len() {
        // Every event is already counted as refused, item by item.
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "site_not_allowed",
            "no event in the batch is from a site allowed to send events",
        ));
    }
    if events.is_empty() {
        let body = json!({
            "success": false,
            "error": {"code": "no_valid_events", "message": "no event in the batch is valid; see `rejected`"},
            "accepted": 0, "ids": ids, "rejected": rejected,
        });
        return Ok((StatusCode::BAD_REQUEST, Json(body)));
    }
    identify(state, &client, &mut events, now).await?;
    let n = events.len() as u64;
    state.queue.enqueue(events).await?;
    tally.queued = n;
    let mut body =
        json!({"success": true, "accepted": ids.len(), "ids": ids, "rejected": rejected});
    if !dropped.is_empty() {
        body["dropped"] = json!(dropped);
    }
    Ok((StatusCode::ACCEPTED, Json(body)))
}
