//! Integration tests: the real application on real backends (redis-server and
//! a MongoDB wire-protocol server), each started by the test on a free port.

mod access;
mod backends;
mod backup;
mod browser;
mod cluster;
mod dashboard;
mod events_api;
mod export;
mod faults;
mod helpers;
mod hostile;
mod ingest;
mod lifecycle;
mod metrics;
mod openapi;
mod query;
mod queue;
mod redis_queue;
mod registry;
mod stats;
mod store;
mod v1;
mod worker;
