//! A JSON request into a validated [`Request`], then into a resolved [`Query`].
//!
//! Two steps because one request needs the store before it can be resolved:
//! `"all"` starts at the site's first event. Everything a client can get
//! wrong is found in the first step, before the store is asked anything.
//!
//! Every part a client controls is bounded: the body (by the route), the
//! number of filters, their nesting, values and value lengths.

use chrono::{DateTime, Datelike, Months, NaiveDate};
use serde_json::{Map, Value, json};

use super::time::{HOUR_MS, SECOND_MS, TimeGrain, Zone};
use super::{
    Condition, Dim, Dimension, Direction, Filter, FilterOp, MAX_BUCKETS, MAX_ROWS, Metric,
    OrderKey, PAGEVIEW, PLAUSIBLE_PAGEVIEW, Query, VisitField,
};
use crate::event::{MAX_NAME_CHARS, MAX_PROP_KEY_CHARS, SiteId};

/// Bounds on what one request may ask.
pub const MAX_FILTER_DEPTH: usize = 8;
pub const MAX_CONDITIONS: usize = 64;
pub const MAX_FILTER_VALUES: usize = 1_000;
pub const MAX_FILTER_VALUE_BYTES: usize = 2_048;

const FIELDS: [&str; 9] = [
    "site_id",
    "metrics",
    "date_range",
    "dimensions",
    "filters",
    "order_by",
    "include",
    "pagination",
    "timezone",
];

/// What is wrong with a query: a stable code, a message, the field at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryError {
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
}

impl QueryError {
    pub(crate) fn new(
        code: &'static str,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            code,
            message: message.into(),
            field: Some(field.into()),
        }
    }

    fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new("invalid_query", field, message)
    }
}

/// A relative date range, ending today in the query's zone, today included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relative {
    Day,
    Days7,
    Days30,
    Month,
    Months6,
    Months12,
    Year,
    All,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RangeSpec {
    Relative(Relative),
    /// Whole local days, both included.
    Dates(NaiveDate, NaiveDate),
    /// Instants in epoch ms, both included (whole seconds).
    Instants(i64, i64),
}

/// The requested time dimension: `time` picks its grain from the range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TimeSpec {
    Auto,
    Grain(TimeGrain),
}

#[derive(Debug, Clone, PartialEq)]
enum DimSpec {
    Time(TimeSpec),
    Event(Dimension),
}

/// A validated request, not yet resolved against the clock.
#[derive(Debug, Clone)]
pub struct Request {
    pub site_id: SiteId,
    pub range: RangeSpec,
    metrics: Vec<Metric>,
    zone: Zone,
    /// Whether the request named its time zone (else the site's applies).
    zone_given: bool,
    /// The site's goals ([`Request::for_site`]).
    goals: Vec<crate::sites::Goal>,
    dims: Vec<DimSpec>,
    filters: Vec<Filter>,
    filters_echo: Value,
    order_by: Option<Vec<(String, Direction)>>,
    limit: usize,
    offset: usize,
    total_rows: bool,
    time_labels: bool,
}

