//! Goals in queries: the `event:goal` dimension and filters, and the
//! `conversion_rate` metric, as Plausible has them.
//!
//! A goal ([`crate::sites::Goal`]) is a condition on an event: its name is
//! the goal's event, or it is a pageview whose path matches the goal's
//! pattern. So:
//! - a filter on `event:goal` is made, when the query is resolved, the
//!   conditions of the goals it names ([`expand`]): every evaluator
//!   (rollups, raw events, the reference) answers it as any other filter;
//! - a query grouped by `event:goal` is answered goal by goal, each goal's
//!   rows by the query with that goal's condition added ([`answer`]): an
//!   event that completes two goals counts for both;
//! - `conversion_rate` divides each row's visitors by the visitors of the
//!   same group with the query's other filters (without those on
//!   `event:goal`), read by one more query.

use std::collections::HashMap;
use std::sync::Arc;

use super::{
    Answer, Condition, Dim, Dimension, Filter, FilterOp, Metric, PAGEVIEW, Query, QueryError,
    Totals,
};
use crate::sites::Goal;
use crate::store::{QueryStore, StoreError};

/// What completes a goal, as a filter.
pub fn filter_of(goal: &Goal) -> Filter {
    let is = |dimension: Dimension, op: FilterOp, value: &str| {
        Filter::Condition(Condition {
            op,
            dimension,
            values: vec![value.to_owned()],
            case_sensitive: true,
        })
    };
    match (&goal.event, &goal.page) {
        (Some(name), _) => is(Dimension::Name, FilterOp::Is, name),
        (None, Some(pattern)) => Filter::And(vec![
            is(Dimension::Name, FilterOp::Is, PAGEVIEW),
            is(Dimension::Page, FilterOp::Matches, pattern),
        ]),
        // Nothing completes it.
        (None, None) => Filter::Or(Vec::new()),
    }
}

/// Whether a filter looks at `event:goal` anywhere.
pub fn mentions_goal(filter: &Filter) -> bool {
    let mut dims = Vec::new();
    filter.dimensions(&mut dims);
    dims.contains(&Dimension::Goal)
}

/// The filter with its `event:goal` conditions made conditions on names
/// and pages. `is` naming a goal the site does not have is an error (a
/// typo would otherwise answer zero).
pub fn expand(filter: &Filter, goals: &[Goal], field: &str) -> Result<Filter, QueryError> {
    Ok(match filter {
        Filter::Condition(c) if c.dimension == Dimension::Goal => {
            let name_of = |g: &Goal| match c.case_sensitive {
                true => g.name(),
                false => g.name().to_lowercase(),
            };
            let chosen: Vec<&Goal> = match c.op {
                FilterOp::Is | FilterOp::IsNot => {
                    if let Some(v) = c
                        .values
                        .iter()
                        .find(|v| !goals.iter().any(|g| name_of(g) == **v))
                    {
                        return Err(QueryError::new(
                            "unknown_goal",
                            field,
                            format!(
                                "the goal `{}` is not configured for this site",
                                v.chars().take(100).collect::<String>()
                            ),
                        ));
                    }
                    goals
                        .iter()
                        .filter(|g| c.values.contains(&name_of(g)))
                        .collect()
                }
                FilterOp::Contains | FilterOp::ContainsNot | FilterOp::Matches => goals
                    .iter()
                    .filter(|g| {
                        let name = name_of(g);
                        c.values.iter().any(|v| name.contains(v.as_str()))
                    })
                    .collect(),
            };
            let any = Filter::Or(chosen.into_iter().map(filter_of).collect());
            match c.op {
                FilterOp::IsNot | FilterOp::ContainsNot => Filter::Not(Box::new(any)),
                _ => any,
            }
        }
        Filter::Condition(c) => Filter::Condition(c.clone()),
        Filter::And(fs) => Filter::And(
            fs.iter()
                .map(|f| expand(f, goals, field))
                .collect::<Result<_, _>>()?,
        ),
        Filter::Or(fs) => Filter::Or(
            fs.iter()
                .map(|f| expand(f, goals, field))
                .collect::<Result<_, _>>()?,
        ),
        Filter::Not(f) => Filter::Not(Box::new(expand(f, goals, field)?)),
    })
}

