//! Rollups: per (site, dimension, value, event name, time bucket), the number
//! of events and the set of their visitors, exact.
//!
//! Distinct visitors do not add up across buckets, so each rollup keeps its
//! visitors as a compressed bitmap ([`RoaringBitmap`]) over per-site integer
//! visitor ids (each store keeps the dictionary from visitor to id on disk;
//! ids are given out in order, so one period's visitors are mostly a run of
//! consecutive ids and compress well). The visitors of a range are the union
//! of its buckets' bitmaps.
//!
//! Buckets come in four UTC-aligned [`Level`]s: 15 minutes, hours, days and
//! calendar months. Every zone's offset today is a multiple of 15 minutes, so
//! any local range is a union of whole buckets, a few small ones at the
//! edges and large ones in the middle ([`cover`]); what is not a whole
//! 15 minutes (an instant range at odd seconds, an offset of a zone's distant
//! past) is read from the raw events.
//!
//! The dimensions each event is counted under ([`Deltas::of`]):
//! - `keys`: the sorted list of property keys it carries. Every event has
//!   exactly one, so these rows are the totals; and an event lacks property
//!   `k` exactly when its key list lacks `k`, which gives the exact `(none)`
//!   group of any property;
//! - `page`: its path, `(none)` without one;
//! - `prop:<key>`: each property's value as text.
//!
//! The event name is part of every row's key, so a filter or breakdown on
//! `event:name` combines with any of them.
//!
//! **Sparse days.** Rows pay off where many events share them. A site of
//! 100 events a day would make rows of one event each at the 15-minute and
//! hour levels (about three rows per event, against a third of a row for a
//! site of a million), and reading its raw events back costs less than
//! keeping them. So each (site, UTC day) keeps rows only from the
//! [`Density`] its number of events has reached: months always; hours and
//! days from `Density::hour` events on; 15-minute buckets from
//! `Density::quarter` on. The state of each site-day ([`DayState`]: its
//! events and the finest level it keeps) is stored beside the rollups and
//! updated by the same fold. When a day reaches a finer level, the fold
//! that gets it there adds the rows of the day's earlier events at the new
//! levels from the raw events ([`DayChange::backfill`]), so a day keeps,
//! at each level it keeps, every one of its events. A day never goes back
//! to coarser levels. Queries read the raw events of the pieces a day does
//! not keep ([`crate::query::engine::Aggregator::use_density`]).

use std::collections::HashMap;

use roaring::RoaringBitmap;

use crate::event::Event;
use crate::query::time::{DAY_MS, HOUR_MS, MINUTE_MS};
use crate::query::{page_of, prop_text};

pub const DIM_KEYS: &str = "keys";
pub const DIM_PAGE: &str = "page";
pub const PROP_PREFIX: &str = "prop:";
/// Between property keys in a `keys` value (keys have no control characters).
pub const KEY_SEPARATOR: char = '\u{1f}';

const QUARTER_MS: i64 = 15 * MINUTE_MS;

/// The size of a rollup bucket; buckets are aligned in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Level {
    Quarter = 0,
    Hour = 1,
    Day = 2,
    Month = 3,
}

impl Level {
    pub const ALL: [Level; 4] = [Level::Quarter, Level::Hour, Level::Day, Level::Month];

    pub fn code(self) -> i64 {
        self as i64
    }

    pub fn from_code(code: i64) -> Option<Self> {
        Self::ALL.into_iter().find(|l| l.code() == code)
    }

    /// The start (epoch ms) of the bucket holding `ts`.
    pub fn start(self, ts: i64) -> i64 {
        match self {
            Level::Quarter => ts.div_euclid(QUARTER_MS) * QUARTER_MS,
            Level::Hour => ts.div_euclid(HOUR_MS) * HOUR_MS,
            Level::Day => ts.div_euclid(DAY_MS) * DAY_MS,
            Level::Month => match chrono::DateTime::from_timestamp_millis(ts) {
                Some(t) => {
                    use chrono::Datelike;
                    let date = t.date_naive();
                    let first = date.with_day(1).unwrap_or(date);
                    first
                        .and_time(chrono::NaiveTime::MIN)
                        .and_utc()
                        .timestamp_millis()
                }
                None => ts.div_euclid(DAY_MS) * DAY_MS,
            },
        }
    }

