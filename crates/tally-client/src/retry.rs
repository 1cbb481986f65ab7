//! The retry policy of one logical call: `Retry-After` first, otherwise exponential backoff
//! with full jitter, bounded by a number of attempts and a total time budget.
//!
//! Full jitter (the AWS Architecture Blog's "Exponential Backoff And Jitter"): the n-th
//! wait is uniform in `[0, min(cap, base · 2^n)]`, which spreads retrying clients apart
//! better than equal or decorrelated jitter for the same total work.

use std::time::{Duration, SystemTime};

use rand::Rng;

/// Most attempts any policy may ask for; past this a loop is a bug, not a policy.
pub const ATTEMPTS_MAX: u32 = 100;

/// How one logical call retries. Every field has a default (see [`RetryPolicy::default`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Requests per logical call, the first included (1 = never retry), at most
    /// [`ATTEMPTS_MAX`].
    pub attempts_max: u32,
    /// Backoff base: the first retry waits up to this long.
    pub backoff_base: Duration,
    /// Backoff cap: no computed wait exceeds it (a server's `Retry-After` may).
    pub backoff_cap: Duration,
    /// Total time budget of one logical call, waits included. A retry whose wait would end
    /// past the budget is not made; the last answer is returned instead.
    pub total_time_max: Duration,
    /// Retry a 429 `rate-limited` after its `Retry-After` (within the budget). When false
    /// the typed [`crate::Denial::RateLimited`] is returned at once.
    pub retry_rate_limited: bool,
    /// Timeout of one attempt (connect, send, whole response), shortened to what is left
    /// of `total_time_max`. `None`: no timeout.
    pub attempt_timeout: Option<Duration>,
}

impl Default for RetryPolicy {
    /// 5 attempts, backoff 100 ms doubling up to 5 s, 30 s in all, 429s retried,
    /// 10 s per attempt.
    fn default() -> Self {
        Self {
            attempts_max: 5,
            backoff_base: Duration::from_millis(100),
            backoff_cap: Duration::from_secs(5),
            total_time_max: Duration::from_secs(30),
            retry_rate_limited: true,
            attempt_timeout: Some(Duration::from_secs(10)),
        }
    }
}

impl RetryPolicy {
    /// A policy that makes exactly one request per call.
    pub fn no_retries() -> Self {
        Self {
            attempts_max: 1,
            ..Self::default()
        }
    }

    /// The upper bound of the wait before retry number `retry` (0 for the first retry):
    /// `min(cap, base · 2^retry)`, without overflow.
    pub fn backoff_ceiling(&self, retry: u32) -> Duration {
        let factor = 1u32.checked_shl(retry.min(31)).unwrap_or(u32::MAX);
        self.backoff_base
            .checked_mul(factor)
            .unwrap_or(Duration::MAX)
            .min(self.backoff_cap)
    }

    /// A full-jitter wait before retry number `retry`: uniform in
    /// `[0, backoff_ceiling(retry)]`.
    pub fn backoff<R: Rng + ?Sized>(&self, retry: u32, rng: &mut R) -> Duration {
        let ceiling = self.backoff_ceiling(retry);
        // Nanosecond resolution is plenty; u64 nanoseconds covers 584 years.
        let ceiling_ns = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rng.gen_range(0..=ceiling_ns))
    }

    pub(crate) fn attempts_max_clamped(&self) -> u32 {
        self.attempts_max.clamp(1, ATTEMPTS_MAX)
    }
}

/// Parses a `Retry-After` value: delta-seconds (`"3"`) or an HTTP-date
/// (`"Sun, 29 Nov 2026 13:00:00 GMT"`, relative to `now`; a date in the past is zero).
/// Anything else is `None`.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // An absurd number of seconds saturates rather than failing.
        return Some(Duration::from_secs(
            value.parse::<u64>().unwrap_or(u64::MAX),
        ));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Decides the wait before the next attempt, or `None` when the call must stop: out of
