//! Amounts at their edges: exact balance, one micro short, `u64::MAX`, zero, TTL
//! bounds, unknown references, the idempotency envelope of events and extreme clocks.

use super::*;

// ---- funds -------------------------------------------------------------------------

#[test]
fn debit_of_exactly_the_balance_is_approved_and_leaves_zero() {
    let mut l = Ledger::new("open", T0);
    l.credit(100, T0);
    l.debit(100, T0);
    assert_eq!(l.balance(), 0);
    assert_eq!(l.state().debited_total_micros, 100);
}

#[test]
fn debit_one_micro_short_is_a_402_with_no_retry() {
    let mut l = Ledger::new("open", T0);
    l.credit(99, T0);
    let denial = l.deny(debit(100), T0);
    assert_eq!(
        denial,
        Denial::InsufficientFunds {
            required_micros: 100,
            available_micros: 99,
            balance_micros: 99,
            held_micros: 0,
            retry_after_ms: None,
        }
    );
    // A check says the same and changes nothing either.
    assert!(matches!(
        l.deny(CommandKind::Check { amount_micros: 100 }, T0),
        Denial::InsufficientFunds { .. }
    ));
    assert!(matches!(
        l.run(CommandKind::Check { amount_micros: 99 }, T0)
            .expect("check")
            .outcome,
        Outcome::WouldApprove {
            amount_micros: 99,
            balance_micros: 99
        }
    ));
}

#[test]
fn hold_one_micro_short_is_a_402() {
    let mut l = Ledger::new("open", T0);
    l.credit(50, T0);
    l.hold(50, 1_000, T0);
    assert_eq!((l.balance(), l.held()), (0, 50));
    let denial = l.deny(
        CommandKind::Hold {
            amount_micros: 1,
            ttl_ms: 1_000,
        },
        T0,
    );
    assert!(matches!(
        denial,
        Denial::InsufficientFunds {
            required_micros: 1,
            available_micros: 0,
            held_micros: 50,
            ..
        }
    ));
}

// ---- u64::MAX ------------------------------------------------------------------------

#[test]
fn credit_of_u64_max_then_one_more_overflows_and_changes_nothing() {
    let mut l = Ledger::new("open", T0);
    l.credit(u64::MAX, T0);
    assert_eq!(l.balance(), u64::MAX);
    let before = l.state().clone();
    assert_eq!(
        l.reject(CommandKind::Credit { amount_micros: 1 }, T0),
        CommandError::Overflow
    );
    assert_eq!(
        l.reject(
            CommandKind::Credit {
                amount_micros: u64::MAX
            },
            T0
        ),
        CommandError::Overflow
    );
    assert_eq!(l.state(), &before);
    // The whole balance can be spent in one debit.
    l.debit(u64::MAX, T0);
    assert_eq!(l.balance(), 0);
}

#[test]
fn credit_overflowing_the_lifetime_total_is_rejected_even_with_an_empty_balance() {
    let mut l = Ledger::new("open", T0);
    l.credit(u64::MAX, T0);
    l.debit(u64::MAX, T0);
    let before = l.state().clone();
    assert_eq!(
        l.reject(CommandKind::Credit { amount_micros: 1 }, T0),
        CommandError::Overflow,
        "credited_total_micros would wrap"
    );
    assert_eq!(l.state(), &before);
}

#[test]
fn u64_max_spends_are_denials_or_rejections_never_panics() {
    let mut l = Ledger::new("capped", T0);
    l.credit(10, T0);
    let hold = l.hold(5, 1_000, T0);
    let debit_seq = l.debit(5, T0);
    // The cap (1,000) is checked before funds, in u128 so nothing wraps.
    assert!(matches!(
        l.deny(debit(u64::MAX), T0),
        Denial::MonthlyCapReached { soft: false, .. }
    ));
    assert!(matches!(
        l.deny(
            CommandKind::Hold {
                amount_micros: u64::MAX,
                ttl_ms: 1_000
            },
            T0
        ),
        Denial::MonthlyCapReached { soft: false, .. }
    ));
    assert_eq!(
        l.reject(
            CommandKind::Capture {
                hold_seq: hold,
                amount_micros: u64::MAX
            },
            T0
        ),
        CommandError::CaptureExceedsHold {
            amount_micros: u64::MAX,
            held_micros: 5
        }
    );
    assert_eq!(
        l.reject(
            CommandKind::Refund {
                debit_seq,
                amount_micros: u64::MAX
            },
            T0
        ),
        CommandError::RefundExceedsDebit {
            amount_micros: u64::MAX,
            refundable_micros: 5
        }
    );
    let mut open = Ledger::new("open", T0);
    open.credit(10, T0);
    assert!(matches!(
        open.deny(debit(u64::MAX), T0),
        Denial::InsufficientFunds {
            required_micros: u64::MAX,
            available_micros: 10,
            ..
        }
    ));
}

