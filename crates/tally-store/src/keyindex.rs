//! The idempotency key index on disk: which key each agent used, by which request, for
//! which journal entries, for the whole retention window at any request rate, in memory
//! that does not grow with the window (about 2 bytes a key).
//!
//! Why: keys kept only in memory (~100 bytes each) bounded the window by memory: at 48k
//! keyed debits/s, ten million keys covered 3.5 minutes, and a client retrying after ten
//! minutes was charged twice.
//!
//! On disk, `data_dir/keys/<hour>-<level>-<id>.run`: immutable files of fixed-size key
//! records (`codec::encode_key_record`) sorted by slot, each holding keys used in one UTC
//! hour, with a checksummed footer. Written to a `.tmp` name, fsynced, renamed, and the
//! directory fsynced, so a run on disk is always whole.
//!
//! In memory: per hour, a blocked Bloom filter of every key used in it (16 bits a key, one
//! cache line a probe); per run, the first slot of each block of 64 records (¼ byte a key);
//! and a buffer of keys indexed but not yet in a run (bounded). A lookup no filter admits
//! touches no disk; a filter hit searches that hour's runs, one block read each.
//!
//! Who writes: the shard adds a key to its hour's filter when it decides the request
//! ([`KeyIndex::note`]); the indexer adds the keys of the journal entries it moves into sled
//! to the buffer, and writes the buffer as runs (one per hour) when it is full, when an hour
//! it holds is over, and on close. A WAL segment is deleted only after every key in it is in
//! a run on disk, so a crash loses nothing the WAL cannot give back. The maintenance pass
//! ([`KeyIndex::maintain`]) merges runs (eight of a level into one of the next; all of an
//! hour into one once it is over), deletes hours that left the window ("pruned an hour at a
//! time") and, past the disk bound, the oldest hours early: the window is then cut, and
//! [`KeyIndex::status`] says so.
//!
//! Time here is data time: the newest `at_ms` seen, never a clock, so tests with a manual
//! clock and a replay after a crash behave the same.

use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use tally_core::{AgentId, Event, TimestampMs};

use crate::codec::{self, KeyRunFooter, KEY_RECORD_BYTES, KEY_RUN_FOOTER_BYTES};
use crate::error::StoreError;
use crate::idem;
use crate::storage::{KeyEntry, KeyIndexStatus};

pub const HOUR_MS: u64 = 3_600_000;
const DIR_NAME: &str = "keys";
/// Present once the index holds every key of the journal inside the window.
const COMPLETE_MARKER: &str = "complete";
const RUN_SUFFIX: &str = ".run";
const TMP_SUFFIX: &str = ".tmp";
/// Records per fence: a filter hit reads one block of this many records from a run.
const BLOCK_RECORDS: usize = 64;
/// Runs of one level in one hour that are merged into one run of the next level.
const MERGE_FANIN: usize = 8;
/// The level of a run that holds all of a finished hour.
const LEVEL_FINAL: u32 = 99;
/// An hour is finished this long after it ended: shards' clocks differ a little, so a key
/// of the previous hour may still arrive just after the hour turned.
const HOUR_CLOSE_GRACE_MS: u64 = 60_000;
/// Filter bits a key: 16 bits and 8 probes in one 512-bit block admit about 0.06 % of
/// absent keys per hour filter.
const FILTER_BITS_PER_KEY: u64 = 16;
const FILTER_PROBES: u32 = 8;
/// The first filter of an hour holds at least this many keys before a larger one is added.
const FILTER_KEYS_MIN: u64 = 16_384;
/// Read buffer for loading and merging runs.
const READ_BUFFER_BYTES: usize = 256 << 10;

/// One cache line of filter bits.
type Block = [AtomicU64; 8];

/// A blocked Bloom filter that many threads can add to at once.
#[derive(Debug)]
struct Bloom {
    blocks: Box<[Block]>,
    keys_max: u64,
    keys: AtomicU64,
}

impl Bloom {
    fn new(keys_max: u64) -> Self {
        let blocks = (keys_max.max(1) * FILTER_BITS_PER_KEY).div_ceil(512).max(1);
        Self {
            blocks: (0..blocks).map(|_| Block::default()).collect(),
            keys_max,
            keys: AtomicU64::new(0),
        }
    }

    /// The block a slot falls in and the bits it sets there. Slots are SHA-256 output, so
    /// their bits are already independent: the low half picks the block, the high half and
    /// a mix of both the probes.
    fn probe(&self, slot: u128) -> (usize, [u64; 8]) {
        let lo = slot as u64;
        let hi = (slot >> 64) as u64;
        let block = ((u128::from(lo) * self.blocks.len() as u128) >> 64) as usize;
        let mixed = (hi ^ lo.rotate_left(29)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut masks = [0u64; 8];
        for i in 0..FILTER_PROBES {
            let source = if i < FILTER_PROBES / 2 { hi } else { mixed };
            let bit = ((source >> ((i % (FILTER_PROBES / 2)) * 9)) & 511) as usize;
            masks[bit >> 6] |= 1 << (bit & 63);
        }
        (block, masks)
    }

    fn insert(&self, slot: u128) {
        let (block, masks) = self.probe(slot);
        for (word, mask) in self.blocks[block].iter().zip(masks) {
            if mask != 0 {
                word.fetch_or(mask, Ordering::Relaxed);
            }
        }
        self.keys.fetch_add(1, Ordering::Relaxed);
    }

    fn contains(&self, slot: u128) -> bool {
        let (block, masks) = self.probe(slot);
        self.blocks[block]
            .iter()
            .zip(masks)
            .all(|(word, mask)| word.load(Ordering::Relaxed) & mask == mask)
    }

    fn is_full(&self) -> bool {
        self.keys.load(Ordering::Relaxed) >= self.keys_max
    }

    fn bytes(&self) -> u64 {
        self.blocks.len() as u64 * 64
    }
}

/// The filters of every hour in the window. An hour's filters grow by adding a filter twice
/// the size of the last when it is full, so no count needs to be known in advance.
#[derive(Debug, Default)]
struct Filters {
    hours: RwLock<BTreeMap<u64, Vec<Bloom>>>,
}

impl Filters {
    fn insert(&self, slot: u128, hour: u64, keys_hint: u64) {
        {
            let hours = self.hours.read();
            if let Some(last) = hours.get(&hour).and_then(|f| f.last()) {
                if !last.is_full() {
                    last.insert(slot);
                    return;
                }
            }
        }
        let mut hours = self.hours.write();
        // An hour new to the index starts at the size of the hour before it: rates change
        // slowly, so most hours need one filter.
        let previous = hours.range(..hour).next_back().map_or(0, |(_, f)| {
            f.iter().map(|b| b.keys.load(Ordering::Relaxed)).sum()
        });
        let filters = hours.entry(hour).or_default();
        if filters.last().is_none_or(Bloom::is_full) {
            let keys_max = match filters.last() {
                Some(last) => last.keys_max * 2,
                None => keys_hint.max(previous).max(FILTER_KEYS_MIN),
            };
            filters.push(Bloom::new(keys_max));
        }
        filters.last().expect("just pushed").insert(slot);
    }

