//! Random command sequences against an independent reference model.
//!
//! The model is the simplest ledger that follows DESIGN.md: plain integers (wider than
//! the core's, so it sees overflow instead of suffering it), a map of holds and of
//! refundable debits, spend per calendar period computed with its own civil-date
//! arithmetic, and a GCRA written the way governor 0.10 writes it (TAT starts at `now`,
//! τ = T × (burst − 1)), which is a different formulation from the core's. No core
//! function computes an expected value; core types are used only to name the answers.
//!
//! After every step: the answer agrees (approved with the same receipt, or the same
//! denial with the same fields, or the same error), every agent's balance, held, holds,
//! refundable debits, totals and current-period spend agree, money is conserved per agent
//! and globally, `check_invariants()` passes, and replaying the agent's journal from
//! nothing gives exactly the live state. A `Restart` op rebuilds every agent from its
//! journal and drops the volatile rate-limit state, as the durable engine does.
//!
//! Where the design is silent on which of two errors comes first (a zero amount for an
//! unknown debit, say), the model checks in the order: amount, referenced hold or debit,
//! bounds, overflow.

use std::collections::BTreeMap;

use proptest::prelude::*;
use tally_core::{
    decide, evolve, AgentId, AgentState, Command, CommandError, CommandKind, Denial, Event,
    Outcome, PeriodKey, Plan, PlanBook, PlanName, Priority, RateBucket, RateState, Status,
};

const MS_PER_DAY: u64 = 86_400_000;
const NANOS_PER_MS: u64 = 1_000_000;
const HOLD_TTL_MAX_MS: u64 = 3_600_000;
const AGENTS: usize = 4;

// ---- the model's plans ---------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
struct ModelBucket {
    quota: u32,
    window_ms: u64,
    burst: u32,
}

#[derive(Debug, Clone, Copy)]
struct ModelPlan {
    name: &'static str,
    bucket: Option<ModelBucket>,
    cap_micros: Option<u64>,
    soft_pct: Option<u64>,
    anchor_day: u32,
}

const PLANS: [ModelPlan; 4] = [
    ModelPlan {
        name: "free",
        bucket: None,
        cap_micros: None,
        soft_pct: None,
        anchor_day: 1,
    },
    ModelPlan {
        name: "capped",
        bucket: None,
        cap_micros: Some(20_000),
        soft_pct: Some(80),
        anchor_day: 1,
    },
    ModelPlan {
        name: "metered",
        bucket: Some(ModelBucket {
            quota: 5,
            window_ms: 1_000,
            burst: 3,
        }),
        cap_micros: Some(10_000),
        soft_pct: Some(50),
        anchor_day: 15,
    },
    ModelPlan {
        name: "tight",
        bucket: Some(ModelBucket {
            quota: 1,
            window_ms: 2_000,
            burst: 1,
        }),
        cap_micros: None,
        soft_pct: None,
        anchor_day: 1,
    },
];

fn plan_name(i: usize) -> PlanName {
    PlanName::new(PLANS[i].name).expect("valid plan name")
}

/// The same plans, as the core's configuration.
fn plan_book() -> PlanBook {
    PlanBook::new(PLANS.iter().enumerate().map(|(i, m)| {
        let buckets = m
            .bucket
            .iter()
            .map(|b| RateBucket::new("default", b.quota, b.window_ms, b.burst).expect("bucket"))
            .collect();
        let mut p = Plan::unlimited(plan_name(i));
        p.buckets = buckets;
        p.monthly_cap_micros = m.cap_micros;
        p.soft_threshold_pct = m.soft_pct.map(|p| p as u8);
        p.anchor_day = m.anchor_day as u8;
        p.hold_ttl_max_ms = HOLD_TTL_MAX_MS;
        p.validate().expect("valid plan");
        p
    }))
}

// ---- the model's calendar (Howard Hinnant's days/civil algorithms) -----------------------

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The (year, month) of the period containing `now_ms`: months start on `anchor_day`.
fn period_at(now_ms: u64, anchor_day: u32) -> (i64, u32) {
    let (y, m, d) = civil_from_days((now_ms / MS_PER_DAY) as i64);
    match (d < anchor_day, m) {
        (false, _) => (y, m),
        (true, 1) => (y - 1, 12),
        (true, _) => (y, m - 1),
    }
}