    /// The start of the bucket after the one starting at `start`.
    pub fn next(self, start: i64) -> i64 {
        match self {
            Level::Quarter => start + QUARTER_MS,
            Level::Hour => start + HOUR_MS,
            Level::Day => start + DAY_MS,
            // A month is 28 to 31 days: the month holding 32 days later is
            // the next one.
            Level::Month => Level::Month.start(start + 32 * DAY_MS),
        }
    }
}

/// From how many events a site's UTC day keeps rows below the month level.
/// See the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Density {
    /// Hour and day rows from this many events on.
    pub hour: u64,
    /// 15-minute rows from this many events on (at least `hour`).
    pub quarter: u64,
}

impl Default for Density {
    /// A day under 1,000 events is read raw (at most 1,000 rows per day of
    /// a range); 15-minute buckets, which serve only the edges of ranges
    /// in zones at half or quarter hours and instant ranges, are kept from
    /// 20,000 events a day (an edge read raw is then at most 45 minutes of
    /// such a day, a few hundred events).
    fn default() -> Self {
        Self {
            hour: 1_000,
            quarter: 20_000,
        }
    }
}

impl Density {
    /// Every level from the first event on (as if no day were sparse).
    pub const ALL_LEVELS: Density = Density {
        hour: 0,
        quarter: 0,
    };

    /// The finest level a day of `events` events keeps.
    pub fn finest(&self, events: u64) -> Level {
        if events >= self.quarter.max(self.hour) {
            Level::Quarter
        } else if events >= self.hour {
            Level::Hour
        } else {
            Level::Month
        }
    }
}

/// What is stored about one site's UTC day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DayState {
    /// Events of the day counted in the rollups.
    pub events: u64,
    /// The finest level whose rows the day keeps (and every coarser one).
    pub finest: Level,
}

impl Default for DayState {
    fn default() -> Self {
        Self {
            events: 0,
            finest: Level::Month,
        }
    }
}

impl DayState {
    /// Whether the day keeps rows of `level`.
    pub fn keeps(&self, level: Level) -> bool {
        level >= self.finest
    }

    /// The levels the day keeps, finest first.
    pub fn levels(&self) -> &'static [Level] {
        &Level::ALL[self.finest as usize..]
    }
}

/// What one fold does to a site-day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DayChange {
    pub before: DayState,
    pub after: DayState,
}

impl DayChange {
    /// The levels the day keeps from this fold on and did not before: the
    /// rows of its earlier events at these levels are added from the raw
    /// events.
    pub fn backfill(&self) -> &'static [Level] {
        let (from, to) = (self.after.finest as usize, self.before.finest as usize);
        Level::ALL.get(from..to).unwrap_or_default()
    }
}

/// Per site, per UTC day start: a value.
pub type SiteDays<T> = HashMap<String, HashMap<i64, T>>;

/// How many events of a batch fall on each site-day.
pub fn day_counts(events: &[Event]) -> SiteDays<u64> {
    let mut counts: SiteDays<u64> = HashMap::new();
    for e in events {
        let days = match counts.get_mut(e.site_id.as_str()) {
            Some(days) => days,
            None => counts.entry(e.site_id.as_str().to_owned()).or_default(),
        };
        *days.entry(Level::Day.start(e.ts)).or_default() += 1;
    }
    counts
}

/// The changes a batch with `counts` makes to site-days stored as
/// `stored` says (absent: no event yet).
pub fn day_changes(
    counts: &SiteDays<u64>,
    stored: &SiteDays<DayState>,
    density: Density,
) -> SiteDays<DayChange> {
    counts
        .iter()
        .map(|(site, days)| {
            let changes = days
                .iter()
                .map(|(&day, &n)| {
                    let before = stored
                        .get(site)
                        .and_then(|d| d.get(&day))
                        .copied()
                        .unwrap_or_default();
                    let events = before.events + n;
                    let after = DayState {
                        events,
                        finest: before.finest.min(density.finest(events)),
                    };
                    (day, DayChange { before, after })
                })
                .collect();
            (site.clone(), changes)
        })
        .collect()
}

