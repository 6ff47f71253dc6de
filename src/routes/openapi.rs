//! `GET /openapi.json`: the API described in OpenAPI 3.1.
//!
//! The document is kept by hand next to the handlers (`openapi.json`): the
//! handlers validate JSON themselves, so there are no typed request structs
//! to derive it from. What keeps it true is the test suite: schemathesis
//! (`tests/api/openapi.rs`) sends generated valid and invalid requests and
//! checks every answer against it — status codes, headers, bodies.

use axum::http::header;
use axum::response::IntoResponse;

/// The document, as served.
pub const DOCUMENT: &str = include_str!("openapi.json");

pub async fn get_openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], DOCUMENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_is_json_of_this_version() {
        let doc: serde_json::Value = serde_json::from_str(DOCUMENT).expect("valid JSON");
        assert_eq!(doc["openapi"], "3.1.0");
        assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
        let paths = doc["paths"].as_object().expect("paths");
        for path in [
            "/event",
            "/events",
            "/stats",
            "/api/v2/query",
            "/health",
            "/ready",
            "/metrics",
            "/openapi.json",
        ] {
            assert!(paths.contains_key(path), "{path} is not documented");
        }
    }
}
