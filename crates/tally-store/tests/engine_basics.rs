//! The engine end to end on a real sled store: decisions, idempotency, restarts.

mod common;

use std::sync::Arc;

use common::*;
use tally_core::{
    AgentId, CommandError, CommandKind, Denial, GrantCategory, GrantTerms, Outcome, PeriodKey,
    PlanBook,
};
use tally_store::{Engine, ManualClock, Reply};

#[tokio::test]
async fn debit_replay_conflict_and_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(T0_MS));
    let a = agent("agent-1");
    let engine = open(dir.path(), &clock);
    approve(&engine, cmd(&a, create("default"), "c1")).await;
    approve(
        &engine,
        cmd(
            &a,
            CommandKind::Credit {
                amount_micros: 1_000,
            },
            "t1",
        ),
    )
    .await;
    let debit = cmd(&a, CommandKind::Debit { amount_micros: 300 }, "d1");
    let first = approve(&engine, debit.clone()).await;
    assert_eq!(first.balance_after_micros, 700);
    assert_eq!(first.first_seq, 3);

    // Same key, same request: the stored outcome again, nothing charged.
    let again = engine.submit(debit.clone()).await.expect("submits");
    assert_eq!(
        again,
        Reply::Decided {
            outcome: Outcome::Approved(first),
            rate: None,
            replayed: true
        }
    );
    // Same key, different request: refused, nothing charged.
    let reused = engine
        .submit(cmd(&a, CommandKind::Debit { amount_micros: 301 }, "d1"))
        .await
        .expect("submits");
    assert_eq!(reused, Reply::KeyReused);
    // A denial is not stored under its key: the same key succeeds after a top-up.
    let big = cmd(
        &a,
        CommandKind::Debit {
            amount_micros: 5_000,
        },
        "d2",
    );
    match engine.submit(big.clone()).await.expect("submits") {
        Reply::Decided {
            outcome:
                Outcome::Denied(Denial::InsufficientFunds {
                    required_micros: 5_000,
                    available_micros: 700,
                    ..
                }),
            ..
        } => {}
        other => panic!("expected 402, got {other:?}"),
    }
    approve(
        &engine,
        cmd(
            &a,
            CommandKind::Credit {
                amount_micros: 10_000,
            },
            "t2",
        ),
    )
    .await;
    let later = approve(&engine, big.clone()).await;
    assert_eq!(later.balance_after_micros, 10_700 - 5_000);
    // Malformed for the state: rejected, not stored.
    assert_eq!(
        engine
            .submit(cmd(
                &a,
                CommandKind::Refund {
                    debit_seq: 3,
                    amount_micros: 301
                },
                "r1"
            ))
            .await
            .expect("submits"),
        Reply::Rejected(CommandError::RefundExceedsDebit {
            amount_micros: 301,
            refundable_micros: 300
        })
    );
    let before = engine.agent(&a).await.expect("reads").expect("exists");
    engine.shutdown().await.expect("shuts down");
    drop(engine);

    let engine = open(dir.path(), &clock);
    let after = engine.agent(&a).await.expect("reads").expect("exists");
    assert_eq!(after, before, "recovery rebuilds the acknowledged state");
    // Keys survive the restart.
    match engine.submit(debit).await.expect("submits") {
        Reply::Decided {
            outcome: Outcome::Approved(r),
            replayed: true,
            ..
        } => assert_eq!(r, first),
        other => panic!("expected a replay after restart, got {other:?}"),
    }
    let journal = engine.journal(&a, 0, 100).await.expect("reads");
    assert_eq!(journal.len() as u64, after.last_seq);
    assert_eq!(
        journal.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=after.last_seq).collect::<Vec<_>>()
    );
    let usage = engine
        .usage(&a, "2026-11".parse::<PeriodKey>().expect("valid"))
        .await
        .expect("reads")
        .expect("exists");
    assert_eq!(usage.spent_micros, 5_300);
    assert_eq!(usage.debits, 2);
    assert_eq!(usage.credited_micros, 11_000);
    engine.shutdown().await.expect("shuts down");
}

