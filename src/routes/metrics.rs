//! `GET /metrics` (Prometheus text format) and the middleware that times
//! every request by its matched route.

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::routing::get;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::AppState;
use crate::metrics::{HttpLabels, Metrics};
use crate::worker::Liveness;

const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What `evtrack worker` serves with `METRICS_PORT`: its own counters
/// (stored, duplicate, dead-lettered, retried, store write time) and a
/// liveness check. The queue depth gauges are read by `evtrack api`.
pub fn worker_router(metrics: Arc<Metrics>, liveness: Option<Arc<Liveness>>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(move || async move {
                (
                    StatusCode::OK,
                    [(header::CONTENT_TYPE, CONTENT_TYPE)],
                    metrics.encode(),
                )
            }),
        )
        .route(
            "/health",
            get(move || async move { super::health::health_of(liveness.as_deref()) }),
        )
        .fallback(|| async { super::ApiError::not_found() })
}

pub async fn get_metrics(State(state): State<AppState>) -> Response {
    // Read at scrape time. A queue that does not answer leaves the last
    // figures in place; `/ready` is where its outage shows.
    match state.queue.depth().await {
        Ok(depth) => {
            let m = &state.metrics;
            m.queue_depth.set(depth.events as i64);
            if let Some(bytes) = depth.bytes {
                m.queue_depth_bytes.set(bytes as i64);
            }
            m.queue_oldest_age
                .set(depth.oldest_age.map_or(0.0, |a| a.as_secs_f64()));
        }
        Err(e) => tracing::warn!(error = %e, "cannot read the queue depth for /metrics"),
    }
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        state.metrics.encode(),
    )
        .into_response()
}

/// The `method` label: the methods evtrack answers, and `other` for the rest.
/// HTTP lets a client invent any method token (`M0X`, `M1X`, …); each would
/// otherwise add a series that lives as long as the process.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        _ => "other",
    }
}

/// Observes each request's latency, labelled by method, matched route (or
/// `unmatched`) and status.
pub async fn track(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = method_label(request.method());
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_owned();
    let response = next.run(request).await;
    state
        .metrics
        .http_request_seconds
        .get_or_create(&HttpLabels {
            method: method.to_owned(),
            route,
            status: response.status().as_u16(),
        })
        .observe(started.elapsed().as_secs_f64());
    response
}
