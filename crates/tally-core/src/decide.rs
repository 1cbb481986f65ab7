//! `decide`: every rule of money. Reads an agent's state, a command, the plans and `now`,
//! and returns the outcome and the events of the change. A denial writes no event.
//!
//! Order for a debit or hold: validation → suspended → rate limit → monthly cap (hard,
//! and the soft threshold for low priority) → funds → approved. A request that passes the
//! rate limit uses its cell even if it is then denied, so an agent looping on 402 soon
//! gets 429s.

use std::cell::OnceCell;

use crate::command::{Command, CommandKind, Priority};
use crate::error::CommandError;
use crate::event::{Event, EventKind};
use crate::grant::{self, Draw, GrantTerms};
use crate::money::{add, sub};
use crate::outcome::{Denial, Outcome, Receipt};
use crate::plan::{Plan, PlanBook};
use crate::rate::{RateState, RateStatus};
use crate::state::{AgentState, Status};
use crate::threshold;
use crate::{TimestampMs, API_KEYS_PER_AGENT_MAX, GRANTS_PER_AGENT_MAX, OPEN_HOLDS_MAX};

/// The result of deciding one command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub outcome: Outcome,
    /// The journal entries to write, in order; empty for denials and checks.
    pub events: Vec<Event>,
    /// The tightest rate-limit bucket after this request, for the `RateLimit` header.
    pub rate: Option<RateStatus>,
}

impl Decision {
    fn denied(denial: Denial) -> Self {
        Self {
            outcome: Outcome::Denied(denial),
            events: Vec::new(),
            rate: None,
        }
    }
}