/// The site-days of `counts` as they stand (`stored`; absent: no event
/// yet), unchanged: what events already counted are counted at, for taking
/// them out again (an erasure).
pub fn unchanged(counts: &SiteDays<u64>, stored: &SiteDays<DayState>) -> SiteDays<DayChange> {
    counts
        .iter()
        .map(|(site, days)| {
            let changes = days
                .keys()
                .map(|&day| {
                    let state = stored
                        .get(site)
                        .and_then(|d| d.get(&day))
                        .copied()
                        .unwrap_or_default();
                    (
                        day,
                        DayChange {
                            before: state,
                            after: state,
                        },
                    )
                })
                .collect();
            (site.clone(), changes)
        })
        .collect()
}

/// One whole bucket of some level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Piece {
    pub level: Level,
    pub bucket: i64,
}

/// `[start, end)` as whole buckets, largest where they fit, plus at most two
/// slivers (less than 15 minutes each, at the ends) that no bucket covers.
pub fn cover(start: i64, end: i64) -> (Vec<Piece>, Vec<(i64, i64)>) {
    let mut pieces = Vec::new();
    let mut raw = Vec::new();
    if start >= end {
        return (pieces, raw);
    }
    let a = Level::Quarter.start(start + QUARTER_MS - 1);
    let b = Level::Quarter.start(end);
    if a >= b {
        raw.push((start, end));
        return (pieces, raw);
    }
    if start < a {
        raw.push((start, a));
    }
    if b < end {
        raw.push((b, end));
    }
    // Up: small buckets until aligned to the next level (or out of room).
    let mut t = a;
    for pair in Level::ALL.windows(2) {
        let (level, up) = (pair[0], pair[1]);
        while up.start(t) != t && level.next(t) <= b {
            pieces.push(Piece { level, bucket: t });
            t = level.next(t);
        }
        if up.start(t) != t {
            break;
        }
    }
    // Down: the largest buckets that fit, then smaller ones.
    for level in Level::ALL.iter().rev().copied() {
        while level.start(t) == t && level.next(t) <= b {
            pieces.push(Piece { level, bucket: t });
            t = level.next(t);
        }
    }
    debug_assert_eq!(t, b, "cover left a gap");
    (pieces, raw)
}

/// The `keys` value of an event: its property keys with a value, sorted.
pub fn key_list(e: &Event) -> String {
    let mut out = String::new();
    write_key_list(e, &mut out);
    out
}

/// [`key_list`] into `out` (cleared first).
fn write_key_list(e: &Event, out: &mut String) {
    out.clear();
    let Some(props) = &e.props else {
        return;
    };
    let mut keys: Vec<&str> = props
        .iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, _)| k.as_str())
        .collect();
    keys.sort_unstable();
    for (i, k) in keys.into_iter().enumerate() {
        if i > 0 {
            out.push(KEY_SEPARATOR);
        }
        out.push_str(k);
    }
}

/// Whether a `keys` value holds `key`.
pub fn has_key(list: &str, key: &str) -> bool {
    !list.is_empty() && list.split(KEY_SEPARATOR).any(|k| k == key)
}

/// The key of one rollup row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RowKey<'a> {
    pub site_id: &'a str,
    pub dim: &'a str,
    pub level: Level,
    pub bucket: i64,
    pub value: &'a str,
    pub name: &'a str,
}

/// Interned strings of a [`Deltas`]: a batch repeats the same few sites,
/// dimensions, values and names over and over.
#[derive(Debug, Default)]
struct Strings {
    ids: Map<String, u32>,
    texts: Vec<String>,
}

impl Strings {
    fn id(&mut self, s: &str) -> u32 {
        if let Some(&id) = self.ids.get(s) {
            return id;
        }
        let id = self.texts.len() as u32;
        self.texts.push(s.to_owned());
        self.ids.insert(s.to_owned(), id);
        id
    }
}

/// What a batch of new events adds to the rollups: per row, a number of
/// events and a bitmap of visitor ids.
///
/// Events are first counted at the finest level they are counted at only
/// (a 15-minute bucket, for a busy day), and the coarser levels are then
/// made from those rows, bucket by bucket: a batch of live traffic holds
/// a few thousand such rows for tens of thousands of events, so each event
/// costs one row per dimension instead of one per dimension and level.
#[derive(Debug, Default)]
pub struct Deltas {
    strings: Strings,
    /// The interned `prop:<key>` dimension of each property key.
    prop_dims: Map<String, u32>,
    /// Per event, while counting: its `keys` value.
    scratch: String,
    /// (site, dim, value, name), the first and (exclusive) last index of
    /// the levels in [`Level::ALL`], and the bucket at the first level.
    staged: Map<([u32; 4], u8, u8, i64), Counted>,
    /// (site, dim, value, name) as interned ids, level, bucket.
    rows: Map<([u32; 4], Level, i64), Counted>,
}

