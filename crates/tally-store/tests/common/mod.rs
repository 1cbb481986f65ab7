//! Helpers shared by the engine's integration tests.
#![allow(dead_code)]

pub mod shared_mem;

use std::path::Path;
use std::sync::Arc;

use tally_core::{
    AgentId, Command, CommandKind, IdempotencyKey, Outcome, Plan, PlanBook, PlanName, Receipt,
    Status,
};
use tally_store::{Engine, EngineConfig, ManualClock, Reply};

pub const T0_MS: u64 = 1_795_000_000_000; // 2026-11-17

/// A property test's number of cases: `PROPTEST_CASES` when set (a soak), else `default`.
/// A `cases` written into a `ProptestConfig` would otherwise win over the variable.
pub fn proptest_cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub fn plans() -> PlanBook {
    let default = Plan::unlimited(PlanName::new("default").expect("valid"));
    let mut capped = Plan::unlimited(PlanName::new("capped").expect("valid"));
    capped.monthly_cap_micros = Some(1_000_000);
    capped.soft_threshold_pct = Some(80);
    PlanBook::new([default, capped])
}

pub fn config(dir: &Path) -> EngineConfig {
    let mut c = EngineConfig::new(dir);
    c.shards = 2;
    c.sled_cache_bytes = 8 * 1024 * 1024;
    c.checkpoint_interval_ms = 1_000;
    c
}

pub fn open(dir: &Path, clock: &Arc<ManualClock>) -> Engine {
    open_with(dir, clock, plans())
}

pub fn open_with(dir: &Path, clock: &Arc<ManualClock>, plans: PlanBook) -> Engine {
    Engine::open(config(dir), plans, clock.clone(), None).expect("engine opens")
}

pub fn agent(name: &str) -> AgentId {
    AgentId::new(name).expect("valid agent id")
}

pub fn key(k: &str) -> IdempotencyKey {
    IdempotencyKey::new(k).expect("valid key")
}

pub fn cmd(a: &AgentId, kind: CommandKind, k: &str) -> Command {
    Command::new(a.clone(), kind).with_key(key(k))
}

pub fn create(plan: &str) -> CommandKind {
    CommandKind::CreateAgent {
        plan: PlanName::new(plan).expect("valid"),
        status: Status::Active,
    }
}

/// Submits `c`, which must be approved fresh; its receipt.
pub async fn approve(engine: &Engine, c: Command) -> Receipt {
    approved(engine.submit(c).await.expect("submits"))
}

/// Creates `a` on `plan` (key "c") and credits it `credit_micros` (key "t").
pub async fn create_funded(engine: &Engine, a: &AgentId, plan: &str, credit_micros: u64) {
    approve(engine, cmd(a, create(plan), "c")).await;
    let credit = CommandKind::Credit {
        amount_micros: credit_micros,
    };
    approve(engine, cmd(a, credit, "t")).await;
}

/// Debits `a` one micro per key `d{i}` for each `i` in `keys`, in order; each must be
/// approved fresh.
pub async fn debit_each(engine: &Engine, a: &AgentId, keys: std::ops::Range<u64>) {
    for i in keys {
        let debit = CommandKind::Debit { amount_micros: 1 };
        approve(engine, cmd(a, debit, &format!("d{i}"))).await;
    }
}

/// The receipt of an approved, fresh (not replayed) change.
pub fn approved(reply: Reply) -> Receipt {
    match reply {
        Reply::Decided {
            outcome: Outcome::Approved(r),
            replayed: false,
            ..
        } => r,
        other => panic!("expected a fresh approval, got {other:?}"),
    }
}

/// Copies a live data directory the way a crash would leave it: the write-ahead log first,
/// then sled. The indexer may meanwhile move WAL records into sled and delete their
/// segment; sled, copied after, then holds them.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    let mut entries: Vec<_> = std::fs::read_dir(from)
        .expect("reads dir")
        .map(|e| e.expect("entry"))
        .collect();
    entries.sort_by_key(|e| e.file_name() != "wal");
    for entry in entries {
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            match std::fs::copy(entry.path(), &target) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => panic!("copying {}: {e}", entry.path().display()),
            }
        }
    }
}

/// The notifications (`threshold_crossed` entries) of a journal, in order.
pub fn crossings(journal: &[tally_core::Event]) -> Vec<tally_core::Crossing> {
    journal
        .iter()
        .filter_map(|e| match e.kind {
            tally_core::EventKind::ThresholdCrossed { crossing } => Some(crossing),
            _ => None,
        })
        .collect()
}

/// A prefix no other run uses, for agent ids in a store that runs share (a Redis Cluster).
pub fn unique_prefix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "t{nanos:x}-{}-{}-",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// The Redis Cluster named by `TALLY_REDIS_CLUSTER` (comma-separated `host:port`), as a
/// store; `None`, with a note on stderr, when it is not set (a test then checks nothing
/// and says so). `.ci/run` starts a cluster, sets it, and sets `TALLY_REDIS_REQUIRED`,
/// which makes a missing cluster a failure instead.
pub fn redis_store(idempotency_retention_ms: u64) -> Option<Arc<dyn tally_store::Storage>> {
    let Ok(nodes) = std::env::var("TALLY_REDIS_CLUSTER") else {
        assert!(
            std::env::var_os("TALLY_REDIS_REQUIRED").is_none(),
            "TALLY_REDIS_REQUIRED is set but TALLY_REDIS_CLUSTER is not"
        );
        eprintln!(
            "skipped on Redis: TALLY_REDIS_CLUSTER not set (scripts/redis-cluster.sh up prints it)"
        );
        return None;
    };
    let options = tally_store::RedisOptions {
        nodes: nodes.split(',').map(str::to_owned).collect(),
        idempotency_retention_ms,
        ..tally_store::RedisOptions::default()
    };
    let store = tally_store::RedisStorage::connect(&options).expect("the Redis Cluster answers");
    Some(Arc::new(store))
}
