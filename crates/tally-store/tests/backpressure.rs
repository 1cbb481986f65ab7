//! Limits and failures at the engine's edge: a full shard queue answers `Overloaded` at
//! once, and a storage failure stops the engine rather than serve unacknowledged state.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use common::*;
use crossbeam_channel::{bounded, Receiver, Sender};
use tally_core::{AgentId, AgentState, CommandKind, Event};
use tally_store::{AgentWrite, Engine, ManualClock, SledStorage, Storage, StoreError, SubmitError};

/// Sled, with a gate in `apply` and a switch that makes `sync` fail.
#[derive(Debug)]
struct Gated {
    inner: SledStorage,
    gate: Mutex<Option<(Sender<()>, Receiver<()>)>>,
    fail_sync: AtomicBool,
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
        self.inner.journal_rev(agent, before_seq, limit)
    }
    fn size_on_disk(&self) -> Result<u64, StoreError> {
        self.inner.size_on_disk()
    }
}

fn gated(dir: &std::path::Path) -> Arc<Gated> {
    Arc::new(Gated {
        inner: SledStorage::open(dir, 8 << 20).expect("opens"),
        gate: Mutex::new(None),
        fail_sync: AtomicBool::new(false),
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
