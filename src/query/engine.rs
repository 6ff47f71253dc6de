//! Answers queries from the stores' rollups, exactly.
//!
//! Three steps, only the middle one in the store:
//! 1. [`plan`]: which rollup rows and which raw events answer the query
//!    (pure: the query, the zone's calendar and [`crate::rollup::cover`]);
//! 2. the store reads them, in one snapshot, and hands each to an
//!    [`Aggregator`] as it goes (nothing is collected first: a large answer
//!    costs its groups, not its rows);
//! 3. [`Aggregator::finish`]: the groups, ordered and shaped.
//!
//! Rollups serve a query when everything it groups or filters by, besides
//! the event name (part of every rollup row), is one dimension: rows of that
//! dimension then say exactly which events pass. Otherwise the query reads
//! the raw events of its range, still exact, within the query time limit.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use roaring::RoaringBitmap;

use super::time::buckets;
use super::{
    Answer, Dimension, Direction, Filter, FilterOp, GroupKey, Metric, NONE, OrderKey, PAGEVIEW,
    Query, Totals, row_dimensions, row_order, value_of, visitor_of,
};
use crate::event::{Event, SiteId};
use crate::rollup::{self, DIM_KEYS, DIM_PAGE, Level, PROP_PREFIX, Piece};
use crate::session::{self, Visit};
use crate::store::{QueryStore, StoreError};

/// Rollup rows of one dimension to read, optionally only some values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollupRead {
    pub dim: String,
    pub values: Option<Vec<String>>,
}

/// Buckets `[from, to)` (bucket starts, epoch ms) of one level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub level: Level,
    pub from: i64,
    pub to: i64,
}

/// What a store reads for a query.
#[derive(Debug, Clone)]
pub struct Plan {
    pub site_id: SiteId,
    pub reads: Vec<RollupRead>,
    /// The rollup buckets, as runs of consecutive buckets per level.
    pub spans: Vec<Span>,
    /// Month buckets whose rows only bound the groups' visitors from above
    /// (see [`Aggregator::add_row`]): they let the aggregator decode fewer
    /// bitmaps. Optional: a store whose reads cost per row, not per byte,
    /// and that hands over bitmaps with their rows anyway (MongoDB), reads
    /// fewer rows without them, and then calls
    /// [`Aggregator::without_month_bounds`] (the bound holds only with
    /// every month the range overlaps read).
    pub bound_spans: Vec<Span>,
    /// Raw events of these ranges `[start, end)`.
    pub raw: Vec<(i64, i64)>,
    /// The first and last UTC day (their starts) of the rollup buckets
    /// below the month level: the store reads what it keeps of these days
    /// ([`crate::rollup::DayState`]) and hands it to
    /// [`Aggregator::use_density`] before reading rows.
    pub fine_days: Option<(i64, i64)>,
    /// Whether the query looks at no event name (neither groups nor
    /// filters by one): a store that keeps rows of every name together
    /// ([`RowRef::pageviews`]) may read those instead of one row per name.
    pub any_name: bool,
    /// Whether raw events need their visitor's dictionary id (they are
    /// combined with rollups), or only the visitor itself.
    pub raw_vids: bool,
    /// Whether the query looks at raw events' properties at all.
    pub raw_props: bool,
    /// A cheap test a store may apply to raw events before reading them
    /// (all optional: every event read is checked by the query's filters
    /// anyway): of each list, the event's properties as stored (compact
    /// JSON) contain at least one of the strings. Derived from top-level
    /// `is` and `contains` conditions on properties: an event whose
    /// property value is (or contains) `v` has `v` verbatim in its JSON,
    /// for values that JSON does not escape.
    pub raw_needles: Vec<Vec<String>>,
    /// Another such test: when set, only events whose page (`path`) is one
    /// of these can pass. Derived from a top-level, case-sensitive `is`
    /// condition on `event:page` whose values are all real paths.
    pub raw_pages: Option<Vec<String>>,
}

/// One rollup row as a store reads it.
#[derive(Debug, Clone, Copy)]
pub struct RowRef<'a> {
    pub dim: &'a str,
    pub level: Level,
    pub bucket: i64,
    pub value: &'a str,
    pub name: &'a str,
    pub events: u64,
    /// `None` for a row of one name (its events are page views if the
    /// name is `page_view`). A row of every name together (only read for
    /// a plan's [`Plan::any_name`]) says how many of its events are page
    /// views; its `name` is meaningless.
    pub pageviews: Option<u64>,
    pub visitors: Bits<'a>,
}

/// A rollup row's visitors bitmap, as a store reads it.
#[derive(Debug, Clone, Copy)]
pub enum Bits<'a> {
    /// The bitmap's bytes.
    Bytes(&'a [u8]),
    /// Only its cardinality, and where the store keeps it: the store reads
    /// it by that id for the groups [`Aggregator::select`] must count.
    Stored { id: i64, cardinality: u64 },
}

/// The one dimension besides the name that rollups can serve a query by.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Family {
    /// Nothing but the name: the `keys` rows are the totals.
    Totals,
    Page,
    Prop(String),
}