#[tokio::test]
async fn recovery_without_clean_shutdown_replays_the_journal_tail() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(T0_MS));
    let a = agent("a");
    let engine = open(dir.path(), &clock);
    create_funded(&engine, &a, "default", 100).await;
    debit_each(&engine, &a, 0..50).await;
    let hold = approve(
        &engine,
        cmd(
            &a,
            CommandKind::Hold {
                amount_micros: 10,
                ttl_ms: 60_000,
            },
            "h",
        ),
    )
    .await;
    assert_eq!(hold.hold_expires_at_ms, Some(T0_MS + 60_000));
    let before = engine.agent(&a).await.expect("reads").expect("exists");
    // No shutdown: the checkpoint is the one from creation; everything after is journal.
    std::mem::forget(engine);
    let dir2 = tempfile::tempdir().expect("tempdir");
    common::copy_dir(dir.path(), dir2.path());
    let engine = open(dir2.path(), &clock);
    assert_eq!(
        engine.agent(&a).await.expect("reads").expect("exists"),
        before
    );
    // The hold keeps its expiry across the restart and expires on time.
    clock.set(T0_MS + 60_000);
    match engine
        .submit(cmd(&a, CommandKind::Debit { amount_micros: 50 }, "late"))
        .await
        .expect("submits")
    {
        Reply::Decided {
            outcome: Outcome::Approved(r),
            ..
        } => {
            assert_eq!(
                r.balance_after_micros, 0,
                "the expired hold's 10 came back before the debit"
            );
        }
        other => panic!("expected approval, got {other:?}"),
    }
    engine.shutdown().await.expect("shuts down");
}

/// The 24 h window is time, not memory: with only 1,000 keys held in memory, keys a
/// hundred thousand requests old still replay after a restart, from the index on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_outlive_the_memory_bound_and_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(T0_MS));
    let mut c = config(dir.path());
    c.idempotency_memory_keys_max = 1_000;
    let agents: Vec<AgentId> = (0..8).map(|i| agent(&format!("a{i}"))).collect();
    let debit = |i: u64| CommandKind::Debit {
        amount_micros: 1 + i % 7,
    };
    let total: u64 = (0..100_000).map(|i| 1 + i % 7).sum();
    let engine = Engine::open(c.clone(), plans(), clock.clone(), None).expect("opens");
    for a in &agents {
        create_funded(&engine, a, "default", total).await;
    }
    let mut tasks = Vec::new();
    for t in 0..16u64 {
        let engine = engine.clone();
        let agents = agents.clone();
        tasks.push(tokio::spawn(async move {
            let mut first_receipts = Vec::new();
            for i in (t..100_000).step_by(16) {
                let a = &agents[(i % 8) as usize];
                let receipt = approve(&engine, cmd(a, debit(i), &format!("d{i}"))).await;
                if i < 1_000 {
                    first_receipts.push((i, receipt));
                }
            }
            first_receipts
        }));
    }
    let mut receipts = std::collections::BTreeMap::new();
    for t in tasks {
        receipts.extend(t.await.expect("joins"));
    }
    // Time moves on (an hour), so the keys are in finished hours of the index.
    clock.set(T0_MS + 3_600_000);
    engine.shutdown().await.expect("shuts down");
    drop(engine);
    let engine = Engine::open(c, plans(), clock.clone(), None).expect("reopens");
    let balances_before: Vec<u64> = {
        let mut b = Vec::new();
        for a in &agents {
            b.push(
                engine
                    .agent(a)
                    .await
                    .expect("reads")
                    .expect("exists")
                    .balance_micros,
            );
        }
        b
    };
    for i in 0..1_000u64 {
        let a = &agents[(i % 8) as usize];
        let reply = engine
            .submit(cmd(a, debit(i), &format!("d{i}")))
            .await
            .expect("submits");
        match reply {
            Reply::Decided {
                outcome: Outcome::Approved(r),
                replayed: true,
                ..
            } => assert_eq!(r, receipts[&i], "key d{i} replays the receipt it answered"),
            other => panic!("key d{i} was not replayed: {other:?}"),
        }
    }
    let other_body = engine
        .submit(cmd(
            &agents[0],
            CommandKind::Debit { amount_micros: 99 },
            "d0",
        ))
        .await
        .expect("submits");
    assert_eq!(other_body, Reply::KeyReused);
    for (a, before) in agents.iter().zip(balances_before) {
        let after = engine
            .agent(a)
            .await
            .expect("reads")
            .expect("exists")
            .balance_micros;
        assert_eq!(after, before, "retries charged nothing to {a}");
    }
    let status = engine.key_index_status();
    assert!(status.keys_on_disk >= 100_000, "{status:?}");
    assert_eq!(status.window_ms, status.retention_ms, "nothing was cut");
    assert!(
        engine.metrics().idempotency_records.get() <= 1_000,
        "memory holds at most the bound"
    );
    engine.shutdown().await.expect("shuts down");
}

