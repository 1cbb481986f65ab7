//! The write-ahead log: append-only segment files that make a group commit durable with
//! one `write` and one `fdatasync`. sled receives the same writes later, in larger batches
//! (see `sled_store.rs`); a segment is deleted once sled has made all of it durable.
//!
//! A record is `[payload len u32 LE][crc32 u32 LE][lsn u64 LE][payload]`; the CRC covers the
//! lsn and the payload. A segment is zero-filled ahead of its records (a zero header ends its
//! data): an `fdatasync` of a write inside the file's allocated size need not commit the
//! file system's journal, which measured 0.35 ms → 0.23 ms per group commit here. Log sequence numbers are dense from 1 across segments, and a segment
//! is named by the first lsn it may hold (`wal/<lsn, 20 digits>.log`). Only the tail of the
//! newest segment can be torn by a crash (it was never acknowledged); a bad record anywhere
//! else is corruption and stops recovery with the file and offset named.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::codec::RECORD_BYTES_MAX;
use crate::error::StoreError;

/// A segment is closed and a new one begun once it holds this many bytes.
pub const SEGMENT_BYTES_MAX: u64 = 64 << 20;
/// Zero-filling grows a segment by its current size (so that small logs stay small), by
/// at least the first and at most the second of these.
const PREALLOC_BYTES_MIN: u64 = 64 << 10;
const PREALLOC_BYTES_MAX: u64 = 256 << 10;
const HEADER_LEN: usize = 16;
const DIR_NAME: &str = "wal";
const SUFFIX: &str = ".log";

fn io_err(what: &str, path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Io(format!("{what} {}: {e}", path.display()))
}

fn segment_path(dir: &Path, first_lsn: u64) -> PathBuf {
    dir.join(format!("{first_lsn:020}{SUFFIX}"))
}

/// Makes a created or deleted directory entry durable.
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err("syncing directory", dir, e))
}

/// The CRC a record carries: over its lsn and its payload.
fn checksum(lsn: u64, payload: &[u8]) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&lsn.to_le_bytes());
    crc.update(payload);
    crc.finalize()
}

/// Appends one framed record to `buf`.
pub fn frame(buf: &mut Vec<u8>, lsn: u64, payload: &[u8]) {
    let len = u32::try_from(payload.len()).expect("payloads are bounded by RECORD_BYTES_MAX");
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&checksum(lsn, payload).to_le_bytes());
    buf.extend_from_slice(&lsn.to_le_bytes());
    buf.extend_from_slice(payload);
}

/// The segments in `dir`, oldest first, by the first lsn in their names.
fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, StoreError> {
    let mut out = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io_err("listing", dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| io_err("listing", dir, e))?;
        let name = entry.file_name();
        let Some(lsn) = name
            .to_str()
            .and_then(|n| n.strip_suffix(SUFFIX))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        out.push((lsn, entry.path()));
    }
    out.sort();
    Ok(out)
}

/// What a replay found.
#[derive(Debug)]
pub struct Replayed {
    /// The newest lsn in the log (0 when it is empty).
    pub last_lsn: u64,
    /// Records dropped from the newest segment's torn tail (never acknowledged).
    pub torn_tail: bool,
    /// Every segment read; all of them are obsolete once their records are in sled.
    pub segments: Vec<PathBuf>,
}

