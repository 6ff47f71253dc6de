//! HTTP routes and handlers.
//!
//! - `POST /event`, `POST /events`: [`ingest`]
//! - `POST /api/event` (Plausible's Events API): [`browser`]
//! - `POST /api/v2/query`: [`query`]
//! - `GET /stats`: [`stats`]
//! - `GET /health`, `GET /ready`: [`health`]
//! - `GET /metrics`: [`metrics`]
//! - `GET /openapi.json`: [`openapi`]
//! - `GET /js/script.js`: the tracker, [`script`]
//! - `GET /`, `GET /dashboard/{site_id}`, `GET /assets/{name}`: the
//!   dashboard, [`dashboard`]
//! - `GET /api/sites`, `GET /api/sites/{site_id}/properties`: listings the
//!   dashboard needs, [`sites`]
//! - `GET /api/sites/{site_id}/events`, `POST /api/sites/{site_id}/erase`:
//!   raw export and erasure, [`export`]
//! - `/api/sites/{site_id}/settings`, `/api/tokens`: the site registry and
//!   run-time read tokens, [`admin`]
//! - `/api/v1/stats/…`: Plausible's Stats API v1, [`v1`]
//!
//! All of them under `BASE_PATH` when it is set.

pub mod admin;
pub mod browser;
pub mod dashboard;
pub mod error;
pub mod export;
pub mod health;
pub mod ingest;
pub mod metrics;
pub mod openapi;
pub mod query;
pub mod script;
pub mod sites;
pub mod stats;
pub mod v1;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderValue, Method, header};
use axum::routing::{MethodRouter, delete, get, post};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower_http::cors::{AllowOrigin, Any, CorsLayer};
use tower_http::trace::{DefaultOnFailure, TraceLayer};

pub use error::ApiError;

use crate::access::Access;
use crate::metrics::Metrics;
use crate::queue::Queue;
use crate::ratelimit::ClientLimit;
use crate::store::Store;
use crate::worker::Liveness;

/// What every handler can reach: one shared [`StateParts`] behind an `Arc`.
///
/// axum clones the state for every request, several times (the handler
/// service, each middleware); one reference count instead of a dozen was
/// measurable on the ingest path (profile in `bench/README.md`).
#[derive(Clone)]
pub struct AppState(Arc<StateParts>);

impl AppState {
    pub fn new(parts: StateParts) -> Self {
        Self(Arc::new(parts))
    }
}

impl std::ops::Deref for AppState {
    type Target = StateParts;
    fn deref(&self) -> &StateParts {
        &self.0
    }
}

/// The parts of [`AppState`].
pub struct StateParts {
    pub queue: Arc<dyn Queue>,
    pub store: Arc<dyn Store>,
    /// Site settings and run-time read tokens ([`crate::sites`]).
    pub registry: Arc<crate::sites::Registry>,
    pub access: Arc<Access>,
    pub metrics: Arc<Metrics>,
    /// `RATE_LIMIT` on ingestion; `None`: no limit.
    pub limit: Option<Arc<ClientLimit>>,
    /// The worker of this process, when it runs one (for `/health`).
    pub liveness: Option<Arc<Liveness>>,
    /// Requests and body bytes in flight across all connections.
    pub limits: Arc<InFlight>,
    /// How long a stats query may take (`STATS_TIMEOUT_MS`).
    pub stats_timeout: Duration,
    /// Who a request's client is (`TRUSTED_PROXIES`).
    pub proxies: Arc<crate::ratelimit::TrustedProxies>,
    /// Parsed User-Agents.
    pub agents: Arc<crate::enrich::ua::Agents>,
    /// Cookieless visitor ids.
    pub visitors: Arc<crate::visitor::VisitorIds>,
    /// The prefix every route is served under (`BASE_PATH`).
    pub base_path: Arc<dashboard::BasePath>,
}

/// Global bounds on what clients hold at once, whatever the number of
/// connections: requests being answered (`MAX_REQUESTS_IN_FLIGHT`) and
/// ingest body bytes being read or parsed (`MAX_BODY_BYTES_IN_FLIGHT`).
/// Beyond either, a request is answered 503 `overloaded` at once, before it
/// costs anything more.
pub struct InFlight {
    requests: Arc<Semaphore>,
    body_bytes: Arc<Semaphore>,
}

