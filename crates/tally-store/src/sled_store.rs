//! The durable store: a write-ahead log for commits, sled for everything read.
//!
//! A group commit appends the run's writes to the WAL (`wal.rs`: one `write`, one
//! `fdatasync`) and is then acknowledged. An indexer thread moves what the WAL holds into
//! sled every `INDEX_INTERVAL_MS` (or sooner under load) as one atomic `apply_batch` and a
//! `flush`, then deletes WAL segments sled has made durable. Until then reads see those
//! writes in memory, so a reader never sees the difference. Opening replays the WAL records
//! sled does not have yet (`m/wal` holds the newest lsn sled has).
//!
//! Why, measured on two cores: one sled key per entry with sled's `flush` as the group
//! commit held durable debits over HTTP to ~30k/s (each insert copies and re-serializes
//! its leaf, and each small flush goes through sled's I/O threads); with the WAL in front
//! the same wrk run does ~48k/s, and the engine bench 240k/s instead of 82k/s. The indexer
//! writes many entries of an agent as one chunk, so sled sees a few keys per agent per
//! interval instead of one per entry.
//!
//! sled's keys, one tree, so one `apply_batch` is atomic across all of them:
//! - `a/<agent>`: agent record (a checkpoint; it holds the last sequence it includes);
//! - `j/<agent>/<first seq as 8 bytes big-endian>`: a chunk of consecutive journal entries
//!   (schema 1 wrote one entry per key; those still read);
//! - `m/schema`: the schema version; `m/wal`: the newest WAL lsn sled holds.
//!
//! Agent ids never contain `/`, so `j/<agent>/` is a prefix of that agent's entries only.
//! sled is pinned (`=0.34.7`) and is beta software with known crash bugs; the kill test is
//! what lets us trust it here.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use tally_core::{AgentId, AgentState, Event};

use crate::codec;
use crate::error::StoreError;
use crate::storage::{AgentWrite, Storage};
use crate::wal::{self, WalWriter};

/// The schema this build writes. Schema 1 (one journal entry per key, no WAL) is read and
/// upgraded on open.
pub const SCHEMA_VERSION: u32 = 2;
const SCHEMA_KEY: &[u8] = b"m/schema";
const WAL_KEY: &[u8] = b"m/wal";
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
/// A journal chunk holds at most this many events...
const CHUNK_EVENTS_MAX: usize = 32;
/// ...and about this many bytes: sled writes a whole leaf (up to 16 keys) when it
/// consolidates one, and stores a leaf over ~128 KiB as a separate blob file.
const CHUNK_BYTES_MAX: usize = 4_096;

/// tally's data: a WAL and a sled database in one directory.
#[derive(Debug)]
pub struct SledStorage {
    shared: Arc<Shared>,
    indexer: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct Shared {
    db: sled::Db,
    data_dir: PathBuf,
    /// Held for a whole WAL append, so appends reach the file in lsn order.
    wal: Mutex<WalState>,
    staged: Mutex<Staged>,
    /// Wakes the indexer (work waiting, or stop) and appliers waiting for room.
    changed: Condvar,
    failure: OnceLock<String>,
    /// `apply` waits while this many events are not yet in sled.
    backlog_max: usize,
    /// The indexer starts early once this many wait.
    trigger: usize,
}

#[derive(Debug)]
struct WalState {
    writer: WalWriter,
    /// The previous append's buffer, kept for its capacity.
    spare: Vec<u8>,
}

#[derive(Debug)]
struct Staged {
    /// Framed WAL records applied but not yet appended.
    bytes: Vec<u8>,
    next_lsn: u64,
    /// Applied writes not yet taken by the indexer.
    pending: Pending,
    /// Writes the indexer is putting into sled; still read from here until it is done.
    in_flight: Option<Arc<Pending>>,
    stopping: bool,
}

impl Staged {
    /// Events applied but not yet in sled: pending and in flight.
    fn backlog(&self) -> usize {
        self.pending.events + self.in_flight.as_ref().map_or(0, |p| p.events)
    }
}

/// Writes applied but not yet in sled, by agent.
#[derive(Debug, Default)]
struct Pending {
    agents: HashMap<AgentId, AgentPending>,
    events: usize,
    last_lsn: u64,
}

#[derive(Debug, Default)]
struct AgentPending {
    events: Vec<Event>,
    checkpoint: Option<AgentState>,
}

impl Pending {
    fn add(&mut self, write: AgentWrite, lsn: u64) {
        let entry = self.agents.entry(write.agent).or_default();
        debug_assert!(entry
            .events
            .last()
            .zip(write.events.first())
            .is_none_or(|(a, b)| a.seq + 1 == b.seq));
        self.events += write.events.len();
        entry.events.extend(write.events);
        if write.checkpoint.is_some() {
            entry.checkpoint = write.checkpoint;
        }
        self.last_lsn = lsn;
    }