/// Whether the query needs [`answer`] rather than a plain evaluation.
pub fn applies(query: &Query) -> bool {
    query.goals.is_some() || query.metrics.contains(&Metric::ConversionRate)
}

/// The counts a goal query's rows are made from.
const COUNTS: [Metric; 3] = [Metric::Visitors, Metric::Events, Metric::Pageviews];

/// `query` less its `event:goal` dimension, with `filters`, asking
/// `metrics`, every row in any order.
fn part(query: &Query, filters: Vec<Filter>, metrics: Vec<Metric>) -> Query {
    Query {
        metrics,
        dims: query
            .dims
            .iter()
            .filter(|d| **d != Dim::Event(Dimension::Goal))
            .cloned()
            .collect(),
        filters,
        order_by: Vec::new(),
        limit: super::MAX_ROWS,
        offset: 0,
        include_total_rows: false,
        include_time_labels: false,
        goals: None,
        base_filters: Vec::new(),
        ..query.clone()
    }
}

/// Answers a query with goals by the plain queries it is made of
/// (`evaluate` answers each; see the module docs).
pub async fn answer<'a, F, Fut>(
    store: &'a dyn QueryStore,
    query: Arc<Query>,
    evaluate: F,
) -> Result<Answer, StoreError>
where
    F: Fn(&'a dyn QueryStore, Arc<Query>) -> Fut,
    Fut: Future<Output = Result<Answer, StoreError>>,
{
    let counts = |row: &super::Row| {
        let n = |i: usize| row.metrics.get(i).and_then(|m| m.as_u64()).unwrap_or(0);
        Totals {
            visitors: n(0),
            events: n(1),
            pageviews: n(2),
            ..Totals::default()
        }
    };
    let goal_at = query
        .dims
        .iter()
        .position(|d| *d == Dim::Event(Dimension::Goal));
    let mut rows: Vec<(Vec<String>, Totals)> = Vec::new();
    match (&query.goals, goal_at) {
        (Some(goals), Some(at)) => {
            for (name, condition) in goals {
                let mut filters = query.filters.clone();
                filters.push(condition.clone());
                let sub = part(&query, filters, COUNTS.to_vec());
                for row in evaluate(store, Arc::new(sub)).await?.rows {
                    let totals = counts(&row);
                    if totals.events == 0 && totals.visitors == 0 {
                        continue;
                    }
                    let mut dims = row.dimensions;
                    dims.insert(at.min(dims.len()), name.clone());
                    rows.push((dims, totals));
                }
            }
        }
        _ => {
            let sub = part(&query, query.filters.clone(), COUNTS.to_vec());
            let no_dims = sub.dims.is_empty();
            for row in evaluate(store, Arc::new(sub)).await?.rows {
                let totals = counts(&row);
                if no_dims || totals.events > 0 || totals.visitors > 0 {
                    rows.push((row.dimensions, totals));
                }
            }
        }
    }
    if query.metrics.contains(&Metric::ConversionRate) {
        let sub = part(&query, query.base_filters.clone(), vec![Metric::Visitors]);
        let base: HashMap<Vec<String>, u64> = evaluate(store, Arc::new(sub))
            .await?
            .rows
            .into_iter()
            .map(|r| {
                let visitors = r.metrics.first().and_then(|m| m.as_u64()).unwrap_or(0);
                (r.dimensions, visitors)
            })
            .collect();
        for (dims, totals) in &mut rows {
            let mut key = dims.clone();
            if let Some(at) = goal_at {
                key.remove(at);
            }
            totals.base_visitors = base.get(&key).copied().unwrap_or(0);
        }
    }
    let total = rows.len();
    Ok(Answer::shape_rows(&query, rows, total))
}
