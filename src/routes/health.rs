//! `GET /health` (the process runs, and its worker, if it has one, makes
//! progress) and `GET /ready` (its backends answer).

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::AppState;
use super::error::RETRY_AFTER_SECS;
use crate::worker::Liveness;

const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// 200 while the process runs; 503 `worker_stalled` when this process runs a
/// worker that has not completed a poll within `WORKER_STALL_MS` (it cannot
/// read the queue or store what it read), so that a supervisor restarts or
/// flags a process that looks alive but moves nothing.
pub fn health_of(liveness: Option<&Liveness>) -> Response {
    match liveness.and_then(Liveness::stalled_for) {
        None => Json(json!({"success": true, "status": "ok"})).into_response(),
        Some(since) => {
            let body = json!({
                "success": false,
                "status": "unhealthy",
                "error": {
                    "code": "worker_stalled",
                    "message": format!(
                        "the worker has not completed a poll for {} s (queue or store failing)",
                        since.as_secs()
                    ),
                },
            });
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::RETRY_AFTER, RETRY_AFTER_SECS.to_string())],
                Json(body),
            )
                .into_response()
        }
    }
}

pub async fn health(State(state): State<AppState>) -> Response {
    health_of(state.liveness.as_deref())
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
