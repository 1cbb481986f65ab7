//! Rate limits: GCRA (the generic cell rate algorithm, as in governor) per agent and
//! bucket, computed here with integer nanoseconds so the wait comes out exact.
//!
//! Implemented in the core rather than through governor's `StateStore` so that `decide`
//! stays a pure function of its arguments (governor reads a clock and keeps its own
//! atomics); `tests/gcra_vs_governor.rs` checks it against governor step by step.

use serde::{Deserialize, Serialize};

use crate::plan::{Plan, RateBucket};
use crate::TimestampMs;

// Sums of times saturate rather than panic: with plan validation bounding τ, they are
// exact for any `now` before the year 2262 and merely degenerate after it.
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
    /// Milliseconds until one more request is available than `remaining` says (the
    /// bucket gains a cell every `window / quota`): when it is empty, the wait before the
    /// next request is admitted, the same as a denial's `retry_after_ms`; 0 when full.
    ///
    /// This is the `t` of the `RateLimit` header in draft-ietf-httpapi-ratelimit-headers
    /// (-10: "the number of seconds until additional quota ... is made available"; -11
    /// words it as the window within which no more than `r` can be used, which for GCRA
    /// is the same time). Not the time until the bucket is full again: a 201 that empties
    /// the bucket and the 429 right after it must say the same.
    pub next_refill_ms: u64,
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
    let tat = tat_ns.unwrap_or(now_ns.saturating_add(t));
    (tat, tat.saturating_sub(bucket.tolerance_ns()))
}

/// Requests a bucket would still admit at `now_ns`.
fn remaining(bucket: &RateBucket, tat_ns: Option<u64>, now_ns: u64) -> u64 {
    let t = bucket.emission_interval_ns();
    let tau = bucket.tolerance_ns();
    let floor = now_ns.saturating_add(t);
    let tat = tat_ns.unwrap_or(floor).max(floor);
    let horizon = now_ns.saturating_add(tau);
    let remaining = if tat > horizon {
        0
    } else {
        (horizon - tat) / t + 1
    };
    remaining.min(u64::from(bucket.burst))
}

/// Nanoseconds until a bucket admits one request more than it would at `now_ns`.
fn next_refill_ns(bucket: &RateBucket, tat_ns: Option<u64>, now_ns: u64) -> u64 {
    if remaining(bucket, tat_ns, now_ns) >= u64::from(bucket.burst) {
        return 0;
    }
    let t = bucket.emission_interval_ns();
    let floor = now_ns.saturating_add(t);
    let tat = tat_ns.unwrap_or(floor).max(floor);
    let horizon = now_ns.saturating_add(bucket.tolerance_ns());
    if tat > horizon {
        // Empty: the first cell comes when the horizon reaches the TAT.
        tat - horizon
    } else {
        // A cell more each time the horizon gains another T on the TAT.
        t - (horizon - tat) % t
    }
}

fn status_of(bucket: &RateBucket, tat_ns: Option<u64>, now_ns: u64) -> RateStatus {
    RateStatus {
        bucket: bucket.name.clone(),
        quota: bucket.quota,
        window_ms: bucket.window_ms,
        remaining: remaining(bucket, tat_ns, now_ns),
        next_refill_ms: next_refill_ns(bucket, tat_ns, now_ns).div_ceil(NANOS_PER_MS),
    }
}

impl RateState {
    /// True when every bucket is as a fresh one at `now_ms` and any later time: each TAT
    /// is unset or not after `now`. (A TAT up to `now + T` already acts as a fresh
    /// bucket's, since `acquire`, `remaining` and `next_refill_ns` raise it to `now + T`,
    /// and `check` admits it as it admits a fresh one because τ = T × burst ≥ T; time only
    /// moves on.) Such a state can be dropped and restarted from `default()` with no
    /// change to any answer.
    pub fn is_idle(&self, now_ms: TimestampMs) -> bool {
        let now_ns = now_ms.saturating_mul(NANOS_PER_MS);
        self.tats_ns
            .iter()
            .all(|tat| tat.is_none_or(|tat| tat <= now_ns))
    }

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

    /// The TAT of bucket `i` as the plan sees it: a plan of another shape starts fresh.
    fn tat_for(&self, plan: &Plan, i: usize) -> Option<u64> {
        if self.tats_ns.len() == plan.buckets.len() {
            self.tat(i)
        } else {
            None
        }
    }

    /// Would a request be admitted at `now_ms`? Changes nothing.
    pub fn peek(&self, plan: &Plan, now_ms: TimestampMs) -> Result<Option<RateStatus>, Limited> {
        let now_ns = now_ms.saturating_mul(NANOS_PER_MS);
        self.check(plan, now_ns)?;
        Ok(self.tightest(plan, now_ns))
    }

