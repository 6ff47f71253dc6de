//! The analytics query: Plausible's Stats API v2 shape (`POST /api/v2/query`).
//!
//! The parts:
//! - [`parse`]: a JSON request into a validated [`Request`], then, with the
//!   clock and the site's first event, into a resolved [`Query`];
//! - [`time`]: zones, local calendars and the UTC intervals of buckets;
//! - [`reference`]: the meaning of a query, as a plain in-memory evaluation
//!   over raw events (the yardstick every store is tested against);
//! - [`engine`]: the same answer from the stores' rollups (and raw events
//!   where rollups cannot serve), fast;
//! - [`Answer`]: groups ordered, paginated and shaped, one rule for both.
//!
//! What an event contributes, in one place ([`value_of`], [`visitor_of`]):
//! `events` counts matched events, `pageviews` those named `page_view`,
//! `visitors` the distinct visitors among them (a non-empty `userid`, else
//! the cookieless visitor id). Engagement events are none of these. A value an event
//! lacks is `(none)`, for grouping and filtering alike.

pub mod engine;
pub mod goals;
pub mod parse;
pub mod reference;
pub mod time;

use std::borrow::Cow;
use std::cmp::Ordering;

use serde_json::Value;

use crate::event::{Event, SiteId};
pub use parse::{QueryError, Request, parse_request};
pub use time::{TimeGrain, Zone};

/// The value of a dimension an event lacks.
pub const NONE: &str = "(none)";
/// The stored name of a pageview.
pub const PAGEVIEW: &str = "page_view";
/// What Plausible's clients call a pageview, accepted in `event:name` filters.
pub const PLAUSIBLE_PAGEVIEW: &str = "pageview";
/// Most rows an answer holds (`pagination.limit`), and most time buckets a
/// query may ask for.
pub const MAX_ROWS: usize = 10_000;
pub const MAX_BUCKETS: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Metric {
    Visitors,
    Pageviews,
    Events,
    /// Visits ([`crate::session`]) that start in the range.
    Visits,
    /// Percent of visits that are bounces, rounded.
    BounceRate,
    /// Mean visit duration, seconds, rounded.
    VisitDuration,
    /// Pageviews per visit, to two decimals.
    ViewsPerVisit,
    /// Percent of the visitors (with the query's other filters, in the
    /// same group) who completed the goal, to two decimals. Needs an
    /// `event:goal` filter or dimension ([`goals`]).
    ConversionRate,
}

impl Metric {
    pub const ALL: [Metric; 8] = [
        Metric::Visitors,
        Metric::Pageviews,
        Metric::Events,
        Metric::Visits,
        Metric::BounceRate,
        Metric::VisitDuration,
        Metric::ViewsPerVisit,
        Metric::ConversionRate,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Metric::Visitors => "visitors",
            Metric::Pageviews => "pageviews",
            Metric::Events => "events",
            Metric::Visits => "visits",
            Metric::BounceRate => "bounce_rate",
            Metric::VisitDuration => "visit_duration",
            Metric::ViewsPerVisit => "views_per_visit",
            Metric::ConversionRate => "conversion_rate",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == s)
    }

    /// Whether it is a metric of visits: a query asking for one is
    /// answered over visits (see [`Query::is_visit_scoped`]).
    pub fn of_visits(self) -> bool {
        matches!(
            self,
            Metric::Visits | Metric::BounceRate | Metric::VisitDuration | Metric::ViewsPerVisit
        )
    }

    /// A count, or a ratio as (numerator, denominator).
    fn exact(self, t: &Totals) -> (u128, u128) {
        match self {
            Metric::Visitors => (t.visitors.into(), 1),
            Metric::Pageviews => (t.pageviews.into(), 1),
            Metric::Events => (t.events.into(), 1),
            Metric::Visits => (t.visits.into(), 1),
            Metric::BounceRate => (u128::from(t.bounces) * 100, t.visits.into()),
            Metric::VisitDuration => (t.duration_ms.into(), u128::from(t.visits) * 1000),
            Metric::ViewsPerVisit => (t.pageviews.into(), t.visits.into()),
            Metric::ConversionRate => (u128::from(t.visitors) * 100, t.base_visitors.into()),
        }
    }

    /// Orders two groups by this metric, exactly (ratios compared as
    /// fractions, not as their rounded values; no visits is 0).
    fn compare(self, a: &Totals, b: &Totals) -> Ordering {
        let (na, da) = self.exact(a);
        let (nb, db) = self.exact(b);
        let (na, da) = if da == 0 { (0, 1) } else { (na, da) };
        let (nb, db) = if db == 0 { (0, 1) } else { (nb, db) };
        (na * db).cmp(&(nb * da))
    }

    /// The value in an answer: counts as integers, the bounce rate and the
    /// visit duration rounded to integers (half up), views per visit to
    /// two decimals; 0 without visits.
    pub fn value(self, t: &Totals) -> serde_json::Number {
        let (n, d) = self.exact(t);
        match self {
            Metric::ViewsPerVisit | Metric::ConversionRate => {
                let hundredths = if d == 0 { 0 } else { (n * 200 + d) / (2 * d) };
                serde_json::Number::from_f64(hundredths as f64 / 100.0)
                    .unwrap_or_else(|| serde_json::Number::from(0))
            }
            _ => {
                let rounded = if d == 0 { 0 } else { (2 * n + d) / (2 * d) };
                serde_json::Number::from(u64::try_from(rounded).unwrap_or(u64::MAX))
            }
        }
    }
}

