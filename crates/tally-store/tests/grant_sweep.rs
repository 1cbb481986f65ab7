//! The grant sweep (`grant_sweep.rs`): a credit grant of an agent that is not in memory
//! (evicted by a cache of two records, or not loaded since a restart) still expires, and
//! its `grant.expiring` warning is still journaled at its time, with no command of the
//! agent's, through the store's index of grant expiries. Time is a `ManualClock`; the only
//! real waits are for the threads' ticks and the indexer (polled, never slept on blindly).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tally_core::{
    AgentId, CommandKind, Crossing, Event, EventKind, GrantCategory, GrantTerms, Plan, PlanBook,
    PlanName, Receipt, Thresholds,
};
use tally_store::{Engine, ManualClock, SledStorage, Storage};

/// How long a sweep may take to come by (ticks of 50 ms, indexing every 200 ms).
const SWEEP_WAIT_MAX: Duration = Duration::from_secs(10);
const EXPIRES_AT_MS: u64 = T0_MS + 60_000;

/// An engine over a store the test keeps a handle on, to look at the index of grant
/// expiries. Drop both before opening the directory again.
fn open_kept(
    dir: &std::path::Path,
    clock: &Arc<ManualClock>,
    plans: PlanBook,
) -> (Engine, Arc<SledStorage>) {
    let storage = Arc::new(SledStorage::open(dir, 8 << 20).expect("store opens"));
    let mut cfg = config(dir);
    cfg.hold_sweep_interval_ms = 1_000;
    // One record per shard: any other agent's use pushes ours out.
    cfg.agents_cached_max = 2;
    let engine =
        Engine::open_with(storage.clone(), cfg, plans, clock.clone(), None).expect("engine opens");
    (engine, storage)
}

async fn close(engine: Engine, storage: Arc<SledStorage>) {
    engine.shutdown().await.expect("shuts down");
    drop(engine);
    drop(storage);
}

fn expiring(expires_at_ms: u64) -> GrantTerms {
    GrantTerms {
        expires_at_ms: Some(expires_at_ms),
        priority: 100,
        category: GrantCategory::Promotional,
    }
}

async fn issue(engine: &Engine, a: &AgentId, amount_micros: u64, key: &str) -> Receipt {
    let issue = CommandKind::IssueGrant {
        amount_micros,
        terms: expiring(EXPIRES_AT_MS),
    };
    approve(engine, cmd(a, issue, key)).await
}

/// Creates agents until `a` was pushed out of memory, then returns.
async fn push_out(engine: &Engine, round: &str) {
    let evicted = engine.metrics().agents_evicted_total.get();
    for i in 0..24 {
        let other = agent(&format!("other-{round}-{i}"));
        approve(engine, cmd(&other, create("default"), "c")).await;
    }
    assert!(
        engine.metrics().agents_evicted_total.get() > evicted,
        "records left memory"
    );
}

fn expiries(journal: &[Event]) -> Vec<&Event> {
    journal
        .iter()
        .filter(|e| matches!(e.kind, EventKind::GrantExpired { .. }))
        .collect()
}

