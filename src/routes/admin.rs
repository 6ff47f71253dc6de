//! The site registry on the admin API ([`crate::sites`]):
//! - `GET`, `PUT`, `DELETE /api/sites/{site_id}/settings`: a site's time
//!   zone, public flag, hostnames, excluded addresses and goals;
//! - `GET /api/tokens`, `POST /api/tokens`, `DELETE /api/tokens/{id}`: read
//!   tokens made at run time, with share links to the dashboard.
//!
//! The rules of the other data owner's controls (`ADMIN_TOKENS`, see
//! [`super::export`]): an admin token limited to some sites manages those
//! sites, and the tokens that read only them. A change applies in this
//! process at once, in the others within [`crate::sites::REFRESH_EVERY`].

use std::collections::HashSet;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use serde_json::{Value, json};

use super::{ApiError, AppState};
use crate::event::SiteId;
use crate::sites::{MAX_SITES, MAX_TOKENS, SettingsError, SiteSettings, TokenRecord};

/// The largest settings or token body: a hundred goals of 200 characters
/// fit.
pub const MAX_ADMIN_BYTES: usize = 64 * 1024;

impl From<SettingsError> for ApiError {
    fn from(e: SettingsError) -> Self {
        let error = ApiError::bad_request("invalid_settings", e.message);
        match e.field.is_empty() {
            true => error,
            false => error.with_field(e.field),
        }
    }
}

fn scope(state: &AppState, headers: &HeaderMap) -> Result<Option<HashSet<String>>, ApiError> {
    Ok(state.access.admin_scope(
        headers
            .get(header::AUTHORIZATION)
            .map(HeaderValue::as_bytes),
    )?)
}

fn covers(scope: &Option<HashSet<String>>, site: &str) -> bool {
    scope.as_ref().is_none_or(|s| s.contains(site))
}

fn forbidden() -> ApiError {
    crate::access::AdminDenied::Token(crate::access::Denied::Forbidden).into()
}

fn body_json(body: Result<Bytes, BytesRejection>) -> Result<Value, ApiError> {
    let body = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the body is at most {MAX_ADMIN_BYTES} bytes"),
        ),
        _ => ApiError::bad_request("invalid_body", "the body could not be read"),
    })?;
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("the body is not JSON: {e}")))
}

/// Reads the registry again after a change, so that this process applies
/// it at once; the change is stored either way.
async fn refresh(state: &AppState) {
    if let Err(e) = state.registry.refresh(&*state.store).await {
        tracing::warn!(error = %e, "could not read the site registry after a change");
    }
}

fn site_of(site: &str) -> Result<SiteId, ApiError> {
    SiteId::parse(site)
        .map_err(|e| ApiError::bad_request("invalid_site_id", e.message).with_field("site_id"))
}

fn not_registered() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "site_not_registered",
        "this site has no settings: it keeps the defaults (UTC, private, any hostname, no goals)",
    )
}

pub async fn get_settings(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(site): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let _slot = state.limits.admit()?;
    let site = site_of(&site)?;
    super::export::admin(&state, &headers, &site)?;
    let registry = state.registry.snapshot();
    let config = registry.site(&site).ok_or_else(not_registered)?;
    Ok(Json(config.to_json()))
}

pub async fn put_settings(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(site): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let _slot = state.limits.admit()?;
    let site = site_of(&site)?;
    super::export::admin(&state, &headers, &site)?;
    let settings = SiteSettings::parse(&body_json(body)?)?;
    let registry = state.registry.snapshot();
    if registry.site(&site).is_none() && registry.sites().len() >= MAX_SITES {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "too_many_sites",
            format!("the registry holds at most {MAX_SITES} sites"),
        ));
    }
    let value = serde_json::to_value(&settings).unwrap_or_else(|_| json!({}));
    state.store.put_site(site.as_str(), &value).await?;
    refresh(&state).await;
    tracing::info!(site = site.as_str(), "site settings changed");
    Ok(Json(
        crate::sites::SiteConfig::new(site, settings).to_json(),
    ))
}

pub async fn delete_settings(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(site): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let _slot = state.limits.admit()?;
    let site = site_of(&site)?;
    super::export::admin(&state, &headers, &site)?;
    if !state.store.delete_site(site.as_str()).await? {
        return Err(not_registered());
    }
    refresh(&state).await;
    tracing::info!(site = site.as_str(), "site settings removed");
    Ok(Json(json!({"site_id": site.as_str(), "deleted": true})))
}

/// The records of the run-time tokens, read from the store (not the
/// snapshot: a listing shows what is there now).
async fn records(state: &AppState) -> Result<Vec<TokenRecord>, ApiError> {
    Ok(state.store.registry().await?.tokens)
}

pub async fn get_tokens(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let _slot = state.limits.admit()?;
    let scope = scope(&state, &headers)?;
    let tokens: Vec<Value> = records(&state)
        .await?
        .iter()
        .filter(|t| t.sites.iter().all(|s| covers(&scope, s)))
        .map(TokenRecord::to_json)
        .collect();
    Ok(Json(json!({"tokens": tokens})))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NewToken {
    sites: Vec<String>,
    #[serde(default)]
    label: Option<String>,
}

pub async fn post_token(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let _slot = state.limits.admit()?;
    let scope = scope(&state, &headers)?;
    let request: NewToken = serde_json::from_value(body_json(body)?).map_err(|e| {
        ApiError::bad_request(
            "invalid_json",
            format!("the body must be {{\"sites\": [\"…\"], \"label\": \"…\"}}: {e}"),
        )
    })?;
    let sites = request
        .sites
        .iter()
        .map(|s| site_of(s))
        .collect::<Result<Vec<_>, _>>()?;
    if !sites.iter().all(|s| covers(&scope, s)) {
        return Err(forbidden());
    }
    if records(&state).await?.len() >= MAX_TOKENS {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "too_many_tokens",
            format!("at most {MAX_TOKENS} read tokens; revoke some first"),
        ));
    }
    let (record, token) = TokenRecord::create(sites, request.label, crate::query::time::now_ms())?;
    state.store.put_token(&record).await?;
    refresh(&state).await;
    tracing::info!(id = %record.id, "read token created");
    let mut body = record.to_json();
    body["token"] = json!(token);
    body["share_links"] = share_links(&state, &record, &token);
    Ok((StatusCode::CREATED, Json(body)))
}

/// The dashboard of each site of the token, with the token in the link:
/// whoever opens it reads that site, and nothing else.
fn share_links(state: &AppState, record: &TokenRecord, token: &str) -> Value {
    let links: serde_json::Map<String, Value> = record
        .sites
        .iter()
        .map(|s| {
            let path = crate::sites::share_path(state.base_path.as_str(), s, token);
            (s.clone(), json!(path))
        })
        .collect();
    Value::Object(links)
}

pub async fn delete_token(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let _slot = state.limits.admit()?;
    let scope = scope(&state, &headers)?;
    let missing = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "token_not_found",
            "no read token has this id",
        )
    };
    let record = records(&state)
        .await?
        .into_iter()
        .find(|t| t.id == id)
        .ok_or_else(missing)?;
    if !record.sites.iter().all(|s| covers(&scope, s)) {
        return Err(forbidden());
    }
    if !state.store.revoke_token(&record.id).await? {
        return Err(missing());
    }
    refresh(&state).await;
    tracing::info!(id = %record.id, "read token revoked");
    Ok(Json(json!({"id": record.id, "revoked": true})))
}
