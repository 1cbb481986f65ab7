//! Random operations for the model tests, and the strategies that generate them.
//!
//! Shared, like `reference.rs`, by the core's model test and the store's
//! `engine_vs_model` test; each includes this file as `mod ops`.

use proptest::prelude::*;
use tally_core::Priority;

use crate::reference::{HOLD_TTL_MAX_MS, MS_PER_DAY, PLANS, PLAN_MOVES};

/// How many agents the operations name.
pub(crate) const AGENTS: usize = 4;

/// A test's number of cases: `PROPTEST_CASES` when set (a soak), else `default`. A
/// `cases` written into a `ProptestConfig` would otherwise win over the variable.
pub(crate) fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

// ---- random operations ----------------------------------------------------------------------

#[derive(Debug, Clone)]
pub(crate) enum Pick {
    /// The n-th (mod count) open hold or refundable debit the model knows of.
    Known(usize),
    /// Any sequence number, usually not a hold or debit.
    Raw(u64),
}

#[derive(Debug, Clone)]
pub(crate) enum Part {
    /// This percentage of the hold or of what remains of the debit (0 to 120 %).
    Pct(u64),
    Raw(u64),
}

#[derive(Debug, Clone)]
pub(crate) enum Op {
    Create {
        agent: usize,
        plan: usize,
    },
    Credit {
        agent: usize,
        amount: u64,
    },
    Debit {
        agent: usize,
        amount: u64,
        prio: Priority,
    },
    Check {
        agent: usize,
        amount: u64,
        prio: Priority,
    },
    Hold {
        agent: usize,
        amount: u64,
        ttl_ms: u64,
        prio: Priority,
    },
    Capture {
        agent: usize,
        hold: Pick,
        part: Part,
    },
    Void {
        agent: usize,
        hold: Pick,
    },
    Expire {
        agent: usize,
    },
    Refund {
        agent: usize,
        debit: Pick,
        part: Part,
    },
    /// A credit grant expiring `expires_in_ms` from now (0: now, refused), if any.
    Grant {
        agent: usize,
        amount: u64,
        expires_in_ms: Option<u64>,
        priority: u32,
        promotional: bool,
    },
    /// Jump to `early_ms` before a live grant's expiry (0: exactly at it), if later.
    ToGrantExpiry {
        agent: usize,
        grant: usize,
        early_ms: u64,
    },
    /// A served call whose payment could not be settled: journaled, no money moves.
    Unsettled {
        agent: usize,
        amount: u64,
    },
    SetStatus {
        agent: usize,
        suspended: bool,
    },
    /// Moves the agent to `PLAN_MOVES[plan]` (mod its length).
    SetPlan {
        agent: usize,
        plan: usize,
    },
    Advance {
        ms: u64,
    },
    /// Jump to `early_ms` before an open hold's expiry (0: exactly at it), if later.
    ToHoldExpiry {
        agent: usize,
        hold: Pick,
        early_ms: u64,
    },
    /// Jump to `early_ms` before the agent's period ends (0: the first ms of the next).
    ToPeriodEnd {
        agent: usize,
        early_ms: u64,
    },
    Restart,
}

/// The last agent is often created late (or never), so it is picked less often.
pub(crate) fn agent() -> impl Strategy<Value = usize> {
    prop_oneof![5 => 0..AGENTS - 1, 1 => Just(AGENTS - 1)]
}

pub(crate) fn spend_amount() -> impl Strategy<Value = u64> {
    prop_oneof![
        12 => 1u64..2_500,
        3 => 1u64..25_000,
        1 => Just(0u64),
        1 => (u64::MAX - 3)..=u64::MAX,
    ]
}

pub(crate) fn credit_amount() -> impl Strategy<Value = u64> {
    prop_oneof![
        30 => 1u64..30_000,
        2 => Just(0u64),
        1 => (u64::MAX - 20_000)..=u64::MAX,
    ]
}

pub(crate) fn priority() -> impl Strategy<Value = Priority> {
    prop_oneof![
        2 => Just(Priority::Low),
        3 => Just(Priority::Normal),
        1 => Just(Priority::Critical),
    ]
}

pub(crate) fn ttl_ms() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 1u64..3_000,
        5 => 3_000u64..=HOLD_TTL_MAX_MS,
        1 => Just(HOLD_TTL_MAX_MS),
        1 => Just(0u64),
        1 => Just(HOLD_TTL_MAX_MS + 1),
    ]
}