/// Reads every record of the log under `data_dir` in lsn order and hands each payload to
/// `apply`. Records after `applied_lsn` (the newest one the caller already holds
/// elsewhere) must follow it without a gap; a gap below it is only a segment whose
/// deletion failed or was interrupted, and is harmless.
pub fn replay(
    data_dir: &Path,
    applied_lsn: u64,
    mut apply: impl FnMut(u64, &[u8]) -> Result<(), StoreError>,
) -> Result<Replayed, StoreError> {
    let dir = data_dir.join(DIR_NAME);
    let segments = list_segments(&dir)?;
    let mut last_lsn = 0;
    let mut torn_tail = false;
    for (i, (first_lsn, path)) in segments.iter().enumerate() {
        let bytes = fs::read(path).map_err(|e| io_err("reading", path, e))?;
        let follows = last_lsn.max(applied_lsn) + 1;
        if *first_lsn > follows {
            return Err(StoreError::Io(format!(
                "write-ahead log {} starts at lsn {first_lsn}, but records from lsn {follows} on are missing",
                path.display()
            )));
        }
        let mut expected = *first_lsn;
        let mut pos = 0;
        while pos < bytes.len() {
            if bytes[pos..].iter().take(HEADER_LEN).all(|&b| b == 0) {
                break;
            }
            match read_record(&bytes[pos..]) {
                Some((lsn, payload)) => {
                    if lsn != expected {
                        return Err(StoreError::Io(format!(
                            "write-ahead log {} has lsn {lsn} at offset {pos}, expected {expected}",
                            path.display()
                        )));
                    }
                    apply(lsn, payload)?;
                    last_lsn = lsn;
                    expected += 1;
                    pos += HEADER_LEN + payload.len();
                }
                None if i + 1 == segments.len() => {
                    torn_tail = true;
                    #[cfg(feature = "sim")]
                    crate::sim::saw_torn_tail();
                    break;
                }
                None => {
                    return Err(StoreError::Io(format!(
                        "write-ahead log {} is corrupt at offset {pos} (not its newest segment, so \
                         this is not a torn write); restore the data directory from a backup",
                        path.display()
                    )))
                }
            }
        }
        if last_lsn == 0 {
            // An empty log resumes numbering where its newest segment says it begins.
            last_lsn = first_lsn.saturating_sub(1);
        }
    }
    Ok(Replayed {
        last_lsn,
        torn_tail,
        segments: segments.into_iter().map(|(_, p)| p).collect(),
    })
}

/// One whole, intact record at the start of `bytes`, or `None` for a torn tail.
fn read_record(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let header = bytes.get(..HEADER_LEN)?;
    let len = u32::from_le_bytes(header[0..4].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(header[4..8].try_into().ok()?);
    let lsn = u64::from_le_bytes(header[8..16].try_into().ok()?);
    if len == 0 || len > RECORD_BYTES_MAX {
        return None;
    }
    let payload = bytes.get(HEADER_LEN..HEADER_LEN + len)?;
    (checksum(lsn, payload) == crc).then_some((lsn, payload))
}

/// Deletes segment files (after their records are durable elsewhere).
pub fn remove(paths: &[PathBuf]) -> Result<(), StoreError> {
    let Some(dir) = paths.first().and_then(|p| p.parent()) else {
        return Ok(());
    };
    #[cfg(feature = "sim")]
    crate::sim::before(crate::sim::Op::Remove)?;
    for path in paths {
        match fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("deleting", path, e)),
        }
    }
    sync_dir(dir)?;
    #[cfg(feature = "sim")]
    {
        crate::sim::removed(paths);
        crate::sim::after()?;
    }
    Ok(())
}

/// The open end of the log.
#[derive(Debug)]
pub struct WalWriter {
    dir: PathBuf,
    file: File,
    /// Bytes of records in the current segment.
    len: u64,
    /// Bytes of the current segment written so far, records and zeros.
    allocated: u64,
    /// Every live segment, oldest first, by first lsn; the last one is `file`.
    segments: Vec<(u64, PathBuf)>,
    /// `SEGMENT_BYTES_MAX`, smaller in tests that need many segments.
    segment_bytes_max: u64,
}

impl WalWriter {
    /// Starts a new segment whose first record will be `first_lsn`.
    pub fn create(data_dir: &Path, first_lsn: u64) -> Result<Self, StoreError> {
        let dir = data_dir.join(DIR_NAME);
        fs::create_dir_all(&dir).map_err(|e| io_err("creating", &dir, e))?;
        let path = segment_path(&dir, first_lsn);
        let file = open_segment(&path)?;
        sync_dir(&dir)?;
        #[cfg(feature = "sim")]
        crate::sim::after()?;
        Ok(Self {
            dir,
            file,
            len: 0,
            allocated: 0,
            segments: vec![(first_lsn, path)],
            #[cfg(not(feature = "sim"))]
            segment_bytes_max: SEGMENT_BYTES_MAX,
            #[cfg(feature = "sim")]
            segment_bytes_max: crate::sim::segment_bytes_max().unwrap_or(SEGMENT_BYTES_MAX),
        })
    }

