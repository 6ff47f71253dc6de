//! HTTP routes and handlers.
//!
//! - `POST /event`, `POST /events`: [`ingest`]
//! - `GET /stats`: [`stats`]
//! - `GET /health`, `GET /ready`: [`health`]

pub mod error;
pub mod health;
pub mod ingest;
pub mod stats;

use std::sync::Arc;

use axum::Router;
use axum::routing::{get, post};
use tower_http::trace::TraceLayer;

pub use error::ApiError;

use crate::queue::Queue;
use crate::store::Store;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub queue: Arc<dyn Queue>,
    pub store: Arc<dyn Store>,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/event", post(ingest::post_event))
        .route("/events", post(ingest::post_events))
        .route("/stats", get(stats::get_stats))
        .route("/health", get(health::health))
        .route("/ready", get(health::ready))
        .fallback(|| async { ApiError::not_found() })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}
