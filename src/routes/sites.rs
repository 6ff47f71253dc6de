//! Listings the dashboard needs beside the query API, public like it:
//! - `GET /api/sites`: the sites with events that the viewer may read;
//! - `GET /api/sites/{site_id}/properties[?event=NAME]`: the property keys
//!   a site's events carry (of one event name, when given).
//!
//! Same access rules as the queries: with read tokens configured, a token
//! is needed, and a token limited to some sites sees only those.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use serde_json::{Value, json};

use super::{ApiError, AppState};
use crate::event::{EventName, SiteId};
use crate::store::StoreError;

/// Most sites one listing names.
pub const MAX_SITES: usize = 1_000;

pub async fn get_sites(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let _slot = state.limits.admit()?;
    let viewer = super::stats::reader(&state, &headers)?;
    let store = Arc::clone(&state.store);
    let mut ids: std::collections::BTreeSet<String> = bounded(&state, store.sites(MAX_SITES))
        .await?
        .into_iter()
        .collect();
    // Registered sites too, with or without events yet.
    ids.extend(
        viewer
            .registry
            .sites()
            .into_iter()
            .map(|s| s.site_id.as_str().to_owned()),
    );
    let sites: Vec<Value> = ids
        .into_iter()
        .filter(|s| viewer.may_read(s).is_ok())
        .take(MAX_SITES)
        .map(|s| listing(&viewer.registry, &s))
        .collect();
    Ok(Json(json!({"sites": sites})))
}

pub async fn get_properties(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(site): Path<String>,
    params: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let _slot = state.limits.admit()?;
    let viewer = super::stats::reader(&state, &headers)?;
    let site = SiteId::parse(&site)
        .map_err(|e| ApiError::bad_request("invalid_site_id", e.message).with_field("site_id"))?;
    viewer.may_read(&site)?;
    let Query(params) = params
        .map_err(|_| ApiError::bad_request("invalid_query", "the query string is malformed"))?;
    if let Some(unknown) = params.keys().find(|k| k.as_str() != "event") {
        return Err(ApiError::bad_request(
            "unknown_parameter",
            format!("unknown parameter `{}`", unknown.escape_debug()),
        ));
    }
    let event = match params.get("event") {
        None => None,
        Some(name) => Some(
            // Plausible's name for a pageview, as in query filters.
            EventName::parse(match name.as_str() {
                crate::query::PLAUSIBLE_PAGEVIEW => crate::query::PAGEVIEW,
                other => other,
            })
            .map_err(|e| ApiError::bad_request("invalid_event", e.message).with_field("event"))?,
        ),
    };
    let store = Arc::clone(&state.store);
    let keys = bounded(
        &state,
        store.property_keys(site.as_str(), event.as_ref().map(EventName::as_str)),
    )
    .await?;
    Ok(Json(json!({"site_id": site.as_str(), "properties": keys})))
}

/// What a reader sees of a site: its id, and from the registry its time
/// zone, whether it is public, and its goals (not its hostnames and
/// addresses: those are the owner's).
fn listing(registry: &crate::sites::Snapshot, site: &str) -> Value {
    match registry.site(site) {
        None => json!({"site_id": site, "timezone": null, "public": false, "goals": []}),
        Some(c) => json!({
            "site_id": site,
            "timezone": c.settings.timezone,
            "public": c.settings.public,
            "goals": c.settings.goals.iter().map(|g| {
                let mut v = serde_json::to_value(g).unwrap_or_else(|_| json!({}));
                if let Value::Object(m) = &mut v {
                    m.insert("name".into(), g.name().into());
                }
                v
            }).collect::<Vec<_>>(),
        }),
    }
}

/// A store read under the query time limit.
async fn bounded<T>(
    state: &AppState,
    read: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, ApiError> {
    let bound = state.stats_timeout + super::stats::STATS_TIMEOUT_SLACK;
    Ok(tokio::time::timeout(bound, read)
        .await
        .map_err(|_| StoreError::Timeout(state.stats_timeout))??)
}
