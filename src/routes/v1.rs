//! Plausible's Stats API v1, answered by the same engine as v2:
//! - `GET /api/v1/stats/aggregate`: metrics over a period, optionally with
//!   the change against the previous period of the same length;
//! - `GET /api/v1/stats/timeseries`: one row per day, month (or hour, for
//!   a period of a day), every bucket of the period included;
//! - `GET /api/v1/stats/breakdown`: one row per value of a property;
//! - `GET /api/v1/stats/realtime/visitors`: visitors of the last 5 minutes.
//!
//! Each request is translated into v2 queries ([`crate::query`]), so v1
//! and v2 answers agree by construction. Event metrics and visit metrics
//! are two queries (as in v2, a query is over events or over visits),
//! merged by row. Access as for the v2 queries.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use chrono::{Datelike, Months, NaiveDate};
use serde_json::{Map, Value, json};
use tokio::sync::OwnedSemaphorePermit;

use super::{ApiError, AppState};
use crate::query::time::Zone;
use crate::query::{self, engine};
use crate::store::StoreError;

/// Metrics over events, and over visits (see [`crate::session`]).
const EVENT_METRICS: [&str; 4] = ["visitors", "pageviews", "events", "conversion_rate"];
const VISIT_METRICS: [&str; 4] = ["visits", "bounce_rate", "visit_duration", "views_per_visit"];
/// Most rows of a breakdown page, and the default.
const MAX_LIMIT: usize = 1_000;
const DEFAULT_LIMIT: usize = 100;

/// Which endpoint a request is for: the parameters each takes differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Aggregate,
    Timeseries,
    Breakdown,
}

impl Endpoint {
    fn allows(self, parameter: &str) -> bool {
        match parameter {
            "site_id" | "period" | "date" | "metrics" | "filters" | "timezone"
            | "with_imported" => true,
            "compare" => self == Endpoint::Aggregate,
            "interval" => self == Endpoint::Timeseries,
            "property" | "limit" | "page" => self == Endpoint::Breakdown,
            _ => false,
        }
    }
}

/// A v1 request, read: what every endpoint shares.
struct Request {
    site_id: String,
    zone: Zone,
    /// The period as whole local days, both included.
    first: NaiveDate,
    last: NaiveDate,
    period: String,
    metrics: Vec<String>,
    filters: Vec<Value>,
}

fn bad(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::bad_request("invalid_query", message).with_field(field.to_owned())
}

/// Reads the parameters every endpoint shares; `today` is in the zone.
fn read(
    endpoint: Endpoint,
    params: &HashMap<String, String>,
    now_ms: i64,
) -> Result<Request, ApiError> {
    if let Some(unknown) = params.keys().find(|k| !endpoint.allows(k)) {
        return Err(ApiError::bad_request(
            "unknown_parameter",
            format!("unknown parameter `{}`", unknown.escape_debug()),
        ));
    }
    let site_id = params
        .get("site_id")
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            ApiError::bad_request("missing_field", "`site_id` is required").with_field("site_id")
        })?
        .clone();
    let zone_name = params.get("timezone").map_or("UTC", String::as_str);
    let zone = Zone::parse(zone_name).ok_or_else(|| {
        ApiError::bad_request(
            "unknown_time_zone",
            format!(
                "`{}` is not an IANA time zone name",
                zone_name.escape_debug()
            ),
        )
        .with_field("timezone")
    })?;
    let period = params
        .get("period")
        .map_or("30d", String::as_str)
        .to_owned();
    let date = |s: &str| {
        NaiveDate::parse_from_str(s.trim(), "%Y-%m-%d").map_err(|_| {
            bad(
                "date",
                format!("`{}` is not a date (YYYY-MM-DD)", s.escape_debug()),
            )
        })
    };
    let (first, last) = if period == "custom" {
        let raw = params
            .get("date")
            .ok_or_else(|| bad("date", "`period=custom` needs `date=YYYY-MM-DD,YYYY-MM-DD`"))?;
        let (a, b) = raw
            .split_once(',')
            .ok_or_else(|| bad("date", "`period=custom` needs `date=YYYY-MM-DD,YYYY-MM-DD`"))?;
        let (a, b) = (date(a)?, date(b)?);
        if b < a {
            return Err(bad("date", "the range ends before it starts"));
        }
        (a, b)
    } else {
        // Every other period is relative to `date`, by default today in
        // the zone.
        let day = match params.get("date") {
            Some(d) => date(d)?,
            None => zone.today(now_ms),
        };
        let month = day.with_day(1).unwrap_or(day);
        let month_end = month
            .checked_add_months(Months::new(1))
            .and_then(|m| m.pred_opt())
            .unwrap_or(day);
        let months_back = |n: u32| month.checked_sub_months(Months::new(n)).unwrap_or(month);
        match period.as_str() {
            "day" => (day, day),
            "7d" => (day - chrono::Duration::days(6), day),
            "30d" => (day - chrono::Duration::days(29), day),
            "month" => (month, month_end),
            "6mo" => (months_back(5), month_end),
            "12mo" => (months_back(11), month_end),
            other => {
                return Err(bad(
                    "period",
                    format!(
                        "unknown period `{}`: day, 7d, 30d, month, 6mo, 12mo or custom",
                        other.escape_debug()
                    ),
                ));
            }
        }
    };
    let metrics: Vec<String> = params
        .get("metrics")
        .map_or("visitors", String::as_str)
        .split(',')
        .map(|m| m.trim().to_owned())
        .collect();
    for m in &metrics {
        if !EVENT_METRICS.contains(&m.as_str()) && !VISIT_METRICS.contains(&m.as_str()) {
            return Err(bad(
                "metrics",
                format!(
                    "unknown or unsupported metric `{}`: visitors, visits, pageviews, \
                     views_per_visit, bounce_rate, visit_duration, events, conversion_rate",
                    m.escape_debug()
                ),
            ));
        }
    }
    let filters = match params.get("filters") {
        Some(f) => parse_filters(f)?,
        None => Vec::new(),
    };
    Ok(Request {
        site_id,
        zone,
        first,
        last,
        period,
        metrics,
        filters,
    })
}

