//! Recovery: an agent is its newest checkpoint with the journal entries after it evolved
//! by the core's `evolve`. The engine loads an agent so when a shard first needs it
//! ([`load_agent`]); only a data directory from an older build (no key index or no index
//! of open holds) is recovered whole at open ([`recover`], on all cores), collecting the
//! idempotency keys of the retention window from the journal when the key index needs them.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use tally_core::{evolve, AgentState, Event};

use crate::config::EngineConfig;
use crate::error::StoreError;
use crate::idem;
use crate::keyindex;
use crate::storage::Storage;

/// Journal entries read per page.
const PAGE_LEN: usize = 4_096;

/// A remembered key found in the journal.
#[derive(Debug)]
pub(crate) struct RecoveredKey {
    pub slot: u128,
    pub entry: idem::Entry,
}

/// What recovery found.
#[derive(Debug)]
pub(crate) struct Recovered {
    pub agents: Vec<AgentState>,
    /// Idempotency keys inside the window, oldest first, at most the key bound.
    pub keys: Vec<RecoveredKey>,
    /// Keys inside the window left out because of the key bound.
    pub forgotten_early: u64,
    /// Journal entries evolved on top of checkpoints.
    pub replayed: u64,
}

/// Orders keys by age so a bounded heap keeps the newest.
struct ByAge(RecoveredKey);

impl ByAge {
    fn age(&self) -> (u64, u64) {
        (self.0.entry.at_ms, self.0.entry.first_seq)
    }
}

impl PartialEq for ByAge {
    fn eq(&self, other: &Self) -> bool {
        self.age() == other.age()
    }
}
impl Eq for ByAge {}
impl PartialOrd for ByAge {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for ByAge {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.age().cmp(&other.age())
    }
}

/// The newest `max` keys seen, in memory bounded by `max`.
struct NewestKeys {
    heap: BinaryHeap<Reverse<ByAge>>,
    max: usize,
    dropped: u64,
}

impl NewestKeys {
    fn new(max: usize) -> Self {
        Self {
            heap: BinaryHeap::new(),
            max,
            dropped: 0,
        }
    }

    fn push(&mut self, key: RecoveredKey) {
        self.heap.push(Reverse(ByAge(key)));
        if self.heap.len() > self.max {
            self.heap.pop();
            self.dropped += 1;
        }
    }
}

/// Loads `id` as of its newest applied event: its newest checkpoint, then the journal
/// entries after it (applied ones too: the shard that asks is their only writer, and its
/// answers that depend on them wait for their group commit). `None` for an unknown agent.
pub(crate) fn load_agent(
    storage: &dyn Storage,
    id: &tally_core::AgentId,
) -> Result<Option<AgentState>, StoreError> {
    let Some(mut agent) = storage.checkpoint(id)? else {
        return Ok(None);
    };
    loop {
        let tail = storage.journal_staged(id, agent.last_seq, PAGE_LEN)?;
        if tail.is_empty() {
            break;
        }
        for e in &tail {
            agent = evolve(Some(agent), id, e)?;
        }
    }
    agent.check_invariants()?;
    Ok(Some(agent))
}

/// Recovers one agent: evolves its journal tail; with `keys`, collects its keys inside the
/// window.
fn recover_agent(
    storage: &dyn Storage,
    mut agent: AgentState,
    window_start_ms: u64,
    keys: Option<&mut NewestKeys>,
) -> Result<(AgentState, u64), StoreError> {
    let id = agent.id.clone();
    let checkpoint_seq = agent.last_seq;
    // Entries up to the checkpoint are only needed for their keys: walk back from it
    // to the window's start, then put them in sequence order.
    let mut before_checkpoint = Vec::new();
    let mut before = checkpoint_seq + 1;
    while keys.is_some() {
        let page = storage.journal_rev(&id, before, PAGE_LEN)?;
        let full = page.len() == PAGE_LEN;
        let reached_window_start = page.iter().any(|e| e.at_ms < window_start_ms);
        before = page.last().map_or(0, |e| e.seq);
        before_checkpoint.extend(
            page.into_iter()
                .filter(|e| e.at_ms >= window_start_ms && e.idempotency_key.is_some()),
        );
        if !full || reached_window_start {
            break;
        }
    }
    let mut keyed: Vec<Event> = before_checkpoint.into_iter().rev().collect();
    let mut replayed = 0;
    loop {
        let tail = storage.journal(&id, agent.last_seq, PAGE_LEN)?;
        if tail.is_empty() {
            break;
        }
        for e in &tail {
            agent = evolve(Some(agent), &id, e)?;
            replayed += 1;
        }
        if keys.is_some() {
            keyed.extend(
                tail.into_iter()
                    .filter(|e| e.at_ms >= window_start_ms && e.idempotency_key.is_some()),
            );
        }
    }
    if let Some(keys) = keys {
        let mut found = Vec::new();
        keyindex::keys_of(&id, &keyed, &mut found);
        for (slot, entry) in found {
            keys.push(RecoveredKey { slot, entry });
        }
    }
    agent.check_invariants()?;
    Ok((agent, replayed))
}

/// One thread's share: its agents, its newest keys, entries replayed.
type ChunkRecovered = (Vec<AgentState>, NewestKeys, u64);

/// Loads and evolves every agent, on up to one thread per core; with `collect_keys`, also
/// gathers the keys inside the window (the newest `idempotency_keys_max`).
pub(crate) fn recover(
    storage: &dyn Storage,
    config: &EngineConfig,
    now_ms: u64,
    collect_keys: bool,
) -> Result<Recovered, StoreError> {
    let checkpoints = storage.load_agents()?;
    let window_start_ms = now_ms.saturating_sub(config.idempotency_retention_ms);
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 16);
    let chunk_len = checkpoints.len().div_ceil(threads).max(1);
    let mut chunks: Vec<Vec<AgentState>> = Vec::new();
    let mut rest = checkpoints;
    while rest.len() > chunk_len {
        let tail = rest.split_off(chunk_len);
        chunks.push(rest);
        rest = tail;
    }
    chunks.push(rest);
    let keys_max = usize::try_from(config.idempotency_keys_max).unwrap_or(usize::MAX);
    let results: Vec<Result<ChunkRecovered, StoreError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|chunk| {
                scope.spawn(move || {
                    let mut keys = NewestKeys::new(keys_max);
                    let mut agents = Vec::with_capacity(chunk.len());
                    let mut replayed = 0;
                    for agent in chunk {
                        let (agent, n) = recover_agent(
                            storage,
                            agent,
                            window_start_ms,
                            collect_keys.then_some(&mut keys),
                        )?;
                        agents.push(agent);
                        replayed += n;
                    }
                    Ok((agents, keys, replayed))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a recovery thread panicked"))
            .collect()
    });
    let mut agents = Vec::new();
    let mut newest = NewestKeys::new(keys_max);
    let mut replayed = 0;
    for r in results {
        let (a, keys, n) = r?;
        agents.extend(a);
        newest.dropped += keys.dropped;
        for Reverse(ByAge(k)) in keys.heap {
            newest.push(k);
        }
        replayed += n;
    }
    let forgotten_early = newest.dropped;
    let mut keys: Vec<RecoveredKey> = newest.heap.into_iter().map(|Reverse(ByAge(k))| k).collect();
    // Oldest first, so the engine's index evicts in age order afterwards.
    keys.sort_by_key(|k| (k.entry.at_ms, k.entry.first_seq));
    Ok(Recovered {
        agents,
        keys,
        forgotten_early,
        replayed,
    })
}
