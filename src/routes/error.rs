//! One error type for every handler, one JSON shape for every error:
//! `{"success": false, "error": {"code", "message", "field"?}}`.
//!
//! Client errors (4xx) say what to fix. Server-side trouble (503) says what
//! is unavailable and when to retry; internal details go to the log, never to
//! the client.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::access::Denied;
use crate::event::FieldError;
use crate::queue::QueueError;
use crate::store::StoreError;

/// Seconds a client should wait before retrying a 503.
pub const RETRY_AFTER_SECS: u64 = 1;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            field: None,
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    pub fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", "no such route")
    }

    /// Too many requests or body bytes in flight across all connections.
    pub fn overloaded() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "the service is answering as many requests as it can; retry later",
        )
    }

    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "method not allowed on this route",
        )
    }

    /// The `error` object alone, as used inside batch answers.
    pub fn body(&self) -> serde_json::Value {
        let mut error = json!({"code": self.code, "message": self.message});
        if let Some(field) = &self.field {
            error["field"] = json!(field);
        }
        error
    }
}

impl From<FieldError> for ApiError {
    fn from(e: FieldError) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: e.code,
            message: e.message,
            field: e.field,
        }
    }
}

impl From<Denied> for ApiError {
    fn from(d: Denied) -> Self {
        match d {
            Denied::Missing => Self::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "stats need a token: send Authorization: Bearer <token>",
            ),
            Denied::Invalid => Self::new(
                StatusCode::UNAUTHORIZED,
                "invalid_token",
                "the bearer token is not valid",
            ),
            Denied::Forbidden => Self::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "this token may not read this site's stats",
            ),
        }
    }
}

impl From<QueueError> for ApiError {
    fn from(e: QueueError) -> Self {
        match e {
            QueueError::Full => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "queue_full",
                "too many events are waiting to be stored; retry later",
            ),
            QueueError::Unavailable(detail) => {
                tracing::warn!(%detail, "queue unavailable");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "queue_unavailable",
                    "the queue is unavailable; retry later",
                )
            }
            QueueError::StoreUnavailable(detail) => {
                tracing::warn!(%detail, "store unavailable");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    "the store is unavailable; retry later",
                )
            }
            QueueError::Closed => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "the service is shutting down; retry later",
            ),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        tracing::warn!(error = %e, "store error");
        match e {
            StoreError::Timeout(limit) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "query_timeout",
                format!(
                    "the query took longer than {} ms and was stopped; retry later",
                    limit.as_millis()
                ),
            ),
            StoreError::Unavailable(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "the store is unavailable; retry later",
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let retry = self.status == StatusCode::SERVICE_UNAVAILABLE;
        let mut response = (
            self.status,
            Json(json!({"success": false, "error": self.body()})),
        )
            .into_response();
        if retry {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        // RFC 6750: what kind of credentials, and what was wrong with them.
        let challenge = match self.code {
            "unauthorized" => Some(r#"Bearer realm="evtrack""#),
            "invalid_token" => Some(r#"Bearer realm="evtrack", error="invalid_token""#),
            "forbidden" => Some(r#"Bearer realm="evtrack", error="insufficient_scope""#),
            _ => None,
        };
        if let Some(challenge) = challenge {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
        }
        response
    }
}
