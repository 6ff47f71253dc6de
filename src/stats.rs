//! The stats query: what `GET /stats` asks and answers.
//!
//! The rules (which events count, what a unique user is, how paths are
//! ordered) are written once here as [`aggregate`], a plain in-memory
//! reference. [`compute`] answers the same from a store, through the query
//! engine ([`crate::query::engine`]); the tests compare every store against
//! this reference.

use std::collections::{HashMap, HashSet};

use chrono::{NaiveDate, NaiveTime};
use serde::Serialize;

use crate::event::{Event, EventName, SiteId};
use crate::query::{self, Condition, Dimension, Filter, FilterOp};
use crate::store::{QueryStore, StoreError};

pub const DEFAULT_EVENT_TYPE: &str = "page_view";
pub const DEFAULT_LIMIT: u32 = 10;
pub const MAX_LIMIT: u32 = 100;

/// A validated stats request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatsQuery {
    pub site_id: SiteId,
    pub date: NaiveDate,
    pub event_type: EventName,
    pub limit: u32,
}

impl StatsQuery {
    /// The UTC day `[date 00:00Z, date+1 00:00Z)` in epoch milliseconds.
    pub fn day_range_ms(&self) -> (i64, i64) {
        let start = self
            .date
            .and_time(NaiveTime::MIN)
            .and_utc()
            .timestamp_millis();
        (start, start + DAY_MS)
    }

    /// The UTC day number of `date`.
    pub fn day_number(&self) -> i64 {
        day_number(self.day_range_ms().0)
    }
}

/// Milliseconds in a day; days are UTC.
pub const DAY_MS: i64 = 24 * 60 * 60 * 1000;

/// The UTC day number (days since 1970-01-01) of a timestamp in epoch milliseconds.
pub fn day_number(ts_ms: i64) -> i64 {
    ts_ms.div_euclid(DAY_MS)
}

/// The answer, field for field as the original service gave it (plus `event_type`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Stats {
    pub site_id: String,
    pub date: String,
    pub event_type: String,
    pub total_views: u64,
    pub unique_users: u64,
    pub top_paths: Vec<PathStats>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PathStats {
    pub path: String,
    pub views: u64,
    pub unique_users: u64,
}

impl Stats {
    /// Assembles an answer from per-path rows in any order: sorts and cuts them
    /// by the contract's rule so every store orders ties the same way.
    pub fn new(
        query: &StatsQuery,
        total_views: u64,
        unique_users: u64,
        mut paths: Vec<PathStats>,
    ) -> Self {
        sort_paths(&mut paths);
        paths.truncate(query.limit as usize);
        Stats {
            site_id: query.site_id.to_string(),
            date: query.date.format("%Y-%m-%d").to_string(),
            event_type: query.event_type.to_string(),
            total_views,
            unique_users,
            top_paths: paths,
        }
    }
}

/// Views descending, then unique users descending, then path ascending (bytewise).
pub fn sort_paths(paths: &mut [PathStats]) {
    paths.sort_by(|a, b| {
        b.views
            .cmp(&a.views)
            .then(b.unique_users.cmp(&a.unique_users))
            .then_with(|| a.path.cmp(&b.path))
    });
}

/// A path counts when the event has a non-empty `path`.
pub fn counted_path(path: Option<&str>) -> Option<&str> {
    path.filter(|p| !p.is_empty())
}

/// A count in an answer (counts are whole numbers).
fn count(n: &serde_json::Number) -> u64 {
    n.as_u64().unwrap_or(0)
}

/// The reference answer over raw events, in memory. Used by tests only as the
/// yardstick for the stores; it would not do for a real day of traffic.
pub fn aggregate<'a>(events: impl IntoIterator<Item = &'a Event>, query: &StatsQuery) -> Stats {
    let (start, end) = query.day_range_ms();
    let mut total = 0u64;
    let mut users: HashSet<&str> = HashSet::new();
    let mut per_path: HashMap<&str, (u64, HashSet<&str>)> = HashMap::new();
    for e in events {
        if e.site_id != query.site_id
            || e.event_type != query.event_type
            || e.is_engagement()
            || e.ts < start
            || e.ts >= end
        {
            continue;
        }
        total += 1;
        let user = crate::query::visitor_of(e);
        users.extend(user);
        if let Some(path) = counted_path(e.path.as_deref()) {
            let entry = per_path.entry(path).or_default();
            entry.0 += 1;
            entry.1.extend(user);
        }
    }
    let paths = per_path
        .into_iter()
        .map(|(path, (views, users))| PathStats {
            path: path.to_owned(),
            views,
            unique_users: users.len() as u64,
        })
        .collect();
    Stats::new(query, total, users.len() as u64, paths)
}

