//! The background hold sweep (`hold_sweep_interval_ms`): a hold whose agent receives no
//! command at all still expires, by the shard's idle sweep alone, and the expiry is in the
//! journal. Time is a `ManualClock`; the only real wait is for the shard thread's idle tick.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tally_core::{CommandKind, EventKind};
use tally_store::{Engine, ManualClock};

/// How long the shard thread may take to wake and sweep (its idle tick is 50 ms).
const SWEEP_WAIT_MAX: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_hold_is_released_by_the_sweep_without_any_command() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(T0_MS));
    let mut cfg = config(dir.path());
    cfg.hold_sweep_interval_ms = 1_000;
    let engine = Engine::open(cfg, plans(), clock.clone(), None).expect("engine opens");
    let a = agent("swept");
    create_funded(&engine, &a, "default", 100).await;
    let hold = approve(
        &engine,
        cmd(
            &a,
            CommandKind::Hold {
                amount_micros: 30,
                ttl_ms: 60_000,
            },
            "h",
        ),
    )
    .await;
    let held = engine.agent(&a).await.expect("reads").expect("exists");
    assert_eq!((held.balance_micros, held.held_micros), (70, 30));

    // Past the hold's expiry and past a sweep interval; from here on, only reads.
    clock.set(T0_MS + 60_000 + 1_000);
    let deadline = Instant::now() + SWEEP_WAIT_MAX;
    let expired = loop {
        let journal = engine.journal(&a, 0, usize::MAX).await.expect("reads");
        if let Some(e) = journal.iter().find(|e| {
            matches!(
                e.kind,
                EventKind::HoldExpired { hold_seq, .. } if hold_seq == hold.first_seq
            )
        }) {
            break e.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no HoldExpired for hold {} within {SWEEP_WAIT_MAX:?} of the clock passing its \
             expiry; journal: {journal:?}",
            hold.first_seq
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(
        expired.kind,
        EventKind::HoldExpired {
            hold_seq: hold.first_seq,
            released_micros: 30,
        }
    );
    assert!(
        expired.idempotency_key.is_none(),
        "written by the sweep, not by a command"
    );
    let after = engine.agent(&a).await.expect("reads").expect("exists");
    assert_eq!(
        (after.balance_micros, after.held_micros),
        (100, 0),
        "the sweep gave the held 30 back"
    );
    after.check_invariants().expect("invariants hold");
    engine.shutdown().await.expect("shuts down");
}

/// Waits for the sweep to journal the expiry of `hold_seq`, reading only the journal (a
/// read of the agent would load it into its shard and hide a hold the sweep cannot see).
async fn wait_expired(engine: &Engine, a: &tally_core::AgentId, hold_seq: u64) {
    let deadline = Instant::now() + SWEEP_WAIT_MAX;
    loop {
        let journal = engine.journal(a, 0, usize::MAX).await.expect("reads");
        if journal
            .iter()
            .any(|e| matches!(e.kind, EventKind::HoldExpired { hold_seq: s, .. } if s == hold_seq))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no HoldExpired for hold {hold_seq} of {a} within {SWEEP_WAIT_MAX:?}; journal: {journal:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_cache_of_two_records_a_hold_is_swept_before_and_after_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(T0_MS));
    let open = || {
        let mut cfg = config(dir.path());
        cfg.hold_sweep_interval_ms = 1_000;
        cfg.agents_cached_max = 2;
        Engine::open(cfg, plans(), clock.clone(), None).expect("engine opens")
    };
    let engine = open();
    let (first, second) = (agent("held-1"), agent("held-2"));
    let mut holds = Vec::new();
    for (a, ttl_ms) in [(&first, 60_000), (&second, 120_000)] {
        create_funded(&engine, a, "default", 100).await;
        let hold = CommandKind::Hold {
            amount_micros: 30,
            ttl_ms,
        };
        holds.push(approve(&engine, cmd(a, hold, "h")).await.first_seq);
    }
    // Many more agents than the cache holds pass through both shards.
    for i in 0..24 {
        create_funded(&engine, &agent(&format!("other-{i}")), "default", 10).await;
    }
    assert!(
        engine.metrics().agents_evicted_total.get() > 0,
        "records left memory"
    );
    clock.set(T0_MS + 61_000);
    wait_expired(&engine, &first, holds[0]).await;

    // Reopened, the store still knows which agent has an open hold.
    engine.shutdown().await.expect("shuts down");
    drop(engine);
    let engine = open();
    clock.set(T0_MS + 121_000);
    wait_expired(&engine, &second, holds[1]).await;
    for a in [&first, &second] {
        let after = engine.agent(a).await.expect("reads").expect("exists");
        assert_eq!((after.balance_micros, after.held_micros), (100, 0), "{a}");
        after.check_invariants().expect("invariants hold");
    }
    assert_eq!(engine.metrics().open_holds.get(), 0);
    engine.shutdown().await.expect("shuts down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_grant_leaves_the_balance_by_the_sweep_exactly_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(T0_MS));
    let mut cfg = config(dir.path());
    cfg.hold_sweep_interval_ms = 1_000;
    let engine = Engine::open(cfg, plans(), clock.clone(), None).expect("engine opens");
    let a = agent("granted");
    create_funded(&engine, &a, "default", 100).await;
    let terms = tally_core::GrantTerms {
        expires_at_ms: Some(T0_MS + 60_000),
        priority: 100,
        category: tally_core::GrantCategory::Promotional,
    };
    let grant = approve(
        &engine,
        cmd(
            &a,
            CommandKind::IssueGrant {
                amount_micros: 40,
                terms,
            },
            "g",
        ),
    )
    .await;

    clock.set(T0_MS + 60_000 + 1_000);
    let deadline = Instant::now() + SWEEP_WAIT_MAX;
    loop {
        let journal = engine.journal(&a, 0, usize::MAX).await.expect("reads");
        if journal
            .iter()
            .any(|e| matches!(e.kind, EventKind::GrantExpired { .. }))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no GrantExpired within {SWEEP_WAIT_MAX:?}; journal: {journal:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // More sweeps pass; the grant expired once.
    clock.set(T0_MS + 70_000);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let journal = engine.journal(&a, 0, usize::MAX).await.expect("reads");
    let expiries: Vec<_> = journal
        .iter()
        .filter(|e| matches!(e.kind, EventKind::GrantExpired { .. }))
        .collect();
    assert_eq!(expiries.len(), 1, "{journal:?}");
    assert_eq!(
        expiries[0].kind,
        EventKind::GrantExpired {
            grant_id: grant.seq,
            expired_micros: 40,
        }
    );
    let after = engine.agent(&a).await.expect("reads").expect("exists");
    assert_eq!(
        (after.balance_micros, after.expired_total_micros),
        (100, 40)
    );
    after.check_invariants().expect("invariants hold");
    engine.shutdown().await.expect("shuts down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_about_to_expire_is_warned_about_by_the_sweep_exactly_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(T0_MS));
    let mut cfg = config(dir.path());
    cfg.hold_sweep_interval_ms = 1_000;
    let engine = Engine::open(cfg, plans(), clock.clone(), None).expect("engine opens");
    let a = agent("warned");
    create_funded(&engine, &a, "default", 100).await;
    let thresholds = tally_core::Thresholds {
        balance_below_micros: None,
        cap_spend_percent: None,
        grant_expiring_within_ms: Some(30_000),
    };
    let set = CommandKind::SetThresholds {
        thresholds: Some(thresholds),
    };
    approve(&engine, cmd(&a, set, "thresholds-1")).await;
    let terms = tally_core::GrantTerms {
        expires_at_ms: Some(T0_MS + 60_000),
        priority: 100,
        category: tally_core::GrantCategory::Promotional,
    };
    let issue = CommandKind::IssueGrant {
        amount_micros: 40,
        terms,
    };
    let grant = approve(&engine, cmd(&a, issue, "grant-1")).await;
    // Inside the window, before the expiry; no command for the agent.
    clock.set(T0_MS + 31_000);
    let deadline = Instant::now() + SWEEP_WAIT_MAX;
    loop {
        let journal = engine.journal(&a, 0, usize::MAX).await.expect("reads");
        if !crossings(&journal).is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no warning within {SWEEP_WAIT_MAX:?}; journal: {journal:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // More sweeps pass in the window; it was said once.
    clock.set(T0_MS + 40_000);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let journal = engine.journal(&a, 0, usize::MAX).await.expect("reads");
    assert_eq!(
        crossings(&journal),
        [tally_core::Crossing::GrantExpiring {
            grant_id: grant.seq,
            expires_at_ms: T0_MS + 60_000,
            remaining_micros: 40,
            within_ms: 30_000,
        }],
        "{journal:?}"
    );
    let after = engine.agent(&a).await.expect("reads").expect("exists");
    assert!(after.grants[&grant.seq].expiry_warned);
    after.check_invariants().expect("invariants hold");
    engine.shutdown().await.expect("shuts down");
}
