//! Rate limits: GCRA (the generic cell rate algorithm, as in governor) per agent and
//! bucket, computed here with integer nanoseconds so the wait comes out exact.
//!
//! Implemented in the core rather than through governor's `StateStore` so that `decide`
//! stays a pure function of its arguments (governor reads a clock and keeps its own
//! atomics); `tests/gcra_vs_governor.rs` checks it against governor step by step.

use serde::{Deserialize, Serialize};

use crate::plan::{Plan, RateBucket};
use crate::TimestampMs;

const NANOS_PER_MS: u64 = 1_000_000;

/// The volatile limiter state of one agent: one theoretical arrival time (TAT, ns since
/// the epoch) per bucket of its plan. Not journaled; starts fresh after a restart.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateState {
    /// `None` until the bucket's first request; then governor's TAT.
    tats_ns: Vec<Option<u64>>,
}

/// What the limiter says about the tightest bucket, for the `RateLimit` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateStatus {
    pub bucket: String,
    pub quota: u32,
    pub window_ms: u64,
    /// Requests that would still be admitted right now.
    pub remaining: u64,
    /// Milliseconds until `remaining` is back to the full burst.
    pub reset_ms: u64,
}

/// A denial by the limiter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limited {
    pub status: RateStatus,
    /// Exact milliseconds until the next request in every bucket would be admitted.
    pub retry_after_ms: u64,
}

fn gcra_earliest_ns(bucket: &RateBucket, tat_ns: Option<u64>, now_ns: u64) -> (u64, u64) {
    let t = bucket.emission_interval_ns();
    // governor's starting state: a fresh bucket behaves as if its TAT were now + T.
    let tat = tat_ns.unwrap_or(now_ns + t);
    (tat, tat.saturating_sub(bucket.tolerance_ns()))
}

fn status_of(bucket: &RateBucket, tat_ns: Option<u64>, now_ns: u64) -> RateStatus {
    let t = bucket.emission_interval_ns();
    let tau = bucket.tolerance_ns();
    let tat = tat_ns.unwrap_or(now_ns + t).max(now_ns + t);
    let remaining = if tat > now_ns + tau {
        0
    } else {
        (now_ns + tau - tat) / t + 1
    };
    RateStatus {
        bucket: bucket.name.clone(),
        quota: bucket.quota,
        window_ms: bucket.window_ms,
        remaining: remaining.min(u64::from(bucket.burst)),
        reset_ms: (tat - (now_ns + t)).div_ceil(NANOS_PER_MS),
    }
}

impl RateState {
    fn tats_for(&mut self, plan: &Plan) -> &mut Vec<Option<u64>> {
        if self.tats_ns.len() != plan.buckets.len() {
            // The plan changed shape: start its buckets fresh.
            self.tats_ns = vec![None; plan.buckets.len()];
        }
        &mut self.tats_ns
    }

    fn tat(&self, i: usize) -> Option<u64> {
        self.tats_ns.get(i).copied().flatten()
    }

    /// Would a request be admitted at `now_ms`? Changes nothing.
    pub fn peek(&self, plan: &Plan, now_ms: TimestampMs) -> Result<Option<RateStatus>, Limited> {
        self.evaluate(plan, now_ms).map(|(status, _)| status)
    }

    /// Admits a request at `now_ms` in every bucket of the plan, or none of them.
    pub fn acquire(
        &mut self,
        plan: &Plan,
        now_ms: TimestampMs,
    ) -> Result<Option<RateStatus>, Limited> {
        let (_, next_tats) = self.evaluate(plan, now_ms)?;
        let tats = self.tats_for(plan);
        for (slot, next) in tats.iter_mut().zip(next_tats) {
            *slot = Some(next);
        }
        let now_ns = now_ms * NANOS_PER_MS;
        Ok(plan
            .buckets
            .iter()
            .enumerate()
            .map(|(i, b)| status_of(b, self.tat(i), now_ns))
            .min_by_key(|s| s.remaining))
    }

