//! The model's side of a harness: which command an op stands for, what the reference
//! model expects it to answer, how the model's clock moves, and the comparison of every
//! agent's live state with the model after a step.
//!
//! Shared by the core's model test (which decides with `tally_core::decide`) and the
//! store's `engine_vs_model` test (which submits to the durable engine); each keeps its
//! own system under test and hands its agent states to [`ModelWorld::check_all`].

use std::collections::BTreeMap;

use proptest::prelude::*;
use tally_core::{
    AgentId, AgentState, CommandError, CommandKind, GrantCategory, GrantTerms, Outcome, PeriodKey,
    Priority, RateStatus, Status,
};

use crate::ops::{Op, Part, Pick, AGENTS};
use crate::reference::{
    period_end_ms, plan_name, Expect, ModelAgent, ModelGrant, ModelHold, ModelTerms, PLANS,
    PLAN_MOVES,
};

/// A refundable debit as compared: seq, remaining micros, (grant id, micros) drawn.
type RefundableView = (u64, u64, Vec<(u64, u64)>);

pub(crate) struct ModelWorld {
    pub(crate) ids: Vec<AgentId>,
    pub(crate) now_ms: u64,
    pub(crate) model: BTreeMap<String, ModelAgent>,
    /// Sums over all agents of approved credits, debits + captures, and refunds.
    credited: u128,
    debited: u128,
    refunded: u128,
    expired: u128,
}

/// The model's name for an answer of the system under test: its outcome and the
/// `RateLimit` status that came with it. Of a receipt, the seqs and the time are left to
/// the harness, which knows the agent's last seq and the clock.
pub(crate) fn expect_of(outcome: &Outcome, rate: Option<&RateStatus>) -> Expect {
    let rate = rate.cloned();
    match outcome {
        Outcome::Approved(r) => Expect::Approved {
            events: r.events,
            amount: r.amount_micros,
            balance: r.balance_after_micros,
            held: r.held_after_micros,
            hold_expires_at_ms: r.hold_expires_at_ms,
            rate,
        },
        Outcome::WouldApprove {
            amount_micros,
            balance_micros,
        } => Expect::WouldApprove {
            amount: *amount_micros,
            balance: *balance_micros,
            rate,
        },
        Outcome::Denied(d) => Expect::Denied {
            denial: d.clone(),
            rate,
        },
    }
}

impl ModelWorld {
    pub(crate) fn new(now_ms: u64) -> Self {
        Self {
            ids: (0..AGENTS)
                .map(|i| AgentId::new(format!("agent-{i}")).expect("valid id"))
                .collect(),
            now_ms,
            model: BTreeMap::new(),
            credited: 0,
            debited: 0,
            refunded: 0,
            expired: 0,
        }
    }

    /// The same world with agent ids that start with `prefix`, for a store that other
    /// runs share (a Redis Cluster).
    #[allow(dead_code)]
    pub(crate) fn with_id_prefix(mut self, prefix: &str) -> Self {
        for (i, id) in self.ids.iter_mut().enumerate() {
            *id = AgentId::new(format!("{prefix}agent-{i}")).expect("valid id");
        }
        self
    }