impl Family {
    fn dimension(&self) -> Option<Dimension> {
        match self {
            Family::Totals => None,
            Family::Page => Some(Dimension::Page),
            Family::Prop(k) => Some(Dimension::Prop(k.clone())),
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Group {
    events: u64,
    pageviews: u64,
    visitors: Visitors,
}

/// A group's visitors: those united so far, and stored bitmaps not decoded
/// yet, of which only the cardinalities (in their headers) are known. A top
/// list needs exact counts for its own rows only: for the rest, bounds
/// (the largest bitmap, the sum of all) are enough to know they come later
/// (see [`Aggregator::select`]).
#[derive(Debug, Clone, Default)]
struct Visitors {
    united: RoaringBitmap,
    pending: Vec<Pending>,
    pending_max: u64,
    pending_sum: u64,
    pending_bytes: usize,
}

#[derive(Debug, Clone)]
enum Pending {
    Bytes(Vec<u8>),
    Stored(i64),
}

/// The longest top list (offset and limit) [`Aggregator::bounded_page_top`]
/// reads page by page; longer ones read every page's rows.
const MAX_BOUNDED_TOP: usize = 1_000;

/// Bytes of undecoded bitmaps an aggregator holds at most; past it, groups
/// are united as their rows come (as if every group were needed).
const PENDING_BYTES: usize = 64 << 20;

impl Visitors {
    /// Fewest and most visitors the group can have.
    fn bounds(&self) -> (u64, u64) {
        let united = self.united.len();
        (united.max(self.pending_max), united + self.pending_sum)
    }

    /// Decodes and unites the pending bitmaps (those a store keeps read
    /// through `load`); `false` if one is missing or corrupt.
    fn settle(&mut self, load: &mut dyn FnMut(i64) -> Option<Vec<u8>>) -> bool {
        self.pending_max = 0;
        self.pending_sum = 0;
        self.pending_bytes = 0;
        for p in self.pending.drain(..) {
            let bytes = match p {
                Pending::Bytes(b) => Some(b),
                Pending::Stored(id) => load(id),
            };
            match bytes.as_deref().and_then(rollup::decode) {
                Some(b) => self.united |= b,
                None => return false,
            }
        }
        true
    }

    /// The exact count: without decoding when the bounds meet (one bitmap).
    fn count(&mut self, load: &mut dyn FnMut(i64) -> Option<Vec<u8>>) -> Option<u64> {
        let (lo, hi) = self.bounds();
        if lo == hi {
            Some(lo)
        } else if self.settle(load) {
            Some(self.united.len())
        } else {
            None
        }
    }
}

#[derive(Clone)]
enum Mode {
    /// Rollup rows, plus raw events in the slivers no bucket covers.
    Rollups {
        family: Family,
        /// Which query bucket each rollup bucket belongs to.
        owners: HashMap<Piece, usize>,
        /// The buckets of days too sparse to keep rows of their level, read
        /// from the raw events instead ([`Aggregator::use_density`]), and
        /// their query bucket.
        raw_pieces: HashMap<Piece, usize>,
        /// The raw slivers and their query bucket.
        slivers: Vec<(i64, i64, usize)>,
        /// Query buckets' labels (`None` without a time dimension).
        labels: Vec<Option<String>>,
        /// The months the range overlaps, when their rows bound the groups'
        /// visitors (see [`Aggregator::add_row`]).
        bound_months: Vec<i64>,
    },
    /// Raw events only; visitors numbered as they come.
    Raw { visitors: HashMap<String, u32> },
}

/// A group's dimension values ([`row_dimensions`]) and totals.
type LaidOut = (Vec<String>, Totals);

/// Collects what a store reads into groups. See the module docs. A store
/// that may have to read again (a transaction to retry) starts from a
/// clone taken before its reads.
#[derive(Clone)]
pub struct Aggregator {
    query: Arc<Query>,
    mode: Mode,
    groups: HashMap<GroupKey, Group>,
    /// Bytes of undecoded bitmaps held by the groups.
    pending_bytes: usize,
    /// Per group, the visitors of the months its range overlaps, counted
    /// with repeats: at least its visitors.
    bounds: HashMap<GroupKey, u64>,
    /// The counted groups ([`Aggregator::select`]) and the number of groups.
    selected: Option<(Vec<LaidOut>, usize)>,
    /// A stored bitmap that did not decode: the answer would be wrong.
    corrupt: bool,
    /// Decides, after the query's own tests, whether a raw event counts
    /// (a test that needs more than the event: its visit).
    gate: Option<Gate>,
}

/// See [`Aggregator::gate`].
pub type Gate = Arc<dyn Fn(&Event) -> bool + Send + Sync>;

/// The plan for a query, and the aggregator its reads go into, for a store
/// that keeps rollups.
pub fn plan(query: Arc<Query>) -> (Plan, Aggregator) {
    plan_for(query, true)
}

/// The plan for a query: from rollups where they serve it (and the store
/// keeps them), else from the raw events.
pub fn plan_for(query: Arc<Query>, rollups: bool) -> (Plan, Aggregator) {
    let mut dims = Vec::new();
    for f in &query.filters {
        f.dimensions(&mut dims);
    }
    if let Some(d) = query.dimension()
        && !dims.contains(d)
    {
        dims.push(d.clone());
    }
    let raw_props = dims.iter().any(|d| matches!(d, Dimension::Prop(_)));
    let raw_needles = needles(&query.filters);
    let raw_pages = pages_wanted(&query.filters);
    let any_name = !dims.contains(&Dimension::Name);
    dims.retain(|d| *d != Dimension::Name);
    let family = match dims.as_slice() {
        _ if !rollups => None,
        [] => Some(Family::Totals),
        [Dimension::Page] => Some(Family::Page),
        [Dimension::Prop(k)] => Some(Family::Prop(k.clone())),
        _ => None,
    };
    let Some(family) = family else {
        let plan = Plan {
            site_id: query.site_id.clone(),
            reads: Vec::new(),
            spans: Vec::new(),
            bound_spans: Vec::new(),
            raw: vec![(query.start, query.end)],
            fine_days: None,
            any_name,
            raw_vids: false,
            raw_props,
            raw_needles,
            raw_pages,
        };
        let agg = Aggregator {
            query,
            mode: Mode::Raw {
                visitors: HashMap::new(),
            },
            groups: HashMap::new(),
            pending_bytes: 0,
            bounds: HashMap::new(),
            selected: None,
            corrupt: false,
            gate: None,
        };
        return (plan, agg);
    };
    let intervals = intervals_of(&query);
    let mut owners = HashMap::new();
    let mut slivers = Vec::new();
    let mut labels = Vec::with_capacity(intervals.len());
    for (i, (label, start, end)) in intervals.into_iter().enumerate() {
        let (pieces, raw) = rollup::cover(start, end);
        owners.extend(pieces.into_iter().map(|p| (p, i)));
        slivers.extend(raw.into_iter().map(|(a, b)| (a, b, i)));
        labels.push(label);
    }
    // A top list by visitors over a range, without a time dimension: the
    // rows of the months the range overlaps bound each group's visitors
    // from above (the range's visitors are among its months'), much more
    // tightly than the sum of its buckets when visitors return day after
    // day. The months not among the pieces (at most the two at the ends)
    // are read besides.
    let visitors_desc = visitor_order(&query) == [Direction::Desc];
    let mut bound_months = Vec::new();
    if visitors_desc && query.dimension().is_some() && query.time_grain().is_none() {
        let mut m = Level::Month.start(query.start);
        while m < query.end {
            bound_months.push(m);
            m = Level::Month.next(m);
        }
    }
    let values = pushed_down(&query.filters, family.dimension().as_ref());
    let reads = match &family {
        Family::Totals => vec![RollupRead {
            dim: DIM_KEYS.into(),
            values: None,
        }],
        Family::Page => vec![RollupRead {
            dim: DIM_PAGE.into(),
            values,
        }],
        Family::Prop(k) => {
            // Events lacking the property are found in the `keys` rows;
            // not needed when the filter asks for given values only.
            let wants_none = values.as_ref().is_none_or(|v| v.iter().any(|v| v == NONE));
            let mut reads = vec![RollupRead {
                dim: format!("{PROP_PREFIX}{k}"),
                values,
            }];
            if wants_none {
                reads.push(RollupRead {
                    dim: DIM_KEYS.into(),
                    values: None,
                });
            }
            reads
        }
    };
    let fine_days = owners
        .keys()
        .filter(|p| p.level < Level::Month)
        .map(|p| Level::Day.start(p.bucket))
        .fold(None, |acc: Option<(i64, i64)>, d| {
            Some(acc.map_or((d, d), |(a, b)| (a.min(d), b.max(d))))
        });
    let plan = Plan {
        site_id: query.site_id.clone(),
        reads,
        fine_days,
        spans: spans_of(owners.keys().copied()),
        bound_spans: spans_of(
            bound_months
                .iter()
                .map(|&bucket| Piece {
                    level: Level::Month,
                    bucket,
                })
                .filter(|p| !owners.contains_key(p)),
        ),
        raw: slivers.iter().map(|&(a, b, _)| (a, b)).collect(),
        any_name,
        raw_vids: true,
        raw_props,
        raw_needles,
        raw_pages,
    };
    let agg = Aggregator {
        query,
        mode: Mode::Rollups {
            family,
            owners,
            raw_pieces: HashMap::new(),
            slivers,
            labels,
            bound_months,
        },
        groups: HashMap::new(),
        pending_bytes: 0,
        bounds: HashMap::new(),
        selected: None,
        corrupt: false,
        gate: None,
    };
    (plan, agg)
}

/// The query's buckets (label, start, end): its time buckets, or the whole
/// range as one.
fn intervals_of(query: &Query) -> Vec<(Option<String>, i64, i64)> {
    match query.time_grain() {
        Some(grain) => buckets(&query.zone, grain, query.start, query.end)
            .into_iter()
            .map(|b| (Some(b.label), b.start, b.end))
            .collect(),
        None => vec![(None, query.start, query.end)],
    }
}

/// Values a top-level `is` filter on the family's dimension allows: only
/// those rows need reading.
fn pushed_down(filters: &[Filter], dim: Option<&Dimension>) -> Option<Vec<String>> {
    let dim = dim?;
    filters.iter().find_map(|f| match f {
        Filter::Condition(c) if c.op == FilterOp::Is && c.case_sensitive && &c.dimension == dim => {
            Some(c.values.clone())
        }
        _ => None,
    })
}

/// The directions `order_by` sorts visitors in, in its order.
fn visitor_order(query: &Query) -> Vec<Direction> {
    query
        .order_by
        .iter()
        .filter(|(k, _)| *k == OrderKey::Metric(Metric::Visitors))
        .map(|(_, d)| *d)
        .collect()
}

/// See [`Plan::raw_needles`].
fn needles(filters: &[Filter]) -> Vec<Vec<String>> {
    let verbatim = |v: &str| {
        !v.is_empty() && v != NONE && !v.chars().any(|c| c == '"' || c == '\\' || c < ' ')
    };
    filters
        .iter()
        .filter_map(|f| match f {
            Filter::Condition(c)
                if matches!(c.op, FilterOp::Is | FilterOp::Contains)
                    && c.case_sensitive
                    && matches!(c.dimension, Dimension::Prop(_))
                    && c.values.iter().all(|v| verbatim(v)) =>
            {
                Some(c.values.clone())
            }
            _ => None,
        })
        .collect()
}

/// See [`Plan::raw_pages`].
fn pages_wanted(filters: &[Filter]) -> Option<Vec<String>> {
    filters.iter().find_map(|f| match f {
        Filter::Condition(c)
            if c.op == FilterOp::Is
                && c.case_sensitive
                && c.dimension == Dimension::Page
                && c.values.iter().all(|v| !v.is_empty() && v != NONE) =>
        {
            Some(c.values.clone())
        }
        _ => None,
    })
}

/// Runs of consecutive buckets per level.
fn spans_of(pieces: impl Iterator<Item = Piece>) -> Vec<Span> {
    let mut pieces: Vec<Piece> = pieces.collect();
    pieces.sort();
    let mut spans: Vec<Span> = Vec::new();
    for p in pieces {
        match spans.last_mut() {
            Some(s) if s.level == p.level && s.to == p.bucket => s.to = p.level.next(p.bucket),
            _ => spans.push(Span {
                level: p.level,
                from: p.bucket,
                to: p.level.next(p.bucket),
            }),
        }
    }
    spans
}

impl Aggregator {
    /// For a store whose reads cost per row (MongoDB): the months to read
    /// first when this query is a top list of pages by visitors that can be
    /// answered from the rows of the pages that can make it only. Those
    /// months' rows bound each page's visitors (their sum, across the
    /// months the range overlaps, none of them whole); the store then reads
    /// the pages' rows best bound first ([`Aggregator::bound_candidates`])
    /// until [`Aggregator::top_is_settled`]. Only when every other read is
    /// of whole rows of the pages' own (no raw events, no range edges of
    /// finer levels, no `total_rows`, which counts every page).
    pub fn bounded_page_top(&self) -> Option<Vec<i64>> {
        let Mode::Rollups {
            family: Family::Page,
            owners,
            raw_pieces,
            slivers,
            labels,
            bound_months,
        } = &self.mode
        else {
            return None;
        };
        let query = &self.query;
        let visitors_first =
            query.order_by.first() == Some(&(OrderKey::Metric(Metric::Visitors), Direction::Desc));
        let whole_rows = slivers.is_empty()
            && raw_pieces.is_empty()
            && !owners.keys().any(|p| p.level == Level::Month);
        (visitors_first
            && whole_rows
            && labels.len() == 1
            && labels[0].is_none()
            && !bound_months.is_empty()
            && !query.include_total_rows
            && self.wanted() <= MAX_BOUNDED_TOP)
            .then(|| bound_months.clone())
    }

    /// How many rows the answer holds at most, counting its offset.
    pub fn wanted(&self) -> usize {
        self.query.offset.saturating_add(self.query.limit)
    }

    /// The pages the month rows read so far bound, with their bound: best
    /// first, then by page.
    pub fn bound_candidates(&self) -> Vec<(String, u64)> {
        let mut out: Vec<(String, u64)> = self
            .bounds
            .iter()
            .filter_map(|(k, &hi)| Some((k.value.clone()?, hi)))
            .collect();
        out.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        out
    }

    /// Whether the answer's rows are among the groups read so far, when
    /// every group not read has at most `next` visitors: the answer's last
    /// row, in visitors' order, has more. Counts the groups read exactly.
    pub fn top_is_settled(&mut self, next: u64) -> bool {
        let wanted = self.wanted();
        let mut counts = Vec::with_capacity(self.groups.len());
        for g in self.groups.values_mut() {
            match g.visitors.count(&mut |_| None) {
                Some(n) => counts.push(n),
                None => {
                    self.corrupt = true;
                    return true;
                }
            }
        }
        if wanted == 0 {
            return true;
        }
        if counts.len() < wanted {
            return false;
        }
        counts.sort_unstable_by(|a, b| b.cmp(a));
        counts[wanted - 1] > next
    }

    /// For a store that does not read [`Plan::bound_spans`]: month rows then
    /// bound nothing, even those of whole months the range owns (the
    /// visitors of some of a range's months are no bound on the range's).
    pub fn without_month_bounds(&mut self) {
        if let Mode::Rollups { bound_months, .. } = &mut self.mode {
            bound_months.clear();
        }
    }

    /// Takes what the store keeps of the plan's `fine_days`: the finest
    /// level each day keeps rows of (a day absent keeps months only; see
    /// [`crate::rollup`], "Sparse days"). Returns the ranges `[start, end)`
    /// of the buckets the days do not keep, whose raw events the store
    /// then reads (in the same snapshot, besides `plan.raw`); rows of those
    /// buckets are ignored from now on.
    pub fn use_density(&mut self, finest: &HashMap<i64, Level>) -> Vec<(i64, i64)> {
        let Mode::Rollups {
            owners, raw_pieces, ..
        } = &mut self.mode
        else {
            return Vec::new();
        };
        let sparse: Vec<Piece> = owners
            .keys()
            .filter(|p| {
                p.level < Level::Month
                    && p.level
                        < *finest
                            .get(&Level::Day.start(p.bucket))
                            .unwrap_or(&Level::Month)
            })
            .copied()
            .collect();
        let mut ranges: Vec<(i64, i64)> = Vec::with_capacity(sparse.len());
        for p in sparse {
            if let Some(owner) = owners.remove(&p) {
                raw_pieces.insert(p, owner);
            }
            ranges.push((p.bucket, p.level.next(p.bucket)));
        }
        ranges.sort_unstable();
        let mut merged: Vec<(i64, i64)> = Vec::with_capacity(ranges.len());
        for (a, b) in ranges {
            match merged.last_mut() {
                Some(last) if last.1 == a => last.1 = b,
                _ => merged.push((a, b)),
            }
        }
        merged
    }

    /// Adds one rollup row read for the plan (rows of other buckets are
    /// ignored: a store may read a little more than asked).
    pub fn add_row(&mut self, row: RowRef<'_>) {
        let Mode::Rollups {
            family,
            owners,
            labels,
            bound_months,
            ..
        } = &self.mode
        else {
            return;
        };
        let owner = owners
            .get(&Piece {
                level: row.level,
                bucket: row.bucket,
            })
            .copied();
        let bounds = row.level == Level::Month && bound_months.contains(&row.bucket);
        if owner.is_none() && !bounds {
            return;
        }
        // The row's value of the family's dimension.
        let value: Option<&str> = match family {
            Family::Totals => None,
            Family::Page => Some(row.value),
            Family::Prop(k) => {
                if row.dim == DIM_KEYS {
                    if rollup::has_key(row.value, k) {
                        return;
                    }
                    Some(NONE)
                } else {
                    Some(row.value)
                }
            }
        };
        let query = &self.query;
        let mut lookup = |d: &Dimension| match d {
            Dimension::Name => std::borrow::Cow::Borrowed(row.name),
            _ => std::borrow::Cow::Borrowed(value.unwrap_or(NONE)),
        };
        if !query.filters.iter().all(|f| f.holds(&mut lookup)) {
            return;
        }
        let cardinality = match row.visitors {
            Bits::Bytes(bytes) => rollup::cardinality(bytes),
            Bits::Stored { cardinality, .. } => Some(cardinality),
        };
        let Some(cardinality) = cardinality else {
            self.corrupt = true;
            return;
        };
        let key = GroupKey {
            time: owner.and_then(|o| labels[o].clone()),
            value: match query.dimension() {
                None => None,
                Some(Dimension::Name) => Some(row.name.to_owned()),
                Some(_) => value.map(str::to_owned),
            },
        };
        if bounds {
            *self.bounds.entry(key.clone()).or_default() += cardinality;
        }
        if owner.is_none() {
            return;
        }
        let group = self.groups.entry(key).or_default();
        group.events += row.events;
        group.pageviews += match row.pageviews {
            Some(n) => n,
            None if row.name == PAGEVIEW => row.events,
            None => 0,
        };
        if cardinality > 0 {
            let v = &mut group.visitors;
            v.pending_max = v.pending_max.max(cardinality);
            v.pending_sum += cardinality;
            match row.visitors {
                Bits::Stored { id, .. } => v.pending.push(Pending::Stored(id)),
                Bits::Bytes(bytes) => {
                    v.pending.push(Pending::Bytes(bytes.to_vec()));
                    v.pending_bytes += bytes.len();
                    self.pending_bytes += bytes.len();
                    if self.pending_bytes > PENDING_BYTES {
                        self.pending_bytes -= v.pending_bytes;
                        // Bytes only: nothing to load.
                        self.corrupt |= !v.settle(&mut |_| None);
                    }
                }
            }
        }
    }

    /// Adds one raw event read for the plan, with its visitor's dictionary
    /// id when the plan asked for ids.
    pub fn add_event(&mut self, e: &Event, vid: Option<u32>) {
        let query = &self.query;
        if e.site_id != query.site_id || e.is_engagement() || !query.matches(e) {
            return;
        }
        if let Some(gate) = &self.gate
            && !gate(e)
        {
            return;
        }
        let (time, vid) = match &mut self.mode {
            Mode::Rollups {
                slivers,
                raw_pieces,
                labels,
                ..
            } => {
                let sliver = slivers
                    .iter()
                    .find(|(a, b, _)| *a <= e.ts && e.ts < *b)
                    .map(|s| s.2);
                let owner = sliver.or_else(|| {
                    [Level::Quarter, Level::Hour, Level::Day]
                        .into_iter()
                        .find_map(|level| {
                            raw_pieces.get(&Piece {
                                level,
                                bucket: level.start(e.ts),
                            })
                        })
                        .copied()
                });
                let Some(owner) = owner else {
                    return;
                };
                (labels[owner].clone(), vid)
            }
            Mode::Raw { visitors } => {
                if e.ts < query.start || e.ts >= query.end {
                    return;
                }
                let time = query.time_grain().map(|g| g.label_of(&query.zone, e.ts));
                let vid = visitor_of(e).map(|v| {
                    let next = visitors.len() as u32;
                    *visitors.entry(v.to_owned()).or_insert(next)
                });
                (time, vid)
            }
        };
        let key = GroupKey {
            time,
            value: query.dimension().map(|d| value_of(e, d).into_owned()),
        };
        let group = self.groups.entry(key).or_default();
        group.events += 1;
        if e.event_type == PAGEVIEW {
            group.pageviews += 1;
        }
        if let Some(v) = vid {
            group.visitors.united.insert(v);
        }
    }

    /// The answer. Visitors are counted exactly for the groups that can be
    /// among the answer's rows, and only bounded for the others: groups are
    /// taken best first by the order they would have at their best bounds,
    /// counted, and kept in a top list of `offset + limit`; once the last of
    /// that list comes before the next group's best, no group left can
    /// enter it (a top 10 of 1,000 pages decodes the bitmaps of a few
    /// dozen pages, not of all).
    ///
    /// A store that reads bitmaps as [`Bits::Stored`] calls this in its
    /// read's snapshot, with `load` reading a bitmap by its id; for other
    /// stores [`Aggregator::finish`] calls it.
    pub fn select(
        &mut self,
        load: &mut dyn FnMut(i64) -> Option<Vec<u8>>,
    ) -> Result<(), StoreError> {
        if self.selected.is_some() {
            return Ok(());
        }
        let corrupt = || {
            StoreError::Unavailable(
                "a stored rollup bitmap does not decode; rebuild the rollups".into(),
            )
        };
        if self.corrupt {
            return Err(corrupt());
        }
        let query = Arc::clone(&self.query);
        let query = &*query;
        let groups = std::mem::take(&mut self.groups);
        let total_rows = groups.len().max(usize::from(query.dims.is_empty()));
        let wanted = self.wanted();
        let needs_visitors = query.metrics.contains(&Metric::Visitors);
        let visitor_order = visitor_order(query);
        // Each group at its best place in the order (when visitors sort one
        // way only: else every group is counted).
        let best = match visitor_order.as_slice() {
            [] => Some(Direction::Asc),
            [d] => Some(*d),
            _ => None,
        };
        let month_bounds = std::mem::take(&mut self.bounds);
        let mut candidates: Vec<(Vec<String>, Totals, Group)> = groups
            .into_iter()
            .map(|(key, g)| {
                let (lo, hi) = g.visitors.bounds();
                let hi = month_bounds.get(&key).map_or(hi, |&m| hi.min(m));
                let totals = Totals {
                    events: g.events,
                    pageviews: g.pageviews,
                    visitors: if best == Some(Direction::Desc) {
                        hi
                    } else {
                        lo
                    },
                    ..Totals::default()
                };
                (row_dimensions(query, &key), totals, g)
            })
            .collect();
        if !needs_visitors && visitor_order.is_empty() {
            let rows = candidates
                .into_iter()
                .map(|(dims, t, _)| (dims, Totals { visitors: 0, ..t }));
            self.selected = Some((rows.collect(), total_rows));
            return Ok(());
        }
        let counts_all = best.is_none() || candidates.len() <= wanted;
        if !counts_all {
            candidates.sort_by(|(da, ta, _), (db, tb, _)| row_order(query, da, ta, db, tb));
        }
        let mut top: std::collections::BinaryHeap<Ranked<'_>> = Default::default();
        let mut counted = Vec::new();
        for (dims, mut totals, mut group) in candidates {
            if !counts_all
                && top.len() >= wanted
                && top.peek().is_some_and(|last| {
                    row_order(query, &last.dims, &last.totals, &dims, &totals).is_lt()
                })
            {
                break;
            }
            totals.visitors = group.visitors.count(load).ok_or_else(corrupt)?;
            if counts_all {
                counted.push((dims, totals));
                continue;
            }
            top.push(Ranked {
                query,
                dims,
                totals,
            });
            if top.len() > wanted {
                top.pop();
            }
        }
        if !counts_all {
            counted = top.into_iter().map(|r| (r.dims, r.totals)).collect();
        }
        self.selected = Some((counted, total_rows));
        Ok(())
    }

    /// The answer (see [`Aggregator::select`]).
    pub fn finish(mut self) -> Result<Answer, StoreError> {
        self.select(&mut |_| None)?;
        let (rows, total_rows) = self.selected.take().unwrap_or_default();
        Ok(Answer::shape_rows(&self.query, rows, total_rows))
    }
}

/// A counted row in the top list: the heap's greatest is the last in the
/// answer's order.
struct Ranked<'q> {
    query: &'q Query,
    dims: Vec<String>,
    totals: Totals,
}

impl Ord for Ranked<'_> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        row_order(
            self.query,
            &self.dims,
            &self.totals,
            &other.dims,
            &other.totals,
        )
    }
}