/// First ms of the period after `period`.
fn period_end_ms(period: (i64, u32), anchor_day: u32) -> u64 {
    let (y, m) = if period.1 == 12 {
        (period.0 + 1, 1)
    } else {
        (period.0, period.1 + 1)
    };
    days_from_civil(y, m, anchor_day) as u64 * MS_PER_DAY
}

// ---- the model ledger --------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ModelHold {
    amount: u64,
    expires_at_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ModelDebit {
    remaining: u64,
    period: (i64, u32),
}

#[derive(Debug, Clone, Default)]
struct ModelAgent {
    plan: usize,
    suspended: bool,
    balance: i128,
    holds: BTreeMap<u64, ModelHold>,
    debits: BTreeMap<u64, ModelDebit>,
    spend: BTreeMap<(i64, u32), u128>,
    credited: u128,
    debited: u128,
    refunded: u128,
    seq: u64,
    /// governor's theoretical arrival time, ns; volatile.
    tat_ns: Option<u64>,
}

/// What the model expects a command to answer.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expect {
    Approved {
        events: u32,
        balance: u64,
        held: u64,
    },
    WouldApprove {
        amount: u64,
        balance: u64,
    },
    Denied(Denial),
}

const U64_MAX: u128 = u64::MAX as u128;

/// `a + b` must fit the core's 64-bit counters.
fn fits(a: u128, b: u128) -> Result<u128, CommandError> {
    let sum = a + b;
    if sum > U64_MAX {
        Err(CommandError::Overflow)
    } else {
        Ok(sum)
    }
}

impl ModelAgent {
    fn plan(&self) -> ModelPlan {
        PLANS[self.plan]
    }

    fn held(&self) -> u128 {
        self.holds.values().map(|h| u128::from(h.amount)).sum()
    }

    fn spent_at(&self, now_ms: u64) -> u128 {
        let period = period_at(now_ms, self.plan().anchor_day);
        self.spend.get(&period).copied().unwrap_or(0)
    }

    fn balance_u64(&self) -> u64 {
        u64::try_from(self.balance).expect("model balance fits u64")
    }

    fn held_u64(&self) -> u64 {
        u64::try_from(self.held()).expect("model held fits u64")
    }

    fn approved(&mut self, events: u32) -> Expect {
        self.seq += u64::from(events);
        Expect::Approved {
            events,
            balance: self.balance_u64(),
            held: self.held_u64(),
        }
    }

    /// GCRA as governor 0.10 writes it. `take` uses the cell on admit.
    fn rate(&mut self, now_ms: u64, take: bool) -> Result<(), Denial> {
        let Some(b) = self.plan().bucket else {
            return Ok(());
        };
        let t = b.window_ms * NANOS_PER_MS / u64::from(b.quota);
        let tau = t * u64::from(b.burst - 1);
        let now = now_ms * NANOS_PER_MS;
        let tat = self.tat_ns.unwrap_or(now);
        let earliest = tat.saturating_sub(tau);
        if now < earliest {
            return Err(Denial::RateLimited {
                bucket: "default".into(),
                quota: b.quota,
                window_ms: b.window_ms,
                retry_after_ms: (earliest - now).div_ceil(NANOS_PER_MS),
            });
        }
        if take {
            self.tat_ns = Some(tat.max(now) + t);
        }
        Ok(())
    }

