//! Threshold notifications: the points at which a billing stack wants to hear about an
//! agent (its balance ran low, its spend passed a share of the monthly cap). They are
//! decided here, with the change that crossed them, and journaled in the same write as a
//! [`crate::EventKind::ThresholdCrossed`] event: the journal is the outbox, so a crossing
//! is neither lost nor repeated by a crash, and a webhook sender only has to read it.

use serde::{Deserialize, Serialize};

use crate::error::ValidationError;
use crate::event::{Event, EventKind};
use crate::grant::Grant;
use crate::period::PeriodKey;
use crate::plan::Plan;
use crate::state::AgentState;
use crate::TimestampMs;

/// What to be told about, per plan (and replaced as a whole per agent).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Thresholds {
    /// Tell when the spendable balance falls below this. Re-armed once it is back at or
    /// above it, so each fall is one notification.
    pub balance_below_micros: Option<u64>,
    /// Tell when the period's spend reaches this share of the plan's monthly cap (1–100).
    /// Once per period: spend only grows within a period, and a refund that lowers it
    /// again re-arms it.
    pub cap_spend_percent: Option<u8>,
    /// Tell when a credit grant with money left is this close to its expiry (once per
    /// grant; at the first command or sweep of the agent at or past `expires_at − this`).
    pub grant_expiring_within_ms: Option<u64>,
}

/// Longest `grant_expiring_within_ms`: a year.
pub const GRANT_EXPIRING_WITHIN_MS_MAX: u64 = 366 * 86_400_000;

impl Thresholds {
    pub fn validate(&self) -> Result<(), ValidationError> {
        if let Some(pct) = self.cap_spend_percent {
            if !(1..=100).contains(&pct) {
                return Err(ValidationError::Invalid {
                    field: "cap_spend_percent",
                    reason: "must be 1..=100".into(),
                });
            }
        }
        if let Some(ms) = self.grant_expiring_within_ms {
            if !(1..=GRANT_EXPIRING_WITHIN_MS_MAX).contains(&ms) {
                return Err(ValidationError::Invalid {
                    field: "grant_expiring_within_ms",
                    reason: format!("must be 1..={GRANT_EXPIRING_WITHIN_MS_MAX}"),
                });
            }
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.balance_below_micros.is_none()
            && self.cap_spend_percent.is_none()
            && self.grant_expiring_within_ms.is_none()
    }

    /// When grant `g` is due for its expiry warning under these thresholds, if ever.
    fn warning_at_ms(&self, g: &Grant) -> Option<TimestampMs> {
        let within = self.grant_expiring_within_ms?;
        let expires_at_ms = g.terms.expires_at_ms?;
        (!g.expiry_warned && g.remaining_micros > 0).then(|| expires_at_ms.saturating_sub(within))
    }
}

/// One threshold crossed by one change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Crossing {
    /// The balance went from at or above `threshold_micros` to below it.
    BalanceBelow { threshold_micros: u64 },
    /// The spend in `period` went from below `threshold_micros` (`percent` of
    /// `cap_micros`) to at or above it; `spent_micros` is the spend after the change.
    CapSpend {
        percent: u8,
        cap_micros: u64,
        threshold_micros: u64,
        spent_micros: u64,
        period: PeriodKey,
    },
    /// Grant `grant_id` (with `remaining_micros` left) expires at `expires_at_ms`, within
    /// `within_ms` of the change or sweep that noticed.
    GrantExpiring {
        grant_id: u64,
        expires_at_ms: TimestampMs,
        remaining_micros: u64,
        within_ms: u64,
    },
}

impl Crossing {
    /// The webhook `type` of this crossing.
    pub fn name(&self) -> &'static str {
        match self {
            Crossing::BalanceBelow { .. } => "balance.low",
            Crossing::CapSpend { .. } => "cap.threshold_reached",
            Crossing::GrantExpiring { .. } => "grant.expiring",
        }
    }
}

/// The thresholds that apply to an agent: its own if it has them, else its plan's.
pub fn effective<'a>(s: &'a AgentState, plan: &'a Plan) -> &'a Thresholds {
    s.thresholds.as_ref().unwrap_or(&plan.thresholds)
}

/// The earliest moment an agent with no command has a notification due (a grant's
/// expiry warning), for the sweep to know when to come by.
pub fn next_warning_ms(s: &AgentState, plan: &Plan) -> Option<TimestampMs> {
    let thresholds = effective(s, plan);
    s.grants
        .values()
        .filter_map(|g| thresholds.warning_at_ms(g))
        .min()
}

