//! The idempotency cache of one shard: the keys used most recently, by which request, for
//! which journal entries. In memory, bounded by a key count; a key that falls out of it is
//! still found in the store's key index on disk (`keyindex.rs`) for the whole retention
//! window. The keys and fingerprints themselves are durable inside the journal entries, so
//! this is a cache of a cache.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

use sha2::{Digest, Sha256};
use tally_core::idempotency::{judge, Seen, Verdict};
use tally_core::{AgentId, IdempotencyKey, TimestampMs};

/// A remembered key: the request's fingerprint and the journal entries it wrote.
pub use crate::storage::KeyEntry as Entry;

/// The key of the map: 128 bits of SHA-256 over (agent, key), so an entry costs a fixed
/// ~80 bytes however long the agent id and key are.
pub fn slot(agent: &AgentId, key: &IdempotencyKey) -> u128 {
    let mut h = Sha256::new();
    h.update((agent.as_str().len() as u64).to_be_bytes());
    h.update(agent.as_str().as_bytes());
    h.update(key.as_str().as_bytes());
    let digest = h.finalize();
    let mut first = [0u8; 16];
    first.copy_from_slice(&digest[..16]);
    u128::from_be_bytes(first)
}

/// What the cache did when it made room.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Evicted {
    /// Entries dropped because their window passed.
    pub expired: u64,
    /// Entries dropped while still inside the window because the count bound was hit;
    /// they are still on disk.
    pub early: u64,
}

/// The map is split in this many parts by the slot's top bits. A hash map grows by
/// rehashing all of itself at once: one map of half a million keys stalled its shard for
/// tens of milliseconds (wrk -c64 durable debits: p99 ~70 ms, max ~160 ms); in 64 parts
/// each rehash is a 64th of that (p99 ~5.5 ms, max ~20 ms).
const PARTS: usize = 64;

fn part(slot: u128) -> usize {
    (slot >> (128 - PARTS.trailing_zeros())) as usize
}

/// Slots are SHA-256 output already, so their low bits serve as the hash as they are
/// (SipHash over them cost the shard ~2% of its time for nothing).
#[derive(Debug, Default)]
struct SlotHasher(u64);

impl Hasher for SlotHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only reached if something other than a u128 is hashed; still a fair hash.
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn write_u128(&mut self, slot: u128) {
        self.0 = slot as u64;
    }
}

type SlotMap = HashMap<u128, Entry, BuildHasherDefault<SlotHasher>>;

#[derive(Debug)]
pub struct Index {
    parts: Vec<SlotMap>,
    len: usize,
    order: BlockQueue<(TimestampMs, u128)>,
    retention_ms: u64,
    keys_max: usize,
}