/// v1 filters (`event:page==/a|/b;visit:country!=FR`) as v2 filters.
/// `\|` is a literal `|`. Wildcards (`*`) are refused: evtrack's filters
/// match whole values or substrings, not patterns.
fn parse_filters(raw: &str) -> Result<Vec<Value>, ApiError> {
    let mut out = Vec::new();
    for part in raw.split(';').filter(|p| !p.trim().is_empty()) {
        let (dimension, op, values) = if let Some((d, v)) = part.split_once("!=") {
            (d, "is_not", v)
        } else if let Some((d, v)) = part.split_once("==") {
            (d, "is", v)
        } else if let Some((d, v)) = part.split_once("~") {
            (d, "contains", v)
        } else {
            return Err(bad(
                "filters",
                format!("`{}` is not `property==value`", part.escape_debug()),
            ));
        };
        // Split on `|` not preceded by a backslash.
        let mut list = Vec::new();
        let mut current = String::new();
        let mut chars = values.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\\' if chars.peek() == Some(&'|') => {
                    current.push('|');
                    chars.next();
                }
                '|' => list.push(std::mem::take(&mut current)),
                c => current.push(c),
            }
        }
        list.push(current);
        if list.iter().any(|v| v.contains('*')) {
            return Err(bad(
                "filters",
                "wildcards (`*`) are not supported; `property~text` matches values containing text",
            ));
        }
        if op == "is_not" && list.len() > 1 {
            return Err(bad("filters", "`!=` takes one value"));
        }
        out.push(json!([op, dimension.trim(), list]));
    }
    Ok(out)
}

impl Request {
    /// The v2 body of one query over `metrics` (all of one kind).
    fn body(&self, metrics: &[&String], first: NaiveDate, last: NaiveDate, dims: &[&str]) -> Value {
        json!({
            "site_id": self.site_id,
            "metrics": metrics,
            "date_range": [first.to_string(), last.to_string()],
            "timezone": self.zone.name(),
            "dimensions": dims,
            "filters": self.filters,
        })
    }

    fn event_metrics(&self) -> Vec<&String> {
        self.metrics
            .iter()
            .filter(|m| EVENT_METRICS.contains(&m.as_str()))
            .collect()
    }

    fn visit_metrics(&self) -> Vec<&String> {
        self.metrics
            .iter()
            .filter(|m| VISIT_METRICS.contains(&m.as_str()))
            .collect()
    }
}

/// Runs one v2 query body to its answer, within the stats time limit.
async fn run(state: &AppState, body: Value, extra: Value) -> Result<Value, ApiError> {
    let mut body = body;
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    let request = query::parse_request(&body)?;
    let request = {
        let registry = state.registry.snapshot();
        let site = registry.site(&request.site_id).map(|c| c.settings.clone());
        request.for_site(site.as_ref())
    };
    let bound = state.stats_timeout + super::stats::STATS_TIMEOUT_SLACK;
    let store = Arc::clone(&state.store);
    tokio::time::timeout(bound, async move {
        let query = Arc::new(request.resolve(query::time::now_ms(), None)?);
        let answer = engine::run(&*store, Arc::clone(&query)).await?;
        Ok::<_, ApiError>(answer.to_json(&query))
    })
    .await
    .map_err(|_| StoreError::Timeout(state.stats_timeout))?
}