/// Answers a stats request from a store: two engine queries over the UTC
/// day (the totals, then the paths), assembled into the original shape.
pub async fn compute(store: &dyn QueryStore, q: &StatsQuery) -> Result<Stats, StoreError> {
    use chrono::Datelike;
    // No event is stored before 1970 (timestamps before the epoch are
    // refused), and the query API's calendar starts there.
    if q.date.year() < 1970 {
        return Ok(Stats::new(q, 0, 0, Vec::new()));
    }
    let day = q.date.format("%Y-%m-%d").to_string();
    let request = |dims: serde_json::Value| {
        serde_json::json!({
            "site_id": q.site_id, "metrics": ["events", "visitors"],
            "date_range": [day, day], "dimensions": dims,
            "order_by": if dims.as_array().is_some_and(|d| d.is_empty()) {
                serde_json::Value::Null
            } else {
                serde_json::json!([["events", "desc"], ["visitors", "desc"]])
            },
            "pagination": {"limit": q.limit},
        })
    };
    let resolve = |body: serde_json::Value| {
        query::parse_request(&body)
            .and_then(|r| r.resolve(0, None))
            .map_err(|e| StoreError::Unavailable(format!("stats query: {}", e.message)))
    };
    // The event type as given, not through the API's `pageview` alias: this
    // endpoint has always named types exactly.
    let condition = |op, dimension, value: &str| {
        Filter::Condition(Condition {
            op,
            dimension,
            values: vec![value.to_owned()],
            case_sensitive: true,
        })
    };
    let mut totals = resolve(request(serde_json::json!([])))?;
    totals
        .filters
        .push(condition(FilterOp::Is, Dimension::Name, &q.event_type));
    let mut paths = resolve(request(serde_json::json!(["event:page"])))?;
    paths
        .filters
        .push(condition(FilterOp::Is, Dimension::Name, &q.event_type));
    // No path, or an empty one, is in the totals but not among the paths.
    paths
        .filters
        .push(condition(FilterOp::IsNot, Dimension::Page, query::NONE));
    let totals = query::engine::run(store, totals.into()).await?;
    let paths = query::engine::run(store, paths.into()).await?;
    let (total, users) = totals
        .rows
        .first()
        .map_or((0, 0), |r| (count(&r.metrics[0]), count(&r.metrics[1])));
    let paths = paths
        .rows
        .into_iter()
        .map(|r| PathStats {
            path: r.dimensions.into_iter().next().unwrap_or_default(),
            views: count(&r.metrics[0]),
            unique_users: count(&r.metrics[1]),
        })
        .collect();
    Ok(Stats::new(q, total, users, paths))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(site: &str, ty: &str, path: Option<&str>, user: Option<&str>, ts: i64) -> Event {
        Event {
            id: format!("{site}-{ty}-{path:?}-{user:?}-{ts}")
                .parse()
                .unwrap(),
            site_id: site.parse().unwrap(),
            event_type: ty.parse().unwrap(),
            path: path.map(Into::into),
            userid: user.map(Into::into),
            ts,
            created_at: ts,
            props: None,
            visitor: None,
            ctx: None,
        }
    }

    fn query(limit: u32) -> StatsQuery {
        StatsQuery {
            site_id: "site-001".parse().unwrap(),
            date: NaiveDate::from_ymd_opt(2025, 11, 23).unwrap(),
            event_type: "page_view".parse().unwrap(),
            limit,
        }
    }

    #[test]
    fn the_day_is_half_open_in_utc() {
        let (start, end) = query(10).day_range_ms();
        assert_eq!(start, 1_763_856_000_000); // 2025-11-23T00:00:00Z
        assert_eq!(end - start, 86_400_000);
        let events = [
            ev("site-001", "page_view", Some("/a"), None, start - 1),
            ev("site-001", "page_view", Some("/a"), None, start),
            ev("site-001", "page_view", Some("/a"), None, end - 1),
            ev("site-001", "page_view", Some("/a"), None, end),
        ];
        assert_eq!(aggregate(&events, &query(10)).total_views, 2);
    }

    #[test]
    fn counts_follow_the_contract() {
        let (t, _) = query(10).day_range_ms();
        let events = [
            ev("site-001", "page_view", Some("/pricing"), Some("u1"), t),
            ev("site-001", "page_view", Some("/pricing"), Some("u1"), t + 1),
            ev("site-001", "page_view", Some("/pricing"), Some("u2"), t + 2),
            ev("site-001", "page_view", Some("/blog"), Some("u1"), t + 3),
            ev("site-001", "page_view", Some("/blog"), Some("u3"), t + 4),
            ev("site-001", "page_view", Some("/contact"), Some("u2"), t + 5),
            ev("site-001", "page_view", Some("/contact"), Some("u3"), t + 6),
            // no path: counted in the totals, not in top_paths
            ev("site-001", "page_view", None, Some("u4"), t + 7),
            ev("site-001", "page_view", Some(""), None, t + 8),
            // empty or missing user: a view, not a user
            ev("site-001", "page_view", Some("/blog"), Some(""), t + 9),
            // other type, other site: not counted
            ev("site-001", "click", Some("/blog"), Some("u9"), t),
            ev("site-002", "page_view", Some("/blog"), Some("u9"), t),
        ];
        let s = aggregate(&events, &query(10));
        assert_eq!(s.total_views, 10);
        assert_eq!(s.unique_users, 4);
        let rows: Vec<(&str, u64, u64)> = s
            .top_paths
            .iter()
            .map(|p| (p.path.as_str(), p.views, p.unique_users))
            .collect();
        assert_eq!(
            rows,
            [("/blog", 3, 2), ("/pricing", 3, 2), ("/contact", 2, 2)]
        );
        let s = aggregate(&events, &query(1));
        assert_eq!(s.top_paths.len(), 1);
    }

    #[test]
    fn ties_break_by_users_then_path() {
        let mut rows = vec![
            PathStats {
                path: "/b".into(),
                views: 2,
                unique_users: 2,
            },
            PathStats {
                path: "/a".into(),
                views: 2,
                unique_users: 1,
            },
            PathStats {
                path: "/c".into(),
                views: 3,
                unique_users: 1,
            },
            PathStats {
                path: "/a2".into(),
                views: 2,
                unique_users: 2,
            },
        ];
        sort_paths(&mut rows);
        let order: Vec<&str> = rows.iter().map(|r| r.path.as_str()).collect();
        assert_eq!(order, ["/c", "/a2", "/b", "/a"]);
    }

    #[test]
    fn an_empty_day_is_zeros() {
        let s = aggregate(&[], &query(10));
        assert_eq!(
            (s.total_views, s.unique_users, s.top_paths.len()),
            (0, 0, 0)
        );
        assert_eq!(s.date, "2025-11-23");
        assert_eq!(s.event_type, "page_view");
    }
}
