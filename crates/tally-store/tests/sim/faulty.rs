//! The simulation's `Storage`: the real `SledStorage` with a fault point at every `apply`,
//! so that a batch can fail before it reaches the write-ahead log.

use tally_core::{AgentId, AgentState, Event, IdempotencyKey, TimestampMs};
use tally_store::sim::{self, Op};
use tally_store::{
    AgentWrite, FeedCursor, FeedPage, GrantExpiry, KeyEntry, KeyIndexStatus, SledStorage, Storage,
    StoreError,
};

/// `SledStorage` with a fault point at every `apply`, so a batch can fail before the WAL.
#[derive(Debug)]
pub struct FaultyStorage(pub SledStorage);

impl Storage for FaultyStorage {
    fn apply(&self, writes: Vec<AgentWrite>) -> Result<(), StoreError> {
        sim::before(Op::Apply)?;
        self.0.apply(writes)?;
        sim::after()
    }
    fn sync(&self) -> Result<(), StoreError> {
        self.0.sync()
    }
    fn load_agents(&self) -> Result<Vec<AgentState>, StoreError> {
        self.0.load_agents()
    }
    fn checkpoint(&self, agent: &AgentId) -> Result<Option<AgentState>, StoreError> {
        self.0.checkpoint(agent)
    }
    fn agent_ids(&self, after: Option<&AgentId>, limit: usize) -> Result<Vec<AgentId>, StoreError> {
        self.0.agent_ids(after, limit)
    }
    fn agent_count(&self) -> Result<u64, StoreError> {
        self.0.agent_count()
    }
    fn hold_agents(&self) -> Result<Option<Vec<AgentId>>, StoreError> {
        self.0.hold_agents()
    }
    fn backfill_holds(&self, agents: &[AgentState]) -> Result<(), StoreError> {
        self.0.backfill_holds(agents)
    }
    fn grant_expiries(
        &self,
        from_ms: TimestampMs,
        after: Option<&[u8]>,
        through_ms: TimestampMs,
        limit: usize,
    ) -> Result<Vec<GrantExpiry>, StoreError> {
        self.0.grant_expiries(from_ms, after, through_ms, limit)
    }
    fn remove_grant_expiries(&self, keys: &[Vec<u8>]) -> Result<(), StoreError> {
        self.0.remove_grant_expiries(keys)
    }
    fn grant_expiries_complete(&self) -> Result<bool, StoreError> {
        self.0.grant_expiries_complete()
    }
    fn backfill_grant_expiries(&self, agents: &[AgentState]) -> Result<(), StoreError> {
        self.0.backfill_grant_expiries(agents)
    }
    fn journal(&self, a: &AgentId, after: u64, limit: usize) -> Result<Vec<Event>, StoreError> {
        self.0.journal(a, after, limit)
    }
    fn journal_rev(
        &self,
        a: &AgentId,
        before: u64,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        self.0.journal_rev(a, before, limit)
    }
    fn feed(&self, from: FeedCursor, limit: usize) -> Result<FeedPage, StoreError> {
        self.0.feed(from, limit)
    }
    fn feed_watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.0.feed_watch()
    }
    fn size_on_disk(&self) -> Result<u64, StoreError> {
        self.0.size_on_disk()
    }
    fn journal_staged(
        &self,
        a: &AgentId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        self.0.journal_staged(a, after, limit)
    }
    fn find_key(
        &self,
        a: &AgentId,
        key: &IdempotencyKey,
        slot: u128,
        now_ms: TimestampMs,
    ) -> Result<Option<KeyEntry>, StoreError> {
        self.0.find_key(a, key, slot, now_ms)
    }
    fn note_key(&self, slot: u128, at_ms: TimestampMs) {
        self.0.note_key(slot, at_ms)
    }
    fn needs_key_backfill(&self) -> bool {
        self.0.needs_key_backfill()
    }
    fn backfill_keys(&self, keys: Vec<(u128, KeyEntry)>) -> Result<(), StoreError> {
        self.0.backfill_keys(keys)
    }
    fn key_index_status(&self) -> KeyIndexStatus {
        self.0.key_index_status()
    }
    fn backlog_events(&self) -> u64 {
        self.0.backlog_events()
    }
    fn failure(&self) -> Option<String> {
        self.0.failure()
    }
}