    /// Appends framed records and makes them durable.
    pub fn append(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        let path = &self.segments.last().expect("a current segment").1;
        let end = self.len + bytes.len() as u64;
        #[cfg(feature = "sim")]
        crate::sim::before(crate::sim::Op::Write)?;
        self.file
            .write_all_at(bytes, self.len)
            .map_err(|e| io_err("writing", path, e))?;
        #[cfg(feature = "sim")]
        crate::sim::wrote(path, self.len, bytes);
        if end > self.allocated {
            // Zeros after the records, made durable by the same sync as the records.
            let grow = self.allocated.clamp(PREALLOC_BYTES_MIN, PREALLOC_BYTES_MAX);
            let zeros = vec![0u8; grow as usize];
            self.file
                .write_all_at(&zeros, end)
                .map_err(|e| io_err("zero-filling", path, e))?;
            #[cfg(feature = "sim")]
            crate::sim::wrote(path, end, &zeros);
            self.allocated = end + grow;
        }
        #[cfg(feature = "sim")]
        crate::sim::after()?;
        #[cfg(feature = "sim")]
        if crate::sim::planted(crate::sim::Bug::SyncSkipped) {
            // The planted bug: answered as durable without the fdatasync.
            self.len = end;
            return Ok(());
        }
        #[cfg(feature = "sim")]
        crate::sim::before(crate::sim::Op::Sync)?;
        self.file
            .sync_data()
            .map_err(|e| io_err("syncing", path, e))?;
        #[cfg(feature = "sim")]
        {
            crate::sim::synced(path, self.allocated);
            crate::sim::after()?;
        }
        self.len = end;
        Ok(())
    }

    /// Begins a new segment at `next_lsn` if the current one is full.
    pub fn rotate_if_full(&mut self, next_lsn: u64) -> Result<(), StoreError> {
        if self.len < self.segment_bytes_max {
            return Ok(());
        }
        let path = segment_path(&self.dir, next_lsn);
        self.file = open_segment(&path)?;
        sync_dir(&self.dir)?;
        self.segments.push((next_lsn, path));
        self.len = 0;
        self.allocated = 0;
        #[cfg(feature = "sim")]
        crate::sim::after()?;
        Ok(())
    }

    /// How many closed segments hold only records with an lsn at most `durable_lsn`.
    pub fn obsolete_count(&self, durable_lsn: u64) -> usize {
        self.segments
            .windows(2)
            .take_while(|w| w[1].0 <= durable_lsn.saturating_add(1))
            .count()
    }

    /// Removes from the live list, and returns, the closed segments whose every record has
    /// an lsn at most `durable_lsn`.
    pub fn take_obsolete(&mut self, durable_lsn: u64) -> Vec<PathBuf> {
        let mut obsolete = Vec::new();
        while self.segments.len() > 1 && self.segments[1].0 <= durable_lsn.saturating_add(1) {
            obsolete.push(self.segments.remove(0).1);
        }
        obsolete
    }

    /// Puts back segments `take_obsolete` returned whose deletion failed, to be tried again.
    pub fn restore_obsolete(&mut self, paths: Vec<PathBuf>) {
        let mut restored: Vec<(u64, PathBuf)> = paths
            .into_iter()
            .filter(|p| p.exists())
            .filter_map(|p| {
                let lsn = p
                    .file_name()?
                    .to_str()?
                    .strip_suffix(SUFFIX)?
                    .parse::<u64>()
                    .ok()?;
                Some((lsn, p))
            })
            .collect();
        restored.append(&mut self.segments);
        self.segments = restored;
    }

    #[cfg(test)]
    pub fn set_segment_bytes_max(&mut self, bytes: u64) {
        self.segment_bytes_max = bytes;
    }

    /// Removes from the live list, and returns, every segment including the current one;
    /// for a clean close after everything is durable elsewhere.
    pub fn take_all(&mut self) -> Vec<PathBuf> {
        self.segments.drain(..).map(|(_, p)| p).collect()
    }
}

/// Bytes in the log's segments.
pub fn size_on_disk(data_dir: &Path) -> Result<u64, StoreError> {
    let dir = data_dir.join(DIR_NAME);
    let mut total = 0;
    for (_, path) in list_segments(&dir)? {
        total += fs::metadata(&path)
            .map_err(|e| io_err("reading metadata of", &path, e))?
            .len();
    }
    Ok(total)
}