    /// The tightest bucket's status and the TATs after admitting one more request, or the
    /// longest wait among the buckets that refuse it.
    fn evaluate(
        &self,
        plan: &Plan,
        now_ms: TimestampMs,
    ) -> Result<(Option<RateStatus>, Vec<u64>), Limited> {
        let now_ns = now_ms * NANOS_PER_MS;
        let fresh = self.tats_ns.len() != plan.buckets.len();
        let mut next_tats = Vec::with_capacity(plan.buckets.len());
        let mut worst: Option<Limited> = None;
        for (i, bucket) in plan.buckets.iter().enumerate() {
            let tat_ns = if fresh { None } else { self.tat(i) };
            let (tat, earliest) = gcra_earliest_ns(bucket, tat_ns, now_ns);
            if now_ns < earliest {
                let retry_after_ms = (earliest - now_ns).div_ceil(NANOS_PER_MS);
                if worst
                    .as_ref()
                    .is_none_or(|w| retry_after_ms > w.retry_after_ms)
                {
                    worst = Some(Limited {
                        status: status_of(bucket, tat_ns, now_ns),
                        retry_after_ms,
                    });
                }
            } else {
                // TATs here run one T ahead of governor's (a fresh bucket starts at
                // now + T), so an idle bucket restarts from now + T as well; restarting
                // from `now` would admit burst + 1 requests after any pause.
                let t = bucket.emission_interval_ns();
                next_tats.push(tat.max(now_ns + t) + t);
            }
        }
        match worst {
            Some(limited) => Err(limited),
            None => {
                let status = plan
                    .buckets
                    .iter()
                    .enumerate()
                    .map(|(i, b)| status_of(b, if fresh { None } else { self.tat(i) }, now_ns))
                    .min_by_key(|s| s.remaining);
                Ok((status, next_tats))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::PlanName;

    fn plan_with(buckets: Vec<RateBucket>) -> Plan {
        let mut p = Plan::unlimited(PlanName::new("p").expect("valid"));
        p.buckets = buckets;
        p
    }

    #[test]
    fn ten_per_second_burst_ten_admits_ten_then_one_every_100ms() {
        let plan = plan_with(vec![
            RateBucket::new("default", 10, 1_000, 10).expect("valid")
        ]);
        let mut rs = RateState::default();
        let t0 = 1_700_000_000_000;
        for i in 0..10 {
            let st = rs
                .acquire(&plan, t0)
                .expect("burst admits")
                .expect("one bucket");
            assert_eq!(st.remaining, 9 - i);
        }
        let denied = rs.acquire(&plan, t0).expect_err("11th at once is denied");
        assert_eq!(denied.retry_after_ms, 100);
        assert_eq!(denied.status.remaining, 0);
        // One millisecond early is still too early, and the wait shrinks exactly.
        assert_eq!(
            rs.acquire(&plan, t0 + 99)
                .expect_err("early")
                .retry_after_ms,
            1
        );
        for k in 1..=20u64 {
            let at = t0 + 100 * k;
            assert!(rs.acquire(&plan, at).is_ok(), "admit at +{}ms", 100 * k);
            let again = rs.acquire(&plan, at).expect_err("only one per 100 ms");
            assert_eq!(again.retry_after_ms, 100);
            assert_eq!(
                rs.acquire(&plan, at + 50)
                    .expect_err("half way")
                    .retry_after_ms,
                50
            );
        }
    }

    #[test]
    fn peek_changes_nothing() {
        let plan = plan_with(vec![RateBucket::new("default", 1, 1_000, 1).expect("valid")]);
        let mut rs = RateState::default();
        for _ in 0..5 {
            assert!(rs.peek(&plan, 0).is_ok());
        }
        assert!(rs.acquire(&plan, 0).is_ok());
        assert_eq!(rs.peek(&plan, 0).expect_err("full").retry_after_ms, 1_000);
        assert_eq!(
            rs.acquire(&plan, 0).expect_err("full").retry_after_ms,
            1_000
        );
    }

    #[test]
    fn all_buckets_or_none_and_the_longest_wait_wins() {
        let plan = plan_with(vec![
            RateBucket::new("second", 5, 1_000, 5).expect("valid"),
            RateBucket::new("minute", 6, 60_000, 6).expect("valid"),
        ]);
        let mut rs = RateState::default();
        for _ in 0..5 {
            assert!(rs.acquire(&plan, 0).is_ok());
        }
        let d = rs.acquire(&plan, 0).expect_err("second bucket empty");
        assert_eq!(d.status.bucket, "second");
        assert_eq!(d.retry_after_ms, 200);
        assert!(rs.acquire(&plan, 200).is_ok(), "6th of the minute");
        let d = rs.acquire(&plan, 400).expect_err("minute bucket empty");
        assert_eq!(d.status.bucket, "minute");
        // The minute bucket frees a cell at 10 s (T = 10 s, TAT was 70 s, tau = 60 s).
        assert_eq!(d.retry_after_ms, 10_000 - 400);
    }

    #[test]
    fn unlimited_plan_always_admits() {
        let plan = plan_with(vec![]);
        let mut rs = RateState::default();
        for _ in 0..1_000 {
            assert_eq!(rs.acquire(&plan, 0), Ok(None));
        }
    }
}