    /// Suspended → rate limit → monthly cap (and the soft threshold for low) → funds.
    fn gate(
        &mut self,
        amount: u64,
        priority: Priority,
        now_ms: u64,
        take: bool,
    ) -> Result<(), Denial> {
        if self.suspended {
            return Err(Denial::Suspended);
        }
        self.rate(now_ms, take)?;
        let plan = self.plan();
        if let Some(cap) = plan.cap_micros {
            let spent = self.spent_at(now_ms);
            let held = self.held();
            let committed = spent + held + u128::from(amount);
            let soft_limit = match (priority, plan.soft_pct) {
                (Priority::Low, Some(pct)) => {
                    Some(u64::try_from(u128::from(cap) * u128::from(pct) / 100).expect("fits"))
                }
                _ => None,
            };
            let limit = if committed > u128::from(cap) {
                Some((cap, false))
            } else {
                soft_limit
                    .filter(|l| committed > u128::from(*l))
                    .map(|l| (l, true))
            };
            if let Some((limit_micros, soft)) = limit {
                let period = period_at(now_ms, plan.anchor_day);
                return Err(Denial::MonthlyCapReached {
                    cap_micros: cap,
                    limit_micros,
                    spent_micros: u64::try_from(spent).expect("fits"),
                    held_micros: u64::try_from(held).expect("fits"),
                    resets_at_ms: period_end_ms(period, plan.anchor_day),
                    soft,
                });
            }
        }
        if i128::from(amount) > self.balance {
            // Retry-After only if holds expiring on their own would free enough.
            let mut by_expiry: Vec<ModelHold> = self.holds.values().copied().collect();
            by_expiry.sort_by_key(|h| h.expires_at_ms);
            let mut available = self.balance;
            let mut retry_after_ms = None;
            for h in by_expiry {
                available += i128::from(h.amount);
                if available >= i128::from(amount) {
                    retry_after_ms = Some(h.expires_at_ms.saturating_sub(now_ms));
                    break;
                }
            }
            return Err(Denial::InsufficientFunds {
                required_micros: amount,
                available_micros: self.balance_u64(),
                balance_micros: self.balance_u64(),
                held_micros: self.held_u64(),
                retry_after_ms,
            });
        }
        Ok(())
    }

    fn spend(&mut self, amount: u64, now_ms: u64, seq: u64) {
        let period = period_at(now_ms, self.plan().anchor_day);
        *self.spend.entry(period).or_default() += u128::from(amount);
        self.debited += u128::from(amount);
        if amount > 0 {
            self.debits.insert(
                seq,
                ModelDebit {
                    remaining: amount,
                    period,
                },
            );
        }
    }

