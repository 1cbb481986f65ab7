//! The answers of a server in trouble, each provoked for real: 500 `internal-error` when
//! the storage's fsync fails, 503 `shutting-down` once the engine has stopped, 503
//! `timeout` when a request outlives `limits.request_timeout_ms` (the storage stalls), and
//! 422 `too-many-holds` one past `OPEN_HOLDS_MAX` open holds (and 201 at exactly the max).

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use common::*;
use serde_json::json;
use tally_core::{AgentId, AgentState, Event, IdempotencyKey, TimestampMs, OPEN_HOLDS_MAX};
use tally_store::{
    AgentWrite, FeedCursor, FeedPage, GrantExpiry, KeyEntry, KeyIndexStatus, SledStorage, Storage,
    StoreError, StoreOptions,
};

/// sled, with two faults the test switches on: a failing `sync`, and a gate that holds
/// every `sync` until it is opened again.
#[derive(Debug)]
struct FaultyStorage {
    inner: SledStorage,
    fail_sync: AtomicBool,
    gate_closed: Mutex<bool>,
    gate_opened: Condvar,
}

impl FaultyStorage {
    fn open(dir: &Path) -> Arc<Self> {
        Arc::new(Self {
            inner: SledStorage::open_with(dir, &StoreOptions::new(8 << 20)).expect("opens"),
            fail_sync: AtomicBool::new(false),
            gate_closed: Mutex::new(false),
            gate_opened: Condvar::new(),
        })
    }

    fn set_gate_closed(&self, closed: bool) {
        *self.gate_closed.lock().expect("gate") = closed;
        self.gate_opened.notify_all();
    }
}

impl Storage for FaultyStorage {
    fn apply(&self, writes: Vec<AgentWrite>) -> Result<(), StoreError> {
        self.inner.apply(writes)
    }

