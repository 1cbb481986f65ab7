//! The durable store: a write-ahead log for commits, sled for everything read, and the
//! idempotency key index beside them.
//!
//! A group commit appends the run's writes to the WAL (`wal.rs`: one `write`, one
//! `fdatasync`) and is then acknowledged. An indexer thread moves what the WAL holds into
//! sled every `INDEX_INTERVAL_MS` (or sooner under load) as one atomic `apply_batch` and a
//! `flush`, and the keys of those entries into the key index (`keyindex.rs`). Until then
//! reads see those writes in memory. Opening replays the WAL records sled does not have yet
//! (`m/wal` holds the newest lsn sled has).
//!
//! Durability, in order (see ARCHITECTURE.md):
//! 1. An answer is released only after the WAL `fdatasync` that covers its entries.
//! 2. Reads by clients show only entries whose WAL record was synced: the indexer takes
//!    only synced writes, and the read overlay holds only synced writes.
//! 3. A WAL segment is deleted only after (a) sled holds all of it, (b) every sled file
//!    (`db`, `conf`, `snap.*`, `blobs/*`) and directory was fsynced by us — sled 0.34.7's
//!    `flush()` ends in `sync_file_range` on Linux, which neither commits file metadata nor
//!    flushes the drive's cache, and sled never fsyncs its blob files — and (c) every key
//!    of it is in a key-index run that was fsynced. This holds at the indexer's deletions,
//!    at open (after the replay) and at close. Measured on LazyFS before rule 3(b): a crash
//!    right after a restart lost ~25 % of a round's acknowledged debits.
//!
//! Why a WAL, measured on two cores: one sled key per entry with sled's `flush` as the
//! group commit held durable debits over HTTP to ~30k/s; with the WAL in front the same wrk
//! run does ~48k/s, and the engine bench 240k/s instead of 82k/s. The indexer writes many
//! entries of an agent as one chunk, so sled sees a few keys per agent per interval.
//!
//! sled's keys, one tree, so one `apply_batch` is atomic across all of them:
//! - `a/<agent>`: agent record (a checkpoint; it holds the last sequence it includes);
//! - `j/<agent>/<first seq as 8 bytes big-endian>`: a chunk of consecutive journal entries
//!   (schema 1 wrote one entry per key; those still read);
//! - `x/<agent>/<hold seq as 8 bytes big-endian>`: an open hold (its expiry), written and
//!   removed with the journal entries that place and close it, so that opening finds the
//!   agents whose holds the sweep must see without reading every agent;
//! - `e/<expires_at_ms as 8 bytes big-endian><agent>/<grant id as 8 bytes big-endian>`
//!   (empty value): a credit grant that expires, in expiry order, inserted by the same
//!   `apply_batch` as the `grant` journal entry that issued it (the grant id is that
//!   entry's seq: grants that expire never merge). Nothing else writes or removes it here:
//!   the engine's grant sweep (`grant_sweep.rs`) reads the keys that are due, has each
//!   agent's shard expire what is due, and only then removes them. A key whose grant was
//!   spent out, or expired by the agent's own command, is therefore removed after one
//!   harmless look; losing a removal to a crash costs one more look;
//! - `f/<lsn as 8 bytes big-endian>`: the change feed, a run of at most
//!   `FEED_CHUNK_ENTRIES_MAX` agent writes `(lsn, agent, first seq, count)` in lsn order
//!   (the order they were applied), keyed by the first one's lsn. Written by the same
//!   `apply_batch` as the journal chunks they point at, a few keys per pass rather than one
//!   per write. A replay at open indexes only records past `m/wal`, so runs never overlap.
//!   Directories from builds before the feed have no runs for their history: the feed
//!   starts at the first pass this build indexed;
//! - `m/schema`: the schema version; `m/wal`: the newest WAL lsn sled holds; `m/holds`:
//!   present once the `x/` index is complete (a directory from an older build gets it at
//!   its first open, from the agents recovered then); `m/grant_expiries`: the same for
//!   the `e/` index.
//!
//! Agent ids never contain `/`, so `j/<agent>/` is a prefix of that agent's entries only.
//! sled is pinned (`=0.34.7`) and is beta software with known crash bugs; the kill test and
//! the power-failure test are what let us trust it here.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use tally_core::{AgentId, AgentState, Event, EventKind, IdempotencyKey, TimestampMs};

use crate::codec;
use crate::error::StoreError;
use crate::keyindex::{self, KeyIndex, KeyIndexLimits};
use crate::storage::{
    AgentWrite, FeedCursor, FeedEntry, FeedPage, GrantExpiry, KeyEntry, KeyIndexStatus, Storage,
};
use crate::wal::{self, WalWriter};

/// The schema this build writes. Schema 1 (one journal entry per key, no WAL) and schema 2
/// (no key index) are read and upgraded on open; schema 3 has a complete key index.
pub const SCHEMA_VERSION: u32 = 3;
const SCHEMA_KEY: &[u8] = b"m/schema";
const WAL_KEY: &[u8] = b"m/wal";
const HOLDS_COMPLETE_KEY: &[u8] = b"m/holds";
const AGENT_PREFIX: &[u8] = b"a/";
/// The first key after every `a/` key (`0` follows `/`).
const AGENT_PREFIX_END: &[u8] = b"a0";
const HOLD_PREFIX: &[u8] = b"x/";
const GRANT_EXPIRIES_COMPLETE_KEY: &[u8] = b"m/grant_expiries";
const GRANT_EXPIRY_PREFIX: &[u8] = b"e/";
/// The first key after every `e/` key.
const GRANT_EXPIRY_PREFIX_END: &[u8] = b"e0";
const FEED_PREFIX: &[u8] = b"f/";
/// The first key after every `f/` key.
const FEED_PREFIX_END: &[u8] = b"f0";
/// Agent writes in one `f/` value, at most: with agent ids of at most
/// `AGENT_ID_LEN_MAX` (128) bytes that is under 40 KiB, well below the ~128 KiB past which
/// sled stores a leaf as a blob file, and a few KiB with typical ids.
const FEED_CHUNK_ENTRIES_MAX: usize = 256;
/// How long opening waits for sled's file lock.
const LOCK_WAIT_MS_MAX: u64 = 5_000;
/// The indexer moves the WAL's writes into sled at least this often.
pub const INDEX_INTERVAL_MS: u64 = 200;
/// ...and at once when this many events wait (or a quarter of the backlog bound, if less).
const INDEX_EVENTS_TRIGGER: usize = 16_384;
/// Events applied but not yet in sled, at most, unless configured; past it `apply` waits
/// for the indexer (and the shard queues, then HTTP, push back). Bounds the memory the
/// reads' overlay uses.
pub const INDEX_BACKLOG_EVENTS_MAX_DEFAULT: usize = 262_144;
/// The same bound in bytes of WAL payload (agent checkpoints and long metadata make some
/// entries far larger than others).
pub const INDEX_BACKLOG_BYTES_MAX_DEFAULT: usize = 128 << 20;
/// A journal chunk holds at most this many events...
const CHUNK_EVENTS_MAX: usize = 32;
/// ...and about this many bytes: sled writes a whole leaf (up to 16 keys) when it
/// consolidates one, and stores a leaf over ~128 KiB as a separate blob file.
const CHUNK_BYTES_MAX: usize = 4_096;
/// The key index's upkeep (merging runs, dropping hours) runs this often when idle.
const KEY_MAINTENANCE_INTERVAL_MS: u64 = 1_000;
/// Emptied staging maps kept for reuse, and the most memory each keeps: a map that grew
/// from empty at every group commit spent ~7 % of batched debits' CPU rehashing and
/// faulting in fresh pages. Bounded so that an idle server gives back a burst's maps.
const SPARE_PENDING_MAX: usize = 2;
const SPARE_PENDING_BYTES_MAX: usize = 1 << 20;
/// Idempotency keys on disk, at most, unless configured.
pub const IDEMPOTENCY_KEYS_MAX_DEFAULT: u64 = 100_000_000;
/// Keys held in memory by the key index's buffer (and by the shards' caches), unless
/// configured. Three quarters of 2^18 on purpose: the shards' caches split their keys over
/// 64 hash maps (3,072 each on one shard) and the buffer is one map, and a hash map
/// doubles its buckets past 7/8 full, so at 2^18 every map had just doubled and was half
/// empty. Measured with `million_agents`: ~70 MiB less RSS than 262,144 keys.
pub const IDEMPOTENCY_MEMORY_KEYS_MAX_DEFAULT: usize = 196_608;

/// How a store is opened: where, and its bounds.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub cache_bytes: u64,
    pub backlog_events_max: usize,
    pub backlog_bytes_max: usize,
    pub idempotency_retention_ms: u64,
    pub idempotency_keys_max: u64,
    pub idempotency_memory_keys_max: usize,
}

impl StoreOptions {
    pub fn new(cache_bytes: u64) -> Self {
        Self {
            cache_bytes,
            backlog_events_max: INDEX_BACKLOG_EVENTS_MAX_DEFAULT,
            backlog_bytes_max: INDEX_BACKLOG_BYTES_MAX_DEFAULT,
            idempotency_retention_ms: tally_core::idempotency::RETENTION_MS_DEFAULT,
            idempotency_keys_max: IDEMPOTENCY_KEYS_MAX_DEFAULT,
            idempotency_memory_keys_max: IDEMPOTENCY_MEMORY_KEYS_MAX_DEFAULT,
        }
    }
}

