//! `GET /health` (the process runs) and `GET /ready` (its backends answer).

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::AppState;
use super::error::RETRY_AFTER_SECS;

const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

pub async fn health() -> Json<Value> {
    Json(json!({"success": true, "status": "ok"}))
}

pub async fn ready(State(state): State<AppState>) -> Response {
    let (queue, store) = tokio::join!(
        tokio::time::timeout(CHECK_TIMEOUT, state.queue.check()),
        tokio::time::timeout(CHECK_TIMEOUT, state.store.check()),
    );
    let queue_ok = matches!(queue, Ok(Ok(())));
    let store_ok = matches!(store, Ok(Ok(())));
    let status = |ok: bool| if ok { "ok" } else { "unavailable" };
    let detail = json!({
        "queue": {"backend": state.queue.kind(), "status": status(queue_ok)},
        "store": {"backend": state.store.kind(), "status": status(store_ok)},
    });
    if queue_ok && store_ok {
        (
            StatusCode::OK,
            Json(json!({"success": true, "checks": detail})),
        )
            .into_response()
    } else {
        let down: Vec<String> = [
            (queue_ok, state.queue.kind()),
            (store_ok, state.store.kind()),
        ]
        .into_iter()
        .filter(|(ok, _)| !ok)
        .map(|(_, kind)| format!("{kind} does not answer"))
        .collect();
        let body = json!({
            "success": false,
            "error": {"code": "not_ready", "message": down.join("; ")},
            "checks": detail,
        });
        (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, RETRY_AFTER_SECS.to_string())],
            Json(body),
        )
            .into_response()
    }
}
