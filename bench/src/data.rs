//! Deterministic test data: page views of one site-day, users drawn uniformly
//! from a pool, paths with Zipf-like popularity (the page of rank r is viewed
//! with weight 1/r), timestamps spread over the day.

use chrono::NaiveDate;
use evtrack::event::Event;

pub const SITE: &str = "bench-site";
pub const EVENT_TYPE: &str = "page_view";

/// The benchmark's site-day (any past day works; a fixed one keeps runs comparable).
pub fn day() -> NaiveDate {
    NaiveDate::from_ymd_opt(2025, 11, 23).expect("valid date")
}

pub fn day_start_ms() -> i64 {
    day()
        .and_hms_opt(0, 0, 0)
        .expect("midnight")
        .and_utc()
        .timestamp_millis()
}

/// SplitMix64: small, fast, good enough for benchmark data, and reproducible.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Draws ranks 1..=n with probability proportional to 1/rank.
pub struct Zipf {
    cumulative: Vec<f64>,
}

impl Zipf {
    pub fn new(n: usize) -> Self {
        let mut total = 0.0;
        let cumulative = (1..=n.max(1))
            .map(|r| {
                total += 1.0 / r as f64;
                total
            })
            .collect();
        Zipf { cumulative }
    }

    pub fn sample(&self, rng: &mut Rng) -> usize {
        let total = *self.cumulative.last().expect("n >= 1");
        let x = rng.unit() * total;
        let i = self.cumulative.partition_point(|&c| c <= x);
        i.min(self.cumulative.len() - 1) + 1
    }
}

/// Generates the events of one site-day.
pub struct DayEvents {
    rng: Rng,
    zipf: Zipf,
    users: u64,
    id_prefix: String,
    next: usize,
}

impl DayEvents {
    pub fn new(seed: u64, users: usize, paths: usize, id_prefix: &str) -> Self {
        DayEvents {
            rng: Rng::new(seed),
            zipf: Zipf::new(paths),
            users: users.max(1) as u64,
            id_prefix: id_prefix.to_owned(),
            next: 0,
        }
    }

    pub fn take(&mut self, n: usize) -> Vec<Event> {
        let start = day_start_ms();
        (0..n)
            .map(|_| {
                let i = self.next;
                self.next += 1;
                let path = format!("/docs/page-{}", self.zipf.sample(&mut self.rng));
                let user = self.rng.below(self.users);
                let ts = start + self.rng.below(86_400_000) as i64;
                Event {
                    id: parse(format!("{}{i:09}", self.id_prefix)),
                    site_id: parse(SITE),
                    event_type: parse(EVENT_TYPE),
                    path: Some(path),
                    userid: Some(format!("user-{user:06}")),
                    ts,
                    created_at: ts + 150,
                    props: None,
                    visitor: None,
                    ctx: None,
                }
            })
            .collect()
    }
}

/// A benchmark's own id or name as its type; they are all valid.
pub fn parse<T: std::str::FromStr>(s: impl AsRef<str>) -> T
where
    T::Err: std::fmt::Debug,
{
    s.as_ref().parse().expect("the benchmark's ids are valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_prefers_low_ranks_and_stays_in_range() {
        let z = Zipf::new(1000);
        let mut rng = Rng::new(1);
        let mut counts = vec![0u32; 1001];
        for _ in 0..100_000 {
            let r = z.sample(&mut rng);
            assert!((1..=1000).contains(&r));
            counts[r] += 1;
        }
        // Rank 1 has weight 1/H(1000) ≈ 13 %, rank 2 half of it.
        assert!(counts[1] > 12_000 && counts[1] < 14_500, "{}", counts[1]);
        assert!(counts[1] > counts[2] && counts[2] > counts[10]);
    }

    #[test]
    fn events_are_valid_and_inside_the_day() {
        let mut g = DayEvents::new(7, 100, 20, "t-");
        for e in g.take(1000) {
            // What the worker would read back from the queue.
            let text = serde_json::to_string(&e).unwrap();
            serde_json::from_str::<evtrack::event::Event>(&text).unwrap();
            assert!(e.ts >= day_start_ms() && e.ts < day_start_ms() + 86_400_000);
        }
    }
}
