//! `POST /event` and `POST /events`: validate, queue, answer.
//!
//! Bodies are read with a hard size limit before any parsing, so an oversized
//! request costs at most the limit in memory. Nothing is queued from a request
//! unless all of its accepted events are queued together.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde_json::{Value, json};

use super::{ApiError, AppState};
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

async fn read_body(body: Body, limit: usize) -> Result<bytes::Bytes, ApiError> {
    let read = tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, limit).collect());
    let Ok(result) = read.await else {
        return Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!(
                "the body did not arrive within {} s",
                BODY_TIMEOUT.as_secs()
            ),
        ));
    };
    match result {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the body must be at most {limit} bytes"),
        )),
        Err(_) => Err(ApiError::bad_request(
            "invalid_body",
            "the request body could not be read",
        )),
    }
}

fn invalid_json(e: &serde_json::Error) -> ApiError {
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
struct Tally {
    received: u64,
    queued: u64,
    rejected: Vec<(&'static str, u64)>,
}

impl Tally {
    /// Records the request; an error that refused the request before its
    /// events could be counted (a bad body) counts as one event.
    fn record<T>(mut self, state: &AppState, result: &Result<T, ApiError>) {
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
    let kind = body_kind(request.headers(), false)?;
    debug_assert_eq!(kind, BodyKind::Json);
    let bytes = read_body(request.into_body(), MAX_EVENT_BYTES).await?;
    let value: Value = serde_json::from_slice(&bytes).map_err(|e| invalid_json(&e))?;
    tally.received = 1;
    let event = parse_event(value, now_ms())?;
    check_site(state, &event)?;
    let id = event.id.clone();
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
    let kind = body_kind(request.headers(), true)?;
    let bytes = read_body(request.into_body(), MAX_BATCH_BYTES).await?;
    let items: Vec<Result<Value, ApiError>> = match kind {
        BodyKind::Json => match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Array(items)) => items.into_iter().map(Ok).collect(),
            Ok(_) => {
                return Err(ApiError::bad_request(
                    "invalid_batch",
                    "a batch must be a JSON array of events (or NDJSON, one event per line)",
                ));
            }
            Err(e) => return Err(invalid_json(&e)),
        },
        // One event per non-blank line; a bad line is one rejected item, not
        // a rejected batch.
        BodyKind::Ndjson => bytes
            .split(|b| *b == b'\n')
            .filter(|line| !line.trim_ascii().is_empty())
            .map(|line| serde_json::from_slice(line).map_err(|e| invalid_json(&e)))
            .collect(),
    };
    tally.received = items.len() as u64;
    if items.len() > MAX_BATCH_EVENTS {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_events",
            format!("a batch holds at most {MAX_BATCH_EVENTS} events"),
        ));
    }
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
    for (index, item) in items.into_iter().enumerate() {
        let parsed = item.and_then(|v| {
            let event = parse_event(v, now)?;
            check_site(state, &event)?;
            Ok(event)
        });
        match parsed {
            Ok(e) => events.push(e),
            Err(e) => {
                not_allowed += usize::from(e.code == SITE_NOT_ALLOWED);
                tally.rejected.push((e.code, 1));
                rejected.push(json!({"index": index, "error": e.body()}));
            }
        }
    }
    let ids: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
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
    let n = events.len() as u64;
    state.queue.enqueue(events).await?;
    tally.queued = n;
    let body = json!({"success": true, "accepted": ids.len(), "ids": ids, "rejected": rejected});
    Ok((StatusCode::ACCEPTED, Json(body)))
}
