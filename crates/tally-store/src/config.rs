//! Engine settings, each a named limit with a default fit for a small host.

use std::path::PathBuf;

/// How the engine is laid out and bounded.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Where sled keeps its files.
    pub data_dir: PathBuf,
    /// Number of shards (threads deciding commands); 0 means one per two cores (at least
    /// one), leaving the other cores to the HTTP runtime and to sled's I/O threads.
    pub shards: usize,
    /// Commands waiting per shard; one more is `SubmitError::Overloaded` at once.
    pub shard_queue_len_max: usize,
    /// Most commands one shard decides into one batch.
    pub batch_size_max: usize,
    /// sled's page cache in bytes (sled's own default of 1 GiB is too much for small hosts).
    pub sled_cache_bytes: u64,
    /// A dirty agent record is checkpointed when older than this.
    pub checkpoint_interval_ms: u64,
    /// How long an idempotency key is honoured, at any request rate.
    pub idempotency_retention_ms: u64,
    /// Most idempotency keys kept on disk (52 bytes each); past it the oldest hours go
    /// first and the effective window shortens (a metric, a log line and `/readyz` say so).
    pub idempotency_keys_max: u64,
    /// Keys held exactly in memory: the shards' caches of recent keys share this bound,
    /// and the key index's write buffer has it too (~200 bytes of RSS a key together).
    /// Older keys are found on disk through filters of ~2 bytes a key.
    pub idempotency_memory_keys_max: usize,
    /// Sweep for expired holds and credit grants, and grant expiry warnings due, this
    /// often: the shards for the agents in memory, the grant sweep (`grant_sweep.rs`) for
    /// the others.
    pub hold_sweep_interval_ms: u64,
    /// Journal entries in the write-ahead log not yet moved into sled, at most; past it new
    /// runs wait for the indexer. Bounds the memory that holds them (~200 bytes each).
    pub index_backlog_events_max: usize,
    /// The same bound in bytes of WAL payload.
    pub index_backlog_bytes_max: usize,
    /// Agent records held in memory, over all shards (each shard holds its share: ~650
    /// bytes a record of one grant and a few debits, ~1.2 KB of RSS with the allocator's
    /// overhead, measured with `million_agents`). Others are loaded from the store on first
    /// use; a record leaves memory only with its checkpoint written and nothing that needs
    /// it in memory: no open hold (the hold sweep finds holds in memory), no rate-limit
    /// state still running and no grant expiry warning due within the plans' longest
    /// `grant_expiring_within_ms`. Such agents can therefore keep more than this resident.
    pub agents_cached_max: usize,
    /// Journal entries one usage request reads at most: usage of a period far back in a
    /// busy agent's journal is refused (`SubmitError::ScanTooLarge`) rather than read whole.
    pub usage_scan_entries_max: u64,
}

/// Default of [`EngineConfig::agents_cached_max`]: ~115 MiB of RSS, and what keeps a
/// million agents inside the 512 MiB that `benches/src/bin/million_agents.rs` measures
/// against. Three quarters of 2^17, like the idempotency key bound: a shard's map of
/// records doubles its buckets past 7/8 full, so 2^17 records paid for 2^18 buckets.
pub const AGENTS_CACHED_MAX_DEFAULT: usize = 98_304;

/// Default of [`EngineConfig::sled_cache_bytes`]. The write-ahead log answers commits, so
/// sled's cache serves only the indexer and first loads of agents; sled holds about twice
/// its nominal cache in memory, and 32 MiB instead of 64 took ~70 MiB off the RSS of
/// `million_agents` at the same speed.
pub const SLED_CACHE_BYTES_DEFAULT: u64 = 32 * 1024 * 1024;

/// Default of [`EngineConfig::usage_scan_entries_max`]: about a second of reading.
pub const USAGE_SCAN_ENTRIES_MAX_DEFAULT: u64 = 2_000_000;

impl EngineConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            shards: 0,
            shard_queue_len_max: 4_096,
            batch_size_max: 512,
            sled_cache_bytes: SLED_CACHE_BYTES_DEFAULT,
            checkpoint_interval_ms: 5_000,
            idempotency_retention_ms: tally_core::idempotency::RETENTION_MS_DEFAULT,
            idempotency_keys_max: crate::sled_store::IDEMPOTENCY_KEYS_MAX_DEFAULT,
            idempotency_memory_keys_max: crate::sled_store::IDEMPOTENCY_MEMORY_KEYS_MAX_DEFAULT,
            hold_sweep_interval_ms: 1_000,
            index_backlog_events_max: crate::sled_store::INDEX_BACKLOG_EVENTS_MAX_DEFAULT,
            index_backlog_bytes_max: crate::sled_store::INDEX_BACKLOG_BYTES_MAX_DEFAULT,
            usage_scan_entries_max: USAGE_SCAN_ENTRIES_MAX_DEFAULT,
            agents_cached_max: AGENTS_CACHED_MAX_DEFAULT,
        }
    }

    pub(crate) fn shard_count(&self) -> usize {
        if self.shards == 0 {
            // Measured with wrk on 2 cores: one shard 29k durable debits/s over HTTP, two
            // shards 24k, because the shard threads took CPU from the HTTP workers.
            std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
        } else {
            self.shards
        }
    }
}
