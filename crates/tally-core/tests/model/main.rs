//! Random command sequences against an independent reference model.
//!
//! The model is the simplest ledger that follows DESIGN.md: plain integers (wider than
//! the core's, so it sees overflow instead of suffering it), a map of holds and of
//! refundable debits, spend per calendar period computed with its own civil-date
//! arithmetic, and a GCRA written the way governor 0.10 writes it (TAT starts at `now`,
//! τ = T × (burst − 1)), which is a different formulation from the core's. No core
//! function computes an expected value; core types are used only to name the answers.
//!
//! After every step: the answer agrees (approved with the same receipt: seqs, time, the
//! amount moved, balance and held after, a new hold's expiry; or the same denial with the
//! same fields, or the same error), the `RateLimit` status of a debit, hold or check
//! agrees with the model's GCRA asked on a copy of its state, every agent's balance, held, holds,
//! refundable debits, totals and current-period spend agree, money is conserved per agent
//! and globally, `check_invariants()` passes, and replaying the agent's journal from
//! nothing gives exactly the live state. A `Restart` op rebuilds every agent from its
//! journal and drops the volatile rate-limit state, as the durable engine does.
//!
//! Where the design is silent on which of two errors comes first (a zero amount for an
//! unknown debit, say), the model checks in the order: amount, referenced hold or debit,
//! bounds, overflow.
//!
//! The files of this directory other than this one (`reference.rs`, `ops.rs`,
//! `world.rs`) are the model's side and are shared with tally-store's `engine_vs_model`
//! test, which runs the same ops through the durable engine with real restarts.

use proptest::prelude::*;
use tally_core::{
    decide, evolve, AgentId, AgentState, Command, Event, Outcome, PlanBook, RateState,
};

mod ops;
mod reference;
mod world;

use ops::*;
use reference::*;
use world::*;

// ---- the harness -------------------------------------------------------------------------------

/// The core, decided in memory, next to the model's side.
struct World {
    m: ModelWorld,
    plans: PlanBook,
    states: Vec<Option<AgentState>>,
    rates: Vec<RateState>,
    journals: Vec<Vec<Event>>,
}

impl World {
    fn new(now_ms: u64) -> Self {
        Self {
            m: ModelWorld::new(now_ms),
            plans: plan_book(),
            states: vec![None; AGENTS],
            rates: vec![RateState::default(); AGENTS],
            journals: vec![Vec::new(); AGENTS],
        }
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        if self.m.move_clock(op) {
            return Ok(());
        }
        if let Op::Restart = op {
            for i in 0..AGENTS {
                let rebuilt = replay(&self.m.ids[i], &self.journals[i])?;
                prop_assert_eq!(&rebuilt, &self.states[i], "restart of agent {}", i);
                self.states[i] = rebuilt;
                self.rates[i] = RateState::default();
            }
            self.m.forget_rates();
            return self.m.check_all(&self.states);
        }
        let (agent, kind, prio) = self.m.command(op).expect("an agent command");
        let now_ms = self.m.now_ms;
        let cmd = Command::new(self.m.ids[agent].clone(), kind.clone()).with_priority(prio);
        let expected = self.m.expect(agent, &kind, prio);
        let before = self.states[agent].clone();
        let actual = decide(
            self.states[agent].as_ref(),
            &mut self.rates[agent],
            &cmd,
            &self.plans,
            now_ms,
        );
        match (&expected, &actual) {
            (Err(want), Err(got)) => {
                prop_assert_eq!(want, got, "{:?} at {}", kind, now_ms);
                prop_assert_eq!(&before, &self.states[agent]);
            }
            (Ok(want), Ok(decision)) => {
                let got = expect_of(&decision.outcome, decision.rate.as_ref());
                prop_assert_eq!(want, &got, "{:?} at {}", kind, now_ms);
                prop_assert_eq!(
                    decision.events.len(),
                    match want {
                        Expect::Approved { events, .. } => *events as usize,
                        _ => 0,
                    }
                );
                let first_seq = before.as_ref().map_or(1, |s| s.last_seq + 1);
                if let Outcome::Approved(r) = &decision.outcome {
                    prop_assert_eq!(r.at_ms, now_ms, "receipt's time");
                    let seqs = match r.events {
                        0 => (0, 0),
                        n => (first_seq, first_seq + u64::from(n) - 1),
                    };
                    prop_assert_eq!((r.first_seq, r.last_seq), seqs, "receipt's seqs");
                }
                for (i, event) in decision.events.iter().enumerate() {
                    prop_assert_eq!(event.seq, first_seq + i as u64, "dense seqs");
                    prop_assert_eq!(event.at_ms, now_ms);
                    let next = evolve(self.states[agent].take(), &self.m.ids[agent], event)
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    self.states[agent] = Some(next);
                    self.journals[agent].push(event.clone());
                }
            }
            _ => prop_assert!(
                false,
                "{:?} at {}: model {:?}, core {:?}",
                kind,
                now_ms,
                expected,
                actual
            ),
        }
        // Replaying this agent's journal from nothing gives exactly its live state.
        let replayed = replay(&self.m.ids[agent], &self.journals[agent])?;
        prop_assert_eq!(&replayed, &self.states[agent], "replay of agent {}", agent);
        self.m.check_all(&self.states)
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
    #![proptest_config(ProptestConfig::with_cases(cases(1_000)))]

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