/// The disk bound on keys: past it the oldest hours go, and the shorter window is said.
#[tokio::test]
async fn the_key_disk_bound_cuts_the_window_and_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(T0_MS));
    let mut c = config(dir.path());
    c.shards = 1;
    c.idempotency_memory_keys_max = 10;
    c.idempotency_keys_max = 30;
    let engine = Engine::open(c, plans(), clock.clone(), None).expect("opens");
    let a = agent("a");
    create_funded(&engine, &a, "default", 1_000_000).await;
    // Ten keyed debits in each of four hours: 42 keys with the create and the credit.
    for i in 0..40u64 {
        clock.set(T0_MS + (i / 10) * 3_600_000 + i);
        approve(
            &engine,
            cmd(
                &a,
                CommandKind::Debit { amount_micros: 1 },
                &format!("d{i}"),
            ),
        )
        .await;
    }
    let started = std::time::Instant::now();
    let status = loop {
        let status = engine.key_index_status();
        if status.window_ms < status.retention_ms && status.keys_on_disk <= 30 {
            break status;
        }
        assert!(started.elapsed().as_secs() < 20, "no cut: {status:?}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert!(status.evicted_early >= 12, "{status:?}");
    assert_eq!(
        engine.metrics().idempotency_evicted_early_total.get(),
        status.evicted_early
    );
    // A key of the newest hour still replays; one of the hour that was dropped does not.
    let replay = engine
        .submit(cmd(&a, CommandKind::Debit { amount_micros: 1 }, "d39"))
        .await
        .expect("submits");
    assert!(matches!(replay, Reply::Decided { replayed: true, .. }));
    let forgotten = engine
        .submit(cmd(&a, CommandKind::Debit { amount_micros: 1 }, "d0"))
        .await
        .expect("submits");
    assert!(matches!(
        forgotten,
        Reply::Decided {
            replayed: false,
            ..
        }
    ));
    engine.shutdown().await.expect("shuts down");
}

#[tokio::test]
async fn keys_expire_with_the_retention_window_and_the_window_survives_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(T0_MS));
    let a = agent("a");
    let engine = open(dir.path(), &clock);
    create_funded(&engine, &a, "default", 100).await;
    let d = cmd(&a, CommandKind::Debit { amount_micros: 1 }, "d");
    approve(&engine, d.clone()).await;
    engine.shutdown().await.expect("shuts down");
    drop(engine);
    // Just inside the 24 h window after a restart: still a replay.
    clock.set(T0_MS + 24 * 3_600_000 - 1);
    let engine = open(dir.path(), &clock);
    assert!(matches!(
        engine.submit(d.clone()).await.expect("submits"),
        Reply::Decided { replayed: true, .. }
    ));
    engine.shutdown().await.expect("shuts down");
    drop(engine);
    // At the end of the window the key is forgotten and the same request is new.
    clock.set(T0_MS + 24 * 3_600_000);
    let engine = open(dir.path(), &clock);
    let again = approve(&engine, d).await;
    assert_eq!(again.balance_after_micros, 98);
    engine.shutdown().await.expect("shuts down");
}

#[tokio::test]
async fn usage_after_a_later_anchor_day_counts_the_whole_period() {
    // 2027-01-10T12:00:00Z: mid-January under anchor day 1.
    const JAN_10_2027_NOON: u64 = 1_799_582_400_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(JAN_10_2027_NOON));
    let a = agent("agent-1");
    let engine = open(dir.path(), &clock);
    create_funded(&engine, &a, "capped", 10_000).await;
    approve(
        &engine,
        cmd(&a, CommandKind::Debit { amount_micros: 600 }, "d1"),
    )
    .await;
    engine.shutdown().await.expect("shuts down");
    drop(engine);

    // Restarted with `capped` starting its periods on the 28th: the January period the
    // agent spends in now runs to Feb 28, and began with the debit of Jan 10.
    let anchored_28 = PlanBook::new(plans().iter().cloned().map(|mut p| {
        p.anchor_day = 28;
        p
    }));
    let engine = open_with(dir.path(), &clock, anchored_28);
    approve(
        &engine,
        cmd(&a, CommandKind::Debit { amount_micros: 300 }, "d2"),
    )
    .await;
    let usage = engine
        .usage(&a, "2027-01".parse::<PeriodKey>().expect("valid"))
        .await
        .expect("reads")
        .expect("exists");
    assert_eq!(usage.spent_micros, 900, "both debits are January's");
    assert_eq!(usage.debits, 2);
    engine.shutdown().await.expect("shuts down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_cache_of_two_records_agents_page_in_order_and_keep_their_money() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(T0_MS));
    let mut cfg = config(dir.path());
    cfg.agents_cached_max = 2;
    let engine = Engine::open(cfg, plans(), clock.clone(), None).expect("engine opens");
    let ids: Vec<_> = (0..10).map(|i| agent(&format!("paged-{i:02}"))).collect();
    for (i, a) in ids.iter().enumerate() {
        create_funded(&engine, a, "default", 100 + i as u64).await;
    }
    let mut listed = Vec::new();
    let mut after = None;
    loop {
        let page = engine.list_agents(after.as_ref(), 3).await.expect("lists");
        assert!(page.agents.len() <= 3);
        listed.extend(page.agents);
        match page.next_after {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    let got: Vec<_> = listed
        .iter()
        .map(|a| (a.id.clone(), a.balance_micros))
        .collect();
    let want: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, a)| (a.clone(), 100 + i as u64))
        .collect();
    assert_eq!(got, want);
    assert!(engine.metrics().agents_evicted_total.get() > 0);
    assert!(engine.metrics().agents_loaded_total.get() > 0);
    assert_eq!(engine.metrics().agents.get(), 10);
    engine.shutdown().await.expect("shuts down");
}