/// tally's data: a WAL, a sled database and the key index in one directory.
#[derive(Debug)]
pub struct SledStorage {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

#[derive(Debug)]
struct Shared {
    db: sled::Db,
    keys: KeyIndex,
    /// Held for a whole WAL append, so appends reach the file in lsn order.
    wal: Mutex<WalState>,
    staged: Mutex<Staged>,
    /// Wakes the indexer (work waiting, or stop) and appliers waiting for room.
    changed: Condvar,
    failure: OnceLock<String>,
    /// Set once the store closes; wakes the key index's upkeep.
    closing: Mutex<bool>,
    closing_cv: Condvar,
    /// `apply` waits while this many events (or bytes) are not yet in sled.
    backlog_max: usize,
    backlog_bytes_max: usize,
    /// The indexer starts early once this many wait.
    trigger: usize,
    files: SledFiles,
    /// The newest lsn sled holds (set after each pass's `apply_batch`): every feed entry
    /// at or below it is readable with its journal chunks, and none will be added below it.
    indexed_lsn: tokio::sync::watch::Sender<u64>,
    #[cfg(test)]
    panic_in_indexer: std::sync::atomic::AtomicBool,
    /// This many WAL deletions fail, as if `unlink` had.
    #[cfg(test)]
    fail_wal_removal: Mutex<u32>,
}

#[derive(Debug)]
struct WalState {
    writer: WalWriter,
    /// The previous append's buffer, kept for its capacity.
    spare: Vec<u8>,
}

/// Applied writes on their way to sled, oldest first: `in_flight` (being moved into sled),
/// `pending` (in the WAL, synced), `syncing` (being synced), `unsynced`.
#[derive(Debug)]
struct Staged {
    /// Framed WAL records of `unsynced`.
    bytes: Vec<u8>,
    next_lsn: u64,
    unsynced: Pending,
    syncing: Option<Pending>,
    pending: Pending,
    in_flight: Option<Arc<Pending>>,
    stopping: bool,
    /// Emptied `Pending`s, for their capacity (at most `SPARE_PENDING_MAX`).
    spares: Vec<Pending>,
}

impl Staged {
    fn parts(&self) -> impl Iterator<Item = &Pending> {
        self.in_flight
            .as_deref()
            .into_iter()
            .chain([&self.pending])
            .chain(self.syncing.as_ref())
            .chain([&self.unsynced])
    }

    /// The parts whose WAL records are synced: what clients may read.
    fn durable_parts(&self) -> impl Iterator<Item = &Pending> {
        self.in_flight.as_deref().into_iter().chain([&self.pending])
    }

    /// Events applied but not yet in sled.
    fn backlog(&self) -> usize {
        self.parts().map(|p| p.events).sum()
    }

    fn backlog_bytes(&self) -> usize {
        self.parts().map(|p| p.bytes).sum()
    }

    /// An empty `Pending`, with room from an earlier one when there is one.
    fn fresh(&mut self) -> Pending {
        self.spares.pop().unwrap_or_default()
    }

    /// Keeps `done`, emptied, for [`Staged::fresh`].
    fn recycle(&mut self, mut done: Pending) {
        if self.spares.len() < SPARE_PENDING_MAX {
            done.clear();
            self.spares.push(done);
        }
    }
}

/// Appends `newer` to `events`, taking its buffer when there is nothing to append to.
fn append(events: &mut Vec<Event>, mut newer: Vec<Event>) {
    if events.is_empty() {
        *events = newer;
    } else {
        events.append(&mut newer);
    }
}

/// Writes applied but not yet in sled, by agent.
#[derive(Debug, Default)]
struct Pending {
    agents: HashMap<AgentId, AgentPending>,
    events: usize,
    /// WAL payload bytes.
    bytes: usize,
    /// The lsns of the first and last WAL record here (0 when empty).
    first_lsn: u64,
    last_lsn: u64,
    /// Every write with events, in the order applied (the agents' map loses it): the
    /// change feed's entries.
    feed: Vec<FeedEntry>,
}

#[derive(Debug, Default)]
struct AgentPending {
    events: Vec<Event>,
    checkpoint: Option<AgentState>,
}

impl Pending {
    fn add(&mut self, write: AgentWrite, lsn: u64, bytes: usize) {
        if self.first_lsn == 0 {
            self.first_lsn = lsn;
        }
        if let Some(first) = write.events.first() {
            self.feed.push(FeedEntry {
                lsn,
                agent: write.agent.clone(),
                first_seq: first.seq,
                events: u32::try_from(write.events.len()).expect("a write holds < 2^32 events"),
            });
        }
        let entry = self.agents.entry(write.agent).or_default();
        debug_assert!(entry
            .events
            .last()
            .zip(write.events.first())
            .is_none_or(|(a, b)| a.seq + 1 == b.seq));
        self.events += write.events.len();
        self.bytes += bytes;
        append(&mut entry.events, write.events);
        if write.checkpoint.is_some() {
            entry.checkpoint = write.checkpoint;
        }
        self.last_lsn = lsn;
    }

    /// Appends `newer`, applied after everything here, leaving it empty (its maps keep
    /// their room).
    fn merge(&mut self, newer: &mut Pending) {
        if self.is_empty() {
            // Nothing to merge into: take `newer` whole rather than hash every agent again.
            std::mem::swap(self, newer);
            newer.clear();
            return;
        }
        for (agent, p) in newer.agents.drain() {
            let entry = self.agents.entry(agent).or_default();
            debug_assert!(entry
                .events
                .last()
                .zip(p.events.first())
                .is_none_or(|(a, b)| a.seq + 1 == b.seq));
            append(&mut entry.events, p.events);
            if p.checkpoint.is_some() {
                entry.checkpoint = p.checkpoint;
            }
        }
        debug_assert!(self
            .feed
            .last()
            .zip(newer.feed.first())
            .is_none_or(|(a, b)| a.lsn < b.lsn));
        self.feed.append(&mut newer.feed);
        self.events += newer.events;
        self.bytes += newer.bytes;
        if self.first_lsn == 0 {
            self.first_lsn = newer.first_lsn;
        }
        if newer.last_lsn != 0 {
            self.last_lsn = newer.last_lsn;
        }
        newer.clear();
    }

    fn is_empty(&self) -> bool {
        self.agents.is_empty()
    }

    /// Empties this, keeping at most `SPARE_PENDING_BYTES_MAX` of each map's room.
    fn clear(&mut self) {
        self.agents.clear();
        self.agents
            .shrink_to(SPARE_PENDING_BYTES_MAX / std::mem::size_of::<(AgentId, AgentPending)>());
        self.feed.clear();
        self.feed
            .shrink_to(SPARE_PENDING_BYTES_MAX / std::mem::size_of::<FeedEntry>());
        self.events = 0;
        self.bytes = 0;
        self.first_lsn = 0;
        self.last_lsn = 0;
    }
}

fn agent_key(agent: &AgentId) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + agent.as_str().len());
    k.extend_from_slice(b"a/");
    k.extend_from_slice(agent.as_str().as_bytes());
    k
}

fn hold_key(agent: &AgentId, hold_seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(3 + agent.as_str().len() + 8);
    k.extend_from_slice(HOLD_PREFIX);
    k.extend_from_slice(agent.as_str().as_bytes());
    k.push(b'/');
    k.extend_from_slice(&hold_seq.to_be_bytes());
    k
}

/// The agent of an `x/` key.
fn hold_key_agent(key: &[u8]) -> Result<AgentId, StoreError> {
    let bad = || StoreError::Corrupt(format!("hold index key {key:?}"));
    let id = key
        .strip_prefix(HOLD_PREFIX)
        .and_then(|k| k.len().checked_sub(9).map(|end| &k[..end]))
        .ok_or_else(bad)?;
    let id = std::str::from_utf8(id).map_err(|_| bad())?;
    AgentId::new(id).map_err(|_| bad())
}

/// Adds the `x/` index changes of `events` (consecutive, of one agent) to `batch`: a hold
/// placed is inserted, one captured, voided or expired removed (a batch keeps the last
/// change of a key, so a hold placed and closed in one batch leaves nothing).
fn index_holds(batch: &mut sled::Batch, agent: &AgentId, events: &[Event]) {
    for e in events {
        if let EventKind::HoldPlaced { expires_at_ms, .. } = e.kind {
            batch.insert(hold_key(agent, e.seq), codec::encode_u64(expires_at_ms));
        } else if let Some(hold_seq) = e.kind.closed_hold() {
            batch.remove(hold_key(agent, hold_seq));
        }
    }
}

fn grant_expiry_key(expires_at_ms: TimestampMs, agent: &AgentId, grant_id: u64) -> Vec<u8> {
    let id = agent.as_str().as_bytes();
    let mut k = Vec::with_capacity(GRANT_EXPIRY_PREFIX.len() + 8 + id.len() + 1 + 8);
    k.extend_from_slice(GRANT_EXPIRY_PREFIX);
    k.extend_from_slice(&expires_at_ms.to_be_bytes());
    k.extend_from_slice(id);
    k.push(b'/');
    k.extend_from_slice(&grant_id.to_be_bytes());
    k
}

/// The first `e/` key of grants expiring at `expires_at_ms` (or the end of the index).
fn grant_expiry_start(expires_at_ms: Option<TimestampMs>) -> Vec<u8> {
    match expires_at_ms {
        Some(ms) => {
            let mut k = GRANT_EXPIRY_PREFIX.to_vec();
            k.extend_from_slice(&ms.to_be_bytes());
            k
        }
        None => GRANT_EXPIRY_PREFIX_END.to_vec(),
    }
}

/// What an `e/` key names.
fn parse_grant_expiry_key(key: &[u8]) -> Result<GrantExpiry, StoreError> {
    let bad = || StoreError::Corrupt(format!("grant expiry index key {key:?}"));
    let rest = key.strip_prefix(GRANT_EXPIRY_PREFIX).ok_or_else(bad)?;
    // 8 bytes of expiry, an id of at least one byte, `/`, 8 bytes of grant id.
    if rest.len() < 8 + 1 + 1 + 8 || rest[rest.len() - 9] != b'/' {
        return Err(bad());
    }
    let (at, rest) = rest.split_at(8);
    let (id, grant) = rest.split_at(rest.len() - 9);
    let expires_at_ms = u64::from_be_bytes(at.try_into().map_err(|_| bad())?);
    let grant_id = u64::from_be_bytes(grant[1..].try_into().map_err(|_| bad())?);
    let id = std::str::from_utf8(id).map_err(|_| bad())?;
    Ok(GrantExpiry {
        key: key.to_vec(),
        agent: AgentId::new(id).map_err(|_| bad())?,
        grant_id,
        expires_at_ms,
    })
}

/// Adds the `e/` keys of the expiring grants `events` (of one agent) issue to `batch`.
/// Only inserts: the grant sweep removes them once it has looked (see the module's note).
fn index_grant_expiries(batch: &mut sled::Batch, agent: &AgentId, events: &[Event]) {
    for e in events {
        if let EventKind::GrantIssued { terms, .. } = &e.kind {
            if let Some(expires_at_ms) = terms.expires_at_ms {
                batch.insert(grant_expiry_key(expires_at_ms, agent, e.seq), &[][..]);
            }
        }
    }
}

fn feed_key(lsn: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(FEED_PREFIX.len() + 8);
    k.extend_from_slice(FEED_PREFIX);
    k.extend_from_slice(&lsn.to_be_bytes());
    k
}

fn journal_prefix(agent: &AgentId) -> Vec<u8> {
    let mut k = Vec::with_capacity(3 + agent.as_str().len() + 8);
    k.extend_from_slice(b"j/");
    k.extend_from_slice(agent.as_str().as_bytes());
    k.push(b'/');
    k
}

