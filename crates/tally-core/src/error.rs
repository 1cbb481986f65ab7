//! Errors of the core: malformed commands, validation failures and broken invariants.
//! Denials (402, 429, 403) are not errors; see [`crate::Denial`].

use thiserror::Error;

/// A value failed validation (an id, a key, a plan field, an amount string).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ValidationError {
    #[error("{field} must be {min}..={max} characters long, got {len}")]
    Length {
        field: &'static str,
        min: usize,
        max: usize,
        len: usize,
    },
    #[error("{field} contains a character outside {allowed}")]
    Charset {
        field: &'static str,
        allowed: &'static str,
    },
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

/// A command that cannot be applied to the state it was decided against. Nothing changes.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CommandError {
    #[error("unknown agent")]
    UnknownAgent,
    #[error("agent already exists")]
    AgentExists,
    #[error("unknown plan {0:?}")]
    UnknownPlan(String),
    #[error("amount must be at least 1 micro")]
    ZeroAmount,
    #[error("amount overflows the ledger's 64-bit counters")]
    Overflow,
    #[error("hold ttl must be 1..={max_ms} ms, got {ttl_ms}")]
    InvalidTtl { ttl_ms: u64, max_ms: u64 },
    #[error("unknown or closed hold {0}")]
    UnknownHold(u64),
    #[error("hold {hold_seq} expired at {expires_at_ms}")]
    HoldExpired { hold_seq: u64, expires_at_ms: u64 },
    #[error("capture of {amount_micros} exceeds the hold of {held_micros}")]
    CaptureExceedsHold {
        amount_micros: u64,
        held_micros: u64,
    },
    #[error("too many open holds (at most {max})")]
    TooManyHolds { max: usize },
    #[error("debit {0} is unknown or outside the refund window")]
    UnknownDebit(u64),
    #[error("refund of {amount_micros} exceeds the {refundable_micros} still refundable")]
    RefundExceedsDebit {
        amount_micros: u64,
        refundable_micros: u64,
    },
    #[error("too many API keys (at most {max}); revoke one first")]
    TooManyApiKeys { max: usize },
    #[error("API key prefix {0:?} is already in use")]
    ApiKeyExists(String),
    #[error("no API key with prefix {0:?}")]
    UnknownApiKey(String),
    #[error("too many live credit grants (at most {max}); spend or let one expire first")]
    TooManyGrants { max: usize },
    #[error("grant expires at {expires_at_ms}, not after now ({now_ms})")]
    GrantExpiryNotInFuture { expires_at_ms: u64, now_ms: u64 },
    #[error("invalid command: {0}")]
    Invalid(#[from] ValidationError),
}

/// The state and an event, or the state itself, break a ledger invariant. This means a
/// corrupted journal or a bug; the caller stops rather than serve wrong balances.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("ledger invariant broken for agent {agent}: {reason}")]
pub struct InvariantError {
    pub agent: String,
    pub reason: String,
}