    fn step(
        &mut self,
        kind: &CommandKind,
        prio: Priority,
        now: u64,
    ) -> Result<Expect, CommandError> {
        let next = self.seq + 1;
        match *kind {
            CommandKind::CreateAgent { .. } => Err(CommandError::AgentExists),
            CommandKind::UpdateAgent { status, .. } => {
                if let Some(s) = status {
                    self.suspended = s == Status::Suspended;
                }
                Ok(self.approved(1))
            }
            CommandKind::Credit { amount_micros: a } => {
                if a == 0 {
                    return Err(CommandError::ZeroAmount);
                }
                fits(self.credited, a.into())?;
                fits(self.balance as u128, a.into())?;
                self.credited += u128::from(a);
                self.balance += i128::from(a);
                Ok(self.approved(1))
            }
            CommandKind::Debit { amount_micros: a } => {
                if a == 0 {
                    return Err(CommandError::ZeroAmount);
                }
                if let Err(d) = self.gate(a, prio, now, true) {
                    return Ok(Expect::Denied(d));
                }
                fits(self.debited, a.into())?;
                fits(self.spent_at(now), a.into())?;
                self.balance -= i128::from(a);
                self.spend(a, now, next);
                Ok(self.approved(1))
            }
            CommandKind::Check { amount_micros: a } => {
                if a == 0 {
                    return Err(CommandError::ZeroAmount);
                }
                Ok(match self.gate(a, prio, now, false) {
                    Ok(()) => Expect::WouldApprove {
                        amount: a,
                        balance: self.balance_u64(),
                    },
                    Err(d) => Expect::Denied(d),
                })
            }
            CommandKind::Hold {
                amount_micros: a,
                ttl_ms,
            } => {
                if a == 0 {
                    return Err(CommandError::ZeroAmount);
                }
                if ttl_ms == 0 || ttl_ms > HOLD_TTL_MAX_MS {
                    return Err(CommandError::InvalidTtl {
                        ttl_ms,
                        max_ms: HOLD_TTL_MAX_MS,
                    });
                }
                if let Err(d) = self.gate(a, prio, now, true) {
                    return Ok(Expect::Denied(d));
                }
                fits(self.held(), a.into())?;
                self.balance -= i128::from(a);
                self.holds.insert(
                    next,
                    ModelHold {
                        amount: a,
                        expires_at_ms: now + ttl_ms,
                    },
                );
                Ok(self.approved(1))
            }
            CommandKind::Capture {
                hold_seq,
                amount_micros: a,
            } => {
                let hold = *self
                    .holds
                    .get(&hold_seq)
                    .ok_or(CommandError::UnknownHold(hold_seq))?;
                if now >= hold.expires_at_ms {
                    return Err(CommandError::HoldExpired {
                        hold_seq,
                        expires_at_ms: hold.expires_at_ms,
                    });
                }
                if a > hold.amount {
                    return Err(CommandError::CaptureExceedsHold {
                        amount_micros: a,
                        held_micros: hold.amount,
                    });
                }
                let released = hold.amount - a;
                fits(self.debited, a.into())?;
                fits(self.spent_at(now), a.into())?;
                fits(self.balance as u128, released.into())?;
                self.holds.remove(&hold_seq);
                self.balance += i128::from(released);
                self.spend(a, now, next);
                Ok(self.approved(1))
            }
            CommandKind::Void { hold_seq } => {
                let hold = *self
                    .holds
                    .get(&hold_seq)
                    .ok_or(CommandError::UnknownHold(hold_seq))?;
                fits(self.balance as u128, hold.amount.into())?;
                self.holds.remove(&hold_seq);
                self.balance += i128::from(hold.amount);
                Ok(self.approved(1))
            }
            CommandKind::ExpireHolds => {
                let due: Vec<u64> = self
                    .holds
                    .iter()
                    .filter(|(_, h)| h.expires_at_ms <= now)
                    .map(|(s, _)| *s)
                    .collect();
                let freed: u128 = due.iter().map(|s| u128::from(self.holds[s].amount)).sum();
                fits(self.balance as u128, freed)?;
                for s in &due {
                    let h = self.holds.remove(s).expect("due hold is open");
                    self.balance += i128::from(h.amount);
                }
                Ok(self.approved(due.len() as u32))
            }
            CommandKind::Refund {
                debit_seq,
                amount_micros: a,
            } => {
                if a == 0 {
                    return Err(CommandError::ZeroAmount);
                }
                let debit = *self
                    .debits
                    .get(&debit_seq)
                    .ok_or(CommandError::UnknownDebit(debit_seq))?;
                if a > debit.remaining {
                    return Err(CommandError::RefundExceedsDebit {
                        amount_micros: a,
                        refundable_micros: debit.remaining,
                    });
                }
                fits(self.refunded, a.into())?;
                fits(self.balance as u128, a.into())?;
                self.refunded += u128::from(a);
                self.balance += i128::from(a);
                self.debits.get_mut(&debit_seq).expect("exists").remaining -= a;
                let spent = self.spend.entry(debit.period).or_default();
                *spent = spent.saturating_sub(u128::from(a));
                Ok(self.approved(1))
            }
        }
    }
}

// ---- random operations ----------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Pick {
    /// The n-th (mod count) open hold or refundable debit the model knows of.
    Known(usize),
    /// Any sequence number, usually not a hold or debit.
    Raw(u64),
}

#[derive(Debug, Clone)]
enum Part {
    /// This percentage of the hold or of what remains of the debit (0 to 120 %).
    Pct(u64),
    Raw(u64),
}

#[derive(Debug, Clone)]
enum Op {
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
    SetStatus {
        agent: usize,
        suspended: bool,
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
fn agent() -> impl Strategy<Value = usize> {
    prop_oneof![5 => 0..AGENTS - 1, 1 => Just(AGENTS - 1)]
}

fn spend_amount() -> impl Strategy<Value = u64> {
    prop_oneof![
        12 => 1u64..2_500,
        3 => 1u64..25_000,
        1 => Just(0u64),
        1 => (u64::MAX - 3)..=u64::MAX,
    ]
}

fn credit_amount() -> impl Strategy<Value = u64> {
    prop_oneof![
        30 => 1u64..30_000,
        2 => Just(0u64),
        1 => (u64::MAX - 20_000)..=u64::MAX,
    ]
}

fn priority() -> impl Strategy<Value = Priority> {
    prop_oneof![
        2 => Just(Priority::Low),
        3 => Just(Priority::Normal),
        1 => Just(Priority::Critical),
    ]
}

fn ttl_ms() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 1u64..3_000,
        5 => 3_000u64..=HOLD_TTL_MAX_MS,
        1 => Just(HOLD_TTL_MAX_MS),
        1 => Just(0u64),
        1 => Just(HOLD_TTL_MAX_MS + 1),
    ]
}