    pub(crate) fn key(&self, agent: usize) -> String {
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
    pub(crate) fn command(&self, op: &Op) -> Option<(usize, CommandKind, Priority)> {
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
            Op::Grant {
                agent,
                amount,
                expires_in_ms,
                priority,
                promotional,
            } => (
                *agent,
                CommandKind::IssueGrant {
                    amount_micros: *amount,
                    terms: GrantTerms {
                        expires_at_ms: expires_in_ms.map(|ms| self.now_ms + ms),
                        priority: *priority,
                        category: if *promotional {
                            GrantCategory::Promotional
                        } else {
                            GrantCategory::Paid
                        },
                    },
                },
                normal,
            ),
            Op::Unsettled { agent, amount } => (
                *agent,
                CommandKind::RecordUnsettledPayment {
                    amount_micros: *amount,
                },
                normal,
            ),
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
            Op::SetPlan { agent, plan } => (
                *agent,
                CommandKind::UpdateAgent {
                    plan: Some(plan_name(PLAN_MOVES[plan % PLAN_MOVES.len()])),
                    status: None,
                },
                normal,
            ),
            Op::Advance { .. }
            | Op::ToHoldExpiry { .. }
            | Op::ToGrantExpiry { .. }
            | Op::ToPeriodEnd { .. }
            | Op::Restart => return None,
        })
    }

    /// What the model says the command answers, updating the model.
    pub(crate) fn expect(
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
                    let e = fresh.approved(1, 0);
                    self.model.insert(key, fresh);
                    Ok(e)
                }
                _ => Err(CommandError::UnknownAgent),
            };
        };
        let before = (m.credited, m.debited, m.refunded, m.expired);
        let result = m.step(kind, prio, now);
        self.credited += m.credited - before.0;
        self.debited += m.debited - before.1;
        self.refunded += m.refunded - before.2;
        self.expired += m.expired - before.3;
        result
    }

    /// Moves the model's clock for a clock op; false for any other op.
    pub(crate) fn move_clock(&mut self, op: &Op) -> bool {
        match op {
            Op::Advance { ms } => self.now_ms += ms,
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
            }
            Op::ToGrantExpiry {
                agent,
                grant,
                early_ms,
            } => {
                let expiries: Vec<u64> = self
                    .model
                    .get(&self.key(*agent))
                    .map(|m| {
                        m.grants
                            .values()
                            .filter_map(|g| g.terms.expires_at_ms)
                            .collect()
                    })
                    .unwrap_or_default();
                if !expiries.is_empty() {
                    let at = expiries[grant % expiries.len()];
                    self.now_ms = self.now_ms.max(at - early_ms);
                }
            }
            Op::ToPeriodEnd { agent, early_ms } => {
                if let Some(m) = self.model.get(&self.key(*agent)) {
                    let anchor_day = m.plan().anchor_day;
                    let end = period_end_ms(m.period_now(self.now_ms), anchor_day);
                    self.now_ms = self.now_ms.max(end - early_ms);
                }
            }
            _ => return false,
        }
        true
    }

    /// A restart: rate-limit state is volatile, everything else is kept.
    pub(crate) fn forget_rates(&mut self) {
        for m in self.model.values_mut() {
            m.tat_ns = None;
        }
    }

    /// Every agent's live state (`states[i]` for `ids[i]`) agrees with the model; money is
    /// conserved per agent and globally.
    pub(crate) fn check_all(&self, states: &[Option<AgentState>]) -> Result<(), TestCaseError> {
        prop_assert_eq!(states.len(), AGENTS);
        let (mut inflow, mut outflow) = (0u128, 0u128);
        for (i, state) in states.iter().enumerate() {
            let key = self.key(i);
            let (state, model) = match (state, self.model.get(&key)) {
                (None, None) => continue,
                (Some(s), Some(m)) => (s, m),
                (s, m) => {
                    return Err(TestCaseError::fail(format!(
                        "agent {i}: system {s:?} vs model {m:?}"
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
                            draws: h.draws.iter().map(|d| (d.grant_id, d.micros)).collect(),
                        },
                    )
                })
                .collect();
            prop_assert_eq!(&holds, &model.holds, "holds {}", i);
            let refundable: Vec<RefundableView> = state
                .refundable
                .iter()
                .map(|r| {
                    let draws = r.draws.iter().map(|d| (d.grant_id, d.micros)).collect();
                    (r.seq, r.remaining_micros, draws)
                })
                .collect();
            let model_refundable: Vec<RefundableView> = model
                .debits
                .iter()
                .map(|(s, d)| (*s, d.remaining, d.draws.clone()))
                .collect();
            prop_assert_eq!(refundable, model_refundable, "refundable {}", i);
            prop_assert_eq!(u128::from(state.credited_total_micros), model.credited);
            prop_assert_eq!(u128::from(state.debited_total_micros), model.debited);
            prop_assert_eq!(u128::from(state.refunded_total_micros), model.refunded);
            prop_assert_eq!(u128::from(state.expired_total_micros), model.expired);
            prop_assert_eq!(
                u128::from(state.debited_promotional_total_micros),
                model.debited_promotional
            );
            let grants: BTreeMap<u64, ModelGrant> = state
                .grants
                .iter()
                .map(|(id, g)| {
                    let grant = ModelGrant {
                        amount: g.amount_micros,
                        remaining: g.remaining_micros,
                        terms: ModelTerms::of(&g.terms),
                    };
                    (*id, grant)
                })
                .collect();
            prop_assert_eq!(&grants, &model.grants, "grants {}", i);
            let grants_sum: i128 = model.grants.values().map(|g| i128::from(g.remaining)).sum();
            prop_assert_eq!(
                grants_sum,
                model.balance,
                "model balance = its grants {}",
                i
            );
            let (y, m) = model.period_now(self.now_ms);
            let period = PeriodKey::new(y as i32, m).expect("model period in range");
            prop_assert_eq!(
                u128::from(state.spent_in(period)),
                model.spent_at(self.now_ms),
                "spend of agent {} in {}",
                i,
                period
            );
            // Conservation per agent: balance + held = issued − spent − expired + refunded.
            let out = u128::from(state.balance_micros)
                + u128::from(state.held_micros)
                + u128::from(state.debited_total_micros)
                + u128::from(state.expired_total_micros);
            let inn =
                u128::from(state.credited_total_micros) + u128::from(state.refunded_total_micros);
            prop_assert_eq!(out, inn, "money conserved for agent {}", i);
            inflow += inn;
            outflow += out;
        }
        // Globally, against the sums of what the model approved.
        prop_assert_eq!(inflow, outflow);
        prop_assert_eq!(inflow, self.credited + self.refunded);
        let balances_and_held: u128 = states
            .iter()
            .flatten()
            .map(|s| u128::from(s.balance_micros) + u128::from(s.held_micros))
            .sum();
        prop_assert_eq!(
            balances_and_held + self.debited + self.expired,
            self.credited + self.refunded
        );
        Ok(())
    }
}
