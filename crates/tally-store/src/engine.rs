//! The engine's public face: open and recover a store, submit commands to the shard that
//! owns the agent, read agents, journals and usage, shut down cleanly.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Sender, TrySendError};
use parking_lot::Mutex;
use tally_core::{
    AgentId, AgentState, Command, CommandError, Event, EventKind, GrantCategory, Outcome,
    PeriodKey, PlanBook, RateStatus,
};
use tokio::sync::oneshot;

use crate::clock::Clock;
use crate::config::EngineConfig;
use crate::error::{StoreError, SubmitError};
use crate::grant_sweep::GrantSweeper;
use crate::idem::Index;
use crate::metrics::EngineMetrics;
use crate::recovery::{load_agent, recover};
use crate::shard::{run_committer, Job, Shard, Shared, Slot, Slots};
use crate::sled_store::{SledStorage, StoreOptions};
use crate::storage::{FeedCursor, FeedPage, Storage};

/// Journal entries read per page during scans.
const SCAN_PAGE_LEN: usize = 4_096;

/// Runs queued for the committer; a full queue slows the shards (backpressure).
const COMMIT_QUEUE_LEN_MAX: usize = 1_024;
/// What an overloaded caller is told to wait.
const OVERLOADED_RETRY_AFTER_MS: u64 = 1_000;

const RUNNING: u8 = 0;
const STOPPING: u8 = 1;

/// The answer to a submitted command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Decided (and, for approvals, durable). `replayed` is true when the same
    /// idempotency key and request were seen before and this is the stored outcome.
    Decided {
        outcome: Outcome,
        rate: Option<RateStatus>,
        replayed: bool,
    },
    /// The command does not fit the agent's state (unknown agent, capture above the hold,
    /// overflow, ...). Nothing changed.
    Rejected(CommandError),
    /// The idempotency key was used before for a different request. Nothing changed.
    KeyReused,
}

/// One page of agents, ordered by id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentPage {
    pub agents: Vec<AgentState>,
    /// Pass as `after` for the next page; `None` on the last page.
    pub next_after: Option<AgentId>,
}

/// Spend of one task type in a period.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsageByTask {
    pub spent_micros: u64,
    pub refunded_micros: u64,
    pub count: u64,
}

/// An agent's usage in one period, from its journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    pub period: PeriodKey,
    pub start_ms: u64,
    pub end_ms: u64,
    /// Debits and captures counted in the period (refunds not deducted).
    pub spent_micros: u64,
    /// The part of `spent_micros` drawn from promotional grants; the rest was paid.
    /// Spends journaled by builds before this split was recorded count as paid.
    pub spent_promotional_micros: u64,
    /// Refunds of the period's spend, whenever they happened.
    pub refunded_micros: u64,
    /// The part of `refunded_micros` returned to promotional grants.
    pub refunded_promotional_micros: u64,
    /// Credits and grants issued between the period's start and end.
    pub credited_micros: u64,
    /// The part of `credited_micros` issued as promotional grants.
    pub credited_promotional_micros: u64,
    /// Money that left the balance because its grant expired (or lapsed), in the period.
    pub expired_micros: u64,
    pub debits: u64,
    /// Keyed by task type; debits without one are under `""`.
    pub by_task_type: BTreeMap<String, UsageByTask>,
}

/// The durable engine. Cheap to clone; all clones share the same shards.
#[derive(Debug, Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    shared: Arc<Shared>,
    shards: Vec<Sender<Job>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Stopped first at shutdown: it submits through the shards.
    grant_sweeper: Mutex<Option<GrantSweeper>>,
    state: AtomicU8,
    stopped: OnceLock<()>,
}

/// Which shard owns an agent: FNV-1a of its id, stable across restarts and builds.
pub(crate) fn shard_of(agent: &AgentId, shards: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in agent.as_str().bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % shards as u64) as usize
}