fn pick() -> impl Strategy<Value = Pick> {
    prop_oneof![6 => any::<usize>().prop_map(Pick::Known), 1 => (0u64..40).prop_map(Pick::Raw)]
}

fn part() -> impl Strategy<Value = Part> {
    prop_oneof![
        4 => (0u64..=100).prop_map(Part::Pct),
        1 => (100u64..=120).prop_map(Part::Pct),
        1 => Just(Part::Raw(u64::MAX)),
    ]
}

/// Time moves by bursts (0 ms), request gaps, hours, and weeks (across month ends).
fn advance_ms() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => Just(0u64),
        5 => 0u64..600,
        3 => 0u64..10_000,
        2 => 0u64..=3_600_000,
        1 => 0u64..=40 * MS_PER_DAY,
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
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
        1 => (agent(), prop::bool::weighted(0.3))
            .prop_map(|(agent, suspended)| Op::SetStatus { agent, suspended }),
        6 => advance_ms().prop_map(|ms| Op::Advance { ms }),
        2 => (agent(), pick(), 0u64..=1)
            .prop_map(|(agent, hold, early_ms)| Op::ToHoldExpiry { agent, hold, early_ms }),
        1 => (agent(), 0u64..=1).prop_map(|(agent, early_ms)| Op::ToPeriodEnd { agent, early_ms }),
        1 => Just(Op::Restart),
    ]
}

/// Starting moments near period ends: 2026-12-31T23:00Z (year end), 2028-02-28T23:00Z
/// (leap day next), 2027-01-14T23:00Z (anchor-15 boundary), or anywhere in 2026–2029.
fn start_ms() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(1_798_758_000_000u64),
        Just(1_835_391_600_000u64),
        Just(1_799_967_600_000u64),
        1_767_225_600_000u64..1_893_456_000_000,
    ]
}

// ---- the harness -------------------------------------------------------------------------------

struct World {
    ids: Vec<AgentId>,
    plans: PlanBook,
    now_ms: u64,
    states: Vec<Option<AgentState>>,
    rates: Vec<RateState>,
    journals: Vec<Vec<Event>>,
    model: BTreeMap<String, ModelAgent>,
    /// Sums over all agents of approved credits, debits + captures, and refunds.
    credited: u128,
    debited: u128,
    refunded: u128,
}

impl World {
    fn new(now_ms: u64) -> Self {
        Self {
            ids: (0..AGENTS)
                .map(|i| AgentId::new(format!("agent-{i}")).expect("valid id"))
                .collect(),
            plans: plan_book(),
            now_ms,
            states: vec![None; AGENTS],
            rates: vec![RateState::default(); AGENTS],
            journals: vec![Vec::new(); AGENTS],
            model: BTreeMap::new(),
            credited: 0,
            debited: 0,
            refunded: 0,
        }
    }

    fn key(&self, agent: usize) -> String {
        self.ids[agent].as_str().to_owned()
    }

    fn known_hold(&self, agent: usize, pick: &Pick) -> u64 {
        match (pick, self.model.get(&self.key(agent))) {
            (Pick::Known(n), Some(m)) if !m.holds.is_empty() => {
                *m.holds.keys().nth(n % m.holds.len()).expect("in range")
            }
            (Pick::Known(n), _) => *n as u64 % 40,
            (Pick::Raw(s), _) => *s,
        }
    }

    fn known_debit(&self, agent: usize, pick: &Pick) -> u64 {
        match (pick, self.model.get(&self.key(agent))) {
            (Pick::Known(n), Some(m)) if !m.debits.is_empty() => {
                *m.debits.keys().nth(n % m.debits.len()).expect("in range")
            }
            (Pick::Known(n), _) => *n as u64 % 40,
            (Pick::Raw(s), _) => *s,
        }
    }

    fn part_of(whole: Option<u64>, part: &Part) -> u64 {
        match (part, whole) {
            (Part::Pct(p), Some(w)) => {
                u64::try_from(u128::from(w) * u128::from(*p) / 100).unwrap_or(u64::MAX)
            }
            (Part::Pct(p), None) => *p,
            (Part::Raw(r), _) => *r,
        }
    }

