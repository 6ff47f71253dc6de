//! Metrics in the Prometheus text format, served at `GET /metrics`.
//!
//! One [`Metrics`] per application instance, not a process-wide global: the
//! tests run many applications in one process and each must see its own
//! counts. Counters are encoded with the `_total` suffix, durations are in
//! seconds (`_seconds`).
//!
//! Queue depth and the age of the oldest waiting event are read from the
//! queue when `/metrics` is scraped, so they are true at that moment whichever
//! process (API or worker) moved the events.

use std::fmt::Write as _;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Names, without the `evtrack_` prefix the registry adds and the `_total`
/// the encoder adds to counters.
pub const EVENTS_RECEIVED: &str = "events_received";
pub const EVENTS_REJECTED: &str = "events_rejected";
pub const EVENTS_QUEUED: &str = "events_queued";
pub const EVENTS_DROPPED: &str = "events_dropped";
pub const EVENTS_STORED: &str = "events_stored";
pub const EVENTS_DUPLICATE: &str = "events_duplicate";
pub const EVENTS_DEAD_LETTERED: &str = "events_dead_lettered";
pub const EVENTS_RETRIED: &str = "events_retried";
pub const DEAD_LETTERS_TRIMMED: &str = "dead_letters_trimmed";
pub const QUEUE_DEPTH: &str = "queue_depth_events";
pub const QUEUE_DEPTH_BYTES: &str = "queue_depth_bytes";
pub const QUEUE_OLDEST_AGE: &str = "queue_oldest_event_age_seconds";
pub const STORE_WRITE_SECONDS: &str = "store_write_seconds";
pub const HTTP_REQUEST_SECONDS: &str = "http_request_duration_seconds";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// The error code of the refusal (`missing_field`, `queue_full`, …).
    pub reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub method: String,
    /// The matched route (`/event`), never the raw path: unknown paths share
    /// one label, so a scanner cannot create a series per URL.
    pub route: String,
    pub status: u16,
}

fn latency_buckets() -> Histogram {
    // 0.1 ms to ~3.3 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

pub struct Metrics {
    registry: Registry,
    /// Events in requests that were read (valid or not).
    pub events_received: Counter,
    /// Events refused at the API, by reason (validation code, queue_full, …).
    pub events_rejected: Family<ReasonLabel, Counter>,
    /// Events handed to the queue (202).
    pub events_queued: Counter,
    /// Events answered 202 but not recorded, on purpose (a bot's, a site's
    /// not allowed), by reason.
    pub events_dropped: Family<ReasonLabel, Counter>,
    /// Events the worker wrote to the store for the first time.
    pub events_stored: Counter,
    /// Redeliveries the store already had (harmless, counted once stored).
    pub events_duplicate: Counter,
    pub events_dead_lettered: Counter,
    /// Events the worker will try again after a store failure.
    pub events_retried: Counter,
    /// Old dead letters dropped to keep the dead-letter stream within
    /// `DEAD_LETTER_MAX_LEN`.
    pub dead_letters_trimmed: Counter,
    pub queue_depth: Gauge,
    /// Payload bytes waiting in the Redis stream (what `QUEUE_MAX_BYTES`
    /// bounds); stays 0 with the embedded queue.
    pub queue_depth_bytes: Gauge,
    pub queue_oldest_age: Gauge<f64, AtomicU64>,
    pub store_write_seconds: Histogram,
    pub http_request_seconds: Family<HttpLabels, Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("evtrack");
        let m = Metrics {
            events_received: Counter::default(),
            events_rejected: Family::default(),
            events_queued: Counter::default(),
            events_dropped: Family::default(),
            events_stored: Counter::default(),
            events_duplicate: Counter::default(),
            events_dead_lettered: Counter::default(),
            events_retried: Counter::default(),
            dead_letters_trimmed: Counter::default(),
            queue_depth: Gauge::default(),
            queue_depth_bytes: Gauge::default(),
            queue_oldest_age: Gauge::default(),
            store_write_seconds: latency_buckets(),
            http_request_seconds: Family::new_with_constructor(latency_buckets),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            EVENTS_RECEIVED,
            "Events in ingest requests that were read",
            m.events_received.clone(),
        );
        r.register(
            EVENTS_REJECTED,
            "Events refused at the API, by reason",
            m.events_rejected.clone(),
        );
        r.register(
            EVENTS_QUEUED,
            "Events accepted into the queue",
            m.events_queued.clone(),
        );
        r.register(
            EVENTS_DROPPED,
            "Events answered 202 but not recorded on purpose (bots, sites not allowed), by reason",
            m.events_dropped.clone(),
        );
        r.register(
            EVENTS_STORED,
            "Events written to the store for the first time",
            m.events_stored.clone(),
        );
        r.register(
            EVENTS_DUPLICATE,
            "Redelivered events the store already had",
            m.events_duplicate.clone(),
        );
        r.register(
            EVENTS_DEAD_LETTERED,
            "Entries moved to the dead-letter stream",
            m.events_dead_lettered.clone(),
        );
        r.register(
            EVENTS_RETRIED,
            "Events kept for another try after the store failed",
            m.events_retried.clone(),
        );
        r.register(
            DEAD_LETTERS_TRIMMED,
            "Oldest entries dropped from the dead-letter stream to keep it within DEAD_LETTER_MAX_LEN",
            m.dead_letters_trimmed.clone(),
        );
        r.register(
            QUEUE_DEPTH,
            "Events waiting in the queue (not yet stored), when scraped",
            m.queue_depth.clone(),
        );
        r.register(
            QUEUE_DEPTH_BYTES,
            "Payload bytes waiting in the Redis stream (bounded by QUEUE_MAX_BYTES), when scraped",
            m.queue_depth_bytes.clone(),
        );
        r.register(
            QUEUE_OLDEST_AGE,
            "Age of the oldest event waiting in the queue, when scraped",
            m.queue_oldest_age.clone(),
        );
        r.register(
            STORE_WRITE_SECONDS,
            "Time of one batch write to the store",
            m.store_write_seconds.clone(),
        );
        r.register(
            HTTP_REQUEST_SECONDS,
            "HTTP request latency by method, matched route and status",
            m.http_request_seconds.clone(),
        );
        Metrics { registry, ..m }
    }

    pub fn reject(&self, reason: &str, events: u64) {
        self.events_rejected
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .inc_by(events);
    }

    pub fn drop_events(&self, reason: &str, events: u64) {
        self.events_dropped
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .inc_by(events);
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            // Writing into a String cannot fail; say so rather than panic.
            let _ = writeln!(out, "# encoding failed");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_suffixes() {
        let m = Metrics::new();
        m.events_received.inc_by(3);
        m.reject("missing_field", 2);
        m.store_write_seconds.observe(0.002);
        m.http_request_seconds
            .get_or_create(&HttpLabels {
                method: "POST".into(),
                route: "/event".into(),
                status: 202,
            })
            .observe(0.001);
        let text = m.encode();
        assert!(text.contains("evtrack_events_received_total 3"), "{text}");
        assert!(
            text.contains(r#"evtrack_events_rejected_total{reason="missing_field"} 2"#),
            "{text}"
        );
        assert!(
            text.contains("evtrack_store_write_seconds_count 1"),
            "{text}"
        );
        assert!(
            text.contains(
                r#"evtrack_http_request_duration_seconds_count{method="POST",route="/event",status="202"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains("# TYPE evtrack_queue_depth_events gauge"));
        assert!(text.contains("# TYPE evtrack_queue_depth_bytes gauge"));
        assert!(
            text.contains("evtrack_dead_letters_trimmed_total 0"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }
}