fn journal_key(agent: &AgentId, seq: u64) -> Vec<u8> {
    let mut k = journal_prefix(agent);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// Adds `events` (consecutive, of one agent) to `batch` as chunks within the bounds.
fn insert_chunks(
    batch: &mut sled::Batch,
    agent: &AgentId,
    events: &[Event],
) -> Result<(), StoreError> {
    for group in events.chunks(CHUNK_EVENTS_MAX) {
        let bytes = codec::encode_chunk(group)?;
        if bytes.len() > CHUNK_BYTES_MAX && group.len() > 1 {
            let (left, right) = group.split_at(group.len() / 2);
            insert_chunks(batch, agent, left)?;
            insert_chunks(batch, agent, right)?;
        } else {
            batch.insert(journal_key(agent, group[0].seq), bytes);
        }
    }
    Ok(())
}

/// Writes `pending` into sled, atomically with the lsn it reaches. Durable against a
/// process crash once `flush` returns; against power loss only after `sync_sled_files`.
fn index(db: &sled::Db, pending: &Pending) -> Result<(), StoreError> {
    let mut batch = sled::Batch::default();
    for (agent, p) in &pending.agents {
        insert_chunks(&mut batch, agent, &p.events)?;
        index_holds(&mut batch, agent, &p.events);
        index_grant_expiries(&mut batch, agent, &p.events);
        if let Some(record) = &p.checkpoint {
            debug_assert_eq!(record.check_invariants(), Ok(()));
            batch.insert(agent_key(agent), codec::encode_agent(record)?);
        }
    }
    for run in pending.feed.chunks(FEED_CHUNK_ENTRIES_MAX) {
        batch.insert(feed_key(run[0].lsn), codec::encode_feed(run)?);
    }
    batch.insert(WAL_KEY, codec::encode_u64(pending.last_lsn));
    #[cfg(feature = "sim")]
    crate::sim::before(crate::sim::Op::SledWrite)?;
    db.apply_batch(batch)?;
    db.flush()?;
    #[cfg(feature = "sim")]
    crate::sim::after()?;
    Ok(())
}

/// sled's files, to be made durable with real fsyncs.
#[derive(Debug)]
struct SledFiles {
    data_dir: PathBuf,
    /// Blob files already fsynced (they never change once written).
    synced_blobs: Mutex<HashSet<PathBuf>>,
}

fn fsync_path(path: &Path) -> Result<(), StoreError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| StoreError::Io(format!("fsyncing {}: {e}", path.display())))
}

impl SledFiles {
    /// Makes everything sled has written durable with real fsyncs: every file in the data
    /// directory but the WAL's and the key index's (they sync themselves), `blobs/` and its
    /// files (once each: a blob never changes), and the directories. sled's own `flush`
    /// only ends in `sync_file_range`.
    fn sync(&self) -> Result<(), StoreError> {
        #[cfg(feature = "sim")]
        crate::sim::before(crate::sim::Op::SledSync)?;
        self.sync_files()?;
        #[cfg(feature = "sim")]
        crate::sim::after()?;
        Ok(())
    }

    fn sync_files(&self) -> Result<(), StoreError> {
        let mut synced_blobs = self.synced_blobs.lock();
        let read = |dir: &Path| {
            std::fs::read_dir(dir)
                .map_err(|e| StoreError::Io(format!("listing {}: {e}", dir.display())))
        };
        for entry in read(&self.data_dir)? {
            let entry = entry.map_err(|e| StoreError::Io(format!("listing: {e}")))?;
            let path = entry.path();
            let name = entry.file_name();
            if name == "wal" || name == "keys" {
                continue;
            }
            let kind = entry
                .file_type()
                .map_err(|e| StoreError::Io(format!("reading {}: {e}", path.display())))?;
            if kind.is_file() {
                fsync_path(&path)?;
            } else if kind.is_dir() {
                let mut seen = HashSet::new();
                for blob in read(&path)? {
                    let blob = blob
                        .map_err(|e| StoreError::Io(format!("listing: {e}")))?
                        .path();
                    if !synced_blobs.contains(&blob) {
                        fsync_path(&blob)?;
                    }
                    seen.insert(blob);
                }
                // Forget blobs sled deleted, so the set stays as small as the directory.
                synced_blobs.retain(|b| !b.starts_with(&path) || seen.contains(b));
                synced_blobs.extend(seen);
                fsync_path(&path)?;
            }
        }
        fsync_path(&self.data_dir)
    }
}

impl Shared {
    fn fail(&self, e: &StoreError) -> StoreError {
        let _ = self.failure.set(e.to_string());
        tracing::error!(error = %e, "storage failed; the store stops taking writes");
        // Appliers waiting for room must see it.
        self.changed.notify_all();
        StoreError::Io(e.to_string())
    }

    fn check(&self) -> Result<(), StoreError> {
        match self.failure.get() {
            Some(reason) => Err(StoreError::Io(format!("storage failed earlier: {reason}"))),
            None => Ok(()),
        }
    }

    /// The agent's events applied but not yet in sled, within `parts`, that `keep` selects:
    /// the oldest `limit` of them, or the newest `limit` when `newest_first`.
    fn recent_events<'a>(
        agent: &AgentId,
        parts: impl Iterator<Item = &'a Pending>,
        keep: impl Fn(u64) -> bool,
        limit: usize,
        newest_first: bool,
    ) -> Vec<Event> {
        let lists: Vec<&Vec<Event>> = parts
            .filter_map(|p| p.agents.get(agent).map(|a| &a.events))
            .collect();
        let mut out = Vec::new();
        if newest_first {
            for e in lists.iter().rev().flat_map(|l| l.iter().rev()) {
                if out.len() >= limit {
                    break;
                }
                if keep(e.seq) {
                    out.push(e.clone());
                }
            }
        } else {
            for e in lists.iter().flat_map(|l| l.iter()) {
                if out.len() >= limit {
                    break;
                }
                if keep(e.seq) {
                    out.push(e.clone());
                }
            }
        }
        out
    }

    /// Moves one batch of synced writes into sled and the key index, and deletes the WAL
    /// segments that are then durable elsewhere.
    fn index_step(&self, taken: &Pending) -> Result<(), StoreError> {
        #[cfg(test)]
        if self
            .panic_in_indexer
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            panic!("injected indexer panic");
        }
        #[cfg(feature = "sim")]
        if crate::sim::planted(crate::sim::Bug::SegmentDeletedEarly) {
            // The planted bug: the segments go before sled holds their records.
            self.delete_obsolete_wal(taken.last_lsn)?;
        }
        index(&self.db, taken)?;
        // Long-polling feed readers wake here; the pass is readable in sled from now on.
        self.indexed_lsn.send_replace(taken.last_lsn);
        if self.keys.is_complete() {
            let mut keys = Vec::new();
            for (agent, p) in &taken.agents {
                keyindex::keys_of(agent, &p.events, &mut keys);
            }
            self.keys.add_indexed(taken.first_lsn, &keys);
        }
        // Reads still see the batch until here; from now on sled and the key index have it.
        self.staged.lock().in_flight = None;
        // Appliers waiting at the backlog bound count what was in flight.
        self.changed.notify_all();
        if self.keys.should_flush() {
            self.keys.flush()?;
        }
        self.delete_obsolete_wal(taken.last_lsn)
    }

    /// Deletes the closed WAL segments whose records sled (up to `sled_lsn`) and the key
    /// index both hold, after making sled's files durable.
    fn delete_obsolete_wal(&self, sled_lsn: u64) -> Result<(), StoreError> {
        let keys_lsn = |buffer_first_lsn: Option<u64>| match buffer_first_lsn {
            Some(first) => sled_lsn.min(first - 1),
            None => sled_lsn,
        };
        // The key buffer flushes when full or when its hour is over; it also flushes when
        // it is what keeps a closed segment on disk, so the WAL never grows past a segment
        // or two however few keyed requests there are.
        let blocked_by_keys = {
            let wal = self.wal.lock();
            let durable = keys_lsn(self.keys.buffer_first_lsn());
            wal.writer.obsolete_count(sled_lsn) > wal.writer.obsolete_count(durable)
        };
        if blocked_by_keys {
            self.keys.flush()?;
        }
        let durable_lsn = keys_lsn(self.keys.buffer_first_lsn());
        let obsolete = self.wal.lock().writer.take_obsolete(durable_lsn);
        if obsolete.is_empty() {
            return Ok(());
        }
        self.files.sync()?;
        #[cfg(test)]
        let removed = {
            let mut failing = self.fail_wal_removal.lock();
            if *failing > 0 {
                *failing -= 1;
                Err(StoreError::Io("injected unlink failure".into()))
            } else {
                wal::remove(&obsolete)
            }
        };
        #[cfg(not(test))]
        let removed = wal::remove(&obsolete);
        if let Err(e) = removed {
            // Kept in the list and tried again next time, so a later deletion never leaves
            // a gap in front of a segment that is still needed.
            tracing::warn!(error = %e, "deleting write-ahead log segments sled already holds");
            self.wal.lock().writer.restore_obsolete(obsolete);
        }
        Ok(())
    }

    fn run_indexer(&self) {
        loop {
            #[cfg(feature = "sim")]
            let mut ticket = 0;
            let taken = {
                let mut staged = self.staged.lock();
                #[cfg(feature = "sim")]
                if crate::sim::manual_index() {
                    // The simulation runs each step itself, so that one seed is one history.
                    while !staged.stopping
                        && crate::sim::index_requested() <= crate::sim::index_served()
                    {
                        self.changed.wait_for(&mut staged, Duration::from_millis(1));
                    }
                    ticket = crate::sim::index_requested();
                }
                let deadline = Instant::now() + Duration::from_millis(INDEX_INTERVAL_MS);
                while !staged.stopping && staged.pending.events < self.trigger && !index_by_hand() {
                    if self.changed.wait_until(&mut staged, deadline).timed_out() {
                        break;
                    }
                }
                if staged.pending.is_empty() {
                    #[cfg(feature = "sim")]
                    crate::sim::serve_index(ticket);
                    if staged.stopping {
                        return;
                    }
                    continue;
                }
                let fresh = staged.fresh();
                let taken = Arc::new(std::mem::replace(&mut staged.pending, fresh));
                staged.in_flight = Some(Arc::clone(&taken));
                taken
            };
            self.changed.notify_all();
            let stepped = self.index_step(&taken);
            if let Ok(mut done) = Arc::try_unwrap(taken) {
                // Emptied here, outside the lock: dropping a pass's events takes a while.
                done.clear();
                self.staged.lock().recycle(done);
            }
            #[cfg(feature = "sim")]
            crate::sim::serve_index(ticket);
            if let Err(e) = stepped {
                // in_flight stays, so reads still see every applied write.
                self.fail(&e);
                return;
            }
        }
    }

    fn run_key_maintenance(&self) {
        loop {
            {
                let mut closing = self.closing.lock();
                if !*closing {
                    self.closing_cv.wait_for(
                        &mut closing,
                        Duration::from_millis(KEY_MAINTENANCE_INTERVAL_MS),
                    );
                }
                if *closing {
                    return;
                }
            }
            loop {
                match self.keys.maintain() {
                    Ok(true) if self.failure.get().is_none() => continue,
                    Ok(_) => break,
                    Err(e) => {
                        self.fail(&e);
                        return;
                    }
                }
            }
        }
    }
}

