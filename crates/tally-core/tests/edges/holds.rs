//! Holds and refunds at their bounds: expiry at exactly the TTL, captures above the
//! hold, refunds above the debit, and the 402 wait for expiring holds.

use super::*;

// ---- holds at their TTL -----------------------------------------------------------------

#[test]
fn capture_one_ms_before_expiry_is_allowed() {
    let mut l = Ledger::new("open", T0);
    l.credit(100, T0);
    let hold_seq = l.hold(60, 1_000, T0);
    let expires_at_ms = l.state().holds[&hold_seq].expires_at_ms;
    assert_eq!(expires_at_ms, T0 + 1_000);
    l.approve(
        CommandKind::Capture {
            hold_seq,
            amount_micros: 60,
        },
        expires_at_ms - 1,
    );
    assert_eq!((l.balance(), l.held()), (40, 0));
}

#[test]
fn capture_at_exactly_the_expiry_is_rejected_and_expire_holds_releases_it() {
    let mut l = Ledger::new("open", T0);
    l.credit(100, T0);
    let hold_seq = l.hold(60, 1_000, T0);
    let expires_at_ms = T0 + 1_000;
    assert_eq!(
        l.reject(
            CommandKind::Capture {
                hold_seq,
                amount_micros: 1
            },
            expires_at_ms
        ),
        CommandError::HoldExpired {
            hold_seq,
            expires_at_ms
        }
    );
    // One ms early the sweep finds nothing to expire.
    let early = l
        .run(CommandKind::ExpireHolds, expires_at_ms - 1)
        .expect("sweep");
    assert!(early.events.is_empty());
    assert_eq!((l.balance(), l.held()), (40, 60));
    // At exactly the expiry it releases the hold.
    let sweep = l
        .run(CommandKind::ExpireHolds, expires_at_ms)
        .expect("sweep");
    assert_eq!(sweep.events.len(), 1);
    assert_eq!((l.balance(), l.held()), (100, 0));
    assert!(l.state().holds.is_empty());
    assert_eq!(
        l.reject(
            CommandKind::Capture {
                hold_seq,
                amount_micros: 1
            },
            expires_at_ms
        ),
        CommandError::UnknownHold(hold_seq)
    );
}

#[test]
fn expire_holds_releases_only_the_due_ones_in_seq_order() {
    let mut l = Ledger::new("open", T0);
    l.credit(100, T0);
    let a = l.hold(10, 3_000, T0);
    let b = l.hold(20, 1_000, T0);
    let c = l.hold(30, 2_000, T0);
    let sweep = l.run(CommandKind::ExpireHolds, T0 + 2_000).expect("sweep");
    let seqs: Vec<u64> = sweep.events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, vec![c + 1, c + 2], "dense seqs, one per expired hold");
    assert_eq!(l.state().holds.keys().copied().collect::<Vec<_>>(), vec![a]);
    assert!(!l.state().holds.contains_key(&b) && !l.state().holds.contains_key(&c));
    assert_eq!((l.balance(), l.held()), (90, 10));
}

// ---- captures and refunds past their bounds ----------------------------------------------

#[test]
fn capture_above_the_hold_is_rejected_and_exactly_the_hold_is_fine() {
    let mut l = Ledger::new("open", T0);
    l.credit(100, T0);
    let hold_seq = l.hold(60, 1_000, T0);
    assert_eq!(
        l.reject(
            CommandKind::Capture {
                hold_seq,
                amount_micros: 61
            },
            T0
        ),
        CommandError::CaptureExceedsHold {
            amount_micros: 61,
            held_micros: 60
        }
    );
    assert_eq!((l.balance(), l.held()), (40, 60));
    l.approve(
        CommandKind::Capture {
            hold_seq,
            amount_micros: 60,
        },
        T0,
    );
    assert_eq!((l.balance(), l.held()), (40, 0));
    // A hold is captured once.
    assert_eq!(
        l.reject(
            CommandKind::Capture {
                hold_seq,
                amount_micros: 1
            },
            T0
        ),
        CommandError::UnknownHold(hold_seq)
    );
}

#[test]
fn refund_above_the_debit_is_rejected_and_never_twice_past_it() {
    let mut l = Ledger::new("open", T0);
    l.credit(100, T0);
    let debit_seq = l.debit(100, T0);
    assert_eq!(
        l.reject(
            CommandKind::Refund {
                debit_seq,
                amount_micros: 101
            },
            T0
        ),
        CommandError::RefundExceedsDebit {
            amount_micros: 101,
            refundable_micros: 100
        }
    );
    l.approve(
        CommandKind::Refund {
            debit_seq,
            amount_micros: 60,
        },
        T0,
    );
    // 50 would pass on its own (≤ 100) but not after the first 60.
    assert_eq!(
        l.reject(
            CommandKind::Refund {
                debit_seq,
                amount_micros: 50
            },
            T0
        ),
        CommandError::RefundExceedsDebit {
            amount_micros: 50,
            refundable_micros: 40
        }
    );
    l.approve(
        CommandKind::Refund {
            debit_seq,
            amount_micros: 40,
        },
        T0,
    );
    assert_eq!(
        l.reject(
            CommandKind::Refund {
                debit_seq,
                amount_micros: 1
            },
            T0
        ),
        CommandError::RefundExceedsDebit {
            amount_micros: 1,
            refundable_micros: 0
        }
    );
    assert_eq!(l.balance(), 100);
    assert_eq!(l.state().refunded_total_micros, 100);
}

