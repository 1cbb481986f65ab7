//! Agent state: what the journal of one agent adds up to, and the invariants it keeps.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::error::InvariantError;
use crate::grant::{Draw, GrantMap};
use crate::id::{AgentId, PlanName};
use crate::period::{period_of, PeriodKey};
use crate::threshold::Thresholds;
use crate::TimestampMs;

/// Whether an agent may spend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Active = 0,
    Suspended = 1,
}

/// Money authorized for a call whose cost is known only afterwards.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    pub amount_micros: u64,
    pub expires_at_ms: TimestampMs,
    /// What it reserved from which grants, in draw order; sums to `amount_micros`.
    pub draws: Vec<Draw>,
}

/// A recent debit or capture that can still be refunded, and how much of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refundable {
    pub seq: u64,
    pub remaining_micros: u64,
    /// The period the money was spent in; a refund in that period lowers its spend.
    pub period: PeriodKey,
    /// The grants the remaining money came from, in draw order; sums to
    /// `remaining_micros`. A refund returns money from the last draw backwards.
    pub draws: Vec<Draw>,
}

/// An agent's API key: the SHA-256 of the whole key (never the key), under its public
/// prefix in [`AgentState::api_keys`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKey {
    pub sha256: [u8; 32],
    pub name: Option<String>,
    pub created_at_ms: TimestampMs,
}

/// The ledger state of one agent. Built only by [`crate::evolve`] from journal events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentState {
    pub id: AgentId,
    pub plan: PlanName,
    pub status: Status,
    /// Spendable now: credits − debits − captures + refunds − expired − held; the sum of
    /// the live grants' remaining money.
    pub balance_micros: u64,
    /// Sum of open holds.
    pub held_micros: u64,
    /// Open holds by the sequence number of the event that placed them.
    pub holds: BTreeMap<u64, Hold>,
    /// The period of the last spend, and the spend in it.
    pub period: PeriodKey,
    pub period_spent_micros: u64,
    pub credited_total_micros: u64,
    /// Debits plus captures, ever.
    pub debited_total_micros: u64,
    pub refunded_total_micros: u64,
    /// The newest [`crate::REFUNDABLE_DEBITS_MAX`] debits and captures, oldest first.
    pub refundable: VecDeque<Refundable>,
    /// Sequence number of the last event applied: the agent's version.
    pub last_seq: u64,
    pub created_at_ms: TimestampMs,
    pub updated_at_ms: TimestampMs,
    /// Live API keys by public prefix, at most [`crate::API_KEYS_PER_AGENT_MAX`].
    pub api_keys: BTreeMap<String, ApiKey>,
    /// The agent's own notification thresholds, replacing its plan's; `None` uses the plan's.
    pub thresholds: Option<Thresholds>,
    /// Live credit grants by id (the seq of the event that issued them); see
    /// [`crate::grant`]. Issuing is refused past [`crate::GRANTS_PER_AGENT_MAX`].
    pub grants: GrantMap,
    /// Money that left the balance because its grant expired, ever.
    pub expired_total_micros: u64,
    /// The part of `debited_total_micros` drawn from `promotional` grants (the rest was
    /// `paid`).
    pub debited_promotional_total_micros: u64,
}

impl AgentState {
    /// The period a spend at `now_ms` counts in, for a plan whose periods start on
    /// `anchor_day`: the period of `now_ms`, unless the agent already spends in a later one.
    ///
    /// A period is named by the month it starts in, and the period an agent spends in
    /// never moves backwards. When the anchor day moves later (the agent moves to another
    /// plan, or its plan's `anchor_day` changes in the config), `now_ms` can fall in a
    /// period older than the one the agent already spends in: the spend keeps counting in
    /// that current period, which now ends where the period of its name ends under the new
    /// anchor day (spent on Jan 10 under anchor 1, then moved to anchor 28: January's
    /// period runs Jan 1 – Feb 28, and its cap is not reopened on Jan 28). When the anchor
    /// day moves earlier, `now_ms` can fall in a newer period, which starts at once.
    /// Either way each named period holds at most the cap, and `resets_at` is when it ends.
    pub fn period_at(&self, now_ms: TimestampMs, anchor_day: u8) -> PeriodKey {
        period_of(now_ms, anchor_day).max(self.period)
    }

    /// Spend in `period`: the recorded spend if it is the agent's current period, else 0.
    pub fn spent_in(&self, period: PeriodKey) -> u64 {
        if self.period == period {
            self.period_spent_micros
        } else {
            0
        }
    }

    /// The earliest expiry among open holds, for a sweep to know when to come back.
    pub fn next_hold_expiry_ms(&self) -> Option<TimestampMs> {
        self.holds.values().map(|h| h.expires_at_ms).min()
    }