/// Decides `cmd` against the agent's current state (`None` if it does not exist).
///
/// `rate` is the agent's volatile limiter state and is updated when a spend passes the
/// limiter. `Err` means the command is malformed for this state; nothing changed.
pub fn decide(
    state: Option<&AgentState>,
    rate: &mut RateState,
    cmd: &Command,
    plans: &PlanBook,
    now_ms: TimestampMs,
) -> Result<Decision, CommandError> {
    let stamp = Stamp::new(cmd, now_ms);
    if let CommandKind::CreateAgent { plan, status } = &cmd.kind {
        if state.is_some() {
            return Err(CommandError::AgentExists);
        }
        if plans.get(plan).is_none() {
            return Err(CommandError::UnknownPlan(plan.to_string()));
        }
        let event = stamp.event(
            1,
            EventKind::AgentCreated {
                plan: plan.clone(),
                status: *status,
            },
            0,
            0,
        );
        return Ok(approved(vec![event], 0, 0, now_ms, None));
    }
    let s = state.ok_or(CommandError::UnknownAgent)?;
    let plan = plans
        .get(&s.plan)
        .ok_or_else(|| CommandError::UnknownPlan(s.plan.to_string()))?;
    // Grants due now leave the balance before a command that moves money runs, so no
    // spend ever draws from an expired grant: their `GrantExpired` entries come first in
    // the command's journal run. A denial or a check journals nothing, expiries included
    // (the sweep or the next write journals them).
    let expiries = if moves_money(&cmd.kind) {
        expire_due(s, &stamp, now_ms)?
    } else {
        Vec::new()
    };
    let after_expiries;
    let s = if expiries.is_empty() {
        s
    } else {
        let mut next = s.clone();
        for e in &expiries {
            crate::evolve::apply(&mut next, e)
                .expect("the expiry of a due grant applies to the state it was decided on");
        }
        after_expiries = next;
        &after_expiries
    };
    let next_seq = s.last_seq + 1;
    let decision = match &cmd.kind {
        CommandKind::CreateAgent { .. } => unreachable!("handled above"),
        CommandKind::UpdateAgent {
            plan: new_plan,
            status,
        } => {
            let new_plan = match new_plan {
                Some(p) if plans.get(p).is_none() => {
                    return Err(CommandError::UnknownPlan(p.to_string()))
                }
                Some(p) => p.clone(),
                None => s.plan.clone(),
            };
            let kind = EventKind::AgentUpdated {
                plan: new_plan,
                status: status.unwrap_or(s.status),
            };
            let event = stamp.event(next_seq, kind, s.balance_micros, s.held_micros);
            approved(vec![event], s.balance_micros, s.held_micros, now_ms, None)
        }
        CommandKind::Credit { amount_micros } => {
            let amount = nonzero(*amount_micros)?;
            room_for_grant(s, GrantTerms::PLAIN)?;
            add(s.credited_total_micros, amount)?;
            let balance = add(s.balance_micros, amount)?;
            let event = stamp.event(
                next_seq,
                EventKind::Credited {
                    amount_micros: amount,
                },
                balance,
                s.held_micros,
            );
            approved(vec![event], balance, s.held_micros, now_ms, None)
        }
        CommandKind::IssueGrant {
            amount_micros,
            terms,
        } => {
            let amount = nonzero(*amount_micros)?;
            if let Some(expires_at_ms) = terms.expires_at_ms.filter(|at| *at <= now_ms) {
                return Err(CommandError::GrantExpiryNotInFuture {
                    expires_at_ms,
                    now_ms,
                });
            }
            room_for_grant(s, *terms)?;
            add(s.credited_total_micros, amount)?;
            let balance = add(s.balance_micros, amount)?;
            let kind = EventKind::GrantIssued {
                amount_micros: amount,
                terms: *terms,
            };
            let event = stamp.event(next_seq, kind, balance, s.held_micros);
            approved(vec![event], balance, s.held_micros, now_ms, None)
        }
        CommandKind::Debit { amount_micros } => {
            let amount = nonzero(*amount_micros)?;
            if let Err(denial) =
                spend_gate(s, plan, rate, amount, cmd.priority, now_ms, Gate::Acquire)
            {
                return Ok(Decision::denied(denial));
            }
            // Overflows are rejected before the cell is taken: a rejection changes nothing.
            let period = s.period_at(now_ms, plan.anchor_day);
            add(s.debited_total_micros, amount)?;
            add(s.spent_in(period), amount)?;
            let balance = sub(s.balance_micros, amount)?;
            let status = admit(rate, plan, now_ms);
            let promotional = grant::promotional_part(&s.grants, amount);
            let kind = EventKind::debit(amount, period, promotional);
            let event = stamp.event(next_seq, kind, balance, s.held_micros);
            approved(vec![event], balance, s.held_micros, now_ms, status)
        }
        CommandKind::Check { amount_micros } => {
            let amount = nonzero(*amount_micros)?;
            match spend_gate(s, plan, rate, amount, cmd.priority, now_ms, Gate::Peek) {
                Ok(status) => Decision {
                    outcome: Outcome::WouldApprove {
                        amount_micros: amount,
                        balance_micros: s.balance_micros,
                    },
                    events: Vec::new(),
                    rate: status,
                },
                Err(denial) => Decision::denied(denial),
            }
        }
        CommandKind::Hold {
            amount_micros,
            ttl_ms,
        } => {
            let amount = nonzero(*amount_micros)?;
            if *ttl_ms == 0 || *ttl_ms > plan.hold_ttl_max_ms {
                return Err(CommandError::InvalidTtl {
                    ttl_ms: *ttl_ms,
                    max_ms: plan.hold_ttl_max_ms,
                });
            }
            if s.holds.len() >= OPEN_HOLDS_MAX {
                return Err(CommandError::TooManyHolds {
                    max: OPEN_HOLDS_MAX,
                });
            }
            let expires_at_ms = add(now_ms, *ttl_ms)?;
            if let Err(denial) =
                spend_gate(s, plan, rate, amount, cmd.priority, now_ms, Gate::Acquire)
            {
                return Ok(Decision::denied(denial));
            }
            let balance = sub(s.balance_micros, amount)?;
            let held = add(s.held_micros, amount)?;
            let status = admit(rate, plan, now_ms);
            let kind = EventKind::HoldPlaced {
                amount_micros: amount,
                expires_at_ms,
            };
            let event = stamp.event(next_seq, kind, balance, held);
            approved(vec![event], balance, held, now_ms, status)
        }
        CommandKind::Capture {
            hold_seq,
            amount_micros,
        } => {
            let hold = s
                .holds
                .get(hold_seq)
                .ok_or(CommandError::UnknownHold(*hold_seq))?;
            if now_ms >= hold.expires_at_ms {
                return Err(CommandError::HoldExpired {
                    hold_seq: *hold_seq,
                    expires_at_ms: hold.expires_at_ms,
                });
            }
            if *amount_micros > hold.amount_micros {
                return Err(CommandError::CaptureExceedsHold {
                    amount_micros: *amount_micros,
                    held_micros: hold.amount_micros,
                });
            }
            let period = s.period_at(now_ms, plan.anchor_day);
            let released = hold.amount_micros - amount_micros;
            add(s.debited_total_micros, *amount_micros)?;
            add(s.spent_in(period), *amount_micros)?;
            let balance = add(s.balance_micros, released)?;
            let held = sub(s.held_micros, hold.amount_micros)?;
            let (captured, returned) = grant::split_front(&hold.draws, *amount_micros);
            let promotional = grant::promotional(&captured);
            let kind = EventKind::capture(*hold_seq, *amount_micros, released, period, promotional);
            let mut events = vec![stamp.event(next_seq, kind, balance, held)];
            let balance = lapse(s, &returned, &stamp, &mut events, balance, held, now_ms)?;
            approved(events, balance, held, now_ms, None)
        }
        CommandKind::Void { hold_seq } => {
            let hold = s
                .holds
                .get(hold_seq)
                .ok_or(CommandError::UnknownHold(*hold_seq))?;
            let balance = add(s.balance_micros, hold.amount_micros)?;
            let held = sub(s.held_micros, hold.amount_micros)?;
            let kind = EventKind::HoldVoided {
                hold_seq: *hold_seq,
                released_micros: hold.amount_micros,
            };
            let mut events = vec![stamp.event(next_seq, kind, balance, held)];
            let balance = lapse(s, &hold.draws, &stamp, &mut events, balance, held, now_ms)?;
            approved(events, balance, held, now_ms, None)
        }
        CommandKind::ExpireHolds => {
            let (mut balance, mut held) = (s.balance_micros, s.held_micros);
            let mut events = Vec::new();
            let mut returned = Vec::new();
            for (hold_seq, hold) in s.holds.iter().filter(|(_, h)| h.expires_at_ms <= now_ms) {
                balance = add(balance, hold.amount_micros)?;
                held = sub(held, hold.amount_micros)?;
                let kind = EventKind::HoldExpired {
                    hold_seq: *hold_seq,
                    released_micros: hold.amount_micros,
                };
                events.push(stamp.event(next_seq + events.len() as u64, kind, balance, held));
                returned.extend_from_slice(&hold.draws);
            }
            let balance = lapse(s, &returned, &stamp, &mut events, balance, held, now_ms)?;
            approved(events, balance, held, now_ms, None)
        }
        CommandKind::Refund {
            debit_seq,
            amount_micros,
        } => {
            let amount = nonzero(*amount_micros)?;
            let debit = s
                .refundable(*debit_seq)
                .ok_or(CommandError::UnknownDebit(*debit_seq))?;
            if amount > debit.remaining_micros {
                return Err(CommandError::RefundExceedsDebit {
                    amount_micros: amount,
                    refundable_micros: debit.remaining_micros,
                });
            }
            add(s.refunded_total_micros, amount)?;
            let balance = add(s.balance_micros, amount)?;
            let (_, returned) = grant::split_back(&debit.draws, amount);
            let promotional = grant::promotional(&returned);
            let kind = EventKind::refund(*debit_seq, amount, debit.period, promotional);
            let held = s.held_micros;
            let mut events = vec![stamp.event(next_seq, kind, balance, held)];
            let balance = lapse(s, &returned, &stamp, &mut events, balance, held, now_ms)?;
            approved(events, balance, held, now_ms, None)
        }
        CommandKind::IssueApiKey {
            prefix,
            sha256,
            name,
        } => {
            if s.api_keys.len() >= API_KEYS_PER_AGENT_MAX {
                return Err(CommandError::TooManyApiKeys {
                    max: API_KEYS_PER_AGENT_MAX,
                });
            }
            if s.api_keys.contains_key(prefix) {
                return Err(CommandError::ApiKeyExists(prefix.clone()));
            }
            let kind = EventKind::ApiKeyIssued {
                prefix: prefix.clone(),
                sha256: *sha256,
                name: name.clone(),
            };
            let event = stamp.event(next_seq, kind, s.balance_micros, s.held_micros);
            approved(vec![event], s.balance_micros, s.held_micros, now_ms, None)
        }
        CommandKind::RevokeApiKey { prefix } => {
            if !s.api_keys.contains_key(prefix) {
                return Err(CommandError::UnknownApiKey(prefix.clone()));
            }
            let kind = EventKind::ApiKeyRevoked {
                prefix: prefix.clone(),
            };
            let event = stamp.event(next_seq, kind, s.balance_micros, s.held_micros);
            approved(vec![event], s.balance_micros, s.held_micros, now_ms, None)
        }
        // A fact about money that did not arrive: recorded whatever the agent's status,
        // rate limits or cap say, since the call it paid for already happened.
        CommandKind::RecordUnsettledPayment { amount_micros } => {
            let kind = EventKind::PaymentUnsettled {
                amount_micros: nonzero(*amount_micros)?,
            };
            let event = stamp.event(next_seq, kind, s.balance_micros, s.held_micros);
            approved(vec![event], s.balance_micros, s.held_micros, now_ms, None)
        }
        CommandKind::SetThresholds { thresholds } => {
            if let Some(t) = thresholds {
                t.validate()?;
            }
            let kind = EventKind::ThresholdsSet {
                thresholds: *thresholds,
            };
            let event = stamp.event(next_seq, kind, s.balance_micros, s.held_micros);
            approved(vec![event], s.balance_micros, s.held_micros, now_ms, None)
        }
    };
    let decision = with_expiries(expiries, decision, now_ms);
    // Judged from the state before the expiries too: an expiry can cross a threshold.
    let decision = with_crossings(
        state.expect("checked above"),
        plan,
        &stamp,
        decision,
        now_ms,
    );
    #[cfg(debug_assertions)]
    check_against_evolve(state.expect("checked above"), &decision.events);
    Ok(decision)
}

