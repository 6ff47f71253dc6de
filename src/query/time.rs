//! Time in a query: local calendars of IANA zones, and the UTC intervals they
//! stand for.
//!
//! Events carry UTC instants (epoch milliseconds). A query speaks of local
//! days, hours, weeks and months of one zone, daylight saving included. This
//! module turns one into the other:
//! - [`Zone::utc_start`]: the first instant at or after a local wall-clock
//!   time (the start of a day may not exist: clocks that jump at midnight);
//! - [`TimeGrain::label_of`]: the bucket an instant falls in, as its label;
//! - [`buckets`]: the buckets of a range, each with its UTC interval.
//!
//! Both the reference ([`super::reference`]) and the engine use these, so a
//! bucket means the same thing to both: an event is in the bucket whose label
//! its local time truncates to; the hour that repeats when daylight saving
//! ends is one bucket, the hour that is skipped when it starts is none.

use chrono::{DateTime, Datelike, Duration, NaiveDate, NaiveDateTime, NaiveTime, TimeZone, Utc};
use chrono_tz::Tz;

pub const SECOND_MS: i64 = 1_000;
pub const MINUTE_MS: i64 = 60 * SECOND_MS;
pub const HOUR_MS: i64 = 60 * MINUTE_MS;
pub const DAY_MS: i64 = 24 * HOUR_MS;

/// An IANA time zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Zone(Tz);

impl Default for Zone {
    fn default() -> Self {
        Zone(Tz::UTC)
    }
}

impl Zone {
    /// An IANA zone name (`Europe/Paris`, `UTC`); `None` if unknown.
    pub fn parse(name: &str) -> Option<Self> {
        name.parse::<Tz>().ok().map(Zone)
    }

    pub fn name(&self) -> &'static str {
        self.0.name()
    }

    /// Local wall-clock time of an instant.
    pub fn local(&self, ts_ms: i64) -> NaiveDateTime {
        match DateTime::from_timestamp_millis(ts_ms) {
            Some(utc) => utc.with_timezone(&self.0).naive_local(),
            None => NaiveDateTime::MIN,
        }
    }

    /// The offset from UTC in seconds at an instant.
    pub fn offset_secs(&self, ts_ms: i64) -> i32 {
        use chrono::Offset;
        match DateTime::from_timestamp_millis(ts_ms) {
            Some(utc) => self
                .0
                .offset_from_utc_datetime(&utc.naive_utc())
                .fix()
                .local_minus_utc(),
            None => 0,
        }
    }

    /// The first instant whose local time is at or after `local` (epoch ms).
    ///
    /// A repeated local time (clocks set back) gives its first occurrence; a
    /// skipped one (clocks set forward) gives the instant of the jump.
    pub fn utc_start(&self, local: NaiveDateTime) -> i64 {
        use chrono::LocalResult;
        match self.0.from_local_datetime(&local) {
            LocalResult::Single(t) => t.timestamp_millis(),
            LocalResult::Ambiguous(a, b) => a.timestamp_millis().min(b.timestamp_millis()),
            LocalResult::None => self.gap_end(local),
        }
    }

    /// The instant of the jump over a skipped local time.
    fn gap_end(&self, local: NaiveDateTime) -> i64 {
        // The first local minute after the gap (gaps last minutes to a day:
        // Samoa skipped 2011-12-30 whole), then back second by second to the
        // jump itself, which need not fall on a whole minute (offsets of the
        // local mean time zones had seconds).
        let mut after = None;
        for minutes in 1..=(2 * 24 * 60) {
            let probe = local + Duration::minutes(minutes);
            if let Some(t) = self.0.from_local_datetime(&probe).earliest() {
                after = Some(t.timestamp_millis());
                break;
            }
        }
        let Some(mut t) = after else {
            // No zone has a gap this long; treat the time as UTC.
            return local.and_utc().timestamp_millis();
        };
        for _ in 0..60 {
            let earlier = t - SECOND_MS;
            if self.local(earlier) >= local {
                t = earlier;
            } else {
                break;
            }
        }
        t
    }

    /// The first instant of a local date.
    pub fn day_start(&self, date: NaiveDate) -> i64 {
        self.utc_start(date.and_time(NaiveTime::MIN))
    }

    /// An instant written with this zone's offset at that instant, whole
    /// seconds: `2025-11-03T10:00:00+05:30`.
    pub fn format_instant(&self, ts_ms: i64) -> String {
        match DateTime::from_timestamp_millis(ts_ms) {
            Some(utc) => utc
                .with_timezone(&self.0)
                .format("%Y-%m-%dT%H:%M:%S%:z")
                .to_string(),
            None => String::new(),
        }
    }

    /// Today's date in this zone at `now_ms`.
    pub fn today(&self, now_ms: i64) -> NaiveDate {
        self.local(now_ms).date()
    }
}