impl PartialOrd for Ranked<'_> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Ranked<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}

impl Eq for Ranked<'_> {}

/// Answers a query from a store.
pub async fn run(store: &dyn QueryStore, query: Arc<Query>) -> Result<Answer, StoreError> {
    // Retention deletes whole UTC days from the oldest: what it keeps
    // starts at `kept_from`, and a day being deleted is never read (the
    // start moves before any deletion). Answers are computed from there;
    // the time labels stay those of the range asked.
    let kept_from = store.kept_from().await?;
    match kept_from {
        Some(from) if from > query.start => {
            let clamped = Arc::new(Query {
                start: from.min(query.end),
                ..(*query).clone()
            });
            let mut answer = evaluate(store, clamped).await?;
            answer.time_labels = Answer::labels(&query);
            Ok(answer)
        }
        _ => evaluate(store, query).await,
    }
}

async fn evaluate(store: &dyn QueryStore, query: Arc<Query>) -> Result<Answer, StoreError> {
    if super::goals::applies(&query) {
        return super::goals::answer(store, query, |store, q| Box::pin(evaluate_plain(store, q)))
            .await;
    }
    evaluate_plain(store, query).await
}

/// A query over visits from visit rollups ([`crate::visit_rollup`]), when
/// the store keeps them and the query looks at no value the rows do not
/// hold: its `visit:*` dimension (or none) and filters on that dimension
/// only. The whole hours, days and months of each of its buckets from
/// rows; what is left at their ends (less than an hour each) from the
/// visits. `None`: answered from the visits.
async fn from_visit_rollups(
    store: &dyn QueryStore,
    query: &Query,
) -> Result<Option<Answer>, StoreError> {
    let field = match query.dimension() {
        None => None,
        Some(Dimension::Visit(f)) => Some(*f),
        Some(_) => return Ok(None),
    };
    let grouped = field.map(Dimension::Visit);
    if query
        .filter_dimensions()
        .iter()
        .any(|d| Some(d) != grouped.as_ref())
    {
        return Ok(None);
    }
    let intervals = intervals_of(query);
    let mut owners: HashMap<Piece, usize> = HashMap::new();
    // (start, end, interval), in time order (intervals do not overlap).
    let mut slivers: Vec<(i64, i64, usize)> = Vec::new();
    for (i, (_, start, end)) in intervals.iter().enumerate() {
        let (pieces, raw) = rollup::cover(*start, *end);
        for p in pieces {
            if crate::visit_rollup::LEVELS.contains(&p.level) {
                owners.insert(p, i);
            } else {
                slivers.push((p.bucket, p.level.next(p.bucket), i));
            }
        }
        slivers.extend(raw.into_iter().map(|(a, b)| (a, b, i)));
    }
    slivers.sort_unstable();
    // Adjacent ranges of one bucket read as one.
    let mut ranges: Vec<(i64, i64, usize)> = Vec::new();
    for (a, b, i) in slivers {
        match ranges.last_mut() {
            Some(last) if last.1 == a && last.2 == i => last.1 = b,
            _ => ranges.push((a, b, i)),
        }
    }
    let read = store
        .visit_rollups(
            query.site_id.as_str(),
            crate::visit_rollup::dim_name(field),
            spans_of(owners.keys().copied()),
            ranges.iter().map(|&(a, b, _)| (a, b)).collect(),
        )
        .await?;
    let Some((rows, visits)) = read else {
        return Ok(None);
    };
    let passes = |value: &str| {
        let mut lookup = |_: &Dimension| std::borrow::Cow::Borrowed(value);
        query.filters.iter().all(|f| f.holds(&mut lookup))
    };
    let mut groups: HashMap<GroupKey, (Totals, RoaringBitmap)> = HashMap::new();
    for row in rows {
        let piece = Piece {
            level: row.level,
            bucket: row.bucket,
        };
        let Some(&i) = owners.get(&piece) else {
            continue;
        };
        if !passes(&row.value) {
            continue;
        }
        let Some(visitors) = rollup::decode(&row.visitors) else {
            return Err(StoreError::Unavailable(
                "a visit rollup row does not read; rebuild the rollups".into(),
            ));
        };
        let key = GroupKey {
            time: intervals[i].0.clone(),
            value: field.map(|_| row.value.clone()),
        };
        let (t, set) = groups.entry(key).or_default();
        t.visits += row.visits;
        t.bounces += row.bounces;
        t.duration_ms += row.duration_ms;
        t.pageviews += row.pageviews;
        t.events += row.events;
        *set |= visitors;
    }
    for (v, vid) in visits {
        let at = ranges.partition_point(|r| r.0 <= v.start);
        let Some(&(_, end, i)) = at.checked_sub(1).and_then(|k| ranges.get(k)) else {
            continue;
        };
        if v.start >= end || v.site_id != query.site_id.as_str() {
            continue;
        }
        let value = field.map(|f| f.value_of(&v));
        if !passes(value.unwrap_or(NONE)) {
            continue;
        }
        let key = GroupKey {
            time: intervals[i].0.clone(),
            value: value.map(str::to_owned),
        };
        let (t, set) = groups.entry(key).or_default();
        t.visits += 1;
        t.bounces += u64::from(v.is_bounce());
        t.duration_ms += u64::try_from(v.duration_ms()).unwrap_or(0);
        t.pageviews += v.pageviews;
        t.events += v.events;
        set.insert(vid);
    }
    let groups = groups
        .into_iter()
        .map(|(k, (mut t, set))| {
            t.visitors = set.len();
            (k, t)
        })
        .collect();
    Ok(Some(Answer::shape(query, groups)))
}

