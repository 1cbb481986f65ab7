//! Counting and timing of the load test: a bounded latency histogram per outcome, counts
//! by outcome, status and operation, and the live counters behind the progress bar.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

/// What one logical call ended as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Outcome {
    Approved,
    InsufficientFunds,
    RateLimited,
    MonthlyCap,
    Suspended,
    /// Any other problem answer (4xx/5xx after retries).
    Error,
    /// No answer at all after retries.
    Transport,
}

impl Outcome {
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Approved => "approved",
            Outcome::InsufficientFunds => "insufficient_funds",
            Outcome::RateLimited => "rate_limited",
            Outcome::MonthlyCap => "monthly_cap",
            Outcome::Suspended => "suspended",
            Outcome::Error => "error",
            Outcome::Transport => "transport",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Latencies in microseconds, log-linear buckets: exact below 1,024 µs, then 512 buckets
/// per power of two (≤ 0.2 % error). Bounded memory whatever the request count.
#[derive(Debug, Clone)]
pub struct Histogram {
    buckets: Vec<u64>,
    count: u64,
    max_us: u64,
}

const LINEAR_US: u64 = 1_024;
const SUB_BUCKETS: u64 = 512;
/// Up to 2^40 µs (12 days) before values are clamped into the last bucket.
const POWERS: u64 = 30;
const BUCKETS: usize = (LINEAR_US + POWERS * SUB_BUCKETS) as usize;

impl Default for Histogram {
    fn default() -> Self {
        Self {
            buckets: vec![0; BUCKETS],
            count: 0,
            max_us: 0,
        }
    }
}

impl Histogram {
    fn index(us: u64) -> usize {
        if us < LINEAR_US {
            return us as usize;
        }
        // us ≥ 2^10: its top 10 bits give the power and the sub-bucket.
        let power = 63 - u64::from(us.leading_zeros()); // ≥ 10
        let sub = (us >> (power - 9)) - SUB_BUCKETS; // 0..512
        let index = LINEAR_US + (power - 10) * SUB_BUCKETS + sub;
        (index as usize).min(BUCKETS - 1)
    }

    /// The lowest value of a bucket (what a percentile reports).
    fn value(index: usize) -> u64 {
        let index = index as u64;
        if index < LINEAR_US {
            return index;
        }
        let power = (index - LINEAR_US) / SUB_BUCKETS + 10;
        let sub = (index - LINEAR_US) % SUB_BUCKETS;
        (SUB_BUCKETS + sub) << (power - 9)
    }

    pub fn record(&mut self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.buckets[Self::index(us)] += 1;
        self.count += 1;
        self.max_us = self.max_us.max(us);
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
        self.count += other.count;
        self.max_us = self.max_us.max(other.max_us);
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// The value at quantile `q` (0..=1), in µs.
    pub fn quantile_us(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Self::value(i).min(self.max_us);
            }
        }
        self.max_us
    }

    pub fn summary(&self) -> LatencySummary {
        let ms = |us: u64| us as f64 / 1_000.0;
        LatencySummary {
            count: self.count,
            p50_ms: ms(self.quantile_us(0.50)),
            p90_ms: ms(self.quantile_us(0.90)),
            p99_ms: ms(self.quantile_us(0.99)),
            max_ms: ms(self.max_us),
        }
    }
}

/// Latency percentiles of one outcome.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// Everything one worker measured; merged at the end.
#[derive(Debug, Default)]
pub struct Stats {
    pub latency: BTreeMap<Outcome, Histogram>,
    pub by_status: BTreeMap<String, u64>,
    pub by_operation: BTreeMap<&'static str, BTreeMap<&'static str, u64>>,
    /// Approved answers marked `Idempotent-Replayed`.
    pub replayed: u64,
    /// Debits (single, duplicate or batch items) by their own final status.
    pub debits_by_status: BTreeMap<String, u64>,
    /// Whole batch requests, with `--batch` above 1.
    pub batch_latency: Option<Histogram>,
}

fn status_name(status: Option<u16>) -> String {
    status.map_or_else(|| "transport".to_owned(), |s| s.to_string())
}

impl Stats {
    pub fn record(
        &mut self,
        operation: &'static str,
        outcome: Outcome,
        status: Option<u16>,
        latency: Duration,
    ) {
        self.latency.entry(outcome).or_default().record(latency);
        *self.by_status.entry(status_name(status)).or_default() += 1;
        self.count(operation, outcome);
    }

    /// Counts an outcome of an operation that is not a request of its own (a batch item).
    pub fn count(&mut self, operation: &'static str, outcome: Outcome) {
        *self
            .by_operation
            .entry(operation)
            .or_default()
            .entry(outcome.name())
            .or_default() += 1;
    }

    /// Counts one debit by its own final status.
    pub fn debit(&mut self, status: Option<u16>) {
        *self
            .debits_by_status
            .entry(status_name(status))
            .or_default() += 1;
    }

    pub fn batch(&mut self, latency: Duration) {
        self.batch_latency
            .get_or_insert_with(Histogram::default)
            .record(latency);
    }

    pub fn merge(&mut self, other: Stats) {
        self.replayed += other.replayed;
        for (status, n) in other.debits_by_status {
            *self.debits_by_status.entry(status).or_default() += n;
        }
        if let Some(theirs) = &other.batch_latency {
            self.batch_latency
                .get_or_insert_with(Histogram::default)
                .merge(theirs);
        }
        for (outcome, histogram) in other.latency {
            self.latency.entry(outcome).or_default().merge(&histogram);
        }
        for (status, n) in other.by_status {
            *self.by_status.entry(status).or_default() += n;
        }
        for (operation, counts) in other.by_operation {
            let mine = self.by_operation.entry(operation).or_default();
            for (outcome, n) in counts {
                *mine.entry(outcome).or_default() += n;
            }
        }
    }

    pub fn total(&self) -> u64 {
        self.latency.values().map(Histogram::count).sum()
    }
}

/// Counters the progress bar reads while the workers run.
#[derive(Debug, Default)]
pub struct Live {
    by_outcome: [AtomicU64; 7],
}

impl Live {
    pub fn add(&self, outcome: Outcome) {
        self.by_outcome[outcome.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, outcome: Outcome) -> u64 {
        self.by_outcome[outcome.index()].load(Ordering::Relaxed)
    }

    pub fn total(&self) -> u64 {
        self.by_outcome
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_monotonic_and_tight() {
        let mut last = 0;
        for us in (0..5_000_000u64).step_by(997) {
            let i = Histogram::index(us);
            assert!(i >= last);
            last = i;
            let low = Histogram::value(i);
            assert!(low <= us, "{us}: bucket starts at {low}");
            assert!(us - low <= us / 256 + 1, "{us}: bucket starts at {low}");
        }
        assert_eq!(Histogram::index(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn quantiles() {
        let mut h = Histogram::default();
        for ms in 1..=100 {
            h.record(Duration::from_millis(ms));
        }
        let s = h.summary();
        assert_eq!(s.count, 100);
        assert!((s.p50_ms - 50.0).abs() < 0.3, "{s:?}");
        assert!((s.p90_ms - 90.0).abs() < 0.4, "{s:?}");
        assert!((s.p99_ms - 99.0).abs() < 0.4, "{s:?}");
        assert_eq!(s.max_ms, 100.0);
        assert_eq!(Histogram::default().summary().p99_ms, 0.0);
    }
}
