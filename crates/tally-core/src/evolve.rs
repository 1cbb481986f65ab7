//! `evolve`: applies one journal event's recorded effect. It decides nothing (no plan, no
//! clock); an event that does not fit the state means a corrupted journal or a bug, and
//! is reported as an [`InvariantError`] rather than applied.

use std::collections::{BTreeMap, VecDeque};

use crate::error::InvariantError;
use crate::event::{Event, EventKind};
use crate::grant::{self, promotional, Draw, Grant, GrantMap, GrantTerms};
use crate::id::AgentId;
use crate::state::{AgentState, ApiKey, Hold, Refundable};
use crate::threshold::Crossing;
use crate::REFUNDABLE_DEBITS_MAX;

/// Applies `event` to the agent's state (`None` before its creation) and returns the new
/// state. The event's sequence number must be the next one.
pub fn evolve(
    state: Option<AgentState>,
    id: &AgentId,
    event: &Event,
) -> Result<AgentState, InvariantError> {
    match state {
        None => genesis(id, event),
        Some(mut state) => {
            apply(&mut state, event)?;
            Ok(state)
        }
    }
}

fn broken(id: &AgentId, seq: u64, reason: impl Into<String>) -> InvariantError {
    InvariantError {
        agent: id.to_string(),
        reason: format!("event {seq}: {}", reason.into()),
    }
}

fn genesis(id: &AgentId, event: &Event) -> Result<AgentState, InvariantError> {
    match &event.kind {
        EventKind::AgentCreated { plan, status } if event.seq == 1 => Ok(AgentState {
            id: id.clone(),
            plan: plan.clone(),
            status: *status,
            balance_micros: 0,
            held_micros: 0,
            holds: BTreeMap::new(),
            period: Default::default(),
            period_spent_micros: 0,
            credited_total_micros: 0,
            debited_total_micros: 0,
            refunded_total_micros: 0,
            refundable: VecDeque::new(),
            last_seq: 1,
            created_at_ms: event.at_ms,
            updated_at_ms: event.at_ms,
            api_keys: BTreeMap::new(),
            thresholds: None,
            grants: GrantMap::new(),
            expired_total_micros: 0,
            debited_promotional_total_micros: 0,
        }),
        _ => Err(broken(
            id,
            event.seq,
            "an agent's journal must start with agent_created at seq 1",
        )),
    }
}

/// Applies `event` in place. On error the state may be partly changed; callers discard it.
pub(crate) fn apply(s: &mut AgentState, event: &Event) -> Result<(), InvariantError> {
    apply_as(s, event, Split::Lenient)
}

/// How a spend or refund journaled without a promotional part is judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Split {
    /// Accepted whatever it drew: journals written before spends recorded their split
    /// (`EventKind::DebitedSplit` and its kin) replay as they were acknowledged.
    Lenient,
    /// Must have drawn no promotional money: what `decide` writes now (checked in debug
    /// builds on every decision, so release builds never use it).
    #[cfg_attr(not(debug_assertions), allow(dead_code))]
    Strict,
}

