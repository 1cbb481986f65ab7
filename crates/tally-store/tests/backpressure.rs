//! Limits and failures at the engine's edge: a full shard queue answers `Overloaded` at
//! once, and a storage failure stops the engine rather than serve unacknowledged state.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use common::*;
use crossbeam_channel::{bounded, Receiver, Sender};
use tally_core::{AgentId, AgentState, CommandKind, Event, IdempotencyKey, TimestampMs};
use tally_store::{
    AgentWrite, Engine, FeedCursor, FeedPage, GrantExpiry, KeyEntry, ManualClock, SledStorage,
    Storage, StoreError, SubmitError,
};

/// Sled, with gates in `apply` and `journal_rev`, a count of `journal_rev` calls and a
/// switch that makes `sync` fail.
#[derive(Debug)]
struct Gated {
    inner: SledStorage,
    gate: Mutex<Option<(Sender<()>, Receiver<()>)>>,
    rev_gate: Mutex<Option<(Sender<()>, Receiver<()>)>>,
    rev_calls: AtomicU64,
    fail_sync: AtomicBool,
    /// What a background thread of the store reported, if anything.
    background_failure: Mutex<Option<String>>,
}

impl Storage for Gated {
    fn apply(&self, writes: Vec<AgentWrite>) -> Result<(), StoreError> {
        let gate = self.gate.lock().expect("lock").clone();
        if let Some((entered, release)) = gate {
            entered.send(()).expect("test listens");
            release.recv().expect("test releases");
        }
        self.inner.apply(writes)
    }
    fn sync(&self) -> Result<(), StoreError> {
        if self.fail_sync.load(Ordering::SeqCst) {
            return Err(StoreError::Io("injected fsync failure".into()));
        }
        self.inner.sync()
    }
    fn load_agents(&self) -> Result<Vec<AgentState>, StoreError> {
        self.inner.load_agents()
    }
    fn checkpoint(&self, agent: &AgentId) -> Result<Option<AgentState>, StoreError> {
        self.inner.checkpoint(agent)
    }
    fn agent_ids(&self, after: Option<&AgentId>, limit: usize) -> Result<Vec<AgentId>, StoreError> {
        self.inner.agent_ids(after, limit)
    }
    fn agent_count(&self) -> Result<u64, StoreError> {
        self.inner.agent_count()
    }
    fn hold_agents(&self) -> Result<Option<Vec<AgentId>>, StoreError> {
        self.inner.hold_agents()
    }
    fn backfill_holds(&self, agents: &[AgentState]) -> Result<(), StoreError> {
        self.inner.backfill_holds(agents)
    }
    fn grant_expiries(
        &self,
        from_ms: TimestampMs,
        after: Option<&[u8]>,
        through_ms: TimestampMs,
        limit: usize,
    ) -> Result<Vec<GrantExpiry>, StoreError> {
        self.inner.grant_expiries(from_ms, after, through_ms, limit)
    }
    fn remove_grant_expiries(&self, keys: &[Vec<u8>]) -> Result<(), StoreError> {
        self.inner.remove_grant_expiries(keys)
    }
    fn grant_expiries_complete(&self) -> Result<bool, StoreError> {
        self.inner.grant_expiries_complete()
    }
    fn backfill_grant_expiries(&self, agents: &[AgentState]) -> Result<(), StoreError> {
        self.inner.backfill_grant_expiries(agents)
    }
    fn journal(
        &self,
        agent: &AgentId,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        self.inner.journal(agent, after_seq, limit)
    }
    fn journal_rev(
        &self,
        agent: &AgentId,
        before_seq: u64,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        self.rev_calls.fetch_add(1, Ordering::SeqCst);
        let gate = self.rev_gate.lock().expect("lock").clone();
        if let Some((entered, release)) = gate {
            entered.send(()).expect("test listens");
            release.recv().expect("test releases");
        }
        self.inner.journal_rev(agent, before_seq, limit)
    }
    fn feed(&self, from: FeedCursor, limit: usize) -> Result<FeedPage, StoreError> {
        self.inner.feed(from, limit)
    }
    fn feed_watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.feed_watch()
    }
    fn size_on_disk(&self) -> Result<u64, StoreError> {
        self.inner.size_on_disk()
    }
    fn journal_staged(
        &self,
        agent: &AgentId,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        self.inner.journal_staged(agent, after_seq, limit)
    }
    fn find_key(
        &self,
        agent: &AgentId,
        key: &IdempotencyKey,
        slot: u128,
        now_ms: u64,
    ) -> Result<Option<KeyEntry>, StoreError> {
        self.inner.find_key(agent, key, slot, now_ms)
    }
    fn note_key(&self, slot: u128, at_ms: u64) {
        self.inner.note_key(slot, at_ms)
    }
    fn failure(&self) -> Option<String> {
        let injected = self.background_failure.lock().expect("lock").clone();
        injected.or_else(|| self.inner.failure())
    }
}

