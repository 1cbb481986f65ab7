//! Several nodes on one shared store (issue 13): engines in shared-store mode over the same
//! store, deciding the same agents at once. Each test runs on an in-memory shared store
//! (`common::shared_mem`, which also injects failures) and again on the real Redis Cluster
//! named by `TALLY_REDIS_CLUSTER` when it is set (`.ci/run` starts one).
//!
//! - Concurrent debits through two nodes never overdraw, never charge twice (a retry of
//!   the same key on the other node is a replay), conserve money, and leave a dense journal
//!   that replays to the record.
//! - A plan's rate limit holds in total across the nodes, not per node.
//! - A hold expires once, whichever node's sweep finds it.
//! - A store that is unreachable, or loses a reply, is a 503 (`Unavailable`) for the
//!   commands it touched; the engine goes on, and the retry with the same key is exact.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::shared_mem::SharedMem;
use common::*;
use rand::{Rng, SeedableRng};
use tally_core::{
    evolve, AgentId, Command, CommandKind, Denial, Event, EventKind, Outcome, Plan, PlanBook,
    PlanName, RateBucket,
};
use tally_store::{Engine, ManualClock, Reply, Storage, SubmitError};

/// Tasks racing on one agent, half through each node.
const TASKS: usize = 16;
const CREDIT_MICROS: u64 = 60_000;
/// Attempts of one command through 503s before the test gives up (a planted bug that makes
/// every write conflict would otherwise spin forever).
const ATTEMPTS_MAX: usize = 50;
/// Commands one task sends at most.
const COMMANDS_PER_TASK_MAX: usize = 2_000;
const SWEEP_WAIT_MAX: Duration = Duration::from_secs(10);

const RETENTION_MS: u64 = 24 * 3_600_000;
/// The engine's bound on deciding an agent again (`shard::CONFLICT_RETRIES_MAX`).
const CONFLICT_RETRIES_MAX: u32 = 8;