/// Whether the storage-fault simulation runs the indexer step by step (never outside it).
fn index_by_hand() -> bool {
    #[cfg(feature = "sim")]
    return crate::sim::manual_index();
    #[cfg(not(feature = "sim"))]
    false
}

/// Runs `body` on a named thread; a panic fails the store instead of leaving it taking
/// writes that nothing will ever move on.
fn spawn_guarded(
    name: &str,
    shared: &Arc<Shared>,
    body: fn(&Shared),
) -> Result<JoinHandle<()>, StoreError> {
    let shared = Arc::clone(shared);
    let thread = name.to_owned();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(&shared)));
            if let Err(panic) = result {
                let what = crate::error::panic_message(panic.as_ref());
                shared.fail(&StoreError::Io(format!(
                    "the {thread} thread panicked: {what}"
                )));
            }
        })
        .map_err(|e| StoreError::Io(format!("starting the {name} thread: {e}")))
}

impl SledStorage {
    /// Writes a rebuilt index with the key that marks it complete, durably: the marker is
    /// in the same batch as the index, so a crash leaves the index incomplete and rebuilt
    /// again, never marked complete without its keys.
    fn complete_index(
        &self,
        mut batch: sled::Batch,
        complete_key: &[u8],
    ) -> Result<(), StoreError> {
        batch.insert(complete_key, codec::encode_u32(1));
        self.shared.db.apply_batch(batch)?;
        self.shared.db.flush()?;
        self.shared.files.sync()?;
        Ok(())
    }

    /// Opens or creates the store at `path` with a sled page cache of `cache_bytes` and
    /// default bounds.
    pub fn open(path: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        Self::open_with(path, &StoreOptions::new(cache_bytes))
    }

    /// Opens or creates the store at `path`: checks (or writes) the schema version, opens
    /// the key index, replays the WAL records sled or the key index lack, makes them durable,
    /// deletes the WAL, and starts the indexer and the key index's upkeep.
    pub fn open_with(path: &Path, options: &StoreOptions) -> Result<Self, StoreError> {
        let backlog_max = options.backlog_events_max.max(1);
        let backlog_bytes_max = options.backlog_bytes_max.max(1);
        let db = open_sled(path, options.cache_bytes)?;
        let found = match db.get(SCHEMA_KEY)? {
            Some(bytes) => {
                let found = codec::decode_u32(&bytes)?;
                if found == 0 || found > SCHEMA_VERSION {
                    return Err(StoreError::SchemaVersion {
                        found,
                        expected: SCHEMA_VERSION,
                    });
                }
                Some(found)
            }
            None => None,
        };
        let keys = KeyIndex::open(
            path,
            KeyIndexLimits {
                retention_ms: options.idempotency_retention_ms,
                keys_max: options.idempotency_keys_max.max(1),
                buffer_keys_max: options.idempotency_memory_keys_max.max(1),
            },
        )?;
        match found {
            None => {
                // A new store: its indexes are complete, since there is no journal yet.
                keys.mark_complete()?;
                db.insert(HOLDS_COMPLETE_KEY, codec::encode_u32(1))?;
                db.insert(GRANT_EXPIRIES_COMPLETE_KEY, codec::encode_u32(1))?;
                db.insert(SCHEMA_KEY, codec::encode_u32(SCHEMA_VERSION))?;
            }
            // Written before any WAL exists, so a schema-1 build refuses this directory
            // instead of reading sled without the WAL's records.
            Some(1) => {
                db.insert(SCHEMA_KEY, codec::encode_u32(2))?;
            }
            Some(_) => {}
        }
        db.flush()?;
        let files = SledFiles {
            data_dir: path.to_path_buf(),
            synced_blobs: Mutex::new(HashSet::new()),
        };
        files.sync()?;
        let next_lsn = replay_wal(&db, &keys, &files, backlog_max)?;
        let shared = Arc::new(Shared {
            db,
            keys,
            files,
            indexed_lsn: tokio::sync::watch::Sender::new(next_lsn - 1),
            wal: Mutex::new(WalState {
                writer: WalWriter::create(path, next_lsn)?,
                spare: Vec::new(),
            }),
            staged: Mutex::new(Staged {
                bytes: Vec::new(),
                next_lsn,
                unsynced: Pending::default(),
                syncing: None,
                pending: Pending::default(),
                in_flight: None,
                stopping: false,
                spares: Vec::new(),
            }),
            changed: Condvar::new(),
            failure: OnceLock::new(),
            closing: Mutex::new(false),
            closing_cv: Condvar::new(),
            backlog_max,
            backlog_bytes_max,
            trigger: INDEX_EVENTS_TRIGGER.min(backlog_max / 4).max(1),
            #[cfg(test)]
            panic_in_indexer: std::sync::atomic::AtomicBool::new(false),
            #[cfg(test)]
            fail_wal_removal: Mutex::new(0),
        });
        let threads = vec![
            spawn_guarded("tally-indexer", &shared, Shared::run_indexer)?,
            spawn_guarded("tally-keys", &shared, Shared::run_key_maintenance)?,
        ];
        Ok(Self { shared, threads })
    }
}

/// Replays the WAL into sled and the key index, makes both durable and deletes the
/// replayed segments. Returns the next lsn to write.
fn replay_wal(
    db: &sled::Db,
    keys: &KeyIndex,
    files: &SledFiles,
    backlog_max: usize,
) -> Result<u64, StoreError> {
    let applied_lsn = match db.get(WAL_KEY)? {
        Some(bytes) => codec::decode_u64(&bytes)?,
        None => 0,
    };
    let keys_complete = keys.is_complete();
    let mut pending = Pending::default();
    let mut records = 0u64;
    let replayed = wal::replay(&files.data_dir, applied_lsn, |lsn, payload| {
        let write = codec::decode_write(payload)?;
        if keys_complete {
            // Every record still in the WAL may hold keys not yet in a run; one written
            // twice is harmless (the same record, found either way).
            let mut found = Vec::new();
            keyindex::keys_of(&write.agent, &write.events, &mut found);
            for (slot, entry) in &found {
                keys.note(*slot, entry.at_ms);
            }
            keys.add_indexed(lsn, &found);
        }
        if lsn > applied_lsn {
            pending.add(write, lsn, payload.len());
            records += 1;
            if pending.events >= backlog_max {
                index(db, &std::mem::take(&mut pending))?;
            }
        }
        Ok(())
    })?;
    if !pending.is_empty() {
        index(db, &pending)?;
    }
    if records > 0 || replayed.torn_tail {
        tracing::info!(
            records,
            torn_tail = replayed.torn_tail,
            "replayed the write-ahead log into sled"
        );
    }
    // Everything the old segments held is in sled and the key index now, durably; a fresh
    // segment never appends after a torn tail.
    keys.flush()?;
    files.sync()?;
    wal::remove(&replayed.segments)?;
    Ok(applied_lsn.max(replayed.last_lsn) + 1)
}

fn open_sled(path: &Path, cache_bytes: u64) -> Result<sled::Db, StoreError> {
    let config = sled::Config::new()
        .path(path)
        .cache_capacity(cache_bytes)
        .mode(sled::Mode::HighThroughput);
    let started = Instant::now();
    loop {
        match config.open() {
            Ok(db) => return Ok(db),
            // sled's background threads may hold the file lock for a moment after the
            // previous handle in this process was dropped; another process holding it is
            // still an error once the wait is over.
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && started.elapsed() < Duration::from_millis(LOCK_WAIT_MS_MAX) =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => {
                return Err(StoreError::Io(format!(
                    "opening sled at {} (is another tally using it?): {e}",
                    path.display()
                )))
            }
        }
    }
}

impl Drop for SledStorage {
    /// Stops the background threads after the indexer moved everything into sled; writes
    /// the key index's buffer, makes sled durable and deletes the WAL.
    fn drop(&mut self) {
        self.shared.staged.lock().stopping = true;
        self.shared.changed.notify_all();
        *self.shared.closing.lock() = true;
        self.shared.closing_cv.notify_all();
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                tracing::error!("a storage thread panicked");
            }
        }
        if self.shared.failure.get().is_some() {
            return;
        }
        let staged = self.shared.staged.lock();
        let drained = staged.bytes.is_empty()
            && staged.unsynced.is_empty()
            && staged.syncing.is_none()
            && staged.pending.is_empty()
            && staged.in_flight.is_none();
        drop(staged);
        if !drained {
            return;
        }
        let closed = self
            .shared
            .keys
            .close()
            .and_then(|()| self.shared.files.sync())
            .and_then(|()| {
                let segments = self.shared.wal.lock().writer.take_all();
                wal::remove(&segments)
            });
        if let Err(e) = closed {
            tracing::warn!(error = %e, "closing the store; the write-ahead log is replayed at the next start");
        }
    }
}

impl Storage for SledStorage {
    fn apply(&self, writes: Vec<AgentWrite>) -> Result<(), StoreError> {
        self.shared.check()?;
        let payloads = writes
            .iter()
            .map(codec::encode_write)
            .collect::<Result<Vec<_>, _>>()?;
        let mut staged = self.shared.staged.lock();
        while staged.backlog() >= self.shared.backlog_max
            || staged.backlog_bytes() >= self.shared.backlog_bytes_max
        {
            self.shared.check()?;
            if staged.durable_parts().all(Pending::is_empty) && staged.syncing.is_none() {
                // All that holds the bound is applied but not synced, which the indexer
                // may not take: sync it rather than wait for a caller that may be this one.
                drop(staged);
                self.sync()?;
                staged = self.shared.staged.lock();
                continue;
            }
            self.shared.changed.notify_all();
            self.shared
                .changed
                .wait_for(&mut staged, Duration::from_millis(100));
        }
        for (write, payload) in writes.into_iter().zip(&payloads) {
            let lsn = staged.next_lsn;
            staged.next_lsn += 1;
            wal::frame(&mut staged.bytes, lsn, payload);
            staged.unsynced.add(write, lsn, payload.len());
        }
        Ok(())
    }

