//! Fuzzes `tally_core::decide` + `evolve` with command sequences for three agents under plans
//! with rate buckets, a monthly cap, a soft threshold and notification thresholds, with
//! credit grants that expire, as time advances: never panics;
//! after every step `check_invariants` holds, balances move exactly by approved amounts,
//! denials and checks write nothing, and replaying the journal from `None` gives the state.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tally_core::{
    decide, evolve, AgentId, AgentState, Command, CommandKind, Event, EventKind, GrantCategory,
    GrantTerms, IdempotencyKey, Outcome, Plan, PlanBook, PlanName, Pricing, Priority, RateBucket,
    RateState, Status, TaskType, Thresholds,
};

/// 2026-01-27T00:00:00Z: a few days before a month end and the plans' anchor days.
const START_MS: u64 = 1_769_472_000_000;
const AGENTS: usize = 3;
const STEPS_MAX: usize = 256;
const UNIT_MICROS: u64 = 1_000_000;

#[derive(Debug, Arbitrary)]
struct Step {
    agent: u8,
    advance: Advance,
    op: Op,
    priority: Pri,
    keyed: bool,
    task: Option<u8>,
}

#[derive(Debug, Arbitrary)]
enum Advance {
    None,
    Ms(u16),
    Secs(u16),
    Days(u8),
}

#[derive(Debug, Clone, Copy, Arbitrary)]
enum Pri {
    Low,
    Normal,
    Critical,
}

#[derive(Debug, Clone, Copy, Arbitrary)]
enum Amount {
    Small(u16),
    Units(u8),
    Raw(u64),
}

/// An id of a hold or debit: one that exists (by index) or any number.
#[derive(Debug, Clone, Copy, Arbitrary)]
enum Pick {
    Existing(u8),
    Raw(u64),
}

/// A part of an existing amount (`n / 255` of it), or any amount.
#[derive(Debug, Clone, Copy, Arbitrary)]
enum Part {
    Fraction(u8),
    Any(Amount),
}

#[derive(Debug, Arbitrary)]
enum Op {
    Create { plan: u8, suspended: bool },
    Update { plan: Option<u8>, status: Option<bool> },
    Credit(Amount),
    Debit(Amount),
    Check(Amount),
    Hold { amount: Amount, ttl_ms: u32 },
    Capture { hold: Pick, amount: Part },
    Void { hold: Pick },
    ExpireHolds,
    Refund { debit: Pick, amount: Part },
    Grant {
        amount: Amount,
        expires_in_ms: Option<u32>,
        priority: u8,
        promotional: bool,
    },
    SetThresholds {
        clear: bool,
        balance_below: Option<Amount>,
        cap_percent: Option<u8>,
        within_ms: Option<u32>,
    },
}

impl Amount {
    fn micros(self) -> u64 {
        match self {
            Amount::Small(n) => u64::from(n),
            Amount::Units(n) => u64::from(n) * UNIT_MICROS,
            Amount::Raw(n) => n,
        }
    }
}

impl Part {
    fn of(self, whole: u64) -> u64 {
        match self {
            Part::Fraction(n) => (u128::from(whole) * u128::from(n) / 255) as u64,
            Part::Any(a) => a.micros(),
        }
    }
}

fn plan_name(s: &str) -> PlanName {
    PlanName::new(s).expect("valid plan name")
}

fn plans() -> PlanBook {
    let metered = Plan::new(
        plan_name("metered"),
        vec![
            RateBucket::new("default", 5, 1_000, 3).expect("valid bucket"),
            RateBucket::new("minute", 40, 60_000, 20).expect("valid bucket"),
        ],
        Some(50 * UNIT_MICROS),
        Some(80),
        15,
        Pricing::default(),
        3_600_000,
    )
    .and_then(|p| {
        p.with_thresholds(Thresholds {
            balance_below_micros: Some(10 * UNIT_MICROS),
            cap_spend_percent: Some(60),
            grant_expiring_within_ms: Some(3_600_000),
        })
    })
    .expect("valid plan");
    let tight = Plan::new(
        plan_name("tight"),
        vec![RateBucket::new("default", 1, 1_000, 1).expect("valid bucket")],
        Some(5 * UNIT_MICROS),
        Some(50),
        1,
        Pricing::default(),
        600_000,
    )
    .expect("valid plan");
    PlanBook::new([metered, tight, Plan::unlimited(plan_name("open"))])
}

/// Plan names a command may use; the last one is not in the book.
const PLAN_NAMES: [&str; 4] = ["metered", "tight", "open", "missing"];

#[derive(Default)]
struct Agent {
    state: Option<AgentState>,
    rate: RateState,
    journal: Vec<Event>,
}