#[test]
fn refund_of_a_capture_is_bounded_by_what_was_captured() {
    let mut l = Ledger::new("open", T0);
    l.credit(100, T0);
    let hold_seq = l.hold(80, 1_000, T0);
    let capture_seq = l.approve(
        CommandKind::Capture {
            hold_seq,
            amount_micros: 30,
        },
        T0,
    );
    assert_eq!(
        l.reject(
            CommandKind::Refund {
                debit_seq: capture_seq,
                amount_micros: 31
            },
            T0
        ),
        CommandError::RefundExceedsDebit {
            amount_micros: 31,
            refundable_micros: 30
        }
    );
    // The hold itself was never a debit.
    assert_eq!(
        l.reject(
            CommandKind::Refund {
                debit_seq: hold_seq,
                amount_micros: 1
            },
            T0
        ),
        CommandError::UnknownDebit(hold_seq)
    );
}

// ---- 402 retry_after_ms -------------------------------------------------------------------

#[test]
fn insufficient_funds_names_a_wait_only_when_expiring_holds_would_free_enough() {
    let mut l = Ledger::new("open", T0);
    l.credit(100, T0);
    l.hold(30, 5_000, T0); // expires T0 + 5 s
    l.hold(20, 2_000, T0); // expires T0 + 2 s
    assert_eq!(l.balance(), 50);
    let wait = |d: Denial| match d {
        Denial::InsufficientFunds { retry_after_ms, .. } => retry_after_ms,
        other => panic!("expected 402, got {other:?}"),
    };
    // 70 needs the 2-second hold back.
    assert_eq!(wait(l.deny(debit(70), T0)), Some(2_000));
    assert_eq!(wait(l.deny(debit(70), T0 + 500)), Some(1_500));
    // 71 to 100 needs both; the 5-second one frees the last of it.
    assert_eq!(wait(l.deny(debit(71), T0)), Some(5_000));
    assert_eq!(wait(l.deny(debit(100), T0 + 1_000)), Some(4_000));
    // 101 can never pass without a top-up: no Retry-After.
    assert_eq!(wait(l.deny(debit(101), T0)), None);
    // The 402 reports what is available now.
    assert!(matches!(
        l.deny(debit(101), T0),
        Denial::InsufficientFunds {
            required_micros: 101,
            available_micros: 50,
            balance_micros: 50,
            held_micros: 50,
            ..
        }
    ));
    // After the sweep at +2 s the promise is kept: 70 passes.
    l.run(CommandKind::ExpireHolds, T0 + 2_000).expect("sweep");
    l.debit(70, T0 + 2_000);
}

#[test]
fn insufficient_funds_waits_only_for_money_whose_grant_still_lives_then() {
    let mut l = Ledger::new("open", T0);
    // 100 that expires at +3 s, drawn first (earliest expiry), and 50 that never does.
    l.approve(
        CommandKind::IssueGrant {
            amount_micros: 100,
            terms: tally_core::GrantTerms {
                expires_at_ms: Some(T0 + 3_000),
                priority: tally_core::GRANT_PRIORITY_DEFAULT,
                category: tally_core::GrantCategory::Promotional,
            },
        },
        T0,
    );
    l.credit(50, T0);
    l.hold(60, 2_000, T0); // from the expiring grant; back at +2 s, gone at +3 s
    l.hold(40, 5_000, T0); // from the expiring grant; back at +5 s, when it is gone
    l.hold(30, 8_000, T0); // from the plain credit; back at +8 s
    assert_eq!(l.balance(), 20);
    let wait = |d: Denial| match d {
        Denial::InsufficientFunds { retry_after_ms, .. } => retry_after_ms,
        other => panic!("expected 402, got {other:?}"),
    };
    // 80 is there between +2 s and +3 s.
    assert_eq!(wait(l.deny(debit(80), T0)), Some(2_000));
    // 81 never is: the 60 back at +2 s leave at +3 s, the 40 back at +5 s lapse, and the
    // 30 back at +8 s make 50.
    assert_eq!(wait(l.deny(debit(81), T0)), None);
    assert_eq!(wait(l.deny(debit(50), T0 + 3_000)), Some(5_000));
    // The promise holds: at +8 s, with the holds and the grant gone, 50 is left.
    l.run(CommandKind::ExpireHolds, T0 + 8_000).expect("sweep");
    assert_eq!(l.balance(), 50);
    assert_eq!(wait(l.deny(debit(81), T0 + 8_000)), None);
}
