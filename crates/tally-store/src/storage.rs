//! The `Storage` trait: what the engine needs from a durable backend, and nothing about
//! how it is done. sled implements it today; a Redis Cluster backend (one hash tag per
//! agent, a Lua compare-and-set on the agent's version) fits the same shape.

use serde::{Deserialize, Serialize};
use tally_core::{AgentId, AgentState, Event, IdempotencyKey, RateState, TimestampMs};

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
    /// Always there for a shared backend ([`Storage::shared`]): its record is current.
    pub checkpoint: Option<AgentState>,
    /// The agent's limiter state after these events, for a shared backend, which stores it
    /// with the record so that the nodes share one limiter per agent. Not in the WAL.
    #[serde(skip)]
    pub rate: Option<RateState>,
    /// For a shared backend: the limiter state this node read with the record (`None` for an
    /// agent it created), compared along with `expected_seq`. A denial for funds still
    /// takes a cell of the limiter, so a write may change the limiter alone (no events), and
    /// the version alone would not see two nodes doing so at once.
    #[serde(skip)]
    pub rate_before: Option<RateState>,
}

/// What became of one agent's write in [`Storage::apply_each`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteResult {
    Applied,
    /// The agent's stored version was not `expected_seq`, or its stored limiter state not
    /// `rate_before` (another node wrote first): nothing of this write was applied.
    Conflict,
    /// The backend cannot say whether it applied this write (a lost connection, a failover).
    Unavailable(String),
}

/// One agent write in the change feed: the WAL record `lsn` appended `events` journal
/// entries of `agent`, from `first_seq` on. Entries are kept in lsn order, which is the
/// order the writes were applied (commit order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeedEntry {
    pub lsn: u64,
    pub agent: AgentId,
    pub first_seq: u64,
    pub events: u32,
}

/// A position in the change feed: the next event is the `offset`-th (from 0) of the agent
/// write logged at `lsn`, or, when that write has no more, the first of the next write.
/// It names a log record rather than a page, so it stays valid across restarts however the
/// writes were grouped when they reached the backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct FeedCursor {
    pub lsn: u64,
    pub offset: u32,
}

/// One page of the change feed and where the next one starts.
#[derive(Debug, Clone, Default)]
pub struct FeedPage {
    pub events: Vec<(AgentId, Event)>,
    /// For each event, the cursor just past it: where a reader that has handled it and
    /// nothing after it resumes.
    pub ends: Vec<FeedCursor>,
    /// Past every event of this page; past everything durable when the page is not full.
    pub next: FeedCursor,
}

/// What an idempotency key did: the fingerprint of the request that used it and the
/// journal entries that request wrote (`first_seq`, `events` of them), at `at_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyEntry {
    pub fingerprint: u128,
    pub first_seq: u64,
    pub events: u32,
    pub at_ms: TimestampMs,
}

/// One entry of the index of credit grant expiries: grant `grant_id` of `agent` expires at
/// `expires_at_ms`. `key` is the entry's position in the index, opaque to the engine: it
/// pages on from it and removes the entry by it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantExpiry {
    pub key: Vec<u8>,
    pub agent: AgentId,
    pub grant_id: u64,
    pub expires_at_ms: TimestampMs,
}