impl InFlight {
    pub fn new(requests: usize, body_bytes: usize) -> Self {
        Self {
            requests: Arc::new(Semaphore::new(requests.min(Semaphore::MAX_PERMITS))),
            body_bytes: Arc::new(Semaphore::new(body_bytes.min(Semaphore::MAX_PERMITS))),
        }
    }

    /// Counts a request against `MAX_REQUESTS_IN_FLIGHT` until the permit is
    /// dropped; 503 `overloaded` beyond it. Taken first thing by the ingest
    /// and stats handlers (a handler call, not a middleware: a middleware
    /// costs every request a boxed future, measurable on the ingest path).
    pub fn admit(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        Arc::clone(&self.requests)
            .try_acquire_owned()
            .map_err(|_| ApiError::overloaded())
    }

    /// Reserves room for a body of at most `bytes`, held until dropped.
    pub fn reserve_body(&self, bytes: usize) -> Result<OwnedSemaphorePermit, ApiError> {
        let n = u32::try_from(bytes).map_err(|_| ApiError::overloaded())?;
        Arc::clone(&self.body_bytes)
            .try_acquire_many_owned(n)
            .map_err(|_| ApiError::overloaded())
    }
}

impl Default for InFlight {
    fn default() -> Self {
        Self::new(
            crate::config::DEFAULT_MAX_REQUESTS_IN_FLIGHT,
            crate::config::DEFAULT_MAX_BODY_BYTES_IN_FLIGHT,
        )
    }
}

/// How long a browser may cache a preflight answer.
const PREFLIGHT_MAX_AGE: Duration = Duration::from_secs(24 * 60 * 60);

