//! Visit rollups: the visits ([`crate::session`]) that start in each hour,
//! day and month (UTC buckets), by each `visit:*` value, counted: visits,
//! bounces, summed durations, pageviews and events, and their visitors.
//!
//! They answer queries over visits as event rollups answer queries over
//! events ([`crate::rollup`]): the whole buckets of a range from rows, what
//! no hour covers at its ends from the visits themselves. A store keeps
//! them in the fold's transaction, as it keeps the visits: a visit that
//! changes (it grows, two merge, retention or an erasure takes events out)
//! is taken out of its rows as it was and put in as it is ([`Deltas`]).
//!
//! Counts subtract. Visitors do not, from a plain set: a visitor leaves a
//! row when their last visit in it does. So rows keep each visitor with
//! the number of their visits in it ([`Counted`]): the set for queries,
//! the multiplicities beside it for the fold.

use std::collections::HashMap;

use roaring::RoaringBitmap;

use crate::query::VisitField;
use crate::rollup::Level;
use crate::session::Visit;

/// The dimension of a row of every visit of its bucket.
pub const DIM_ALL: &str = "all";
/// The levels rows are kept at (finer ends of a range are read from the
/// visits: at most two hours' worth per bucket of a query).
pub const LEVELS: [Level; 3] = [Level::Hour, Level::Day, Level::Month];

/// A row's identity: site, dimension (`all` or a [`VisitField`]'s name),
/// level, bucket start, value (empty for `all`).
pub type RowKey = (String, &'static str, Level, i64, String);

/// What a set of visit changes does to one row.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RowDelta {
    pub visits: i64,
    pub bounces: i64,
    pub duration_ms: i64,
    pub pageviews: i64,
    pub events: i64,
    /// Visitor id → change in their number of visits in the row.
    pub visitors: HashMap<u32, i64>,
}

/// A row being summed: its visitors' changes as they come (summed once,
/// at the end: cheaper than a map per row while adding).
#[derive(Debug, Default)]
struct Pending {
    counts: [i64; 5],
    visitors: Vec<(u32, i64)>,
}

type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// The rows' changes of some visits taken out and others put in.
#[derive(Debug, Default)]
pub struct Deltas {
    /// Site → (dimension, level, bucket) → value → row. Looked up by
    /// borrowed text: a row already there costs no allocation.
    sites: Map<String, SiteRows>,
}

/// One site's rows being summed: (dimension, level, bucket) → value → row.
type SiteRows = Map<(usize, Level, i64), Map<String, Pending>>;

/// A visit's value for each row dimension, in [`dim_names`] order.
fn values_of(v: &Visit) -> impl Iterator<Item = &str> {
    std::iter::once("").chain(VisitField::ALL.into_iter().map(|f| f.value_of(v)))
}

/// Row dimensions: `all`, then each [`VisitField`].
fn dim_names() -> impl Iterator<Item = &'static str> {
    std::iter::once(DIM_ALL).chain(VisitField::ALL.into_iter().map(VisitField::name))
}

/// The row dimension name of a field, as [`RowKey`] holds it.
pub fn dim_name(field: Option<VisitField>) -> &'static str {
    field.map_or(DIM_ALL, VisitField::name)
}

impl Deltas {
    /// Counts `v` in (`sign` 1) or out (`sign` -1) of its rows; `vid` is
    /// its visitor's dictionary id.
    pub fn add(&mut self, v: &Visit, vid: u32, sign: i64) {
        let counts = [
            sign,
            sign * i64::from(v.is_bounce()),
            sign * v.duration_ms().max(0),
            sign * v.pageviews as i64,
            sign * v.events as i64,
        ];
        let site = match self.sites.get_mut(v.site_id.as_str()) {
            Some(s) => s,
            None => self.sites.entry(v.site_id.clone()).or_default(),
        };
        for level in LEVELS {
            let bucket = level.start(v.start);
            for (dim, value) in values_of(v).enumerate() {
                let rows = site.entry((dim, level, bucket)).or_default();
                let row = match rows.get_mut(value) {
                    Some(r) => r,
                    None => rows.entry(value.to_owned()).or_default(),
                };
                for (total, n) in row.counts.iter_mut().zip(counts) {
                    *total += n;
                }
                row.visitors.push((vid, sign));
            }
        }
    }