/// The state of a backend's idempotency key index, for metrics and `/readyz`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyIndexStatus {
    /// Keys held on disk (a key written twice by a crash and a replay counts twice).
    pub keys_on_disk: u64,
    /// The disk bound on keys.
    pub keys_max: u64,
    /// The configured retention window.
    pub retention_ms: u64,
    /// How far back keys are still known: `retention_ms`, unless the disk bound dropped
    /// keys younger than that (then the window is cut to this).
    pub window_ms: u64,
    /// Keys dropped from disk inside their window because of the disk bound, ever (this run).
    pub evicted_early: u64,
    /// Lookups that a filter admitted and that therefore read the disk.
    pub disk_lookups: u64,
    /// Memory held by the key filters, in bytes (about 2 a key in the window).
    pub filter_bytes: u64,
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

    /// True when other processes write to this store too (several `tally serve` nodes on
    /// one Redis Cluster). The engine then keeps no agent in memory from one run to the
    /// next, loads agents with [`Storage::record`], writes every agent's checkpoint and
    /// limiter state with its events, applies with [`Storage::apply_each`] and decides an
    /// agent again when its write met a newer version. A shared store's index of grant
    /// expiries also lists hold expiries, since no node holds agents with holds in memory.
    fn shared(&self) -> bool {
        false
    }

    /// Applies the writes, each agent's atomically and on its own (compare-and-set on
    /// `expected_seq`), and says what became of each, in order. An `Err` means none
    /// applied. The default applies them all with [`Storage::apply`].
    fn apply_each(&self, writes: Vec<AgentWrite>) -> Result<Vec<WriteResult>, StoreError> {
        let n = writes.len();
        self.apply(writes)?;
        Ok(vec![WriteResult::Applied; n])
    }

    /// A shared store's current record of `agent` with its limiter state (one read);
    /// `None` for an agent never created. The default, for a store whose checkpoints lag
    /// its journal, is the checkpoint with a fresh limiter: only a shared store is asked.
    fn record(&self, agent: &AgentId) -> Result<Option<(AgentState, RateState)>, StoreError> {
        Ok(self.checkpoint(agent)?.map(|s| (s, RateState::default())))
    }

    /// [`Storage::record`] of several agents, in order, in as few round trips as the
    /// backend can: the engine reads every agent of a run at once.
    #[allow(clippy::type_complexity)]
    fn records(
        &self,
        agents: &[AgentId],
    ) -> Result<Vec<Option<(AgentState, RateState)>>, StoreError> {
        agents.iter().map(|a| self.record(a)).collect()
    }

    /// [`Storage::find_key`] of several `(agent, key, slot)`, in order, in as few round
    /// trips as the backend can.
    fn find_keys(
        &self,
        lookups: &[(AgentId, IdempotencyKey, u128)],
        now_ms: TimestampMs,
    ) -> Result<Vec<Option<KeyEntry>>, StoreError> {
        lookups
            .iter()
            .map(|(agent, key, slot)| self.find_key(agent, key, *slot, now_ms))
            .collect()
    }

    /// Every agent checkpoint.
    fn load_agents(&self) -> Result<Vec<AgentState>, StoreError>;

    /// The newest checkpoint of `agent` among the applied writes (synced or not) and the
    /// store; `None` for an agent never created. Its journal may go on past it.
    /// The default reads every checkpoint: a backend with an index by agent overrides it.
    fn checkpoint(&self, agent: &AgentId) -> Result<Option<AgentState>, StoreError> {
        Ok(self.load_agents()?.into_iter().find(|a| a.id == *agent))
    }

    /// Ids of the agents with a checkpoint (applied or stored) after `after`, ascending, at
    /// most `limit`.
    fn agent_ids(&self, after: Option<&AgentId>, limit: usize) -> Result<Vec<AgentId>, StoreError> {
        let mut ids: Vec<AgentId> = self
            .load_agents()?
            .into_iter()
            .map(|a| a.id)
            .filter(|id| after.is_none_or(|a| id > a))
            .collect();
        ids.sort();
        ids.truncate(limit);
        Ok(ids)
    }

    /// How many agents have a checkpoint.
    fn agent_count(&self) -> Result<u64, StoreError> {
        Ok(self.load_agents()?.len() as u64)
    }

    /// The agents with an open hold, from an index of open holds kept beside the journal,
    /// at open (nothing applied yet); `None` when the backend keeps no such index, or it is
    /// not complete yet (then the engine loads every agent once and calls
    /// [`Storage::backfill_holds`]).
    fn hold_agents(&self) -> Result<Option<Vec<AgentId>>, StoreError> {
        Ok(None)
    }

    /// Rebuilds the index of open holds from `agents` (every agent with an open hold, as
    /// recovered) and marks it complete.
    fn backfill_holds(&self, _agents: &[AgentState]) -> Result<(), StoreError> {
        Ok(())
    }

    /// Entries of the index of credit grant expiries with `from_ms ≤ expires_at_ms ≤
    /// through_ms` and, when `after` is given, past that entry's key; in expiry order
    /// (ties in the backend's key order), at most `limit`. Only what the backend has indexed
    /// is shown: a grant issued moments ago may be missing until the next indexing pass.
    /// The default, for a backend without such an index, is empty.
    fn grant_expiries(
        &self,
        _from_ms: TimestampMs,
        _after: Option<&[u8]>,
        _through_ms: TimestampMs,
        _limit: usize,
    ) -> Result<Vec<GrantExpiry>, StoreError> {
        Ok(Vec::new())
    }

    /// Removes entries of the index of grant expiries by key. Losing a removal to a crash
    /// is harmless: the sweep then looks at that agent once more.
    fn remove_grant_expiries(&self, _keys: &[Vec<u8>]) -> Result<(), StoreError> {
        Ok(())
    }

    /// False when the index of grant expiries is not complete yet (a directory from an
    /// older build): the engine then loads every agent once and calls
    /// [`Storage::backfill_grant_expiries`]. A backend without the index is complete.
    fn grant_expiries_complete(&self) -> Result<bool, StoreError> {
        Ok(true)
    }

    /// Adds the live grants with an expiry of `agents` (every agent, as recovered) to the
    /// index of grant expiries and marks it complete.
    fn backfill_grant_expiries(&self, _agents: &[AgentState]) -> Result<(), StoreError> {
        Ok(())
    }

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

    /// Durable journal entries of every agent from `from` on, in commit order, at most
    /// `limit`. Only what the backend holds durably and in its read index is shown.
    fn feed(&self, from: FeedCursor, limit: usize) -> Result<FeedPage, StoreError>;

    /// The newest log position the feed can show, watched: it changes after every pass
    /// that makes more of the feed readable, so a reader can wait without polling.
    fn feed_watch(&self) -> tokio::sync::watch::Receiver<u64>;

    /// Bytes on disk, for the operator.
    fn size_on_disk(&self) -> Result<u64, StoreError>;

    /// Like [`Storage::journal`], but including entries applied and not yet durable: for
    /// the engine's own idempotent replays, whose answers wait for the group commit anyway.
    /// Client reads use `journal`, which shows durable entries only.
    fn journal_staged(
        &self,
        agent: &AgentId,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        self.journal(agent, after_seq, limit)
    }

    /// The newest use of `key` by `agent` (whose slot is `slot`) written at or after
    /// `now_ms - retention`, in applied writes or in the key index; `None` when unknown.
    fn find_key(
        &self,
        agent: &AgentId,
        key: &IdempotencyKey,
        slot: u128,
        now_ms: TimestampMs,
    ) -> Result<Option<KeyEntry>, StoreError>;

    /// A key used at `at_ms` whose entries are about to be applied: lets the index find it
    /// before it reaches the disk.
    fn note_key(&self, slot: u128, at_ms: TimestampMs);

    /// True when the key index must be rebuilt from the journal (a data directory from a
    /// build without one, or whose index was deleted), before anything is served.
    fn needs_key_backfill(&self) -> bool {
        false
    }

    /// Writes the keys found in the journal into the key index and marks it complete.
    fn backfill_keys(&self, _keys: Vec<(u128, KeyEntry)>) -> Result<(), StoreError> {
        Ok(())
    }

    /// The key index's size and effective window.
    fn key_index_status(&self) -> KeyIndexStatus {
        KeyIndexStatus::default()
    }

    /// Journal entries applied but not yet where reads find them without help (for a
    /// backend that indexes behind its log); a gauge for the operator.
    fn backlog_events(&self) -> u64 {
        0
    }

    /// Why the backend stopped taking writes, if it did (a failed write or fsync, a panic
    /// in a background thread): the engine is then not ready.
    fn failure(&self) -> Option<String> {
        None
    }
}