/// The size of a time bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TimeGrain {
    Hour,
    Day,
    /// Weeks start on Monday.
    Week,
    Month,
}

impl TimeGrain {
    pub fn name(self) -> &'static str {
        match self {
            TimeGrain::Hour => "time:hour",
            TimeGrain::Day => "time:day",
            TimeGrain::Week => "time:week",
            TimeGrain::Month => "time:month",
        }
    }

    /// The start (local wall-clock time) of the bucket holding `local`.
    pub fn truncate(self, local: NaiveDateTime) -> NaiveDateTime {
        let date = local.date();
        match self {
            TimeGrain::Hour => date
                .and_hms_opt(chrono::Timelike::hour(&local), 0, 0)
                .unwrap_or(local),
            TimeGrain::Day => date.and_time(NaiveTime::MIN),
            TimeGrain::Week => {
                let back = i64::from(date.weekday().num_days_from_monday());
                (date - Duration::days(back)).and_time(NaiveTime::MIN)
            }
            TimeGrain::Month => date.with_day(1).unwrap_or(date).and_time(NaiveTime::MIN),
        }
    }

    /// The start of the bucket after the one starting at `start`.
    pub fn next(self, start: NaiveDateTime) -> NaiveDateTime {
        match self {
            TimeGrain::Hour => start + Duration::hours(1),
            TimeGrain::Day => start + Duration::days(1),
            TimeGrain::Week => start + Duration::days(7),
            TimeGrain::Month => start
                .date()
                .checked_add_months(chrono::Months::new(1))
                .map(|d| d.and_time(NaiveTime::MIN))
                .unwrap_or(NaiveDateTime::MAX),
        }
    }

    /// The label of a bucket starting at `start`: `2025-11-03 10:00:00` for
    /// hours, the (first) date for days, weeks and months.
    pub fn label(self, start: NaiveDateTime) -> String {
        match self {
            TimeGrain::Hour => start.format("%Y-%m-%d %H:00:00").to_string(),
            _ => start.date().format("%Y-%m-%d").to_string(),
        }
    }

    /// The label of the bucket an instant falls in.
    pub fn label_of(self, zone: &Zone, ts_ms: i64) -> String {
        self.label(self.truncate(zone.local(ts_ms)))
    }

    /// How many buckets of this grain `[start, end)` touches, at most (a cheap
    /// bound computed before any bucket is made).
    pub fn count_bound(self, zone: &Zone, start: i64, end: i64) -> i64 {
        if end <= start {
            return 0;
        }
        let (a, b) = (zone.local(start), zone.local(end - 1));
        let days = (b.date() - a.date()).num_days();
        match self {
            TimeGrain::Hour => (end - start) / HOUR_MS + 3,
            TimeGrain::Day => days + 2,
            TimeGrain::Week => days / 7 + 2,
            TimeGrain::Month => {
                let months =
                    (b.year() - a.year()) as i64 * 12 + b.month() as i64 - a.month() as i64;
                months + 1
            }
        }
    }
}

/// One time bucket of a range: its label and the part of the range it covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    pub label: String,
    /// `[start, end)` in epoch ms, clipped to the range.
    pub start: i64,
    pub end: i64,
}

/// The buckets of `[start, end)`, in time order, each clipped to the range.
/// Buckets that hold no instant of the range (a skipped hour) are left out.
pub fn buckets(zone: &Zone, grain: TimeGrain, start: i64, end: i64) -> Vec<Bucket> {
    let mut out: Vec<Bucket> = Vec::new();
    if end <= start {
        return out;
    }
    let mut local = grain.truncate(zone.local(start));
    loop {
        let next = grain.next(local);
        let (a, b) = (
            zone.utc_start(local).max(start),
            zone.utc_start(next).min(end),
        );
        if a < b {
            out.push(Bucket {
                label: grain.label(local),
                start: a,
                end: b,
            });
        }
        if b >= end || next == NaiveDateTime::MAX {
            break;
        }
        local = next;
    }
    out
}