/// A query without goals (see [`super::goals`]).
async fn evaluate_plain(store: &dyn QueryStore, query: Arc<Query>) -> Result<Answer, StoreError> {
    if query.is_visit_scoped()
        && !query.filters_events()
        && let Some(answer) = from_visit_rollups(store, &query).await?
    {
        return Ok(answer);
    }
    if query.is_visit_scoped() {
        return visits_in_windows(store, &query).await;
    }
    if query.filters_visits() {
        return events_by_visit(store, query).await;
    }
    let (plan, agg) = plan(query);
    store.fetch(plan, agg).await?.finish()
}

/// How long before a range the visits of its events are read at first;
/// events of a longer visit (one with events more than a day apart, none
/// 30 minutes from the next) have theirs read in a second pass.
const VISIT_LOOKBACK_MS: i64 = super::time::DAY_MS;

/// The query without its filters, over `[start, end)`, read from raw
/// events only (a gate on the aggregator tests the filters).
fn raw_unfiltered(query: &Query, start: i64, end: i64) -> (Plan, Aggregator) {
    let bare = Query {
        filters: Vec::new(),
        start,
        end,
        ..query.clone()
    };
    let (mut plan, agg) = plan_for(Arc::new(bare), false);
    // The filters, tested by the caller's gate, may look at properties.
    plan.raw_props |= query
        .filter_dimensions()
        .iter()
        .any(|d| matches!(d, Dimension::Prop(_)));
    // Every filter must hold for an event to pass with its visit, so the
    // stores' cheap tests of the event alone still apply.
    plan.raw_needles = needles(&query.filters);
    plan.raw_pages = pages_wanted(&query.filters);
    (plan, agg)
}

