//! The `Storage` trait: what the engine needs from a durable backend, and nothing about
//! how it is done. sled implements it today; a Redis Cluster backend (one hash tag per
//! agent, a Lua compare-and-set on the agent's version) fits the same shape.

use serde::{Deserialize, Serialize};
use tally_core::{AgentId, AgentState, Event};

use crate::error::StoreError;

/// The writes of one agent in one batch: journal entries to append, and optionally a
/// checkpoint of its record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentWrite {
    pub agent: AgentId,
    /// The agent's version (`last_seq`) before these events; a backend shared between
    /// processes checks it (compare-and-set) so two writers can never interleave.
    pub expected_seq: u64,
    /// New journal entries, in sequence order, continuing from `expected_seq`.
    pub events: Vec<Event>,
    /// A checkpoint of the agent record as of its newest event (in this write or before).
    pub checkpoint: Option<AgentState>,
}

/// A durable backend. Writes are grouped: `apply` makes a batch visible and atomic (at
/// least per agent), `sync` makes everything applied so far durable. The engine answers a
/// change only after a `sync` that started after its `apply`.
pub trait Storage: Send + Sync + std::fmt::Debug + 'static {
    /// Applies the writes atomically. Visible to reads at once; durable after `sync`.
    /// Takes them by value: a backend keeps them in memory until they are indexed.
    fn apply(&self, writes: Vec<AgentWrite>) -> Result<(), StoreError>;

    /// Makes every applied write durable (one fsync for many requests).
    fn sync(&self) -> Result<(), StoreError>;

    /// Every agent checkpoint.
    fn load_agents(&self) -> Result<Vec<AgentState>, StoreError>;

    /// Journal entries of `agent` with `seq > after_seq`, oldest first, at most `limit`.
    fn journal(
        &self,
        agent: &AgentId,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError>;

    /// Journal entries of `agent` with `seq < before_seq`, newest first, at most `limit`.
    fn journal_rev(
        &self,
        agent: &AgentId,
        before_seq: u64,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError>;

    /// Bytes on disk, for the operator.
    fn size_on_disk(&self) -> Result<u64, StoreError>;

    /// Journal entries applied but not yet where reads find them without help (for a
    /// backend that indexes behind its log); a gauge for the operator.
    fn backlog_events(&self) -> u64 {
        0
    }
}
