//! Visits (sessions), with Plausible's definitions, exact whatever order
//! events arrive in.
//!
//! A visit is a visitor's events, engagement events included, with no gap
//! over [`GAP_MS`] (30 minutes) between one and the next in time (events at
//! the same instant are ordered by id). It starts at its first event and
//! ends at its last; its duration is the time between them. Its entry page
//! is the page of its first pageview, its exit page that of its last. It
//! is a bounce when it holds exactly one pageview and no interactive custom
//! event (an event other than a pageview or an engagement, not sent with
//! `interactive: false`). What a visit's first event says of where it came
//! from and on what (its [`Context`]) holds for the whole visit: internal
//! navigation does not make later pages self-referrals, and a campaign
//! holds for the visit.
//!
//! These are a function of the set of a visitor's events, not of the order
//! they arrive in: a [`Visit`] is a summary that merges ([`Visit::merge`])
//! associatively and commutatively, and an event joins every stored visit
//! it lies within [`GAP_MS`] of ([`Visit::reaches`]). An event arriving
//! late (from any time in the past, or up to 24 hours early) may extend a
//! visit at either end, or join two into one; the result is the same as if
//! events had arrived in time order. [`visits_of`] computes them directly
//! from a list of events: the reference the stores are tested against.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::event::{Context, Event};
use crate::query::{
    Answer, Dimension, GroupKey, PAGEVIEW, Query, TimeGrain, Totals, VisitField, page_of,
    visitor_of,
};

/// The longest gap between two events of one visit: 30 minutes.
pub const GAP_MS: i64 = 30 * 60 * 1000;

/// An event's place in time: its timestamp, then its id.
pub type Instant = (i64, String);

/// A page and when it was viewed (stored as `[ts, id, page]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "(i64, String, String)", from = "(i64, String, String)")]
pub struct PageAt {
    pub ts: i64,
    pub id: String,
    pub page: String,
}

impl From<PageAt> for (i64, String, String) {
    fn from(p: PageAt) -> Self {
        (p.ts, p.id, p.page)
    }
}

impl From<(i64, String, String)> for PageAt {
    fn from((ts, id, page): (i64, String, String)) -> Self {
        Self { ts, id, page }
    }
}

impl PageAt {
    fn key(&self) -> (i64, &str) {
        (self.ts, &self.id)
    }
}

/// One visit, summed up: enough to merge it with an event or another visit
/// of the same visitor, and to answer every visit metric.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Visit {
    /// The site, the visitor, the first event (when, its id) and the last
    /// event's time are kept by the stores as fields of their own (keys
    /// and indexes), not in the serialized summary.
    #[serde(skip)]
    pub site_id: String,
    #[serde(skip)]
    pub visitor: String,
    #[serde(skip)]
    pub start: i64,
    #[serde(skip)]
    pub start_id: String,
    #[serde(skip)]
    pub end: i64,
    /// The first event's context: the visit's.
    #[serde(default, skip_serializing_if = "Context::is_empty")]
    pub context: Context,
    /// First and last pageview.
    pub entry: Option<PageAt>,
    pub exit: Option<PageAt>,
    pub pageviews: u64,
    /// Events other than engagement.
    pub events: u64,
    /// Custom events (not pageviews, not engagement) sent as interactive.
    pub interactive: u64,
}

impl Visit {
    /// The visit of one event alone; `None` for an event without a visitor.
    pub fn of(e: &Event) -> Option<Visit> {
        let visitor = visitor_of(e)?;
        let pageview = e.event_type == PAGEVIEW;
        let page = pageview.then(|| PageAt {
            ts: e.ts,
            id: e.id.to_string(),
            page: page_of(e).to_owned(),
        });
        let engagement = e.is_engagement();
        let ctx = e.context();
        let mut context = ctx.clone();
        // Only what describes where the visit came from and on what.
        context.non_interactive = false;
        context.scroll_depth = None;
        context.engaged_ms = None;
        Some(Visit {
            site_id: e.site_id.to_string(),
            visitor: visitor.to_owned(),
            start: e.ts,
            start_id: e.id.to_string(),
            context,
            end: e.ts,
            entry: page.clone(),
            exit: page,
            pageviews: u64::from(pageview),
            events: u64::from(!engagement),
            interactive: u64::from(!pageview && !engagement && !ctx.non_interactive),
        })
    }

