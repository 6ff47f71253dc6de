//! `GET /api/sites/{site_id}/events`: a site's raw events as NDJSON, one
//! stored event per line, oldest first, for a date range.
//!
//! The answer is streamed: pages of [`PAGE_EVENTS`] events are read from
//! the store one at a time, each only once the client has taken the one
//! before (the body's back-pressure), so memory stays that of a page
//! however many events the range holds. Each page is its own read, bounded
//! by the query time limit. If a read fails once the answer has begun, the
//! connection is cut before the end of the chunked body, so a client never
//! takes a partial export for a whole one (curl exits with code 18).
//!
//! `POST /api/sites/{site_id}/erase`: every event of one person, gone
//! ([`crate::store::StoreAdmin::erase`]), for right-to-erasure requests.
//!
//! Both are the data owner's controls: see [`crate::access::Access::admin`].

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::{ApiError, AppState};
use crate::access::AdminDenied;
use crate::event::SiteId;
use crate::query;
use crate::store::{PageAfter, Store, StoreError};

/// Events read from the store at a time.
pub const PAGE_EVENTS: usize = 2_000;

impl From<AdminDenied> for ApiError {
    fn from(d: AdminDenied) -> Self {
        match d {
            AdminDenied::Disabled => Self::new(
                StatusCode::FORBIDDEN,
                "admin_disabled",
                "exports and the other data owner's controls need ADMIN_TOKENS on a service \
                 whose stats need tokens or are public",
            ),
            AdminDenied::Token(crate::access::Denied::Missing) => Self::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "this needs an admin token: send Authorization: Bearer <token>",
            ),
            AdminDenied::Token(crate::access::Denied::Invalid) => Self::new(
                StatusCode::UNAUTHORIZED,
                "invalid_token",
                "the bearer token is not an admin token",
            ),
            AdminDenied::Token(crate::access::Denied::Forbidden) => Self::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "this admin token may not manage this site",
            ),
        }
    }
}

/// Checks the request's admin token for `site` (see
/// [`crate::access::Access::admin`]).
pub(crate) fn admin(state: &AppState, headers: &HeaderMap, site: &SiteId) -> Result<(), ApiError> {
    Ok(state.access.admin(
        headers
            .get(header::AUTHORIZATION)
            .map(HeaderValue::as_bytes),
        site.as_str(),
    )?)
}

/// The site id of a path, or 400.
pub(crate) fn site_of(raw: &str) -> Result<SiteId, ApiError> {
    SiteId::parse(raw)
        .map_err(|e| ApiError::bad_request("invalid_site_id", e.message).with_field("site_id"))
}

/// `date_range` as the query API takes it: a relative range (`30d`,
/// `all`, …) or two dates or instants separated by a comma.
fn range_value(raw: &str) -> Value {
    match raw.split_once(',') {
        Some((from, to)) => json!([from.trim(), to.trim()]),
        None => json!(raw.trim()),
    }
}

/// A file name made of the site id's plain characters.
fn file_name(site: &SiteId) -> String {
    let plain: String = site
        .as_str()
        .chars()
        .map(
            |c| match c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                true => c,
                false => '_',
            },
        )
        .collect();
    format!("{plain}-events.ndjson")
}

pub async fn get_events(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(site): Path<String>,
    params: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let slot = state.limits.admit()?;
    let site = site_of(&site)?;
    admin(&state, &headers, &site)?;
    let Query(params) = params
        .map_err(|_| ApiError::bad_request("invalid_query", "the query string is malformed"))?;
    if let Some(unknown) = params
        .keys()
        .find(|k| !matches!(k.as_str(), "date_range" | "timezone"))
    {
        return Err(ApiError::bad_request(
            "unknown_parameter",
            format!("unknown parameter `{}`", unknown.escape_debug()),
        ));
    }
    // The query API's own parser: the same ranges, zones and errors.
    let mut request = json!({
        "site_id": site.as_str(),
        "metrics": ["events"],
        "date_range": range_value(params.get("date_range").map_or("all", String::as_str)),
    });
    if let Some(zone) = params.get("timezone") {
        request["timezone"] = json!(zone);
    }
    let request = query::parse_request(&request)?;
    let request = {
        let registry = state.registry.snapshot();
        let site = registry.site(&request.site_id).map(|c| c.settings.clone());
        request.for_site(site.as_ref())
    };
    let bound = state.stats_timeout + super::stats::STATS_TIMEOUT_SLACK;
    let first = match request.needs_first_event() {
        true => tokio::time::timeout(bound, state.store.first_event(site.as_str()))
            .await
            .map_err(|_| StoreError::Timeout(state.stats_timeout))??,
        false => None,
    };
    let resolved = request.resolve(query::time::now_ms(), first)?;
    let (start, end) = (resolved.start, resolved.end);
    let pages = Pages {
        store: Arc::clone(&state.store),
        site,
        start,
        end,
        after: None,
        done: false,
        bound,
        _slot: slot,
    };
    let name = file_name(&pages.site);
    let body = Body::from_stream(futures::stream::unfold(pages, Pages::next));
    let mut response = body.into_response();
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(response)
}

