//! tally-core: the ledger as a pure state machine. No I/O, no clock, no async.
//!
//! Two functions carry every rule of money:
//! - [`decide`] reads an agent's state, a command, the plans and `now_ms`, and returns the
//!   outcome and the events (journal entries) of the change; a denial produces no event.
//! - [`evolve`] applies one event's recorded effect to the state and decides nothing, so
//!   replaying a journal rebuilds exactly the state that was acknowledged, even after the
//!   plans changed.
//!
//! Rate-limit state ([`RateState`]) is volatile by design: it is changed by `decide` (a
//! request that passes the limiter uses its cell even when it is then denied for funds),
//! never journaled, and starts fresh after a restart.

#![forbid(unsafe_code)]

mod command;
mod decide;
mod error;
mod event;
mod evolve;
pub mod grant;
pub mod id;
pub mod idempotency;
pub mod money;
mod outcome;
pub mod period;
mod plan;
pub mod pricing;
pub mod rate;
mod state;
pub mod threshold;

pub use command::{Command, CommandKind, Metadata, Priority, METADATA_VALUE_LEN_MAX};
pub use decide::{decide, Decision};
pub use error::{CommandError, InvariantError, ValidationError};
pub use event::{Event, EventKind};
pub use evolve::evolve;
pub use grant::{Draw, Grant, GrantCategory, GrantMap, GrantTerms, GRANT_PRIORITY_DEFAULT};
pub use id::{AgentId, IdempotencyKey, PlanName, TaskType};
pub use outcome::{Denial, Outcome, Receipt};
pub use period::PeriodKey;
pub use plan::{Plan, PlanBook, Pricing, RateBucket};
pub use rate::{RateState, RateStatus};
pub use state::{AgentState, ApiKey, Hold, Refundable, Status};
pub use threshold::{Crossing, Thresholds};

/// Time in this crate is always milliseconds since the Unix epoch, passed in by the caller.
pub type TimestampMs = u64;

/// Most open holds one agent may have at once; one more is a rejected command.
pub const OPEN_HOLDS_MAX: usize = 1_024;
/// How many of an agent's most recent debits (and captures) stay refundable. Older ones
/// fall out of the window so that an agent record stays bounded however long it lives.
pub const REFUNDABLE_DEBITS_MAX: usize = 1_024;
/// Most live API keys one agent may have; one more is a rejected command.
pub const API_KEYS_PER_AGENT_MAX: usize = 16;
/// Most live credit grants one agent may be issued; one more is a rejected command.
/// A credit or never-expiring grant that merges into a live grant of the same terms is
/// always accepted. Money returned to a spent-out grant brings it back even past this
/// bound (at most one per grant an open hold or refundable debit drew from).
pub const GRANTS_PER_AGENT_MAX: usize = 32;
/// Longest API key name.
pub const API_KEY_NAME_LEN_MAX: usize = 64;
/// Length of an API key's public prefix: what lookups and logs use.
pub const API_KEY_PREFIX_LEN: usize = 8;