pub(crate) fn pick() -> impl Strategy<Value = Pick> {
    prop_oneof![6 => any::<usize>().prop_map(Pick::Known), 1 => (0u64..40).prop_map(Pick::Raw)]
}

pub(crate) fn part() -> impl Strategy<Value = Part> {
    prop_oneof![
        4 => (0u64..=100).prop_map(Part::Pct),
        1 => (100u64..=120).prop_map(Part::Pct),
        1 => Just(Part::Raw(u64::MAX)),
    ]
}

/// Time moves by bursts (0 ms), request gaps, hours, and weeks (across month ends).
pub(crate) fn advance_ms() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => Just(0u64),
        5 => 0u64..600,
        3 => 0u64..10_000,
        2 => 0u64..=3_600_000,
        1 => 0u64..=40 * MS_PER_DAY,
    ]
}

pub(crate) fn grant_priority() -> impl Strategy<Value = u32> {
    prop_oneof![
        3 => Just(100u32),
        2 => Just(50u32),
        1 => Just(0u32),
        1 => Just(200u32),
        1 => Just(u32::MAX),
    ]
}

pub(crate) fn expires_in_ms() -> impl Strategy<Value = Option<u64>> {
    prop_oneof![
        2 => Just(None),
        1 => Just(Some(0u64)),
        3 => (1u64..3_000).prop_map(Some),
        2 => (3_000u64..=HOLD_TTL_MAX_MS).prop_map(Some),
        1 => (0u64..=40 * MS_PER_DAY).prop_map(Some),
    ]
}

pub(crate) fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (agent(), credit_amount(), expires_in_ms(), grant_priority(), prop::bool::weighted(0.4))
            .prop_map(|(agent, amount, expires_in_ms, priority, promotional)| Op::Grant {
                agent, amount, expires_in_ms, priority, promotional,
            }),
        2 => (agent(), any::<usize>(), 0u64..=1)
            .prop_map(|(agent, grant, early_ms)| Op::ToGrantExpiry { agent, grant, early_ms }),
        1 => (agent(), 0..PLANS.len()).prop_map(|(agent, plan)| Op::Create { agent, plan }),
        6 => (agent(), credit_amount()).prop_map(|(agent, amount)| Op::Credit { agent, amount }),
        7 => (agent(), spend_amount(), priority())
            .prop_map(|(agent, amount, prio)| Op::Debit { agent, amount, prio }),
        2 => (agent(), spend_amount(), priority())
            .prop_map(|(agent, amount, prio)| Op::Check { agent, amount, prio }),
        5 => (agent(), spend_amount(), ttl_ms(), priority())
            .prop_map(|(agent, amount, ttl_ms, prio)| Op::Hold { agent, amount, ttl_ms, prio }),
        3 => (agent(), pick(), part()).prop_map(|(agent, hold, part)| Op::Capture { agent, hold, part }),
        1 => (agent(), pick()).prop_map(|(agent, hold)| Op::Void { agent, hold }),
        2 => agent().prop_map(|agent| Op::Expire { agent }),
        2 => (agent(), pick(), part()).prop_map(|(agent, debit, part)| Op::Refund { agent, debit, part }),
        1 => (agent(), prop_oneof![Just(0u64), 1u64..5_000])
            .prop_map(|(agent, amount)| Op::Unsettled { agent, amount }),
        1 => (agent(), prop::bool::weighted(0.3))
            .prop_map(|(agent, suspended)| Op::SetStatus { agent, suspended }),
        1 => (agent(), 0..PLAN_MOVES.len()).prop_map(|(agent, plan)| Op::SetPlan { agent, plan }),
        6 => advance_ms().prop_map(|ms| Op::Advance { ms }),
        2 => (agent(), pick(), 0u64..=1)
            .prop_map(|(agent, hold, early_ms)| Op::ToHoldExpiry { agent, hold, early_ms }),
        1 => (agent(), 0u64..=1).prop_map(|(agent, early_ms)| Op::ToPeriodEnd { agent, early_ms }),
        1 => Just(Op::Restart),
    ]
}

/// Starting moments near period ends: 2026-12-31T23:00Z (year end), 2028-02-28T23:00Z
/// (leap day next), 2027-01-14T23:00Z (anchor-15 boundary), or anywhere in 2026–2029.
pub(crate) fn start_ms() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(1_798_758_000_000u64),
        Just(1_835_391_600_000u64),
        Just(1_799_967_600_000u64),
        1_767_225_600_000u64..1_893_456_000_000,
    ]
}