fn pick(p: Pick, ids: impl Iterator<Item = u64>) -> u64 {
    match p {
        Pick::Existing(i) => {
            let ids: Vec<u64> = ids.collect();
            if ids.is_empty() {
                u64::from(i)
            } else {
                ids[usize::from(i) % ids.len()]
            }
        }
        Pick::Raw(n) => n,
    }
}

fn command_kind(op: &Op, state: Option<&AgentState>, now_ms: u64) -> CommandKind {
    match *op {
        Op::Create { plan, suspended } => CommandKind::CreateAgent {
            plan: plan_name(PLAN_NAMES[usize::from(plan) % PLAN_NAMES.len()]),
            status: if suspended { Status::Suspended } else { Status::Active },
        },
        Op::Update { plan, status } => CommandKind::UpdateAgent {
            plan: plan.map(|p| plan_name(PLAN_NAMES[usize::from(p) % PLAN_NAMES.len()])),
            status: status.map(|s| if s { Status::Suspended } else { Status::Active }),
        },
        Op::Credit(a) => CommandKind::Credit {
            amount_micros: a.micros(),
        },
        Op::Debit(a) => CommandKind::Debit {
            amount_micros: a.micros(),
        },
        Op::Check(a) => CommandKind::Check {
            amount_micros: a.micros(),
        },
        Op::Hold { amount, ttl_ms } => CommandKind::Hold {
            amount_micros: amount.micros(),
            ttl_ms: u64::from(ttl_ms),
        },
        Op::Capture { hold, amount } => {
            let hold_seq = pick(hold, state.into_iter().flat_map(|s| s.holds.keys().copied()));
            let whole = state
                .and_then(|s| s.holds.get(&hold_seq))
                .map_or(0, |h| h.amount_micros);
            CommandKind::Capture {
                hold_seq,
                amount_micros: amount.of(whole),
            }
        }
        Op::Void { hold } => CommandKind::Void {
            hold_seq: pick(hold, state.into_iter().flat_map(|s| s.holds.keys().copied())),
        },
        Op::ExpireHolds => CommandKind::ExpireHolds,
        Op::Refund { debit, amount } => {
            let debit_seq = pick(
                debit,
                state
                    .into_iter()
                    .flat_map(|s| s.refundable.iter().map(|r| r.seq)),
            );
            let whole = state
                .and_then(|s| s.refundable(debit_seq))
                .map_or(0, |r| r.remaining_micros);
            CommandKind::Refund {
                debit_seq,
                amount_micros: amount.of(whole),
            }
        }
        Op::Grant {
            amount,
            expires_in_ms,
            priority,
            promotional,
        } => CommandKind::IssueGrant {
            amount_micros: amount.micros(),
            terms: GrantTerms {
                expires_at_ms: expires_in_ms.map(|ms| now_ms + u64::from(ms)),
                priority: u32::from(priority % 4) * 50,
                category: if promotional {
                    GrantCategory::Promotional
                } else {
                    GrantCategory::Paid
                },
            },
        },
        Op::SetThresholds {
            clear,
            balance_below,
            cap_percent,
            within_ms,
        } => CommandKind::SetThresholds {
            thresholds: (!clear).then(|| Thresholds {
                balance_below_micros: balance_below.map(Amount::micros),
                cap_spend_percent: cap_percent,
                grant_expiring_within_ms: within_ms.map(u64::from),
            }),
        },
    }
}

/// Money that left the balance by grant expiries in a run of events.
fn expired_in(events: &[Event]) -> u64 {
    events
        .iter()
        .map(|e| match e.kind {
            EventKind::GrantExpired { expired_micros, .. } => expired_micros,
            _ => 0,
        })
        .sum()
}