/// Which origins' pages may read stats from a browser: none (the default),
/// some, or `*` for any. Checked at start-up.
pub fn stats_cors(origins: &[String]) -> Result<Option<AllowOrigin>, String> {
    let origins: Vec<&str> = origins
        .iter()
        .map(|o| o.trim())
        .filter(|o| !o.is_empty())
        .collect();
    if origins.is_empty() {
        return Ok(None);
    }
    if origins.contains(&"*") {
        return Ok(Some(AllowOrigin::any()));
    }
    let values = origins
        .iter()
        .map(|o| {
            let ok = (o.starts_with("https://") || o.starts_with("http://"))
                && !o.trim_end_matches('/').ends_with(':')
                && !o.contains(char::is_whitespace);
            ok.then(|| HeaderValue::from_str(o.trim_end_matches('/')).ok())
                .flatten()
                .ok_or_else(|| format!("`{o}` is not an origin like https://example.com"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some(AllowOrigin::list(values)))
}

/// `stats_origins`: see [`stats_cors`].
pub fn router(state: AppState, stats_origins: Option<AllowOrigin>) -> Router {
    // Pages on any site send events from browsers (`fetch` with a JSON body
    // needs a preflight; `sendBeacon` with text/plain does not). No
    // credentials: events carry their own identifiers, never cookies.
    let ingest_cors = CorsLayer::new()
        .allow_origin(Any)
        .allow_methods([Method::POST])
        .allow_headers([header::CONTENT_TYPE])
        .max_age(PREFLIGHT_MAX_AGE);
    // The CORS layer must see every method (a preflight is an OPTIONS
    // request), so each method router gets its 405 fallback before the layer;
    // the router-wide fallback would otherwise replace it unlayered.
    let with_cors = |route: MethodRouter<AppState>, cors: CorsLayer| {
        route
            .fallback(|| async { ApiError::method_not_allowed() })
            .layer(cors)
    };
    // The rate limit sits inside CORS: a preflight costs no allowance, and a
    // 429 carries the CORS headers a page needs to read it.
    // Without RATE_LIMIT the layer is left out, not just idle: it would
    // cost every ingest request a boxed future.
    let limited = |route: MethodRouter<AppState>| match state.limit {
        Some(_) => route.layer(axum::middleware::from_fn_with_state(
            state.clone(),
            ingest::rate_limit,
        )),
        None => route,
    };
    let ingest = Router::new()
        .route(
            "/event",
            with_cors(limited(post(ingest::post_event)), ingest_cors.clone()),
        )
        .route(
            "/events",
            with_cors(limited(post(ingest::post_events)), ingest_cors.clone()),
        )
        .route(
            "/api/event",
            with_cors(limited(post(browser::post_api_event)), ingest_cors),
        );
    // Stats stay closed to other origins unless configured.
    let stats_cors_layer = stats_origins.map(|origins| {
        CorsLayer::new()
            .allow_origin(origins)
            .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE])
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
            .max_age(PREFLIGHT_MAX_AGE)
    });
    let stats_route = match stats_cors_layer.clone() {
        None => get(stats::get_stats),
        Some(cors) => with_cors(get(stats::get_stats), cors),
    };
    let query_route =
        post(query::post_query).layer(axum::extract::DefaultBodyLimit::max(query::MAX_QUERY_BYTES));
    let query_route = match stats_cors_layer.clone() {
        None => query_route,
        Some(cors) => with_cors(query_route, cors),
    };
    let listing = |route: MethodRouter<AppState>| match stats_cors_layer.clone() {
        None => route,
        Some(cors) => with_cors(route, cors),
    };
    let stats = Router::new()
        .route("/stats", stats_route)
        .route("/api/v2/query", query_route)
        .route("/api/sites", listing(get(sites::get_sites)))
        .route(
            "/api/sites/{site_id}/properties",
            listing(get(sites::get_properties)),
        )
        .route(
            "/api/sites/{site_id}/events",
            listing(get(export::get_events)),
        )
        .route("/api/v1/stats/aggregate", listing(get(v1::aggregate)))
        .route("/api/v1/stats/timeseries", listing(get(v1::timeseries)))
        .route("/api/v1/stats/breakdown", listing(get(v1::breakdown)))
        .route(
            "/api/v1/stats/realtime/visitors",
            listing(get(v1::realtime_visitors)),
        )
        .route(
            "/api/sites/{site_id}/settings",
            listing(
                get(admin::get_settings)
                    .put(admin::put_settings)
                    .delete(admin::delete_settings),
            )
            .layer(axum::extract::DefaultBodyLimit::max(admin::MAX_ADMIN_BYTES)),
        )
        .route(
            "/api/tokens",
            listing(get(admin::get_tokens).post(admin::post_token))
                .layer(axum::extract::DefaultBodyLimit::max(admin::MAX_ADMIN_BYTES)),
        )
        .route("/api/tokens/{id}", listing(delete(admin::delete_token)))
        .route(
            "/api/sites/{site_id}/erase",
            listing(post(export::post_erase)).layer(axum::extract::DefaultBodyLimit::max(
                export::MAX_ERASE_BYTES,
            )),
        );
    // Ingest and stats handlers count themselves against the request bound
    // (`InFlight::admit`). Health, readiness and metrics stay outside it:
    // they cost little, and an overloaded process must still say how it is.
    let base = state.base_path.clone();
    let app = Router::new()
        .merge(ingest)
        .merge(stats)
        .route("/", get(dashboard::get_home))
        .route("/dashboard/{site_id}", get(dashboard::get_dashboard))
        .route("/assets/{name}", get(dashboard::get_asset))
        .route("/favicon.ico", get(dashboard::get_favicon))
        .route("/health", get(health::health))
        .route("/ready", get(health::ready))
        .route("/metrics", get(metrics::get_metrics))
        .route("/openapi.json", get(openapi::get_openapi))
        .route("/js/script.js", get(script::get_script))
        .route("/js/{name}", get(script::get_versioned))
        .fallback(|| async { ApiError::not_found() })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            metrics::track,
        ))
        // A 503 is logged where its cause is known (queue or store trouble,
        // at WARN), and counted in the metrics; tower-http's default would
        // add an ERROR line per request, a flood of them when the queue is
        // full.
        .layer(
            TraceLayer::new_for_http()
                .on_failure(DefaultOnFailure::new().level(tracing::Level::DEBUG)),
        );
    if base.is_empty() {
        return app.with_state(state);
    }
    // Under a prefix: every route moves under it (the home page at
    // `/analytics` and `/analytics/`), and anything else is a JSON 404.
    let home = format!("{base}/");
    Router::new()
        .route(&home, get(dashboard::get_home))
        .nest(base.as_str(), app)
        .fallback(|| async { ApiError::not_found() })
        .with_state(state)
}
