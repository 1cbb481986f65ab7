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

mod ops;
mod reference;

use ops::*;
use reference::*;

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