/// attempts, or the wait would end past the total budget.
pub(crate) fn plan_retry<R: Rng + ?Sized>(
    policy: &RetryPolicy,
    attempts_made: u32,
    elapsed: Duration,
    retry_after: Option<Duration>,
    rng: &mut R,
) -> Option<Duration> {
    if attempts_made >= policy.attempts_max_clamped() {
        return None;
    }
    let wait = match retry_after {
        Some(wait) => wait,
        None => policy.backoff(attempts_made.saturating_sub(1), rng),
    };
    let ends_at = elapsed.checked_add(wait)?;
    (ends_at <= policy.total_time_max).then_some(wait)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            attempts_max: 10,
            backoff_base: Duration::from_millis(100),
            backoff_cap: Duration::from_secs(2),
            total_time_max: Duration::from_secs(5),
            retry_rate_limited: true,
            attempt_timeout: None,
        }
    }

    #[test]
    fn ceiling_doubles_then_caps() {
        let p = policy();
        let ms: Vec<u128> = (0..7).map(|n| p.backoff_ceiling(n).as_millis()).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1600, 2000, 2000]);
        // Huge retry numbers neither overflow nor exceed the cap.
        assert_eq!(p.backoff_ceiling(u32::MAX), Duration::from_secs(2));
        assert_eq!(p.backoff_ceiling(64), Duration::from_secs(2));
    }

    #[test]
    fn full_jitter_stays_within_zero_and_ceiling() {
        let p = policy();
        let mut rng = StdRng::seed_from_u64(7);
        for retry in 0..12 {
            let ceiling = p.backoff_ceiling(retry);
            let mut low = Duration::MAX;
            let mut high = Duration::ZERO;
            for _ in 0..2_000 {
                let wait = p.backoff(retry, &mut rng);
                assert!(wait <= ceiling, "retry {retry}: {wait:?} > {ceiling:?}");
                low = low.min(wait);
                high = high.max(wait);
            }
            // Full jitter really uses the whole range, not just its top half.
            assert!(low < ceiling / 10, "retry {retry}: lowest {low:?}");
            assert!(high > ceiling * 9 / 10, "retry {retry}: highest {high:?}");
        }
    }

    #[test]
    fn zero_base_never_waits() {
        let p = RetryPolicy {
            backoff_base: Duration::ZERO,
            ..policy()
        };
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(p.backoff(3, &mut rng), Duration::ZERO);
    }

    #[test]
    fn attempts_are_bounded() {
        let p = policy();
        let mut rng = StdRng::seed_from_u64(2);
        assert!(plan_retry(&p, 9, Duration::ZERO, None, &mut rng).is_some());
        assert!(plan_retry(&p, 10, Duration::ZERO, None, &mut rng).is_none());
        let one = RetryPolicy::no_retries();
        assert!(plan_retry(&one, 1, Duration::ZERO, None, &mut rng).is_none());
        // attempts_max = 0 means one attempt, not an endless loop or none at all.
        let zero = RetryPolicy {
            attempts_max: 0,
            ..policy()
        };
        assert!(plan_retry(&zero, 1, Duration::ZERO, None, &mut rng).is_none());
    }

    #[test]
    fn total_budget_is_respected() {
        let p = policy();
        let mut rng = StdRng::seed_from_u64(3);
        // A Retry-After that would end past the 5 s budget is not waited for.
        assert_eq!(
            plan_retry(
                &p,
                1,
                Duration::from_secs(4),
                Some(Duration::from_secs(2)),
                &mut rng
            ),
            None
        );
        assert_eq!(
            plan_retry(
                &p,
                1,
                Duration::from_secs(3),
                Some(Duration::from_secs(2)),
                &mut rng
            ),
            Some(Duration::from_secs(2))
        );
        // Simulate a whole call: the sum of the waits never exceeds the budget.
        for seed in 0..200 {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut elapsed = Duration::ZERO;
            let mut attempts = 1;
            while let Some(wait) = plan_retry(&p, attempts, elapsed, None, &mut rng) {
                assert!(wait <= p.backoff_ceiling(attempts - 1));
                elapsed += wait + Duration::from_millis(50); // the attempt itself
                attempts += 1;
            }
            assert!(attempts <= p.attempts_max);
            assert!(elapsed <= p.total_time_max + Duration::from_millis(50));
        }
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert_eq!(parse_retry_after("3", now), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("99999999999999999999999", now),
            Some(Duration::from_secs(u64::MAX))
        );
        let later = httpdate::fmt_http_date(now + Duration::from_secs(120));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(120))
        );
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(120));
        assert_eq!(parse_retry_after(&earlier, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("-1", now), None);
        assert_eq!(parse_retry_after("1.5", now), None);
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("", now), None);
    }
}