    fn sync(&self) -> Result<(), StoreError> {
        self.shared.check()?;
        let mut wal = self.shared.wal.lock();
        let (mut bytes, next_lsn) = {
            let spare = std::mem::take(&mut wal.spare);
            let mut staged = self.shared.staged.lock();
            let fresh = staged.fresh();
            let unsynced = std::mem::replace(&mut staged.unsynced, fresh);
            debug_assert!(staged.syncing.is_none(), "syncs run one at a time");
            staged.syncing = Some(unsynced);
            (std::mem::replace(&mut staged.bytes, spare), staged.next_lsn)
        };
        if !bytes.is_empty() {
            let written = wal
                .writer
                .append(&bytes)
                .and_then(|()| wal.writer.rotate_if_full(next_lsn));
            if let Err(e) = written {
                return Err(self.shared.fail(&e));
            }
        }
        bytes.clear();
        wal.spare = bytes;
        let mut staged = self.shared.staged.lock();
        if let Some(mut synced) = staged.syncing.take() {
            staged.pending.merge(&mut synced);
            staged.recycle(synced);
        }
        if staged.pending.events >= self.shared.trigger {
            self.shared.changed.notify_all();
        }
        Ok(())
    }

    fn load_agents(&self) -> Result<Vec<AgentState>, StoreError> {
        let mut recent: HashMap<AgentId, AgentState> = HashMap::new();
        {
            let staged = self.shared.staged.lock();
            for p in staged.durable_parts() {
                for (id, a) in &p.agents {
                    if let Some(record) = &a.checkpoint {
                        recent.insert(id.clone(), record.clone());
                    }
                }
            }
        }
        let mut agents = Vec::new();
        for item in self.shared.db.scan_prefix(b"a/") {
            let (_, value) = item?;
            let stored = codec::decode_agent(&value)?;
            agents.push(recent.remove(&stored.id).unwrap_or(stored));
        }
        agents.extend(recent.into_values());
        Ok(agents)
    }

    fn checkpoint(&self, agent: &AgentId) -> Result<Option<AgentState>, StoreError> {
        {
            // Newest applied first. A batch leaves the staged writes only after sled has
            // it, so a checkpoint not found here is in sled already.
            let staged = self.shared.staged.lock();
            let mut newest = None;
            for p in staged.parts() {
                if let Some(record) = p.agents.get(agent).and_then(|a| a.checkpoint.as_ref()) {
                    newest = Some(record);
                }
            }
            if let Some(record) = newest {
                return Ok(Some(record.clone()));
            }
        }
        match self.shared.db.get(agent_key(agent))? {
            Some(bytes) => {
                let record = codec::decode_agent(&bytes)?;
                if record.id != *agent {
                    return Err(StoreError::Corrupt(format!(
                        "the record under {agent} is of {}",
                        record.id
                    )));
                }
                Ok(Some(record))
            }
            None => Ok(None),
        }
    }

    fn agent_ids(&self, after: Option<&AgentId>, limit: usize) -> Result<Vec<AgentId>, StoreError> {
        let mut ids = std::collections::BTreeSet::new();
        {
            let staged = self.shared.staged.lock();
            for p in staged.parts() {
                for (id, a) in &p.agents {
                    if a.checkpoint.is_some() && after.is_none_or(|after| id > after) {
                        ids.insert(id.clone());
                    }
                }
            }
        }
        let start = match after {
            Some(a) => std::ops::Bound::Excluded(agent_key(a)),
            None => std::ops::Bound::Included(AGENT_PREFIX.to_vec()),
        };
        let end = std::ops::Bound::Excluded(AGENT_PREFIX_END.to_vec());
        // `limit` from sled is enough: the staged ids only add to them.
        for item in self.shared.db.range::<Vec<u8>, _>((start, end)).take(limit) {
            let (key, _) = item?;
            let id = std::str::from_utf8(&key[AGENT_PREFIX.len()..])
                .ok()
                .and_then(|id| AgentId::new(id).ok())
                .ok_or_else(|| StoreError::Corrupt(format!("agent key {key:?}")))?;
            ids.insert(id);
        }
        Ok(ids.into_iter().take(limit).collect())
    }

    fn agent_count(&self) -> Result<u64, StoreError> {
        let mut count = 0u64;
        for item in self.shared.db.range(AGENT_PREFIX..AGENT_PREFIX_END) {
            item?;
            count += 1;
        }
        let staged = self.shared.staged.lock();
        let mut created = std::collections::HashSet::new();
        for p in staged.parts() {
            for (id, a) in &p.agents {
                if a.checkpoint.is_some() && !self.shared.db.contains_key(agent_key(id))? {
                    created.insert(id);
                }
            }
        }
        Ok(count + created.len() as u64)
    }

    fn hold_agents(&self) -> Result<Option<Vec<AgentId>>, StoreError> {
        if self.shared.db.get(HOLDS_COMPLETE_KEY)?.is_none() {
            return Ok(None);
        }
        let mut agents: Vec<AgentId> = Vec::new();
        for item in self.shared.db.scan_prefix(HOLD_PREFIX) {
            let (key, _) = item?;
            let agent = hold_key_agent(&key)?;
            // Keys are ordered, so one agent's holds are together.
            if agents.last() != Some(&agent) {
                agents.push(agent);
            }
        }
        Ok(Some(agents))
    }

    fn backfill_holds(&self, agents: &[AgentState]) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for item in self.shared.db.scan_prefix(HOLD_PREFIX) {
            let (key, _) = item?;
            batch.remove(key);
        }
        let mut holds = 0usize;
        for agent in agents {
            for (&seq, hold) in &agent.holds {
                batch.insert(
                    hold_key(&agent.id, seq),
                    codec::encode_u64(hold.expires_at_ms),
                );
                holds += 1;
            }
        }
        self.complete_index(batch, HOLDS_COMPLETE_KEY)?;
        tracing::info!(holds, "built the index of open holds");
        Ok(())
    }

    fn grant_expiries(
        &self,
        from_ms: TimestampMs,
        after: Option<&[u8]>,
        through_ms: TimestampMs,
        limit: usize,
    ) -> Result<Vec<GrantExpiry>, StoreError> {
        use std::ops::Bound;
        let from = grant_expiry_start(Some(from_ms));
        let start = match after {
            Some(after) if after >= from.as_slice() => Bound::Excluded(after.to_vec()),
            _ => Bound::Included(from),
        };
        let end = Bound::Excluded(grant_expiry_start(through_ms.checked_add(1)));
        let mut found = Vec::with_capacity(limit.min(1_024));
        for item in self.shared.db.range::<Vec<u8>, _>((start, end)).take(limit) {
            let (key, _) = item?;
            found.push(parse_grant_expiry_key(&key)?);
        }
        Ok(found)
    }

    fn remove_grant_expiries(&self, keys: &[Vec<u8>]) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for key in keys {
            debug_assert!(key.starts_with(GRANT_EXPIRY_PREFIX), "an e/ key");
            batch.remove(key.as_slice());
        }
        // No flush of its own: a removal lost to a crash only costs the sweep one more look.
        self.shared.db.apply_batch(batch)?;
        Ok(())
    }

    fn grant_expiries_complete(&self) -> Result<bool, StoreError> {
        Ok(self.shared.db.get(GRANT_EXPIRIES_COMPLETE_KEY)?.is_some())
    }

    fn backfill_grant_expiries(&self, agents: &[AgentState]) -> Result<(), StoreError> {
        // Keys already there stay: a stale one costs the sweep one look, and a grant's key
        // is the same whoever writes it.
        let mut batch = sled::Batch::default();
        let mut grants = 0usize;
        for agent in agents {
            for (&id, grant) in &agent.grants {
                if let Some(expires_at_ms) = grant.terms.expires_at_ms {
                    batch.insert(grant_expiry_key(expires_at_ms, &agent.id, id), &[][..]);
                    grants += 1;
                }
            }
        }
        self.complete_index(batch, GRANT_EXPIRIES_COMPLETE_KEY)?;
        tracing::info!(grants, "built the index of credit grant expiries");
        Ok(())
    }

    fn journal(
        &self,
        agent: &AgentId,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        self.journal_from(agent, after_seq, limit, false)
    }

    fn journal_staged(
        &self,
        agent: &AgentId,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        self.journal_from(agent, after_seq, limit, true)
    }

    fn journal_rev(
        &self,
        agent: &AgentId,
        before_seq: u64,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        let recent = {
            let staged = self.shared.staged.lock();
            Shared::recent_events(
                agent,
                staged.durable_parts(),
                |seq| seq < before_seq,
                limit,
                true,
            )
        };
        let mut out = recent;
        let floor = out.last().map(|e| e.seq);
        let mut from_sled = 0;
        let start = journal_key(agent, 0);
        let end = journal_key(agent, before_seq);
        for item in self.shared.db.range(start..end).rev() {
            if from_sled >= limit || out.len() >= limit {
                break;
            }
            let (_, value) = item?;
            for e in codec::decode_chunk(&value)?.into_iter().rev() {
                if e.seq < before_seq {
                    from_sled += 1;
                    if floor.is_none_or(|f| e.seq < f) {
                        out.push(e);
                    }
                }
            }
        }
        out.truncate(limit);
        Ok(out)
    }

    fn find_key(
        &self,
        agent: &AgentId,
        key: &IdempotencyKey,
        slot: u128,
        now_ms: TimestampMs,
    ) -> Result<Option<KeyEntry>, StoreError> {
        let hours = self.shared.keys.candidates(slot, now_ms);
        if hours.is_empty() {
            return Ok(None);
        }
        // Applied writes first (every one, synced or not: an answer that replays one waits
        // for the group commit anyway), then the index. A write the indexer moves meanwhile
        // reaches the index's buffer before it leaves the staged writes, so it is found in
        // one or the other.
        let staged_hit = {
            let staged = self.shared.staged.lock();
            let mut newest = None;
            for p in staged.parts() {
                if let Some(a) = p.agents.get(agent) {
                    let mut found = Vec::new();
                    let matching: Vec<Event> = a
                        .events
                        .iter()
                        .filter(|e| e.idempotency_key.as_ref() == Some(key))
                        .cloned()
                        .collect();
                    keyindex::keys_of(agent, &matching, &mut found);
                    if let Some(&(_, e)) = found.last() {
                        newest = Some(e);
                    }
                }
            }
            newest
        };
        if staged_hit.is_some() {
            return Ok(staged_hit);
        }
        self.shared.keys.lookup(slot, &hours)
    }

    fn note_key(&self, slot: u128, at_ms: TimestampMs) {
        self.shared.keys.note(slot, at_ms);
    }

    fn needs_key_backfill(&self) -> bool {
        !self.shared.keys.is_complete()
    }

    fn backfill_keys(&self, keys: Vec<(u128, KeyEntry)>) -> Result<(), StoreError> {
        let count = keys.len();
        self.shared.keys.backfill(keys)?;
        self.shared
            .db
            .insert(SCHEMA_KEY, codec::encode_u32(SCHEMA_VERSION))?;
        self.shared.db.flush()?;
        self.shared.files.sync()?;
        tracing::info!(
            keys = count,
            "built the idempotency key index from the journal"
        );
        Ok(())
    }

    fn key_index_status(&self) -> KeyIndexStatus {
        self.shared.keys.status()
    }

    fn feed(&self, from: FeedCursor, limit: usize) -> Result<FeedPage, StoreError> {
        // Read first: everything at or below it is in sled with its journal chunks. An
        // entry past it may be visible already; it waits for the next page.
        let indexed_lsn = *self.shared.indexed_lsn.borrow();
        let db = &self.shared.db;
        // The run holding `from.lsn` starts at or before it.
        let first = match db
            .range(FEED_PREFIX.to_vec()..=feed_key(from.lsn))
            .next_back()
        {
            Some(item) => item?.0.to_vec(),
            None => FEED_PREFIX.to_vec(),
        };
        let mut events = Vec::new();
        let mut ends = Vec::new();
        let mut next = from;
        'runs: for item in db.range(first..FEED_PREFIX_END.to_vec()) {
            let (_, value) = item?;
            for entry in codec::decode_feed(&value)? {
                if entry.lsn < from.lsn {
                    continue;
                }
                if entry.lsn > indexed_lsn || events.len() >= limit {
                    break 'runs;
                }
                let skip = if entry.lsn == from.lsn {
                    from.offset
                } else {
                    0
                };
                if skip >= entry.events {
                    continue;
                }
                let want = (entry.events - skip)
                    .min(u32::try_from(limit - events.len()).unwrap_or(u32::MAX));
                let after_seq = (entry.first_seq + u64::from(skip))
                    .checked_sub(1)
                    .ok_or_else(|| StoreError::Corrupt(format!("feed entry {entry:?}")))?;
                let got = self.journal_from(&entry.agent, after_seq, want as usize, false)?;
                let expected = (after_seq + 1..).take(want as usize);
                if got.len() != want as usize || !got.iter().map(|e| e.seq).eq(expected) {
                    return Err(StoreError::Corrupt(format!(
                        "feed entry {entry:?} names journal entries sled does not hold"
                    )));
                }
                events.extend(got.into_iter().map(|e| (entry.agent.clone(), e)));
                ends.extend((skip + 1..=skip + want).map(|offset| FeedCursor {
                    lsn: entry.lsn,
                    offset,
                }));
                next = if skip + want == entry.events {
                    FeedCursor {
                        lsn: entry.lsn + 1,
                        offset: 0,
                    }
                } else {
                    FeedCursor {
                        lsn: entry.lsn,
                        offset: skip + want,
                    }
                };
            }
        }
        if events.len() < limit {
            // Nothing more at or below `indexed_lsn`: the next page starts past it, so a
            // reader waiting for it waits for a pass that adds something.
            next = next.max(FeedCursor {
                lsn: indexed_lsn + 1,
                offset: 0,
            });
        }
        Ok(FeedPage { events, ends, next })
    }

    fn feed_watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.shared.indexed_lsn.subscribe()
    }

    fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(self.shared.db.size_on_disk()? + wal::size_on_disk(&self.shared.files.data_dir)?)
    }

    fn backlog_events(&self) -> u64 {
        self.shared.staged.lock().backlog() as u64
    }

    fn failure(&self) -> Option<String> {
        self.shared.failure.get().cloned()
    }
}