#[test]
fn plan_cap_of_u64_max_does_not_overflow() {
    let mut book_plan = Plan::unlimited(plan_name("huge"));
    book_plan.monthly_cap_micros = Some(u64::MAX);
    book_plan.soft_threshold_pct = Some(100);
    let mut l = Ledger::new("open", T0);
    l.plans = PlanBook::new(plans().iter().cloned().chain([book_plan]));
    l.approve(
        CommandKind::UpdateAgent {
            plan: Some(plan_name("huge")),
            status: None,
        },
        T0,
    );
    l.credit(u64::MAX, T0);
    l.debit(u64::MAX - 1, T0);
    l.debit(1, T0);
    assert_eq!(l.state().period_spent_micros, u64::MAX);
    l.approve(
        CommandKind::Refund {
            debit_seq: 4,
            amount_micros: 1,
        },
        T0,
    );
    assert!(matches!(
        l.deny(debit(2), T0),
        Denial::MonthlyCapReached { soft: false, .. }
    ));
}

// ---- zero and out-of-range inputs ------------------------------------------------------

#[test]
fn zero_amounts_are_rejected() {
    let mut l = Ledger::new("open", T0);
    l.credit(100, T0);
    let debit_seq = l.debit(10, T0);
    for kind in [
        CommandKind::Credit { amount_micros: 0 },
        CommandKind::Debit { amount_micros: 0 },
        CommandKind::Check { amount_micros: 0 },
        CommandKind::Hold {
            amount_micros: 0,
            ttl_ms: 1_000,
        },
        CommandKind::Refund {
            debit_seq,
            amount_micros: 0,
        },
    ] {
        assert_eq!(l.reject(kind, T0), CommandError::ZeroAmount);
    }
    assert_eq!(l.balance(), 90);
}

#[test]
fn capture_of_zero_releases_the_whole_hold_and_spends_nothing() {
    let mut l = Ledger::new("open", T0);
    l.credit(100, T0);
    let hold_seq = l.hold(40, 1_000, T0);
    let capture_seq = l.approve(
        CommandKind::Capture {
            hold_seq,
            amount_micros: 0,
        },
        T0 + 1,
    );
    assert_eq!((l.balance(), l.held()), (100, 0));
    assert_eq!(l.state().debited_total_micros, 0);
    // Nothing was spent, so there is nothing to refund.
    assert_eq!(
        l.reject(
            CommandKind::Refund {
                debit_seq: capture_seq,
                amount_micros: 1
            },
            T0 + 1
        ),
        CommandError::UnknownDebit(capture_seq)
    );
}

#[test]
fn hold_ttl_must_be_within_the_plan() {
    let mut l = Ledger::new("open", T0);
    l.credit(100, T0);
    let max_ms = plans()
        .get(&plan_name("open"))
        .expect("plan")
        .hold_ttl_max_ms;
    for ttl_ms in [0, max_ms + 1, u64::MAX] {
        assert_eq!(
            l.reject(
                CommandKind::Hold {
                    amount_micros: 1,
                    ttl_ms
                },
                T0
            ),
            CommandError::InvalidTtl { ttl_ms, max_ms }
        );
    }
    let seq = l.hold(1, max_ms, T0);
    assert_eq!(l.state().holds[&seq].expires_at_ms, T0 + max_ms);
}