/// How much of a visit-scoped query's range is read at a time, where its
/// visits are read one by one (not from rollups): the visits that start in
/// one window, and, when the filters look at events, the raw events those
/// visits span. Only the groups outlive a window, so the memory such a
/// query takes is that of one window's visits, not of the whole range's.
const VISIT_WINDOW_MS: i64 = super::time::DAY_MS;

/// A visit-scoped query from the visits as the fold keeps them, one record
/// per visit that starts in the range, a window at a time.
async fn visits_in_windows(
    store: &dyn QueryStore,
    query: &Arc<Query>,
) -> Result<Answer, StoreError> {
    let mut tally = session::Tally::new(query);
    let mut from = query.start;
    while from < query.end {
        let to = from.saturating_add(VISIT_WINDOW_MS).min(query.end);
        let visits = store.visits(&query.site_id, from, to).await?;
        if !query.filters_events() {
            tally.add(&visits, |v| session::passes_alone(query, v));
        } else {
            let visits = Arc::new(visits);
            let passed = visits_with_events(store, query, from, Arc::clone(&visits)).await?;
            let kept = visits
                .iter()
                .zip(passed)
                .filter(|(_, p)| *p)
                .map(|(v, _)| v);
            tally.add(kept, |_| true);
        }
        from = to;
    }
    Ok(tally.finish())
}