    /// The command an op stands for, for the agent it names.
    fn command(&self, op: &Op) -> Option<(usize, CommandKind, Priority)> {
        let normal = Priority::Normal;
        Some(match op {
            Op::Create { agent, plan } => (
                *agent,
                CommandKind::CreateAgent {
                    plan: plan_name(*plan),
                    status: Status::Active,
                },
                normal,
            ),
            Op::Credit { agent, amount } => (
                *agent,
                CommandKind::Credit {
                    amount_micros: *amount,
                },
                normal,
            ),
            Op::Debit {
                agent,
                amount,
                prio,
            } => (
                *agent,
                CommandKind::Debit {
                    amount_micros: *amount,
                },
                *prio,
            ),
            Op::Check {
                agent,
                amount,
                prio,
            } => (
                *agent,
                CommandKind::Check {
                    amount_micros: *amount,
                },
                *prio,
            ),
            Op::Hold {
                agent,
                amount,
                ttl_ms,
                prio,
            } => (
                *agent,
                CommandKind::Hold {
                    amount_micros: *amount,
                    ttl_ms: *ttl_ms,
                },
                *prio,
            ),
            Op::Capture { agent, hold, part } => {
                let hold_seq = self.known_hold(*agent, hold);
                let whole = self
                    .model
                    .get(&self.key(*agent))
                    .and_then(|m| m.holds.get(&hold_seq))
                    .map(|h| h.amount);
                (
                    *agent,
                    CommandKind::Capture {
                        hold_seq,
                        amount_micros: Self::part_of(whole, part),
                    },
                    normal,
                )
            }
            Op::Void { agent, hold } => (
                *agent,
                CommandKind::Void {
                    hold_seq: self.known_hold(*agent, hold),
                },
                normal,
            ),
            Op::Expire { agent } => (*agent, CommandKind::ExpireHolds, normal),
            Op::Refund { agent, debit, part } => {
                let debit_seq = self.known_debit(*agent, debit);
                let whole = self
                    .model
                    .get(&self.key(*agent))
                    .and_then(|m| m.debits.get(&debit_seq))
                    .map(|d| d.remaining);
                (
                    *agent,
                    CommandKind::Refund {
                        debit_seq,
                        amount_micros: Self::part_of(whole, part),
                    },
                    normal,
                )
            }
            Op::SetStatus { agent, suspended } => (
                *agent,
                CommandKind::UpdateAgent {
                    plan: None,
                    status: Some(if *suspended {
                        Status::Suspended
                    } else {
                        Status::Active
                    }),
                },
                normal,
            ),
            Op::Advance { .. } | Op::ToHoldExpiry { .. } | Op::ToPeriodEnd { .. } | Op::Restart => {
                return None
            }
        })
    }