/// [`apply`], judging the recorded promotional part of spends and refunds by `split`.
pub(crate) fn apply_as(
    s: &mut AgentState,
    event: &Event,
    split: Split,
) -> Result<(), InvariantError> {
    let id = s.id.clone();
    let seq = event.seq;
    let err = |reason: &str| broken(&id, seq, reason);
    if Some(seq) != s.last_seq.checked_add(1) {
        return Err(err(&format!(
            "expected seq {}",
            s.last_seq.saturating_add(1)
        )));
    }
    let add = |a: u64, b: u64| a.checked_add(b).ok_or_else(|| err("overflow"));
    let sub = |a: u64, b: u64| a.checked_sub(b).ok_or_else(|| err("underflow"));
    match &event.kind {
        EventKind::AgentCreated { .. } => return Err(err("agent created twice")),
        EventKind::AgentUpdated { plan, status } => {
            s.plan = plan.clone();
            s.status = *status;
        }
        EventKind::Credited { amount_micros } => {
            issue(s, seq, *amount_micros, GrantTerms::PLAIN).map_err(&err)?;
        }
        EventKind::GrantIssued {
            amount_micros,
            terms,
        } => {
            issue(s, seq, *amount_micros, *terms).map_err(&err)?;
        }
        EventKind::GrantExpired {
            grant_id,
            expired_micros,
        } => {
            let g = s
                .grants
                .remove(grant_id)
                .ok_or_else(|| err("expiry of an unknown grant"))?;
            if g.remaining_micros != *expired_micros {
                return Err(err("expired amount differs from the grant"));
            }
            s.balance_micros = sub(s.balance_micros, *expired_micros)?;
            s.expired_total_micros = add(s.expired_total_micros, *expired_micros)?;
        }
        EventKind::Debited { .. } | EventKind::DebitedSplit { .. } => {
            let (amount_micros, period) = event.kind.spend().expect("a debit spends");
            let draws = draw(s, amount_micros).map_err(&err)?;
            let promotional = checked_promotional(&event.kind, &draws, split).map_err(&err)?;
            s.balance_micros = sub(s.balance_micros, amount_micros)?;
            s.debited_total_micros = add(s.debited_total_micros, amount_micros)?;
            s.debited_promotional_total_micros =
                add(s.debited_promotional_total_micros, promotional)?;
            spend(s, amount_micros, period).map_err(&err)?;
            remember_refundable(s, seq, amount_micros, period, draws);
        }
        EventKind::HoldPlaced {
            amount_micros,
            expires_at_ms,
        } => {
            let draws = draw(s, *amount_micros).map_err(&err)?;
            s.balance_micros = sub(s.balance_micros, *amount_micros)?;
            s.held_micros = add(s.held_micros, *amount_micros)?;
            s.holds.insert(
                seq,
                Hold {
                    amount_micros: *amount_micros,
                    expires_at_ms: *expires_at_ms,
                    draws,
                },
            );
        }
        EventKind::HoldCaptured { .. } | EventKind::HoldCapturedSplit { .. } => {
            let (hold_seq, captured_micros, released_micros, period) =
                event.kind.capture_of().expect("a capture");
            let hold = s
                .holds
                .remove(&hold_seq)
                .ok_or_else(|| err("capture of an unknown hold"))?;
            if add(captured_micros, released_micros)? != hold.amount_micros {
                return Err(err("capture + release differs from the hold"));
            }
            s.held_micros = sub(s.held_micros, hold.amount_micros)?;
            // The reservation is spent in draw order; the rest goes back to its grants.
            let (captured, released) = grant::split_front(&hold.draws, captured_micros);
            let promotional = checked_promotional(&event.kind, &captured, split).map_err(&err)?;
            grant::give_back(&mut s.grants, &released).map_err(&err)?;
            s.balance_micros = add(s.balance_micros, released_micros)?;
            s.debited_total_micros = add(s.debited_total_micros, captured_micros)?;
            s.debited_promotional_total_micros =
                add(s.debited_promotional_total_micros, promotional)?;
            if captured_micros > 0 {
                spend(s, captured_micros, period).map_err(&err)?;
                remember_refundable(s, seq, captured_micros, period, captured);
            }
        }
        EventKind::HoldVoided {
            hold_seq,
            released_micros,
        }
        | EventKind::HoldExpired {
            hold_seq,
            released_micros,
        } => {
            let hold = s
                .holds
                .remove(hold_seq)
                .ok_or_else(|| err("release of an unknown hold"))?;
            if hold.amount_micros != *released_micros {
                return Err(err("released amount differs from the hold"));
            }
            s.held_micros = sub(s.held_micros, hold.amount_micros)?;
            grant::give_back(&mut s.grants, &hold.draws).map_err(&err)?;
            s.balance_micros = add(s.balance_micros, hold.amount_micros)?;
        }
        EventKind::Refunded { .. } | EventKind::RefundedSplit { .. } => {
            let (debit_seq, amount_micros, debit_period) =
                event.kind.refund_of().expect("a refund");
            let i = s
                .refundable
                .binary_search_by_key(&debit_seq, |r| r.seq)
                .map_err(|_| err("refund of a debit outside the refund window"))?;
            let r = &mut s.refundable[i];
            r.remaining_micros = sub(r.remaining_micros, amount_micros)?;
            let (kept, returned) = grant::split_back(&r.draws, amount_micros);
            checked_promotional(&event.kind, &returned, split).map_err(&err)?;
            r.draws = kept;
            grant::give_back(&mut s.grants, &returned).map_err(&err)?;
            s.balance_micros = add(s.balance_micros, amount_micros)?;
            s.refunded_total_micros = add(s.refunded_total_micros, amount_micros)?;
            if s.period == debit_period {
                s.period_spent_micros = s.period_spent_micros.saturating_sub(amount_micros);
            }
        }
        EventKind::ApiKeyIssued {
            prefix,
            sha256,
            name,
        } => {
            if s.api_keys.len() >= crate::API_KEYS_PER_AGENT_MAX {
                return Err(err("too many API keys"));
            }
            let key = ApiKey {
                sha256: *sha256,
                name: name.clone(),
                created_at_ms: event.at_ms,
            };
            if s.api_keys.insert(prefix.clone(), key).is_some() {
                return Err(err("API key prefix issued twice"));
            }
        }
        EventKind::ApiKeyRevoked { prefix } => {
            if s.api_keys.remove(prefix).is_none() {
                return Err(err("revoke of an unknown API key"));
            }
        }
        EventKind::ThresholdCrossed {
            crossing: Crossing::GrantExpiring { grant_id, .. },
        } => {
            s.grants
                .get_mut(grant_id)
                .ok_or_else(|| err("expiry warning for an unknown grant"))?
                .expiry_warned = true;
        }
        EventKind::PaymentUnsettled { .. } | EventKind::ThresholdCrossed { .. } => {}
        EventKind::ThresholdsSet { thresholds } => s.thresholds = *thresholds,
    }
    if s.balance_micros != event.balance_after_micros || s.held_micros != event.held_after_micros {
        return Err(err(
            "balance or held after the event differs from the journal",
        ));
    }
    s.last_seq = seq;
    s.updated_at_ms = event.at_ms;
    debug_assert_eq!(s.check_invariants(), Ok(()));
    Ok(())
}