/// Which of `visits` (none starting before `from`) hold an event that
/// passes the query's filters with its visit ([`session::events_of`]),
/// from the raw events they span.
async fn visits_with_events(
    store: &dyn QueryStore,
    query: &Arc<Query>,
    from: i64,
    visits: Arc<Vec<Visit>>,
) -> Result<Vec<bool>, StoreError> {
    let Some(until) = visits.iter().map(|v| v.end).max() else {
        return Ok(Vec::new());
    };
    let n = visits.len();
    let passed = Arc::new(Mutex::new(vec![false; n]));
    let (plan, mut agg) = raw_unfiltered(query, from, until.saturating_add(1));
    let index = session::VisitIndex::new(&visits);
    let (q, out) = (Arc::clone(query), Arc::clone(&passed));
    agg.gate = Some(Arc::new(move |e: &Event| {
        if let Some(i) = index.of(e) {
            let mut passed = out.lock().unwrap_or_else(|p| p.into_inner());
            if !passed[i] && q.matches_pair(Some(e), Some(&visits[i])) {
                passed[i] = true;
            }
        }
        // Nothing to count here: the visits are.
        false
    }));
    store.fetch(plan, agg).await?;
    let passed = passed.lock().unwrap_or_else(|p| p.into_inner()).clone();
    Ok(passed)
}

