//! The raw shape of `tally.toml`: serde structs that mirror the file one to one and
//! reject unknown keys. Nothing here is validated; `config/mod.rs` does that.

use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) server: Option<Spanned<RawServer>>,
    pub(super) limits: Option<Spanned<RawLimits>>,
    pub(super) engine: Option<Spanned<RawEngine>>,
    pub(super) auth: Option<RawAuth>,
    #[serde(default)]
    pub(super) plans: Vec<Spanned<RawPlan>>,
    pub(super) x402: Option<Spanned<RawX402>>,
    #[serde(default)]
    pub(super) routes: Vec<Spanned<super::gateway::RawRoute>>,
    pub(super) forward_auth: Option<Spanned<super::gateway::RawForwardAuth>>,
    pub(super) proxy: Option<Spanned<super::gateway::RawProxy>>,
    #[serde(default)]
    pub(super) webhooks: Vec<Spanned<super::webhooks::RawWebhook>>,
    pub(super) storage: Option<Spanned<RawStorage>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStorage {
    pub(super) url: Option<String>,
    pub(super) wait_replicas: Option<u32>,
    pub(super) wait_timeout_ms: Option<u64>,
    pub(super) op_timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    pub(super) listen: Option<String>,
    pub(super) data_dir: Option<PathBuf>,
    pub(super) log: Option<String>,
    pub(super) public_url: Option<String>,
    pub(super) default_plan: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    pub(super) body_bytes_max: Option<usize>,
    pub(super) json_depth_max: Option<usize>,
    pub(super) page_limit_max: Option<u32>,
    pub(super) page_limit_default: Option<u32>,
    pub(super) idempotency_key_len_max: Option<usize>,
    pub(super) auth_header_bytes_max: Option<usize>,
    pub(super) request_timeout_ms: Option<u64>,
    pub(super) batch_items_max: Option<usize>,
    pub(super) batch_bytes_max: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEngine {
    pub(super) shards: Option<usize>,
    pub(super) shard_queue_len_max: Option<usize>,
    pub(super) batch_size_max: Option<usize>,
    pub(super) sled_cache_bytes: Option<u64>,
    pub(super) checkpoint_interval_ms: Option<u64>,
    pub(super) idempotency_retention_ms: Option<u64>,
    pub(super) idempotency_keys_max: Option<u64>,
    pub(super) idempotency_memory_keys_max: Option<usize>,
    pub(super) hold_sweep_interval_ms: Option<u64>,
    pub(super) index_backlog_events_max: Option<usize>,
    pub(super) index_backlog_bytes_max: Option<usize>,
    pub(super) usage_scan_entries_max: Option<u64>,
    pub(super) agents_cached_max: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuth {
    #[serde(default)]
    pub(super) tokens: Vec<Spanned<RawToken>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawToken {
    pub(super) name: String,
    pub(super) role: String,
    pub(super) sha256: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPlan {
    pub(super) name: String,
    pub(super) monthly_cap_micros: Option<u64>,
    pub(super) soft_threshold_pct: Option<u8>,
    pub(super) anchor_day: Option<u8>,
    pub(super) hold_ttl_max_ms: Option<u64>,
    pub(super) pricing: Option<RawPricing>,
    #[serde(default)]
    pub(super) buckets: Vec<RawBucket>,
    pub(super) thresholds: Option<RawThresholds>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawThresholds {
    pub(super) balance_below_micros: Option<u64>,
    pub(super) cap_spend_percent: Option<u8>,
    pub(super) grant_expiring_within_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPricing {
    pub(super) margin_ppm: Option<u64>,
    pub(super) min_micros: Option<u64>,
    pub(super) max_micros: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBucket {
    pub(super) name: String,
    pub(super) quota: u32,
    pub(super) window_s: u64,
    pub(super) burst: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawX402 {
    pub(super) scheme: Option<String>,
    pub(super) network: String,
    pub(super) asset: String,
    pub(super) pay_to: String,
    pub(super) max_timeout_seconds: Option<u64>,
    pub(super) description: Option<String>,
    pub(super) extra: Option<toml::Table>,
    pub(super) facilitator_url: Option<String>,
    pub(super) facilitator_timeout_ms: Option<u64>,
    pub(super) settle_attempts_max: Option<u32>,
    pub(super) payer_plan: Option<String>,
    pub(super) facilitator_address: Option<String>,
}
