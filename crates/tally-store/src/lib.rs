//! tally-store: the durable engine. Agents live in shards in memory; each shard decides
//! commands with `tally-core`, writes the resulting journal entries in one atomic batch and
//! answers only after a shared group commit (one fsync for many requests) made them durable.
//!
//! The group commit is a write-ahead log append (`wal.rs`); an indexer thread moves the log
//! into sled behind it (`sled_store.rs`) and the idempotency keys into the key index on
//! disk (`keyindex.rs`).
//!
//! **Never decides**: every rule is in `tally-core`. Only `codec.rs` knows the byte format;
//! only `sled_store.rs` knows sled; only `redis_store.rs` knows Redis (the shared backend); only `wal.rs` knows the log's files.

#![forbid(unsafe_code)]

mod clock;
pub mod codec;
mod config;
mod engine;
mod error;
mod grant_sweep;
mod idem;
mod keyindex;
mod memory;
mod metrics;
mod recovery;
mod redis_store;
mod shard;
#[cfg(feature = "sim")]
#[doc(hidden)]
pub mod sim;
mod sled_store;
mod storage;
#[cfg(test)]
mod testing;
mod wal;

pub use clock::{Clock, ManualClock, SystemClock};
pub use codec::CodecError;
pub use config::{EngineConfig, AGENTS_CACHED_MAX_DEFAULT};
pub use engine::{AgentPage, Engine, Reply, Usage, UsageByTask};
pub use error::{StoreError, SubmitError};
pub use grant_sweep::{GRANT_SWEEP_PAGES_PER_PASS_MAX, GRANT_SWEEP_PAGE_MAX};
/// Where an idempotency key of an agent is kept (`Storage::find_key`'s `slot`).
pub use idem::slot as idempotency_slot;
#[doc(hidden)]
pub use keyindex::preload_for_bench;
pub use memory::disable_transparent_huge_pages;
pub use metrics::EngineMetrics;
pub use redis_store::{
    RedisOptions, RedisStorage, APPLY_SCRIPT, INDEX_BUCKETS,
    REDIS_IDEMPOTENCY_RETENTION_MS_DEFAULT, REDIS_OP_TIMEOUT_MS_DEFAULT,
    REDIS_WAIT_TIMEOUT_MS_DEFAULT,
};
pub use sled_store::{SledStorage, StoreOptions, SCHEMA_VERSION};
pub use storage::{
    AgentWrite, FeedCursor, FeedEntry, FeedPage, GrantExpiry, KeyEntry, KeyIndexStatus, Storage,
    WriteResult,
};
