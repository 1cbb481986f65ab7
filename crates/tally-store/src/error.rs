//! Errors of the durable engine.

use thiserror::Error;

use crate::codec::CodecError;

/// Opening, recovering or writing the store failed.
#[derive(Debug, Error)]
pub enum StoreError {
    #[error("storage I/O: {0}")]
    Io(String),
    #[error("decoding a stored record: {0}")]
    Codec(#[from] CodecError),
    #[error("data directory holds schema version {found}, this build reads {expected}")]
    SchemaVersion { found: u32, expected: u32 },
    #[error(transparent)]
    Invariant(#[from] tally_core::InvariantError),
    #[error("invalid engine config: {0}")]
    Config(String),
    #[error("the store holds a record that cannot be: {0}")]
    Corrupt(String),
    /// A shared backend could not be reached or could not say whether it applied a write
    /// (a lost connection, a failover in progress). Passing: the engine answers 503 and
    /// goes on, unlike every other error here, which stops it.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// The backend does not offer this (the change feed on a shared backend).
    #[error("not offered by this storage backend: {0}")]
    Unsupported(&'static str),
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Io(e.to_string())
    }
}

/// A command could not be submitted or answered. None of these changed anything that was
/// acknowledged; `Failed` means the engine stopped after a storage error and must restart.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum SubmitError {
    #[error("shard queue is full; retry after {retry_after_ms} ms")]
    Overloaded { retry_after_ms: u64 },
    #[error("the engine is shutting down")]
    ShuttingDown,
    #[error("the engine stopped after a storage failure: {0}")]
    Failed(String),
    #[error("the answer needs more than {entries_max} journal entries read")]
    ScanTooLarge { entries_max: u64 },
    /// A shared backend is unreachable or failing over, or the agent's writes kept
    /// meeting newer versions written by other nodes. A write answered this way may or may
    /// not have been applied: retry it with the same idempotency key.
    #[error("storage unavailable ({reason}); retry after {retry_after_ms} ms")]
    Unavailable { retry_after_ms: u64, reason: String },
    /// The backend does not offer this.
    #[error("not offered by this storage backend: {0}")]
    Unsupported(&'static str),
}

/// What a caught panic says (its message, when it has one), for the failure it becomes.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into())
}