fuzz_target!(|steps: Vec<Step>| {
    let plans = plans();
    let ids: Vec<AgentId> = (0..AGENTS)
        .map(|i| AgentId::new(format!("agent-{i}")).expect("valid agent id"))
        .collect();
    let mut agents: Vec<Agent> = (0..AGENTS).map(|_| Agent::default()).collect();
    let mut now_ms = START_MS;

    for (n, step) in steps.iter().take(STEPS_MAX).enumerate() {
        now_ms += match step.advance {
            Advance::None => 0,
            Advance::Ms(ms) => u64::from(ms),
            Advance::Secs(s) => u64::from(s) * 1_000,
            Advance::Days(d) => u64::from(d) * 86_400_000,
        };
        let i = usize::from(step.agent) % AGENTS;
        let id = &ids[i];
        let agent = &mut agents[i];

        let mut cmd = Command::new(id.clone(), command_kind(&step.op, agent.state.as_ref(), now_ms))
            .with_priority(match step.priority {
                Pri::Low => Priority::Low,
                Pri::Normal => Priority::Normal,
                Pri::Critical => Priority::Critical,
            });
        if step.keyed {
            cmd = cmd.with_key(IdempotencyKey::new(format!("key-{n}")).expect("valid key"));
        }
        if let Some(t) = step.task {
            cmd = cmd.with_task_type(TaskType::new(format!("task.{}", t % 4)).expect("valid"));
        }

        let before = agent.state.clone();
        let rate_before = agent.rate.clone();
        let Ok(decision) = decide(
            agent.state.as_ref(),
            &mut agent.rate,
            &cmd,
            &plans,
            now_ms,
        ) else {
            // A malformed command changes nothing, not even the limiter.
            assert_eq!(agent.rate, rate_before, "an Err moved the limiter");
            continue;
        };

        match &decision.outcome {
            Outcome::Denied(_) | Outcome::WouldApprove { .. } => {
                assert!(decision.events.is_empty(), "a denial or check wrote events");
            }
            Outcome::Approved(receipt) => {
                assert_eq!(receipt.events as usize, decision.events.len());
                let first = before.as_ref().map_or(1, |s| s.last_seq + 1);
                for (k, e) in decision.events.iter().enumerate() {
                    assert_eq!(e.seq, first + k as u64, "sequence numbers are dense");
                    assert_eq!(e.at_ms, now_ms);
                    agent.state = Some(
                        evolve(agent.state.take(), id, e)
                            .unwrap_or_else(|err| panic!("evolve rejects a decided event: {err}")),
                    );
                    agent.journal.push(e.clone());
                }
                if let Some(s) = &agent.state {
                    assert_eq!(receipt.balance_after_micros, s.balance_micros);
                    assert_eq!(receipt.held_after_micros, s.held_micros);
                }
            }
        }
        if matches!(cmd.kind, CommandKind::Check { .. }) {
            assert_eq!(agent.rate, rate_before, "a check moved the limiter");
        }

        let Some(s) = &agent.state else {
            assert!(before.is_none());
            continue;
        };
        if let Err(e) = s.check_invariants() {
            panic!("invariants broken after {cmd:?}: {e}");
        }
        // Money moves by exactly the approved amount, and only on approval.
        // (Less the grants that expired ahead of the command, which the run says.)
        if let (Some(b), Outcome::Approved(_)) = (&before, &decision.outcome) {
            let expired = expired_in(&decision.events);
            assert_eq!(
                s.expired_total_micros,
                b.expired_total_micros + expired,
                "expiries are journaled"
            );
            match cmd.kind {
                CommandKind::Debit { amount_micros } => {
                    assert_eq!(s.balance_micros, b.balance_micros - expired - amount_micros);
                    assert_eq!(s.debited_total_micros, b.debited_total_micros + amount_micros);
                }
                CommandKind::Credit { amount_micros }
                | CommandKind::IssueGrant { amount_micros, .. } => {
                    assert_eq!(s.balance_micros, b.balance_micros - expired + amount_micros);
                }
                CommandKind::Hold { amount_micros, .. } => {
                    assert_eq!(s.balance_micros, b.balance_micros - expired - amount_micros);
                    assert_eq!(s.held_micros, b.held_micros + amount_micros);
                }
                _ => {}
            }
        } else if !matches!(decision.outcome, Outcome::Approved(_)) {
            assert_eq!(Some(s), before.as_ref(), "a denial or check changed the state");
        }
        // Every approved spend keeps spend + holds within the cap of the plan in force
        // (and within the soft threshold for low-priority work), plan changes included:
        // the period is the one the core decides in, max(period_of(now, anchor), the
        // agent's current period).
        if matches!(decision.outcome, Outcome::Approved(_))
            && matches!(cmd.kind, CommandKind::Debit { .. } | CommandKind::Hold { .. })
        {
            let plan = plans.get(&s.plan).expect("the agent's plan exists");
            if let Some(cap) = plan.monthly_cap_micros {
                let period = s.period_at(now_ms, plan.anchor_day);
                let committed = u128::from(s.spent_in(period)) + u128::from(s.held_micros);
                assert!(committed <= u128::from(cap), "cap {cap} passed: {committed}");
                if cmd.priority == Priority::Low {
                    let soft = plan.soft_limit_micros().expect("the plans set a soft threshold");
                    assert!(committed <= u128::from(soft), "soft limit {soft} passed");
                }
            }
        }
        // Replaying the journal from nothing rebuilds exactly this state.
        let mut replayed: Option<AgentState> = None;
        for e in &agent.journal {
            replayed = Some(
                evolve(replayed, id, e).unwrap_or_else(|err| panic!("replay fails: {err}")),
            );
        }
        assert_eq!(replayed.as_ref(), Some(s), "replay differs from the decided state");
    }
});