    fn is_empty(&self) -> bool {
        self.agents.is_empty()
    }
}

fn agent_key(agent: &AgentId) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + agent.as_str().len());
    k.extend_from_slice(b"a/");
    k.extend_from_slice(agent.as_str().as_bytes());
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

/// Writes `pending` into sled, atomically with the lsn it reaches, and makes it durable.
fn index(db: &sled::Db, pending: &Pending) -> Result<(), StoreError> {
    let mut batch = sled::Batch::default();
    for (agent, p) in &pending.agents {
        insert_chunks(&mut batch, agent, &p.events)?;
        if let Some(record) = &p.checkpoint {
            debug_assert_eq!(record.check_invariants(), Ok(()));
            batch.insert(agent_key(agent), codec::encode_agent(record)?);
        }
    }
    batch.insert(WAL_KEY, codec::encode_u64(pending.last_lsn));
    db.apply_batch(batch)?;
    db.flush()?;
    Ok(())
}

impl Shared {
    fn fail(&self, e: &StoreError) -> StoreError {
        let _ = self.failure.set(e.to_string());
        tracing::error!(error = %e, "storage failed; the store stops taking writes");
        StoreError::Io(e.to_string())
    }

    fn check(&self) -> Result<(), StoreError> {
        match self.failure.get() {
            Some(reason) => Err(StoreError::Io(format!("storage failed earlier: {reason}"))),
            None => Ok(()),
        }
    }

    /// The agent's events applied but not yet in sled that `keep` selects, oldest first.
    fn recent_events(&self, agent: &AgentId, keep: impl Fn(u64) -> bool) -> Vec<Event> {
        let staged = self.staged.lock();
        let mut out = Vec::new();
        for p in staged
            .in_flight
            .as_deref()
            .into_iter()
            .chain([&staged.pending])
        {
            if let Some(a) = p.agents.get(agent) {
                out.extend(a.events.iter().filter(|e| keep(e.seq)).cloned());
            }
        }
        out
    }

    fn run_indexer(&self) {
        loop {
            let taken = {
                let mut staged = self.staged.lock();
                let deadline = Instant::now() + Duration::from_millis(INDEX_INTERVAL_MS);
                while !staged.stopping && staged.pending.events < self.trigger {
                    if self.changed.wait_until(&mut staged, deadline).timed_out() {
                        break;
                    }
                }
                if staged.pending.is_empty() {
                    if staged.stopping {
                        return;
                    }
                    continue;
                }
                let taken = Arc::new(std::mem::take(&mut staged.pending));
                staged.in_flight = Some(Arc::clone(&taken));
                taken
            };
            self.changed.notify_all();
            if let Err(e) = index(&self.db, &taken) {
                // in_flight stays, so reads still see every applied write.
                self.fail(&e);
                return;
            }
            self.staged.lock().in_flight = None;
            // Appliers waiting at the backlog bound count what was in flight.
            self.changed.notify_all();
            let obsolete = self.wal.lock().writer.take_obsolete(taken.last_lsn);
            if let Err(e) = wal::remove(&obsolete) {
                tracing::warn!(error = %e, "deleting write-ahead log segments sled already holds");
            }
        }
    }
}

impl SledStorage {
    /// Opens or creates the store at `path` with a sled page cache of `cache_bytes`: checks
    /// (or writes) the schema version, replays the WAL records sled lacks, and starts the
    /// indexer.
    pub fn open(path: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        Self::open_with_backlog(path, cache_bytes, INDEX_BACKLOG_EVENTS_MAX_DEFAULT)
    }