    /// The rows that change, each once (a visit taken out and put back
    /// unchanged changes nothing), in key order (the order of the stored
    /// index: each of its pages is visited once).
    pub fn rows(self) -> impl Iterator<Item = (RowKey, RowDelta)> {
        let names: Vec<&'static str> = dim_names().collect();
        let mut out: Vec<(RowKey, RowDelta)> = Vec::new();
        for (site, groups) in self.sites {
            for ((dim, level, bucket), rows) in groups {
                for (value, p) in rows {
                    let mut visitors: HashMap<u32, i64> = HashMap::with_capacity(p.visitors.len());
                    for (vid, n) in p.visitors {
                        *visitors.entry(vid).or_default() += n;
                    }
                    visitors.retain(|_, n| *n != 0);
                    let [visits, bounces, duration_ms, pageviews, events] = p.counts;
                    if p.counts == [0; 5] && visitors.is_empty() {
                        continue;
                    }
                    let key = (site.clone(), names[dim], level, bucket, value);
                    out.push((
                        key,
                        RowDelta {
                            visits,
                            bounces,
                            duration_ms,
                            pageviews,
                            events,
                            visitors,
                        },
                    ));
                }
            }
        }
        out.sort_unstable_by(|a, b| {
            (&a.0.0, a.0.1, a.0.2, a.0.3, &a.0.4).cmp(&(&b.0.0, b.0.1, b.0.2, b.0.3, &b.0.4))
        });
        out.into_iter()
    }

    pub fn is_empty(&self) -> bool {
        self.sites.is_empty()
    }
}

/// A row's visitors with their number of visits: the set (stored as a
/// roaring bitmap, what queries read) and each member's count, in the
/// set's order (stored as LEB128 varints beside it).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Counted {
    pub set: RoaringBitmap,
    counts: Vec<u32>,
}

impl Counted {
    /// A row as stored; `None` if the two parts do not read or do not
    /// agree.
    pub fn decode(set: &[u8], counts: &[u8]) -> Option<Counted> {
        let set = crate::rollup::decode(set)?;
        if counts.is_empty() {
            // Every visitor with one visit: nothing stored beside the set.
            let ones = vec![1; set.len() as usize];
            return Some(Counted { set, counts: ones });
        }
        let mut out = Vec::with_capacity(set.len() as usize);
        let mut at = 0;
        while at < counts.len() {
            let (n, used) = varint(&counts[at..])?;
            out.push(n);
            at += used;
        }
        (out.len() as u64 == set.len()).then_some(Counted { set, counts: out })
    }

    /// The set's bytes and the counts' bytes.
    pub fn encode(&self) -> (Vec<u8>, Vec<u8>) {
        if self.counts.iter().all(|&n| n == 1) {
            return (crate::rollup::encode(&self.set), Vec::new());
        }
        let mut counts = Vec::with_capacity(self.counts.len());
        for &n in &self.counts {
            let mut n = n;
            loop {
                let byte = (n & 0x7f) as u8;
                n >>= 7;
                if n == 0 {
                    counts.push(byte);
                    break;
                }
                counts.push(byte | 0x80);
            }
        }
        (crate::rollup::encode(&self.set), counts)
    }

    /// Applies changes of visit counts; a visitor whose count reaches 0
    /// leaves the set. Returns `false` if a count would go below 0 (the
    /// row did not hold what the changes take out).
    ///
    /// In place: each changed visitor is found by rank, the counts between
    /// are copied as slices, and the set gains and loses only the visitors
    /// that come and go. A fold changes a few visitors of rows that may
    /// hold a whole month's (hundreds of thousands): rebuilding the set
    /// from every member on each fold made its cost grow with the row
    /// rather than with the change (profile in `bench/README.md`).
    pub fn apply(&mut self, changes: &HashMap<u32, i64>) -> bool {
        if self.counts.len() as u64 != self.set.len() {
            // Never so for a row that decoded; kept exact all the same.
            return self.apply_by_merge(changes);
        }
        let mut sorted: Vec<(u32, i64)> = changes
            .iter()
            .filter(|(_, d)| **d != 0)
            .map(|(&k, &v)| (k, v))
            .collect();
        sorted.sort_unstable();
        let mut ok = true;
        let mut counts: Vec<u32> = Vec::with_capacity(self.counts.len() + sorted.len());
        let (mut added, mut removed) = (Vec::new(), Vec::new());
        // Old counts up to `copied` are in `counts` already.
        let mut copied = 0;
        for (id, d) in sorted {
            // Members at most `id`, in the set as it was (it changes last).
            let rank = self.set.rank(id) as usize;
            let present = self.set.contains(id);
            let at = if present { rank - 1 } else { rank };
            counts.extend_from_slice(&self.counts[copied..at]);
            let before = if present {
                copied = at + 1;
                i64::from(self.counts[at])
            } else {
                copied = at;
                0
            };
            match before + d {
                n if n > 0 => {
                    counts.push(u32::try_from(n).unwrap_or(u32::MAX));
                    if !present {
                        added.push(id);
                    }
                }
                n => {
                    ok &= n == 0;
                    if present {
                        removed.push(id);
                    }
                }
            }
        }
        counts.extend_from_slice(&self.counts[copied..]);
        for id in removed {
            self.set.remove(id);
        }
        for id in added {
            self.set.insert(id);
        }
        self.counts = counts;
        ok
    }

