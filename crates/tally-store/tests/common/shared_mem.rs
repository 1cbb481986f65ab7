//! A shared store in memory, for the engine's shared-store mode without a Redis Cluster:
//! several engines over one `SharedMem` are several nodes. Per-agent compare-and-set on
//! the version like the Redis script, a due index of hold and grant expiries, idempotency
//! records, and switches that make writes conflict or fail the way a cluster does.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use tally_core::{AgentId, AgentState, Event, IdempotencyKey, RateState, TimestampMs};
use tally_store::{
    AgentWrite, FeedCursor, FeedPage, GrantExpiry, KeyEntry, Storage, StoreError, WriteResult,
};

#[derive(Debug, Default)]
struct Agent {
    state: Option<AgentState>,
    rate: RateState,
    journal: Vec<Event>,
}

#[derive(Debug, Default)]
struct Data {
    agents: BTreeMap<AgentId, Agent>,
    keys: HashMap<(AgentId, IdempotencyKey), KeyEntry>,
    /// (due ms, agent): the index of hold and grant expiries.
    due: BTreeSet<(u64, AgentId)>,
}

#[derive(Debug)]
pub struct SharedMem {
    data: Mutex<Data>,
    retention_ms: u64,
    /// Writes still to answer `Unavailable` (the first after the switch is set).
    unavailable_writes: AtomicU64,
    /// Writes still to answer `Unavailable` after applying them (a reply lost in a failover).
    lost_replies: AtomicU64,
    /// Reads (`record`) still to fail with `Unavailable`.
    unavailable_reads: AtomicU64,
    /// Writes still to answer `Conflict` (as if another node had just written the agent).
    forced_conflicts: AtomicU64,
    pub writes_applied: AtomicU64,
    pub conflicts: AtomicU64,
    feed: tokio::sync::watch::Sender<u64>,
}

fn due_key(due_ms: u64, agent: &AgentId) -> Vec<u8> {
    let mut key = due_ms.to_be_bytes().to_vec();
    key.extend_from_slice(agent.as_str().as_bytes());
    key
}

fn take_one(counter: &AtomicU64) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

impl SharedMem {
    pub fn new(retention_ms: u64) -> Self {
        Self {
            data: Mutex::default(),
            retention_ms,
            unavailable_writes: AtomicU64::new(0),
            lost_replies: AtomicU64::new(0),
            unavailable_reads: AtomicU64::new(0),
            forced_conflicts: AtomicU64::new(0),
            writes_applied: AtomicU64::new(0),
            conflicts: AtomicU64::new(0),
            feed: tokio::sync::watch::channel(0).0,
        }
    }

    /// The next `n` agent writes are refused as unreachable (nothing applied).
    pub fn refuse_writes(&self, n: u64) {
        self.unavailable_writes.store(n, Ordering::SeqCst);
    }

    /// The next `n` agent writes are applied but answered `Unavailable`.
    pub fn lose_replies(&self, n: u64) {
        self.lost_replies.store(n, Ordering::SeqCst);
    }

    /// The next `n` agent writes meet a "newer version" (nothing applied).
    pub fn force_conflicts(&self, n: u64) {
        self.forced_conflicts.store(n, Ordering::SeqCst);
    }

    /// The next `n` record reads fail as unreachable.
    pub fn refuse_reads(&self, n: u64) {
        self.unavailable_reads.store(n, Ordering::SeqCst);
    }

    /// The journal of `agent` as stored.
    pub fn journal_of(&self, agent: &AgentId) -> Vec<Event> {
        let data = self.data.lock().expect("lock");
        data.agents
            .get(agent)
            .map(|a| a.journal.clone())
            .unwrap_or_default()
    }

    fn apply_one(&self, data: &mut Data, w: AgentWrite) -> WriteResult {
        if take_one(&self.unavailable_writes) {
            return WriteResult::Unavailable("refused by the test".into());
        }
        if take_one(&self.forced_conflicts) {
            self.conflicts.fetch_add(1, Ordering::SeqCst);
            return WriteResult::Conflict;
        }
        let agent = data.agents.entry(w.agent.clone()).or_default();
        let version = agent.state.as_ref().map_or(0, |s| s.last_seq);
        let rate = agent.state.as_ref().map(|_| &agent.rate);
        if version != w.expected_seq
            || agent.journal.len() as u64 != version
            || rate != w.rate_before.as_ref()
        {
            self.conflicts.fetch_add(1, Ordering::SeqCst);
            return WriteResult::Conflict;
        }
        let state = w.checkpoint.expect("a shared store gets every record");
        assert_eq!(
            state.last_seq,
            w.expected_seq + w.events.len() as u64,
            "the record is as of the write's last event"
        );
        for (i, e) in w.events.iter().enumerate() {
            assert_eq!(e.seq, w.expected_seq + 1 + i as u64, "dense journal");
        }
        let mut group: Option<(IdempotencyKey, KeyEntry)> = None;
        for e in &w.events {
            let Some(key) = &e.idempotency_key else {
                continue;
            };
            match &mut group {
                Some((k, entry)) if k == key && entry.fingerprint == e.fingerprint => {
                    entry.events += 1;
                }
                _ => {
                    if let Some((k, entry)) = group.take() {
                        data.keys.insert((w.agent.clone(), k), entry);
                    }
                    group = Some((
                        key.clone(),
                        KeyEntry {
                            fingerprint: e.fingerprint,
                            first_seq: e.seq,
                            events: 1,
                            at_ms: e.at_ms,
                        },
                    ));
                }
            }
        }
        if let Some((k, entry)) = group {
            data.keys.insert((w.agent.clone(), k), entry);
        }
        if let Some(due) = state.next_expiry_ms() {
            data.due.insert((due, w.agent.clone()));
        }
        let agent = data.agents.get_mut(&w.agent).expect("just made");
        agent.journal.extend(w.events);
        agent.state = Some(state);
        agent.rate = w.rate.expect("a shared store gets every limiter");
        self.writes_applied.fetch_add(1, Ordering::SeqCst);
        if take_one(&self.lost_replies) {
            return WriteResult::Unavailable("reply lost (the test)".into());
        }
        WriteResult::Applied
    }
}

