//! Events: the journal entries. Each records the effect of a decided change, so that
//! [`crate::evolve`] can apply it without a plan or a clock.

use serde::{Deserialize, Serialize};

use crate::command::Metadata;
use crate::grant::GrantTerms;
use crate::id::{IdempotencyKey, PlanName, TaskType};
use crate::period::PeriodKey;
use crate::state::Status;
use crate::threshold::{Crossing, Thresholds};
use crate::TimestampMs;

/// One journal entry of one agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// The agent's own sequence number: dense, from 1.
    pub seq: u64,
    pub at_ms: TimestampMs,
    pub kind: EventKind,
    pub balance_after_micros: u64,
    pub held_after_micros: u64,
    /// The key of the request that caused this change, durable with the change itself.
    pub idempotency_key: Option<IdempotencyKey>,
    /// [`crate::Command::fingerprint`] of that request (0 when it had no key).
    pub fingerprint: u128,
    pub task_type: Option<TaskType>,
    pub metadata: Metadata,
}

/// What changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    AgentCreated {
        plan: PlanName,
        status: Status,
    },
    AgentUpdated {
        plan: PlanName,
        status: Status,
    },
    Credited {
        amount_micros: u64,
    },
    Debited {
        amount_micros: u64,
        period: PeriodKey,
    },
    /// The hold's id is this event's `seq`.
    HoldPlaced {
        amount_micros: u64,
        expires_at_ms: TimestampMs,
    },
    HoldCaptured {
        hold_seq: u64,
        captured_micros: u64,
        released_micros: u64,
        period: PeriodKey,
    },
    HoldVoided {
        hold_seq: u64,
        released_micros: u64,
    },
    HoldExpired {
        hold_seq: u64,
        released_micros: u64,
    },
    Refunded {
        debit_seq: u64,
        amount_micros: u64,
        /// The period the refunded money was spent in.
        debit_period: PeriodKey,
    },
    /// An API key for the agent: only its public prefix and the SHA-256 of the whole key.
    ApiKeyIssued {
        prefix: String,
        sha256: [u8; 32],
        name: Option<String>,
    },
    ApiKeyRevoked {
        prefix: String,
    },
    /// A call was served and its x402 payment could not be settled: `amount_micros` was
    /// owed and not collected. Balances do not change; the event is the audit record
    /// (with the payment's identity and the reason in its metadata).
    PaymentUnsettled {
        amount_micros: u64,
    },
    /// The agent's own notification thresholds were set (`None`: back to its plan's).
    ThresholdsSet {
        thresholds: Option<Thresholds>,
    },
    /// The change just before crossed a threshold: a notification to send. Moves no
    /// money; written in the same command as the change, so exactly once per crossing.
    ThresholdCrossed {
        crossing: Crossing,
    },
    /// A credit grant with its terms; its id is this event's `seq` (unless it merged into
    /// the live never-expiring grant of the same terms, see [`crate::grant`]). A plain
    /// credit is still journaled as `Credited` and issues a [`GrantTerms::PLAIN`] grant.
    GrantIssued {
        amount_micros: u64,
        terms: GrantTerms,
    },
    /// The grant's `expires_at_ms` passed: what was left of it leaves the balance. Also
    /// journaled right after money returned (void, release, refund) to a grant that had
    /// expired meanwhile: that money lapses.
    GrantExpired {
        grant_id: u64,
        expired_micros: u64,
    },
    /// A debit that drew `promotional_micros` of its amount from promotional grants. A
    /// debit drawn from paid grants only is still journaled as `Debited`, so journals
    /// without promotional money keep the shape they had before grants. Built by
    /// [`EventKind::debit`].
    DebitedSplit {
        amount_micros: u64,
        period: PeriodKey,
        promotional_micros: u64,
    },
    /// A capture whose captured money drew `promotional_micros` from promotional grants
    /// (see `DebitedSplit`). Built by [`EventKind::capture`].
    HoldCapturedSplit {
        hold_seq: u64,
        captured_micros: u64,
        released_micros: u64,
        period: PeriodKey,
        promotional_micros: u64,
    },
    /// A refund that returned `promotional_micros` to promotional grants (see
    /// `DebitedSplit`). Built by [`EventKind::refund`].
    RefundedSplit {
        debit_seq: u64,
        amount_micros: u64,
        debit_period: PeriodKey,
        promotional_micros: u64,
    },
}

impl EventKind {
    /// A debit of `amount_micros`, `promotional_micros` of it from promotional grants.
    pub fn debit(amount_micros: u64, period: PeriodKey, promotional_micros: u64) -> Self {
        if promotional_micros == 0 {
            EventKind::Debited {
                amount_micros,
                period,
            }
        } else {
            EventKind::DebitedSplit {
                amount_micros,
                period,
                promotional_micros,
            }
        }
    }

    /// A capture of `captured_micros` (`promotional_micros` of it promotional) releasing
    /// `released_micros` of the hold.
    pub fn capture(
        hold_seq: u64,
        captured_micros: u64,
        released_micros: u64,
        period: PeriodKey,
        promotional_micros: u64,
    ) -> Self {
        if promotional_micros == 0 {
            EventKind::HoldCaptured {
                hold_seq,
                captured_micros,
                released_micros,
                period,
            }
        } else {
            EventKind::HoldCapturedSplit {
                hold_seq,
                captured_micros,
                released_micros,
                period,
                promotional_micros,
            }
        }
    }

