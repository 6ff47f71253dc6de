//! `POST /api/v2/query`: the analytics query, in the shape of Plausible's
//! Stats API v2 (see [`crate::query`]).

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use super::{ApiError, AppState};
use crate::query::{self, QueryError, engine};
use crate::store::StoreError;

/// The largest query body: a query is a few hundred bytes; filters with
/// a thousand values each fit too.
pub const MAX_QUERY_BYTES: usize = 256 * 1024;

impl From<QueryError> for ApiError {
    fn from(e: QueryError) -> Self {
        let mut error = ApiError::bad_request(e.code, e.message);
        error.field = e.field;
        error
    }
}

/// Whether the client asks for CSV (`Accept: text/csv`) rather than JSON.
fn wants_csv(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            t.split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case("text/csv"))
        })
}

pub async fn post_query(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let _slot = state.limits.admit()?;
    let viewer = super::stats::reader(&state, &headers)?;
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("a query is at most {MAX_QUERY_BYTES} bytes"),
            )
        } else {
            ApiError::bad_request("invalid_body", "the request body could not be read")
        }
    })?;
    let value: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("the body is not JSON: {e}")))?;
    let request = query::parse_request(&value)?;
    let request = {
        let site = viewer
            .registry
            .site(&request.site_id)
            .map(|c| c.settings.clone());
        request.for_site(site.as_ref())
    };
    viewer.may_read(&request.site_id)?;
    // The store stops its own reads at the limit; this bound, a little
    // later, also covers a backend that does not answer at all.
    let bound = state.stats_timeout + super::stats::STATS_TIMEOUT_SLACK;
    let store = Arc::clone(&state.store);
    let answer = tokio::time::timeout(bound, async move {
        let first = match request.needs_first_event() {
            true => store.first_event(&request.site_id).await?,
            false => None,
        };
        let query = Arc::new(request.resolve(query::time::now_ms(), first)?);
        let answer = engine::run(&*store, Arc::clone(&query)).await?;
        Ok::<_, ApiError>((answer, query))
    })
    .await
    .map_err(|_| StoreError::Timeout(state.stats_timeout))??;
    let (answer, query) = answer;
    if wants_csv(&headers) {
        let csv = [(header::CONTENT_TYPE, "text/csv; charset=utf-8")];
        return Ok((csv, answer.to_csv(&query)).into_response());
    }
    Ok(Json(answer.to_json(&query)).into_response())
}