impl Storage for SharedMem {
    fn apply(&self, writes: Vec<AgentWrite>) -> Result<(), StoreError> {
        match self
            .apply_each(writes)?
            .into_iter()
            .find(|r| *r != WriteResult::Applied)
        {
            None => Ok(()),
            Some(r) => Err(StoreError::Unavailable(format!("{r:?}"))),
        }
    }

    fn apply_each(&self, writes: Vec<AgentWrite>) -> Result<Vec<WriteResult>, StoreError> {
        let mut data = self.data.lock().expect("lock");
        Ok(writes
            .into_iter()
            .map(|w| self.apply_one(&mut data, w))
            .collect())
    }

    fn sync(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn shared(&self) -> bool {
        true
    }

    fn record(&self, agent: &AgentId) -> Result<Option<(AgentState, RateState)>, StoreError> {
        if take_one(&self.unavailable_reads) {
            return Err(StoreError::Unavailable("refused by the test".into()));
        }
        let data = self.data.lock().expect("lock");
        Ok(data
            .agents
            .get(agent)
            .and_then(|a| a.state.clone().map(|s| (s, a.rate.clone()))))
    }

    fn load_agents(&self) -> Result<Vec<AgentState>, StoreError> {
        let data = self.data.lock().expect("lock");
        Ok(data
            .agents
            .values()
            .filter_map(|a| a.state.clone())
            .collect())
    }

    fn checkpoint(&self, agent: &AgentId) -> Result<Option<AgentState>, StoreError> {
        Ok(self.record(agent)?.map(|(s, _)| s))
    }

    fn hold_agents(&self) -> Result<Option<Vec<AgentId>>, StoreError> {
        Ok(Some(Vec::new()))
    }

    fn grant_expiries(
        &self,
        from_ms: TimestampMs,
        after: Option<&[u8]>,
        through_ms: TimestampMs,
        limit: usize,
    ) -> Result<Vec<GrantExpiry>, StoreError> {
        let data = self.data.lock().expect("lock");
        Ok(data
            .due
            .iter()
            .filter(|(due, _)| (from_ms..=through_ms).contains(due))
            .map(|(due, agent)| GrantExpiry {
                key: due_key(*due, agent),
                agent: agent.clone(),
                grant_id: 0,
                expires_at_ms: *due,
            })
            .filter(|g| after.is_none_or(|a| g.key.as_slice() > a))
            .take(limit)
            .collect())
    }

    fn remove_grant_expiries(&self, keys: &[Vec<u8>]) -> Result<(), StoreError> {
        let mut data = self.data.lock().expect("lock");
        data.due
            .retain(|(due, agent)| !keys.contains(&due_key(*due, agent)));
        Ok(())
    }

    fn journal(
        &self,
        agent: &AgentId,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        let data = self.data.lock().expect("lock");
        Ok(data.agents.get(agent).map_or_else(Vec::new, |a| {
            a.journal
                .iter()
                .filter(|e| e.seq > after_seq)
                .take(limit)
                .cloned()
                .collect()
        }))
    }

    fn journal_rev(
        &self,
        agent: &AgentId,
        before_seq: u64,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        let data = self.data.lock().expect("lock");
        Ok(data.agents.get(agent).map_or_else(Vec::new, |a| {
            a.journal
                .iter()
                .rev()
                .filter(|e| e.seq < before_seq)
                .take(limit)
                .cloned()
                .collect()
        }))
    }

    fn feed(&self, _from: FeedCursor, _limit: usize) -> Result<FeedPage, StoreError> {
        Err(StoreError::Unsupported("the change feed"))
    }

    fn feed_watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.feed.subscribe()
    }

    fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(0)
    }

    fn find_key(
        &self,
        agent: &AgentId,
        key: &IdempotencyKey,
        _slot: u128,
        now_ms: TimestampMs,
    ) -> Result<Option<KeyEntry>, StoreError> {
        let data = self.data.lock().expect("lock");
        Ok(data
            .keys
            .get(&(agent.clone(), key.clone()))
            .filter(|e| e.at_ms.saturating_add(self.retention_ms) >= now_ms)
            .copied())
    }

    fn note_key(&self, _slot: u128, _at_ms: TimestampMs) {}
}