#[tokio::test]
async fn usage_splits_spend_refunds_and_credits_by_grant_category_per_period() {
    const JAN_10_2027_NOON: u64 = 1_799_582_400_000;
    const FEB_1_2027: u64 = 1_801_440_000_000;
    const DAY_MS: u64 = 86_400_000;
    const FEB_5_2027: u64 = FEB_1_2027 + 4 * DAY_MS;
    const FEB_10_2027: u64 = FEB_1_2027 + 9 * DAY_MS;
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(JAN_10_2027_NOON));
    let a = agent("agent-1");
    let engine = open(dir.path(), &clock);
    let grant = |amount_micros, expires_at_ms, category| CommandKind::IssueGrant {
        amount_micros,
        terms: GrantTerms {
            expires_at_ms,
            priority: 10,
            category,
        },
    };
    let debit = |amount_micros| CommandKind::Debit { amount_micros };
    let refund = |debit_seq, amount_micros| CommandKind::Refund {
        debit_seq,
        amount_micros,
    };
    create_funded(&engine, &a, "default", 1_000).await;
    let promo = GrantCategory::Promotional;
    approve(&engine, cmd(&a, grant(300, None, promo), "g1")).await;
    let d1 = approve(&engine, cmd(&a, debit(200), "d1")).await;
    // 100 promotional (what is left of the grant) and 150 paid.
    let d2 = approve(&engine, cmd(&a, debit(250), "d2")).await;
    // A refund returns from the last draw back: all 50 paid.
    approve(&engine, cmd(&a, refund(d2.first_seq, 50), "r1")).await;
    approve(&engine, cmd(&a, grant(100, Some(FEB_5_2027), promo), "g2")).await;

    // February: the second grant expired unspent (journaled ahead of the next debit);
    // a refund of January's promotional debit counts in January.
    clock.set(FEB_10_2027);
    approve(&engine, cmd(&a, debit(10), "d3")).await;
    approve(&engine, cmd(&a, refund(d1.first_seq, 20), "r2")).await;

    let jan: PeriodKey = "2027-01".parse().expect("valid");
    let feb: PeriodKey = "2027-02".parse().expect("valid");
    check_usage_by_category(&engine, &a, jan, feb).await;
    engine.shutdown().await.expect("shuts down");
    drop(engine);
    let engine = open(dir.path(), &clock);
    check_usage_by_category(&engine, &a, jan, feb).await;
    engine.shutdown().await.expect("shuts down");
}

async fn check_usage_by_category(engine: &Engine, a: &AgentId, jan: PeriodKey, feb: PeriodKey) {
    let u = engine.usage(a, jan).await.expect("reads").expect("exists");
    assert_eq!((u.spent_micros, u.spent_promotional_micros), (450, 300));
    assert_eq!((u.refunded_micros, u.refunded_promotional_micros), (70, 20));
    assert_eq!(
        (u.credited_micros, u.credited_promotional_micros),
        (1_400, 400)
    );
    assert_eq!(u.expired_micros, 0);
    let u = engine.usage(a, feb).await.expect("reads").expect("exists");
    assert_eq!((u.spent_micros, u.spent_promotional_micros), (10, 0));
    assert_eq!((u.refunded_micros, u.credited_micros), (0, 0));
    assert_eq!(u.expired_micros, 100);
}
