//! The dashboard: `GET /` (the sites the viewer may read) and
//! `GET /dashboard/{site_id}`, one page served from the binary with its
//! assets (`assets/dashboard/`, embedded at build time: nothing is fetched
//! from elsewhere, so it works offline). The page reads everything through
//! the public API, which [`super::sites`] completes with the listings it
//! needs.
//!
//! Under a path prefix (`BASE_PATH`, for a reverse proxy that mounts
//! evtrack at `/analytics/`), every route moves under it and the page is
//! told its prefix.

use std::fmt;
use std::str::FromStr;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::{ApiError, AppState};

const INDEX: &str = include_str!("../../assets/dashboard/index.html");
const APP_JS: &[u8] = include_bytes!("../../assets/dashboard/app.js");
const APP_CSS: &[u8] = include_bytes!("../../assets/dashboard/app.css");
const FAVICON: &[u8] = include_bytes!("../../assets/dashboard/favicon.svg");

/// The page's own rules: its scripts, styles and API calls come from
/// evtrack only, and no other site may frame it.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// A path prefix every route is served under: empty, or `/` followed by
/// path segments of letters, digits and `-._~`, without a trailing `/`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BasePath(String);

impl FromStr for BasePath {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim().trim_end_matches('/');
        if s.is_empty() {
            return Ok(Self::default());
        }
        let segments_ok = s.strip_prefix('/').is_some_and(|rest| {
            rest.split('/').all(|seg| {
                !seg.is_empty()
                    && seg != "."
                    && seg != ".."
                    && seg
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-._~".contains(c))
            })
        });
        if !segments_ok || s.len() > 200 {
            return Err(format!(
                "`{}` is not a path prefix like /analytics (segments of letters, digits and -._~)",
                s.escape_debug()
            ));
        }
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Display for BasePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl BasePath {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The page, with its prefix and version filled in. The prefix is checked
/// ([`BasePath`]) to hold no character HTML would read differently.
pub fn index_html(base: &BasePath) -> String {
    INDEX
        .replace("{{BASE}}", base.as_str())
        .replace("{{VERSION}}", env!("CARGO_PKG_VERSION"))
}

fn page(state: &AppState, headers: &HeaderMap) -> Response {
    let body = index_html(&state.base_path);
    let own = [
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        ),
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ),
    ];
    respond(
        body.into_bytes(),
        "text/html; charset=utf-8",
        "no-cache",
        &own,
        headers,
    )
}

/// `GET /`: the list of sites (the page asks `GET /api/sites`).
pub async fn get_home(State(state): State<AppState>, headers: HeaderMap) -> Response {
    page(&state, &headers)
}

/// `GET /dashboard/{site_id}`: one site's dashboard. The site is not looked
/// up here (only its id checked): the page's queries say whether the viewer
/// may read it.
pub async fn get_dashboard(
    State(state): State<AppState>,
    Path(site): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    crate::event::SiteId::parse(site)
        .map_err(|e| ApiError::bad_request("invalid_site_id", e.message).with_field("site_id"))?;
    Ok(page(&state, &headers))
}

/// `GET /assets/{name}`: the page's script, style sheet and icon.
pub async fn get_asset(Path(name): Path<String>, headers: HeaderMap) -> Result<Response, ApiError> {
    let (body, kind): (&'static [u8], &'static str) = match name.as_str() {
        "app.js" => (APP_JS, "text/javascript; charset=utf-8"),
        "app.css" => (APP_CSS, "text/css; charset=utf-8"),
        "favicon.svg" => (FAVICON, "image/svg+xml"),
        _ => return Err(ApiError::not_found()),
    };
    Ok(asset(body, kind, &headers))
}

/// `GET /favicon.ico`, which browsers ask for by themselves.
pub async fn get_favicon(headers: HeaderMap) -> Response {
    asset(FAVICON, "image/svg+xml", &headers)
}

fn asset(body: &'static [u8], kind: &'static str, headers: &HeaderMap) -> Response {
    // The page names its assets with the version: a new binary's page asks
    // new URLs; within a version, a short cache.
    respond(body.to_vec(), kind, "public, max-age=300", &[], headers)
}

/// A body with its type, cache rule and ETag, or 304 when the client's
/// copy is current.
fn respond(
    body: Vec<u8>,
    kind: &'static str,
    cache: &'static str,
    own: &[(header::HeaderName, HeaderValue)],
    headers: &HeaderMap,
) -> Response {
    let etag = etag_of(&body);
    let etag_value =
        HeaderValue::from_str(&etag).unwrap_or_else(|_| HeaderValue::from_static("\"0\""));
    if super::script::is_current(headers, &etag) {
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, etag_value)]).into_response();
    }
    let mut out = HeaderMap::new();
    out.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    out.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    out.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    out.insert(header::ETAG, etag_value);
    for (name, value) in own {
        out.insert(name.clone(), value.clone());
    }
    (out, body).into_response()
}

/// A quoted hex prefix of the body's SHA-256 (an ETag made of hex digits
/// and quotes is always a valid header value).
fn etag_of(body: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(body);
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("\"{hex}\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_paths_are_checked_and_normalized() {
        assert_eq!("".parse::<BasePath>().unwrap().as_str(), "");
        assert_eq!("/".parse::<BasePath>().unwrap().as_str(), "");
        assert_eq!(
            "/analytics/".parse::<BasePath>().unwrap().as_str(),
            "/analytics"
        );
        assert_eq!("/a/b-c".parse::<BasePath>().unwrap().as_str(), "/a/b-c");
        for bad in [
            "analytics",
            "/a//b",
            "/a/../b",
            "/a b",
            "/a\"><script>",
            "/é",
        ] {
            assert!(bad.parse::<BasePath>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_page_names_its_prefix_everywhere() {
        let html = index_html(&"/analytics".parse().unwrap());
        assert!(!html.contains("{{"), "{html}");
        assert!(html.contains(r#"<meta name="evtrack-base" content="/analytics">"#));
        assert!(html.contains(r#"src="/analytics/assets/app.js"#));
    }
}
