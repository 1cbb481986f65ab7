//! Concurrent overdraw: many tasks race to empty one agent; the ledger never lets the sum
//! of approved debits exceed what was credited, and the balance ends at exactly zero.

mod common;

use std::sync::Arc;

use common::*;
use rand::{Rng, SeedableRng};
use tally_core::{CommandKind, Denial, Outcome};
use tally_store::{ManualClock, Reply};

const TASKS: usize = 64;
const CREDIT_MICROS: u64 = 200_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_tasks_never_overdraw() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(T0_MS));
    let engine = open(dir.path(), &clock);
    let a = agent("target");
    create_funded(&engine, &a, "default", CREDIT_MICROS).await;
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let engine = engine.clone();
        let a = a.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(t as u64);
            let mut approved_micros = 0u64;
            let mut last_balance = u64::MAX;
            for i in 0.. {
                let amount = rng.gen_range(1..=1_000);
                let c = cmd(
                    &a,
                    CommandKind::Debit {
                        amount_micros: amount,
                    },
                    &format!("t{t}-{i}"),
                );
                match engine.submit(c).await.expect("submits") {
                    Reply::Decided {
                        outcome: Outcome::Approved(r),
                        ..
                    } => {
                        approved_micros += amount;
                        assert!(r.balance_after_micros <= CREDIT_MICROS);
                        last_balance = last_balance.min(r.balance_after_micros);
                    }
                    Reply::Decided {
                        outcome:
                            Outcome::Denied(Denial::InsufficientFunds {
                                available_micros, ..
                            }),
                        ..
                    } => {
                        assert!(
                            available_micros < amount,
                            "denied although {available_micros} covers {amount}"
                        );
                        if available_micros == 0 {
                            break;
                        }
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
            approved_micros
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("task finishes");
    }
    assert_eq!(total, CREDIT_MICROS, "every micro spent exactly once");
    let state = engine.agent(&a).await.expect("reads").expect("exists");
    assert_eq!(state.balance_micros, 0);
    assert_eq!(state.debited_total_micros, CREDIT_MICROS);
    state.check_invariants().expect("invariants hold");
    // The journal agrees: balances only go down, never below zero, and sum to the credit.
    let journal = engine.journal(&a, 0, 100_000).await.expect("reads");
    let debited: u64 = journal
        .iter()
        .filter_map(|e| match e.kind {
            tally_core::EventKind::Debited { amount_micros, .. } => Some(amount_micros),
            _ => None,
        })
        .sum();
    assert_eq!(debited, CREDIT_MICROS);
    assert!(journal
        .windows(2)
        .skip(2)
        .all(|w| w[1].balance_after_micros <= w[0].balance_after_micros));
    engine.shutdown().await.expect("shuts down");
}