/// What a visit says of where it came from, on what, and where it
/// entered and left: the `visit:*` dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum VisitField {
    Source,
    Referrer,
    UtmSource,
    UtmMedium,
    UtmCampaign,
    UtmContent,
    UtmTerm,
    Country,
    Browser,
    BrowserVersion,
    Os,
    OsVersion,
    Device,
    EntryPage,
    ExitPage,
}

/// The value of `visit:source` and `visit:referrer` for a visit without
/// one: Plausible's name for it.
pub const DIRECT: &str = "Direct / None";

impl VisitField {
    pub const ALL: [VisitField; 15] = [
        VisitField::Source,
        VisitField::Referrer,
        VisitField::UtmSource,
        VisitField::UtmMedium,
        VisitField::UtmCampaign,
        VisitField::UtmContent,
        VisitField::UtmTerm,
        VisitField::Country,
        VisitField::Browser,
        VisitField::BrowserVersion,
        VisitField::Os,
        VisitField::OsVersion,
        VisitField::Device,
        VisitField::EntryPage,
        VisitField::ExitPage,
    ];

    /// The name after `visit:`.
    pub fn name(self) -> &'static str {
        match self {
            VisitField::Source => "source",
            VisitField::Referrer => "referrer",
            VisitField::UtmSource => "utm_source",
            VisitField::UtmMedium => "utm_medium",
            VisitField::UtmCampaign => "utm_campaign",
            VisitField::UtmContent => "utm_content",
            VisitField::UtmTerm => "utm_term",
            VisitField::Country => "country",
            VisitField::Browser => "browser",
            VisitField::BrowserVersion => "browser_version",
            VisitField::Os => "os",
            VisitField::OsVersion => "os_version",
            VisitField::Device => "device",
            VisitField::EntryPage => "entry_page",
            VisitField::ExitPage => "exit_page",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.name() == s)
    }

    /// A visit's value: from its first event's context, its entry or exit
    /// page; [`DIRECT`] for a visit without a source or referrer, `(none)`
    /// for a value it lacks otherwise.
    pub fn value_of(self, v: &crate::session::Visit) -> &str {
        let value = match self {
            VisitField::EntryPage => v.entry.as_ref().map(|p| p.page.as_str()),
            VisitField::ExitPage => v.exit.as_ref().map(|p| p.page.as_str()),
            other => v.context.text(other.name()),
        };
        match (value.filter(|s| !s.is_empty()), self) {
            (Some(s), _) => s,
            (None, VisitField::Source | VisitField::Referrer) => DIRECT,
            (None, _) => NONE,
        }
    }
}