/// Appends a [`EventKind::ThresholdCrossed`] event for each threshold the change crossed,
/// so that the notification is journaled in the same write as its cause.
fn with_crossings(
    s: &AgentState,
    plan: &Plan,
    stamp: &Stamp<'_>,
    mut decision: Decision,
    now_ms: TimestampMs,
) -> Decision {
    // Denials and checks journal nothing; an approved command with no events (a sweep
    // with nothing to release) may still have a grant's expiry warning to journal.
    if !matches!(decision.outcome, Outcome::Approved(_)) {
        return decision;
    }
    let (mut seq, balance, held) = match decision.events.last() {
        Some(last) => (last.seq, last.balance_after_micros, last.held_after_micros),
        None => (s.last_seq, s.balance_micros, s.held_micros),
    };
    let crossings = threshold::crossings(s, plan, &decision.events, now_ms);
    if crossings.is_empty() {
        return decision;
    }
    for crossing in crossings {
        seq += 1;
        let kind = EventKind::ThresholdCrossed { crossing };
        decision.events.push(stamp.event(seq, kind, balance, held));
    }
    let rate = decision.rate;
    approved(decision.events, balance, held, now_ms, rate)
}

/// Commands before which due grants are expired (a check looks at the balance without
/// them, and journals nothing).
fn moves_money(kind: &CommandKind) -> bool {
    matches!(
        kind,
        CommandKind::Credit { .. }
            | CommandKind::IssueGrant { .. }
            | CommandKind::Debit { .. }
            | CommandKind::Check { .. }
            | CommandKind::Hold { .. }
            | CommandKind::Capture { .. }
            | CommandKind::Void { .. }
            | CommandKind::ExpireHolds
            | CommandKind::Refund { .. }
    )
}

