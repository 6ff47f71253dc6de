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
}

impl Metric {
    pub const ALL: [Metric; 3] = [Metric::Visitors, Metric::Pageviews, Metric::Events];

    pub fn name(self) -> &'static str {
        match self {
            Metric::Visitors => "visitors",
            Metric::Pageviews => "pageviews",
            Metric::Events => "events",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == s)
    }

    fn of(self, t: &Totals) -> u64 {
        match self {
            Metric::Visitors => t.visitors,
            Metric::Pageviews => t.pageviews,
            Metric::Events => t.events,
        }
    }
}

/// The session fields the tracker issue fills; named now so that requests
/// naming them get a precise answer and the rollup keys have room for them.
pub const VISIT_FIELDS: [&str; 13] = [
    "source",
    "referrer",
    "utm_source",
    "utm_medium",
    "utm_campaign",
    "utm_content",
    "utm_term",
    "country",
    "browser",
    "os",
    "device",
    "entry_page",
    "exit_page",
];

/// A property of an event that answers can be grouped and filtered by.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dimension {
    /// `event:name`: the event type.
    Name,
    /// `event:page`: the path.
    Page,
    /// `event:props:<key>`.
    Prop(String),
}

impl Dimension {
    pub fn name(&self) -> String {
        match self {
            Dimension::Name => "event:name".into(),
            Dimension::Page => "event:page".into(),
            Dimension::Prop(k) => format!("event:props:{k}"),
        }
    }
}

/// The value of a dimension for an event; `(none)` when it lacks one.
/// Property values group by their text: `3` and `"3"` alike, `true` as `"true"`.
pub fn value_of<'a>(e: &'a Event, dim: &Dimension) -> Cow<'a, str> {
    match dim {
        Dimension::Name => Cow::Borrowed(&e.event_type),
        Dimension::Page => Cow::Borrowed(page_of(e)),
        Dimension::Prop(key) => match e.props.as_ref().and_then(|p| p.get(key)) {
            Some(v) => prop_text(v).unwrap_or(Cow::Borrowed(NONE)),
            None => Cow::Borrowed(NONE),
        },
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
}

impl FilterOp {
    pub fn name(self) -> &'static str {
        match self {
            FilterOp::Is => "is",
            FilterOp::IsNot => "is_not",
            FilterOp::Contains => "contains",
            FilterOp::ContainsNot => "contains_not",
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
        };
        match self.op {
            FilterOp::Is | FilterOp::Contains => any,
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

    /// Whether an event passes every filter.
    pub fn matches(&self, e: &Event) -> bool {
        let mut value = |d: &Dimension| value_of(e, d);
        self.filters.iter().all(|f| f.holds(&mut value))
    }
}

/// The metrics of one group.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub events: u64,
    pub pageviews: u64,
    pub visitors: u64,
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
            OrderKey::Metric(m) => m.of(ta).cmp(&m.of(tb)),
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
    pub metrics: Vec<u64>,
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
                metrics: query.metrics.iter().map(|m| m.of(&t)).collect(),
                dimensions,
            })
            .collect();
        let time_labels = match (query.include_time_labels, query.time_grain()) {
            (true, Some(grain)) => Some(
                time::buckets(&query.zone, grain, query.start, query.end)
                    .into_iter()
                    .map(|b| b.label)
                    .collect(),
            ),
            _ => None,
        };
        Answer {
            rows,
            total_rows: query.include_total_rows.then_some(total_rows),
            time_labels,
        }
    }

    /// The JSON answer: `{"results", "meta", "query"}`.
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