/// Validates a request body.
pub fn parse_request(body: &Value) -> Result<Request, QueryError> {
    let Value::Object(obj) = body else {
        return Err(QueryError {
            code: "invalid_query",
            message: "the query must be a JSON object".into(),
            field: None,
        });
    };
    if let Some(key) = obj.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(QueryError::new(
            "unknown_field",
            short(key),
            format!("unknown field `{}`", short(key)),
        ));
    }
    let site_id = match obj.get("site_id") {
        None | Some(Value::Null) => {
            return Err(QueryError::new(
                "missing_field",
                "site_id",
                "`site_id` is required",
            ));
        }
        // The rules of the events' own `site_id`.
        Some(Value::String(s)) => {
            SiteId::parse(s.as_str()).map_err(|e| QueryError::invalid("site_id", e.message))?
        }
        Some(_) => {
            return Err(QueryError::invalid(
                "site_id",
                format!("`site_id` must be a string of 1-{MAX_NAME_CHARS} characters"),
            ));
        }
    };
    let metrics = parse_metrics(obj.get("metrics"))?;
    let zone = match obj.get("timezone") {
        None | Some(Value::Null) => Zone::default(),
        Some(Value::String(s)) => Zone::parse(s).ok_or_else(|| {
            QueryError::new(
                "unknown_time_zone",
                "timezone",
                format!(
                    "`{}` is not an IANA time zone name (e.g. Europe/Paris)",
                    short(s)
                ),
            )
        })?,
        Some(_) => {
            return Err(QueryError::invalid(
                "timezone",
                "`timezone` must be a string",
            ));
        }
    };
    let range = parse_range(obj.get("date_range"))?;
    let dims = parse_dimensions(obj.get("dimensions"))?;
    let (filters, filters_echo) = match obj.get("filters") {
        None | Some(Value::Null) => (Vec::new(), json!([])),
        Some(Value::Array(items)) => {
            let mut budget = MAX_CONDITIONS;
            let filters = items
                .iter()
                .enumerate()
                .map(|(i, f)| parse_filter(f, &format!("filters[{i}]"), 0, &mut budget))
                .collect::<Result<Vec<_>, _>>()?;
            (filters, Value::Array(items.clone()))
        }
        Some(_) => return Err(QueryError::invalid("filters", "`filters` must be a list")),
    };
    // Queries over visits (a visit metric, or a visit:* dimension) group
    // visits, so they group by visit:* and time dimensions only; their
    // filters may look at events (the visits with such an event), and an
    // event query's filters at visits (the events of such visits).
    let grouped: Vec<&Dimension> = dims
        .iter()
        .filter_map(|d| match d {
            DimSpec::Event(d) => Some(d),
            DimSpec::Time(_) => None,
        })
        .collect();
    let visit_scoped = metrics.iter().any(|m| m.of_visits())
        || grouped.iter().any(|d| matches!(d, Dimension::Visit(_)));
    if visit_scoped && let Some(d) = grouped.iter().find(|d| !matches!(d, Dimension::Visit(_))) {
        return Err(QueryError::new(
            "unsupported_query",
            "dimensions",
            format!(
                "`{}` with visit metrics or visit:* dimensions: a query over visits groups by \
                 visit:* and time dimensions only",
                short(&d.name())
            ),
        ));
    }
    let goal_filtered = filters.iter().any(super::goals::mentions_goal);
    let goal_grouped = grouped.contains(&&Dimension::Goal);
    if metrics.contains(&Metric::ConversionRate) {
        if !goal_filtered && !goal_grouped {
            return Err(QueryError::new(
                "unsupported_query",
                "metrics",
                "`conversion_rate` needs an event:goal filter or dimension",
            ));
        }
        if visit_scoped {
            return Err(QueryError::new(
                "unsupported_query",
                "metrics",
                "`conversion_rate` with visit metrics or visit:* dimensions",
            ));
        }
    }
    let order_by = parse_order_by(obj.get("order_by"))?;
    let (limit, offset) = parse_pagination(obj.get("pagination"))?;
    let (total_rows, time_labels) = parse_include(obj.get("include"))?;
    if time_labels && !dims.iter().any(|d| matches!(d, DimSpec::Time(_))) {
        return Err(QueryError::invalid(
            "include.time_labels",
            "`include.time_labels` needs a time dimension",
        ));
    }
    Ok(Request {
        site_id,
        range,
        metrics,
        zone_given: !matches!(obj.get("timezone"), None | Some(Value::Null)),
        zone,
        goals: Vec::new(),
        dims,
        filters,
        filters_echo,
        order_by,
        limit,
        offset,
        total_rows,
        time_labels,
    })
}

impl Request {
    /// What the site registry says of the site: its time zone, when the
    /// request names none, and its goals.
    pub fn for_site(mut self, site: Option<&crate::sites::SiteSettings>) -> Self {
        if let Some(site) = site {
            if !self.zone_given {
                self.zone = site.zone();
            }
            self.goals = site.goals.clone();
        }
        self
    }

    /// Whether resolving needs the site's first event (`"all"`).
    pub fn needs_first_event(&self) -> bool {
        self.range == RangeSpec::Relative(Relative::All)
    }

