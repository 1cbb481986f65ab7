//! Hooks for the seeded storage-fault simulation (`tests/sim.rs`), compiled only with the
//! `sim` feature, which only the tests enable: a model of the write-ahead log's file layer
//! (what was written, what was synced), faults keyed on the number of the file operation
//! (fail it, crash before it, crash after it), the image a power loss leaves, the indexer
//! run by hand so that one seed gives one history, and the two bugs the simulation must find.
//! sled's and the key index's writes are operations too (a fault can fail them or crash
//! around them), but their files are copied as they are: a process crash, not a power loss.
//!
//! One process-wide state: the simulation runs one store at a time. Disarmed (the default,
//! and in every other test), each hook is one atomic load.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};

use parking_lot::Mutex;

use crate::error::StoreError;

/// A file operation of the store, counted from 0 after each [`arm`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `Storage::apply` (through the simulation's storage wrapper).
    Apply,
    /// A WAL segment created (and its directory synced).
    Create,
    /// Records (and the zeros after them) written into the newest segment.
    Write,
    /// The `fdatasync` of the newest segment.
    Sync,
    /// WAL segments deleted (and their directory synced).
    Remove,
    /// A batch moved into sled (`apply_batch` and `flush`).
    SledWrite,
    /// sled's files and directories fsynced.
    SledSync,
    /// The key index's buffer written as runs.
    KeysFlush,
}

/// What happens at one operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The operation fails (a failed write or fsync); nothing crashes.
    Fail,
    /// Power is lost just before the operation.
    CrashBefore,
    /// Power is lost just after the operation (it reached the disk as the model says).
    CrashAfter,
}

/// A bug planted on purpose, to show the simulation finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bug {
    None = 0,
    /// The WAL append answers without its `fdatasync`.
    SyncSkipped = 1,
    /// The indexer deletes WAL segments before sled holds their records (one step early).
    SegmentDeletedEarly = 2,
}

/// One run's faults.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// Faults by operation number.
    pub faults: BTreeMap<u64, Fault>,
    /// At a crash, this many bytes of the writes not yet synced reach the disk anyway (in
    /// the order written): a torn record when it ends inside one.
    pub torn_bytes: usize,
    /// The store's directory, and where a crash leaves its image.
    pub data_dir: PathBuf,
    pub image_dir: PathBuf,
}

/// What a run of the store saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Operations counted.
    pub ops: u64,
    /// The operation at (before or after) which power was lost, or the number of
    /// operations before a loss between them (the image is in `Plan::image_dir`).
    pub crashed_at: Option<(u64, Option<Op>)>,
    /// Operations failed on purpose.
    pub failed: Vec<(u64, Op)>,
    /// A crash image could not be made (a failure of the test, not of the store).
    pub image_error: Option<String>,
    /// Replays that found a torn record at the end of the log (and dropped it).
    pub torn_tails: u64,
}

/// A WAL segment as the disk holds it: its length at the last sync, and the writes since.
#[derive(Debug, Default)]
struct FileModel {
    synced_len: u64,
    unsynced: Vec<(u64, Vec<u8>)>,
}

#[derive(Debug, Default)]
struct State {
    plan: Plan,
    report: Report,
    dead: bool,
    crash_after: Option<(u64, Op)>,
    files: BTreeMap<PathBuf, FileModel>,
}

static ARMED: AtomicBool = AtomicBool::new(false);
static STATE: Mutex<Option<State>> = Mutex::new(None);
static BUG: AtomicU8 = AtomicU8::new(0);
static MANUAL_INDEX: AtomicBool = AtomicBool::new(false);
static INDEX_REQUESTED: AtomicU64 = AtomicU64::new(0);
static INDEX_SERVED: AtomicU64 = AtomicU64::new(0);
static SEGMENT_BYTES_MAX: AtomicU64 = AtomicU64::new(0);