/// Rows of the answers of `queries` (each with its metric names), merged by
/// dimensions, in the first answer's order: `(dimensions, name → value)`.
fn merge(answers: &[(Vec<&String>, Value)]) -> Vec<(Vec<String>, Map<String, Value>)> {
    let mut rows: Vec<(Vec<String>, Map<String, Value>)> = Vec::new();
    let mut at: HashMap<Vec<String>, usize> = HashMap::new();
    for (names, answer) in answers {
        for row in answer["results"].as_array().into_iter().flatten() {
            let dims: Vec<String> = row["dimensions"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|d| d.as_str().map(str::to_owned))
                .collect();
            let i = *at.entry(dims.clone()).or_insert_with(|| {
                rows.push((dims, Map::new()));
                rows.len() - 1
            });
            for (name, value) in names
                .iter()
                .zip(row["metrics"].as_array().into_iter().flatten())
            {
                rows[i].1.insert((*name).clone(), value.clone());
            }
        }
    }
    rows
}

/// Zero for every metric a row lacks (a group with events but no visit
/// starting in the range, or the reverse).
fn fill(values: &mut Map<String, Value>, metrics: &[String]) {
    for m in metrics {
        values.entry(m.clone()).or_insert(json!(0));
    }
}

fn params_of(
    params: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<HashMap<String, String>, ApiError> {
    params
        .map(|Query(p)| p)
        .map_err(|_| ApiError::bad_request("invalid_query", "the query string is malformed"))
}

/// What an endpoint does first: a request slot, the token checked before
/// anything else is answered, the parameters read, the site authorized.
fn begin(
    state: &AppState,
    headers: &HeaderMap,
    params: Result<Query<HashMap<String, String>>, QueryRejection>,
    endpoint: Endpoint,
) -> Result<(OwnedSemaphorePermit, HashMap<String, String>, Request), ApiError> {
    let slot = state.limits.admit()?;
    let viewer = super::stats::reader(state, headers)?;
    let params = params_of(params)?;
    let r = read(endpoint, &params, query::time::now_ms())?;
    viewer.may_read(&r.site_id)?;
    Ok((slot, params, r))
}

/// A result row: `label` under `key`, then each metric asked (0 where the
/// answers had none).
fn row_of(key: &str, label: String, mut values: Map<String, Value>, metrics: &[String]) -> Value {
    fill(&mut values, metrics);
    let mut row = Map::new();
    row.insert(key.to_owned(), json!(label));
    row.extend(values);
    Value::Object(row)
}

/// One set of metrics over `[first, last]`, no dimensions.
async fn totals(
    state: &AppState,
    r: &Request,
    first: NaiveDate,
    last: NaiveDate,
) -> Result<Map<String, Value>, ApiError> {
    let mut answers = Vec::new();
    for metrics in [r.event_metrics(), r.visit_metrics()] {
        if !metrics.is_empty() {
            let answer = run(state, r.body(&metrics, first, last, &[]), json!({})).await?;
            answers.push((metrics, answer));
        }
    }
    let mut values = merge(&answers)
        .into_iter()
        .next()
        .map(|(_, v)| v)
        .unwrap_or_default();
    fill(&mut values, &r.metrics);
    Ok(values)
}

pub async fn aggregate(
    State(state): State<AppState>,
    headers: HeaderMap,
    params: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let (_slot, params, r) = begin(&state, &headers, params, Endpoint::Aggregate)?;
    let compare = match params.get("compare").map(String::as_str) {
        None => false,
        Some("previous_period") => true,
        Some(other) => {
            return Err(bad(
                "compare",
                format!(
                    "`compare` is `previous_period`, not `{}`",
                    other.escape_debug()
                ),
            ));
        }
    };
    let now = totals(&state, &r, r.first, r.last).await?;
    let before = match compare {
        true => {
            let days = (r.last - r.first).num_days() + 1;
            let last = r.first - chrono::Duration::days(1);
            let first = last - chrono::Duration::days(days - 1);
            Some(totals(&state, &r, first, last).await?)
        }
        false => None,
    };
    let mut results = Map::new();
    for m in &r.metrics {
        let value = now.get(m).cloned().unwrap_or(json!(0));
        let mut entry = json!({"value": value});
        if let Some(before) = &before {
            let (a, b) = (
                value.as_f64().unwrap_or(0.0),
                before.get(m).and_then(Value::as_f64).unwrap_or(0.0),
            );
            // Plausible's rule: the bounce rate's change in points, the
            // others in percent of the previous value (100 from nothing).
            let change = if m == "bounce_rate" {
                a - b
            } else if b == 0.0 {
                if a > 0.0 { 100.0 } else { 0.0 }
            } else {
                ((a - b) / b * 100.0).round()
            };
            entry["change"] = json!(change as i64);
        }
        results.insert(m.clone(), entry);
    }
    Ok(Json(json!({"results": results})))
}

pub async fn timeseries(
    State(state): State<AppState>,
    headers: HeaderMap,
    params: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let (_slot, params, r) = begin(&state, &headers, params, Endpoint::Timeseries)?;
    let grain = match params.get("interval").map(String::as_str) {
        Some("month") => "time:month",
        Some("day" | "date") => "time:day",
        Some(other) => {
            return Err(bad(
                "interval",
                format!(
                    "`interval` is `day` or `month`, not `{}`",
                    other.escape_debug()
                ),
            ));
        }
        None if r.period == "day" => "time:hour",
        None if r.period == "6mo" || r.period == "12mo" => "time:month",
        None => "time:day",
    };
    let mut answers = Vec::new();
    let mut labels: Vec<String> = Vec::new();
    for metrics in [r.event_metrics(), r.visit_metrics()] {
        if !metrics.is_empty() {
            let body = r.body(&metrics, r.first, r.last, &[grain]);
            let answer = run(&state, body, json!({"include": {"time_labels": true}})).await?;
            if labels.is_empty() {
                labels = answer["meta"]["time_labels"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|l| l.as_str().map(str::to_owned))
                    .collect();
            }
            answers.push((metrics, answer));
        }
    }
    let mut rows: HashMap<Vec<String>, Map<String, Value>> = merge(&answers).into_iter().collect();
    let results: Vec<Value> = labels
        .into_iter()
        .map(|label| {
            let values = rows.remove(&vec![label.clone()]).unwrap_or_default();
            row_of("date", label, values, &r.metrics)
        })
        .collect();
    Ok(Json(json!({"results": results})))
}

pub async fn breakdown(
    State(state): State<AppState>,
    headers: HeaderMap,
    params: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let (_slot, params, r) = begin(&state, &headers, params, Endpoint::Breakdown)?;
    let property = params.get("property").ok_or_else(|| {
        ApiError::bad_request("missing_field", "`property` is required").with_field("property")
    })?;
    let number = |key: &str, default: usize, max: usize| -> Result<usize, ApiError> {
        match params.get(key) {
            None => Ok(default),
            Some(v) => v
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=max).contains(n))
                .ok_or_else(|| bad(key, format!("`{key}` is a whole number from 1 to {max}"))),
        }
    };
    let limit = number("limit", DEFAULT_LIMIT, MAX_LIMIT)?;
    let page = number("page", 1, 1_000_000)?;
    // The row's key: the property without its prefix (`page`, `source`,
    // a custom property's own name).
    let key = property
        .strip_prefix("event:props:")
        .or_else(|| property.strip_prefix("event:"))
        .or_else(|| property.strip_prefix("visit:"))
        .unwrap_or(property)
        .to_owned();
    let pagination = json!({"pagination": {"limit": limit, "offset": (page - 1) * limit}});
    // Visit metrics of a page are those of the visits that entered on it,
    // as Plausible's v1 has them; other event properties have none.
    let visit_property = match property.as_str() {
        "event:page" => "visit:entry_page",
        p if p.starts_with("event:") && !r.visit_metrics().is_empty() => {
            return Err(bad(
                "property",
                "visit metrics break down by `event:page` (the entry page) or `visit:*` only",
            ));
        }
        p => p,
    };
    // Ordered by the first metric asked, as Plausible orders by visitors:
    // the other kind's query is read whole and joined to these rows.
    let (lead, other) = match r.event_metrics().first() == r.metrics.first().as_ref() {
        true => (r.event_metrics(), r.visit_metrics()),
        false => (r.visit_metrics(), r.event_metrics()),
    };
    let dimension = |metrics: &[&String]| match metrics
        .first()
        .is_some_and(|m| VISIT_METRICS.contains(&m.as_str()))
    {
        true => visit_property,
        false => property.as_str(),
    };
    let mut answers = Vec::new();
    let answer = run(
        &state,
        r.body(&lead, r.first, r.last, &[dimension(&lead)]),
        pagination,
    )
    .await?;
    answers.push((lead, answer));
    if !other.is_empty() {
        let answer = run(
            &state,
            r.body(&other, r.first, r.last, &[dimension(&other)]),
            json!({}),
        )
        .await?;
        answers.push((other, answer));
    }
    let lead_rows = answers[0].1["results"].as_array().map_or(0, Vec::len);
    let results: Vec<Value> = merge(&answers)
        .into_iter()
        .take(lead_rows)
        .map(|(dims, values)| {
            let label = dims.into_iter().next().unwrap_or_default();
            row_of(&key, label, values, &r.metrics)
        })
        .collect();
    Ok(Json(json!({"results": results})))
}