/// The thresholds that `events` (one command's, applied in order to `before`, maybe none)
/// cross at `now_ms`.
pub(crate) fn crossings(
    before: &AgentState,
    plan: &Plan,
    events: &[Event],
    now_ms: TimestampMs,
) -> Vec<Crossing> {
    let mut out = Vec::new();
    // Judged on the agent's thresholds after the change, so that setting them is not
    // itself a crossing (a set-thresholds command moves no money).
    let thresholds = events
        .iter()
        .rev()
        .find_map(|e| match &e.kind {
            EventKind::ThresholdsSet { thresholds } => Some(thresholds.as_ref()),
            _ => None,
        })
        .unwrap_or(before.thresholds.as_ref())
        .unwrap_or(&plan.thresholds);
    if thresholds.grant_expiring_within_ms.is_some() {
        expiry_warnings(before, thresholds, events, now_ms, &mut out);
    }
    let Some(last) = events.last() else {
        return out;
    };
    if let Some(threshold_micros) = thresholds.balance_below_micros {
        if before.balance_micros >= threshold_micros && last.balance_after_micros < threshold_micros
        {
            out.push(Crossing::BalanceBelow { threshold_micros });
        }
    }
    if let (Some(percent), Some(cap_micros)) =
        (thresholds.cap_spend_percent, plan.monthly_cap_micros)
    {
        // cap × pct / 100 fits back in u64 since pct ≤ 100.
        let threshold_micros = (u128::from(cap_micros) * u128::from(percent) / 100) as u64;
        // One command spends in one period (the agent's current one at its `now`).
        if let Some(period) = events.iter().find_map(|e| e.kind.spend().map(|(_, p)| p)) {
            let spent_before = before.spent_in(period);
            let spent_after = events
                .iter()
                .filter_map(|e| e.kind.spend())
                .filter(|(_, p)| *p == period)
                .fold(u128::from(spent_before), |acc, (amount, _)| {
                    acc + u128::from(amount)
                });
            if spent_before < threshold_micros && spent_after >= u128::from(threshold_micros) {
                out.push(Crossing::CapSpend {
                    percent,
                    cap_micros,
                    threshold_micros,
                    spent_micros: u64::try_from(spent_after).unwrap_or(u64::MAX),
                    period,
                });
            }
        }
    }
    out
}

/// Grants (after `events`) whose warning is due at `now_ms` and that still have money to
/// lose; an expired one is gone already, so it is not warned about.
fn expiry_warnings(
    before: &AgentState,
    thresholds: &Thresholds,
    events: &[Event],
    now_ms: TimestampMs,
    out: &mut Vec<Crossing>,
) {
    // Only a grant whose warning is due can be warned about. After the events, that is one
    // due before them (still there or not), or one they issued or gave money back to (a
    // spent-out grant comes back unwarned): debits, holds and expiries only take money
    // out. Without either, the state after need not be built (a clone per command).
    let due_before = before
        .grants
        .values()
        .any(|g| thresholds.warning_at_ms(g).is_some_and(|at| at <= now_ms));
    let adds_grant_money = events.iter().any(|e| {
        matches!(e.kind, EventKind::GrantIssued { .. })
            || e.kind.closed_hold().is_some()
            || e.kind.refund_of().is_some()
    });
    if !due_before && !adds_grant_money {
        #[cfg(debug_assertions)]
        {
            let mut slow = Vec::new();
            warnings_after(before, thresholds, events, now_ms, &mut slow);
            assert_eq!(slow, [], "the shortcut skipped a due expiry warning");
        }
        return;
    }
    warnings_after(before, thresholds, events, now_ms, out);
}

/// [`expiry_warnings`] the long way: builds the state after `events`.
fn warnings_after(
    before: &AgentState,
    thresholds: &Thresholds,
    events: &[Event],
    now_ms: TimestampMs,
    out: &mut Vec<Crossing>,
) {
    let after;
    let state = if events.is_empty() {
        before
    } else {
        let mut next = before.clone();
        for e in events {
            if crate::evolve::apply(&mut next, e).is_err() {
                // `decide` checks its events against `evolve` in debug builds; a release
                // build that gets here skips the warning rather than invent one.
                return;
            }
        }
        after = next;
        &after
    };
    let within_ms = thresholds.grant_expiring_within_ms.unwrap_or(0);
    for (id, g) in &state.grants {
        let Some(expires_at_ms) = g.terms.expires_at_ms else {
            continue;
        };
        if thresholds
            .warning_at_ms(g)
            .is_some_and(|at| at <= now_ms && now_ms < expires_at_ms)
        {
            out.push(Crossing::GrantExpiring {
                grant_id: *id,
                expires_at_ms,
                remaining_micros: g.remaining_micros,
                within_ms,
            });
        }
    }
}