/// The export's state between pages; holds its request slot to the end.
struct Pages {
    store: Arc<dyn Store>,
    site: SiteId,
    start: i64,
    end: i64,
    after: Option<PageAfter>,
    done: bool,
    bound: std::time::Duration,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl Pages {
    /// The next chunk of lines; an error cuts the connection.
    async fn next(mut self) -> Option<(Result<Bytes, std::io::Error>, Self)> {
        if self.done {
            return None;
        }
        let read = self.store.events_page(
            self.site.as_str(),
            self.start,
            self.end,
            self.after.take(),
            PAGE_EVENTS,
        );
        let page = match tokio::time::timeout(self.bound, read).await {
            Ok(Ok(page)) => page,
            Ok(Err(e)) => return Some((Err(self.failed(&e.to_string())), self)),
            Err(_) => return Some((Err(self.failed("the store did not answer")), self)),
        };
        let mut chunk = Vec::with_capacity(page.events.len() * 256);
        for e in &page.events {
            // An `Event` always serialises (its props are JSON values).
            if serde_json::to_writer(&mut chunk, e).is_ok() {
                chunk.push(b'\n');
            }
        }
        self.after = page.next;
        self.done = self.after.is_none();
        Some((Ok(Bytes::from(chunk)), self))
    }

    fn failed(&mut self, why: &str) -> std::io::Error {
        self.done = true;
        tracing::warn!(
            error = why,
            "raw export cut short: a page could not be read"
        );
        std::io::Error::other("export cut short")
    }
}

/// The body of an erasure: whom (a `userid`, or a cookieless visitor id
/// as the export shows it).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct EraseRequest {
    visitor: String,
}

/// The largest erasure request body.
pub const MAX_ERASE_BYTES: usize = 4 * 1024;

/// The time limit of an erasure: it scans the site's events, so more than
/// a query's.
const ERASE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

pub async fn post_erase(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(site): Path<String>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<axum::Json<Value>, ApiError> {
    let _slot = state.limits.admit()?;
    let site = site_of(&site)?;
    admin(&state, &headers, &site)?;
    let body = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("an erasure request is at most {MAX_ERASE_BYTES} bytes"),
        ),
        _ => ApiError::bad_request("invalid_body", "the body could not be read"),
    })?;
    let request: EraseRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(
            "invalid_json",
            format!("the body must be {{\"visitor\": \"…\"}}: {e}"),
        )
    })?;
    let visitor = request.visitor;
    // Stored ids are at most MAX_USERID_BYTES bytes, hence at most as many
    // characters: the bound is in characters, as the schema states it.
    if visitor.is_empty()
        || visitor.chars().count() > crate::event::MAX_USERID_BYTES
        || visitor.chars().any(char::is_control)
    {
        return Err(ApiError::bad_request(
            "invalid_visitor",
            format!(
                "`visitor` is a userid or a cookieless visitor id: 1 to {} characters, no control characters",
                crate::event::MAX_USERID_BYTES
            ),
        )
        .with_field("visitor"));
    }
    let erased = tokio::time::timeout(
        ERASE_TIMEOUT,
        state
            .store
            .erase(site.as_str(), &visitor, query::time::now_ms()),
    )
    .await
    .map_err(|_| StoreError::Timeout(ERASE_TIMEOUT))??;
    // Logged without the id: the log must not keep what was erased.
    tracing::info!(
        site = site.as_str(),
        events = erased,
        "erased a visitor's events"
    );
    Ok(axum::Json(
        json!({"site_id": site.as_str(), "erased": erased}),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_take_the_query_api_forms() {
        assert_eq!(range_value("30d"), json!("30d"));
        assert_eq!(
            range_value("2025-11-01, 2025-11-23"),
            json!(["2025-11-01", "2025-11-23"])
        );
    }

    #[test]
    fn file_names_keep_plain_characters_only() {
        let site = SiteId::parse("shop.example/\"x\" ü").unwrap();
        assert_eq!(file_name(&site), "shop.example__x___-events.ndjson");
    }
}
