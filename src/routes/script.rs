//! `GET /js/script.js`: evtrack's tracker, and `GET /js/script.<hash>.js`,
//! the same bytes under a name that changes with them.
//!
//! The plain name is cached for five minutes and revalidated by its ETag,
//! so a new release reaches every page within minutes; the versioned name
//! is cached for a year (its content never changes). What is served is
//! `assets/script.min.js`, made from the source `assets/script.js` by
//! `scripts/build-tracker.sh` (terser) and committed, so that building
//! evtrack needs no Node.js; gzipped when the browser accepts it (every
//! browser does).

use std::io::Write;
use std::sync::LazyLock;

use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sha2::Digest;

use super::ApiError;

/// The tracker as served, its gzipped form and its version.
pub struct Script {
    pub text: String,
    pub gzip: Vec<u8>,
    /// The first 10 hex digits of its SHA-256.
    pub hash: String,
}

/// The minified script's first line: a comment naming the SHA-256 of the
/// source it was made from (not served).
const MINIFIED: &str = include_str!("../../assets/script.min.js");

pub static SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    let text = MINIFIED
        .split_once('\n')
        .map_or(MINIFIED, |(_, rest)| rest)
        .trim_end()
        .to_owned();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    // Writing into a Vec cannot fail.
    let _ = gz.write_all(text.as_bytes());
    let gzip = gz.finish().unwrap_or_default();
    let digest = sha2::Sha256::digest(text.as_bytes());
    let hash = digest.iter().take(5).map(|b| format!("{b:02x}")).collect();
    Script { text, gzip, hash }
});

const SHORT: &str = "public, max-age=300";
const LONG: &str = "public, max-age=31536000, immutable";

fn serve(headers: &HeaderMap, cache: &'static str) -> Response {
    let script = &*SCRIPT;
    let etag = format!("\"{}\"", script.hash);
    let mut out = HeaderMap::new();
    out.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    if let Ok(v) = HeaderValue::from_str(&etag) {
        out.insert(header::ETAG, v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("/js/script.{}.js", script.hash)) {
        out.insert(header::CONTENT_LOCATION, v);
    }
    out.insert(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    // Any page may load it.
    out.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    if is_current(headers, &etag) {
        return (StatusCode::NOT_MODIFIED, out).into_response();
    }
    out.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/javascript; charset=utf-8"),
    );
    let gzip = headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|e| {
            let mut parts = e.split(';');
            let name = parts.next().unwrap_or_default().trim();
            let refused = parts.any(|p| p.replace(' ', "") == "q=0");
            name.eq_ignore_ascii_case("gzip") && !refused
        });
    if gzip {
        out.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        (out, script.gzip.clone()).into_response()
    } else {
        (out, script.text.clone()).into_response()
    }
}

/// Whether the client's `If-None-Match` names `etag` (or `*`): its copy is
/// current, and the answer is 304.
pub fn is_current(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"))
}

pub async fn get_script(headers: HeaderMap) -> Response {
    serve(&headers, SHORT)
}

/// `/js/<name>`: `script.<hash>.js` of the current version; anything else
/// is not found (an old version's name is not served as the new one).
pub async fn get_versioned(Path(name): Path<String>, headers: HeaderMap) -> Response {
    let wanted = format!("script.{}.js", SCRIPT.hash);
    if name == wanted {
        serve(&headers, LONG)
    } else {
        ApiError::not_found().into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_served_script_is_made_from_the_source_and_under_1_kb_gzipped() {
        let source = include_str!("../../assets/script.js");
        let sum: String = sha2::Sha256::digest(source.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let first = MINIFIED.lines().next().unwrap_or_default();
        assert!(
            first.contains(&sum),
            "assets/script.min.js is older than assets/script.js: run scripts/build-tracker.sh"
        );
        let s = &*SCRIPT;
        assert!(s.text.contains("sendBeacon") && s.text.contains("evtrack_ignore"));
        assert!(!s.text.contains("sha256"), "the header line is not served");
        assert!(s.gzip.len() <= 1024, "{} bytes gzipped", s.gzip.len());
        println!("tracker: {} bytes, {} gzipped", s.text.len(), s.gzip.len());
        assert_eq!(s.hash.len(), 10);
    }
}