    /// Like [`SledStorage::open`], with `backlog_events_max` events at most applied but not
    /// yet moved into sled (at least 1).
    pub fn open_with_backlog(
        path: &Path,
        cache_bytes: u64,
        backlog_events_max: usize,
    ) -> Result<Self, StoreError> {
        let backlog_max = backlog_events_max.max(1);
        let db = open_sled(path, cache_bytes)?;
        if let Some(bytes) = db.get(SCHEMA_KEY)? {
            let found = codec::decode_u32(&bytes)?;
            if found == 0 || found > SCHEMA_VERSION {
                return Err(StoreError::SchemaVersion {
                    found,
                    expected: SCHEMA_VERSION,
                });
            }
        }
        // Written before any WAL exists, so an older build refuses this directory instead
        // of reading sled without the WAL's records.
        db.insert(SCHEMA_KEY, codec::encode_u32(SCHEMA_VERSION))?;
        db.flush()?;

        let applied_lsn = match db.get(WAL_KEY)? {
            Some(bytes) => codec::decode_u64(&bytes)?,
            None => 0,
        };
        let mut pending = Pending::default();
        let mut records = 0u64;
        let replayed = wal::replay(path, |lsn, payload| {
            if lsn <= applied_lsn {
                return Ok(());
            }
            pending.add(codec::decode_write(payload)?, lsn);
            records += 1;
            if pending.events >= backlog_max {
                index(&db, &std::mem::take(&mut pending))?;
            }
            Ok(())
        })?;
        if !pending.is_empty() {
            index(&db, &pending)?;
        }
        if records > 0 || replayed.torn_tail {
            tracing::info!(
                records,
                torn_tail = replayed.torn_tail,
                "replayed the write-ahead log into sled"
            );
        }
        // Everything the old segments held is in sled now; a fresh segment never appends
        // after a torn tail.
        wal::remove(&replayed.segments)?;
        let next_lsn = applied_lsn.max(replayed.last_lsn) + 1;
        let shared = Arc::new(Shared {
            db,
            data_dir: path.to_path_buf(),
            wal: Mutex::new(WalState {
                writer: WalWriter::create(path, next_lsn)?,
                spare: Vec::new(),
            }),
            staged: Mutex::new(Staged {
                bytes: Vec::new(),
                next_lsn,
                pending: Pending::default(),
                in_flight: None,
                stopping: false,
            }),
            changed: Condvar::new(),
            failure: OnceLock::new(),
            backlog_max,
            trigger: INDEX_EVENTS_TRIGGER.min(backlog_max / 4).max(1),
        });
        let indexer = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("tally-indexer".into())
                .spawn(move || shared.run_indexer())
                .map_err(|e| StoreError::Io(format!("starting the indexer thread: {e}")))?
        };
        Ok(Self {
            shared,
            indexer: Some(indexer),
        })
    }
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
    /// Stops the indexer after it moved everything into sled; the WAL is then empty.
    fn drop(&mut self) {
        self.shared.staged.lock().stopping = true;
        self.shared.changed.notify_all();
        if let Some(indexer) = self.indexer.take() {
            if indexer.join().is_err() {
                tracing::error!("the indexer thread panicked");
                return;
            }
        }
        let staged = self.shared.staged.lock();
        if self.shared.failure.get().is_none()
            && staged.bytes.is_empty()
            && staged.pending.is_empty()
            && staged.in_flight.is_none()
        {
            drop(staged);
            let segments = self.shared.wal.lock().writer.take_all();
            if let Err(e) = wal::remove(&segments) {
                tracing::warn!(error = %e, "deleting the write-ahead log on close");
            }
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
        while staged.backlog() >= self.shared.backlog_max {
            self.shared.check()?;
            self.shared.changed.notify_all();
            self.shared
                .changed
                .wait_for(&mut staged, Duration::from_millis(100));
        }
        for (write, payload) in writes.into_iter().zip(&payloads) {
            let lsn = staged.next_lsn;
            staged.next_lsn += 1;
            wal::frame(&mut staged.bytes, lsn, payload);
            staged.pending.add(write, lsn);
        }
        if staged.pending.events >= self.shared.trigger {
            self.shared.changed.notify_all();
        }
        Ok(())
    }

    fn sync(&self) -> Result<(), StoreError> {
        self.shared.check()?;
        let mut wal = self.shared.wal.lock();
        let (mut bytes, next_lsn) = {
            let spare = std::mem::take(&mut wal.spare);
            let mut staged = self.shared.staged.lock();
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
        Ok(())
    }

    fn load_agents(&self) -> Result<Vec<AgentState>, StoreError> {
        let mut recent: HashMap<AgentId, AgentState> = HashMap::new();
        {
            let staged = self.shared.staged.lock();
            for p in staged
                .in_flight
                .as_deref()
                .into_iter()
                .chain([&staged.pending])
            {
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

    fn journal(
        &self,
        agent: &AgentId,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        let Some(start) = after_seq.checked_add(1) else {
            return Ok(Vec::new());
        };
        // Read before sled: an event the indexer moves meanwhile is then in both, never in
        // neither; sled holds a prefix of the agent's journal and this a suffix.
        let recent = self.shared.recent_events(agent, |seq| seq >= start);
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

    fn journal_rev(
        &self,
        agent: &AgentId,
        before_seq: u64,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        let recent = self.shared.recent_events(agent, |seq| seq < before_seq);
        let mut out: Vec<Event> = recent.into_iter().rev().collect();
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

    fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(self.shared.db.size_on_disk()? + wal::size_on_disk(&self.shared.data_dir)?)
    }

    fn backlog_events(&self) -> u64 {
        self.shared.staged.lock().backlog() as u64
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
        between: impl Fn(&SledStorage),
    ) {
        for part in events.chunks(7) {
            store
                .apply(vec![AgentWrite {
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
                agent: id.clone(),
                expected_seq: state.last_seq,
                events: Vec::new(),
                checkpoint: Some(state.clone()),
            }])
            .expect("applies");
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
        let store = SledStorage::open_with_backlog(tmp.path(), 8 << 20, 16).expect("opens");
        write_with(&store, &id, &events, |store| {
            // The check comes before a run is added, so one run may pass the bound.
            let backlog = store.backlog_events();
            assert!(backlog < 16 + 7, "{backlog}");
        });
        assert_reads(&store, &id, &events);
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
        {
            let store = SledStorage::open(tmp.path(), 8 << 20).expect("opens schema 1");
            assert_reads(&store, &id, &events);
            assert_eq!(store.load_agents().expect("loads"), vec![state]);
            write(&store, &id, &more);
        }
        let db = open_sled(tmp.path(), 8 << 20).expect("opens");
        let schema = db.get(SCHEMA_KEY).expect("reads").expect("present");
        assert_eq!(codec::decode_u32(&schema).expect("decodes"), SCHEMA_VERSION);
        drop(db);
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

    #[test]
    fn the_wal_is_replayed_into_sled_after_a_crash() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let crashed = tempfile::tempdir().expect("tempdir");
        let (id, events, _) = journal_of(80);
        let store = SledStorage::open(tmp.path(), 8 << 20).expect("opens");
        write(&store, &id, &events);
        // The files as a crash right now would leave them (the WAL first, as in a crash
        // the indexer could not have deleted a segment sled does not hold yet).
        let copy = |from: &Path, to: &Path| {
            std::fs::create_dir_all(to).expect("mkdir");
            for entry in std::fs::read_dir(from).expect("lists") {
                let entry = entry.expect("entry");
                if entry.file_type().expect("type").is_file() {
                    std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copies");
                }
            }
        };
        copy(&tmp.path().join("wal"), &crashed.path().join("wal"));
        copy(tmp.path(), crashed.path());
        drop(store);
        let reopened = SledStorage::open(crashed.path(), 8 << 20).expect("reopens");
        assert_reads(&reopened, &id, &events);
        assert_eq!(
            wal::size_on_disk(crashed.path()).expect("lists"),
            0,
            "replayed segments are deleted"
        );
    }
}
