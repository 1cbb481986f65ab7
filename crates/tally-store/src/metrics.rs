//! The engine's Prometheus metrics: group commits, idempotency records, holds, queues, the
//! grant sweep.
//! No per-agent labels: per-agent usage is the API's.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge, Opts, Registry};

/// Metrics the engine updates; registered into the server's registry when one is given.
#[derive(Debug, Clone)]
pub struct EngineMetrics {
    pub commit_batch_events: Histogram,
    pub commit_seconds: Histogram,
    pub commits_total: IntCounter,
    pub idempotency_records: IntGauge,
    pub idempotency_evicted_early_total: IntCounter,
    pub idempotency_keys_on_disk: IntGauge,
    pub idempotency_window_seconds: IntGauge,
    pub idempotency_disk_lookups_total: IntCounter,
    pub open_holds: IntGauge,
    pub agents: IntGauge,
    pub overloaded_total: IntCounter,
    pub checkpoints_total: IntCounter,
    pub agents_loaded_total: IntCounter,
    pub agents_evicted_total: IntCounter,
    pub index_backlog_events: IntGauge,
    pub grant_sweep_pokes_total: IntCounter,
    pub grant_sweep_pokes_failed_total: IntCounter,
    pub storage_conflicts_total: IntCounter,
    pub storage_unavailable_total: IntCounter,
}

impl EngineMetrics {
    pub fn new(registry: Option<&Registry>) -> Result<Self, prometheus::Error> {
        let m = Self {
            commit_batch_events: Histogram::with_opts(
                HistogramOpts::new(
                    "tally_commit_batch_events",
                    "Journal entries made durable by one group commit (fsync).",
                )
                .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0]),
            )?,
            commit_seconds: Histogram::with_opts(
                HistogramOpts::new("tally_commit_seconds", "Duration of one group commit (fsync).")
                    .buckets(prometheus::exponential_buckets(0.000_05, 2.0, 16)?),
            )?,
            commits_total: IntCounter::with_opts(Opts::new("tally_commits_total", "Group commits (fsyncs)."))?,
            idempotency_records: IntGauge::with_opts(Opts::new(
                "tally_idempotency_records",
                "Idempotency keys in the shards' in-memory caches of recent keys (older ones are found on disk).",
            ))?,
            idempotency_evicted_early_total: IntCounter::with_opts(Opts::new(
                "tally_idempotency_evicted_early_total",
                "Idempotency keys dropped from disk inside their retention window because engine.idempotency_keys_max was reached.",
            ))?,
            idempotency_keys_on_disk: IntGauge::with_opts(Opts::new(
                "tally_idempotency_keys_on_disk",
                "Idempotency keys in the key index on disk.",
            ))?,
            idempotency_window_seconds: IntGauge::with_opts(Opts::new(
                "tally_idempotency_window_seconds",
                "How far back idempotency keys are honoured: the retention window, or less when the disk bound cut it.",
            ))?,
            idempotency_disk_lookups_total: IntCounter::with_opts(Opts::new(
                "tally_idempotency_disk_lookups_total",
                "Idempotency lookups that a key filter admitted and that therefore read the key index on disk.",
            ))?,
            open_holds: IntGauge::with_opts(Opts::new("tally_open_holds", "Open holds across all agents."))?,
            agents: IntGauge::with_opts(Opts::new("tally_agents", "Agents known to the engine."))?,
            overloaded_total: IntCounter::with_opts(Opts::new(
                "tally_overloaded_total",
                "Commands refused because a shard queue was full.",
            ))?,
            checkpoints_total: IntCounter::with_opts(Opts::new(
                "tally_checkpoints_total",
                "Agent records written as checkpoints.",
            ))?,
            agents_loaded_total: IntCounter::with_opts(Opts::new(
                "tally_agents_loaded_total",
                "Agent records loaded from the store because they were not in memory.",
            ))?,
            agents_evicted_total: IntCounter::with_opts(Opts::new(
                "tally_agents_evicted_total",
                "Agent records dropped from memory to keep within agents_cached_max.",
            ))?,
            index_backlog_events: IntGauge::with_opts(Opts::new(
                "tally_index_backlog_events",
                "Journal entries applied (in the write-ahead log) but not yet moved into sled; new commits wait while it is at engine.index_backlog_events_max.",
            ))?,
            grant_sweep_pokes_total: IntCounter::with_opts(Opts::new(
                "tally_grant_sweep_pokes_total",
                "Agents the grant sweep had their shard look at (loading them if needed) because a credit grant of theirs expired or nears its expiry warning.",
            ))?,
            grant_sweep_pokes_failed_total: IntCounter::with_opts(Opts::new(
                "tally_grant_sweep_pokes_failed_total",
                "Pokes of the grant sweep that were not decided (a full shard queue, a rejection such as an agent whose plan left the config); tried again at the next pass.",
            ))?,
            storage_conflicts_total: IntCounter::with_opts(Opts::new(
                "tally_storage_conflicts_total",
                "Agent writes to a shared store (Redis Cluster) that met a newer version written by another node, so the agent's commands were decided again.",
            ))?,
            storage_unavailable_total: IntCounter::with_opts(Opts::new(
                "tally_storage_unavailable_total",
                "Commands answered 503 because a shared store was unreachable or failing over, or an agent's writes kept meeting newer versions.",
            ))?,
        };
        if let Some(r) = registry {
            r.register(Box::new(m.commit_batch_events.clone()))?;
            r.register(Box::new(m.commit_seconds.clone()))?;
            r.register(Box::new(m.commits_total.clone()))?;
            r.register(Box::new(m.idempotency_records.clone()))?;
            r.register(Box::new(m.idempotency_evicted_early_total.clone()))?;
            r.register(Box::new(m.idempotency_keys_on_disk.clone()))?;
            r.register(Box::new(m.idempotency_window_seconds.clone()))?;
            r.register(Box::new(m.idempotency_disk_lookups_total.clone()))?;
            r.register(Box::new(m.open_holds.clone()))?;
            r.register(Box::new(m.agents.clone()))?;
            r.register(Box::new(m.overloaded_total.clone()))?;
            r.register(Box::new(m.checkpoints_total.clone()))?;
            r.register(Box::new(m.agents_loaded_total.clone()))?;
            r.register(Box::new(m.agents_evicted_total.clone()))?;
            r.register(Box::new(m.index_backlog_events.clone()))?;
            r.register(Box::new(m.grant_sweep_pokes_total.clone()))?;
            r.register(Box::new(m.grant_sweep_pokes_failed_total.clone()))?;
            r.register(Box::new(m.storage_conflicts_total.clone()))?;
            r.register(Box::new(m.storage_unavailable_total.clone()))?;
        }
        Ok(m)
    }
}