    /// Whether `ts` lies within [`GAP_MS`] of this visit (the event at
    /// `ts` belongs to it).
    pub fn reaches(&self, ts: i64) -> bool {
        self.start - GAP_MS <= ts && ts <= self.end + GAP_MS
    }

    /// Whether two visits of one visitor are one: no gap over [`GAP_MS`]
    /// between them.
    pub fn touches(&self, other: &Visit) -> bool {
        self.start - GAP_MS <= other.end && other.start <= self.end + GAP_MS
    }

    /// One visit of two (of the same visitor, touching).
    pub fn merge(mut self, other: Visit) -> Visit {
        if (other.start, other.start_id.as_str()) < (self.start, self.start_id.as_str()) {
            self.start = other.start;
            self.start_id = other.start_id;
            self.context = other.context;
        }
        self.end = self.end.max(other.end);
        self.entry = match (self.entry.take(), other.entry) {
            (Some(a), Some(b)) => Some(if b.key() < a.key() { b } else { a }),
            (a, b) => a.or(b),
        };
        self.exit = match (self.exit.take(), other.exit) {
            (Some(a), Some(b)) => Some(if b.key() > a.key() { b } else { a }),
            (a, b) => a.or(b),
        };
        self.pageviews += other.pageviews;
        self.events += other.events;
        self.interactive += other.interactive;
        self
    }

    pub fn is_bounce(&self) -> bool {
        self.pageviews == 1 && self.interactive == 0
    }

    /// From the first event to the last, in milliseconds.
    pub fn duration_ms(&self) -> i64 {
        self.end - self.start
    }
}

/// Events by (site, visitor); events without a visitor are in no visit.
pub fn by_visitor<'a>(
    events: impl IntoIterator<Item = &'a Event>,
) -> HashMap<(&'a str, &'a str), Vec<&'a Event>> {
    let mut groups: HashMap<(&str, &str), Vec<&Event>> = HashMap::new();
    for e in events {
        if let Some(v) = visitor_of(e) {
            groups.entry((e.site_id.as_str(), v)).or_default().push(e);
        }
    }
    groups
}

/// Every visit of `events` (any sites, any order): the reference.
pub fn visits_of<'a>(events: impl IntoIterator<Item = &'a Event>) -> Vec<Visit> {
    let mut visits = Vec::new();
    for (_, mut list) in by_visitor(events) {
        list.sort_by(|a, b| (a.ts, a.id.as_str()).cmp(&(b.ts, b.id.as_str())));
        let mut open: Option<Visit> = None;
        for e in list {
            let Some(one) = Visit::of(e) else { continue };
            open = Some(match open {
                Some(v) if v.reaches(e.ts) => v.merge(one),
                Some(v) => {
                    visits.push(v);
                    one
                }
                None => one,
            });
        }
        visits.extend(open);
    }
    visits
}

/// A visit-scoped query ([`Query::is_visit_scoped`]) over `visits` (any
/// site, any start): the visits of the query's site that start in its
/// range and that `passes` (the query's filters: see [`passes_alone`] and
/// [`events_of`]), grouped by the time bucket they start in and by their
/// `visit:*` value; each group's visitors, pageviews, events, visits,
/// bounces and durations.
pub fn answer<'a>(
    query: &Query,
    visits: impl IntoIterator<Item = &'a Visit>,
    passes: impl FnMut(&Visit) -> bool,
) -> Answer {
    let mut tally = Tally::new(query);
    tally.add(visits, passes);
    tally.finish()
}

/// [`answer`] taken in parts: the visits may be handed over a window at a
/// time, so that only the groups (and their visitors) stay in memory.
pub struct Tally<'q> {
    query: &'q Query,
    grain: Option<TimeGrain>,
    field: Option<VisitField>,
    groups: HashMap<GroupKey, (Totals, HashSet<String>)>,
}

