//! One storage conformance suite (issue 13), run through the engine on every backend: sled
//! (the embedded default), an in-memory shared store (the engine's shared-store mode), and
//! the real Redis Cluster named by `TALLY_REDIS_CLUSTER` when it is set (`.ci/run` starts
//! one). Each scenario must answer the same on all of them:
//!
//! - idempotency: a replay returns the stored receipt and writes nothing; the key with
//!   another request is refused; the same keyed request twice at once (in flight) is
//!   applied once, and both callers get its receipt;
//! - journal paging: forward from any point, at any page size, dense and in order;
//! - usage: a period's spend, refunds and counts by task type from the journal;
//! - a restart (a new engine on the same store) shows the same agents, journals and keys.
//!
//! The reference model with restarts (`engine_vs_model.rs`), concurrent overdraw and hold
//! expiry with several nodes (`shared_store.rs`, `overdraw.rs`, `hold_sweep.rs`) run on the
//! same backends.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::shared_mem::SharedMem;
use common::*;
use tally_core::{AgentId, CommandKind, EventKind, Outcome, PeriodKey};
use tally_store::{Engine, ManualClock, Reply, Storage};

const RETENTION_MS: u64 = 24 * 3_600_000;

/// A backend the suite runs on: opens an engine on the same data every time.
enum Backend {
    Sled(tempfile::TempDir),
    Shared(&'static str, Arc<dyn Storage>),
}

impl Backend {
    fn all() -> Vec<Backend> {
        let mut all = vec![
            Backend::Sled(tempfile::tempdir().expect("tempdir")),
            Backend::Shared("memory", Arc::new(SharedMem::new(RETENTION_MS))),
        ];
        if let Some(redis) = redis_store(RETENTION_MS) {
            all.push(Backend::Shared("redis", redis));
        }
        all
    }

    fn name(&self) -> &'static str {
        match self {
            Backend::Sled(_) => "sled",
            Backend::Shared(name, _) => name,
        }
    }

    fn open(&self, clock: &Arc<ManualClock>) -> Engine {
        match self {
            Backend::Sled(dir) => open(dir.path(), clock),
            Backend::Shared(_, store) => Engine::open_with(
                store.clone(),
                config(Path::new(".")),
                plans(),
                clock.clone(),
                None,
            )
            .expect("engine opens"),
        }
    }
}

