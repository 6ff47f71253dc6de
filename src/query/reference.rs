//! The meaning of a query, as a plain evaluation over raw events in memory.
//!
//! The yardstick every store is tested against: written to be obviously
//! right, not fast (it holds every visitor id of every group).

use std::collections::{HashMap, HashSet};

use super::{Answer, Dimension, GroupKey, Metric, PAGEVIEW, Query, Totals, value_of, visitor_of};
use crate::event::Event;
use crate::session;

/// Aggregates `events` (any site, any time) as `query` asks.
pub fn evaluate<'a>(events: impl IntoIterator<Item = &'a Event>, query: &Query) -> Answer {
    let events: Vec<&Event> = events
        .into_iter()
        .filter(|e| e.site_id == query.site_id)
        .collect();
    // Visits of the whole set of the site's events, however long ago they
    // started (a visit belongs to the range it starts in).
    let visits = match query.is_visit_scoped() || query.filters_visits() {
        true => session::visits_of(events.iter().copied()),
        false => Vec::new(),
    };
    if query.is_visit_scoped() {
        if query.filters_events() {
            // The visits with an event that passes the filters with them.
            let passed = session::events_of(query, &visits, events.iter().copied());
            let kept = visits
                .iter()
                .zip(passed)
                .filter(|(_, p)| *p)
                .map(|(v, _)| v);
            return session::answer(query, kept, |_| true);
        }
        return session::answer(query, &visits, |v| session::passes_alone(query, v));
    }
    let index = session::VisitIndex::new(&visits);
    let grain = query.time_grain();
    let dimension = query.dimension();
    let mut groups: HashMap<GroupKey, (u64, u64, HashSet<&str>)> = HashMap::new();
    // The denominator of `conversion_rate`: visitors by time bucket (and
    // dimension value, but for event:goal) with the filters but those on
    // goals.
    let mut base: HashMap<GroupKey, HashSet<&str>> = HashMap::new();
    let converting = query.metrics.contains(&Metric::ConversionRate);
    for e in events {
        if e.ts < query.start || e.ts >= query.end {
            continue;
        }
        if e.is_engagement() {
            continue;
        }
        // Each event with its visit, when the filters look at visits.
        let visit = index.of(e).map(|i| &visits[i]);
        let time = grain.map(|g| g.label_of(&query.zone, e.ts));
        if converting && Query::pair_passes(&query.base_filters, Some(e), visit) {
            let value = dimension
                .filter(|d| **d != Dimension::Goal)
                .map(|d| value_of(e, d).into_owned());
            let key = GroupKey {
                time: time.clone(),
                value,
            };
            base.entry(key).or_default().extend(visitor_of(e));
        }
        if !query.matches_pair(Some(e), visit) {
            continue;
        }
        // The groups the event is in: one, or one per goal it completes.
        let values: Vec<Option<String>> = match (dimension, &query.goals) {
            (Some(Dimension::Goal), Some(goals)) => goals
                .iter()
                .filter(|(_, f)| f.holds(&mut |d: &Dimension| value_of(e, d)))
                .map(|(name, _)| Some(name.clone()))
                .collect(),
            (Some(Dimension::Goal), None) => Vec::new(),
            (d, _) => vec![d.map(|d| value_of(e, d).into_owned())],
        };
        for value in values {
            let key = GroupKey {
                time: time.clone(),
                value,
            };
            let group = groups.entry(key).or_default();
            group.0 += 1;
            if e.event_type == PAGEVIEW {
                group.1 += 1;
            }
            group.2.extend(visitor_of(e));
        }
    }
    let groups: Vec<(GroupKey, Totals)> = groups
        .into_iter()
        .map(|(key, (events, pageviews, visitors))| {
            let base_key = GroupKey {
                time: key.time.clone(),
                value: key
                    .value
                    .clone()
                    .filter(|_| dimension != Some(&Dimension::Goal)),
            };
            let base_visitors = base.get(&base_key).map_or(0, |b| b.len() as u64);
            (
                key,
                Totals {
                    events,
                    pageviews,
                    visitors: visitors.len() as u64,
                    base_visitors,
                    ..Totals::default()
                },
            )
        })
        .collect();
    if query.dims.is_empty() && groups.is_empty() && converting {
        // One row of zeros, with the denominator it still has.
        let t = Totals {
            base_visitors: base.get(&GroupKey::default()).map_or(0, |b| b.len() as u64),
            ..Totals::default()
        };
        return Answer::shape(query, vec![(GroupKey::default(), t)]);
    }
    Answer::shape(query, groups)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::query::parse_request;
    use serde_json::{Value, json};

    fn ev(
        id: u32,
        name: &str,
        path: Option<&str>,
        user: Option<&str>,
        ts: &str,
        props: Value,
    ) -> Event {
        Event {
            id: id.to_string().parse().unwrap(),
            site_id: "s".parse().unwrap(),
            event_type: name.parse().unwrap(),
            path: path.map(Into::into),
            userid: user.map(Into::into),
            ts: chrono::DateTime::parse_from_rfc3339(ts)
                .unwrap()
                .timestamp_millis(),
            created_at: 0,
            props: props.as_object().cloned(),
            visitor: None,
            ctx: None,
        }
    }

    fn run(events: &[Event], body: Value) -> Vec<(Vec<String>, Vec<u64>)> {
        let q = parse_request(&body)
            .unwrap()
            .resolve(1_763_916_271_000, None)
            .unwrap();
        evaluate(events, &q)
            .rows
            .into_iter()
            .map(|r| {
                let counts = r.metrics.iter().filter_map(|m| m.as_u64()).collect();
                (r.dimensions, counts)
            })
            .collect()
    }

    fn d(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn groups_filters_and_none_follow_the_contract() {
        let events = [
            ev(
                1,
                "page_view",
                Some("/a"),
                Some("u1"),
                "2025-11-03T10:00:00Z",
                json!({"plan": "pro"}),
            ),
            ev(
                2,
                "page_view",
                Some("/a"),
                Some("u2"),
                "2025-11-03T11:00:00Z",
                json!({"plan": 3}),
            ),
            ev(
                3,
                "page_view",
                Some("/b"),
                Some("u1"),
                "2025-11-03T12:00:00Z",
                json!({"plan": "3"}),
            ),
            ev(
                4,
                "signup",
                Some("/b"),
                Some(""),
                "2025-11-03T13:00:00Z",
                json!({"plan": null}),
            ),
            ev(
                5,
                "page_view",
                None,
                None,
                "2025-11-04T00:00:00Z",
                json!(null),
            ),
        ];
        let base = json!({"site_id": "s", "metrics": ["visitors", "pageviews", "events"],
            "date_range": ["2025-11-03", "2025-11-03"]});
        let with = |extra: Value| {
            let mut b = base.clone();
            for (k, v) in extra.as_object().unwrap() {
                b[k] = v.clone();
            }
            b
        };
        // The last event is on the 4th: out of range.
        assert_eq!(run(&events, base.clone()), [(d(&[]), vec![2, 3, 4])]);
        assert_eq!(
            run(&events, with(json!({"dimensions": ["event:props:plan"]}))),
            [
                (d(&["3"]), vec![2, 2, 2]),
                (d(&["pro"]), vec![1, 1, 1]),
                (d(&["(none)"]), vec![0, 0, 1]),
            ]
        );
        assert_eq!(
            run(
                &events,
                with(json!({"filters": [["is", "event:props:plan", ["(none)"]]]}))
            ),
            [(d(&[]), vec![0, 0, 1])]
        );
        assert_eq!(
            run(
                &events,
                with(json!({"dimensions": ["event:page"],
                "filters": [["is_not", "event:name", ["pageview"]]]}))
            ),
            [(d(&["/b"]), vec![0, 0, 1])]
        );
        // In Asia/Tokyo, 2025-11-04 starts at 2025-11-03T15:00Z: the last two count.
        assert_eq!(
            run(
                &events,
                with(
                    json!({"timezone": "Asia/Tokyo", "date_range": ["2025-11-04", "2025-11-04"],
                "dimensions": ["time:day"]})
                )
            ),
            [(d(&["2025-11-04"]), vec![0, 1, 1])]
        );
        // An empty range without dimensions is one row of zeros.
        assert_eq!(
            run(
                &events,
                with(json!({"date_range": ["2025-01-01", "2025-01-01"]}))
            ),
            [(d(&[]), vec![0, 0, 0])]
        );
    }
}