/// Starts counting operations for a store at `plan.data_dir`, with `plan`'s faults.
pub fn arm(plan: Plan) {
    *STATE.lock() = Some(State {
        plan,
        ..State::default()
    });
    INDEX_REQUESTED.store(0, Ordering::SeqCst);
    INDEX_SERVED.store(0, Ordering::SeqCst);
    ARMED.store(true, Ordering::SeqCst);
}

/// Stops the hooks and returns what the run saw.
pub fn disarm() -> Report {
    ARMED.store(false, Ordering::SeqCst);
    STATE.lock().take().map(|s| s.report).unwrap_or_default()
}

/// What the run saw so far.
pub fn report() -> Report {
    STATE
        .lock()
        .as_ref()
        .map(|s| s.report.clone())
        .unwrap_or_default()
}

/// Loses power now, between operations: the image of the disk goes to `plan.image_dir`.
pub fn crash_now() -> Report {
    let mut guard = STATE.lock();
    if let Some(state) = guard.as_mut() {
        if !state.dead {
            let n = state.report.ops;
            crash(state, n, None);
        }
        return state.report.clone();
    }
    Report::default()
}

/// Plants `bug` (or none).
pub fn plant(bug: Bug) {
    BUG.store(bug as u8, Ordering::SeqCst);
}

pub(crate) fn planted(bug: Bug) -> bool {
    BUG.load(Ordering::Relaxed) == bug as u8
}

/// While set, the indexer moves the WAL into sled only when [`index_now`] asks.
pub fn set_manual_index(on: bool) {
    MANUAL_INDEX.store(on, Ordering::SeqCst);
}

pub(crate) fn manual_index() -> bool {
    MANUAL_INDEX.load(Ordering::Relaxed)
}

/// Asks the indexer for one step; returns the ticket [`index_served`] reaches after it.
pub fn index_now() -> u64 {
    INDEX_REQUESTED.fetch_add(1, Ordering::SeqCst) + 1
}

pub(crate) fn index_requested() -> u64 {
    INDEX_REQUESTED.load(Ordering::SeqCst)
}

/// The newest ticket the indexer served.
pub fn index_served() -> u64 {
    INDEX_SERVED.load(Ordering::SeqCst)
}

pub(crate) fn serve_index(ticket: u64) {
    INDEX_SERVED.fetch_max(ticket, Ordering::SeqCst);
}

/// New WAL segments close at this many bytes instead of `SEGMENT_BYTES_MAX` (0: default).
pub fn set_segment_bytes_max(bytes: u64) {
    SEGMENT_BYTES_MAX.store(bytes, Ordering::SeqCst);
}

pub(crate) fn segment_bytes_max() -> Option<u64> {
    match SEGMENT_BYTES_MAX.load(Ordering::Relaxed) {
        0 => None,
        n => Some(n),
    }
}

fn gone(n: u64) -> StoreError {
    StoreError::Io(format!("simulated power loss at operation {n}"))
}

/// Called before an operation: counts it and applies its fault.
pub fn before(op: Op) -> Result<(), StoreError> {
    if !ARMED.load(Ordering::Relaxed) {
        return Ok(());
    }
    let mut guard = STATE.lock();
    let Some(state) = guard.as_mut() else {
        return Ok(());
    };
    let n = state.report.ops;
    if state.dead {
        return Err(gone(n));
    }
    state.report.ops += 1;
    match state.plan.faults.get(&n) {
        None => Ok(()),
        Some(Fault::Fail) => {
            state.report.failed.push((n, op));
            Err(StoreError::Io(format!(
                "simulated failure of operation {n} ({op:?})"
            )))
        }
        Some(Fault::CrashBefore) => {
            crash(state, n, Some(op));
            Err(gone(n))
        }
        Some(Fault::CrashAfter) => {
            state.crash_after = Some((n, op));
            Ok(())
        }
    }
}