    /// [`Counted::apply`] by merging the whole row with the changes.
    fn apply_by_merge(&mut self, changes: &HashMap<u32, i64>) -> bool {
        let mut sorted: Vec<(u32, i64)> = changes.iter().map(|(&k, &v)| (k, v)).collect();
        sorted.sort_unstable();
        let mut ok = true;
        let mut merged: Vec<(u32, u32)> = Vec::with_capacity(self.counts.len() + sorted.len());
        let mut old = self.set.iter().zip(self.counts.iter().copied()).peekable();
        let mut new = sorted.into_iter().peekable();
        loop {
            let next = match (old.peek(), new.peek()) {
                (None, None) => break,
                (Some(&(a, n)), Some(&(b, d))) if a == b => {
                    old.next();
                    new.next();
                    (a, i64::from(n) + d)
                }
                (Some(&(a, n)), Some(&(b, _))) if a < b => {
                    old.next();
                    (a, i64::from(n))
                }
                (Some(&(a, n)), None) => {
                    old.next();
                    (a, i64::from(n))
                }
                (_, Some(&(b, d))) => {
                    new.next();
                    (b, d)
                }
            };
            match next.1 {
                n if n > 0 => merged.push((next.0, u32::try_from(n).unwrap_or(u32::MAX))),
                0 => {}
                _ => ok = false,
            }
        }
        self.set = RoaringBitmap::from_sorted_iter(merged.iter().map(|p| p.0)).unwrap_or_default();
        self.counts = merged.into_iter().map(|p| p.1).collect();
        ok
    }
}

fn varint(bytes: &[u8]) -> Option<(u32, usize)> {
    let mut n: u32 = 0;
    for (i, &b) in bytes.iter().enumerate().take(5) {
        n |= u32::from(b & 0x7f).checked_shl(7 * i as u32)?;
        if b & 0x80 == 0 {
            return Some((n, i + 1));
        }
    }
    None
}

/// A visit rollup row as a store reads it for a query.
#[derive(Debug, Clone)]
pub struct RowRead {
    pub level: Level,
    pub bucket: i64,
    pub value: String,
    pub visits: u64,
    pub bounces: u64,
    pub duration_ms: u64,
    pub pageviews: u64,
    pub events: u64,
    /// The visitors' set, as stored.
    pub visitors: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counted_visitors_leave_with_their_last_visit() {
        let mut c = Counted::default();
        assert!(c.apply(&HashMap::from([(7, 2), (3, 1), (300, 200)])));
        assert_eq!(c.set.iter().collect::<Vec<_>>(), [3, 7, 300]);
        let (set, counts) = c.encode();
        let mut back = Counted::decode(&set, &counts).unwrap();
        assert_eq!(back, c);
        assert!(back.apply(&HashMap::from([(7, -1), (3, -1), (5, 1)])));
        assert_eq!(back.set.iter().collect::<Vec<_>>(), [5, 7, 300]);
        assert!(back.apply(&HashMap::from([(7, -1), (300, -200), (5, -1)])));
        assert!(back.set.is_empty());
        assert!(
            !back.apply(&HashMap::from([(1, -1)])),
            "nothing to take out"
        );
        assert!(Counted::decode(&set, &counts[..1]).is_none());
    }

    proptest::proptest! {
        /// Applying changes in place gives the row the whole-row merge
        /// gives, and the same verdict.
        #[test]
        fn counted_changes_in_place_equal_the_merge(
            start in proptest::collection::hash_map(0u32..5_000, 1i64..4, 0..300),
            changes in proptest::collection::vec(
                proptest::collection::hash_map(0u32..5_000, -3i64..4, 0..60), 1..4),
        ) {
            let mut in_place = Counted::default();
            let mut merged = Counted::default();
            proptest::prop_assert!(in_place.apply(&start));
            proptest::prop_assert!(merged.apply_by_merge(&start));
            for c in &changes {
                let verdict = in_place.apply(c);
                proptest::prop_assert_eq!(verdict, merged.apply_by_merge(c));
                proptest::prop_assert_eq!(&in_place, &merged);
                proptest::prop_assert_eq!(in_place.counts.len() as u64, in_place.set.len());
            }
        }
    }

    #[test]
    fn a_visit_taken_out_and_put_back_changes_nothing() {
        let e: crate::event::Event = serde_json::from_value(serde_json::json!({
            "id": "a", "site_id": "s", "event_type": "page_view", "path": "/",
            "userid": "u", "ts": 3_600_000, "created_at": 0,
        }))
        .unwrap();
        let v = Visit::of(&e).unwrap();
        let mut d = Deltas::default();
        d.add(&v, 1, 1);
        d.add(&v, 1, -1);
        assert_eq!(d.rows().count(), 0);
        let mut d = Deltas::default();
        d.add(&v, 1, 1);
        let rows: Vec<_> = d.rows().collect();
        // Every dimension (and `all`) at each level.
        assert_eq!(rows.len(), LEVELS.len() * (1 + VisitField::ALL.len()));
        assert!(rows.iter().all(|(_, r)| r.visits == 1 && r.bounces == 1));
    }
}