impl<'q> Tally<'q> {
    pub fn new(query: &'q Query) -> Self {
        let field = match query.dimension() {
            Some(Dimension::Visit(f)) => Some(*f),
            _ => None,
        };
        Tally {
            query,
            grain: query.time_grain(),
            field,
            groups: HashMap::new(),
        }
    }

    /// Counts the visits of the query's site that start in its range and
    /// that `passes`.
    pub fn add<'a>(
        &mut self,
        visits: impl IntoIterator<Item = &'a Visit>,
        mut passes: impl FnMut(&Visit) -> bool,
    ) {
        let query = self.query;
        for v in visits {
            if v.site_id != query.site_id.as_str()
                || v.start < query.start
                || v.start >= query.end
                || !passes(v)
            {
                continue;
            }
            let key = GroupKey {
                time: self.grain.map(|g| g.label_of(&query.zone, v.start)),
                value: self.field.map(|f| f.value_of(v).to_owned()),
            };
            let (t, visitors) = self.groups.entry(key).or_default();
            t.visits += 1;
            t.bounces += u64::from(v.is_bounce());
            t.duration_ms += u64::try_from(v.duration_ms()).unwrap_or(0);
            t.pageviews += v.pageviews;
            t.events += v.events;
            if !visitors.contains(v.visitor.as_str()) {
                visitors.insert(v.visitor.clone());
            }
        }
    }

    pub fn finish(self) -> Answer {
        let groups = self
            .groups
            .into_iter()
            .map(|(k, (mut t, visitors))| {
                t.visitors = visitors.len() as u64;
                (k, t)
            })
            .collect();
        Answer::shape(self.query, groups)
    }
}

/// Whether a visit passes filters that look at visits only (`event:*`
/// values are `(none)`).
pub fn passes_alone(query: &Query, v: &Visit) -> bool {
    query.matches_pair(None, Some(v))
}

/// Where each event of a visitor lies among that visitor's visits: the
/// visits of a site by visitor, each visitor's in time order (visits of
/// one visitor never overlap).
#[derive(Debug, Default)]
pub struct VisitIndex {
    by_visitor: HashMap<String, Vec<(i64, i64, usize)>>,
}

impl VisitIndex {
    /// Indexes `visits` by position.
    pub fn new(visits: &[Visit]) -> Self {
        let mut by_visitor: HashMap<String, Vec<(i64, i64, usize)>> = HashMap::new();
        for (i, v) in visits.iter().enumerate() {
            by_visitor
                .entry(v.visitor.clone())
                .or_default()
                .push((v.start, v.end, i));
        }
        for list in by_visitor.values_mut() {
            list.sort_unstable();
        }
        Self { by_visitor }
    }

    /// The position of the visit `e` belongs to, if it is among them: the
    /// visit of its visitor whose first and last events' times hold its
    /// time.
    pub fn of(&self, e: &Event) -> Option<usize> {
        let list = self.by_visitor.get(visitor_of(e)?)?;
        let after = list.partition_point(|&(start, _, _)| start <= e.ts);
        let &(_, end, i) = list.get(after.checked_sub(1)?)?;
        (e.ts <= end).then_some(i)
    }
}

/// For a visit-scoped query whose filters look at events: which of
/// `visits` hold an event that, with its visit, passes the filters
/// (Plausible's meaning: a visit that saw `/pricing`, a visit with a
/// `Signup`). `events` may hold any events; those of other visits are
/// passed over.
pub fn events_of<'e>(
    query: &Query,
    visits: &[Visit],
    events: impl IntoIterator<Item = &'e Event>,
) -> Vec<bool> {
    let index = VisitIndex::new(visits);
    let mut passed = vec![false; visits.len()];
    for e in events {
        if e.site_id != query.site_id || e.is_engagement() {
            continue;
        }
        if let Some(i) = index.of(e)
            && !passed[i]
            && query.matches_pair(Some(e), Some(&visits[i]))
        {
            passed[i] = true;
        }
    }
    passed
}