/// A `GrantExpired` for each grant due at `now_ms`, in id order.
fn expire_due(
    s: &AgentState,
    stamp: &Stamp<'_>,
    now_ms: TimestampMs,
) -> Result<Vec<Event>, CommandError> {
    let mut events = Vec::new();
    let (mut balance, mut expired) = (s.balance_micros, s.expired_total_micros);
    for (id, g) in s.grants.iter().filter(|(_, g)| g.terms.is_due(now_ms)) {
        balance = sub(balance, g.remaining_micros)?;
        expired = add(expired, g.remaining_micros)?;
        let kind = EventKind::GrantExpired {
            grant_id: *id,
            expired_micros: g.remaining_micros,
        };
        let seq = s.last_seq + 1 + events.len() as u64;
        events.push(stamp.event(seq, kind, balance, s.held_micros));
    }
    Ok(events)
}

/// Money that `returned` gives back to grants that expired meanwhile lapses: appends a
/// `GrantExpired` per such grant (after the events that returned it) and returns the
/// balance after them. `balance` is the balance after the return.
fn lapse(
    s: &AgentState,
    returned: &[Draw],
    stamp: &Stamp<'_>,
    events: &mut Vec<Event>,
    mut balance: u64,
    held: u64,
    now_ms: TimestampMs,
) -> Result<u64, CommandError> {
    let mut expired = s.expired_total_micros;
    for (grant_id, micros) in grant::lapsing(&s.grants, returned, now_ms) {
        balance = sub(balance, micros)?;
        expired = add(expired, micros)?;
        let kind = EventKind::GrantExpired {
            grant_id,
            expired_micros: micros,
        };
        let seq = s.last_seq + 1 + events.len() as u64;
        events.push(stamp.event(seq, kind, balance, held));
    }
    Ok(balance)
}