/// Events, and their visitors.
type Counted = (u64, RoaringBitmap);

/// The maps of a fold's deltas: keyed by ids and buckets, hashed with a
/// fast hash seeded per process (SipHash took a twentieth of the embedded
/// ingest's time).
type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

impl Deltas {
    /// Counts one event at some levels (a run of [`Level::ALL`], as
    /// [`DayState::levels`] and [`DayChange::backfill`] give), with its
    /// visitor's id if it has a visitor: staged at the first level, in
    /// [`Deltas::rows`] once [`Deltas::settle`] has run.
    fn add(&mut self, e: &Event, vid: Option<u32>, levels: &[Level]) {
        let (Some(&first), Some(&last)) = (levels.first(), levels.last()) else {
            return;
        };
        // Activity of a visit, never an event of its own.
        if e.is_engagement() {
            return;
        }
        let (from, to) = (first as u8, last as u8 + 1);
        let bucket = first.start(e.ts);
        let site = self.strings.id(&e.site_id);
        let name = self.strings.id(&e.event_type);
        let mut stage = |key: [u32; 4]| {
            let entry = self.staged.entry((key, from, to, bucket)).or_default();
            entry.0 += 1;
            if let Some(v) = vid {
                entry.1.insert(v);
            }
        };
        write_key_list(e, &mut self.scratch);
        stage([
            site,
            self.strings.id(DIM_KEYS),
            self.strings.id(&self.scratch),
            name,
        ]);
        stage([
            site,
            self.strings.id(DIM_PAGE),
            self.strings.id(page_of(e)),
            name,
        ]);
        if let Some(props) = &e.props {
            for (k, v) in props {
                if let Some(text) = prop_text(v) {
                    let dim = match self.prop_dims.get(k.as_str()) {
                        Some(&dim) => dim,
                        None => {
                            let dim = self.strings.id(&format!("{PROP_PREFIX}{k}"));
                            self.prop_dims.insert(k.clone(), dim);
                            dim
                        }
                    };
                    stage([site, dim, self.strings.id(&text), name]);
                }
            }
        }
    }

    /// Makes the rows of every level from the staged ones.
    fn settle(&mut self) {
        for ((key, from, to, bucket), (n, bitmap)) in self.staged.drain() {
            for &level in &Level::ALL[usize::from(from)..usize::from(to)] {
                let entry = self
                    .rows
                    .entry((key, level, level.start(bucket)))
                    .or_default();
                entry.0 += n;
                entry.1 |= &bitmap;
            }
        }
    }

