//! The engine's public face: submit commands, read agents, journals and usage.
//! (Skeleton: bodies are being written; signatures are the contract for tally-server.)

use std::collections::BTreeMap;
use std::sync::Arc;

use tally_core::{AgentId, AgentState, Command, CommandError, Event, Outcome, PeriodKey, PlanBook, RateStatus};

use crate::clock::Clock;
use crate::config::EngineConfig;
use crate::error::{StoreError, SubmitError};

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
    pub spent_micros: u64,
    pub refunded_micros: u64,
    pub credited_micros: u64,
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
    _config: EngineConfig,
}

impl Engine {
    /// Opens (or creates) the store at `config.data_dir`, recovers every agent and the
    /// idempotency index, and starts the shards. Blocking: run it off the async runtime.
    pub fn open(
        config: EngineConfig,
        plans: PlanBook,
        clock: Arc<dyn Clock>,
        registry: Option<&prometheus::Registry>,
    ) -> Result<Engine, StoreError> {
        let _ = (plans, clock, registry);
        Ok(Engine {
            inner: Arc::new(Inner { _config: config }),
        })
    }

    /// Decides `cmd` on its agent's shard. Approvals return after their group commit.
    pub async fn submit(&self, cmd: Command) -> Result<Reply, SubmitError> {
        let _ = (cmd, &self.inner);
        unimplemented!("engine in progress")
    }

    /// The agent's current state, as of its last acknowledged change.
    pub async fn agent(&self, id: &AgentId) -> Result<Option<AgentState>, SubmitError> {
        let _ = id;
        unimplemented!("engine in progress")
    }

    /// Agents with ids after `after`, at most `limit`.
    pub async fn list_agents(&self, after: Option<&AgentId>, limit: usize) -> Result<AgentPage, SubmitError> {
        let _ = (after, limit);
        unimplemented!("engine in progress")
    }

    /// Journal entries of `id` with `seq > after_seq`, at most `limit`, oldest first.
    pub async fn journal(&self, id: &AgentId, after_seq: u64, limit: usize) -> Result<Vec<Event>, SubmitError> {
        let _ = (id, after_seq, limit);
        unimplemented!("engine in progress")
    }

    /// Spend, refunds, credits and counts by task type for `period` (the agent's plan's
    /// anchor day decides where the period starts).
    pub async fn usage(&self, id: &AgentId, period: PeriodKey) -> Result<Option<Usage>, SubmitError> {
        let _ = (id, period);
        unimplemented!("engine in progress")
    }

    /// The plans in force.
    pub fn plans(&self) -> Arc<PlanBook> {
        unimplemented!("engine in progress")
    }

    /// True once recovery finished and the shards run.
    pub fn is_ready(&self) -> bool {
        true
    }

    /// Stops accepting commands, answers those queued, checkpoints every dirty agent and
    /// flushes. Later submits get `ShuttingDown`.
    pub async fn shutdown(&self) -> Result<(), StoreError> {
        unimplemented!("engine in progress")
    }
}