/// Polls `a`'s journal (which never loads the agent) until `done` holds.
async fn wait_journal(engine: &Engine, a: &AgentId, what: &str, done: impl Fn(&[Event]) -> bool) {
    let deadline = Instant::now() + SWEEP_WAIT_MAX;
    loop {
        let journal = engine.journal(a, 0, usize::MAX).await.expect("reads");
        if done(&journal) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what} within {SWEEP_WAIT_MAX:?}; journal of {a}: {journal:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls until `done` holds.
async fn wait_for(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + SWEEP_WAIT_MAX;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "{what} within {SWEEP_WAIT_MAX:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Grant ids in the store's index of grant expiries.
fn indexed(storage: &SledStorage) -> Vec<(AgentId, u64, u64)> {
    storage
        .grant_expiries(0, None, u64::MAX, 1_000)
        .expect("reads the index")
        .into_iter()
        .map(|e| (e.agent, e.grant_id, e.expires_at_ms))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicted_agents_grant_is_expired_by_the_sweep_at_its_time_exactly_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(T0_MS));
    let (engine, storage) = open_kept(dir.path(), &clock, plans());
    let a = agent("granted");
    create_funded(&engine, &a, "default", 100).await;
    let grant = issue(&engine, &a, 40, "g").await;
    push_out(&engine, "1").await;
    wait_for("the grant in the index", || {
        indexed(&storage) == [(a.clone(), grant.seq, EXPIRES_AT_MS)]
    })
    .await;
    let loaded = engine.metrics().agents_loaded_total.get();

    // Exactly at the expiry (due from `expires_at` on); from here on, no command of its own.
    clock.set(EXPIRES_AT_MS);
    wait_journal(&engine, &a, "no GrantExpired", |j| !expiries(j).is_empty()).await;
    assert!(
        engine.metrics().agents_loaded_total.get() > loaded,
        "the agent was out of memory, and the sweep loaded it"
    );
    wait_for("the key removed after the poke", || {
        indexed(&storage).is_empty()
    })
    .await;
    assert!(engine.metrics().grant_sweep_pokes_total.get() >= 1);

    let journal = engine.journal(&a, 0, usize::MAX).await.expect("reads");
    let expired = expiries(&journal);
    assert_eq!(expired.len(), 1, "{journal:?}");
    assert_eq!(
        expired[0].kind,
        EventKind::GrantExpired {
            grant_id: grant.seq,
            expired_micros: 40,
        }
    );
    assert_eq!(expired[0].at_ms, EXPIRES_AT_MS);
    let after = engine.agent(&a).await.expect("reads").expect("exists");
    assert!(
        !after.grants.contains_key(&grant.seq),
        "GET shows no grant: {after:?}"
    );
    assert_eq!(
        (after.balance_micros, after.expired_total_micros),
        (100, 40)
    );
    after.check_invariants().expect("invariants hold");
    close(engine, storage).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_the_agent_expired_itself_is_not_expired_again_by_the_sweep() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(T0_MS));
    let (engine, storage) = open_kept(dir.path(), &clock, plans());
    let a = agent("spender");
    create_funded(&engine, &a, "default", 100).await;
    let grant = issue(&engine, &a, 40, "g").await;
    wait_for("the key in the index", || indexed(&storage).len() == 1).await;
    // Spends before the expiry (from the grant or not, the sweep must not care)...
    clock.set(EXPIRES_AT_MS - 1);
    debit_each(&engine, &a, 0..3).await;
    push_out(&engine, "1").await;
    // ...and at it: the debit journals the expiry ahead of itself.
    clock.set(EXPIRES_AT_MS);
    debit_each(&engine, &a, 3..5).await;
    push_out(&engine, "2").await;
    let before = engine.journal(&a, 0, usize::MAX).await.expect("reads");
    assert_eq!(expiries(&before).len(), 1, "{before:?}");

    // The sweep comes by, pokes once, writes nothing and drops the key.
    clock.set(EXPIRES_AT_MS + 1_000);
    wait_for("the key removed after the poke", || {
        indexed(&storage).is_empty()
    })
    .await;
    assert!(engine.metrics().grant_sweep_pokes_total.get() >= 1);
    let journal = engine.journal(&a, 0, usize::MAX).await.expect("reads");
    assert_eq!(journal, before, "the poke journaled nothing");
    let after = engine.agent(&a).await.expect("reads").expect("exists");
    assert!(!after.grants.contains_key(&grant.seq));
    assert_eq!(
        after.balance_micros + after.held_micros,
        100 + 40 - 5 - after.expired_total_micros
    );
    after.check_invariants().expect("invariants hold");
    close(engine, storage).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_out_grant_costs_one_poke_and_no_journal_entry() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(T0_MS));
    let (engine, storage) = open_kept(dir.path(), &clock, plans());
    let a = agent("spent");
    approve(&engine, cmd(&a, create("default"), "c")).await;
    issue(&engine, &a, 40, "g").await;
    approve(
        &engine,
        cmd(&a, CommandKind::Debit { amount_micros: 40 }, "d"),
    )
    .await;
    push_out(&engine, "1").await;
    wait_for("the key in the index", || indexed(&storage).len() == 1).await;
    let before = engine.journal(&a, 0, usize::MAX).await.expect("reads");

    clock.set(EXPIRES_AT_MS);
    wait_for("the key removed after its poke", || {
        indexed(&storage).is_empty()
    })
    .await;
    assert!(engine.metrics().grant_sweep_pokes_total.get() >= 1);
    let journal = engine.journal(&a, 0, usize::MAX).await.expect("reads");
    assert_eq!(journal, before, "nothing to expire, nothing journaled");
    close(engine, storage).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_before_the_expiry_the_sweep_still_expires_the_grant() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(T0_MS));
    let (engine, storage) = open_kept(dir.path(), &clock, plans());
    let a = agent("restarted");
    create_funded(&engine, &a, "default", 100).await;
    let grant = issue(&engine, &a, 40, "g").await;
    close(engine, storage).await;

    // Reopened: nothing loads the agent (no open hold), and nothing asks for it.
    let (engine, storage) = open_kept(dir.path(), &clock, plans());
    assert_eq!(indexed(&storage), [(a.clone(), grant.seq, EXPIRES_AT_MS)]);
    clock.set(EXPIRES_AT_MS + 500);
    wait_journal(&engine, &a, "no GrantExpired", |j| expiries(j).len() == 1).await;
    wait_for("the key removed", || indexed(&storage).is_empty()).await;
    let after = engine.agent(&a).await.expect("reads").expect("exists");
    assert!(!after.grants.contains_key(&grant.seq));
    assert_eq!(after.balance_micros, 100);
    after.check_invariants().expect("invariants hold");
    close(engine, storage).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poke_that_fails_leaves_the_key_for_a_later_pass() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(T0_MS));
    let with_promo = || {
        let mut book: Vec<Plan> = plans().iter().cloned().collect();
        book.push(Plan::unlimited(PlanName::new("promo").expect("valid")));
        PlanBook::new(book)
    };
    let (engine, storage) = open_kept(dir.path(), &clock, with_promo());
    let a = agent("planless");
    approve(&engine, cmd(&a, create("promo"), "c")).await;
    let grant = issue(&engine, &a, 40, "g").await;
    close(engine, storage).await;

    // The plan left the config: the core rejects the agent's commands, the poke included.
    let (engine, storage) = open_kept(dir.path(), &clock, plans());
    clock.set(EXPIRES_AT_MS);
    wait_for("a failed poke", || {
        engine.metrics().grant_sweep_pokes_failed_total.get() >= 1
    })
    .await;
    assert_eq!(
        indexed(&storage),
        [(a.clone(), grant.seq, EXPIRES_AT_MS)],
        "the key of a failed poke stays"
    );
    close(engine, storage).await;

    // Back with its plan, the next run's sweep expires it.
    let (engine, storage) = open_kept(dir.path(), &clock, with_promo());
    clock.set(EXPIRES_AT_MS + 1_000);
    wait_journal(&engine, &a, "no GrantExpired", |j| expiries(j).len() == 1).await;
    wait_for("the key removed", || indexed(&storage).is_empty()).await;
    close(engine, storage).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warning_is_journaled_at_its_time_for_an_agent_out_of_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(T0_MS));
    const WITHIN_MS: u64 = 30_000;
    // Another plan warns earlier, so the sweep looks 50 s ahead and pokes our agent 20 s
    // before its own warning is due: its shard must keep it until then.
    let warned_plans = || {
        let mut book: Vec<Plan> = plans().iter().cloned().collect();
        for (name, within_ms) in [("warn-30", WITHIN_MS), ("warn-50", 50_000)] {
            let mut plan = Plan::unlimited(PlanName::new(name).expect("valid"));
            plan.thresholds = Thresholds {
                grant_expiring_within_ms: Some(within_ms),
                ..Thresholds::default()
            };
            book.push(plan);
        }
        PlanBook::new(book)
    };
    let (engine, storage) = open_kept(dir.path(), &clock, warned_plans());
    let a = agent("warned");
    create_funded(&engine, &a, "warn-30", 100).await;
    let grant = issue(&engine, &a, 40, "g").await;
    close(engine, storage).await;

    let (engine, storage) = open_kept(dir.path(), &clock, warned_plans());
    // Opened at T0, the sweep's window (up to T0 + 50 s) does not reach the grant; 11 s on
    // it does, and the agent is poked 19 s before its warning is due.
    clock.set(T0_MS + 11_000);
    wait_for("the early poke", || {
        engine.metrics().grant_sweep_pokes_total.get() >= 1
    })
    .await;
    push_out(&engine, "1").await;
    let journal = engine.journal(&a, 0, usize::MAX).await.expect("reads");
    assert!(crossings(&journal).is_empty(), "not due yet: {journal:?}");

    // Its time: no command of its own, and the sweep's window is past its grant already.
    clock.set(EXPIRES_AT_MS - WITHIN_MS);
    wait_journal(&engine, &a, "no warning", |j| !crossings(j).is_empty()).await;
    push_out(&engine, "2").await;
    clock.set(EXPIRES_AT_MS);
    wait_journal(&engine, &a, "no GrantExpired", |j| expiries(j).len() == 1).await;
    let journal = engine.journal(&a, 0, usize::MAX).await.expect("reads");
    assert_eq!(
        crossings(&journal),
        [Crossing::GrantExpiring {
            grant_id: grant.seq,
            expires_at_ms: EXPIRES_AT_MS,
            remaining_micros: 40,
            within_ms: WITHIN_MS,
        }],
        "warned once, at its time: {journal:?}"
    );
    let warned = journal
        .iter()
        .find(|e| matches!(e.kind, EventKind::ThresholdCrossed { .. }))
        .expect("a warning");
    assert_eq!(warned.at_ms, EXPIRES_AT_MS - WITHIN_MS);
    close(engine, storage).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_without_the_index_gets_it_back_at_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(T0_MS));
    let (engine, storage) = open_kept(dir.path(), &clock, plans());
    let a = agent("older");
    create_funded(&engine, &a, "default", 100).await;
    let grant = issue(&engine, &a, 40, "g").await;
    close(engine, storage).await;

    // What a build before the index left: no `e/` keys and no `m/grant_expiries`.
    {
        let db = sled::open(dir.path()).expect("sled opens");
        let mut removed = 0;
        for item in db.scan_prefix(b"e/") {
            let (key, _) = item.expect("reads");
            db.remove(key).expect("removes");
            removed += 1;
        }
        assert_eq!(removed, 1, "the grant was indexed");
        assert!(db.remove(b"m/grant_expiries").expect("removes").is_some());
        db.flush().expect("flushes");
    }

    let (engine, storage) = open_kept(dir.path(), &clock, plans());
    assert!(storage.grant_expiries_complete().expect("reads"));
    assert_eq!(indexed(&storage), [(a.clone(), grant.seq, EXPIRES_AT_MS)]);
    clock.set(EXPIRES_AT_MS);
    wait_journal(&engine, &a, "no GrantExpired", |j| expiries(j).len() == 1).await;
    let after = engine.agent(&a).await.expect("reads").expect("exists");
    assert_eq!(after.balance_micros, 100);
    close(engine, storage).await;
}