/// A property of an event that answers can be grouped and filtered by.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dimension {
    /// `event:name`: the event type.
    Name,
    /// `event:page`: the path.
    Page,
    /// `event:props:<key>`.
    Prop(String),
    /// `visit:<field>`: a value of the visit, not of each event.
    Visit(VisitField),
    /// `event:goal`: the site's goals an event completes ([`goals`]). An
    /// event may complete several, so it is no value of the event: filters
    /// on it are made conditions on names and pages when the query is
    /// resolved, and a query grouped by it is answered goal by goal.
    Goal,
}

impl Dimension {
    pub fn name(&self) -> String {
        match self {
            Dimension::Name => "event:name".into(),
            Dimension::Page => "event:page".into(),
            Dimension::Prop(k) => format!("event:props:{k}"),
            Dimension::Visit(f) => format!("visit:{}", f.name()),
            Dimension::Goal => "event:goal".into(),
        }
    }
}

/// The value of a dimension for an event; `(none)` when it lacks one.
/// Property values group by their text: `3` and `"3"` alike, `true` as `"true"`.
/// A `visit:*` dimension is the visit's, not the event's: queries that
/// name one are answered over visits ([`crate::session::answer`]), and an
/// event alone has `(none)`.
pub fn value_of<'a>(e: &'a Event, dim: &Dimension) -> Cow<'a, str> {
    match dim {
        Dimension::Name => Cow::Borrowed(&e.event_type),
        Dimension::Page => Cow::Borrowed(page_of(e)),
        Dimension::Prop(key) => match e.props.as_ref().and_then(|p| p.get(key)) {
            Some(v) => prop_text(v).unwrap_or(Cow::Borrowed(NONE)),
            None => Cow::Borrowed(NONE),
        },
        Dimension::Visit(_) | Dimension::Goal => Cow::Borrowed(NONE),
    }
}

/// The path of an event, `(none)` when it has none (or an empty one).
pub fn page_of(e: &Event) -> &str {
    match e.path.as_deref() {
        Some(p) if !p.is_empty() => p,
        _ => NONE,
    }
}

/// The text a property value groups by; `None` for null (it has no value).
pub fn prop_text(v: &Value) -> Option<Cow<'_, str>> {
    match v {
        Value::Null => None,
        Value::String(s) => Some(Cow::Borrowed(s)),
        Value::Bool(b) => Some(Cow::Borrowed(if *b { "true" } else { "false" })),
        other => Some(Cow::Owned(other.to_string())),
    }
}

/// The visitor an event counts for, if any: its non-empty `userid`, else
/// its cookieless visitor id.
pub fn visitor_of(e: &Event) -> Option<&str> {
    e.userid
        .as_deref()
        .filter(|u| !u.is_empty())
        .or(e.visitor.as_deref())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterOp {
    Is,
    IsNot,
    Contains,
    ContainsNot,
    /// The value matches one of the patterns: `*` any characters but `/`,
    /// `**` any at all (page goals; not a v2 operator of its own).
    Matches,
}

impl FilterOp {
    pub fn name(self) -> &'static str {
        match self {
            FilterOp::Is => "is",
            FilterOp::IsNot => "is_not",
            FilterOp::Contains => "contains",
            FilterOp::ContainsNot => "contains_not",
            FilterOp::Matches => "matches_wildcard",
        }
    }
}

/// One condition on one dimension's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub op: FilterOp,
    pub dimension: Dimension,
    /// As compared: lowercased already when not case-sensitive, `pageview`
    /// already `page_view` for `event:name`.
    pub values: Vec<String>,
    pub case_sensitive: bool,
}