/// The current time in epoch milliseconds.
pub fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zone(name: &str) -> Zone {
        Zone::parse(name).unwrap()
    }

    fn at(s: &str) -> i64 {
        DateTime::parse_from_rfc3339(s).unwrap().timestamp_millis()
    }

    fn naive(s: &str) -> NaiveDateTime {
        NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S").unwrap()
    }

    #[test]
    fn a_skipped_midnight_starts_the_day_at_the_jump() {
        // Chile: 2024-09-08 00:00 local does not exist (clocks went to 01:00).
        let z = zone("America/Santiago");
        let start = z.day_start(NaiveDate::from_ymd_opt(2024, 9, 8).unwrap());
        assert_eq!(start, at("2024-09-08T04:00:00Z"));
        assert_eq!(z.format_instant(start), "2024-09-08T01:00:00-03:00");
    }

    #[test]
    fn the_repeated_hour_is_one_bucket_and_the_skipped_one_none() {
        let z = zone("Europe/Paris");
        // Autumn: 02:00-03:00 local happens twice on 2025-10-26.
        let day = z.day_start(NaiveDate::from_ymd_opt(2025, 10, 26).unwrap());
        let next = z.day_start(NaiveDate::from_ymd_opt(2025, 10, 27).unwrap());
        assert_eq!(next - day, 25 * HOUR_MS);
        let hours = buckets(&z, TimeGrain::Hour, day, next);
        assert_eq!(hours.len(), 24);
        let two = &hours[2];
        assert_eq!(two.label, "2025-10-26 02:00:00");
        assert_eq!(two.end - two.start, 2 * HOUR_MS);
        // Spring: 02:00-03:00 local never happens on 2025-03-30.
        let day = z.day_start(NaiveDate::from_ymd_opt(2025, 3, 30).unwrap());
        let next = z.day_start(NaiveDate::from_ymd_opt(2025, 3, 31).unwrap());
        let hours = buckets(&z, TimeGrain::Hour, day, next);
        assert_eq!(hours.len(), 23);
        assert!(hours.iter().all(|h| h.label != "2025-03-30 02:00:00"));
        // Every instant's label is the label of the bucket holding it.
        for h in &hours {
            for t in [h.start, h.end - 1] {
                assert_eq!(TimeGrain::Hour.label_of(&z, t), h.label);
            }
        }
    }

    #[test]
    fn weeks_start_on_monday_and_months_on_the_first_even_when_the_range_starts_later() {
        let z = Zone::default();
        let (a, b) = (at("2025-11-05T00:00:00Z"), at("2025-12-03T00:00:00Z"));
        let weeks: Vec<String> = buckets(&z, TimeGrain::Week, a, b)
            .into_iter()
            .map(|w| w.label)
            .collect();
        assert_eq!(
            weeks,
            [
                "2025-11-03",
                "2025-11-10",
                "2025-11-17",
                "2025-11-24",
                "2025-12-01"
            ]
        );
        let months: Vec<String> = buckets(&z, TimeGrain::Month, a, b)
            .into_iter()
            .map(|m| m.label)
            .collect();
        assert_eq!(months, ["2025-11-01", "2025-12-01"]);
    }

    #[test]
    fn odd_offsets_and_seconds_of_old_zones_are_exact() {
        // Liberia kept -0:44:30 until 1972.
        let z = zone("Africa/Monrovia");
        let start = z.day_start(NaiveDate::from_ymd_opt(1971, 6, 1).unwrap());
        assert_eq!(start, at("1971-06-01T00:44:30Z"));
        assert_eq!(z.local(start), naive("1971-06-01 00:00:00"));
        // India is +5:30: local hours are UTC half hours.
        let z = zone("Asia/Kolkata");
        assert_eq!(
            TimeGrain::Hour.label_of(&z, at("2025-11-03T04:29:59Z")),
            "2025-11-03 09:00:00"
        );
        assert_eq!(
            TimeGrain::Hour.label_of(&z, at("2025-11-03T04:30:00Z")),
            "2025-11-03 10:00:00"
        );
    }
}