impl SledStorage {
    /// Entries after `after_seq`, at most `limit`: sled's prefix of the journal, then the
    /// staged suffix (durable parts only, unless `staged`).
    fn journal_from(
        &self,
        agent: &AgentId,
        after_seq: u64,
        limit: usize,
        staged: bool,
    ) -> Result<Vec<Event>, StoreError> {
        let Some(start) = after_seq.checked_add(1) else {
            return Ok(Vec::new());
        };
        // Read before sled: an event the indexer moves meanwhile is then in both, never in
        // neither; sled holds a prefix of the agent's journal and this a suffix. At most
        // `limit` are copied, under the lock every shard's `apply` needs.
        let recent = {
            let s = self.shared.staged.lock();
            let keep = |seq: u64| seq >= start;
            if staged {
                Shared::recent_events(agent, s.parts(), keep, limit, false)
            } else {
                Shared::recent_events(agent, s.durable_parts(), keep, limit, false)
            }
        };
        let db = &self.shared.db;
        let prefix = journal_prefix(agent);
        let mut end = prefix.clone();
        end.extend_from_slice(&u64::MAX.to_be_bytes());
        // The chunk holding `start` begins at or before it.
        let first = match db.range(prefix..=journal_key(agent, start)).next_back() {
            Some(item) => item?.0.to_vec(),
            None => journal_key(agent, start),
        };
        let mut out: Vec<Event> = Vec::new();
        for item in db.range(first..=end) {
            if out.len() >= limit {
                break;
            }
            let (_, value) = item?;
            out.extend(
                codec::decode_chunk(&value)?
                    .into_iter()
                    .filter(|e| e.seq >= start),
            );
        }
        for e in recent {
            if out.last().is_none_or(|last| e.seq > last.seq) {
                out.push(e);
            }
        }
        out.truncate(limit);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_core::{CommandKind, Status};

    /// An agent's first `n` journal entries (a create, a credit, then debits) and its state.
    fn journal_of(n: usize) -> (AgentId, Vec<Event>, AgentState) {
        let (state, events) = crate::testing::decided((0..n).map(|i| match i {
            0 => CommandKind::CreateAgent {
                plan: crate::testing::default_plan(),
                status: Status::Active,
            },
            1 => CommandKind::Credit {
                amount_micros: 1_000_000,
            },
            _ => CommandKind::Debit { amount_micros: 1 },
        }));
        (state.id.clone(), events, state)
    }

    /// Applies and syncs `events` in runs of 7, calling `between` after each apply.
    fn write_with(
        store: &SledStorage,
        agent: &AgentId,
        events: &[Event],
        mut between: impl FnMut(&SledStorage),
    ) {
        for part in events.chunks(7) {
            store
                .apply(vec![AgentWrite {
                    rate: None,
                    rate_before: None,
                    agent: agent.clone(),
                    expected_seq: part[0].seq - 1,
                    events: part.to_vec(),
                    checkpoint: None,
                }])
                .expect("applies");
            between(store);
            store.sync().expect("syncs");
        }
    }

    fn write(store: &SledStorage, agent: &AgentId, events: &[Event]) {
        write_with(store, agent, events, |_| {});
    }

    fn assert_reads(store: &SledStorage, agent: &AgentId, all: &[Event]) {
        let n = all.len() as u64;
        for after in (0..=n + 1).step_by(3) {
            for limit in [1, 5, CHUNK_EVENTS_MAX, CHUNK_EVENTS_MAX + 1, 1_000] {
                let want: Vec<Event> = all
                    .iter()
                    .filter(|e| e.seq > after)
                    .take(limit)
                    .cloned()
                    .collect();
                let got = store.journal(agent, after, limit).expect("reads");
                assert_eq!(got, want, "journal after {after} limit {limit}");
                let before = after;
                let want_rev: Vec<Event> = all
                    .iter()
                    .rev()
                    .filter(|e| e.seq < before)
                    .take(limit)
                    .cloned()
                    .collect();
                let got_rev = store.journal_rev(agent, before, limit).expect("reads");
                assert_eq!(
                    got_rev, want_rev,
                    "journal_rev before {before} limit {limit}"
                );
            }
        }
    }

    fn wait_indexed(store: &SledStorage) {
        let started = Instant::now();
        loop {
            {
                let staged = store.shared.staged.lock();
                if staged.pending.is_empty() && staged.in_flight.is_none() {
                    return;
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "indexer stalled"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn reads_see_sled_chunks_and_recent_writes_as_one_journal() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (id, events, state) = journal_of(150);
        {
            let store = SledStorage::open(tmp.path(), 8 << 20).expect("opens");
            write(&store, &id, &events[..100]);
            assert_reads(&store, &id, &events[..100]);
        }
        // Closed cleanly: everything is in sled and the WAL is gone.
        assert_eq!(wal::size_on_disk(tmp.path()).expect("lists"), 0);
        let store = SledStorage::open(tmp.path(), 8 << 20).expect("reopens");
        assert_reads(&store, &id, &events[..100]);
        assert_eq!(store.backlog_events(), 0);
        write(&store, &id, &events[100..]);
        store
            .apply(vec![AgentWrite {
                rate: None,
                rate_before: None,
                agent: id.clone(),
                expected_seq: state.last_seq,
                events: Vec::new(),
                checkpoint: Some(state.clone()),
            }])
            .expect("applies");
        store.sync().expect("syncs");
        assert_reads(&store, &id, &events);
        assert_eq!(store.load_agents().expect("loads"), vec![state.clone()]);
        wait_indexed(&store);
        assert_eq!(store.backlog_events(), 0);
        assert_reads(&store, &id, &events);
        assert_eq!(store.load_agents().expect("loads"), vec![state]);
    }

    #[test]
    fn writes_wait_for_the_indexer_at_the_backlog_bound() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (id, events, _) = journal_of(300);
        let mut options = StoreOptions::new(8 << 20);
        options.backlog_events_max = 16;
        let store = SledStorage::open_with(tmp.path(), &options).expect("opens");
        let mut peak = 0;
        write_with(&store, &id, &events, |store| {
            // The check comes before a run is added, so one run may pass the bound.
            let backlog = store.backlog_events();
            peak = peak.max(backlog);
            assert!(backlog < 16 + 7, "{backlog}");
        });
        assert!(
            peak >= 16,
            "the bound was reached ({peak}), so the wait was exercised"
        );
        assert_reads(&store, &id, &events);
    }

    #[test]
    fn writes_wait_for_the_indexer_at_the_backlog_byte_bound() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (id, events, _) = journal_of(300);
        let one_run = codec::encode_write(&AgentWrite {
            rate: None,
            rate_before: None,
            agent: id.clone(),
            expected_seq: 2,
            events: events[2..9].to_vec(),
            checkpoint: None,
        })
        .expect("encodes")
        .len();
        let mut options = StoreOptions::new(8 << 20);
        options.backlog_bytes_max = 3 * one_run;
        let store = SledStorage::open_with(tmp.path(), &options).expect("opens");
        let mut peak = 0;
        write_with(&store, &id, &events, |store| {
            let bytes = store.shared.staged.lock().backlog_bytes();
            peak = peak.max(bytes);
            assert!(bytes < 4 * one_run + one_run / 2, "{bytes} bytes staged");
        });
        assert!(
            peak >= 3 * one_run,
            "the bound was reached ({peak}), so the wait was exercised"
        );
        assert_reads(&store, &id, &events);
    }

    #[test]
    fn applying_past_the_backlog_bound_without_a_sync_does_not_wait_forever() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (id, events, _) = journal_of(300);
        let mut options = StoreOptions::new(8 << 20);
        options.backlog_events_max = 16;
        let store = SledStorage::open_with(tmp.path(), &options).expect("opens");
        // Only applies, as a caller that syncs once at the end would; the store syncs what
        // holds the bound itself, so the indexer can drain it.
        for part in events.chunks(7) {
            store
                .apply(vec![AgentWrite {
                    rate: None,
                    rate_before: None,
                    agent: id.clone(),
                    expected_seq: part[0].seq - 1,
                    events: part.to_vec(),
                    checkpoint: None,
                }])
                .expect("applies");
            assert!(store.backlog_events() < 16 + 7);
        }
        store.sync().expect("syncs");
        assert_reads(&store, &id, &events);
    }

    #[test]
    fn clients_read_only_synced_entries_and_sled_gets_only_those() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (id, events, _) = journal_of(20);
        let store = SledStorage::open(tmp.path(), 8 << 20).expect("opens");
        write(&store, &id, &events[..10]);
        store
            .apply(vec![AgentWrite {
                rate: None,
                rate_before: None,
                agent: id.clone(),
                expected_seq: 10,
                events: events[10..].to_vec(),
                checkpoint: None,
            }])
            .expect("applies");
        // Applied, not synced: a crash now may make seq 11 a different event, so no
        // client read shows it; the engine's own replays see it.
        assert_eq!(store.journal(&id, 0, 100).expect("reads"), events[..10]);
        assert_eq!(store.journal_rev(&id, 100, 100).expect("reads").len(), 10);
        assert_eq!(
            store.journal_staged(&id, 10, 100).expect("reads"),
            events[10..]
        );
        // The indexer never moves an unsynced entry into sled.
        std::thread::sleep(Duration::from_millis(3 * INDEX_INTERVAL_MS));
        let in_sled: usize = store
            .shared
            .db
            .scan_prefix(journal_prefix(&id))
            .map(|kv| {
                codec::decode_chunk(&kv.expect("reads").1)
                    .expect("decodes")
                    .len()
            })
            .sum();
        assert_eq!(in_sled, 10);
        store.sync().expect("syncs");
        assert_reads(&store, &id, &events);
    }