impl Condition {
    /// Whether a value passes.
    pub fn holds(&self, value: &str) -> bool {
        let lowered;
        let value = if self.case_sensitive {
            value
        } else {
            lowered = value.to_lowercase();
            &lowered
        };
        let any = match self.op {
            FilterOp::Is | FilterOp::IsNot => self.values.iter().any(|v| v == value),
            FilterOp::Contains | FilterOp::ContainsNot => {
                self.values.iter().any(|v| value.contains(v.as_str()))
            }
            FilterOp::Matches => self
                .values
                .iter()
                .any(|p| crate::sites::page_matches(p, value)),
        };
        match self.op {
            FilterOp::Is | FilterOp::Contains | FilterOp::Matches => any,
            FilterOp::IsNot | FilterOp::ContainsNot => !any,
        }
    }
}

/// A filter: conditions joined by `and`, `or`, `not`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    Condition(Condition),
    And(Vec<Filter>),
    Or(Vec<Filter>),
    Not(Box<Filter>),
}

impl Filter {
    /// Whether an event whose dimension values `value` gives passes.
    pub fn holds<'a>(&self, value: &mut impl FnMut(&Dimension) -> Cow<'a, str>) -> bool {
        match self {
            Filter::Condition(c) => c.holds(&value(&c.dimension)),
            Filter::And(fs) => fs.iter().all(|f| f.holds(value)),
            Filter::Or(fs) => fs.iter().any(|f| f.holds(value)),
            Filter::Not(f) => !f.holds(value),
        }
    }

    /// Every dimension the filter looks at.
    pub fn dimensions(&self, out: &mut Vec<Dimension>) {
        match self {
            Filter::Condition(c) => {
                if !out.contains(&c.dimension) {
                    out.push(c.dimension.clone());
                }
            }
            Filter::And(fs) | Filter::Or(fs) => fs.iter().for_each(|f| f.dimensions(out)),
            Filter::Not(f) => f.dimensions(out),
        }
    }
}

/// One requested dimension, in the order the request gave them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dim {
    Time(TimeGrain),
    Event(Dimension),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Asc,
    Desc,
}

/// What an `order_by` entry sorts by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderKey {
    Metric(Metric),
    /// The position in the query's dimensions.
    Dimension(usize),
}

/// A resolved query: every default filled in, the range as UTC instants.
#[derive(Debug, Clone)]
pub struct Query {
    pub site_id: SiteId,
    pub metrics: Vec<Metric>,
    pub zone: Zone,
    /// `[start, end)` in epoch milliseconds.
    pub start: i64,
    pub end: i64,
    pub dims: Vec<Dim>,
    /// All must hold.
    pub filters: Vec<Filter>,
    pub order_by: Vec<(OrderKey, Direction)>,
    pub limit: usize,
    pub offset: usize,
    pub include_total_rows: bool,
    pub include_time_labels: bool,
    /// The query in normal form, as echoed in the answer.
    pub echo: Value,
    /// With an `event:goal` dimension: each of the site's goals (those the
    /// filters leave) by name, with the filter of what completes it.
    pub goals: Option<Vec<(String, Filter)>>,
    /// The filters but those on `event:goal`: whose visitors are the
    /// denominator of `conversion_rate`.
    pub base_filters: Vec<Filter>,
}

impl Query {
    pub fn time_grain(&self) -> Option<TimeGrain> {
        self.dims.iter().find_map(|d| match d {
            Dim::Time(g) => Some(*g),
            Dim::Event(_) => None,
        })
    }

    pub fn dimension(&self) -> Option<&Dimension> {
        self.dims.iter().find_map(|d| match d {
            Dim::Event(d) => Some(d),
            Dim::Time(_) => None,
        })
    }

    /// Whether the query is answered over visits rather than events: it
    /// asks a visit metric, or groups by a `visit:*` dimension. Then visits
    /// that start in the range are counted, in the time bucket they start
    /// in, with their visitors, pageviews and events.
    pub fn is_visit_scoped(&self) -> bool {
        self.metrics.iter().any(|m| m.of_visits())
            || matches!(self.dimension(), Some(Dimension::Visit(_)))
    }

    /// Every dimension the filters look at.
    pub fn filter_dimensions(&self) -> Vec<Dimension> {
        let mut dims = Vec::new();
        for f in &self.filters {
            f.dimensions(&mut dims);
        }
        dims
    }