fn open_segment(path: &Path) -> Result<File, StoreError> {
    #[cfg(feature = "sim")]
    crate::sim::before(crate::sim::Op::Create)?;
    // A new segment never reuses a name: appending after an old torn tail would hide
    // everything written after it.
    let file = OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(path)
        .map_err(|e| io_err("opening", path, e))?;
    #[cfg(feature = "sim")]
    crate::sim::created(path);
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every record, as if everything before the oldest segment were applied elsewhere.
    fn records_of(dir: &Path) -> (Vec<(u64, Vec<u8>)>, Replayed) {
        let applied = list_segments(&dir.join(DIR_NAME))
            .expect("lists")
            .first()
            .map_or(0, |(lsn, _)| lsn - 1);
        let mut out = Vec::new();
        let r = replay(dir, applied, |lsn, p| {
            out.push((lsn, p.to_vec()));
            Ok(())
        })
        .expect("replays");
        (out, r)
    }

    /// Frames and appends `records` in one write.
    fn append(w: &mut WalWriter, records: &[(u64, &[u8])]) {
        let mut buf = Vec::new();
        for (lsn, payload) in records {
            frame(&mut buf, *lsn, payload);
        }
        w.append(&buf).expect("appends");
    }

    /// Closes the current segment as if it were full; the next begins at `next_lsn`.
    fn rotate(w: &mut WalWriter, next_lsn: u64) {
        w.len = SEGMENT_BYTES_MAX;
        w.rotate_if_full(next_lsn).expect("rotates");
    }

    #[test]
    fn appends_replay_in_order_across_segments() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut w = WalWriter::create(tmp.path(), 1).expect("creates");
        append(&mut w, &[(1, b"one"), (2, b"two")]);
        rotate(&mut w, 3);
        append(&mut w, &[(3, b"three")]);
        let (got, r) = records_of(tmp.path());
        assert_eq!(
            got,
            vec![
                (1, b"one".to_vec()),
                (2, b"two".to_vec()),
                (3, b"three".to_vec())
            ]
        );
        assert_eq!(r.last_lsn, 3);
        assert!(!r.torn_tail);
        assert_eq!(r.segments.len(), 2);
        assert_eq!(w.take_obsolete(1), Vec::<PathBuf>::new());
        assert_eq!(w.take_obsolete(2).len(), 1);
    }

    #[test]
    fn a_torn_tail_of_the_newest_segment_is_dropped() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut w = WalWriter::create(tmp.path(), 5).expect("creates");
        let mut buf = Vec::new();
        frame(&mut buf, 5, b"kept");
        frame(&mut buf, 6, b"torn record");
        buf.truncate(buf.len() - 3);
        w.append(&buf).expect("appends");
        let (got, r) = records_of(tmp.path());
        assert_eq!(got, vec![(5, b"kept".to_vec())]);
        assert!(r.torn_tail);
        assert_eq!(r.last_lsn, 5);
    }

    #[test]
    fn zeros_after_the_records_end_a_segment_in_any_position() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut w = WalWriter::create(tmp.path(), 1).expect("creates");
        append(&mut w, &[(1, b"one")]);
        assert!(w.allocated >= PREALLOC_BYTES_MIN, "zero-filled ahead");
        append(&mut w, &[(2, b"two")]);
        rotate(&mut w, 3);
        append(&mut w, &[(3, b"three")]);
        let first = fs::metadata(&w.segments[0].1).expect("exists").len();
        assert!(first > 64, "the older segment has a zero tail: {first}");
        let (got, r) = records_of(tmp.path());
        assert_eq!(got.len(), 3);
        assert_eq!(r.last_lsn, 3);
        assert!(!r.torn_tail);
    }

    #[test]
    fn a_flipped_bit_is_caught_by_the_crc() {
        let mut buf = Vec::new();
        frame(&mut buf, 9, b"payload");
        assert!(read_record(&buf).is_some());
        for i in 0..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 0x10;
            assert!(read_record(&bad).is_none_or(|(lsn, p)| lsn == 9 && p == b"payload"));
        }
        assert!(read_record(&[0; 32]).is_none());
    }

    #[test]
    fn corruption_in_an_older_segment_is_an_error() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut w = WalWriter::create(tmp.path(), 1).expect("creates");
        append(&mut w, &[(1, b"one")]);
        rotate(&mut w, 2);
        let first = w.segments[0].1.clone();
        let mut bytes = fs::read(&first).expect("reads");
        bytes[HEADER_LEN] ^= 1;
        fs::write(&first, bytes).expect("writes");
        let err = replay(tmp.path(), 0, |_, _| Ok(())).expect_err("corrupt");
        assert!(err.to_string().contains("corrupt"), "{err}");
    }

    proptest::proptest! {
        /// Whatever a crash or a bad disk does to the newest segment (cut it anywhere, flip
        /// any bit), replay neither panics nor fails, and gives back a prefix of what was
        /// written.
        #[test]
        fn a_damaged_newest_segment_replays_a_prefix(
            payloads in proptest::collection::vec(
                proptest::collection::vec(proptest::num::u8::ANY, 1..64), 1..12),
            cut in proptest::option::of(0usize..2_000),
            flip in proptest::option::of((0usize..2_000, 0u8..8)),
        ) {
            let tmp = tempfile::tempdir().expect("tempdir");
            let mut w = WalWriter::create(tmp.path(), 1).expect("creates");
            let records: Vec<(u64, &[u8])> = payloads
                .iter()
                .enumerate()
                .map(|(i, p)| (i as u64 + 1, p.as_slice()))
                .collect();
            append(&mut w, &records);
            let path = w.segments[0].1.clone();
            let mut bytes = fs::read(&path).expect("reads");
            if let Some((at, bit)) = flip {
                let at = at % bytes.len();
                bytes[at] ^= 1 << bit;
            }
            if let Some(cut) = cut {
                bytes.truncate(cut.min(bytes.len()));
            }
            fs::write(&path, &bytes).expect("writes");
            let (got, _) = records_of(tmp.path());
            proptest::prop_assert!(got.len() <= records.len());
            for (g, (lsn, p)) in got.iter().zip(&records) {
                proptest::prop_assert_eq!(g.0, *lsn);
                proptest::prop_assert_eq!(g.1.as_slice(), *p);
            }
        }
    }

    #[test]
    fn a_gap_below_the_applied_lsn_is_harmless_and_an_error_above_it() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut w = WalWriter::create(tmp.path(), 1).expect("creates");
        append(&mut w, &[(1, b"one"), (2, b"two")]);
        rotate(&mut w, 3);
        append(&mut w, &[(3, b"three")]);
        rotate(&mut w, 4);
        append(&mut w, &[(4, b"four")]);
        // The middle segment was deleted, the oldest not (its deletion failed).
        fs::remove_file(&w.segments[1].1).expect("deletes");
        let mut got = Vec::new();
        let r = replay(tmp.path(), 3, |lsn, _| {
            got.push(lsn);
            Ok(())
        })
        .expect("a gap below what is applied elsewhere is harmless");
        assert_eq!(got, vec![1, 2, 4]);
        assert_eq!(r.last_lsn, 4);
        let err = replay(tmp.path(), 2, |_, _| Ok(())).expect_err("lsn 3 is needed and missing");
        assert!(err.to_string().contains("missing"), "{err}");
        // The oldest segment gone too: the log must still begin right after what is applied.
        fs::remove_file(&w.segments[0].1).expect("deletes");
        assert!(replay(tmp.path(), 3, |_, _| Ok(())).is_ok());
        assert!(replay(tmp.path(), 1, |_, _| Ok(())).is_err());
    }

    #[test]
    fn segments_whose_deletion_failed_are_kept_for_the_next_try() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut w = WalWriter::create(tmp.path(), 1).expect("creates");
        append(&mut w, &[(1, b"one")]);
        rotate(&mut w, 2);
        append(&mut w, &[(2, b"two")]);
        rotate(&mut w, 3);
        let obsolete = w.take_obsolete(2);
        assert_eq!(obsolete.len(), 2);
        w.restore_obsolete(obsolete.clone());
        assert_eq!(w.take_obsolete(2), obsolete, "offered again, oldest first");
        remove(&obsolete).expect("removes");
        w.restore_obsolete(obsolete);
        assert!(
            w.take_obsolete(2).is_empty(),
            "deleted ones are not offered again"
        );
    }

    #[test]
    fn an_empty_log_resumes_numbering() {
        let tmp = tempfile::tempdir().expect("tempdir");
        assert_eq!(records_of(tmp.path()).1.last_lsn, 0);
        WalWriter::create(tmp.path(), 42).expect("creates");
        assert_eq!(records_of(tmp.path()).1.last_lsn, 41);
    }
}
