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
}

/// What a caught panic says (its message, when it has one), for the failure it becomes.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into())
}