    /// A refund of `amount_micros` of debit `debit_seq`, `promotional_micros` of it going
    /// back to promotional grants.
    pub fn refund(
        debit_seq: u64,
        amount_micros: u64,
        debit_period: PeriodKey,
        promotional_micros: u64,
    ) -> Self {
        if promotional_micros == 0 {
            EventKind::Refunded {
                debit_seq,
                amount_micros,
                debit_period,
            }
        } else {
            EventKind::RefundedSplit {
                debit_seq,
                amount_micros,
                debit_period,
                promotional_micros,
            }
        }
    }

    /// Of the money a spend or refund moved, the part drawn from (or returned to)
    /// promotional grants; 0 for every other event.
    pub fn promotional_micros(&self) -> u64 {
        match *self {
            EventKind::DebitedSplit {
                promotional_micros, ..
            }
            | EventKind::HoldCapturedSplit {
                promotional_micros, ..
            }
            | EventKind::RefundedSplit {
                promotional_micros, ..
            } => promotional_micros,
            _ => 0,
        }
    }

    /// A refund's debit, amount and the period the refunded money was spent in.
    pub fn refund_of(&self) -> Option<(u64, u64, PeriodKey)> {
        match *self {
            EventKind::Refunded {
                debit_seq,
                amount_micros,
                debit_period,
            }
            | EventKind::RefundedSplit {
                debit_seq,
                amount_micros,
                debit_period,
                ..
            } => Some((debit_seq, amount_micros, debit_period)),
            _ => None,
        }
    }

    /// A capture's hold, captured and released money, and the period it counts in.
    pub fn capture_of(&self) -> Option<(u64, u64, u64, PeriodKey)> {
        match *self {
            EventKind::HoldCaptured {
                hold_seq,
                captured_micros,
                released_micros,
                period,
            }
            | EventKind::HoldCapturedSplit {
                hold_seq,
                captured_micros,
                released_micros,
                period,
                ..
            } => Some((hold_seq, captured_micros, released_micros, period)),
            _ => None,
        }
    }

    /// The open hold this event closes (captures, voids and expiries of holds).
    pub fn closed_hold(&self) -> Option<u64> {
        match *self {
            EventKind::HoldCaptured { hold_seq, .. }
            | EventKind::HoldCapturedSplit { hold_seq, .. }
            | EventKind::HoldVoided { hold_seq, .. }
            | EventKind::HoldExpired { hold_seq, .. } => Some(hold_seq),
            _ => None,
        }
    }

    /// A short stable name for the journal API and reports.
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::AgentCreated { .. } => "agent_created",
            EventKind::AgentUpdated { .. } => "agent_updated",
            EventKind::Credited { .. } => "credit",
            EventKind::Debited { .. } | EventKind::DebitedSplit { .. } => "debit",
            EventKind::HoldPlaced { .. } => "hold",
            EventKind::HoldCaptured { .. } | EventKind::HoldCapturedSplit { .. } => "capture",
            EventKind::HoldVoided { .. } => "void",
            EventKind::HoldExpired { .. } => "expire",
            EventKind::Refunded { .. } | EventKind::RefundedSplit { .. } => "refund",
            EventKind::ApiKeyIssued { .. } => "api_key_issued",
            EventKind::ApiKeyRevoked { .. } => "api_key_revoked",
            EventKind::PaymentUnsettled { .. } => "payment_unsettled",
            EventKind::ThresholdsSet { .. } => "thresholds_set",
            EventKind::ThresholdCrossed { .. } => "threshold_crossed",
            EventKind::GrantIssued { .. } => "grant",
            EventKind::GrantExpired { .. } => "grant_expired",
        }
    }

    /// The money this event moved, in micros (captured amount for captures, released
    /// amount for voids and expiries, 0 for agent changes; for an unsettled payment the
    /// amount owed, which moved nothing).
    pub fn amount_micros(&self) -> u64 {
        match *self {
            EventKind::AgentCreated { .. }
            | EventKind::AgentUpdated { .. }
            | EventKind::ApiKeyIssued { .. }
            | EventKind::ApiKeyRevoked { .. }
            | EventKind::ThresholdsSet { .. }
            | EventKind::ThresholdCrossed { .. } => 0,
            EventKind::Credited { amount_micros }
            | EventKind::Debited { amount_micros, .. }
            | EventKind::DebitedSplit { amount_micros, .. }
            | EventKind::HoldPlaced { amount_micros, .. }
            | EventKind::Refunded { amount_micros, .. }
            | EventKind::RefundedSplit { amount_micros, .. }
            | EventKind::PaymentUnsettled { amount_micros }
            | EventKind::GrantIssued { amount_micros, .. } => amount_micros,
            EventKind::GrantExpired { expired_micros, .. } => expired_micros,
            EventKind::HoldCaptured {
                captured_micros, ..
            }
            | EventKind::HoldCapturedSplit {
                captured_micros, ..
            } => captured_micros,
            EventKind::HoldVoided {
                released_micros, ..
            }
            | EventKind::HoldExpired {
                released_micros, ..
            } => released_micros,
        }
    }

    /// Money spent by this event (debits and captures), with the period it counts in.
    pub fn spend(&self) -> Option<(u64, PeriodKey)> {
        match *self {
            EventKind::Debited {
                amount_micros,
                period,
            }
            | EventKind::DebitedSplit {
                amount_micros,
                period,
                ..
            } => Some((amount_micros, period)),
            EventKind::HoldCaptured {
                captured_micros,
                period,
                ..
            }
            | EventKind::HoldCapturedSplit {
                captured_micros,
                period,
                ..
            } => Some((captured_micros, period)),
            _ => None,
        }
    }
}