    /// The earliest expiry among live grants.
    pub fn next_grant_expiry_ms(&self) -> Option<TimestampMs> {
        self.grants
            .values()
            .filter_map(|g| g.terms.expires_at_ms)
            .min()
    }

    /// The earliest moment a sweep (`ExpireHolds`) has something to do: a hold or a
    /// grant expires.
    pub fn next_expiry_ms(&self) -> Option<TimestampMs> {
        match (self.next_hold_expiry_ms(), self.next_grant_expiry_ms()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Money the live grants of `category` hold now.
    pub fn balance_in(&self, category: crate::GrantCategory) -> u64 {
        self.grants
            .values()
            .filter(|g| g.terms.category == category)
            .map(|g| g.remaining_micros)
            .sum()
    }

    pub fn refundable(&self, seq: u64) -> Option<&Refundable> {
        self.refundable
            .binary_search_by_key(&seq, |r| r.seq)
            .ok()
            .map(|i| &self.refundable[i])
    }

    /// Checks the ledger invariants:
    /// - balance + held + debited + expired = credited + refunded (money is conserved:
    ///   balance + held = issued − spent − expired + refunded, where credits are grants);
    /// - balance = the sum of the live grants' remaining money, none of them empty;
    /// - held = the sum of open holds, each the sum of its draws;
    /// - a refundable debit's remaining money is the sum of its draws;
    /// - refunded ≤ debited, and no open hold or refundable entry is zero-sized or newer
    ///   than the agent's version.
    pub fn check_invariants(&self) -> Result<(), InvariantError> {
        let broken = |reason: String| {
            Err(InvariantError {
                agent: self.id.to_string(),
                reason,
            })
        };
        let out = u128::from(self.balance_micros)
            + u128::from(self.held_micros)
            + u128::from(self.debited_total_micros)
            + u128::from(self.expired_total_micros);
        let inflow =
            u128::from(self.credited_total_micros) + u128::from(self.refunded_total_micros);
        if out != inflow {
            return broken(format!(
                "balance {} + held {} + debited {} + expired {} != credited {} + refunded {}",
                self.balance_micros,
                self.held_micros,
                self.debited_total_micros,
                self.expired_total_micros,
                self.credited_total_micros,
                self.refunded_total_micros
            ));
        }
        let grants_sum: u128 = self
            .grants
            .values()
            .map(|g| u128::from(g.remaining_micros))
            .sum();
        if grants_sum != u128::from(self.balance_micros) {
            return broken(format!(
                "balance {} != sum of grants {grants_sum}",
                self.balance_micros
            ));
        }
        if let Some((id, _)) = self
            .grants
            .iter()
            .find(|(id, g)| g.remaining_micros == 0 || **id > self.last_seq)
        {
            return broken(format!("grant {id} is empty or newer than the agent"));
        }
        let draws_sum = |draws: &[Draw]| draws.iter().map(|d| u128::from(d.micros)).sum::<u128>();
        if let Some((seq, _)) = self
            .holds
            .iter()
            .find(|(_, h)| draws_sum(&h.draws) != u128::from(h.amount_micros))
        {
            return broken(format!("hold {seq} differs from its draws"));
        }
        if let Some(r) = self
            .refundable
            .iter()
            .find(|r| draws_sum(&r.draws) != u128::from(r.remaining_micros))
        {
            return broken(format!("refundable debit {} differs from its draws", r.seq));
        }
        let holds_sum: u128 = self
            .holds
            .values()
            .map(|h| u128::from(h.amount_micros))
            .sum();
        if holds_sum != u128::from(self.held_micros) {
            return broken(format!(
                "held {} != sum of holds {holds_sum}",
                self.held_micros
            ));
        }
        if self.debited_promotional_total_micros > self.debited_total_micros {
            return broken("promotional spend above all spend".into());
        }
        if self.refunded_total_micros > self.debited_total_micros {
            return broken("refunded more than was ever debited".into());
        }
        if let Some((seq, _)) = self
            .holds
            .iter()
            .find(|(s, h)| **s > self.last_seq || h.amount_micros == 0)
        {
            return broken(format!("hold {seq} is empty or newer than the agent"));
        }
        if self.refundable.len() > crate::REFUNDABLE_DEBITS_MAX
            || self
                .refundable
                .iter()
                .zip(self.refundable.iter().skip(1))
                .any(|(a, b)| a.seq >= b.seq)
        {
            return broken("refund window is unordered or too long".into());
        }
        if self.holds.len() > crate::OPEN_HOLDS_MAX {
            return broken("too many open holds".into());
        }
        if self.api_keys.len() > crate::API_KEYS_PER_AGENT_MAX {
            return broken("too many API keys".into());
        }
        Ok(())
    }
}