#[test]
fn commands_for_unknown_agents_holds_and_debits_are_rejected() {
    let plans = plans();
    let id = AgentId::new("nobody").expect("valid id");
    let mut rate = RateState::default();
    assert_eq!(
        decide(
            None,
            &mut rate,
            &Command::new(id.clone(), debit(1)),
            &plans,
            T0
        ),
        Err(CommandError::UnknownAgent)
    );
    assert_eq!(
        decide(
            None,
            &mut rate,
            &Command::new(
                id,
                CommandKind::CreateAgent {
                    plan: plan_name("no-such-plan"),
                    status: Status::Active
                }
            ),
            &plans,
            T0
        ),
        Err(CommandError::UnknownPlan("no-such-plan".into()))
    );
    let mut l = Ledger::new("open", T0);
    assert_eq!(
        l.reject(
            CommandKind::CreateAgent {
                plan: plan_name("open"),
                status: Status::Active
            },
            T0
        ),
        CommandError::AgentExists
    );
    assert_eq!(
        l.reject(CommandKind::Void { hold_seq: 99 }, T0),
        CommandError::UnknownHold(99)
    );
    // Seq 1 exists but is the agent's creation, not a debit.
    assert_eq!(
        l.reject(
            CommandKind::Refund {
                debit_seq: 1,
                amount_micros: 1
            },
            T0
        ),
        CommandError::UnknownDebit(1)
    );
}

// ---- idempotency envelope ------------------------------------------------------------------

#[test]
fn events_carry_the_key_and_fingerprint_of_their_command() {
    use tally_core::IdempotencyKey;
    let mut l = Ledger::new("open", T0);
    let key = |k: &str| IdempotencyKey::new(k).expect("valid key");
    let credit = l
        .cmd(CommandKind::Credit { amount_micros: 100 })
        .with_key(key("credit-1"));
    let d = l.run_cmd(&credit, T0).expect("credit");
    assert_eq!(d.events.len(), 1);
    assert_eq!(d.events[0].idempotency_key, Some(key("credit-1")));
    assert_eq!(d.events[0].fingerprint, credit.fingerprint());
    assert_ne!(d.events[0].fingerprint, 0);
    // Without a key there is nothing to fingerprint.
    let d = l
        .run(CommandKind::Credit { amount_micros: 1 }, T0)
        .expect("credit");
    assert_eq!(
        (d.events[0].idempotency_key.clone(), d.events[0].fingerprint),
        (None, 0)
    );
    // Every event of a multi-event command carries the same envelope.
    l.hold(10, 1_000, T0);
    l.hold(20, 1_000, T0);
    let sweep = l.cmd(CommandKind::ExpireHolds).with_key(key("sweep-1"));
    let d = l.run_cmd(&sweep, T0 + 1_000).expect("sweep");
    assert_eq!(d.events.len(), 2);
    for e in &d.events {
        assert_eq!(e.idempotency_key, Some(key("sweep-1")));
        assert_eq!(e.fingerprint, sweep.fingerprint());
    }
    // A keyed denial writes nothing.
    let denied = l.cmd(debit(10_000)).with_key(key("debit-1"));
    assert!(matches!(
        l.deny_cmd(&denied, T0 + 1_000),
        Denial::InsufficientFunds { .. }
    ));
}

// ---- extreme clocks ---------------------------------------------------------------------------

#[test]
fn far_future_now_is_answered_without_panic() {
    // Past 2^64 ns (year 2554) the limiter's nanoseconds would overflow; time is the
    // caller's argument, so it must degrade, not panic.
    for now in [
        u64::MAX / 1_000_000 - 10,
        u64::MAX / 1_000_000 + 1,
        u64::MAX,
    ] {
        for plan in ["limited", "capped"] {
            let mut l = Ledger::new(plan, now);
            l.credit(10, now);
            assert!(matches!(
                l.run(debit(1), now).expect("decides").outcome,
                Outcome::Approved(_)
            ));
            assert!(l.run(debit(1), now).is_ok(), "{plan} at {now}");
            assert!(l.run(CommandKind::Check { amount_micros: 1 }, now).is_ok());
        }
        let mut l = Ledger::new("open", now);
        l.credit(10, now);
        // now + ttl overflows: a rejected command, not a wrapped expiry.
        let hold = l.run(
            CommandKind::Hold {
                amount_micros: 1,
                ttl_ms: 3_600_000,
            },
            now,
        );
        if now > u64::MAX - 3_600_000 {
            assert_eq!(hold, Err(CommandError::Overflow));
        } else {
            assert!(hold.is_ok());
        }
    }
}