    /// The hours from `from_hour` on whose filters admit `slot`, newest first.
    fn candidates(&self, slot: u128, from_hour: u64) -> Vec<u64> {
        let hours = self.hours.read();
        hours
            .range(from_hour..)
            .rev()
            .filter(|(_, filters)| filters.iter().any(|b| b.contains(slot)))
            .map(|(&hour, _)| hour)
            .collect()
    }

    fn drop_before(&self, hour: u64) {
        let mut hours = self.hours.write();
        let keep = hours.split_off(&hour);
        *hours = keep;
    }

    fn bytes(&self) -> u64 {
        self.hours.read().values().flatten().map(Bloom::bytes).sum()
    }
}

/// An immutable sorted file of key records, open for reads.
#[derive(Debug)]
struct Run {
    path: PathBuf,
    file: File,
    hour: u64,
    level: u32,
    id: u64,
    count: u64,
    max_at_ms: u64,
    /// The first slot of each block of `BLOCK_RECORDS` records.
    fences: Vec<u128>,
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Io(format!("{what} {}: {e}", path.display()))
}

fn corrupt(path: &Path, what: &str) -> StoreError {
    StoreError::Io(format!(
        "idempotency key index file {} {what}; stop tally, delete {} and start again to rebuild the index from the journal",
        path.display(),
        path.parent().map_or_else(|| path.display().to_string(), |p| p.display().to_string())
    ))
}

fn run_name(hour: u64, level: u32, id: u64) -> String {
    format!("{hour:010}-{level:02}-{id:020}{RUN_SUFFIX}")
}

/// `(hour, level, id)` of a run file's name.
fn parse_run_name(name: &str) -> Option<(u64, u32, u64)> {
    let stem = name.strip_suffix(RUN_SUFFIX)?;
    let mut parts = stem.split('-');
    let hour = parts.next()?.parse().ok()?;
    let level = parts.next()?.parse().ok()?;
    let id = parts.next()?.parse().ok()?;
    parts.next().is_none().then_some((hour, level, id))
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err("syncing directory", dir, e))
}

impl Run {
    /// The newest record of `slot` in this run.
    fn find(&self, slot: u128) -> Result<Option<KeyEntry>, StoreError> {
        let block = match self.fences.partition_point(|&f| f <= slot) {
            0 => return Ok(None),
            n => n - 1,
        };
        let first = block * BLOCK_RECORDS;
        let n = BLOCK_RECORDS.min(self.count as usize - first);
        let mut buf = vec![0u8; n * KEY_RECORD_BYTES];
        self.file
            .read_exact_at(&mut buf, (first * KEY_RECORD_BYTES) as u64)
            .map_err(|e| io_err("reading", &self.path, e))?;
        let records: Vec<&[u8]> = buf.chunks_exact(KEY_RECORD_BYTES).collect();
        let at = records.partition_point(|r| slot_of(r) < slot);
        match records.get(at) {
            Some(r) if slot_of(r) == slot => Ok(Some(codec::decode_key_record(r)?.1)),
            _ => Ok(None),
        }
    }
}

/// The slot of an encoded key record (its first 16 bytes, big-endian).
fn slot_of(record: &[u8]) -> u128 {
    let mut b = [0u8; 16];
    b.copy_from_slice(&record[..16]);
    u128::from_be_bytes(b)
}

/// Writes one run: records pushed in slot order, the newest first among equal slots (the
/// rest are dropped).
struct RunWriter {
    tmp: PathBuf,
    path: PathBuf,
    out: BufWriter<File>,
    hour: u64,
    level: u32,
    id: u64,
    crc: crc32fast::Hasher,
    count: u64,
    min_at_ms: u64,
    max_at_ms: u64,
    fences: Vec<u128>,
    last_slot: Option<u128>,
}