    /// Whether the filters look at an event's own values (`event:*`).
    pub fn filters_events(&self) -> bool {
        self.filter_dimensions()
            .iter()
            .any(|d| !matches!(d, Dimension::Visit(_)))
    }

    /// Whether the filters look at a visit's values (`visit:*`).
    pub fn filters_visits(&self) -> bool {
        self.filter_dimensions()
            .iter()
            .any(|d| matches!(d, Dimension::Visit(_)))
    }

    /// Whether an event passes every filter, looking at its own values
    /// only (`visit:*` values are `(none)`).
    pub fn matches(&self, e: &Event) -> bool {
        let mut value = |d: &Dimension| value_of(e, d);
        self.filters.iter().all(|f| f.holds(&mut value))
    }

    /// Whether an event of a visit, or a visit with one of its events,
    /// passes every filter: `event:*` values are the event's, `visit:*`
    /// values the visit's. A missing event has `(none)` for every value
    /// (as a missing visit has, but `Direct / None` for its source and
    /// referrer).
    pub fn matches_pair(&self, e: Option<&Event>, v: Option<&crate::session::Visit>) -> bool {
        Self::pair_passes(&self.filters, e, v)
    }

    /// [`Query::matches_pair`] with other filters.
    pub fn pair_passes(
        filters: &[Filter],
        e: Option<&Event>,
        v: Option<&crate::session::Visit>,
    ) -> bool {
        let mut value = |d: &Dimension| match (d, e, v) {
            (Dimension::Visit(f), _, Some(v)) => Cow::Borrowed(f.value_of(v)),
            (Dimension::Visit(VisitField::Source | VisitField::Referrer), _, None) => {
                Cow::Borrowed(DIRECT)
            }
            (Dimension::Visit(_), _, None) => Cow::Borrowed(NONE),
            (d, Some(e), _) => value_of(e, d),
            (_, None, _) => Cow::Borrowed(NONE),
        };
        filters.iter().all(|f| f.holds(&mut value))
    }
}

/// The metrics of one group.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub events: u64,
    pub pageviews: u64,
    pub visitors: u64,
    /// Visits, their bounces and their durations summed (visit-scoped
    /// queries only).
    pub visits: u64,
    pub bounces: u64,
    pub duration_ms: u64,
    /// The visitors `conversion_rate` divides by.
    pub base_visitors: u64,
}

/// A group's key: its time bucket label and its dimension value, when the
/// query has them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupKey {
    pub time: Option<String>,
    pub value: Option<String>,
}

/// A group's dimension values, in the order of the query's dimensions.
pub fn row_dimensions(query: &Query, key: &GroupKey) -> Vec<String> {
    query
        .dims
        .iter()
        .map(|d| match d {
            Dim::Time(_) => key.time.clone().unwrap_or_default(),
            Dim::Event(_) => key.value.clone().unwrap_or_default(),
        })
        .collect()
}

/// The order of an answer's rows: the query's `order_by`, then the
/// dimension values (so that the order is total: no two groups share them).
pub fn row_order(
    query: &Query,
    da: &[String],
    ta: &Totals,
    db: &[String],
    tb: &Totals,
) -> Ordering {
    for (key, dir) in &query.order_by {
        let ord = match key {
            OrderKey::Metric(m) => m.compare(ta, tb),
            OrderKey::Dimension(i) => da.get(*i).cmp(&db.get(*i)),
        };
        let ord = match dir {
            Direction::Asc => ord,
            Direction::Desc => ord.reverse(),
        };
        if ord != Ordering::Equal {
            return ord;
        }
    }
    da.cmp(db)
}

/// One row of an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub metrics: Vec<serde_json::Number>,
    pub dimensions: Vec<String>,
}

/// An answer: rows after ordering and pagination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub rows: Vec<Row>,
    /// Rows before pagination, when the query asks (`include.total_rows`):
    /// an evaluator that reads only the groups that can make a top list
    /// does not know it otherwise.
    pub total_rows: Option<usize>,
    pub time_labels: Option<Vec<String>>,
}