/// Called after an operation that `before` let through: a crash planned right after it.
pub fn after() -> Result<(), StoreError> {
    if !ARMED.load(Ordering::Relaxed) {
        return Ok(());
    }
    let mut guard = STATE.lock();
    let Some(state) = guard.as_mut() else {
        return Ok(());
    };
    match state.crash_after.take() {
        Some((n, op)) => {
            crash(state, n, Some(op));
            Err(gone(n))
        }
        None => Ok(()),
    }
}

/// A segment was created (empty, its directory entry durable).
pub(crate) fn created(path: &Path) {
    with_state(|s| {
        s.files.insert(path.to_path_buf(), FileModel::default());
    });
}

/// `bytes` were written at `offset` of the segment, not yet synced.
pub(crate) fn wrote(path: &Path, offset: u64, bytes: &[u8]) {
    with_state(|s| {
        s.files
            .entry(path.to_path_buf())
            .or_default()
            .unsynced
            .push((offset, bytes.to_vec()));
    });
}

/// The segment was synced at length `len`.
pub(crate) fn synced(path: &Path, len: u64) {
    with_state(|s| {
        let f = s.files.entry(path.to_path_buf()).or_default();
        f.synced_len = len;
        f.unsynced.clear();
    });
}

/// A replay dropped a torn record at the end of the log.
pub(crate) fn saw_torn_tail() {
    with_state(|s| s.report.torn_tails += 1);
}

/// Segments were deleted (their directory synced).
pub(crate) fn removed(paths: &[PathBuf]) {
    with_state(|s| {
        for p in paths {
            s.files.remove(p);
        }
    });
}

fn with_state(f: impl FnOnce(&mut State)) {
    if !ARMED.load(Ordering::Relaxed) {
        return;
    }
    if let Some(state) = STATE.lock().as_mut() {
        f(state);
    }
}

/// Power is lost: copies the data directory as the disk would hold it to the image
/// directory, and from now on every operation fails (the process is gone).
fn crash(state: &mut State, n: u64, op: Option<Op>) {
    state.dead = true;
    state.report.crashed_at = Some((n, op));
    if let Err(e) = make_image(state) {
        state.report.image_error = Some(e.to_string());
    }
}

fn make_image(state: &State) -> std::io::Result<()> {
    let from = &state.plan.data_dir;
    let to = &state.plan.image_dir;
    copy_dir(from, to)?;
    // WAL segments: what was synced, then a prefix of the unsynced writes (the torn tail).
    let mut torn_left = state.plan.torn_bytes;
    for (path, model) in &state.files {
        let Ok(rel) = path.strip_prefix(from) else {
            continue;
        };
        let target = to.join(rel);
        if !target.exists() {
            continue;
        }
        let mut bytes = std::fs::read(&target)?;
        let synced_len = usize::try_from(model.synced_len).unwrap_or(usize::MAX);
        bytes.truncate(synced_len);
        // Unsynced writes inside the synced length landed on zeros (the WAL only writes
        // into its zero-filled tail or past the end); the disk may not hold them.
        for (offset, w) in &model.unsynced {
            let start = usize::try_from(*offset).unwrap_or(usize::MAX);
            let end = start.saturating_add(w.len()).min(bytes.len());
            if start < end {
                bytes[start..end].fill(0);
            }
        }
        for (offset, w) in &model.unsynced {
            let keep = w.len().min(torn_left);
            torn_left -= keep;
            let start = usize::try_from(*offset).unwrap_or(usize::MAX);
            if keep == 0 {
                break;
            }
            if bytes.len() < start + keep {
                bytes.resize(start + keep, 0);
            }
            bytes[start..start + keep].copy_from_slice(&w[..keep]);
        }
        std::fs::write(&target, bytes)?;
    }
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        let kind = entry.file_type()?;
        if kind.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else if kind.is_file() {
            match std::fs::copy(entry.path(), &target) {
                Ok(_) => {}
                // sled removed it meanwhile: a crash at this moment would not hold it either.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}
