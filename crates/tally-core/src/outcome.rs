//! Outcomes: the answer to a command. Denials are values, each mapped to one HTTP status
//! by the server: `Suspended` 403, `RateLimited` and `MonthlyCapReached` 429,
//! `InsufficientFunds` 402.

use crate::event::{Event, EventKind};
use crate::TimestampMs;

/// Why a spend was refused. Nothing was written; a retry with the same key may succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    Suspended,
    RateLimited {
        bucket: String,
        quota: u32,
        window_ms: u64,
        /// Exact wait until one more request is admitted.
        retry_after_ms: u64,
    },
    MonthlyCapReached {
        cap_micros: u64,
        /// The limit that refused this request: the cap, or the soft threshold for
        /// low-priority work.
        limit_micros: u64,
        spent_micros: u64,
        held_micros: u64,
        resets_at_ms: TimestampMs,
        soft: bool,
    },
    InsufficientFunds {
        required_micros: u64,
        available_micros: u64,
        balance_micros: u64,
        held_micros: u64,
        /// Wait until open holds expire and free enough, when that alone would do.
        retry_after_ms: Option<u64>,
    },
}

impl Denial {
    /// A short stable name, for logs and metrics labels.
    pub fn reason(&self) -> &'static str {
        match self {
            Denial::Suspended => "suspended",
            Denial::RateLimited { .. } => "rate_limited",
            Denial::MonthlyCapReached { soft: false, .. } => "monthly_cap",
            Denial::MonthlyCapReached { soft: true, .. } => "soft_cap",
            Denial::InsufficientFunds { .. } => "insufficient_funds",
        }
    }
}

/// A summary of an applied change, rebuilt from its events, so a replay answers the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Receipt {
    /// Sequence of the first event; 0 when the command changed nothing (no holds to expire).
    pub first_seq: u64,
    pub last_seq: u64,
    /// Sequence of the command's own event (the debit's or hold's id): the first event
    /// that is not the expiry of a grant journaled ahead of it; 0 when nothing changed.
    pub seq: u64,
    pub events: u32,
    /// The money moved by the command's own event (see [`EventKind::amount_micros`]).
    pub amount_micros: u64,
    pub balance_after_micros: u64,
    pub held_after_micros: u64,
    pub at_ms: TimestampMs,
    /// For a new hold: its expiry.
    pub hold_expires_at_ms: Option<TimestampMs>,
}

impl Receipt {
    /// The receipt of a command that wrote `events` (one command's run, in order).
    /// `balance_micros` / `held_micros` are the state's when there are no events.
    pub fn from_events(
        events: &[Event],
        balance_micros: u64,
        held_micros: u64,
        at_ms: TimestampMs,
    ) -> Self {
        // Due grants expire ahead of the command's own event and notifications follow it
        // (`decide`); a run of only those (a sweep) has its first as its subject.
        let own = events
            .iter()
            .find(|e| {
                !matches!(
                    e.kind,
                    EventKind::GrantExpired { .. } | EventKind::ThresholdCrossed { .. }
                )
            })
            .or(events.first());
        match (events.first(), own, events.last()) {
            (Some(first), Some(own), Some(last)) => Receipt {
                first_seq: first.seq,
                last_seq: last.seq,
                seq: own.seq,
                events: events.len() as u32,
                amount_micros: own.kind.amount_micros(),
                balance_after_micros: last.balance_after_micros,
                held_after_micros: last.held_after_micros,
                at_ms: first.at_ms,
                hold_expires_at_ms: match own.kind {
                    EventKind::HoldPlaced { expires_at_ms, .. } => Some(expires_at_ms),
                    _ => None,
                },
            },
            _ => Receipt {
                first_seq: 0,
                last_seq: 0,
                seq: 0,
                events: 0,
                amount_micros: 0,
                balance_after_micros: balance_micros,
                held_after_micros: held_micros,
                at_ms,
                hold_expires_at_ms: None,
            },
        }
    }
}

/// The answer to a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The change was decided; its events are in the [`crate::Decision`].
    Approved(Receipt),
    /// A check found the debit would pass; nothing changed.
    WouldApprove {
        amount_micros: u64,
        balance_micros: u64,
    },
    Denied(Denial),
}
