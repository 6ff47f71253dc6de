//! evtrack: an event tracking service.
//!
//! The parts, in the order an event meets them:
//! - [`config`]: settings from flags, environment and `.env`.
//! - [`routes`]: the HTTP API (`POST /event`, `POST /events`, `POST /api/v2/query`,
//!   `GET /stats`, health).
//! - [`event`]: the event model and its validation.
//! - [`enrich`]: what a browser's request says of its visitor (browser,
//!   device, country, source), and [`visitor`]: cookieless visitor ids.
//! - [`queue`]: between the API and the worker (Redis Stream, or in-process).
//! - [`worker`]: moves events from the queue into the store, in batches.
//! - [`store`]: where events are kept (MongoDB, or SQLite), with their rollups.
//! - [`rollup`]: exact per-bucket counts and visitor bitmaps, which answer queries.
//! - [`query`]: the analytics query (Plausible's Stats API v2 shape): parsing,
//!   the reference semantics, and the engine over the stores.
//! - [`stats`]: `GET /stats`, the original one-day query, on the same engine.
//! - [`access`]: read tokens for stats, the ingest allow-list.
//! - [`sites`]: the site registry (time zone, public flag, hostnames,
//!   excluded addresses, goals) and read tokens made at run time.
//! - [`ratelimit`]: who a client is (trusted proxies) and its ingest rate limit.
//! - [`metrics`]: counters and histograms for `GET /metrics`.
//! - [`server`]: the HTTP server loop and its connection limits.
//! - [`startup`]: wires the parts together for `evtrack`, `evtrack api`, `evtrack worker`.

pub mod access;
pub mod config;
pub mod enrich;
pub mod event;
pub mod metrics;
pub mod query;
pub mod queue;
pub mod ratelimit;
pub mod rollup;
pub mod routes;
pub mod server;
pub mod session;
pub mod sites;
pub mod startup;
pub mod stats;
pub mod store;
pub mod telemetry;
pub mod visit_rollup;
pub mod visitor;
pub mod worker;