impl RunWriter {
    fn create(dir: &Path, hour: u64, level: u32, id: u64) -> Result<Self, StoreError> {
        let path = dir.join(run_name(hour, level, id));
        let tmp = path.with_extension(format!("run{TMP_SUFFIX}"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| io_err("creating", &tmp, e))?;
        Ok(Self {
            tmp,
            path,
            out: BufWriter::with_capacity(READ_BUFFER_BYTES, file),
            hour,
            level,
            id,
            crc: crc32fast::Hasher::new(),
            count: 0,
            min_at_ms: u64::MAX,
            max_at_ms: 0,
            fences: Vec::new(),
            last_slot: None,
        })
    }

    fn push(&mut self, slot: u128, entry: &KeyEntry) -> Result<(), StoreError> {
        if let Some(last) = self.last_slot {
            debug_assert!(last <= slot, "runs are written in slot order");
            if last == slot {
                return Ok(());
            }
        }
        self.last_slot = Some(slot);
        if self.count.is_multiple_of(BLOCK_RECORDS as u64) {
            self.fences.push(slot);
        }
        let record = codec::encode_key_record(slot, entry);
        self.crc.update(&record);
        self.out
            .write_all(&record)
            .map_err(|e| io_err("writing", &self.tmp, e))?;
        self.count += 1;
        self.min_at_ms = self.min_at_ms.min(entry.at_ms);
        self.max_at_ms = self.max_at_ms.max(entry.at_ms);
        Ok(())
    }

    /// Writes the footer, fsyncs and renames the file to its final name. The caller
    /// fsyncs the directory.
    fn finish(self) -> Result<Run, StoreError> {
        let footer = KeyRunFooter {
            count: self.count,
            hour: self.hour,
            min_at_ms: self.min_at_ms.min(self.max_at_ms),
            max_at_ms: self.max_at_ms,
            records_crc: self.crc.finalize(),
        };
        let mut out = self.out;
        out.write_all(&codec::encode_key_run_footer(&footer))
            .map_err(|e| io_err("writing", &self.tmp, e))?;
        let file = out
            .into_inner()
            .map_err(|e| io_err("writing", &self.tmp, e.into_error()))?;
        file.sync_all()
            .map_err(|e| io_err("syncing", &self.tmp, e))?;
        fs::rename(&self.tmp, &self.path).map_err(|e| io_err("renaming", &self.tmp, e))?;
        Ok(Run {
            path: self.path,
            file,
            hour: self.hour,
            level: self.level,
            id: self.id,
            count: self.count,
            max_at_ms: footer.max_at_ms,
            fences: self.fences,
        })
    }
}

/// Reads a run's records in order, checking them against its footer.
struct RunReader {
    path: PathBuf,
    input: BufReader<File>,
    footer: KeyRunFooter,
    read: u64,
    crc: crc32fast::Hasher,
    last_slot: Option<u128>,
}

impl RunReader {
    fn open(path: &Path) -> Result<Self, StoreError> {
        let file = File::open(path).map_err(|e| io_err("opening", path, e))?;
        let len = file
            .metadata()
            .map_err(|e| io_err("reading metadata of", path, e))?
            .len();
        if len < KEY_RUN_FOOTER_BYTES as u64 {
            return Err(corrupt(path, "is shorter than its footer"));
        }
        let mut footer = [0u8; KEY_RUN_FOOTER_BYTES];
        file.read_exact_at(&mut footer, len - KEY_RUN_FOOTER_BYTES as u64)
            .map_err(|e| io_err("reading", path, e))?;
        let footer = codec::decode_key_run_footer(&footer)
            .map_err(|e| corrupt(path, &format!("has a bad footer ({e})")))?;
        if footer.count.checked_mul(KEY_RECORD_BYTES as u64)
            != Some(len - KEY_RUN_FOOTER_BYTES as u64)
        {
            return Err(corrupt(path, "has a length that does not match its footer"));
        }
        Ok(Self {
            path: path.to_path_buf(),
            input: BufReader::with_capacity(READ_BUFFER_BYTES, file),
            footer,
            read: 0,
            crc: crc32fast::Hasher::new(),
            last_slot: None,
        })
    }

    /// The next record, or `None` after the last (whose checksum is then verified).
    fn next(&mut self) -> Result<Option<(u128, KeyEntry)>, StoreError> {
        if self.read == self.footer.count {
            if self.crc.clone().finalize() != self.footer.records_crc {
                return Err(corrupt(&self.path, "fails its checksum"));
            }
            return Ok(None);
        }
        let mut record = [0u8; KEY_RECORD_BYTES];
        self.input
            .read_exact(&mut record)
            .map_err(|e| io_err("reading", &self.path, e))?;
        self.crc.update(&record);
        self.read += 1;
        let (slot, entry) = codec::decode_key_record(&record)
            .map_err(|e| corrupt(&self.path, &format!("holds a bad record ({e})")))?;
        if self.last_slot.is_some_and(|last| last >= slot) {
            return Err(corrupt(&self.path, "is not sorted"));
        }
        self.last_slot = Some(slot);
        Ok(Some((slot, entry)))
    }
}

/// Keys indexed from the WAL but not yet in a run.
#[derive(Debug, Default)]
struct Buffer {
    keys: HashMap<u128, KeyEntry>,
    /// The keys being written as runs: still found here until the runs are published.
    flushing: Option<Arc<HashMap<u128, KeyEntry>>>,
    /// The lsn of the oldest WAL record whose keys are here: the WAL keeps it until then.
    first_lsn: Option<u64>,
    min_at_ms: Option<u64>,
}

fn insert_newest(keys: &mut HashMap<u128, KeyEntry>, slot: u128, entry: KeyEntry) {
    let e = keys.entry(slot).or_insert(entry);
    if entry.at_ms >= e.at_ms {
        *e = entry;
    }
}

/// The idempotency records in one agent's consecutive journal entries: one per command
/// (its entries are consecutive and share key and fingerprint).
pub(crate) fn keys_of(agent: &AgentId, events: &[Event], out: &mut Vec<(u128, KeyEntry)>) {
    let mut group: Option<(u128, KeyEntry)> = None;
    for e in events {
        let Some(key) = &e.idempotency_key else {
            out.extend(group.take());
            continue;
        };
        let slot = idem::slot(agent, key);
        if let Some((s, entry)) = &mut group {
            if *s == slot
                && entry.fingerprint == e.fingerprint
                && entry.at_ms == e.at_ms
                && entry.first_seq + u64::from(entry.events) == e.seq
            {
                entry.events += 1;
                continue;
            }
        }
        out.extend(group.take());
        group = Some((
            slot,
            KeyEntry {
                fingerprint: e.fingerprint,
                first_seq: e.seq,
                events: 1,
                at_ms: e.at_ms,
            },
        ));
    }
    out.extend(group);
}

/// The limits of a key index.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KeyIndexLimits {
    pub retention_ms: u64,
    /// Keys on disk, at most; past it the oldest hours go early.
    pub keys_max: u64,
    /// Keys in the buffer before it is written as runs.
    pub buffer_keys_max: usize,
}