/// An event query whose filters look at visits: the raw events of the
/// range, each tested with its visit.
async fn events_by_visit(store: &dyn QueryStore, query: Arc<Query>) -> Result<Answer, StoreError> {
    let site = query.site_id.as_str();
    let first = query.start.saturating_sub(VISIT_LOOKBACK_MS);
    let mut visits: Vec<Visit> = store.visits(site, first, query.end).await?;
    visits.retain(|v| v.end >= query.start);
    let (agg, orphans) = events_pass(store, &query, Arc::new(visits.clone()), false).await?;
    if !orphans {
        return agg.finish();
    }
    // Some events belong to visits that started before the lookback:
    // every older visit of the site that reaches into the range.
    let mut older = store.visits(site, i64::MIN, first).await?;
    older.retain(|v| v.end >= query.start);
    visits.extend(older);
    let (agg, _) = events_pass(store, &query, Arc::new(visits), true).await?;
    agg.finish()
}

/// One read of [`events_by_visit`]: the aggregate, and whether an event
/// with a visitor had no visit among `visits` (then not counted, unless
/// `last`: then it is tested without a visit).
async fn events_pass(
    store: &dyn QueryStore,
    query: &Arc<Query>,
    visits: Arc<Vec<Visit>>,
    last: bool,
) -> Result<(Aggregator, bool), StoreError> {
    let orphans = Arc::new(AtomicBool::new(false));
    let (plan, mut agg) = raw_unfiltered(query, query.start, query.end);
    let index = session::VisitIndex::new(&visits);
    let (q, seen) = (Arc::clone(query), Arc::clone(&orphans));
    agg.gate = Some(Arc::new(move |e: &Event| match index.of(e) {
        Some(i) => q.matches_pair(Some(e), Some(&visits[i])),
        None if !last && visitor_of(e).is_some() => {
            seen.store(true, Ordering::Relaxed);
            false
        }
        None => q.matches_pair(Some(e), None),
    }));
    let agg = store.fetch(plan, agg).await?;
    let orphaned = orphans.load(Ordering::Relaxed);
    Ok((agg, orphaned))
}