impl Answer {
    /// Orders, paginates and shapes groups; one rule for every evaluator.
    /// Without dimensions there is exactly one row, zeros if nothing matched.
    pub fn shape(query: &Query, groups: Vec<(GroupKey, Totals)>) -> Answer {
        let total_rows = groups.len().max(usize::from(query.dims.is_empty()));
        Self::shape_top(query, groups, total_rows)
    }

    /// [`Answer::shape`] of groups that hold at least the first
    /// `offset + limit` groups of the whole answer in its order (the others
    /// are known to come after them), of `total_rows` groups in all.
    pub fn shape_top(query: &Query, groups: Vec<(GroupKey, Totals)>, total_rows: usize) -> Answer {
        let rows = groups
            .into_iter()
            .map(|(key, totals)| (row_dimensions(query, &key), totals))
            .collect();
        Self::shape_rows(query, rows, total_rows)
    }

    /// [`Answer::shape_top`] of rows whose dimension values are laid out
    /// already ([`row_dimensions`]).
    pub fn shape_rows(
        query: &Query,
        mut rows: Vec<(Vec<String>, Totals)>,
        total_rows: usize,
    ) -> Answer {
        if query.dims.is_empty() && rows.is_empty() {
            rows.push((Vec::new(), Totals::default()));
        }
        rows.sort_by(|(da, ta), (db, tb)| row_order(query, da, ta, db, tb));
        let rows = rows
            .into_iter()
            .skip(query.offset)
            .take(query.limit)
            .map(|(dimensions, t)| Row {
                metrics: query.metrics.iter().map(|m| m.value(&t)).collect(),
                dimensions,
            })
            .collect();
        Answer {
            rows,
            total_rows: query.include_total_rows.then_some(total_rows),
            time_labels: Self::labels(query),
        }
    }

    /// Every bucket label of the query's range, when it asks for them.
    pub fn labels(query: &Query) -> Option<Vec<String>> {
        match (query.include_time_labels, query.time_grain()) {
            (true, Some(grain)) => Some(
                time::buckets(&query.zone, grain, query.start, query.end)
                    .into_iter()
                    .map(|b| b.label)
                    .collect(),
            ),
            _ => None,
        }
    }

    /// The JSON answer: `{"results", "meta", "query"}`.
    /// The rows as CSV: a header of the query's dimensions then metrics
    /// (their names as asked), one line per row. A dimension value that a
    /// spreadsheet would take for a formula (it starts with `=`, `+`, `-`,
    /// `@`, a tab or a carriage return) gets a leading `'`, as OWASP
    /// advises against CSV injection; metrics are numbers and stay as they
    /// are.
    pub fn to_csv(&self, query: &Query) -> Vec<u8> {
        let names = |key: &str| -> Vec<String> {
            query.echo[key]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        };
        let mut out = csv::Writer::from_writer(Vec::new());
        let header: Vec<String> = names("dimensions")
            .into_iter()
            .chain(names("metrics"))
            .collect();
        // Writing to a Vec fails only on a record of the wrong length,
        // which a shaped answer never has.
        let _ = out.write_record(&header);
        for row in &self.rows {
            let record = row
                .dimensions
                .iter()
                .map(|d| match d.starts_with(['=', '+', '-', '@', '\t', '\r']) {
                    true => format!("'{d}"),
                    false => d.clone(),
                })
                .chain(row.metrics.iter().map(|m| m.to_string()));
            let _ = out.write_record(record);
        }
        out.into_inner().unwrap_or_default()
    }

    pub fn to_json(&self, query: &Query) -> Value {
        let results: Vec<Value> = self
            .rows
            .iter()
            .map(|r| serde_json::json!({"metrics": r.metrics, "dimensions": r.dimensions}))
            .collect();
        let mut meta = serde_json::Map::new();
        if let Some(total_rows) = self.total_rows {
            meta.insert("total_rows".into(), total_rows.into());
        }
        if let Some(labels) = &self.time_labels {
            meta.insert("time_labels".into(), labels.clone().into());
        }
        serde_json::json!({"results": results, "meta": meta, "query": query.echo})
    }
}