#[derive(Debug)]
pub(crate) struct KeyIndex {
    dir: PathBuf,
    limits: KeyIndexLimits,
    filters: Filters,
    /// Sorted by (hour, id).
    runs: RwLock<Vec<Arc<Run>>>,
    buffer: Mutex<Buffer>,
    next_id: AtomicU64,
    newest_at_ms: AtomicU64,
    keys_on_disk: AtomicU64,
    evicted_early: AtomicU64,
    disk_lookups: AtomicU64,
    /// Keys used before this were dropped early by the disk bound (0: none were).
    cut_before_ms: AtomicU64,
    complete: AtomicBool,
}

fn hour_of(at_ms: u64) -> u64 {
    at_ms / HOUR_MS
}

impl KeyIndex {
    /// Opens the index under `data_dir`: deletes unfinished files, loads and checks every
    /// run (filling the filters), and tells whether it is complete.
    pub fn open(data_dir: &Path, limits: KeyIndexLimits) -> Result<Self, StoreError> {
        let dir = data_dir.join(DIR_NAME);
        fs::create_dir_all(&dir).map_err(|e| io_err("creating", &dir, e))?;
        let mut found = Vec::new();
        for entry in fs::read_dir(&dir).map_err(|e| io_err("listing", &dir, e))? {
            let entry = entry.map_err(|e| io_err("listing", &dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(TMP_SUFFIX) {
                fs::remove_file(entry.path()).map_err(|e| io_err("deleting", &entry.path(), e))?;
            } else if let Some(parsed) = parse_run_name(&name) {
                found.push((parsed, entry.path()));
            }
        }
        let index = Self {
            complete: AtomicBool::new(dir.join(COMPLETE_MARKER).exists()),
            dir,
            limits,
            filters: Filters::default(),
            runs: RwLock::new(Vec::new()),
            buffer: Mutex::new(Buffer::default()),
            next_id: AtomicU64::new(1),
            newest_at_ms: AtomicU64::new(0),
            keys_on_disk: AtomicU64::new(0),
            evicted_early: AtomicU64::new(0),
            disk_lookups: AtomicU64::new(0),
            cut_before_ms: AtomicU64::new(0),
        };
        if !index.is_complete() {
            // Rebuilt from the journal by the backfill; what is here may be partial.
            for (_, path) in found {
                fs::remove_file(&path).map_err(|e| io_err("deleting", &path, e))?;
            }
            return Ok(index);
        }
        found.sort_by_key(|((hour, _, id), _)| (*hour, *id));
        let mut runs = Vec::with_capacity(found.len());
        for ((hour, level, id), path) in found {
            runs.push(Arc::new(index.load_run(&path, hour, level, id)?));
        }
        index.next_id.store(
            runs.iter().map(|r| r.id).max().unwrap_or(0) + 1,
            Ordering::Relaxed,
        );
        index
            .keys_on_disk
            .store(runs.iter().map(|r| r.count).sum(), Ordering::Relaxed);
        *index.runs.write() = runs;
        Ok(index)
    }

    /// Reads a whole run once: checks it, builds its fences and adds its keys to the filters.
    fn load_run(&self, path: &Path, hour: u64, level: u32, id: u64) -> Result<Run, StoreError> {
        let mut reader = RunReader::open(path)?;
        if reader.footer.hour != hour {
            return Err(corrupt(path, "holds another hour than its name says"));
        }
        let count = reader.footer.count;
        let mut fences = Vec::with_capacity((count as usize).div_ceil(BLOCK_RECORDS));
        let mut i = 0u64;
        while let Some((slot, entry)) = reader.next()? {
            if i.is_multiple_of(BLOCK_RECORDS as u64) {
                fences.push(slot);
            }
            i += 1;
            self.filters.insert(slot, hour, count);
            self.newest_at_ms.fetch_max(entry.at_ms, Ordering::Relaxed);
        }
        let file = File::open(path).map_err(|e| io_err("opening", path, e))?;
        Ok(Run {
            path: path.to_path_buf(),
            file,
            hour,
            level,
            id,
            count,
            max_at_ms: reader.footer.max_at_ms,
            fences,
        })
    }

    pub fn is_complete(&self) -> bool {
        self.complete.load(Ordering::Acquire)
    }

    /// Records that the index holds every key of the journal (a new store, or after a
    /// backfill), durably.
    pub fn mark_complete(&self) -> Result<(), StoreError> {
        let path = self.dir.join(COMPLETE_MARKER);
        File::create(&path)
            .and_then(|f| f.sync_all())
            .map_err(|e| io_err("writing", &path, e))?;
        sync_dir(&self.dir)?;
        self.complete.store(true, Ordering::Release);
        Ok(())
    }

    /// A key used at `at_ms`: from now on the filters admit it.
    pub fn note(&self, slot: u128, at_ms: TimestampMs) {
        self.filters.insert(slot, hour_of(at_ms), 0);
        self.newest_at_ms.fetch_max(at_ms, Ordering::Relaxed);
    }

    /// The hours that may hold `slot` inside the window ending at `now_ms`, newest first;
    /// empty for most keys never used, which then cost no disk read.
    pub fn candidates(&self, slot: u128, now_ms: TimestampMs) -> Vec<u64> {
        let from_ms = now_ms
            .saturating_sub(self.limits.retention_ms)
            .max(self.cut_before_ms.load(Ordering::Relaxed));
        self.filters.candidates(slot, hour_of(from_ms))
    }

    /// The newest record of `slot` in the buffer or in the runs of `hours`.
    pub fn lookup(&self, slot: u128, hours: &[u64]) -> Result<Option<KeyEntry>, StoreError> {
        self.disk_lookups.fetch_add(1, Ordering::Relaxed);
        {
            let buffer = self.buffer.lock();
            let found = buffer
                .keys
                .get(&slot)
                .copied()
                .into_iter()
                .chain(buffer.flushing.as_ref().and_then(|f| f.get(&slot).copied()));
            if let Some(newest) = found.max_by_key(|e| e.at_ms) {
                return Ok(Some(newest));
            }
        }
        let runs: Vec<Arc<Run>> = {
            let runs = self.runs.read();
            runs.iter()
                .filter(|r| hours.contains(&r.hour))
                .cloned()
                .collect()
        };
        let mut newest: Option<KeyEntry> = None;
        for run in runs.iter().rev() {
            if let Some(e) = run.find(slot)? {
                if newest.is_none_or(|n| e.at_ms > n.at_ms) {
                    newest = Some(e);
                }
            }
        }
        Ok(newest)
    }

    /// Adds the keys of WAL record `lsn` (moved into sled) to the buffer.
    pub fn add_indexed(&self, lsn: u64, keys: &[(u128, KeyEntry)]) {
        if keys.is_empty() {
            return;
        }
        let mut buffer = self.buffer.lock();
        buffer.first_lsn.get_or_insert(lsn);
        for &(slot, entry) in keys {
            insert_newest(&mut buffer.keys, slot, entry);
            buffer.min_at_ms = Some(buffer.min_at_ms.map_or(entry.at_ms, |m| m.min(entry.at_ms)));
            self.newest_at_ms.fetch_max(entry.at_ms, Ordering::Relaxed);
        }
    }

    /// The oldest WAL record whose keys are not yet in a run on disk.
    pub fn buffer_first_lsn(&self) -> Option<u64> {
        self.buffer.lock().first_lsn
    }

    /// True when the buffer should be written as runs now: it is full, or it holds a key
    /// of an hour that is over.
    pub fn should_flush(&self) -> bool {
        let buffer = self.buffer.lock();
        let newest_hour = hour_of(self.newest_at_ms.load(Ordering::Relaxed));
        buffer.keys.len() >= self.limits.buffer_keys_max
            || buffer.min_at_ms.is_some_and(|m| hour_of(m) < newest_hour)
    }

    /// Writes the buffer as runs (one per hour), durably, then empties it.
    pub fn flush(&self) -> Result<(), StoreError> {
        let taken = {
            let mut buffer = self.buffer.lock();
            if buffer.keys.is_empty() {
                return Ok(());
            }
            #[cfg(feature = "sim")]
            crate::sim::before(crate::sim::Op::KeysFlush)?;
            // Sized as the last fill: grown from empty, the buffer spent ~3 % of batched
            // debits' CPU rehashing. Pages not written are not resident.
            let room = buffer.keys.len();
            let taken = Arc::new(std::mem::replace(
                &mut buffer.keys,
                HashMap::with_capacity(room),
            ));
            buffer.flushing = Some(Arc::clone(&taken));
            taken
        };
        let mut records: Vec<(u128, KeyEntry)> = taken.iter().map(|(&s, &e)| (s, e)).collect();
        let written = self.write_runs(&mut records, 0)?;
        self.publish(written, &[]);
        let mut buffer = self.buffer.lock();
        buffer.flushing = None;
        buffer.first_lsn = None;
        buffer.min_at_ms = None;
        drop(buffer);
        #[cfg(feature = "sim")]
        crate::sim::after()?;
        Ok(())
    }

    /// Writes `records` as one run per hour at `level`, durably (files and directory).
    fn write_runs(
        &self,
        records: &mut [(u128, KeyEntry)],
        level: u32,
    ) -> Result<Vec<Arc<Run>>, StoreError> {
        records.sort_unstable_by_key(|(slot, e)| {
            (hour_of(e.at_ms), *slot, std::cmp::Reverse(e.at_ms))
        });
        let mut written = Vec::new();
        for group in records.chunk_by(|a, b| hour_of(a.1.at_ms) == hour_of(b.1.at_ms)) {
            let hour = hour_of(group[0].1.at_ms);
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let mut w = RunWriter::create(&self.dir, hour, level, id)?;
            for (slot, entry) in group {
                w.push(*slot, entry)?;
            }
            written.push(Arc::new(w.finish()?));
        }
        sync_dir(&self.dir)?;
        Ok(written)
    }

    /// Makes `added` visible to lookups and `removed` invisible, in one step.
    fn publish(&self, added: Vec<Arc<Run>>, removed: &[Arc<Run>]) {
        let mut runs = self.runs.write();
        runs.retain(|r| !removed.iter().any(|x| Arc::ptr_eq(r, x)));
        let added_keys: u64 = added.iter().map(|r| r.count).sum();
        let removed_keys: u64 = removed.iter().map(|r| r.count).sum();
        runs.extend(added);
        runs.sort_by_key(|r| (r.hour, r.id));
        self.keys_on_disk.fetch_add(added_keys, Ordering::Relaxed);
        self.keys_on_disk.fetch_sub(removed_keys, Ordering::Relaxed);
    }

    /// Deletes the files of runs no longer published.
    fn delete(&self, removed: &[Arc<Run>]) -> Result<(), StoreError> {
        for run in removed {
            match fs::remove_file(&run.path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("deleting", &run.path, e)),
            }
        }
        sync_dir(&self.dir)
    }

    /// Writes keys found in the journal (a data directory without a complete index) and
    /// marks the index complete.
    pub fn backfill(&self, mut keys: Vec<(u128, KeyEntry)>) -> Result<(), StoreError> {
        for (slot, entry) in &keys {
            self.note(*slot, entry.at_ms);
        }
        let written = self.write_runs(&mut keys, 0)?;
        self.publish(written, &[]);
        self.mark_complete()
    }

    /// One step of upkeep: drop hours past the window, keep to the disk bound, merge runs.
    /// Returns true when there may be more to do at once.
    pub fn maintain(&self) -> Result<bool, StoreError> {
        let newest = self.newest_at_ms.load(Ordering::Relaxed);
        let window_start_ms = newest.saturating_sub(self.limits.retention_ms);
        // Hours whose every key left the window.
        let expired: Vec<Arc<Run>> = self
            .runs
            .read()
            .iter()
            .filter(|r| r.max_at_ms < window_start_ms)
            .cloned()
            .collect();
        if !expired.is_empty() {
            self.publish(Vec::new(), &expired);
            self.delete(&expired)?;
        }
        self.keep_to_disk_bound(window_start_ms)?;
        let from_ms = window_start_ms.max(self.cut_before_ms.load(Ordering::Relaxed));
        self.filters.drop_before(hour_of(from_ms));
        self.merge_step(newest)
    }

    /// Deletes the oldest hours (the oldest runs, when one hour is all there is) while the
    /// disk holds more keys than its bound, and records how far the window was cut.
    fn keep_to_disk_bound(&self, window_start_ms: u64) -> Result<(), StoreError> {
        loop {
            if self.keys_on_disk.load(Ordering::Relaxed) <= self.limits.keys_max {
                return Ok(());
            }
            let victims: Vec<Arc<Run>> = {
                let runs = self.runs.read();
                let Some(oldest) = runs.first() else {
                    return Ok(());
                };
                let hours_differ = runs.last().is_some_and(|r| r.hour != oldest.hour);
                if hours_differ {
                    runs.iter()
                        .filter(|r| r.hour == oldest.hour)
                        .cloned()
                        .collect()
                } else if runs.len() > 1 {
                    vec![Arc::clone(
                        runs.iter().min_by_key(|r| r.id).expect("not empty"),
                    )]
                } else {
                    // One run over the bound on its own: it holds the newest keys there
                    // are; keep it rather than forget everything.
                    return Ok(());
                }
            };
            let early: u64 = victims
                .iter()
                .filter(|r| r.max_at_ms >= window_start_ms)
                .map(|r| r.count)
                .sum();
            let cut = victims.iter().map(|r| r.max_at_ms + 1).max().unwrap_or(0);
            self.publish(Vec::new(), &victims);
            self.delete(&victims)?;
            if early > 0 {
                self.evicted_early.fetch_add(early, Ordering::Relaxed);
                self.cut_before_ms.fetch_max(cut, Ordering::Relaxed);
                tracing::warn!(
                    keys_max = self.limits.keys_max,
                    keys_dropped = early,
                    "idempotency key disk bound reached: the oldest keys inside the retention window were dropped, so the window is shorter than configured"
                );
            }
        }
    }

    /// Merges one group of runs, if any is due: all runs of a finished hour into one, or
    /// `MERGE_FANIN` runs of one level of an hour into one of the next.
    fn merge_step(&self, newest_at_ms: u64) -> Result<bool, StoreError> {
        let group: Option<(Vec<Arc<Run>>, u32)> = {
            let runs = self.runs.read();
            let mut by_hour: BTreeMap<u64, Vec<&Arc<Run>>> = BTreeMap::new();
            for r in runs.iter() {
                by_hour.entry(r.hour).or_default().push(r);
            }
            let mut chosen = None;
            for (hour, hour_runs) in by_hour {
                let finished = (hour + 1) * HOUR_MS + HOUR_CLOSE_GRACE_MS <= newest_at_ms;
                if finished && hour_runs.len() > 1 {
                    chosen = Some((hour_runs.into_iter().cloned().collect(), LEVEL_FINAL));
                    break;
                }
                let mut by_level: BTreeMap<u32, Vec<&Arc<Run>>> = BTreeMap::new();
                for r in hour_runs {
                    by_level.entry(r.level).or_default().push(r);
                }
                if let Some((level, level_runs)) = by_level
                    .into_iter()
                    .find(|(level, r)| *level < LEVEL_FINAL && r.len() >= MERGE_FANIN)
                {
                    let inputs = level_runs.into_iter().take(MERGE_FANIN).cloned().collect();
                    chosen = Some((inputs, level + 1));
                    break;
                }
            }
            chosen
        };
        let Some((inputs, level)) = group else {
            return Ok(false);
        };
        let merged = self.merge(&inputs, level)?;
        self.publish(vec![Arc::new(merged)], &inputs);
        self.delete(&inputs)?;
        Ok(true)
    }

    /// Merges sorted runs of one hour into one, the newest record of each slot kept.
    fn merge(&self, inputs: &[Arc<Run>], level: u32) -> Result<Run, StoreError> {
        let hour = inputs[0].hour;
        let mut readers = inputs
            .iter()
            .map(|r| RunReader::open(&r.path))
            .collect::<Result<Vec<_>, _>>()?;
        // Ordered by slot, then newest first, so the writer keeps the newest of a slot.
        let mut heads = BinaryHeap::new();
        for (i, reader) in readers.iter_mut().enumerate() {
            if let Some((slot, entry)) = reader.next()? {
                heads.push(std::cmp::Reverse((
                    slot,
                    std::cmp::Reverse(entry.at_ms),
                    i,
                    entry_key(&entry),
                )));
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut w = RunWriter::create(&self.dir, hour, level, id)?;
        while let Some(std::cmp::Reverse((slot, _, i, e))) = heads.pop() {
            w.push(slot, &from_entry_key(e))?;
            if let Some((slot, entry)) = readers[i].next()? {
                heads.push(std::cmp::Reverse((
                    slot,
                    std::cmp::Reverse(entry.at_ms),
                    i,
                    entry_key(&entry),
                )));
            }
        }
        let run = w.finish()?;
        sync_dir(&self.dir)?;
        Ok(run)
    }

    /// Writes what the buffer holds (a clean close).
    pub fn close(&self) -> Result<(), StoreError> {
        self.flush()
    }

    pub fn status(&self) -> KeyIndexStatus {
        let newest = self.newest_at_ms.load(Ordering::Relaxed);
        let cut = self.cut_before_ms.load(Ordering::Relaxed);
        let retention_ms = self.limits.retention_ms;
        let window_ms = if cut > newest.saturating_sub(retention_ms) {
            newest.saturating_sub(cut)
        } else {
            retention_ms
        };
        KeyIndexStatus {
            keys_on_disk: self.keys_on_disk.load(Ordering::Relaxed),
            keys_max: self.limits.keys_max,
            retention_ms,
            window_ms,
            evicted_early: self.evicted_early.load(Ordering::Relaxed),
            disk_lookups: self.disk_lookups.load(Ordering::Relaxed),
            filter_bytes: self.filters.bytes(),
        }
    }

    #[cfg(test)]
    fn run_count(&self) -> usize {
        self.runs.read().len()
    }
}

/// Writes `keys` synthetic keys into the key index of a data directory that has no store
/// yet, spread evenly over the `hours` whole hours before `now_ms`, one run per hour (as a
/// finished hour looks after merging). For benchmarks of a large index: the keys point at
/// no journal entry, and no request will ever use them.
#[doc(hidden)]
pub fn preload_for_bench(
    data_dir: &Path,
    keys: u64,
    now_ms: u64,
    hours: u64,
) -> Result<(), StoreError> {
    let limits = KeyIndexLimits {
        retention_ms: 24 * HOUR_MS,
        keys_max: u64::MAX,
        buffer_keys_max: 1,
    };
    let index = KeyIndex::open(data_dir, limits)?;
    let hours = hours.max(1);
    let now_hour = hour_of(now_ms);
    let mut seed = 0x5eed_u64;
    let mut next = || {
        // splitmix64: slots as uniform as SHA-256 output.
        seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    for h in 0..hours {
        let hour = now_hour - hours + h;
        let n = keys / hours + u64::from(h < keys % hours);
        let mut slots: Vec<u128> = (0..n)
            .map(|_| (u128::from(next()) << 64) | u128::from(next()))
            .collect();
        slots.sort_unstable();
        let id = index.next_id.fetch_add(1, Ordering::Relaxed);
        let mut w = RunWriter::create(&index.dir, hour, LEVEL_FINAL, id)?;
        for (i, slot) in slots.into_iter().enumerate() {
            let entry = KeyEntry {
                fingerprint: u128::from(next()),
                first_seq: i as u64 + 1,
                events: 1,
                at_ms: hour * HOUR_MS + (i as u64 * HOUR_MS) / n.max(1),
            };
            w.push(slot, &entry)?;
        }
        w.finish()?;
    }
    sync_dir(&index.dir)?;
    index.mark_complete()
}

/// A key entry as a tuple, so merge heads order without `Ord` on `KeyEntry`.
type EntryKey = (u128, u64, u32, u64);

fn entry_key(e: &KeyEntry) -> EntryKey {
    (e.fingerprint, e.first_seq, e.events, e.at_ms)
}

fn from_entry_key((fingerprint, first_seq, events, at_ms): EntryKey) -> KeyEntry {
    KeyEntry {
        fingerprint,
        first_seq,
        events,
        at_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_790_000_000_000 / HOUR_MS * HOUR_MS;

    fn limits(keys_max: u64, buffer_keys_max: usize) -> KeyIndexLimits {
        KeyIndexLimits {
            retention_ms: 24 * HOUR_MS,
            keys_max,
            buffer_keys_max,
        }
    }

    fn entry(i: u64, at_ms: u64) -> KeyEntry {
        KeyEntry {
            fingerprint: u128::from(i) * 31,
            first_seq: i + 1,
            events: 1,
            at_ms,
        }
    }

    /// A pseudo-random slot, as SHA-256 output would be.
    fn slot(i: u64) -> u128 {
        let mut x = u128::from(i).wrapping_add(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c834);
        x = (x ^ (x >> 67)).wrapping_mul(0x2545_f491_4f6c_dd1d_9e37_79b9_7f4a_7c15);
        x ^ (x >> 61)
    }

    fn open(dir: &Path, l: KeyIndexLimits) -> KeyIndex {
        let index = KeyIndex::open(dir, l).expect("opens");
        if !index.is_complete() {
            index.mark_complete().expect("marks");
        }
        index
    }

    fn add(index: &KeyIndex, from: u64, to: u64, at: impl Fn(u64) -> u64) {
        for i in from..to {
            index.note(slot(i), at(i));
            index.add_indexed(i + 1, &[(slot(i), entry(i, at(i)))]);
            if index.should_flush() {
                index.flush().expect("flushes");
            }
        }
    }

    fn find(index: &KeyIndex, i: u64, now_ms: u64) -> Option<KeyEntry> {
        let hours = index.candidates(slot(i), now_ms);
        if hours.is_empty() {
            return None;
        }
        index.lookup(slot(i), &hours).expect("looks up")
    }

    #[test]
    fn every_key_is_found_in_the_buffer_in_runs_and_after_reopening() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let n = 5_000;
        let at = |i: u64| T0 + i * 1_000;
        {
            let index = open(tmp.path(), limits(1 << 30, 300));
            add(&index, 0, n, at);
            let now = at(n);
            for i in 0..n {
                assert_eq!(find(&index, i, now), Some(entry(i, at(i))), "key {i}");
            }
            while index.maintain().expect("maintains") {}
            assert!(
                index.run_count() < 20,
                "{} runs after merging",
                index.run_count()
            );
            for i in 0..n {
                assert_eq!(
                    find(&index, i, now),
                    Some(entry(i, at(i))),
                    "key {i} after merges"
                );
            }
            index.close().expect("closes");
        }
        let index = open(tmp.path(), limits(1 << 30, 300));
        assert_eq!(index.status().keys_on_disk, n);
        let now = at(n);
        let mut misses_read_disk = 0;
        for i in n..n + 20_000 {
            if !index.candidates(slot(i), now).is_empty() {
                misses_read_disk += 1;
            }
            assert_eq!(find(&index, i, now), None);
        }
        // 16 bits a key: about 0.06 % of absent keys pass one hour's filter.
        assert!(
            misses_read_disk < 100,
            "{misses_read_disk} false positives in 20,000"
        );
        for i in 0..n {
            assert_eq!(
                find(&index, i, now),
                Some(entry(i, at(i))),
                "key {i} after reopening"
            );
        }
    }

    #[test]
    fn hours_leave_the_window_whole() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let index = open(tmp.path(), limits(1 << 30, 10));
        // One key every 30 minutes for 30 hours.
        let at = |i: u64| T0 + i * HOUR_MS / 2;
        add(&index, 0, 60, at);
        index.flush().expect("flushes");
        while index.maintain().expect("maintains") {}
        let now = at(59);
        // Keys of hours that ended before the window began are gone from disk...
        let kept = index.status().keys_on_disk;
        assert!((48..=50).contains(&kept), "{kept} keys kept");
        assert_eq!(index.status().evicted_early, 0);
        assert_eq!(index.status().window_ms, 24 * HOUR_MS);
        // ...every key inside the window is still found, and none of an hour that ended
        // before the window began.
        let window_start_ms = now - 24 * HOUR_MS;
        for i in 0..60 {
            let found = find(&index, i, now);
            if at(i) >= window_start_ms {
                assert_eq!(found, Some(entry(i, at(i))), "key {i}");
            } else if hour_of(at(i)) < hour_of(window_start_ms) {
                assert_eq!(found, None, "key {i}");
            }
        }
    }

    #[test]
    fn the_disk_bound_cuts_the_window_at_its_edge_and_says_so() {
        let tmp = tempfile::tempdir().expect("tempdir");
        // Ten keys in each of three hours, a bound of exactly thirty: nothing is cut.
        let at = |i: u64| T0 + (i / 10) * HOUR_MS + i;
        let index = open(tmp.path(), limits(30, 10));
        add(&index, 0, 30, at);
        index.flush().expect("flushes");
        while index.maintain().expect("maintains") {}
        assert_eq!(index.status().keys_on_disk, 30);
        assert_eq!(index.status().evicted_early, 0);
        assert_eq!(index.status().window_ms, 24 * HOUR_MS);
        // One more key: the oldest hour goes, early, and the window says so.
        add(&index, 30, 31, at);
        index.flush().expect("flushes");
        while index.maintain().expect("maintains") {}
        let status = index.status();
        assert_eq!(status.keys_on_disk, 21);
        assert_eq!(status.evicted_early, 10);
        assert!(status.window_ms < 24 * HOUR_MS, "{status:?}");
        assert_eq!(find(&index, 0, at(30)), None);
        assert_eq!(find(&index, 10, at(30)), Some(entry(10, at(10))));
    }

    #[test]
    fn a_damaged_run_is_a_clear_error_naming_the_way_out() {
        let tmp = tempfile::tempdir().expect("tempdir");
        {
            let index = open(tmp.path(), limits(1 << 30, 100));
            add(&index, 0, 50, |i| T0 + i);
            index.close().expect("closes");
        }
        let dir = tmp.path().join(DIR_NAME);
        let run = fs::read_dir(&dir)
            .expect("lists")
            .map(|e| e.expect("entry").path())
            .find(|p| p.extension().is_some_and(|x| x == "run"))
            .expect("a run");
        let mut bytes = fs::read(&run).expect("reads");
        bytes[100] ^= 1;
        fs::write(&run, bytes).expect("writes");
        let err = KeyIndex::open(tmp.path(), limits(1 << 30, 100)).expect_err("damaged");
        assert!(err.to_string().contains("delete"), "{err}");
    }

    #[test]
    fn an_incomplete_index_starts_empty_and_unfinished_files_are_removed() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join(DIR_NAME);
        fs::create_dir_all(&dir).expect("mkdir");
        fs::write(dir.join("x.run.tmp"), b"half").expect("writes");
        let index = KeyIndex::open(tmp.path(), limits(10, 10)).expect("opens");
        assert!(!index.is_complete());
        assert!(!dir.join("x.run.tmp").exists());
        index
            .backfill(vec![(slot(1), entry(1, T0))])
            .expect("backfills");
        assert!(index.is_complete());
        assert_eq!(find(&index, 1, T0), Some(entry(1, T0)));
    }

    #[test]
    fn keys_of_groups_one_command_s_entries() {
        let (state, events) = crate::testing::decided((0..5).map(|i| match i {
            0 => tally_core::CommandKind::CreateAgent {
                plan: crate::testing::default_plan(),
                status: tally_core::Status::Active,
            },
            1 => tally_core::CommandKind::Credit { amount_micros: 100 },
            _ => tally_core::CommandKind::Debit { amount_micros: 1 },
        }));
        let mut out = Vec::new();
        keys_of(&state.id, &events, &mut out);
        let keyed = events
            .iter()
            .filter(|e| e.idempotency_key.is_some())
            .count();
        assert_eq!(out.len(), keyed);
        for (slot, entry) in &out {
            let e = &events[entry.first_seq as usize - 1];
            assert_eq!(
                *slot,
                idem::slot(&state.id, e.idempotency_key.as_ref().expect("keyed"))
            );
            assert_eq!(entry.events, 1);
        }
    }
}
