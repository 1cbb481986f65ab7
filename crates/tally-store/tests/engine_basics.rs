//! The engine end to end on a real sled store: decisions, idempotency, restarts.

mod common;

use std::sync::Arc;

use common::*;
use tally_core::{CommandError, CommandKind, Denial, Outcome, PeriodKey, PlanBook};
use tally_store::{ManualClock, Reply};

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
    for i in 0..50 {
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
    copy_dir(dir.path(), dir2.path());
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

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    for entry in std::fs::read_dir(from).expect("reads dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            std::fs::create_dir_all(&target).expect("mkdir");
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copies");
        }
    }
}

#[tokio::test]
async fn idempotency_index_stays_within_its_key_bound() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(T0_MS));
    let mut c = config(dir.path());
    c.shards = 1;
    c.idempotency_keys_max = 10;
    let engine = tally_store::Engine::open(c, plans(), clock.clone(), None).expect("opens");
    let a = agent("a");
    create_funded(&engine, &a, "default", 1_000_000).await;
    for i in 0..100 {
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
    // The shard reports its index size when it commits; a read goes through the same path.
    engine.agent(&a).await.expect("reads");
    let m = engine.metrics();
    assert_eq!(m.idempotency_records.get(), 10);
    assert_eq!(m.idempotency_evicted_early_total.get(), 102 - 10);
    // The newest keys still replay...
    let replay = engine
        .submit(cmd(&a, CommandKind::Debit { amount_micros: 1 }, "d99"))
        .await
        .expect("submits");
    assert!(matches!(replay, Reply::Decided { replayed: true, .. }));
    // ...the oldest were forgotten early: that is the documented cost of the bound.
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