/// One more grant on `terms` fits, or merges into a live one.
fn room_for_grant(s: &AgentState, terms: GrantTerms) -> Result<(), CommandError> {
    if grant::merge_target(&s.grants, terms).is_none() && s.grants.len() >= GRANTS_PER_AGENT_MAX {
        return Err(CommandError::TooManyGrants {
            max: GRANTS_PER_AGENT_MAX,
        });
    }
    Ok(())
}

/// Puts the expiries of due grants in front of an approved command's events.
fn with_expiries(expiries: Vec<Event>, decision: Decision, now_ms: TimestampMs) -> Decision {
    let Outcome::Approved(receipt) = &decision.outcome else {
        return decision;
    };
    if expiries.is_empty() {
        return decision;
    }
    let mut events = expiries;
    events.extend(decision.events);
    Decision {
        outcome: Outcome::Approved(Receipt::from_events(
            &events,
            receipt.balance_after_micros,
            receipt.held_after_micros,
            now_ms,
        )),
        events,
        rate: decision.rate,
    }
}

/// In debug builds: the events just decided must evolve the state without complaint.
#[cfg(debug_assertions)]
fn check_against_evolve(s: &AgentState, events: &[Event]) {
    if events.is_empty() {
        return;
    }
    let mut next = s.clone();
    for e in events {
        if let Err(e) = crate::evolve::apply_as(&mut next, e, crate::evolve::Split::Strict) {
            panic!("decide produced an event evolve rejects: {e}");
        }
    }
}

fn nonzero(amount_micros: u64) -> Result<u64, CommandError> {
    if amount_micros == 0 {
        Err(CommandError::ZeroAmount)
    } else {
        Ok(amount_micros)
    }
}