fn gated(dir: &std::path::Path) -> Arc<Gated> {
    Arc::new(Gated {
        inner: SledStorage::open(dir, 8 << 20).expect("opens"),
        gate: Mutex::new(None),
        rev_gate: Mutex::new(None),
        rev_calls: AtomicU64::new(0),
        fail_sync: AtomicBool::new(false),
        background_failure: Mutex::new(None),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_shard_queue_is_overloaded_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = gated(dir.path());
    let mut c = config(dir.path());
    c.shards = 1;
    c.shard_queue_len_max = 4;
    let clock = Arc::new(ManualClock::new(T0_MS));
    let engine = Engine::open_with(storage.clone(), c, plans(), clock, None).expect("opens");
    let a = agent("a");
    approve(&engine, cmd(&a, create("default"), "c")).await;
    let (entered_tx, entered_rx) = bounded(1);
    let (release_tx, release_rx) = bounded(16);
    *storage.gate.lock().expect("lock") = Some((entered_tx, release_rx));
    // The first credit holds the shard inside `apply`.
    let first = tokio::spawn({
        let engine = engine.clone();
        let a = a.clone();
        async move {
            engine
                .submit(cmd(&a, CommandKind::Credit { amount_micros: 1 }, "t0"))
                .await
        }
    });
    tokio::task::spawn_blocking(move || entered_rx.recv().expect("shard entered apply"))
        .await
        .expect("joins");
    // Exactly the queue's capacity waits; the next is refused at once.
    let mut queued = Vec::new();
    for i in 1..=4 {
        let engine = engine.clone();
        let a = a.clone();
        queued.push(tokio::spawn(async move {
            engine
                .submit(cmd(
                    &a,
                    CommandKind::Credit { amount_micros: 1 },
                    &format!("t{i}"),
                ))
                .await
        }));
    }
    while engine.queued() < 4 {
        tokio::task::yield_now().await;
    }
    let refused = engine
        .submit(cmd(&a, CommandKind::Credit { amount_micros: 1 }, "t5"))
        .await
        .err();
    assert_eq!(
        refused,
        Some(SubmitError::Overloaded {
            retry_after_ms: 1_000
        })
    );
    assert!(engine.metrics().overloaded_total.get() >= 1);
    *storage.gate.lock().expect("lock") = None;
    release_tx.send(()).expect("releases");
    approved(first.await.expect("joins").expect("submits"));
    for q in queued {
        approved(q.await.expect("joins").expect("submits"));
    }
    assert_eq!(
        engine
            .agent(&a)
            .await
            .expect("reads")
            .expect("exists")
            .balance_micros,
        5
    );
    engine.shutdown().await.expect("shuts down");
}

#[tokio::test]
async fn a_failed_fsync_stops_the_engine() {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = gated(dir.path());
    let clock = Arc::new(ManualClock::new(T0_MS));
    let engine = Engine::open_with(
        storage.clone(),
        config(dir.path()),
        plans(),
        clock.clone(),
        None,
    )
    .expect("opens");
    let a = agent("a");
    approve(&engine, cmd(&a, create("default"), "c")).await;
    storage.fail_sync.store(true, Ordering::SeqCst);
    let failed = engine
        .submit(cmd(&a, CommandKind::Credit { amount_micros: 5 }, "t"))
        .await;
    assert!(
        matches!(failed, Err(SubmitError::Failed(ref why)) if why.contains("injected")),
        "{failed:?}"
    );
    assert!(!engine.is_ready());
    // Nothing more is decided, not even reads of the unacknowledged state.
    assert!(matches!(
        engine.agent(&a).await,
        Err(SubmitError::Failed(_))
    ));
    assert!(matches!(
        engine
            .submit(cmd(&a, CommandKind::Credit { amount_micros: 5 }, "t2"))
            .await,
        Err(SubmitError::Failed(_))
    ));
    assert!(
        engine.shutdown().await.is_err(),
        "shutdown reports the failure"
    );
}

/// Usage of a period scans the journal back from its newest entry; the scan is bounded,
/// stops when nobody waits for it, and does not happen at all for a period before the
/// agent existed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_scans_are_bounded_at_their_edge_and_skip_periods_before_the_agent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = gated(dir.path());
    let clock = Arc::new(ManualClock::new(T0_MS));
    let mut c = config(dir.path());
    // Exactly the agent's 22 entries.
    c.usage_scan_entries_max = 22;
    let engine =
        Engine::open_with(storage.clone(), c.clone(), plans(), clock.clone(), None).expect("opens");
    let a = agent("a");
    create_funded(&engine, &a, "default", 1_000).await;
    debit_each(&engine, &a, 0..20).await;
    let period = tally_core::period::period_of(T0_MS, 1);
    let usage = engine
        .usage(&a, period)
        .await
        .expect("answers")
        .expect("exists");
    assert_eq!((usage.debits, usage.spent_micros), (20, 20));
    // One entry more than the bound: refused, not read whole.
    approve(
        &engine,
        cmd(&a, CommandKind::Debit { amount_micros: 1 }, "d20"),
    )
    .await;
    assert_eq!(
        engine.usage(&a, period).await,
        Err(SubmitError::ScanTooLarge { entries_max: 22 })
    );
    // A period that ended before the agent was created reads nothing.
    let calls = storage.rev_calls.load(Ordering::SeqCst);
    let long_ago = tally_core::PeriodKey::new(1970, 1).expect("valid");
    let usage = engine
        .usage(&a, long_ago)
        .await
        .expect("answers")
        .expect("exists");
    assert_eq!(usage.debits, 0);
    assert_eq!(
        storage.rev_calls.load(Ordering::SeqCst),
        calls,
        "no journal read"
    );
    engine.shutdown().await.expect("shuts down");
}

/// A caller that goes away (a timed-out request) stops a usage scan after the page it is on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_usage_scan_stops_when_its_caller_goes_away() {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = gated(dir.path());
    let clock = Arc::new(ManualClock::new(T0_MS));
    let engine = Engine::open_with(storage.clone(), config(dir.path()), plans(), clock, None)
        .expect("opens");
    let a = agent("a");
    create_funded(&engine, &a, "default", 1_000_000).await;
    // More than one page (4,096 entries) to scan.
    let mut tasks = Vec::new();
    for t in 0..8 {
        let engine = engine.clone();
        let a = a.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..520 {
                let k = format!("d{t}-{i}");
                approve(
                    &engine,
                    cmd(&a, CommandKind::Debit { amount_micros: 1 }, &k),
                )
                .await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("joins");
    }
    let period = tally_core::period::period_of(T0_MS, 1);
    let (entered_tx, entered_rx) = bounded(4);
    let (release_tx, release_rx) = bounded(4);
    *storage.rev_gate.lock().expect("lock") = Some((entered_tx, release_rx));
    let scan = tokio::spawn({
        let engine = engine.clone();
        let a = a.clone();
        async move { engine.usage(&a, period).await }
    });
    let entered_rx = tokio::task::spawn_blocking(move || {
        entered_rx.recv().expect("the scan read a page");
        entered_rx
    })
    .await
    .expect("joins");
    scan.abort();
    assert!(scan.await.expect_err("aborted").is_cancelled());
    let calls = storage.rev_calls.load(Ordering::SeqCst);
    release_tx.send(()).expect("releases");
    let more = tokio::task::spawn_blocking(move || {
        entered_rx.recv_timeout(std::time::Duration::from_millis(500))
    })
    .await
    .expect("joins");
    assert!(more.is_err(), "the scan went on after its caller left");
    assert_eq!(storage.rev_calls.load(Ordering::SeqCst), calls);
    *storage.rev_gate.lock().expect("lock") = None;
    engine.shutdown().await.expect("shuts down");
}

/// A store whose background thread failed (the indexer panicked inside sled, say) makes
/// the engine unready at once, with no command needed to notice, and refuses writes
/// instead of queueing them forever.
#[tokio::test]
async fn a_failed_storage_thread_makes_the_engine_unready() {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = gated(dir.path());
    let clock = Arc::new(ManualClock::new(T0_MS));
    let engine = Engine::open_with(storage.clone(), config(dir.path()), plans(), clock, None)
        .expect("opens");
    let a = agent("a");
    approve(&engine, cmd(&a, create("default"), "c")).await;
    assert!(engine.is_ready());
    *storage.background_failure.lock().expect("lock") = Some("the indexer panicked".into());
    assert!(!engine.is_ready());
    let refused = engine
        .submit(cmd(&a, CommandKind::Credit { amount_micros: 5 }, "t"))
        .await;
    assert!(
        matches!(refused, Err(SubmitError::Failed(ref why)) if why.contains("indexer")),
        "{refused:?}"
    );
    assert!(
        engine.shutdown().await.is_err(),
        "shutdown reports the failure"
    );
}