/// Sets when dropped: tells a blocking scan that nobody waits for its answer any more.
struct CancelOnDrop(Arc<std::sync::atomic::AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

impl Engine {
    /// Opens (or creates) the sled store at `config.data_dir`, loads the agents with open
    /// holds (the others load when first used), and starts the shards. Blocking: run it off
    /// the async runtime.
    pub fn open(
        config: EngineConfig,
        plans: PlanBook,
        clock: Arc<dyn Clock>,
        registry: Option<&prometheus::Registry>,
    ) -> Result<Engine, StoreError> {
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| StoreError::Io(format!("creating {}: {e}", config.data_dir.display())))?;
        let storage = SledStorage::open_with(
            &config.data_dir,
            &StoreOptions {
                cache_bytes: config.sled_cache_bytes,
                backlog_events_max: config.index_backlog_events_max,
                backlog_bytes_max: config.index_backlog_bytes_max,
                idempotency_retention_ms: config.idempotency_retention_ms,
                idempotency_keys_max: config.idempotency_keys_max,
                idempotency_memory_keys_max: config.idempotency_memory_keys_max,
            },
        )?;
        Self::open_with(Arc::new(storage), config, plans, clock, registry)
    }

    /// Like [`Engine::open`], over any [`Storage`].
    pub fn open_with(
        storage: Arc<dyn Storage>,
        config: EngineConfig,
        plans: PlanBook,
        clock: Arc<dyn Clock>,
        registry: Option<&prometheus::Registry>,
    ) -> Result<Engine, StoreError> {
        if config.batch_size_max == 0
            || config.shard_queue_len_max == 0
            || config.idempotency_keys_max == 0
            || config.idempotency_memory_keys_max == 0
            || config.agents_cached_max == 0
        {
            return Err(StoreError::Config(
                "batch_size_max, shard_queue_len_max, idempotency_keys_max, idempotency_memory_keys_max and agents_cached_max must be at least 1"
                    .into(),
            ));
        }
        let started = std::time::Instant::now();
        let metrics = EngineMetrics::new(registry)
            .map_err(|e| StoreError::Config(format!("metrics: {e}")))?;
        let n = config.shard_count();
        let now_ms = clock.now_ms();
        let backfill = storage.needs_key_backfill();
        let grant_expiries_complete = storage.grant_expiries_complete()?;
        let hold_agents = if backfill || !grant_expiries_complete {
            None
        } else {
            storage.hold_agents()?
        };
        // Only agents with open holds start in memory, where the hold sweep finds them; the
        // others load on first use.
        let (resident, agent_count, replayed) = match hold_agents {
            Some(ids) => {
                let mut agents = Vec::with_capacity(ids.len());
                for id in &ids {
                    let agent = load_agent(storage.as_ref(), id)?.ok_or_else(|| {
                        StoreError::Corrupt(format!("an open hold of {id}, an unknown agent"))
                    })?;
                    agents.push(agent);
                }
                (agents, storage.agent_count()?, 0)
            }
            None => {
                // A directory from an older build: recover every agent once to build the
                // indexes it lacks.
                let recovered = recover(storage.as_ref(), &config, now_ms, backfill)?;
                if backfill {
                    if recovered.forgotten_early > 0 {
                        tracing::warn!(
                            forgotten_early = recovered.forgotten_early,
                            "more keys inside the retention window than idempotency_keys_max: the oldest were left out of the rebuilt key index"
                        );
                    }
                    let keys = recovered.keys.iter().map(|k| (k.slot, k.entry)).collect();
                    storage.backfill_keys(keys)?;
                }
                if !grant_expiries_complete {
                    storage.backfill_grant_expiries(&recovered.agents)?;
                }
                let count = recovered.agents.len() as u64;
                let holding: Vec<AgentState> = recovered
                    .agents
                    .into_iter()
                    .filter(|a| !a.holds.is_empty())
                    .collect();
                storage.backfill_holds(&holding)?;
                (holding, count, recovered.replayed)
            }
        };
        let shared = Arc::new(Shared {
            storage,
            plans: Arc::new(plans),
            clock,
            config: config.clone(),
            metrics,
            failed: OnceLock::new(),
        });
        shared
            .metrics
            .agents
            .set(i64::try_from(agent_count).unwrap_or(i64::MAX));
        shared
            .metrics
            .open_holds
            .set(resident.iter().map(|a| a.holds.len() as i64).sum());
        let cache_keys_max = config.idempotency_memory_keys_max.div_ceil(n);
        let mut slots: Vec<Slots> = (0..n).map(|_| Slots::new()).collect();
        let indexes: Vec<Index> = (0..n)
            .map(|_| Index::new(config.idempotency_retention_ms, cache_keys_max))
            .collect();
        let resident_count = resident.len();
        for agent in resident {
            slots[shard_of(&agent.id, n)].insert(agent.id.clone(), Slot::new(agent));
        }
        let key_status = shared.storage.key_index_status();
        shared.report_storage();
        let (commit_tx, commit_rx) = bounded(COMMIT_QUEUE_LEN_MAX);
        let mut threads = Vec::with_capacity(n + 1);
        let mut senders = Vec::with_capacity(n);
        for (i, (agents, index)) in slots.into_iter().zip(indexes).enumerate() {
            let (tx, rx) = bounded(config.shard_queue_len_max);
            let shard = Shard::new(
                shared.clone(),
                agents,
                config.agents_cached_max.div_ceil(n),
                (index, cache_keys_max),
                rx,
                commit_tx.clone(),
            );
            let handle = std::thread::Builder::new()
                .name(format!("tally-shard-{i}"))
                .spawn(move || shard.run())
                .map_err(|e| StoreError::Io(format!("starting shard thread: {e}")))?;
            threads.push(handle);
            senders.push(tx);
        }
        drop(commit_tx);
        let committer_shared = shared.clone();
        threads.push(
            std::thread::Builder::new()
                .name("tally-committer".into())
                .spawn(move || run_committer(commit_rx, committer_shared))
                .map_err(|e| StoreError::Io(format!("starting committer thread: {e}")))?,
        );
        let grant_sweeper = GrantSweeper::start(shared.clone(), senders.clone(), now_ms)?;
        tracing::info!(
            agents = agent_count,
            agents_resident = resident_count,
            journal_entries_replayed = replayed,
            idempotency_keys_on_disk = key_status.keys_on_disk,
            shards = n,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "engine recovered"
        );
        Ok(Engine {
            inner: Arc::new(Inner {
                shared,
                shards: senders,
                threads: Mutex::new(threads),
                grant_sweeper: Mutex::new(Some(grant_sweeper)),
                state: AtomicU8::new(RUNNING),
                stopped: OnceLock::new(),
            }),
        })
    }

    fn refuse(&self) -> Option<SubmitError> {
        if let Some(e) = self.inner.shared.failure() {
            // A background thread of the store may have failed with no command to notice.
            let _ = self.inner.shared.failed.set(e.to_string());
            return Some(e);
        }
        (self.inner.state.load(Ordering::Acquire) != RUNNING).then_some(SubmitError::ShuttingDown)
    }

    fn send(&self, agent: &AgentId, job: Job) -> Result<(), SubmitError> {
        if let Some(e) = self.refuse() {
            return Err(e);
        }
        let shard = &self.inner.shards[shard_of(agent, self.inner.shards.len())];
        shard.try_send(job).map_err(|e| match e {
            TrySendError::Full(_) => {
                self.inner.shared.metrics.overloaded_total.inc();
                SubmitError::Overloaded {
                    retry_after_ms: OVERLOADED_RETRY_AFTER_MS,
                }
            }
            TrySendError::Disconnected(_) => SubmitError::ShuttingDown,
        })
    }

    fn lost(&self) -> SubmitError {
        self.inner.shared.failure().unwrap_or(SubmitError::Failed(
            "the shard stopped before answering".into(),
        ))
    }

    /// Decides `cmd` on its agent's shard. Approvals return after their group commit.
    pub async fn submit(&self, cmd: Command) -> Result<Reply, SubmitError> {
        let (tx, rx) = oneshot::channel();
        let agent = cmd.agent.clone();
        self.send(&agent, Job::Submit { cmd, reply: tx })?;
        rx.await.map_err(|_| self.lost())?
    }

    /// Decides `cmds` as [`Engine::submit`] would one by one, but queues them all before
    /// waiting on any: commands for one agent are decided in the order given, and a shard
    /// takes as many of them into one group commit as its batch size allows. Answers in
    /// the order given; one command's refusal (a full queue included) is its own.
    pub async fn submit_many(&self, cmds: Vec<Command>) -> Vec<Result<Reply, SubmitError>> {
        let queued: Vec<_> = cmds
            .into_iter()
            .map(|cmd| {
                let (tx, rx) = oneshot::channel();
                let agent = cmd.agent.clone();
                self.send(&agent, Job::Submit { cmd, reply: tx })
                    .map(|()| rx)
            })
            .collect();
        let mut answers = Vec::with_capacity(queued.len());
        for q in queued {
            answers.push(match q {
                Ok(rx) => rx.await.map_err(|_| self.lost()).and_then(|r| r),
                Err(e) => Err(e),
            });
        }
        answers
    }

    /// The agent's current state, as of its last acknowledged change.
    pub async fn agent(&self, id: &AgentId) -> Result<Option<AgentState>, SubmitError> {
        let (tx, rx) = oneshot::channel();
        self.send(
            id,
            Job::Agent {
                id: id.clone(),
                reply: tx,
            },
        )?;
        rx.await.map_err(|_| self.lost())?
    }

    /// Agents with ids after `after`, at most `limit`, ordered by id.
    pub async fn list_agents(
        &self,
        after: Option<&AgentId>,
        limit: usize,
    ) -> Result<AgentPage, SubmitError> {
        if let Some(e) = self.refuse() {
            return Err(e);
        }
        let after = after.cloned();
        let ids = self
            .blocking(move |s| s.agent_ids(after.as_ref(), limit.saturating_add(1)))
            .await?;
        let more = ids.len() > limit;
        let mut agents = Vec::with_capacity(limit.min(ids.len()));
        for id in ids.iter().take(limit) {
            if let Some(agent) = self.agent(id).await? {
                agents.push(agent);
            }
        }
        let next_after = if more {
            agents.last().map(|a| a.id.clone())
        } else {
            None
        };
        Ok(AgentPage { agents, next_after })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Storage) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, SubmitError> {
        let shared = self.inner.shared.clone();
        tokio::task::spawn_blocking(move || {
            f(shared.storage.as_ref()).map_err(|e| shared.store_error(e))
        })
        .await
        .map_err(|e| SubmitError::Failed(format!("storage read task: {e}")))?
    }

    /// Journal entries of `id` with `seq > after_seq`, at most `limit`, oldest first.
    pub async fn journal(
        &self,
        id: &AgentId,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<Event>, SubmitError> {
        let id = id.clone();
        self.blocking(move |s| s.journal(&id, after_seq, limit))
            .await
    }

    /// The newest log position the change feed shows. Every cursor the feed handed out
    /// is at most one past it, restarts included: one further on was never handed out.
    pub fn feed_indexed_lsn(&self) -> u64 {
        *self.inner.shared.storage.feed_watch().borrow()
    }

    /// The change feed: durable journal entries of every agent from `from` on, in commit
    /// order, at most `limit`. With nothing there yet, waits up to `wait` for an indexing
    /// pass that adds some (a long poll), then answers whatever is there, maybe nothing.
    /// Entries show up one indexing interval or so after they were committed.
    pub async fn events(
        &self,
        from: FeedCursor,
        limit: usize,
        wait: std::time::Duration,
    ) -> Result<FeedPage, SubmitError> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut watch = self.inner.shared.storage.feed_watch();
        let mut from = from;
        loop {
            let page = self.blocking(move |s| s.feed(from, limit)).await?;
            if !page.events.is_empty()
                || limit == 0
                || self.refuse().is_some()
                || tokio::time::Instant::now() >= deadline
            {
                return Ok(page);
            }
            from = page.next;
            // Checks the current value first, so a pass that landed during the read counts.
            let advanced = watch.wait_for(|&indexed_lsn| indexed_lsn >= from.lsn);
            match tokio::time::timeout_at(deadline, advanced).await {
                Ok(Ok(_)) => {}
                // Timed out, or the store closed: nothing more comes.
                Ok(Err(_)) | Err(_) => return Ok(page),
            }
        }
    }

    /// Spend, refunds, credits and counts by task type for `period`, where the agent's
    /// plan's anchor day decides when the period starts. `None` for an unknown agent.
    pub async fn usage(
        &self,
        id: &AgentId,
        period: PeriodKey,
    ) -> Result<Option<Usage>, SubmitError> {
        let Some(agent) = self.agent(id).await? else {
            return Ok(None);
        };
        let anchor_day = self
            .inner
            .shared
            .plans
            .get(&agent.plan)
            .map_or(1, |p| p.anchor_day);
        let (start_ms, end_ms) = (period.start_ms(anchor_day), period.end_ms(anchor_day));
        // A spend in `period` can predate its start under today's anchor day (a later
        // anchor day lengthens the agent's current period: `AgentState::period_at`), but
        // never the first of its month, so the scan runs back to there.
        let scan_from_ms = period.start_ms(1);
        let id = id.clone();
        // Nothing of the agent's happened before it was created: no scan at all.
        let before_agent = end_ms <= agent.created_at_ms;
        let entries_max = self.inner.shared.config.usage_scan_entries_max;
        let cancelled = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let _cancel = CancelOnDrop(cancelled.clone());
        let usage = self
            .blocking(move |s| {
                let mut usage = Usage {
                    period,
                    start_ms,
                    end_ms,
                    spent_micros: 0,
                    spent_promotional_micros: 0,
                    refunded_micros: 0,
                    refunded_promotional_micros: 0,
                    credited_micros: 0,
                    credited_promotional_micros: 0,
                    expired_micros: 0,
                    debits: 0,
                    by_task_type: BTreeMap::new(),
                };
                let mut before = u64::MAX;
                let mut scanned = 0u64;
                'pages: loop {
                    if before_agent {
                        break;
                    }
                    if cancelled.load(Ordering::Relaxed) {
                        return Ok(None);
                    }
                    // One past the bound at most, so exactly the bound still answers.
                    let want = (entries_max + 1 - scanned).min(SCAN_PAGE_LEN as u64) as usize;
                    let page = s.journal_rev(&id, before, want)?;
                    for e in &page {
                        // Refunds of this period's spend may come later, so the scan
                        // starts at the newest entry and stops before the period's.
                        if e.at_ms < scan_from_ms {
                            break 'pages;
                        }
                        scanned += 1;
                        if scanned > entries_max {
                            return Ok(Some(Err(SubmitError::ScanTooLarge { entries_max })));
                        }
                        usage.add(e);
                    }
                    match page.last() {
                        Some(last) if page.len() == want => before = last.seq,
                        _ => break,
                    }
                }
                Ok(Some(Ok(usage)))
            })
            .await?;
        match usage {
            Some(result) => result.map(Some),
            // Cancelled: the caller is gone, so this answer is never read.
            None => Err(SubmitError::ShuttingDown),
        }
    }

    /// Commands waiting in the shard queues right now.
    pub fn queued(&self) -> usize {
        self.inner.shards.iter().map(|s| s.len()).sum()
    }

    /// The plans in force.
    pub fn plans(&self) -> Arc<PlanBook> {
        self.inner.shared.plans.clone()
    }

    /// The engine's metrics.
    pub fn metrics(&self) -> &EngineMetrics {
        &self.inner.shared.metrics
    }

    /// False after a storage failure or once shutdown began.
    /// True when other nodes write the same store (Redis Cluster): what this node holds
    /// beside the engine (an index of agent keys, say) may be stale.
    pub fn is_shared(&self) -> bool {
        self.inner.shared.storage.shared()
    }

    pub fn is_ready(&self) -> bool {
        self.refuse().is_none()
    }

    /// The idempotency key index's size and effective window (for `/readyz`); refreshes
    /// the engine's metrics of it too.
    pub fn key_index_status(&self) -> crate::storage::KeyIndexStatus {
        self.inner.shared.report_storage();
        self.inner.shared.storage.key_index_status()
    }

    /// Stops accepting commands, answers those queued, checkpoints every dirty agent and
    /// flushes. Later submits get `ShuttingDown`. Calling it again does nothing.
    pub async fn shutdown(&self) -> Result<(), StoreError> {
        if self.inner.state.swap(STOPPING, Ordering::AcqRel) == STOPPING {
            while self.inner.stopped.get().is_none() {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            return Ok(());
        }
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.stop())
            .await
            .map_err(|e| StoreError::Io(format!("shutdown task: {e}")))?
    }
}