    /// What a fold adds: the new `events`, at the levels their site-day
    /// keeps after the fold (`changes`, from [`day_changes`]), and the
    /// site-days' `earlier` events (counted before) at the levels their day
    /// gains ([`DayChange::backfill`]); visitors' ids from `ids` (by site
    /// and visitor). What both stores' folds count.
    pub fn of(
        events: &[Event],
        earlier: &[Event],
        changes: &SiteDays<DayChange>,
        ids: &HashMap<(String, String), u32>,
    ) -> Self {
        let change = |e: &Event| {
            changes
                .get(e.site_id.as_str())
                .and_then(|d| d.get(&Level::Day.start(e.ts)))
        };
        // Looked up by borrowed site and visitor, without a key to build
        // per event.
        let mut by_site: HashMap<&str, Map<&str, u32>> = HashMap::new();
        for ((site, visitor), &id) in ids {
            by_site
                .entry(site.as_str())
                .or_default()
                .insert(visitor.as_str(), id);
        }
        let mut deltas = Deltas::default();
        let add = |deltas: &mut Deltas, e: &Event, levels: &[Level]| {
            let vid = crate::query::visitor_of(e).and_then(|v| {
                by_site
                    .get(e.site_id.as_str())
                    .and_then(|m| m.get(v))
                    .copied()
            });
            deltas.add(e, vid, levels);
        };
        for e in events {
            let after = change(e).map_or_else(DayState::default, |c| c.after);
            add(&mut deltas, e, after.levels());
        }
        for e in earlier {
            if let Some(c) = change(e) {
                add(&mut deltas, e, c.backfill());
            }
        }
        deltas.settle();
        deltas
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Every row: its key, events and visitors.
    pub fn rows(&self) -> impl Iterator<Item = (RowKey<'_>, u64, &RoaringBitmap)> {
        let t = &self.strings.texts;
        self.rows
            .iter()
            .map(move |((k, level, bucket), (n, bitmap))| {
                let key = RowKey {
                    site_id: &t[k[0] as usize],
                    dim: &t[k[1] as usize],
                    level: *level,
                    bucket: *bucket,
                    value: &t[k[2] as usize],
                    name: &t[k[3] as usize],
                };
                (key, *n, bitmap)
            })
    }
}

/// A bitmap as stored (the portable roaring format, readable by other
/// roaring implementations).
pub fn encode(bitmap: &RoaringBitmap) -> Vec<u8> {
    let mut out = Vec::with_capacity(bitmap.serialized_size());
    // Writing into a Vec cannot fail.
    let _ = bitmap.serialize_into(&mut out);
    out
}

/// A stored bitmap; `None` if the bytes are not one.
pub fn decode(bytes: &[u8]) -> Option<RoaringBitmap> {
    RoaringBitmap::deserialize_from(bytes).ok()
}

/// The cardinality of a stored bitmap, from its header alone (the portable
/// format lists each container's size before its contents); `None` if the
/// header is not one.
pub fn cardinality(bytes: &[u8]) -> Option<u64> {
    const NO_RUNS: u32 = 12_346;
    const WITH_RUNS: u16 = 12_347;
    let word = |at: usize| -> Option<u32> {
        let b = bytes.get(at..at + 4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let cookie = word(0)?;
    let (containers, descriptions) = if cookie == NO_RUNS {
        (word(4)? as usize, 8)
    } else if cookie as u16 == WITH_RUNS {
        let n = (cookie >> 16) as usize + 1;
        (n, 4 + n.div_ceil(8))
    } else {
        return None;
    };
    let table = bytes.get(descriptions..descriptions.checked_add(containers.checked_mul(4)?)?)?;
    Some(
        table
            .chunks_exact(4)
            .map(|d| u64::from(u16::from_le_bytes([d[2], d[3]])) + 1)
            .sum(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::DateTime;

    fn at(s: &str) -> i64 {
        DateTime::parse_from_rfc3339(s).unwrap().timestamp_millis()
    }

    #[test]
    fn months_are_calendar_months() {
        let t = at("2024-02-29T13:00:00Z");
        assert_eq!(Level::Month.start(t), at("2024-02-01T00:00:00Z"));
        assert_eq!(
            Level::Month.next(at("2024-02-01T00:00:00Z")),
            at("2024-03-01T00:00:00Z")
        );
        assert_eq!(
            Level::Month.next(at("2024-12-01T00:00:00Z")),
            at("2025-01-01T00:00:00Z")
        );
    }

    #[test]
    fn a_cover_is_exact_and_uses_large_buckets() {
        let cases = [
            ("2025-11-01T00:00:00Z", "2025-12-01T00:00:00Z"),
            ("2025-10-31T18:30:00Z", "2025-11-30T18:30:00Z"),
            ("2025-11-03T04:30:00Z", "2025-11-04T04:30:00Z"),
            ("2025-11-03T04:30:07Z", "2025-11-03T04:44:59Z"),
            ("2025-11-03T04:31:00Z", "2026-02-03T04:44:59Z"),
            ("2024-12-31T23:45:00Z", "2025-01-01T00:15:00Z"),
        ];
        for (a, b) in cases {
            let (start, end) = (at(a), at(b));
            let (pieces, raw) = cover(start, end);
            let mut spans: Vec<(i64, i64)> = pieces
                .iter()
                .map(|p| (p.bucket, p.level.next(p.bucket)))
                .chain(raw.iter().copied())
                .collect();
            spans.sort();
            assert_eq!(spans.first().map(|s| s.0), Some(start), "{a}..{b}");
            assert_eq!(spans.last().map(|s| s.1), Some(end), "{a}..{b}");
            assert!(
                spans.windows(2).all(|w| w[0].1 == w[1].0),
                "{a}..{b}: {spans:?}"
            );
            assert!(raw.iter().all(|(x, y)| y - x < 2 * QUARTER_MS));
            assert!(pieces.len() < 100, "{a}..{b}: {} pieces", pieces.len());
        }
        // A month in India: a month of days less one, hours and quarters at the edges.
        let (pieces, _) = cover(at("2025-10-31T18:30:00Z"), at("2025-11-30T18:30:00Z"));
        let days = pieces.iter().filter(|p| p.level == Level::Day).count();
        assert_eq!(days, 29);
    }

    #[test]
    fn days_keep_finer_levels_as_they_fill_and_gain_their_earlier_events() {
        let density = Density {
            hour: 3,
            quarter: 5,
        };
        let day = at("2025-11-03T00:00:00Z");
        let event = |id: &str, ts: i64| -> Event {
            serde_json::from_value(serde_json::json!({
                "id": id, "site_id": "s", "event_type": "page_view", "ts": ts,
                "created_at": ts, "path": "/", "userid": id
            }))
            .unwrap()
        };
        let levels_of = |d: &Deltas| {
            let mut counts = [0u64; 4];
            for (k, n, _) in d.rows() {
                if k.dim == DIM_KEYS {
                    counts[k.level as usize] += n;
                }
            }
            counts
        };
        // Two events: a sparse day, months only.
        let first = vec![event("a", day + 1), event("b", day + 2)];
        let changes = day_changes(&day_counts(&first), &HashMap::new(), density);
        let c = changes["s"][&day];
        assert_eq!((c.after.events, c.after.finest), (2, Level::Month));
        assert!(c.backfill().is_empty());
        let ids = HashMap::new();
        assert_eq!(
            levels_of(&Deltas::of(&first, &[], &changes, &ids)),
            [0, 0, 0, 2]
        );
        // Two more: hours and days from now on, with the first two added.
        let second = vec![event("c", day + 3), event("d", day + 4)];
        let mut stored: SiteDays<DayState> = HashMap::new();
        stored.entry("s".into()).or_default().insert(day, c.after);
        let changes = day_changes(&day_counts(&second), &stored, density);
        let c = changes["s"][&day];
        assert_eq!((c.after.events, c.after.finest), (4, Level::Hour));
        assert_eq!(c.backfill(), [Level::Hour, Level::Day]);
        assert_eq!(
            levels_of(&Deltas::of(&second, &first, &changes, &ids)),
            [0, 4, 4, 2]
        );
        // A day never goes back to coarser levels, whatever the thresholds.
        let mut stored: SiteDays<DayState> = HashMap::new();
        stored.entry("s".into()).or_default().insert(day, c.after);
        let changes = day_changes(&day_counts(&second), &stored, Density::default());
        assert_eq!(changes["s"][&day].after.finest, Level::Hour);
        assert!(changes["s"][&day].backfill().is_empty());
    }

    #[test]
    fn cardinalities_are_read_from_the_header() {
        let mut sparse = RoaringBitmap::new();
        sparse.extend([1u32, 5, 70_000, 1 << 30]);
        let mut dense: RoaringBitmap = (0..200_000u32).collect();
        dense.remove(7);
        let mut runs: RoaringBitmap = (10..100_000u32).collect();
        runs.optimize();
        for b in [RoaringBitmap::new(), sparse, dense, runs] {
            assert_eq!(cardinality(&encode(&b)), Some(b.len()));
        }
        assert_eq!(cardinality(b"junk"), None);
        assert_eq!(cardinality(&[]), None);
    }

    #[test]
    fn key_lists_name_the_properties_with_values() {
        let mut e: Event = serde_json::from_value(serde_json::json!({
            "id": "1", "site_id": "s", "event_type": "signup", "ts": 0, "created_at": 0,
            "props": {"plan": "pro", "seats": 3, "coupon": null}
        }))
        .unwrap();
        let list = key_list(&e);
        assert!(has_key(&list, "plan") && has_key(&list, "seats") && !has_key(&list, "coupon"));
        e.props = None;
        assert_eq!(key_list(&e), "");
        assert!(!has_key("", ""));
    }
}