    fn sync(&self) -> Result<(), StoreError> {
        let closed = self.gate_closed.lock().expect("gate");
        drop(
            self.gate_opened
                .wait_while(closed, |closed| *closed)
                .expect("gate"),
        );
        if self.fail_sync.load(Ordering::SeqCst) {
            return Err(StoreError::Io("planted fsync failure".into()));
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

    fn journal(&self, a: &AgentId, after: u64, limit: usize) -> Result<Vec<Event>, StoreError> {
        self.inner.journal(a, after, limit)
    }

    fn journal_rev(
        &self,
        a: &AgentId,
        before: u64,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        self.inner.journal_rev(a, before, limit)
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
        a: &AgentId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        self.inner.journal_staged(a, after, limit)
    }

    fn find_key(
        &self,
        a: &AgentId,
        key: &IdempotencyKey,
        slot: u128,
        now_ms: TimestampMs,
    ) -> Result<Option<KeyEntry>, StoreError> {
        self.inner.find_key(a, key, slot, now_ms)
    }

    fn note_key(&self, slot: u128, at_ms: TimestampMs) {
        self.inner.note_key(slot, at_ms);
    }

    fn needs_key_backfill(&self) -> bool {
        self.inner.needs_key_backfill()
    }

    fn backfill_keys(&self, keys: Vec<(u128, KeyEntry)>) -> Result<(), StoreError> {
        self.inner.backfill_keys(keys)
    }

    fn key_index_status(&self) -> KeyIndexStatus {
        self.inner.key_index_status()
    }

    fn backlog_events(&self) -> u64 {
        self.inner.backlog_events()
    }

    fn failure(&self) -> Option<String> {
        self.inner.failure()
    }
}

/// Opens the gate when dropped, so a failing test does not leave the engine stalled.
struct OpenGateOnDrop(Arc<FaultyStorage>);

impl Drop for OpenGateOnDrop {
    fn drop(&mut self) {
        self.0.set_gate_closed(false);
    }
}

async fn start_faulty(extra: &str) -> (TestServer, tally_store::Engine, Arc<FaultyStorage>) {
    let mut faulty = None;
    let (s, engine) = TestServer::start_over(config(extra), |dir| {
        let storage = FaultyStorage::open(dir);
        faulty = Some(storage.clone());
        storage
    })
    .await;
    (s, engine, faulty.expect("opened"))
}

/// A debit of `a1` with a deadline longer than any answer here should take: a hang fails
/// instead of waiting forever.
async fn debit(s: &TestServer, key: &str, amount_micros: u64) -> Resp {
    let req = s.debit_request("a1", key, amount_micros);
    s.send(req.timeout(Duration::from_secs(10))).await
}

#[tokio::test]
async fn internal_error_500_when_the_storage_fsync_fails() {
    let (s, engine, storage) = start_faulty("").await;
    s.agent("a1", "default", 1_000).await;
    storage.fail_sync.store(true, Ordering::SeqCst);
    let r = debit(&s, "d1", 100).await;
    r.assert_problem(500, "internal-error");
    // The engine stopped: later requests get the same answer, and it is not ready.
    debit(&s, "d2", 100)
        .await
        .assert_problem(500, "internal-error");
    assert_eq!(s.get("/readyz").await.status, 503);
    let _ = engine.shutdown().await;
}

#[tokio::test]
async fn shutting_down_503_once_the_engine_has_stopped() {
    let (s, engine, _) = start_faulty("").await;
    s.agent("a1", "default", 1_000).await;
    engine.shutdown().await.expect("shuts down");
    let r = debit(&s, "d1", 100).await;
    r.assert_problem(503, "shutting-down");
    assert_eq!(r.header("retry-after"), Some("1"));
    s.get("/v1/agents/a1")
        .await
        .assert_problem(503, "shutting-down");
}

/// Sends `send` again while the answer is a 503 timeout (safe: every call carries an
/// idempotency key), at most 50 times. On a loaded machine a request may outlive the short
/// request timeout these tests set even with the storage gate open.
async fn until_answered<F, Fut>(mut send: F) -> Resp
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Resp>,
{
    let mut r = send().await;
    for _ in 0..50 {
        if r.status != 503 {
            break;
        }
        r.assert_problem(503, "timeout");
        r = send().await;
    }
    r
}

#[tokio::test]
async fn timeout_503_when_a_request_outlives_request_timeout_ms() {
    let (s, engine, storage) = start_faulty("[limits]\nrequest_timeout_ms = 200").await;
    let created = until_answered(|| {
        s.post(
            "/v1/agents",
            "create-a1",
            json!({"id": "a1", "plan": "default"}),
        )
    })
    .await;
    assert_eq!(created.status, 201, "{}", created.text);
    let credited = until_answered(|| s.credit("a1", "credit-a1", 1_000)).await;
    assert_eq!(credited.status, 201, "{}", credited.text);
    storage.set_gate_closed(true);
    let _open_at_the_end = OpenGateOnDrop(storage.clone());
    let r = debit(&s, "d1", 100).await;
    r.assert_problem(503, "timeout");
    assert_eq!(r.header("retry-after"), Some("1"));
    // The stalled debit completes once the storage does; its retry is answered, once.
    storage.set_gate_closed(false);
    let again = until_answered(|| debit(&s, "d1", 100)).await;
    assert_eq!(again.status, 201, "{}", again.text);
    assert_eq!(
        until_answered(|| s.get("/v1/agents/a1")).await.body["balance_micros"],
        900,
        "debited once"
    );
    engine.shutdown().await.expect("shuts down");
}

#[tokio::test]
async fn too_many_holds_422_one_past_open_holds_max() {
    let s = Arc::new(TestServer::start().await);
    s.agent("a1", "default", 1_000_000).await;
    let hold = |s: Arc<TestServer>, key: String| async move { s.hold("a1", &key, 1, 60_000).await };
    // Exactly OPEN_HOLDS_MAX open holds: every one is placed (64 at a time).
    for chunk in (0..OPEN_HOLDS_MAX).collect::<Vec<_>>().chunks(64) {
        let tasks: Vec<_> = chunk
            .iter()
            .map(|i| tokio::spawn(hold(s.clone(), format!("h{i}"))))
            .collect();
        for t in tasks {
            let r = t.await.expect("task");
            assert_eq!(r.status, 201, "{}", r.text);
        }
    }
    let a = s.agent_state("a1").await;
    assert_eq!(a["held_micros"], OPEN_HOLDS_MAX as u64, "{a}");
    // One past the max is refused and changes nothing.
    let r = hold(s.clone(), "one-past".into()).await;
    r.assert_problem(422, "too-many-holds");
    assert_eq!(r.body["open_holds_max"], OPEN_HOLDS_MAX as u64);
    assert_eq!(s.agent_state("a1").await, a);
}