    /// Admits a request at `now_ms` in every bucket of the plan, or none of them.
    pub fn acquire(
        &mut self,
        plan: &Plan,
        now_ms: TimestampMs,
    ) -> Result<Option<RateStatus>, Limited> {
        let now_ns = now_ms.saturating_mul(NANOS_PER_MS);
        self.check(plan, now_ns)?;
        let tats = self.tats_for(plan);
        for (slot, bucket) in tats.iter_mut().zip(&plan.buckets) {
            let (tat, _) = gcra_earliest_ns(bucket, *slot, now_ns);
            // TATs here run one T ahead of governor's (a fresh bucket starts at now + T),
            // so an idle bucket restarts from now + T as well; restarting from `now`
            // would admit burst + 1 requests after any pause.
            let t = bucket.emission_interval_ns();
            *slot = Some(tat.max(now_ns.saturating_add(t)).saturating_add(t));
        }
        Ok(self.tightest(plan, now_ns))
    }

    /// `Ok` if every bucket admits a request at `now_ns`, else the longest wait among
    /// the buckets that refuse it. Builds a status (one `String`) only for a denial.
    fn check(&self, plan: &Plan, now_ns: u64) -> Result<(), Limited> {
        let mut worst: Option<(usize, u64)> = None;
        for (i, bucket) in plan.buckets.iter().enumerate() {
            let (_, earliest) = gcra_earliest_ns(bucket, self.tat_for(plan, i), now_ns);
            if now_ns < earliest {
                let retry_after_ms = (earliest - now_ns).div_ceil(NANOS_PER_MS);
                if worst.is_none_or(|(_, w)| retry_after_ms > w) {
                    worst = Some((i, retry_after_ms));
                }
            }
        }
        match worst {
            None => Ok(()),
            Some((i, retry_after_ms)) => Err(Limited {
                status: status_of(&plan.buckets[i], self.tat_for(plan, i), now_ns),
                retry_after_ms,
            }),
        }
    }

    /// The status of the bucket with the fewest requests left (the first on a tie).
    fn tightest(&self, plan: &Plan, now_ns: u64) -> Option<RateStatus> {
        let (i, _) = plan
            .buckets
            .iter()
            .enumerate()
            .map(|(i, b)| (i, remaining(b, self.tat_for(plan, i), now_ns)))
            .min_by_key(|(_, remaining)| *remaining)?;
        Some(status_of(&plan.buckets[i], self.tat_for(plan, i), now_ns))
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
    fn an_idle_state_answers_as_a_fresh_one() {
        let plan = plan_with(vec![RateBucket::new("default", 3, 3_000, 1).expect("valid")]);
        let t0 = 1_700_000_000_000;
        let mut used = RateState::default();
        assert!(used.is_idle(t0));
        used.acquire(&plan, t0).expect("admits");
        // TAT = t0 + 2 T: busy until then, idle from then on.
        assert!(!used.is_idle(t0));
        assert!(!used.is_idle(t0 + 1_999));
        assert!(used.is_idle(t0 + 2_000));
        for at in [t0 + 2_000, t0 + 2_001, t0 + 9_000] {
            let (mut a, mut b) = (used.clone(), RateState::default());
            for k in 0..4 {
                assert_eq!(
                    a.acquire(&plan, at + k),
                    b.acquire(&plan, at + k),
                    "at {at} + {k}"
                );
            }
        }
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
    fn next_refill_is_the_wait_for_one_more_request_and_agrees_with_a_denial() {
        // Three per 3 s, burst 3: a cell every second.
        let plan = plan_with(vec![RateBucket::new("default", 3, 3_000, 3).expect("valid")]);
        let mut rs = RateState::default();
        let t0 = 1_700_000_000_000;
        let full = rs.peek(&plan, t0).expect("admits").expect("one bucket");
        assert_eq!((full.remaining, full.next_refill_ms), (3, 0));
        let mut statuses = Vec::new();
        for at in [t0, t0, t0 + 400] {
            let st = rs.acquire(&plan, at).expect("admits").expect("one bucket");
            statuses.push((st.remaining, st.next_refill_ms));
        }
        // One cell comes back every second whatever is left: 1 s after t0, then 0.6 s
        // after t0 + 0.4 s, never the 3 s (or 2.6 s) until the bucket is full.
        assert_eq!(statuses, [(2, 1_000), (1, 1_000), (0, 600)]);
        let denied = rs.acquire(&plan, t0 + 400).expect_err("empty");
        assert_eq!(denied.retry_after_ms, 600);
        assert_eq!(
            (denied.status.remaining, denied.status.next_refill_ms),
            (0, 600),
            "the denial and the last admission agree"
        );
        // Mid-way between two cells, the next one is the rest of the second.
        let later = rs
            .peek(&plan, t0 + 1_250)
            .expect("admits")
            .expect("one bucket");
        assert_eq!((later.remaining, later.next_refill_ms), (1, 750));
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