    /// What the model says the command answers, updating the model.
    fn expect(
        &mut self,
        agent: usize,
        kind: &CommandKind,
        prio: Priority,
    ) -> Result<Expect, CommandError> {
        let key = self.key(agent);
        let now = self.now_ms;
        let Some(m) = self.model.get_mut(&key) else {
            return match kind {
                CommandKind::CreateAgent { plan, .. } => {
                    let plan = PLANS
                        .iter()
                        .position(|p| p.name == plan.as_str())
                        .expect("model plan");
                    let mut fresh = ModelAgent {
                        plan,
                        ..ModelAgent::default()
                    };
                    let e = fresh.approved(1);
                    self.model.insert(key, fresh);
                    Ok(e)
                }
                _ => Err(CommandError::UnknownAgent),
            };
        };
        let before = (m.credited, m.debited, m.refunded);
        let result = m.step(kind, prio, now);
        self.credited += m.credited - before.0;
        self.debited += m.debited - before.1;
        self.refunded += m.refunded - before.2;
        result
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match op {
            Op::Advance { ms } => {
                self.now_ms += ms;
                return Ok(());
            }
            Op::ToHoldExpiry {
                agent,
                hold,
                early_ms,
            } => {
                let seq = self.known_hold(*agent, hold);
                if let Some(h) = self
                    .model
                    .get(&self.key(*agent))
                    .and_then(|m| m.holds.get(&seq))
                {
                    self.now_ms = self.now_ms.max(h.expires_at_ms - early_ms);
                }
                return Ok(());
            }
            Op::ToPeriodEnd { agent, early_ms } => {
                if let Some(m) = self.model.get(&self.key(*agent)) {
                    let anchor_day = m.plan().anchor_day;
                    let end = period_end_ms(period_at(self.now_ms, anchor_day), anchor_day);
                    self.now_ms = self.now_ms.max(end - early_ms);
                }
                return Ok(());
            }
            Op::Restart => {
                for i in 0..AGENTS {
                    let rebuilt = replay(&self.ids[i], &self.journals[i])?;
                    prop_assert_eq!(&rebuilt, &self.states[i], "restart of agent {}", i);
                    self.states[i] = rebuilt;
                    self.rates[i] = RateState::default();
                }
                for m in self.model.values_mut() {
                    m.tat_ns = None;
                }
                return self.check_all();
            }
            _ => {}
        }
        let (agent, kind, prio) = self.command(op).expect("an agent command");
        let cmd = Command::new(self.ids[agent].clone(), kind.clone()).with_priority(prio);
        let expected = self.expect(agent, &kind, prio);
        let before = self.states[agent].clone();
        let actual = decide(
            self.states[agent].as_ref(),
            &mut self.rates[agent],
            &cmd,
            &self.plans,
            self.now_ms,
        );
        match (&expected, &actual) {
            (Err(want), Err(got)) => {
                prop_assert_eq!(want, got, "{:?} at {}", kind, self.now_ms);
                prop_assert_eq!(&before, &self.states[agent]);
            }
            (Ok(want), Ok(decision)) => {
                let got = match &decision.outcome {
                    Outcome::Approved(r) => Expect::Approved {
                        events: r.events,
                        balance: r.balance_after_micros,
                        held: r.held_after_micros,
                    },
                    Outcome::WouldApprove {
                        amount_micros,
                        balance_micros,
                    } => Expect::WouldApprove {
                        amount: *amount_micros,
                        balance: *balance_micros,
                    },
                    Outcome::Denied(d) => Expect::Denied(d.clone()),
                };
                prop_assert_eq!(want, &got, "{:?} at {}", kind, self.now_ms);
                prop_assert_eq!(
                    decision.events.len(),
                    match want {
                        Expect::Approved { events, .. } => *events as usize,
                        _ => 0,
                    }
                );
                let first_seq = before.as_ref().map_or(1, |s| s.last_seq + 1);
                for (i, event) in decision.events.iter().enumerate() {
                    prop_assert_eq!(event.seq, first_seq + i as u64, "dense seqs");
                    prop_assert_eq!(event.at_ms, self.now_ms);
                    let next = evolve(self.states[agent].take(), &self.ids[agent], event)
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    self.states[agent] = Some(next);
                    self.journals[agent].push(event.clone());
                }
            }
            _ => prop_assert!(
                false,
                "{:?} at {}: model {:?}, core {:?}",
                kind,
                self.now_ms,
                expected,
                actual
            ),
        }
        // Replaying this agent's journal from nothing gives exactly its live state.
        let replayed = replay(&self.ids[agent], &self.journals[agent])?;
        prop_assert_eq!(&replayed, &self.states[agent], "replay of agent {}", agent);
        self.check_all()
    }

