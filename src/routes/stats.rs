//! `GET /stats?site_id=…&date=…&event_type=…&limit=…`

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, header};
use chrono::{NaiveDate, Utc};
use serde_json::{Value, json};

use super::{ApiError, AppState};
use crate::access::Reader;
use crate::event::{EventName, FieldError, SiteId};
use crate::sites::Snapshot;
use crate::stats::{DEFAULT_EVENT_TYPE, DEFAULT_LIMIT, MAX_LIMIT, StatsQuery};
use crate::store::StoreError;

/// How much longer than `STATS_TIMEOUT_MS` a stats request may wait for a
/// store that does not stop its query itself (a server that went silent).
pub(crate) const STATS_TIMEOUT_SLACK: std::time::Duration = std::time::Duration::from_millis(500);

/// Reads and checks the query parameters; `today` is the default date.
pub fn parse_query(
    params: &HashMap<String, String>,
    today: NaiveDate,
) -> Result<StatsQuery, ApiError> {
    let missing = |p: &str| {
        ApiError::bad_request("missing_parameter", format!("`{p}` is required")).with_field(p)
    };
    let invalid = |p: &str, m: String| ApiError::bad_request("invalid_parameter", m).with_field(p);
    // The same rules as the events' own fields; only the error code says
    // that a query parameter was wrong.
    let reword = |p: &str, e: FieldError| invalid(p, e.message);
    let site_id = match params.get("site_id") {
        None => return Err(missing("site_id")),
        Some(v) if v.is_empty() => return Err(missing("site_id")),
        Some(v) => SiteId::parse(v.as_str()).map_err(|e| reword("site_id", e))?,
    };
    let event_type = EventName::parse(
        params
            .get("event_type")
            .map_or(DEFAULT_EVENT_TYPE, String::as_str),
    )
    .map_err(|e| reword("event_type", e))?;
    let date = match params.get("date") {
        None => today,
        Some(v) => {
            let parsed = (v.len() == 10)
                .then(|| NaiveDate::parse_from_str(v, "%Y-%m-%d").ok())
                .flatten();
            parsed.ok_or_else(|| {
                invalid(
                    "date",
                    "`date` must be a calendar date as YYYY-MM-DD".into(),
                )
            })?
        }
    };
    let limit = match params.get("limit") {
        None => DEFAULT_LIMIT,
        Some(v) => v
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| {
                invalid(
                    "limit",
                    format!("`limit` must be a whole number from 1 to {MAX_LIMIT}"),
                )
            })?,
    };
    Ok(StatsQuery {
        site_id,
        date,
        event_type,
        limit,
    })
}

/// Who asks, for the read endpoints (`GET /stats`, `POST /api/v2/query`,
/// the listings and Stats API v1), with the registry as it was when they
/// asked. Checked first: without a valid token nothing about the request,
/// not even whether its parameters are right, is answered (unless some
/// site is public: then a request without a token goes on to the site
/// check).
pub(crate) struct Viewer {
    pub reader: Reader,
    pub registry: Arc<Snapshot>,
}

impl Viewer {
    /// May they read `site`? 401 without a token (and the site is not
    /// public), 403 with one that does not cover it.
    pub fn may_read(&self, site: &str) -> Result<(), ApiError> {
        Ok(self.reader.may_read(site, &self.registry)?)
    }
}

pub(crate) fn reader(state: &AppState, headers: &HeaderMap) -> Result<Viewer, ApiError> {
    let registry = state.registry.snapshot();
    let reader = state.access.reader(
        headers
            .get(header::AUTHORIZATION)
            .map(HeaderValue::as_bytes),
        &registry,
    )?;
    Ok(Viewer { reader, registry })
}

pub async fn get_stats(
    State(state): State<AppState>,
    headers: HeaderMap,
    params: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let _slot = state.limits.admit()?;
    let viewer = reader(&state, &headers)?;
    let Query(params) = params
        .map_err(|_| ApiError::bad_request("invalid_query", "the query string is malformed"))?;
    let query = parse_query(&params, Utc::now().date_naive())?;
    viewer.may_read(&query.site_id)?;
    // The store stops its own query at the limit (SQLite interrupt, MongoDB
    // maxTimeMS); this bound, a little later, also covers a backend that
    // does not answer at all.
    let bound = state.stats_timeout + STATS_TIMEOUT_SLACK;
    let stats = tokio::time::timeout(bound, crate::stats::compute(&*state.store, &query))
        .await
        .map_err(|_| StoreError::Timeout(state.stats_timeout))??;
    Ok(Json(json!({"success": true, "stats": stats})))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> Result<StatsQuery, ApiError> {
        let params = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        parse_query(&params, NaiveDate::from_ymd_opt(2026, 1, 2).unwrap())
    }

    #[test]
    fn defaults_apply() {
        let s = q(&[("site_id", "s")]).unwrap();
        assert_eq!(s.date.to_string(), "2026-01-02");
        assert_eq!((s.event_type.as_str(), s.limit), ("page_view", 10));
    }

    #[test]
    fn bad_parameters_are_named() {
        for (pairs, field) in [
            (vec![], "site_id"),
            (vec![("site_id", "")], "site_id"),
            (vec![("site_id", "s"), ("date", "2025-13-01")], "date"),
            (vec![("site_id", "s"), ("date", "2025-1-1")], "date"),
            (vec![("site_id", "s"), ("date", "today")], "date"),
            (vec![("site_id", "s"), ("limit", "0")], "limit"),
            (vec![("site_id", "s"), ("limit", "101")], "limit"),
            (vec![("site_id", "s"), ("limit", "ten")], "limit"),
            (vec![("site_id", "s"), ("event_type", "")], "event_type"),
        ] {
            let e = q(&pairs).expect_err(&format!("{pairs:?}"));
            assert_eq!(e.field.as_deref(), Some(field), "{pairs:?}");
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
        }
        let s = q(&[("site_id", "s"), ("limit", "100"), ("date", "2024-02-29")]).unwrap();
        assert_eq!(s.limit, 100);
    }
}