/// A store the nodes of a test share: its name, the store, and the in-memory one again
/// (to look inside) when it is that.
type Shared = (&'static str, Arc<dyn Storage>, Option<Arc<SharedMem>>);

/// The stores every test runs on: the in-memory one, and Redis when configured.
fn stores() -> Vec<Shared> {
    let mem = Arc::new(SharedMem::new(RETENTION_MS));
    let mut all: Vec<Shared> = vec![("memory", mem.clone(), Some(mem))];
    if let Some(redis) = redis_store(RETENTION_MS) {
        all.push(("redis", redis, None));
    }
    all
}

fn plans() -> PlanBook {
    let default = Plan::unlimited(PlanName::new("default").expect("valid"));
    let mut limited = Plan::unlimited(PlanName::new("limited").expect("valid"));
    limited.buckets = vec![RateBucket::new("default", 10, 60_000, 10).expect("valid")];
    PlanBook::new([default, limited])
}

fn node(store: &Arc<dyn Storage>, clock: &Arc<ManualClock>, sweep_ms: u64) -> Engine {
    let dir = std::env::temp_dir();
    let mut cfg = config(&dir);
    cfg.hold_sweep_interval_ms = sweep_ms;
    Engine::open_with(store.clone(), cfg, plans(), clock.clone(), None).expect("node opens")
}

/// Submits through `nodes[first]`, and on a 503 again through the next node, with the same
/// key, as a client would.
async fn submit_retrying(nodes: &[Engine], first: usize, c: &Command) -> Reply {
    for attempt in 0..ATTEMPTS_MAX {
        match nodes[(first + attempt) % nodes.len()]
            .submit(c.clone())
            .await
        {
            Ok(reply) => return reply,
            Err(SubmitError::Unavailable { .. }) => continue,
            Err(e) => panic!("{c:?}: {e}"),
        }
    }
    panic!("{c:?}: still unavailable after {ATTEMPTS_MAX} attempts");
}

fn check_journal(a: &AgentId, journal: &[Event]) -> Option<tally_core::AgentState> {
    let mut state = None;
    for (i, e) in journal.iter().enumerate() {
        assert_eq!(e.seq, i as u64 + 1, "dense journal");
        state = Some(evolve(state, a, e).expect("the journal replays"));
    }
    state
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_never_overdraw_nor_charge_twice() {
    for (name, store, mem) in stores() {
        let clock = Arc::new(ManualClock::new(T0_MS));
        let nodes = [
            node(&store, &clock, u64::MAX),
            node(&store, &clock, u64::MAX),
        ];
        let a = agent(&format!("{}target", unique_prefix()));
        approve(&nodes[0], cmd(&a, create("default"), "c")).await;
        let credit = CommandKind::Credit {
            amount_micros: CREDIT_MICROS,
        };
        approve(&nodes[1], cmd(&a, credit, "t")).await;
        if let Some(mem) = &mem {
            // Besides the races the two nodes run into by themselves, some that certainly
            // happen: writes that meet a "newer version" and are decided again.
            mem.force_conflicts(40);
        }
        let mut tasks = Vec::new();
        for t in 0..TASKS {
            let nodes = nodes.clone();
            let a = a.clone();
            tasks.push(tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(t as u64);
                let (mut approved_micros, mut approved_keys) = (0u64, 0u64);
                for i in 0..COMMANDS_PER_TASK_MAX {
                    let amount = rng.gen_range(1..=400);
                    let debit = CommandKind::Debit {
                        amount_micros: amount,
                    };
                    let c = cmd(&a, debit, &format!("t{t}-{i}"));
                    match submit_retrying(&nodes, t, &c).await {
                        Reply::Decided {
                            outcome: Outcome::Approved(r),
                            ..
                        } => {
                            approved_micros += amount;
                            approved_keys += 1;
                            // The same request again, through the other node: the stored
                            // receipt, nothing charged.
                            if i % 5 == 0 {
                                let again = submit_retrying(&nodes, t + 1, &c).await;
                                assert_eq!(
                                    again,
                                    Reply::Decided {
                                        outcome: Outcome::Approved(r),
                                        rate: None,
                                        replayed: true
                                    },
                                    "a retry through the other node replays"
                                );
                            }
                        }
                        Reply::Decided {
                            outcome:
                                Outcome::Denied(Denial::InsufficientFunds {
                                    available_micros, ..
                                }),
                            ..
                        } => {
                            assert!(available_micros < amount, "denied although it fits");
                            if available_micros == 0 {
                                return (approved_micros, approved_keys);
                            }
                        }
                        other => panic!("unexpected {other:?}"),
                    }
                }
                panic!("task {t} never saw the balance reach 0");
            }));
        }
        let (mut total, mut debits) = (0, 0);
        for t in tasks {
            let (micros, keys) = t.await.expect("task finishes");
            total += micros;
            debits += keys;
        }
        assert_eq!(
            total, CREDIT_MICROS,
            "{name}: every micro spent exactly once"
        );
        let state = nodes[0].agent(&a).await.expect("reads").expect("exists");
        assert_eq!(
            Some(&state),
            nodes[1].agent(&a).await.expect("reads").as_ref(),
            "{name}: both nodes read the same record"
        );
        assert_eq!(state.balance_micros, 0);
        assert_eq!(state.debited_total_micros, CREDIT_MICROS);
        state.check_invariants().expect("invariants hold");
        let journal = nodes[1].journal(&a, 0, 1_000_000).await.expect("reads");
        assert_eq!(check_journal(&a, &journal).as_ref(), Some(&state), "{name}");
        let journaled = journal
            .iter()
            .filter(|e| matches!(e.kind, EventKind::Debited { .. }))
            .count() as u64;
        assert_eq!(journaled, debits, "{name}: one debit per approved key");
        if let Some(mem) = mem {
            assert!(mem.conflicts.load(std::sync::atomic::Ordering::SeqCst) >= 40);
        }
        let conflicts: u64 = nodes
            .iter()
            .map(|n| n.metrics().storage_conflicts_total.get())
            .sum();
        eprintln!("{name}: {debits} debits, {conflicts} writes decided again after a conflict");
        for n in nodes {
            n.shutdown().await.expect("shuts down");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rate_limit_holds_in_total_across_nodes() {
    for (name, store, _) in stores() {
        let clock = Arc::new(ManualClock::new(T0_MS));
        let nodes = [
            node(&store, &clock, u64::MAX),
            node(&store, &clock, u64::MAX),
        ];
        let a = agent(&format!("{}limited", unique_prefix()));
        approve(&nodes[0], cmd(&a, create("limited"), "c")).await;
        let credit = CommandKind::Credit {
            amount_micros: 1_000_000,
        };
        approve(&nodes[1], cmd(&a, credit, "t")).await;
        // The clock stands still: the bucket's burst of 10 is all there is.
        let mut tasks = Vec::new();
        for i in 0..40 {
            let nodes = nodes.clone();
            let a = a.clone();
            tasks.push(tokio::spawn(async move {
                let c = cmd(
                    &a,
                    CommandKind::Debit { amount_micros: 1 },
                    &format!("r{i}"),
                );
                submit_retrying(&nodes, i, &c).await
            }));
        }
        let mut approved = 0;
        for t in tasks {
            match t.await.expect("task finishes") {
                Reply::Decided {
                    outcome: Outcome::Approved(_),
                    ..
                } => approved += 1,
                Reply::Decided {
                    outcome: Outcome::Denied(Denial::RateLimited { .. }),
                    ..
                } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(approved, 10, "{name}: the burst of 10, across both nodes");
        for n in nodes {
            n.shutdown().await.expect("shuts down");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hold_expires_once_whichever_node_sweeps() {
    for (name, store, _) in stores() {
        let clock = Arc::new(ManualClock::new(T0_MS));
        let nodes = [node(&store, &clock, 100), node(&store, &clock, 100)];
        let a = agent(&format!("{}holder", unique_prefix()));
        create_funded(&nodes[0], &a, "default", 1_000).await;
        let hold = CommandKind::Hold {
            amount_micros: 700,
            ttl_ms: 5_000,
        };
        approve(&nodes[1], cmd(&a, hold, "h")).await;
        clock.set(T0_MS + 60_000);
        let deadline = Instant::now() + SWEEP_WAIT_MAX;
        loop {
            let state = nodes[0].agent(&a).await.expect("reads").expect("exists");
            if state.holds.is_empty() {
                assert_eq!(
                    state.balance_micros, 1_000,
                    "{name}: the hold gave its money back"
                );
                break;
            }
            assert!(Instant::now() < deadline, "{name}: the hold never expired");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Both sweeps have passed by more than once since; still one expiry.
        clock.set(T0_MS + 120_000);
        tokio::time::sleep(Duration::from_millis(600)).await;
        let journal = nodes[1].journal(&a, 0, 1_000).await.expect("reads");
        let expired = journal
            .iter()
            .filter(|e| matches!(e.kind, EventKind::HoldExpired { .. }))
            .count();
        assert_eq!(expired, 1, "{name}: expired once");
        check_journal(&a, &journal);
        for n in nodes {
            n.shutdown().await.expect("shuts down");
        }
    }
}

#[tokio::test]
async fn an_unavailable_store_is_a_503_and_the_retry_is_exact() {
    let mem = Arc::new(SharedMem::new(RETENTION_MS));
    let store: Arc<dyn Storage> = mem.clone();
    let clock = Arc::new(ManualClock::new(T0_MS));
    let engine = node(&store, &clock, u64::MAX);
    let a = agent("flaky");
    create_funded(&engine, &a, "default", 1_000).await;
    let debit = |k: &str| cmd(&a, CommandKind::Debit { amount_micros: 100 }, k);

    // Refused: nothing applied, a 503, and the engine goes on.
    mem.refuse_writes(1);
    let got = engine.submit(debit("d1")).await;
    assert!(
        matches!(got, Err(SubmitError::Unavailable { .. })),
        "{got:?}"
    );
    assert!(
        engine.is_ready(),
        "a passing failure does not stop the engine"
    );
    let r = approve(&engine, debit("d1")).await;
    assert_eq!(r.balance_after_micros, 900, "charged once, on the retry");

    // Applied but the reply lost: a 503, and the retry finds the change.
    mem.lose_replies(1);
    let got = engine.submit(debit("d2")).await;
    assert!(
        matches!(got, Err(SubmitError::Unavailable { .. })),
        "{got:?}"
    );
    match engine.submit(debit("d2")).await.expect("submits") {
        Reply::Decided {
            outcome: Outcome::Approved(r),
            replayed: true,
            ..
        } => assert_eq!(r.balance_after_micros, 800),
        other => panic!("expected the stored receipt, got {other:?}"),
    }

    // Writes that keep meeting newer versions: decided again, then a 503 with nothing
    // applied; fewer of them are absorbed.
    mem.force_conflicts(u64::from(CONFLICT_RETRIES_MAX) + 1);
    let got = engine.submit(debit("d3")).await;
    assert!(
        matches!(got, Err(SubmitError::Unavailable { .. })),
        "{got:?}"
    );
    mem.force_conflicts(3);
    let r = approve(&engine, debit("d3")).await;
    assert_eq!(r.balance_after_micros, 700, "charged once");
    assert_eq!(
        engine.metrics().storage_conflicts_total.get(),
        u64::from(CONFLICT_RETRIES_MAX) + 4
    );

    // A read that cannot reach the store: the run's read of all its agents, then the
    // job's own read again.
    mem.refuse_reads(2);
    let got = engine.agent(&a).await;
    assert!(
        matches!(got, Err(SubmitError::Unavailable { .. })),
        "{got:?}"
    );
    let state = engine.agent(&a).await.expect("reads").expect("exists");
    assert_eq!(state.balance_micros, 700);
    assert_eq!(
        check_journal(&a, &mem.journal_of(&a)).as_ref(),
        Some(&state),
        "the journal replays to the record"
    );
    assert_eq!(engine.metrics().storage_unavailable_total.get(), 4);
    engine.shutdown().await.expect("shuts down");
}
