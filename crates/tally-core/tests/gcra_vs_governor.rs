//! Differential test of the core's GCRA (`RateState`) against governor 0.10, the
//! reference implementation the design names: for random buckets and random request
//! times both must admit and deny the same requests, and on a denial the core's
//! `retry_after_ms` must be governor's wait rounded up to a whole millisecond; on an
//! admit the requests left (`RateStatus::remaining`) must be governor's remaining burst.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, FakeRelativeClock};
use governor::middleware::StateInformationMiddleware;
use governor::{Quota, RateLimiter};
use proptest::prelude::*;
use tally_core::{Plan, PlanName, RateBucket, RateState};

const NANOS_PER_MS: u128 = 1_000_000;

fn plan_with(bucket: RateBucket) -> Plan {
    let mut plan = Plan::unlimited(PlanName::new("p").expect("valid plan name"));
    plan.buckets = vec![bucket];
    plan
}

/// Runs the same request times through both limiters and compares every answer.
/// `base_ms` is the epoch time of governor's clock start (governor counts from 0).
fn compare(bucket: &RateBucket, base_ms: u64, steps_ms: &[u64]) -> Result<(), TestCaseError> {
    let plan = plan_with(bucket.clone());
    let quota = Quota::with_period(Duration::from_nanos(bucket.emission_interval_ns()))
        .expect("emission interval is at least 1 ns")
        .allow_burst(NonZeroU32::new(bucket.burst).expect("burst is at least 1"));
    let clock = FakeRelativeClock::default();
    let governor = RateLimiter::direct_with_clock(quota, clock.clone())
        .with_middleware::<StateInformationMiddleware>();
    let mut core = RateState::default();
    let mut now_ms = base_ms;
    let (mut admitted, mut denied) = (0u32, 0u32);
    for (i, step_ms) in steps_ms.iter().enumerate() {
        clock.advance(Duration::from_millis(*step_ms));
        now_ms += step_ms;
        let expected = governor.check();
        let actual = core.acquire(&plan, now_ms);
        match (&expected, &actual) {
            (Ok(snapshot), Ok(status)) => {
                admitted += 1;
                let status = status.as_ref().expect("one bucket, one status");
                prop_assert_eq!(
                    status.remaining,
                    u64::from(snapshot.remaining_burst_capacity()),
                    "step {}: requests left after an admit",
                    i
                );
            }
            (Err(not_until), Err(limited)) => {
                denied += 1;
                let wait_ns = not_until.wait_time_from(clock.now()).as_nanos();
                let wait_ms = wait_ns.div_ceil(NANOS_PER_MS);
                prop_assert_eq!(
                    u128::from(limited.retry_after_ms),
                    wait_ms,
                    "step {} at +{} ms: retry_after_ms differs from governor's wait {} ns",
                    i,
                    now_ms - base_ms,
                    wait_ns
                );
                prop_assert!(limited.retry_after_ms > 0, "a denial never says wait 0");
            }
            _ => prop_assert!(
                false,
                "step {} at +{} ms: governor {:?}, core {:?}",
                i,
                now_ms - base_ms,
                expected.map_err(|e| e.wait_time_from(clock.now())),
                actual
            ),
        }
    }
    prop_assert_eq!(admitted + denied, steps_ms.len() as u32);
    Ok(())
}

/// Request gaps: mostly bursts (0 ms) and short gaps, sometimes long idle periods, so
/// that both full buckets and buckets refilled after a pause are exercised.
fn step_ms() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => Just(0u64),
        6 => 0u64..50,
        3 => 0u64..2_000,
        1 => 0u64..200_000,
    ]
}

fn bucket() -> impl Strategy<Value = RateBucket> {
    (1u32..=200, 1u64..=120, 1u32..=20).prop_map(|(quota, window_s, burst)| {
        RateBucket::new("b", quota, window_s * 1_000, burst).expect("valid bucket")
    })
}

/// `PROPTEST_CASES` when set (a soak), else `default`: a `with_cases` would win over it.
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(1_000)))]

    #[test]
    fn core_gcra_agrees_with_governor(
        bucket in bucket(),
        base_ms in prop_oneof![Just(0u64), 1_600_000_000_000u64..1_900_000_000_000],
        steps in proptest::collection::vec(step_ms(), 1..200),
    ) {
        compare(&bucket, base_ms, &steps)?;
    }
}

/// Periods that do not divide evenly into milliseconds (T = 1 s / 3) must still round
/// the wait up, never down.
#[test]
fn uneven_periods_round_the_wait_up() {
    let bucket = RateBucket::new("b", 3, 1_000, 1).expect("valid bucket");
    let steps: Vec<u64> = [0, 0, 1, 332, 1, 333, 0, 334, 0, 5_000, 0, 0, 333, 1]
        .into_iter()
        .collect();
    compare(&bucket, 1_700_000_000_000, &steps).expect("agrees with governor");
}

/// After a pause longer than the window the bucket is full again, but only full:
/// a burst of 1 admits one request, not two.
#[test]
fn an_idle_bucket_refills_to_its_burst_and_no_further() {
    let bucket = RateBucket::new("b", 1, 1_000, 1).expect("valid bucket");
    let plan = plan_with(bucket.clone());
    let mut rs = RateState::default();
    let t0 = 1_700_000_000_000;
    assert!(rs.acquire(&plan, t0).is_ok());
    assert!(rs.acquire(&plan, t0 + 5_000).is_ok(), "refilled after 5 s");
    let denied = rs
        .acquire(&plan, t0 + 5_500)
        .expect_err("burst 1: the second request 500 ms later waits");
    assert_eq!(denied.retry_after_ms, 500);
    compare(&bucket, t0, &[0, 5_000, 500, 499, 1]).expect("agrees with governor");
}

/// The example: q=10/w=1s with burst 10 admits exactly 10 at once, then one
/// every 100 ms, and `retry_after_ms` is exactly the time until the next admit.
#[test]
fn ten_per_second_burst_ten() {
    let bucket = RateBucket::new("default", 10, 1_000, 10).expect("valid bucket");
    let plan = plan_with(bucket);
    let mut rs = RateState::default();
    let t0 = 1_700_000_000_000u64;
    for i in 0..10 {
        assert!(rs.acquire(&plan, t0).is_ok(), "request {i} of the burst");
    }
    let denied = rs
        .acquire(&plan, t0)
        .expect_err("the 11th at once is denied");
    assert_eq!(denied.retry_after_ms, 100);
    // Walk every millisecond of the next second: each denial names the exact wait to
    // the next admit, and admits happen exactly every 100 ms.
    let mut next_admit_ms = t0 + 100;
    let mut admits = Vec::new();
    for now in t0 + 1..=t0 + 1_000 {
        match rs.acquire(&plan, now) {
            Ok(_) => {
                assert_eq!(now, next_admit_ms, "admitted at the promised moment");
                admits.push(now - t0);
                next_admit_ms = now + 100;
            }
            Err(limited) => assert_eq!(limited.retry_after_ms, next_admit_ms - now),
        }
    }
    assert_eq!(admits, (1..=10).map(|k| k * 100).collect::<Vec<_>>());
}