    /// The agent's write of `events`, which continue its journal.
    fn write_of(agent: &AgentId, events: &[Event]) -> AgentWrite {
        AgentWrite {
            rate: None,
            rate_before: None,
            agent: agent.clone(),
            expected_seq: events[0].seq - 1,
            events: events.to_vec(),
            checkpoint: None,
        }
    }

    #[test]
    fn overlay_reads_copy_at_most_their_limit() {
        let (id, events, _) = journal_of(1_000);
        let mut older = Pending::default();
        let mut newer = Pending::default();
        let write = |events: &[Event]| write_of(&id, events);
        older.add(write(&events[..600]), 1, 0);
        newer.add(write(&events[600..]), 2, 0);
        let parts = || [&older, &newer].into_iter();
        let oldest = Shared::recent_events(&id, parts(), |seq| seq > 10, 5, false);
        assert_eq!(oldest, events[10..15]);
        let newest = Shared::recent_events(&id, parts(), |seq| seq < 990, 5, true);
        let want: Vec<Event> = events[984..989].iter().rev().cloned().collect();
        assert_eq!(newest, want);
    }

    #[test]
    fn a_merge_moves_everything_and_leaves_its_source_empty_with_bounded_room() {
        let (id, events, _) = journal_of(30);
        let write = |events: &[Event]| write_of(&id, events);
        let mut pending = Pending::default();
        let mut synced = Pending::default();
        synced.add(write(&events[..10]), 1, 100);
        pending.merge(&mut synced);
        assert_eq!(pending.agents[&id].events, events[..10]);
        assert_eq!(
            (pending.first_lsn, pending.last_lsn, pending.events),
            (1, 1, 10)
        );
        assert_eq!((pending.bytes, pending.feed.len()), (100, 1));
        synced.add(write(&events[10..]), 2, 200);
        pending.merge(&mut synced);
        assert_eq!(pending.agents[&id].events, events);
        assert_eq!(
            (pending.first_lsn, pending.last_lsn, pending.events),
            (1, 2, 30)
        );
        assert_eq!((pending.bytes, pending.feed.len()), (300, 2));
        for emptied in [&synced, &Pending::default()] {
            assert!(emptied.is_empty() && emptied.feed.is_empty());
            assert_eq!(
                (
                    emptied.events,
                    emptied.bytes,
                    emptied.first_lsn,
                    emptied.last_lsn
                ),
                (0, 0, 0, 0)
            );
        }
        // A burst's room is given back down to the bound, not kept whole.
        let agents = 4 * SPARE_PENDING_BYTES_MAX / std::mem::size_of::<(AgentId, AgentPending)>();
        for i in 0..agents {
            let agent = AgentId::new(format!("burst-{i}")).expect("valid id");
            pending.add(
                AgentWrite {
                    agent,
                    ..write(&events[..1])
                },
                3,
                1,
            );
        }
        pending.clear();
        assert!(pending.is_empty());
        let room_bytes = pending.agents.capacity() * std::mem::size_of::<(AgentId, AgentPending)>();
        assert!(
            room_bytes <= 2 * SPARE_PENDING_BYTES_MAX,
            "{room_bytes} bytes kept"
        );
    }