fn approved(
    events: Vec<Event>,
    balance_micros: u64,
    held_micros: u64,
    now_ms: TimestampMs,
    rate: Option<RateStatus>,
) -> Decision {
    let receipt = Receipt::from_events(&events, balance_micros, held_micros, now_ms);
    Decision {
        outcome: Outcome::Approved(receipt),
        events,
        rate,
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Gate {
    /// A real spend: take a rate-limit cell.
    Acquire,
    /// A check: look only.
    Peek,
}

/// Suspended → rate limit → monthly cap → funds, for a spend of `amount` micros.
fn spend_gate(
    s: &AgentState,
    plan: &Plan,
    rate: &mut RateState,
    amount: u64,
    priority: Priority,
    now_ms: TimestampMs,
    gate: Gate,
) -> Result<Option<RateStatus>, Denial> {
    if s.status == Status::Suspended {
        return Err(Denial::Suspended);
    }
    // Look first; the cell is taken by `admit` once the spend is approved, or below when
    // the cap or funds deny it (a request that passed the limiter uses its cell).
    let status = rate.peek(plan, now_ms).map_err(|l| Denial::RateLimited {
        bucket: l.status.bucket,
        quota: l.status.quota,
        window_ms: l.status.window_ms,
        retry_after_ms: l.retry_after_ms,
    })?;
    match cap_or_funds(s, plan, amount, priority, now_ms) {
        Some(denial) => {
            if gate == Gate::Acquire {
                admit(rate, plan, now_ms);
            }
            Err(denial)
        }
        None => Ok(status),
    }
}

/// Takes the rate-limit cell of a request the limiter admitted at this same instant.
fn admit(rate: &mut RateState, plan: &Plan, now_ms: TimestampMs) -> Option<RateStatus> {
    rate.acquire(plan, now_ms)
        .expect("peek admitted this request at the same instant")
}

/// The monthly cap (hard, and the soft threshold for low priority), then funds.
fn cap_or_funds(
    s: &AgentState,
    plan: &Plan,
    amount: u64,
    priority: Priority,
    now_ms: TimestampMs,
) -> Option<Denial> {
    if let Some(cap_micros) = plan.monthly_cap_micros {
        let period = s.period_at(now_ms, plan.anchor_day);
        let spent = s.spent_in(period);
        // Open holds are money already promised, so they count against the cap.
        let committed = u128::from(spent) + u128::from(s.held_micros) + u128::from(amount);
        let soft_limit = match priority {
            Priority::Low => plan.soft_limit_micros(),
            Priority::Normal | Priority::Critical => None,
        };
        let refused_by = if committed > u128::from(cap_micros) {
            Some((cap_micros, false))
        } else {
            soft_limit
                .filter(|l| committed > u128::from(*l))
                .map(|l| (l, true))
        };
        if let Some((limit_micros, soft)) = refused_by {
            return Some(Denial::MonthlyCapReached {
                cap_micros,
                limit_micros,
                spent_micros: spent,
                held_micros: s.held_micros,
                resets_at_ms: period.end_ms(plan.anchor_day),
                soft,
            });
        }
    }
    (amount > s.balance_micros).then(|| Denial::InsufficientFunds {
        required_micros: amount,
        available_micros: s.balance_micros,
        balance_micros: s.balance_micros,
        held_micros: s.held_micros,
        retry_after_ms: wait_for_holds(s, amount, now_ms),
    })
}

/// How long until open holds expiring on their own free enough for `amount`, if ever.
///
/// Money counts only while its grant lives: a grant that expires meanwhile takes its rest
/// out of the balance, and what a hold gives back to a grant expired by then lapses. So
/// the balance is followed through time: at each hold's expiry its draws come back (those
/// of grants still alive), at each grant's expiry its money (and what came back to it)
/// goes, and the first hold expiry at which enough is there is the answer.
fn wait_for_holds(s: &AgentState, amount: u64, now_ms: TimestampMs) -> Option<u64> {
    if s.holds.is_empty() {
        return None;
    }
    // (when, order at that instant: 0 money gone, 1 money back, 2 look; micros). A hold
    // past its expiry but not yet released (no sweep since) is released now.
    let mut steps: Vec<(TimestampMs, u8, u64)> = Vec::new();
    for g in s.grants.values() {
        if let Some(at) = g.terms.expires_at_ms {
            steps.push((at.max(now_ms), 0, g.remaining_micros));
        }
    }
    for h in s.holds.values() {
        let released_at = h.expires_at_ms.max(now_ms);
        steps.push((released_at, 2, 0));
        for d in &h.draws {
            match d.terms.expires_at_ms {
                // Returned to a grant already gone when the hold is released: lapses.
                Some(at) if at <= released_at => {}
                Some(at) => {
                    steps.push((released_at, 1, d.micros));
                    steps.push((at, 0, d.micros));
                }
                None => steps.push((released_at, 1, d.micros)),
            }
        }
    }
    steps.sort_unstable();
    // The balance counts every live grant; the ones due now expire ahead of the spend.
    let mut available: i128 = i128::from(s.balance_micros);
    for (at, order, micros) in steps {
        match order {
            0 => available -= i128::from(micros),
            1 => available += i128::from(micros),
            _ if available >= i128::from(amount) => return Some(at.saturating_sub(now_ms)),
            _ => {}
        }
    }
    None
}

/// The envelope every event of one command carries.
struct Stamp<'a> {
    cmd: &'a Command,
    /// Hashed on the first event only: denials and checks write nothing under the key,
    /// so they skip the SHA-256 (it was 3/4 of a keyed 402's cost).
    fingerprint: OnceCell<u128>,
    now_ms: TimestampMs,
}

impl<'a> Stamp<'a> {
    fn new(cmd: &'a Command, now_ms: TimestampMs) -> Self {
        Self {
            cmd,
            fingerprint: OnceCell::new(),
            now_ms,
        }
    }

    fn fingerprint(&self) -> u128 {
        *self.fingerprint.get_or_init(|| {
            if self.cmd.idempotency_key.is_some() {
                self.cmd.fingerprint()
            } else {
                0
            }
        })
    }

    fn event(
        &self,
        seq: u64,
        kind: EventKind,
        balance_after_micros: u64,
        held_after_micros: u64,
    ) -> Event {
        Event {
            seq,
            at_ms: self.now_ms,
            kind,
            balance_after_micros,
            held_after_micros,
            idempotency_key: self.cmd.idempotency_key.clone(),
            fingerprint: self.fingerprint(),
            task_type: self.cmd.task_type.clone(),
            metadata: self.cmd.metadata.clone(),
        }
    }
}