fn spend(
    s: &mut AgentState,
    amount_micros: u64,
    period: crate::PeriodKey,
) -> Result<(), &'static str> {
    // `decide` never spends in a period older than the agent's (`AgentState::period_at`);
    // journals written before that rule may, and replay as they were acknowledged.
    if period > s.period {
        s.period = period;
        s.period_spent_micros = 0;
    }
    if period == s.period {
        s.period_spent_micros = s
            .period_spent_micros
            .checked_add(amount_micros)
            .ok_or("period spend overflow")?;
    }
    Ok(())
}

/// Issues `amount_micros` on `terms` as grant `seq`, or into the live never-expiring
/// grant of the same terms.
fn issue(
    s: &mut AgentState,
    seq: u64,
    amount_micros: u64,
    terms: GrantTerms,
) -> Result<(), &'static str> {
    let id = grant::merge_target(&s.grants, terms).unwrap_or(seq);
    let g = s.grants.get_or_insert(
        id,
        Grant {
            amount_micros: 0,
            remaining_micros: 0,
            terms,
            expiry_warned: false,
        },
    );
    // Informational (issued to this grant); the money itself is checked below.
    g.amount_micros = g.amount_micros.saturating_add(amount_micros);
    g.remaining_micros = g
        .remaining_micros
        .checked_add(amount_micros)
        .ok_or("overflow")?;
    s.balance_micros = s
        .balance_micros
        .checked_add(amount_micros)
        .ok_or("overflow")?;
    s.credited_total_micros = s
        .credited_total_micros
        .checked_add(amount_micros)
        .ok_or("overflow")?;
    Ok(())
}

/// Checks that the promotional part an event records is what its draws took or returned
/// (the journal's split by category, for usage reports, must be the one the rules made),
/// and returns what the draws hold.
fn checked_promotional(
    kind: &EventKind,
    draws: &[Draw],
    split: Split,
) -> Result<u64, &'static str> {
    let recorded = kind.promotional_micros();
    let drawn = promotional(draws);
    if recorded == drawn || (recorded == 0 && split == Split::Lenient) {
        Ok(drawn)
    } else {
        Err("promotional part differs from the grants drawn")
    }
}

/// Takes `amount_micros` from the grants in draw order (see [`crate::grant`]).
fn draw(s: &mut AgentState, amount_micros: u64) -> Result<Vec<Draw>, &'static str> {
    let draws =
        grant::plan_draws(&s.grants, amount_micros).ok_or("spend exceeds the live grants")?;
    grant::take(&mut s.grants, &draws)?;
    Ok(draws)
}

fn remember_refundable(
    s: &mut AgentState,
    seq: u64,
    amount_micros: u64,
    period: crate::PeriodKey,
    draws: Vec<Draw>,
) {
    if s.refundable.len() == REFUNDABLE_DEBITS_MAX {
        s.refundable.pop_front();
    }
    grant::reserve_one!(s.refundable);
    let mut draws = draws;
    draws.shrink_to_fit();
    s.refundable.push_back(Refundable {
        seq,
        remaining_micros: amount_micros,
        period,
        draws,
    });
}