/// An agent id of its own on a store that runs share.
fn fresh(name: &str) -> AgentId {
    agent(&format!("{}{name}", unique_prefix()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_replays_refuses_a_changed_request_and_applies_in_flight_twins_once() {
    for backend in Backend::all() {
        let name = backend.name();
        let clock = Arc::new(ManualClock::new(T0_MS));
        let engine = backend.open(&clock);
        let a = fresh("idem");
        create_funded(&engine, &a, "default", 10_000).await;
        let debit = |micros| CommandKind::Debit {
            amount_micros: micros,
        };

        let first = approve(&engine, cmd(&a, debit(300), "d1")).await;
        let again = engine
            .submit(cmd(&a, debit(300), "d1"))
            .await
            .expect("submits");
        assert_eq!(
            again,
            Reply::Decided {
                outcome: Outcome::Approved(first),
                rate: None,
                replayed: true
            },
            "{name}: a replay"
        );
        let changed = engine
            .submit(cmd(&a, debit(301), "d1"))
            .await
            .expect("submits");
        assert_eq!(
            changed,
            Reply::KeyReused,
            "{name}: the key with another request"
        );

        // The same request twice at once.
        let (x, y) = tokio::join!(
            engine.submit(cmd(&a, debit(500), "twin")),
            engine.submit(cmd(&a, debit(500), "twin"))
        );
        let receipts: Vec<_> = [x, y]
            .into_iter()
            .map(|r| match r.expect("submits") {
                Reply::Decided {
                    outcome: Outcome::Approved(r),
                    replayed,
                    ..
                } => (r, replayed),
                other => panic!("{name}: {other:?}"),
            })
            .collect();
        assert_eq!(receipts[0].0, receipts[1].0, "{name}: one receipt for both");
        assert_eq!(
            receipts.iter().filter(|(_, replayed)| !replayed).count(),
            1,
            "{name}: applied once"
        );
        let state = engine.agent(&a).await.expect("reads").expect("exists");
        assert_eq!(state.balance_micros, 10_000 - 300 - 500, "{name}");
        let debits = engine
            .journal(&a, 0, 100)
            .await
            .expect("reads")
            .iter()
            .filter(|e| matches!(e.kind, EventKind::Debited { .. }))
            .count();
        assert_eq!(debits, 2, "{name}: two debits journaled");

        // After a restart the keys are still known.
        engine.shutdown().await.expect("shuts down");
        drop(engine);
        let engine = backend.open(&clock);
        let after = engine
            .submit(cmd(&a, debit(300), "d1"))
            .await
            .expect("submits");
        assert_eq!(
            after,
            Reply::Decided {
                outcome: Outcome::Approved(first),
                rate: None,
                replayed: true
            },
            "{name}: a replay after a restart"
        );
        engine.shutdown().await.expect("shuts down");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journals_page_forward_densely_at_every_page_size() {
    for backend in Backend::all() {
        let name = backend.name();
        let clock = Arc::new(ManualClock::new(T0_MS));
        let engine = backend.open(&clock);
        let a = fresh("pages");
        create_funded(&engine, &a, "default", 1_000).await;
        debit_each(&engine, &a, 0..23).await;
        let all = engine.journal(&a, 0, 1_000).await.expect("reads");
        assert_eq!(all.len(), 25, "{name}: create, credit and 23 debits");
        for (i, e) in all.iter().enumerate() {
            assert_eq!(e.seq, i as u64 + 1, "{name}: dense");
        }
        for page in [1, 2, 7, 24, 25, 26] {
            let mut read = Vec::new();
            let mut after = 0;
            loop {
                let got = engine.journal(&a, after, page).await.expect("reads");
                assert!(got.len() <= page, "{name}: at most a page");
                let Some(last) = got.last() else { break };
                after = last.seq;
                read.extend(got);
            }
            assert_eq!(read, all, "{name}: pages of {page}");
        }
        assert!(
            engine.journal(&a, 25, 10).await.expect("reads").is_empty(),
            "{name}: nothing after the end"
        );
        engine.shutdown().await.expect("shuts down");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_counts_a_period_from_the_journal() {
    for backend in Backend::all() {
        let name = backend.name();
        let clock = Arc::new(ManualClock::new(T0_MS));
        let engine = backend.open(&clock);
        let a = fresh("usage");
        create_funded(&engine, &a, "default", 10_000).await;
        let mut search =
            tally_core::Command::new(a.clone(), CommandKind::Debit { amount_micros: 400 })
                .with_key(key("s1"));
        search.task_type = Some(tally_core::TaskType::new("search").expect("valid"));
        let searched = approve(&engine, search).await;
        approve(
            &engine,
            cmd(&a, CommandKind::Debit { amount_micros: 100 }, "p1"),
        )
        .await;
        let refund = CommandKind::Refund {
            debit_seq: searched.first_seq,
            amount_micros: 150,
        };
        approve(&engine, cmd(&a, refund, "r1")).await;
        let period = PeriodKey::new(2026, 11).expect("valid");
        let usage = engine
            .usage(&a, period)
            .await
            .expect("reads")
            .expect("exists");
        assert_eq!(usage.spent_micros, 500, "{name}");
        assert_eq!(usage.refunded_micros, 150, "{name}");
        assert_eq!(usage.credited_micros, 10_000, "{name}");
        assert_eq!(usage.debits, 2, "{name}");
        let by_search = usage.by_task_type.get("search").expect("search");
        // A refund counts under its own command's task type (none here).
        assert_eq!(
            (by_search.spent_micros, by_search.count),
            (400, 1),
            "{name}"
        );
        let later = PeriodKey::new(2026, 12).expect("valid");
        let empty = engine
            .usage(&a, later)
            .await
            .expect("reads")
            .expect("exists");
        assert_eq!(empty.spent_micros, 0, "{name}: nothing in December");
        engine.shutdown().await.expect("shuts down");
    }
}