    /// Resolves the range against `now_ms` (and the site's first event, for
    /// `"all"`), picks the grain of `time`, and checks what depends on them.
    pub fn resolve(self, now_ms: i64, first_event_ms: Option<i64>) -> Result<Query, QueryError> {
        let zone = self.zone;
        let today = zone.today(now_ms);
        let month_start = today.with_day(1).unwrap_or(today);
        let months_back = |n: u32| {
            month_start
                .checked_sub_months(Months::new(n))
                .unwrap_or(month_start)
        };
        let days = |first: NaiveDate, last: NaiveDate| {
            let end = last.succ_opt().unwrap_or(last);
            (zone.day_start(first), zone.day_start(end))
        };
        let (start, end) = match self.range {
            RangeSpec::Relative(r) => {
                let first = match r {
                    Relative::Day => today,
                    Relative::Days7 => today - chrono::Duration::days(6),
                    Relative::Days30 => today - chrono::Duration::days(29),
                    Relative::Month => month_start,
                    Relative::Months6 => months_back(5),
                    Relative::Months12 => months_back(11),
                    Relative::Year => today.with_ordinal(1).unwrap_or(today),
                    Relative::All => {
                        first_event_ms.map_or(today, |t| zone.local(t).date().min(today))
                    }
                };
                days(first, today)
            }
            RangeSpec::Dates(first, last) => days(first, last),
            RangeSpec::Instants(first, last) => (first, last + SECOND_MS),
        };
        let mut dims = Vec::with_capacity(self.dims.len());
        for d in &self.dims {
            dims.push(match d {
                DimSpec::Time(TimeSpec::Grain(g)) => Dim::Time(*g),
                DimSpec::Time(TimeSpec::Auto) => Dim::Time(auto_grain(&zone, start, end)),
                DimSpec::Event(d) => Dim::Event(d.clone()),
            });
        }
        if let Some(grain) = dims.iter().find_map(|d| match d {
            Dim::Time(g) => Some(*g),
            Dim::Event(_) => None,
        }) && grain.count_bound(&zone, start, end) > MAX_BUCKETS as i64
        {
            return Err(QueryError::new(
                "too_many_buckets",
                "dimensions",
                format!(
                    "`{}` over this range makes more than {MAX_BUCKETS} time buckets; \
                     use a larger grain or a shorter range",
                    grain.name()
                ),
            ));
        }
        let dim_names: Vec<String> = dims.iter().map(dim_name).collect();
        let order_by = match &self.order_by {
            Some(entries) => entries
                .iter()
                .enumerate()
                .map(|(i, (key, dir))| {
                    let resolved = if key == "time" {
                        dims.iter()
                            .position(|d| matches!(d, Dim::Time(_)))
                            .map(OrderKey::Dimension)
                    } else if let Some(m) = Metric::parse(key).filter(|m| self.metrics.contains(m))
                    {
                        Some(OrderKey::Metric(m))
                    } else {
                        dim_names
                            .iter()
                            .position(|n| n == key)
                            .map(OrderKey::Dimension)
                    };
                    resolved.map(|k| (k, *dir)).ok_or_else(|| {
                        QueryError::invalid(
                            format!("order_by[{i}]"),
                            format!(
                                "`{}` is not one of the query's metrics or dimensions",
                                short(key)
                            ),
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()?,
            None => {
                // Time order first when there is a time dimension, then the
                // first metric, largest first.
                let mut order = Vec::new();
                if let Some(i) = dims.iter().position(|d| matches!(d, Dim::Time(_))) {
                    order.push((OrderKey::Dimension(i), Direction::Asc));
                }
                order.push((OrderKey::Metric(self.metrics[0]), Direction::Desc));
                order
            }
        };
        let order_echo: Vec<Value> = order_by
            .iter()
            .map(|(k, d)| {
                let key = match k {
                    OrderKey::Metric(m) => m.name().to_owned(),
                    OrderKey::Dimension(i) => dim_names[*i].clone(),
                };
                json!([
                    key,
                    match d {
                        Direction::Asc => "asc",
                        Direction::Desc => "desc",
                    }
                ])
            })
            .collect();
        let mut include = Map::new();
        if self.total_rows {
            include.insert("total_rows".into(), true.into());
        }
        if self.time_labels {
            include.insert("time_labels".into(), true.into());
        }
        let echo = json!({
            "site_id": self.site_id.as_str(),
            "metrics": self.metrics.iter().map(|m| m.name()).collect::<Vec<_>>(),
            "date_range": [zone.format_instant(start), zone.format_instant(end - SECOND_MS)],
            "timezone": zone.name(),
            "dimensions": dim_names,
            "filters": self.filters_echo,
            "order_by": order_echo,
            "include": include,
            "pagination": {"limit": self.limit, "offset": self.offset},
        });
        // Goals: filters on them made conditions on names and pages; the
        // goals the rows of an event:goal dimension are.
        let mut filters = Vec::with_capacity(self.filters.len());
        let mut base_filters = Vec::new();
        for (i, f) in self.filters.iter().enumerate() {
            let expanded = super::goals::expand(f, &self.goals, &format!("filters[{i}]"))?;
            if !super::goals::mentions_goal(f) {
                base_filters.push(expanded.clone());
            }
            filters.push(expanded);
        }
        let goals = dims.contains(&Dim::Event(Dimension::Goal)).then(|| {
            self.goals
                .iter()
                .map(|g| (g.name(), super::goals::filter_of(g)))
                .collect()
        });
        Ok(Query {
            site_id: self.site_id,
            metrics: self.metrics,
            zone,
            start,
            end,
            dims,
            filters,
            goals,
            base_filters,
            order_by,
            limit: self.limit,
            offset: self.offset,
            include_total_rows: self.total_rows,
            include_time_labels: self.time_labels,
            echo,
        })
    }
}

fn dim_name(d: &Dim) -> String {
    match d {
        Dim::Time(g) => g.name().to_owned(),
        Dim::Event(d) => d.name(),
    }
}

/// `time`: hours up to 48 hours, days up to 40 days, weeks up to 52 weeks,
/// months beyond; lengths on the local wall clock, so that a two-day range
/// is 48 hours even on the day clocks go back.
fn auto_grain(zone: &Zone, start: i64, end: i64) -> TimeGrain {
    let length = (zone.local(end) - zone.local(start)).num_milliseconds();
    if length <= 48 * HOUR_MS {
        TimeGrain::Hour
    } else if length <= 40 * 24 * HOUR_MS {
        TimeGrain::Day
    } else if length <= 52 * 7 * 24 * HOUR_MS {
        TimeGrain::Week
    } else {
        TimeGrain::Month
    }
}

fn short(s: &str) -> String {
    const MAX: usize = 64;
    match s.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

fn parse_metrics(v: Option<&Value>) -> Result<Vec<Metric>, QueryError> {
    let items = match v {
        None | Some(Value::Null) => {
            return Err(QueryError::new(
                "missing_field",
                "metrics",
                "`metrics` is required",
            ));
        }
        Some(Value::Array(items)) if !items.is_empty() => items,
        Some(_) => {
            return Err(QueryError::invalid(
                "metrics",
                "`metrics` must be a non-empty list, e.g. [\"visitors\"]",
            ));
        }
    };
    let mut metrics = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let field = format!("metrics[{i}]");
        let name = item
            .as_str()
            .ok_or_else(|| QueryError::invalid(&field, "a metric is a string"))?;
        let metric = Metric::parse(name).ok_or_else(|| {
            QueryError::new(
                "unknown_metric",
                &field,
                format!(
                    "unknown metric `{}`; known: visitors, pageviews, events, visits, \
                     bounce_rate, visit_duration, views_per_visit, conversion_rate",
                    short(name)
                ),
            )
        })?;
        if metrics.contains(&metric) {
            return Err(QueryError::invalid(
                field,
                format!("metric `{name}` is listed twice"),
            ));
        }
        metrics.push(metric);
    }
    Ok(metrics)
}

fn parse_range(v: Option<&Value>) -> Result<RangeSpec, QueryError> {
    let bad = |m: String| QueryError::new("invalid_date_range", "date_range", m);
    match v {
        None | Some(Value::Null) => Err(QueryError::new(
            "missing_field",
            "date_range",
            "`date_range` is required",
        )),
        Some(Value::String(s)) => {
            let r = match s.as_str() {
                "day" => Relative::Day,
                "7d" => Relative::Days7,
                "30d" => Relative::Days30,
                "month" => Relative::Month,
                "6mo" => Relative::Months6,
                "12mo" => Relative::Months12,
                "year" => Relative::Year,
                "all" => Relative::All,
                _ => {
                    return Err(bad(format!(
                        "`{}` is not a date range: use day, 7d, 30d, month, 6mo, 12mo, year, all, \
                         or a pair of dates or date-times",
                        short(s)
                    )));
                }
            };
            Ok(RangeSpec::Relative(r))
        }
        Some(Value::Array(pair)) if pair.len() == 2 => {
            let (Some(a), Some(b)) = (pair[0].as_str(), pair[1].as_str()) else {
                return Err(bad("`date_range` must hold two strings".into()));
            };
            if let (Some(first), Some(last)) = (date(a), date(b)) {
                if last < first {
                    return Err(bad(format!(
                        "the end date {b} is before the start date {a}"
                    )));
                }
                return Ok(RangeSpec::Dates(first, last));
            }
            let first = instant(a).map_err(|m| bad(format!("start: {m}")))?;
            let last = instant(b).map_err(|m| bad(format!("end: {m}")))?;
            if last < first {
                return Err(bad(format!("the end {b} is before the start {a}")));
            }
            Ok(RangeSpec::Instants(first, last))
        }
        Some(_) => Err(bad(
            "`date_range` must be a name (e.g. \"7d\") or a pair of dates or date-times".into(),
        )),
    }
}

/// A calendar date `YYYY-MM-DD` from 1970 to 9999.
fn date(s: &str) -> Option<NaiveDate> {
    if s.len() != 10 {
        return None;
    }
    NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .ok()
        .filter(|d| d.year() >= 1970 && d.year() <= 9999)
}

/// An RFC 3339 date-time with an offset, whole seconds, from 1970.
fn instant(s: &str) -> Result<i64, String> {
    let t = DateTime::parse_from_rfc3339(s).map_err(|_| {
        format!(
            "`{}` is neither a date (YYYY-MM-DD) nor a date-time with an offset \
             (e.g. 2025-11-03T10:00:00+05:30)",
            short(s)
        )
    })?;
    if t.timestamp_subsec_nanos() != 0 {
        return Err(format!("`{}` has fractions of a second", short(s)));
    }
    let ms = t.timestamp_millis();
    if !(0..=253_402_300_799_000).contains(&ms) {
        return Err(format!("`{}` is before 1970 or after 9999", short(s)));
    }
    Ok(ms)
}

fn parse_dimension(name: &str, field: &str) -> Result<DimSpec, QueryError> {
    let unknown = || {
        QueryError::new(
            "unknown_dimension",
            field,
            format!(
                "unknown dimension `{}`; known: event:name, event:page, event:goal, event:props:<key>, \
                 visit:source, visit:referrer, visit:utm_source, visit:utm_medium, \
                 visit:utm_campaign, visit:utm_content, visit:utm_term, visit:country, \
                 visit:browser, visit:browser_version, visit:os, visit:os_version, \
                 visit:device, visit:entry_page, visit:exit_page, \
                 time, time:hour, time:day, time:week, time:month",
                short(name)
            ),
        )
    };
    Ok(match name {
        "event:name" => DimSpec::Event(Dimension::Name),
        "event:page" => DimSpec::Event(Dimension::Page),
        "event:goal" => DimSpec::Event(Dimension::Goal),
        "time" => DimSpec::Time(TimeSpec::Auto),
        "time:hour" => DimSpec::Time(TimeSpec::Grain(TimeGrain::Hour)),
        "time:day" => DimSpec::Time(TimeSpec::Grain(TimeGrain::Day)),
        "time:week" => DimSpec::Time(TimeSpec::Grain(TimeGrain::Week)),
        "time:month" => DimSpec::Time(TimeSpec::Grain(TimeGrain::Month)),
        _ => {
            if let Some(key) = name.strip_prefix("event:props:") {
                if key.is_empty()
                    || key.chars().nth(MAX_PROP_KEY_CHARS).is_some()
                    || key.chars().any(char::is_control)
                {
                    return Err(unknown());
                }
                DimSpec::Event(Dimension::Prop(key.to_owned()))
            } else if let Some(f) = name.strip_prefix("visit:").and_then(VisitField::parse) {
                DimSpec::Event(Dimension::Visit(f))
            } else {
                return Err(unknown());
            }
        }
    })
}

fn parse_dimensions(v: Option<&Value>) -> Result<Vec<DimSpec>, QueryError> {
    let items = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(_) => {
            return Err(QueryError::invalid(
                "dimensions",
                "`dimensions` must be a list",
            ));
        }
    };
    let mut dims = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let field = format!("dimensions[{i}]");
        let name = item
            .as_str()
            .ok_or_else(|| QueryError::invalid(&field, "a dimension is a string"))?;
        dims.push(parse_dimension(name, &field)?);
    }
    let times = dims
        .iter()
        .filter(|d| matches!(d, DimSpec::Time(_)))
        .count();
    let others = dims.len() - times;
    if times > 1 || others > 1 {
        return Err(QueryError::new(
            "unsupported_query",
            "dimensions",
            "at most one time dimension and one other dimension",
        ));
    }
    Ok(dims)
}

fn parse_filter(
    v: &Value,
    field: &str,
    depth: usize,
    budget: &mut usize,
) -> Result<Filter, QueryError> {
    if depth >= MAX_FILTER_DEPTH {
        return Err(QueryError::invalid(
            field,
            format!("filters nest at most {MAX_FILTER_DEPTH} deep"),
        ));
    }
    let Some(items) = v.as_array() else {
        return Err(QueryError::invalid(
            field,
            "a filter is a list: [operator, dimension, [values]]",
        ));
    };
    let op = items.first().and_then(Value::as_str).unwrap_or("");
    match op {
        "and" | "or" => {
            let Some(Value::Array(children)) = items.get(1).filter(|_| items.len() == 2) else {
                return Err(QueryError::invalid(
                    field,
                    format!("`{op}` takes a list of filters: [\"{op}\", [filter, …]]"),
                ));
            };
            if children.is_empty() {
                return Err(QueryError::invalid(
                    field,
                    format!("`{op}` needs at least one filter"),
                ));
            }
            let children = children
                .iter()
                .enumerate()
                .map(|(i, c)| parse_filter(c, &format!("{field}[1][{i}]"), depth + 1, budget))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(if op == "and" {
                Filter::And(children)
            } else {
                Filter::Or(children)
            })
        }
        "not" => {
            let (Some(child), 2) = (items.get(1), items.len()) else {
                return Err(QueryError::invalid(
                    field,
                    "`not` takes one filter: [\"not\", filter]",
                ));
            };
            Ok(Filter::Not(Box::new(parse_filter(
                child,
                &format!("{field}[1]"),
                depth + 1,
                budget,
            )?)))
        }
        _ => {
            let op = match op {
                "is" => FilterOp::Is,
                "is_not" => FilterOp::IsNot,
                "contains" => FilterOp::Contains,
                "contains_not" => FilterOp::ContainsNot,
                _ => {
                    return Err(QueryError::new(
                        "unknown_filter_operator",
                        field,
                        format!(
                            "unknown filter operator `{}`; known: is, is_not, contains, \
                             contains_not, and, or, not",
                            short(op)
                        ),
                    ));
                }
            };
            if *budget == 0 {
                return Err(QueryError::invalid(
                    field,
                    format!("a query holds at most {MAX_CONDITIONS} filter conditions"),
                ));
            }
            *budget -= 1;
            if !(3..=4).contains(&items.len()) {
                return Err(QueryError::invalid(
                    field,
                    "a filter is [operator, dimension, [values]] with an optional {\"case_sensitive\": false}",
                ));
            }
            let dim_name = items[1].as_str().ok_or_else(|| {
                QueryError::invalid(field, "the filter's dimension must be a string")
            })?;
            let dimension = match parse_dimension(dim_name, field)? {
                DimSpec::Event(d) => d,
                DimSpec::Time(_) => {
                    return Err(QueryError::new(
                        "unsupported_query",
                        field,
                        "time dimensions cannot be filtered; use date_range",
                    ));
                }
            };
            let case_sensitive = match items.get(3) {
                None => true,
                Some(Value::Object(m)) => {
                    if let Some(k) = m.keys().find(|k| *k != "case_sensitive") {
                        return Err(QueryError::invalid(
                            field,
                            format!("unknown filter option `{}`", short(k)),
                        ));
                    }
                    match m.get("case_sensitive") {
                        None => true,
                        Some(Value::Bool(b)) => *b,
                        Some(_) => {
                            return Err(QueryError::invalid(
                                field,
                                "`case_sensitive` must be true or false",
                            ));
                        }
                    }
                }
                Some(_) => {
                    return Err(QueryError::invalid(
                        field,
                        "a filter's options are an object: {\"case_sensitive\": false}",
                    ));
                }
            };
            let Some(Value::Array(raw)) = items.get(2) else {
                return Err(QueryError::invalid(field, "a filter's values are a list"));
            };
            if raw.is_empty() || raw.len() > MAX_FILTER_VALUES {
                return Err(QueryError::invalid(
                    field,
                    format!("a filter takes 1 to {MAX_FILTER_VALUES} values"),
                ));
            }
            let mut values = Vec::with_capacity(raw.len());
            for v in raw {
                let text = match v {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    _ => {
                        return Err(QueryError::invalid(
                            field,
                            "filter values are strings (or numbers and booleans, compared as text)",
                        ));
                    }
                };
                if text.len() > MAX_FILTER_VALUE_BYTES {
                    return Err(QueryError::invalid(
                        field,
                        format!("a filter value is at most {MAX_FILTER_VALUE_BYTES} bytes"),
                    ));
                }
                let text = if dimension == Dimension::Name
                    && matches!(op, FilterOp::Is | FilterOp::IsNot)
                    && text == PLAUSIBLE_PAGEVIEW
                {
                    PAGEVIEW.to_owned()
                } else {
                    text
                };
                values.push(if case_sensitive {
                    text
                } else {
                    text.to_lowercase()
                });
            }
            Ok(Filter::Condition(Condition {
                op,
                dimension,
                values,
                case_sensitive,
            }))
        }
    }
}

fn parse_order_by(v: Option<&Value>) -> Result<Option<Vec<(String, Direction)>>, QueryError> {
    let items = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(items)) if !items.is_empty() && items.len() <= 8 => items,
        Some(_) => {
            return Err(QueryError::invalid(
                "order_by",
                "`order_by` is a list of 1 to 8 [key, \"asc\" | \"desc\"] pairs",
            ));
        }
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let field = format!("order_by[{i}]");
            let pair = item.as_array().filter(|p| p.len() == 2);
            let (Some(key), Some(dir)) = (
                pair.and_then(|p| p[0].as_str()),
                pair.and_then(|p| p[1].as_str()),
            ) else {
                return Err(QueryError::invalid(
                    field,
                    "an order_by entry is [key, \"asc\" | \"desc\"]",
                ));
            };
            let dir = match dir {
                "asc" => Direction::Asc,
                "desc" => Direction::Desc,
                _ => {
                    return Err(QueryError::invalid(
                        field,
                        "the direction is \"asc\" or \"desc\"",
                    ));
                }
            };
            Ok((key.to_owned(), dir))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

fn parse_pagination(v: Option<&Value>) -> Result<(usize, usize), QueryError> {
    let obj = match v {
        None | Some(Value::Null) => return Ok((MAX_ROWS, 0)),
        Some(Value::Object(o)) => o,
        Some(_) => {
            return Err(QueryError::invalid(
                "pagination",
                "`pagination` is an object: {\"limit\": …, \"offset\": …}",
            ));
        }
    };
    if let Some(k) = obj.keys().find(|k| *k != "limit" && *k != "offset") {
        return Err(QueryError::invalid(
            "pagination",
            format!("unknown pagination field `{}`", short(k)),
        ));
    }
    let limit = match obj.get("limit") {
        None | Some(Value::Null) => MAX_ROWS,
        Some(v) => v
            .as_u64()
            .filter(|n| (1..=MAX_ROWS as u64).contains(n))
            .ok_or_else(|| {
                QueryError::invalid(
                    "pagination.limit",
                    format!("`pagination.limit` is a whole number from 1 to {MAX_ROWS}"),
                )
            })? as usize,
    };
    let offset = match obj.get("offset") {
        None | Some(Value::Null) => 0,
        Some(v) => v
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| {
                QueryError::invalid(
                    "pagination.offset",
                    "`pagination.offset` is a whole number from 0",
                )
            })?,
    };
    Ok((limit, offset))
}

fn parse_include(v: Option<&Value>) -> Result<(bool, bool), QueryError> {
    let obj = match v {
        None | Some(Value::Null) => return Ok((false, false)),
        Some(Value::Object(o)) => o,
        Some(_) => return Err(QueryError::invalid("include", "`include` is an object")),
    };
    let mut total_rows = false;
    let mut time_labels = false;
    for (k, v) in obj {
        let field = format!("include.{}", short(k));
        let flag = v
            .as_bool()
            .ok_or_else(|| QueryError::invalid(&field, format!("`{field}` is true or false")))?;
        match k.as_str() {
            "total_rows" => total_rows = flag,
            "time_labels" => time_labels = flag,
            // Plausible's imported-data flag: there is nothing imported here.
            "imports" => {}
            _ => {
                return Err(QueryError::invalid(
                    &field,
                    format!("unknown include `{}`", short(k)),
                ));
            }
        }
    }
    Ok((total_rows, time_labels))
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2025-11-23T16:44:31Z
    const NOW: i64 = 1_763_916_271_000;

    fn query(body: Value) -> Result<Query, QueryError> {
        parse_request(&body)?.resolve(NOW, None)
    }

    fn field(body: Value) -> (String, &'static str) {
        let e = query(body).expect_err("an invalid query");
        (e.field.unwrap_or_default(), e.code)
    }

    #[test]
    fn relative_ranges_end_today_in_the_zone() {
        for (range, tz, first, last) in [
            (
                "day",
                "UTC",
                "2025-11-23T00:00:00+00:00",
                "2025-11-23T23:59:59+00:00",
            ),
            // Already the 24th in Tokyo.
            (
                "day",
                "Asia/Tokyo",
                "2025-11-24T00:00:00+09:00",
                "2025-11-24T23:59:59+09:00",
            ),
            (
                "7d",
                "UTC",
                "2025-11-17T00:00:00+00:00",
                "2025-11-23T23:59:59+00:00",
            ),
            (
                "30d",
                "UTC",
                "2025-10-25T00:00:00+00:00",
                "2025-11-23T23:59:59+00:00",
            ),
            (
                "month",
                "UTC",
                "2025-11-01T00:00:00+00:00",
                "2025-11-23T23:59:59+00:00",
            ),
            (
                "6mo",
                "UTC",
                "2025-06-01T00:00:00+00:00",
                "2025-11-23T23:59:59+00:00",
            ),
            (
                "12mo",
                "UTC",
                "2024-12-01T00:00:00+00:00",
                "2025-11-23T23:59:59+00:00",
            ),
            (
                "year",
                "Europe/Paris",
                "2025-01-01T00:00:00+01:00",
                "2025-11-23T23:59:59+01:00",
            ),
        ] {
            let q = query(json!({"site_id": "s", "metrics": ["visitors"], "date_range": range, "timezone": tz}))
                .unwrap();
            assert_eq!(q.echo["date_range"], json!([first, last]), "{range} {tz}");
        }
    }

    #[test]
    fn all_starts_at_the_first_event() {
        let r = parse_request(&json!({"site_id": "s", "metrics": ["events"], "date_range": "all"}))
            .unwrap();
        assert!(r.needs_first_event());
        let q = r.resolve(NOW, Some(1_700_000_000_000)).unwrap(); // 2023-11-14
        assert_eq!(q.echo["date_range"][0], "2023-11-14T00:00:00+00:00");
    }

    #[test]
    fn instants_include_their_last_second() {
        let q = query(json!({"site_id": "s", "metrics": ["events"],
            "date_range": ["2025-11-03T10:00:00+05:30", "2025-11-04T09:29:59+05:30"]}))
        .unwrap();
        assert_eq!(q.end - q.start, 23 * HOUR_MS + HOUR_MS / 2);
    }

    #[test]
    fn time_picks_its_grain_from_the_range() {
        for (range, grain) in [
            (json!(["2025-11-01", "2025-11-02"]), "time:hour"),
            (json!(["2025-11-01", "2025-11-03"]), "time:day"),
            (json!(["2025-01-01", "2025-02-09"]), "time:day"),
            (json!(["2025-01-01", "2025-02-10"]), "time:week"),
            (json!(["2025-01-01", "2025-12-30"]), "time:week"),
            (json!(["2025-01-01", "2025-12-31"]), "time:month"),
            // 49 hours on the day clocks go back: still two days of hours.
            (json!(["2025-10-25", "2025-10-26"]), "time:hour"),
        ] {
            let q = query(
                json!({"site_id": "s", "metrics": ["events"], "date_range": range,
                "dimensions": ["time"], "timezone": "Europe/Paris"}),
            )
            .unwrap();
            assert_eq!(q.echo["dimensions"], json!([grain]), "{range}");
        }
    }

    #[test]
    fn bad_queries_name_what_is_wrong() {
        let base = || json!({"site_id": "s", "metrics": ["visitors"], "date_range": "7d"});
        let with = |k: &str, v: Value| {
            let mut b = base();
            b[k] = v;
            b
        };
        let with2 = |k: &str, v: Value, k2: &str, v2: Value| {
            let mut b = with(k, v);
            b[k2] = v2;
            b
        };
        for (body, want) in [
            (
                json!({"metrics": ["visitors"], "date_range": "7d"}),
                ("site_id", "missing_field"),
            ),
            (
                with("metrics", json!(["visitors", "nope"])),
                ("metrics[1]", "unknown_metric"),
            ),
            (
                with("metrics", json!(["bounce_rate", "bounce"])),
                ("metrics[1]", "unknown_metric"),
            ),
            (with("metrics", json!([])), ("metrics", "invalid_query")),
            (
                with("date_range", json!("8d")),
                ("date_range", "invalid_date_range"),
            ),
            (
                with("date_range", json!(["2025-02-30", "2025-03-01"])),
                ("date_range", "invalid_date_range"),
            ),
            (
                with("date_range", json!(["2025-03-02", "2025-03-01"])),
                ("date_range", "invalid_date_range"),
            ),
            (
                with(
                    "date_range",
                    json!(["2025-03-01T00:00:00.5Z", "2025-03-01T01:00:00Z"]),
                ),
                ("date_range", "invalid_date_range"),
            ),
            (
                with(
                    "date_range",
                    json!(["2025-03-01T00:00:00", "2025-03-01T01:00:00"]),
                ),
                ("date_range", "invalid_date_range"),
            ),
            (
                with("timezone", json!("Mars/Olympus")),
                ("timezone", "unknown_time_zone"),
            ),
            (
                with("dimensions", json!(["event:nope"])),
                ("dimensions[0]", "unknown_dimension"),
            ),
            (
                with("dimensions", json!(["event:props:"])),
                ("dimensions[0]", "unknown_dimension"),
            ),
            (
                with("dimensions", json!(["visit:nope"])),
                ("dimensions[0]", "unknown_dimension"),
            ),
            (
                with("dimensions", json!(["visit:source", "event:page"])),
                ("dimensions", "unsupported_query"),
            ),
            // Visits grouped by an event's value: which of a visit's events
            // would say?
            (
                with2(
                    "metrics",
                    json!(["visits"]),
                    "dimensions",
                    json!(["event:page"]),
                ),
                ("dimensions", "unsupported_query"),
            ),
            (
                with("dimensions", json!(["event:page", "event:name"])),
                ("dimensions", "unsupported_query"),
            ),
            (
                with("dimensions", json!(["time:hour", "time:day"])),
                ("dimensions", "unsupported_query"),
            ),
            (
                with("filters", json!([["matches", "event:page", ["/a"]]])),
                ("filters[0]", "unknown_filter_operator"),
            ),
            (
                with("filters", json!([["is", "event:page", "/a"]])),
                ("filters[0]", "invalid_query"),
            ),
            (
                with("filters", json!([["is", "time:day", ["2025-01-01"]]])),
                ("filters[0]", "unsupported_query"),
            ),
            (
                with(
                    "filters",
                    json!([["or", [["is", "event:page", ["/a"]], ["is", "nope", ["x"]]]]]),
                ),
                ("filters[0][1][1]", "unknown_dimension"),
            ),
            (
                with("order_by", json!([["events", "desc"]])),
                ("order_by[0]", "invalid_query"),
            ),
            (
                with("pagination", json!({"limit": 10001})),
                ("pagination.limit", "invalid_query"),
            ),
            (
                with("include", json!({"time_labels": true})),
                ("include.time_labels", "invalid_query"),
            ),
            (with("colour", json!("red")), ("colour", "unknown_field")),
        ] {
            let (field_got, code) = field(body.clone());
            assert_eq!((field_got.as_str(), code), want, "{body}");
        }
        // Hourly buckets over more than 10,000 hours.
        let mut b = with("date_range", json!(["2020-01-01", "2021-12-31"]));
        b["dimensions"] = json!(["time:hour"]);
        assert_eq!(field(b), ("dimensions".into(), "too_many_buckets"));
    }

    #[test]
    fn pageview_in_name_filters_means_page_view() {
        let q = query(json!({"site_id": "s", "metrics": ["events"], "date_range": "day",
            "filters": [["is", "event:name", ["pageview"]], ["contains", "event:page", ["BLOG"], {"case_sensitive": false}]]}))
        .unwrap();
        let Filter::Condition(c) = &q.filters[0] else {
            panic!()
        };
        assert_eq!(c.values, ["page_view"]);
        let Filter::Condition(c) = &q.filters[1] else {
            panic!()
        };
        assert!(c.holds("/Blog/post") && !c.holds("/news"));
    }

    #[test]
    fn the_default_order_is_time_then_the_first_metric() {
        let q = query(
            json!({"site_id": "s", "metrics": ["pageviews", "visitors"], "date_range": "7d",
            "dimensions": ["event:page", "time:day"]}),
        )
        .unwrap();
        assert_eq!(
            q.echo["order_by"],
            json!([["time:day", "asc"], ["pageviews", "desc"]])
        );
    }
}