    #[test]
    fn an_indexer_panic_fails_the_store_instead_of_stalling_it() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (id, events, _) = journal_of(30);
        let store = SledStorage::open(tmp.path(), 8 << 20).expect("opens");
        store
            .shared
            .panic_in_indexer
            .store(true, std::sync::atomic::Ordering::SeqCst);
        write(&store, &id, &events[..10]);
        let started = Instant::now();
        while store.failure().is_none() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "no failure reported"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            store.failure().is_some_and(|f| f.contains("panicked")),
            "{:?}",
            store.failure()
        );
        let err = store
            .apply(vec![AgentWrite {
                rate: None,
                rate_before: None,
                agent: id.clone(),
                expected_seq: 10,
                events: events[10..].to_vec(),
                checkpoint: None,
            }])
            .expect_err("a failed store takes no writes");
        assert!(err.to_string().contains("failed"), "{err}");
    }

    #[test]
    fn a_failed_segment_deletion_is_retried_and_the_log_still_replays() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (id, events, _) = journal_of(200);
        {
            let mut options = StoreOptions::new(8 << 20);
            options.idempotency_memory_keys_max = 8;
            let store = SledStorage::open_with(tmp.path(), &options).expect("opens");
            store.shared.wal.lock().writer.set_segment_bytes_max(512);
            *store.shared.fail_wal_removal.lock() = 1;
            write(&store, &id, &events[..100]);
            let started = Instant::now();
            while *store.shared.fail_wal_removal.lock() > 0 {
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "no deletion tried"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            write(&store, &id, &events[100..]);
            wait_indexed(&store);
            // The segments whose deletion failed were deleted by a later pass: only the
            // current segment and those the indexer has not covered yet remain.
            let started = Instant::now();
            loop {
                let left = std::fs::read_dir(tmp.path().join("wal"))
                    .expect("lists")
                    .count();
                if left <= 2 {
                    break;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "{left} segments left behind"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            // Crash: the files as they are, nothing closed.
            let crashed = tmp.path().join("crashed");
            copy_tree(tmp.path(), &crashed);
            let reopened = SledStorage::open(&crashed, 8 << 20).expect("reopens after a crash");
            assert_reads(&reopened, &id, &events);
        }
    }

    #[test]
    fn a_schema_1_directory_still_reads_and_is_upgraded() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (id, events, state) = journal_of(40);
        {
            // As the build before the write-ahead log left it: one entry per key, no WAL.
            let db = open_sled(tmp.path(), 8 << 20).expect("opens");
            db.insert(SCHEMA_KEY, codec::encode_u32(1)).expect("writes");
            for e in &events {
                db.insert(
                    journal_key(&id, e.seq),
                    codec::encode_event(e).expect("encodes"),
                )
                .expect("writes");
            }
            db.insert(
                agent_key(&id),
                codec::encode_agent(&state).expect("encodes"),
            )
            .expect("writes");
            db.flush().expect("flushes");
        }
        let (_, all, more_state) = journal_of(60);
        let more = all[40..].to_vec();
        let schema_of = || {
            let db = open_sled(tmp.path(), 8 << 20).expect("opens");
            let schema = db.get(SCHEMA_KEY).expect("reads").expect("present");
            codec::decode_u32(&schema).expect("decodes")
        };
        {
            let store = SledStorage::open(tmp.path(), 8 << 20).expect("opens schema 1");
            assert!(store.needs_key_backfill(), "no key index yet");
            assert_reads(&store, &id, &events);
            assert_eq!(store.load_agents().expect("loads"), vec![state]);
            write(&store, &id, &more);
        }
        // The WAL exists now, so an older build must refuse it; the key index is not
        // complete until the engine rebuilt it from the journal.
        assert_eq!(schema_of(), 2);
        {
            let store = SledStorage::open(tmp.path(), 8 << 20).expect("opens schema 2");
            assert!(store.needs_key_backfill());
            store.backfill_keys(Vec::new()).expect("backfills");
        }
        assert_eq!(schema_of(), SCHEMA_VERSION);
        let store = SledStorage::open(tmp.path(), 8 << 20).expect("reopens");
        let all: Vec<Event> = events.iter().chain(&more).cloned().collect();
        assert_reads(&store, &id, &all);
        assert_eq!(more_state.last_seq, all.len() as u64);
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        {
            let db = open_sled(tmp.path(), 8 << 20).expect("opens");
            db.insert(SCHEMA_KEY, codec::encode_u32(SCHEMA_VERSION + 1))
                .expect("writes");
            db.flush().expect("flushes");
        }
        let err = SledStorage::open(tmp.path(), 8 << 20).expect_err("newer schema");
        assert!(matches!(err, StoreError::SchemaVersion { .. }), "{err}");
    }

    /// Copies a data directory as a crash would leave it: the WAL first, then the key index,
    /// then sled's files (a segment is deleted only after the others hold its records).
    fn copy_tree(from: &Path, to: &Path) {
        let copy = |from: &Path, to: &Path| {
            std::fs::create_dir_all(to).expect("mkdir");
            for entry in std::fs::read_dir(from).expect("lists") {
                let entry = entry.expect("entry");
                if entry.file_type().expect("type").is_file() {
                    std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copies");
                }
            }
        };
        copy(&from.join("wal"), &to.join("wal"));
        copy(&from.join("keys"), &to.join("keys"));
        if from.join("blobs").exists() {
            copy(&from.join("blobs"), &to.join("blobs"));
        }
        copy(from, to);
    }

    #[test]
    fn the_wal_is_replayed_into_sled_after_a_crash() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let crashed = tempfile::tempdir().expect("tempdir");
        let (id, events, _) = journal_of(80);
        let store = SledStorage::open(tmp.path(), 8 << 20).expect("opens");
        write(&store, &id, &events);
        copy_tree(tmp.path(), crashed.path());
        drop(store);
        let reopened = SledStorage::open(crashed.path(), 8 << 20).expect("reopens");
        assert_reads(&reopened, &id, &events);
        assert_eq!(
            wal::size_on_disk(crashed.path()).expect("lists"),
            0,
            "replayed segments are deleted"
        );
    }

    /// Writes of three agents, 1 to 5 events each, interleaved; `synced` of them synced
    /// (the rest only applied). Returns the feed they make, in apply order.
    fn feed_writes(
        store: &SledStorage,
        events: &[Event],
        writes: std::ops::Range<usize>,
        synced: usize,
    ) -> Vec<(AgentId, Event)> {
        let agents: Vec<AgentId> = ["fa", "fb", "fc"]
            .iter()
            .map(|a| AgentId::new(*a).expect("valid"))
            .collect();
        // Write i goes to agent i % 3; its events follow that agent's previous ones.
        let start_of =
            |i: usize| -> usize { (0..i).filter(|j| j % 3 == i % 3).map(|j| 1 + j % 5).sum() };
        let mut fed = Vec::new();
        for (n, i) in writes.enumerate() {
            let agent = &agents[i % 3];
            let from = start_of(i);
            let part = &events[from..from + 1 + i % 5];
            store
                .apply(vec![AgentWrite {
                    rate: None,
                    rate_before: None,
                    agent: agent.clone(),
                    expected_seq: part[0].seq - 1,
                    events: part.to_vec(),
                    checkpoint: None,
                }])
                .expect("applies");
            if n < synced {
                store.sync().expect("syncs");
                fed.extend(part.iter().map(|e| (agent.clone(), e.clone())));
            }
            if n % 4 == 3 {
                // Several indexing passes, so pages cross `f/` runs.
                wait_indexed(store);
            }
        }
        fed
    }

    type Fed = Vec<(AgentId, Event)>;

    /// Reads the whole feed from `from` in pages of `page`, waiting for the indexer; the
    /// events and the cursor after each page.
    fn read_feed(
        store: &SledStorage,
        from: FeedCursor,
        page: usize,
    ) -> (Fed, Vec<(usize, FeedCursor)>) {
        wait_indexed(store);
        let (mut out, mut cursors, mut at) = (Vec::new(), Vec::new(), from);
        loop {
            let got = store.feed(at, page).expect("reads the feed");
            assert!(got.events.len() <= page, "a page holds at most its limit");
            assert!(got.next >= at, "the cursor never goes back");
            out.extend(got.events.iter().cloned());
            at = got.next;
            cursors.push((out.len(), at));
            if got.events.is_empty() {
                return (out, cursors);
            }
        }
    }

    #[test]
    fn the_feed_shows_synced_writes_in_apply_order_across_restarts_and_crashes() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let crashed = tempfile::tempdir().expect("tempdir");
        let (_, events, _) = journal_of(600);
        let mut all;
        let saved;
        {
            let store = SledStorage::open(tmp.path(), 8 << 20).expect("opens");
            all = feed_writes(&store, &events, 0..40, 40);
            for page in [1, 2, 3, 7, 1_000] {
                let (got, _) = read_feed(&store, FeedCursor::default(), page);
                assert_eq!(got, all, "pages of {page}");
            }
            let (_, cursors) = read_feed(&store, FeedCursor::default(), 3);
            saved = cursors;
        }
        // A clean restart: every cursor taken before resumes with exactly the rest.
        {
            let store = SledStorage::open(tmp.path(), 8 << 20).expect("reopens");
            for &(seen, cursor) in &saved {
                let (rest, _) = read_feed(&store, cursor, 7);
                assert_eq!(rest, all[seen..], "resumed after {seen} events");
            }
            // A crash with the newest writes in the WAL only.
            all.extend(feed_writes(&store, &events, 40..70, 30));
            copy_tree(tmp.path(), crashed.path());
            // Applied but never synced: not durable, so never in the feed.
            feed_writes(&store, &events, 70..75, 0);
            let (got, _) = read_feed(&store, FeedCursor::default(), 7);
            assert_eq!(got, all, "only synced writes");
        }
        let store = SledStorage::open(crashed.path(), 8 << 20).expect("reopens the crash");
        for &(seen, cursor) in &saved {
            let (rest, _) = read_feed(&store, cursor, 7);
            assert_eq!(
                rest,
                all[seen..],
                "resumed after {seen} events, after a crash"
            );
        }
        let end = read_feed(&store, FeedCursor::default(), 1_000).1;
        let (_, end) = end.last().copied().expect("a last cursor");
        // The writes the crash lost, again.
        let more = feed_writes(&store, &events, 70..80, 10);
        let (got, _) = read_feed(&store, end, 7);
        assert_eq!(got, more, "from the end cursor, only what came after");
    }

    fn grant(amount_micros: u64, expires_at_ms: Option<u64>) -> CommandKind {
        CommandKind::IssueGrant {
            amount_micros,
            terms: tally_core::GrantTerms {
                expires_at_ms,
                priority: 100,
                category: tally_core::GrantCategory::Promotional,
            },
        }
    }

    fn expiries(
        store: &SledStorage,
        from_ms: u64,
        after: Option<&[u8]>,
        through_ms: u64,
        limit: usize,
    ) -> Vec<(u64, String, u64)> {
        store
            .grant_expiries(from_ms, after, through_ms, limit)
            .expect("reads")
            .into_iter()
            .map(|e| (e.expires_at_ms, e.agent.as_str().to_owned(), e.grant_id))
            .collect()
    }

    #[test]
    fn an_expiring_grant_gets_an_index_key_with_its_journal_entry_and_others_none() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (state, events) = crate::testing::decided([
            CommandKind::CreateAgent {
                plan: crate::testing::default_plan(),
                status: Status::Active,
            },
            CommandKind::Credit { amount_micros: 10 },
            grant(20, Some(5_000)),
            grant(30, None),
            grant(40, Some(3_000)),
        ]);
        let store = SledStorage::open(tmp.path(), 8 << 20).expect("opens");
        write(&store, &state.id, &events);
        wait_indexed(&store);
        assert_eq!(
            expiries(&store, 0, None, u64::MAX, 10),
            [(3_000, "agent-1".into(), 5), (5_000, "agent-1".into(), 3)],
            "in expiry order; the grant id is the seq of its entry"
        );
        assert_eq!(
            store
                .backfill_grant_expiries(&[state])
                .map(|()| expiries(&store, 0, None, u64::MAX, 10))
                .expect("backfills"),
            [(3_000, "agent-1".into(), 5), (5_000, "agent-1".into(), 3)],
            "a backfill writes the same keys"
        );
    }

    #[test]
    fn grant_expiries_page_by_expiry_with_the_bounds_each_way() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = SledStorage::open(tmp.path(), 8 << 20).expect("opens");
        assert!(
            store.grant_expiries_complete().expect("reads"),
            "a new store's index is complete"
        );
        let id = |s: &str| AgentId::new(s).expect("valid");
        // Expiries whose bytes hold `/`, ids of different lengths, the largest expiry.
        let keys = [
            (0x2f2f, "a", 2),
            (5, "b", 9),
            (5, "a", 7),
            (5, "a-longer", 1),
            (3, "zz", 1),
            (u64::MAX, "a", 3),
        ];
        let mut batch = sled::Batch::default();
        for (at, agent, grant) in keys {
            batch.insert(grant_expiry_key(at, &id(agent), grant), &[][..]);
        }
        store.shared.db.apply_batch(batch).expect("writes");
        let all = expiries(&store, 0, None, u64::MAX, 100);
        assert_eq!(
            all,
            [
                (3, "zz".into(), 1),
                // Byte order of `<agent>/`: `-` sorts before `/`.
                (5, "a-longer".into(), 1),
                (5, "a".into(), 7),
                (5, "b".into(), 9),
                (0x2f2f, "a".into(), 2),
                (u64::MAX, "a".into(), 3),
            ]
        );
        // `through_ms` is inclusive, `from_ms` too.
        assert_eq!(expiries(&store, 0, None, 5, 100), all[..4]);
        assert_eq!(expiries(&store, 0, None, 4, 100), all[..1]);
        assert_eq!(expiries(&store, 5, None, 5, 100), all[1..4]);
        assert_eq!(expiries(&store, 6, None, u64::MAX - 1, 100), all[4..5]);
        assert_eq!(expiries(&store, 0, None, u64::MAX, 2), all[..2]);
        // `after` is exclusive, and wins over `from_ms` only when it is further on.
        let page = store.grant_expiries(0, None, u64::MAX, 2).expect("reads");
        let after = page[1].key.as_slice();
        assert_eq!(expiries(&store, 0, Some(after), u64::MAX, 100), all[2..]);
        assert_eq!(
            expiries(&store, 0x2f2f, Some(after), u64::MAX, 100),
            all[4..]
        );
        // Removal by key.
        let gone: Vec<Vec<u8>> = page.into_iter().map(|e| e.key).collect();
        store.remove_grant_expiries(&gone).expect("removes");
        assert_eq!(expiries(&store, 0, None, u64::MAX, 100), all[2..]);
    }
}