impl Index {
    pub fn new(retention_ms: u64, keys_max: usize) -> Self {
        Self {
            parts: (0..PARTS).map(|_| SlotMap::default()).collect(),
            len: 0,
            order: BlockQueue::default(),
            retention_ms,
            keys_max: keys_max.max(1),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    fn get(&self, slot: u128) -> Option<&Entry> {
        self.parts[part(slot)].get(&slot)
    }

    /// The verdict for a request with `fingerprint` under `slot`, and the entry to replay.
    pub fn judge(
        &self,
        slot: u128,
        fingerprint: u128,
        now_ms: TimestampMs,
    ) -> (Verdict, Option<Entry>) {
        let entry = self.get(slot).copied();
        let seen = entry.map(|e| Seen {
            fingerprint: e.fingerprint,
            at_ms: e.at_ms,
        });
        (judge(seen, fingerprint, now_ms, self.retention_ms), entry)
    }

    /// Remembers a key, then drops what the window and the count bound no longer allow.
    pub fn insert(&mut self, slot: u128, entry: Entry, now_ms: TimestampMs) -> Evicted {
        if self.parts[part(slot)].insert(slot, entry).is_none() {
            self.len += 1;
        }
        self.order.push_back((entry.at_ms, slot));
        self.evict(now_ms)
    }

    /// Drops entries past the window, and the oldest while over the count bound.
    pub fn evict(&mut self, now_ms: TimestampMs) -> Evicted {
        let mut evicted = Evicted::default();
        while let Some(&(at_ms, slot)) = self.order.front() {
            let expired = now_ms.saturating_sub(at_ms) >= self.retention_ms;
            if !expired && self.len <= self.keys_max {
                break;
            }
            self.order.pop_front();
            // The slot may have been reused after it expired; only drop the entry this
            // queue position belongs to.
            if self.get(slot).is_some_and(|e| e.at_ms == at_ms) {
                self.parts[part(slot)].remove(&slot);
                self.len -= 1;
                if expired {
                    evicted.expired += 1;
                } else {
                    evicted.early += 1;
                }
            }
        }
        if self.order.len() > 2 * self.keys_max {
            // Stale positions of reused slots: compact rather than let the queue grow.
            let parts = &self.parts;
            self.order
                .retain(|(at, s)| parts[part(*s)].get(s).is_some_and(|e| e.at_ms == *at));
        }
        evicted
    }
}

/// A FIFO queue in fixed blocks. A `VecDeque` grows by copying every position at once (at
/// the default bound of ten million keys, 240 MB in one go on the shard's thread); this
/// one only ever moves pointers to blocks.
#[derive(Debug)]
struct BlockQueue<T> {
    blocks: VecDeque<VecDeque<T>>,
    len: usize,
}

const BLOCK_LEN: usize = 4_096;

impl<T> Default for BlockQueue<T> {
    fn default() -> Self {
        Self {
            blocks: VecDeque::new(),
            len: 0,
        }
    }
}

impl<T> BlockQueue<T> {
    fn len(&self) -> usize {
        self.len
    }

    fn push_back(&mut self, item: T) {
        match self.blocks.back_mut() {
            Some(block) if block.len() < BLOCK_LEN => block.push_back(item),
            _ => {
                let mut block = VecDeque::with_capacity(BLOCK_LEN);
                block.push_back(item);
                self.blocks.push_back(block);
            }
        }
        self.len += 1;
    }

    fn front(&self) -> Option<&T> {
        self.blocks.front().and_then(VecDeque::front)
    }

    fn pop_front(&mut self) -> Option<T> {
        let block = self.blocks.front_mut()?;
        let item = block.pop_front();
        if block.is_empty() {
            self.blocks.pop_front();
        }
        if item.is_some() {
            self.len -= 1;
        }
        item
    }

    fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) {
        for block in &mut self.blocks {
            block.retain(&mut keep);
        }
        self.blocks.retain(|b| !b.is_empty());
        self.len = self.blocks.iter().map(VecDeque::len).sum();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_block_queue_is_a_fifo_queue() {
        let mut q = BlockQueue::default();
        let mut model = VecDeque::new();
        for i in 0..(3 * BLOCK_LEN + 5) {
            q.push_back(i);
            model.push_back(i);
            if i % 3 == 0 {
                assert_eq!(q.pop_front(), model.pop_front());
            }
            assert_eq!(q.len(), model.len());
            assert_eq!(q.front(), model.front());
        }
        q.retain(|i| i % 2 == 0);
        model.retain(|i| i % 2 == 0);
        assert_eq!(q.len(), model.len());
        while let Some(i) = model.pop_front() {
            assert_eq!(q.pop_front(), Some(i));
        }
        assert_eq!(q.pop_front(), None);
        assert_eq!(q.len(), 0);
    }

    #[test]
    fn every_slot_has_a_part() {
        assert_eq!(part(0), 0);
        assert_eq!(part(u128::MAX), PARTS - 1);
        assert_eq!(part(1 << 122), 1);
    }

    fn entry(fp: u128, at_ms: u64) -> Entry {
        Entry {
            fingerprint: fp,
            first_seq: 1,
            events: 1,
            at_ms,
        }
    }

    #[test]
    fn replay_conflict_and_window() {
        let mut idx = Index::new(1_000, 10);
        idx.insert(1, entry(7, 0), 0);
        assert_eq!(idx.judge(1, 7, 999).0, Verdict::Replay);
        assert_eq!(idx.judge(1, 8, 999).0, Verdict::Conflict);
        assert_eq!(idx.judge(1, 7, 1_000).0, Verdict::New);
        assert_eq!(idx.evict(1_000).expired, 1);
        assert_eq!(idx.len(), 0);
    }

    #[test]
    fn count_bound_shortens_the_window_and_says_so() {
        let mut idx = Index::new(u64::MAX, 3);
        let mut early = 0;
        for i in 0..10u128 {
            early += idx.insert(i, entry(i, i as u64), i as u64).early;
            assert!(idx.len() <= 3);
        }
        assert_eq!(early, 7);
        assert_eq!(idx.judge(9, 9, 10).0, Verdict::Replay);
        assert_eq!(
            idx.judge(6, 6, 10).0,
            Verdict::New,
            "oldest forgotten first"
        );
    }

    #[test]
    fn reused_slot_survives_its_old_queue_position() {
        let mut idx = Index::new(100, 10);
        idx.insert(1, entry(7, 0), 0);
        idx.insert(1, entry(8, 150), 150);
        assert_eq!(
            idx.evict(160).expired,
            0,
            "the old position is stale, not the entry"
        );
        assert_eq!(idx.judge(1, 8, 160).0, Verdict::Replay);
    }

    #[test]
    fn slots_separate_agents_and_keys() {
        let a = AgentId::new("a").expect("valid");
        let ab = AgentId::new("ab").expect("valid");
        let k = |s: &str| IdempotencyKey::new(s).expect("valid");
        assert_ne!(slot(&a, &k("bc")), slot(&ab, &k("c")));
        assert_ne!(slot(&a, &k("x")), slot(&a, &k("y")));
        assert_eq!(slot(&a, &k("x")), slot(&a, &k("x")));
    }
}