/// What a fold does to one visitor's stored visits.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Change {
    /// Stored visits that are no more (by their start), merged into
    /// `written` ones.
    pub removed: Vec<Instant>,
    /// New or grown visits.
    pub written: Vec<Visit>,
}

/// Adds `events` (of one visitor of one site) to `stored` (that visitor's
/// stored visits, at least all those within [`GAP_MS`] of any of the
/// events), as a store's fold does: each event, in any order, merges with
/// every visit it reaches.
pub fn fold_visitor(stored: Vec<Visit>, events: &[&Event]) -> Change {
    // (visit, whether it is as stored)
    let mut visits: Vec<(Visit, bool)> = stored.into_iter().map(|v| (v, true)).collect();
    let mut removed = Vec::new();
    for e in events {
        let Some(mut visit) = Visit::of(e) else {
            continue;
        };
        let mut i = 0;
        while i < visits.len() {
            if visits[i].0.touches(&visit) {
                let (other, as_stored) = visits.swap_remove(i);
                if as_stored {
                    removed.push((other.start, other.start_id.clone()));
                }
                visit = visit.merge(other);
            } else {
                i += 1;
            }
        }
        visits.push((visit, false));
    }
    Change {
        removed,
        written: visits
            .into_iter()
            .filter(|(_, as_stored)| !as_stored)
            .map(|(v, _)| v)
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const MIN: i64 = 60_000;

    fn ev(id: &str, name: &str, path: &str, ts: i64) -> Event {
        serde_json::from_value(json!({
            "id": id, "site_id": "s", "event_type": name, "path": path,
            "userid": "u", "ts": ts, "created_at": 0,
        }))
        .unwrap()
    }

    #[test]
    fn visits_split_on_gaps_over_30_minutes_and_sum_up() {
        let mut signup = ev("c", "signup", "/p", 40 * MIN);
        signup.ctx = None;
        let events = [
            ev("a", "page_view", "/", 0),
            ev("b", "page_view", "/p", 30 * MIN), // exactly 30 minutes: same visit
            signup,
            ev("d", "page_view", "/later", 70 * MIN + 1), // 30 min and 1 ms: a new visit
        ];
        let mut visits = visits_of(&events);
        visits.sort_by_key(|v| v.start);
        assert_eq!(visits.len(), 2);
        let v = &visits[0];
        assert_eq!((v.start, v.end, v.duration_ms()), (0, 40 * MIN, 40 * MIN));
        assert_eq!(v.entry.as_ref().map(|p| p.page.as_str()), Some("/"));
        assert_eq!(v.exit.as_ref().map(|p| p.page.as_str()), Some("/p"));
        assert_eq!((v.pageviews, v.events, v.interactive), (2, 3, 1));
        assert!(!v.is_bounce());
        assert!(visits[1].is_bounce(), "one pageview, nothing else");
    }

    #[test]
    fn a_non_interactive_event_leaves_a_bounce_and_engagement_extends_the_visit() {
        let mut auto = ev("b", "video", "/", 5 * MIN);
        auto.ctx = Some(Box::new(Context {
            non_interactive: true,
            ..Context::default()
        }));
        let engagement = ev("c", "engagement", "/", 20 * MIN);
        let visits = visits_of(&[ev("a", "page_view", "/", 0), auto, engagement]);
        assert_eq!(visits.len(), 1);
        let v = &visits[0];
        assert!(v.is_bounce());
        assert_eq!(v.duration_ms(), 20 * MIN, "engagement time counts");
        assert_eq!(v.events, 2, "engagement is no event");
    }

    #[test]
    fn the_first_event_says_where_the_visit_came_from() {
        let mut first = ev("a", "page_view", "/", 0);
        first.ctx = Some(Box::new(Context {
            source: Some("Google".into()),
            ..Context::default()
        }));
        // Internal navigation has the site itself as referrer: no source.
        let second = ev("b", "page_view", "/p", MIN);
        let visits = visits_of(&[second, first]);
        assert_eq!(visits[0].context.source.as_deref(), Some("Google"));
    }

    #[test]
    fn visit_metrics_are_rounded_as_plausible_shows_them() {
        // Three visits of two visitors: from Google a bounce, and a visit
        // of three pageviews over 10 min 1 s (mean 300.5 s: 301); direct,
        // two pageviews over 61 s. Ties in visitors go by the value.
        let at = |s: i64| 1_763_900_000_000 + s * 1000;
        let mut a = ev("a", "page_view", "/", at(0));
        a.ctx = Some(Box::new(Context {
            source: Some("Google".into()),
            ..Context::default()
        }));
        let mut b = ev("b", "page_view", "/", at(3_600));
        b.ctx = a.ctx.clone();
        let mut c = ev("c", "page_view", "/x", at(3_601));
        let mut d = ev("d", "page_view", "/y", at(4_201));
        for e in [&mut c, &mut d] {
            e.ctx = a.ctx.clone();
        }
        let mut e2 = ev("e", "page_view", "/", at(10));
        let mut f2 = ev("f", "page_view", "/z", at(71));
        e2.userid = Some("w".into());
        f2.userid = Some("w".into());
        let events = [a, b, c, d, e2, f2];
        let query = crate::query::parse_request(&json!({
            "site_id": "s", "date_range": "day",
            "metrics": ["visitors", "visits", "pageviews", "bounce_rate", "visit_duration", "views_per_visit"],
            "dimensions": ["visit:source"]}))
        .unwrap()
        .resolve(at(5_000), None)
        .unwrap();
        let answer = crate::query::reference::evaluate(&events, &query).to_json(&query);
        assert_eq!(
            answer["results"],
            json!([
                {"dimensions": ["Direct / None"], "metrics": [1, 1, 2, 0, 61, 2.0]},
                {"dimensions": ["Google"], "metrics": [1, 2, 4, 50, 301, 2.0]},
            ])
        );
        let query = crate::query::parse_request(&json!({
            "site_id": "s", "date_range": "day", "metrics": ["views_per_visit", "bounce_rate"]}))
        .unwrap()
        .resolve(at(5_000), None)
        .unwrap();
        let answer = crate::query::reference::evaluate(&events, &query).to_json(&query);
        assert_eq!(
            answer["results"][0]["metrics"],
            json!([2.0, 33]),
            "6 / 3 and 1 / 3"
        );
        let none = crate::query::reference::evaluate(&[], &query).to_json(&query);
        assert_eq!(
            none["results"][0]["metrics"],
            json!([0.0, 0]),
            "no visits: zeros"
        );
    }

    /// Folding events in any order and any batches gives the visits of
    /// the whole set.
    #[test]
    fn folds_in_any_order_give_the_reference_visits() {
        use rand::{RngExt, SeedableRng, seq::SliceRandom};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for round in 0..200 {
            let n = rng.random_range(1..40);
            let mut events: Vec<Event> = (0..n)
                .map(|i| {
                    let name =
                        ["page_view", "page_view", "signup", "engagement"][rng.random_range(0..4)];
                    let ts = rng.random_range(0..(6 * 60 * MIN));
                    // Some share an instant: ids order them.
                    let ts = if rng.random_range(0..5) == 0 {
                        ts - ts % (10 * MIN)
                    } else {
                        ts
                    };
                    ev(
                        &format!("e{i:02}"),
                        name,
                        &format!("/{}", rng.random_range(0..4)),
                        ts,
                    )
                })
                .collect();
            let mut want = visits_of(&events);
            want.sort_by_key(|v| (v.start, v.start_id.clone()));
            events.shuffle(&mut rng);
            let mut stored: Vec<Visit> = Vec::new();
            for batch in events.chunks(rng.random_range(1..8)) {
                let refs: Vec<&Event> = batch.iter().collect();
                let change = fold_visitor(stored.clone(), &refs);
                stored.retain(|v| !change.removed.contains(&(v.start, v.start_id.clone())));
                stored.extend(change.written);
            }
            stored.sort_by_key(|v| (v.start, v.start_id.clone()));
            assert_eq!(stored, want, "round {round}");
        }
    }
}
