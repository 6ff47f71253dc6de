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
use std::sync::Arc;

use roaring::RoaringBitmap;

use super::time::buckets;
use super::{
    Answer, Dimension, Filter, FilterOp, GroupKey, NONE, PAGEVIEW, Query, Totals, value_of,
    visitor_of,
};
use crate::event::Event;
use crate::rollup::{self, DIM_KEYS, DIM_PAGE, Level, PROP_PREFIX, Piece};
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
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub site_id: String,
    pub reads: Vec<RollupRead>,
    /// The rollup buckets, as runs of consecutive buckets per level.
    pub spans: Vec<Span>,
    /// Raw events of these ranges `[start, end)`.
    pub raw: Vec<(i64, i64)>,
    /// Whether raw events need their visitor's dictionary id (they are
    /// combined with rollups), or only the visitor itself.
    pub raw_vids: bool,
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
    /// The visitors bitmap as stored.
    pub visitors: &'a [u8],
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

#[derive(Debug, Default)]
struct Group {
    events: u64,
    pageviews: u64,
    visitors: RoaringBitmap,
}

enum Mode {
    /// Rollup rows, plus raw events in the slivers no bucket covers.
    Rollups {
        family: Family,
        /// Which query bucket each rollup bucket belongs to.
        owners: HashMap<Piece, usize>,
        /// The raw slivers and their query bucket.
        slivers: Vec<(i64, i64, usize)>,
        /// Query buckets' labels (`None` without a time dimension).
        labels: Vec<Option<String>>,
    },
    /// Raw events only; visitors numbered as they come.
    Raw { visitors: HashMap<String, u32> },
}

/// Collects what a store reads into groups. See the module docs.
pub struct Aggregator {
    query: Arc<Query>,
    mode: Mode,
    groups: HashMap<GroupKey, Group>,
    /// A stored bitmap that did not decode: the answer would be wrong.
    corrupt: bool,
}

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
            raw: vec![(query.start, query.end)],
            ..Plan::default()
        };
        let agg = Aggregator {
            query,
            mode: Mode::Raw {
                visitors: HashMap::new(),
            },
            groups: HashMap::new(),
            corrupt: false,
        };
        return (plan, agg);
    };
    // The query's buckets: its time buckets, or the whole range as one.
    let intervals: Vec<(Option<String>, i64, i64)> = match query.time_grain() {
        Some(grain) => buckets(&query.zone, grain, query.start, query.end)
            .into_iter()
            .map(|b| (Some(b.label), b.start, b.end))
            .collect(),
        None => vec![(None, query.start, query.end)],
    };
    let mut owners = HashMap::new();
    let mut slivers = Vec::new();
    let mut labels = Vec::with_capacity(intervals.len());
    for (i, (label, start, end)) in intervals.into_iter().enumerate() {
        let (pieces, raw) = rollup::cover(start, end);
        owners.extend(pieces.into_iter().map(|p| (p, i)));
        slivers.extend(raw.into_iter().map(|(a, b)| (a, b, i)));
        labels.push(label);
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
    let plan = Plan {
        site_id: query.site_id.clone(),
        reads,
        spans: spans_of(owners.keys().copied()),
        raw: slivers.iter().map(|&(a, b, _)| (a, b)).collect(),
        raw_vids: true,
    };
    let agg = Aggregator {
        query,
        mode: Mode::Rollups {
            family,
            owners,
            slivers,
            labels,
        },
        groups: HashMap::new(),
        corrupt: false,
    };
    (plan, agg)
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
    /// Adds one rollup row read for the plan (rows of other buckets are
    /// ignored: a store may read a little more than asked).
    pub fn add_row(&mut self, row: RowRef<'_>) {
        let Mode::Rollups {
            family,
            owners,
            labels,
            ..
        } = &self.mode
        else {
            return;
        };
        let Some(&owner) = owners.get(&Piece {
            level: row.level,
            bucket: row.bucket,
        }) else {
            return;
        };
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
        let Some(visitors) = rollup::decode(row.visitors) else {
            self.corrupt = true;
            return;
        };
        let key = GroupKey {
            time: labels[owner].clone(),
            value: match query.dimension() {
                None => None,
                Some(Dimension::Name) => Some(row.name.to_owned()),
                Some(_) => value.map(str::to_owned),
            },
        };
        let group = self.groups.entry(key).or_default();
        group.events += row.events;
        if row.name == PAGEVIEW {
            group.pageviews += row.events;
        }
        group.visitors |= visitors;
    }

    /// Adds one raw event read for the plan, with its visitor's dictionary
    /// id when the plan asked for ids.
    pub fn add_event(&mut self, e: &Event, vid: Option<u32>) {
        let query = &self.query;
        if e.site_id != query.site_id || !query.matches(e) {
            return;
        }
        let (time, vid) = match &mut self.mode {
            Mode::Rollups {
                slivers, labels, ..
            } => {
                let Some(&(_, _, owner)) = slivers.iter().find(|(a, b, _)| *a <= e.ts && e.ts < *b)
                else {
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
            group.visitors.insert(v);
        }
    }

    /// The answer.
    pub fn finish(self) -> Result<Answer, StoreError> {
        if self.corrupt {
            return Err(StoreError::Unavailable(
                "a stored rollup bitmap does not decode; rebuild the rollups".into(),
            ));
        }
        let groups = self
            .groups
            .into_iter()
            .map(|(key, g)| {
                (
                    key,
                    Totals {
                        events: g.events,
                        pageviews: g.pageviews,
                        visitors: g.visitors.len(),
                    },
                )
            })
            .collect();
        Ok(Answer::shape(&self.query, groups))
    }
}

/// Answers a query from a store.
pub async fn run(store: &dyn QueryStore, query: Arc<Query>) -> Result<Answer, StoreError> {
    let (plan, agg) = plan(query);
    store.fetch(plan, agg).await?.finish()
}