/// Visitors of the last 5 minutes, a bare number as Plausible answers.
pub async fn realtime_visitors(
    State(state): State<AppState>,
    headers: HeaderMap,
    params: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let _slot = state.limits.admit()?;
    let viewer = super::stats::reader(&state, &headers)?;
    let params = params_of(params)?;
    if let Some(unknown) = params.keys().find(|k| k.as_str() != "site_id") {
        return Err(ApiError::bad_request(
            "unknown_parameter",
            format!("unknown parameter `{}`", unknown.escape_debug()),
        ));
    }
    let site = params
        .get("site_id")
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            ApiError::bad_request("missing_field", "`site_id` is required").with_field("site_id")
        })?;
    viewer.may_read(site)?;
    let now = query::time::now_ms();
    let utc = Zone::parse("UTC").ok_or_else(|| bad("timezone", "UTC is unknown"))?;
    let body = json!({
        "site_id": site,
        "metrics": ["visitors"],
        "date_range": [utc.format_instant(now - 5 * 60_000), utc.format_instant(now)],
    });
    let answer = run(&state, body, json!({})).await?;
    Ok(Json(answer["results"][0]["metrics"][0].clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// 2025-11-23 12:00 UTC.
    const NOW: i64 = 1_763_899_200_000;

    fn range(pairs: &[(&str, &str)]) -> (String, String) {
        let r = read(Endpoint::Aggregate, &params(pairs), NOW).unwrap();
        (r.first.to_string(), r.last.to_string())
    }

    #[test]
    fn periods_are_plausibles() {
        let site = ("site_id", "s");
        let day = |a: &str, b: &str| (a.to_owned(), b.to_owned());
        assert_eq!(range(&[site]), day("2025-10-25", "2025-11-23"));
        assert_eq!(
            range(&[site, ("period", "day")]),
            day("2025-11-23", "2025-11-23")
        );
        assert_eq!(
            range(&[site, ("period", "7d")]),
            day("2025-11-17", "2025-11-23")
        );
        // A whole calendar month, and whole months back from `date`'s.
        assert_eq!(
            range(&[site, ("period", "month")]),
            day("2025-11-01", "2025-11-30")
        );
        assert_eq!(
            range(&[site, ("period", "6mo"), ("date", "2025-02-10")]),
            day("2024-09-01", "2025-02-28")
        );
        assert_eq!(
            range(&[site, ("period", "12mo")]),
            day("2024-12-01", "2025-11-30")
        );
        assert_eq!(
            range(&[
                site,
                ("period", "custom"),
                ("date", "2025-01-01,2025-01-31")
            ]),
            day("2025-01-01", "2025-01-31")
        );
        // In the zone: 12:00 UTC is already the 24th in Auckland.
        assert_eq!(
            range(&[site, ("period", "day"), ("timezone", "Pacific/Auckland")]),
            day("2025-11-24", "2025-11-24")
        );
        for bad in [
            vec![site, ("period", "custom")],
            vec![
                site,
                ("period", "custom"),
                ("date", "2025-02-01,2025-01-01"),
            ],
            vec![site, ("period", "5d")],
            vec![site, ("metrics", "visitors,time_on_page")],
            vec![site, ("interval", "day")],
            vec![("period", "day")],
        ] {
            assert!(
                read(Endpoint::Aggregate, &params(&bad), NOW).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn filters_become_v2_filters() {
        assert_eq!(
            parse_filters(r"event:page==/a|/b\|c;visit:country!=FR;event:page~blog").unwrap(),
            vec![
                json!(["is", "event:page", ["/a", "/b|c"]]),
                json!(["is_not", "visit:country", ["FR"]]),
                json!(["contains", "event:page", ["blog"]]),
            ]
        );
        assert!(parse_filters("event:page==/blog/*").is_err());
        assert!(parse_filters("visit:browser!=Chrome|Safari").is_err());
        assert!(parse_filters("event:page").is_err());
    }
}