    /// Every agent agrees with the model; money is conserved per agent and globally.
    fn check_all(&self) -> Result<(), TestCaseError> {
        let (mut inflow, mut outflow) = (0u128, 0u128);
        for i in 0..AGENTS {
            let key = self.key(i);
            let (state, model) = match (&self.states[i], self.model.get(&key)) {
                (None, None) => continue,
                (Some(s), Some(m)) => (s, m),
                (s, m) => {
                    return Err(TestCaseError::fail(format!(
                        "agent {i}: core {s:?} vs model {m:?}"
                    )))
                }
            };
            state
                .check_invariants()
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(model.balance >= 0, "model balance went negative");
            prop_assert_eq!(
                i128::from(state.balance_micros),
                model.balance,
                "balance {}",
                i
            );
            prop_assert_eq!(u128::from(state.held_micros), model.held(), "held {}", i);
            prop_assert_eq!(state.status == Status::Suspended, model.suspended);
            prop_assert_eq!(state.plan.as_str(), model.plan().name);
            prop_assert_eq!(state.last_seq, model.seq, "version {}", i);
            let holds: BTreeMap<u64, ModelHold> = state
                .holds
                .iter()
                .map(|(s, h)| {
                    (
                        *s,
                        ModelHold {
                            amount: h.amount_micros,
                            expires_at_ms: h.expires_at_ms,
                        },
                    )
                })
                .collect();
            prop_assert_eq!(&holds, &model.holds, "holds {}", i);
            let refundable: Vec<(u64, u64)> = state
                .refundable
                .iter()
                .map(|r| (r.seq, r.remaining_micros))
                .collect();
            let model_refundable: Vec<(u64, u64)> = model
                .debits
                .iter()
                .map(|(s, d)| (*s, d.remaining))
                .collect();
            prop_assert_eq!(refundable, model_refundable, "refundable {}", i);
            prop_assert_eq!(u128::from(state.credited_total_micros), model.credited);
            prop_assert_eq!(u128::from(state.debited_total_micros), model.debited);
            prop_assert_eq!(u128::from(state.refunded_total_micros), model.refunded);
            let (y, m) = period_at(self.now_ms, model.plan().anchor_day);
            let period = PeriodKey::new(y as i32, m).expect("model period in range");
            prop_assert_eq!(
                u128::from(state.spent_in(period)),
                model.spent_at(self.now_ms),
                "spend of agent {} in {}",
                i,
                period
            );
            // Conservation per agent: balance + held + debited = credited + refunded.
            let out = u128::from(state.balance_micros)
                + u128::from(state.held_micros)
                + u128::from(state.debited_total_micros);
            let inn =
                u128::from(state.credited_total_micros) + u128::from(state.refunded_total_micros);
            prop_assert_eq!(out, inn, "money conserved for agent {}", i);
            inflow += inn;
            outflow += out;
        }
        // Globally, against the sums of what the model approved.
        prop_assert_eq!(inflow, outflow);
        prop_assert_eq!(inflow, self.credited + self.refunded);
        let balances_and_held: u128 = self
            .states
            .iter()
            .flatten()
            .map(|s| u128::from(s.balance_micros) + u128::from(s.held_micros))
            .sum();
        prop_assert_eq!(
            balances_and_held + self.debited,
            self.credited + self.refunded
        );
        Ok(())
    }
}

fn replay(id: &AgentId, journal: &[Event]) -> Result<Option<AgentState>, TestCaseError> {
    let mut state = None;
    for event in journal {
        state = Some(evolve(state, id, event).map_err(|e| TestCaseError::fail(e.to_string()))?);
    }
    Ok(state)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1_000))]

    #[test]
    fn core_agrees_with_the_reference_model(
        start in start_ms(),
        plans in proptest::collection::vec(0..PLANS.len(), AGENTS - 1),
        last_plan in proptest::option::weighted(0.6, 0..PLANS.len()),
        ops in proptest::collection::vec(op(), 1..160),
    ) {
        let mut world = World::new(start);
        // The first agents exist from the start; the last one maybe only once an op
        // creates it.
        for (agent, plan) in plans.iter().chain(&last_plan).enumerate() {
            world.apply(&Op::Create { agent, plan: *plan })?;
        }
        for op in &ops {
            world.apply(op)?;
        }
    }
}

#[test]
fn the_model_calendar_is_right_where_it_matters() {
    // 2027-01-01T00:00:00Z and the ms before; 2028-02-29 (leap), anchor 15.
    assert_eq!(period_at(1_798_761_600_000, 1), (2027, 1));
    assert_eq!(period_at(1_798_761_599_999, 1), (2026, 12));
    assert_eq!(period_end_ms((2026, 12), 1), 1_798_761_600_000);
    assert_eq!(
        civil_from_days((1_835_438_400_000 / MS_PER_DAY) as i64),
        (2028, 2, 29)
    );
    assert_eq!(period_at(1_799_967_599_999, 15), (2026, 12));
    assert_eq!(period_at(1_799_967_600_000 + 3_600_000, 15), (2027, 1));
    assert_eq!(days_from_civil(1970, 1, 1), 0);
}