impl Inner {
    /// Blocking shutdown: every shard finishes its queue and checkpoints, then the
    /// committer makes it durable, then one last sync.
    fn stop(&self) -> Result<(), StoreError> {
        if let Some(mut sweeper) = self.grant_sweeper.lock().take() {
            sweeper.stop();
        }
        for shard in &self.shards {
            // A full queue is drained by the shard; a closed one means it already stopped.
            let _ = shard.send(Job::Shutdown);
        }
        let threads = std::mem::take(&mut *self.threads.lock());
        for t in threads {
            if t.join().is_err() {
                tracing::error!("an engine thread panicked during shutdown");
            }
        }
        let result = self.shared.storage.sync();
        let _ = self.stopped.set(());
        if let Some(reason) = self.shared.failed.get() {
            return Err(StoreError::Io(reason.clone()));
        }
        result
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if self.stopped.get().is_none() {
            self.state.store(STOPPING, Ordering::Release);
            if let Err(e) = self.stop() {
                tracing::error!(error = %e, "engine shutdown on drop failed");
            }
        }
    }
}

impl Usage {
    fn add(&mut self, e: &Event) {
        let task = e.task_type.as_ref().map_or("", |t| t.as_str());
        let promotional = e.kind.promotional_micros();
        if let Some((amount_micros, period)) = e.kind.spend() {
            if period == self.period {
                self.spent_micros = self.spent_micros.saturating_add(amount_micros);
                self.spent_promotional_micros =
                    self.spent_promotional_micros.saturating_add(promotional);
                self.debits += 1;
                let t = self.by_task_type.entry(task.to_owned()).or_default();
                t.spent_micros = t.spent_micros.saturating_add(amount_micros);
                t.count += 1;
            }
            return;
        }
        if let Some((_, amount_micros, debit_period)) = e.kind.refund_of() {
            if debit_period == self.period {
                self.refunded_micros = self.refunded_micros.saturating_add(amount_micros);
                self.refunded_promotional_micros =
                    self.refunded_promotional_micros.saturating_add(promotional);
                let t = self.by_task_type.entry(task.to_owned()).or_default();
                t.refunded_micros = t.refunded_micros.saturating_add(amount_micros);
            }
            return;
        }
        let in_period = e.at_ms >= self.start_ms && e.at_ms < self.end_ms;
        match e.kind {
            EventKind::Credited { amount_micros } if in_period => {
                self.credited_micros = self.credited_micros.saturating_add(amount_micros);
            }
            EventKind::GrantIssued {
                amount_micros,
                terms,
            } if in_period => {
                self.credited_micros = self.credited_micros.saturating_add(amount_micros);
                if terms.category == GrantCategory::Promotional {
                    self.credited_promotional_micros = self
                        .credited_promotional_micros
                        .saturating_add(amount_micros);
                }
            }
            EventKind::GrantExpired { expired_micros, .. } if in_period => {
                self.expired_micros = self.expired_micros.saturating_add(expired_micros);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_of_is_stable_and_in_range() {
        let a = AgentId::new("agent-42").expect("valid");
        assert_eq!(shard_of(&a, 1), 0);
        assert_eq!(shard_of(&a, 7), shard_of(&a, 7));
        for n in 1..16 {
            assert!(shard_of(&a, n) < n);
        }
    }
}
