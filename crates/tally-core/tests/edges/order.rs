//! The decision order: suspended (403) before the rate limit (429) before the cap
//! before funds (402), and which of them use a rate-limit cell.

use super::*;

// ---- decision order -------------------------------------------------------------------

#[test]
fn suspended_is_a_403_before_the_rate_limit_and_uses_no_cell() {
    let mut l = Ledger::new("limited", T0);
    l.credit(100, T0);
    l.set_status(Status::Suspended, T0);
    for i in 0..3 {
        assert_eq!(l.deny(debit(1), T0 + i), Denial::Suspended);
        assert_eq!(
            l.deny(
                CommandKind::Hold {
                    amount_micros: 1,
                    ttl_ms: 1_000
                },
                T0 + i
            ),
            Denial::Suspended
        );
    }
    // Suspended requests took no cell: the first request after resuming passes.
    l.set_status(Status::Active, T0 + 3);
    l.debit(1, T0 + 3);
    // Now the cell is used: suspended again, the 403 still comes before the 429.
    l.set_status(Status::Suspended, T0 + 3);
    assert_eq!(l.deny(debit(1), T0 + 3), Denial::Suspended);
    // Credits and refunds still work while suspended.
    l.credit(1, T0 + 3);
}

#[test]
fn a_rate_limited_request_on_an_empty_balance_gets_429_not_402() {
    let mut l = Ledger::new("limited", T0);
    // No credit at all. The first request passes the limiter and is denied for funds,
    // but its cell is used...
    assert!(matches!(
        l.deny(debit(1), T0),
        Denial::InsufficientFunds {
            retry_after_ms: None,
            ..
        }
    ));
    // ...so the next one within the second is refused by the limiter first.
    assert_eq!(
        l.deny(debit(1), T0 + 400),
        Denial::RateLimited {
            bucket: "default".into(),
            quota: 1,
            window_ms: 1_000,
            retry_after_ms: 600,
        }
    );
    // A check looks at the limiter without taking a cell.
    assert!(matches!(
        l.deny(CommandKind::Check { amount_micros: 1 }, T0 + 400),
        Denial::RateLimited { .. }
    ));
    l.credit(5, T0 + 500);
    for _ in 0..3 {
        assert!(matches!(
            l.run(CommandKind::Check { amount_micros: 1 }, T0 + 1_000)
                .expect("check")
                .outcome,
            Outcome::WouldApprove { .. }
        ));
    }
    l.debit(1, T0 + 1_000);
    assert!(matches!(
        l.deny(debit(1), T0 + 1_000),
        Denial::RateLimited {
            retry_after_ms: 1_000,
            ..
        }
    ));
}

#[test]
fn the_rate_limit_comes_before_the_cap_and_the_cap_before_funds() {
    let mut book = plans();
    let mut both = Plan::unlimited(plan_name("both"));
    both.monthly_cap_micros = Some(10);
    both.buckets = vec![RateBucket::new("default", 1, 1_000, 1).expect("valid bucket")];
    book = PlanBook::new(book.iter().cloned().chain([both]));
    let mut l = Ledger::new("open", T0);
    l.plans = book;
    l.approve(
        CommandKind::UpdateAgent {
            plan: Some(plan_name("both")),
            status: None,
        },
        T0,
    );
    // Over the cap and over the balance: the cap speaks first (and takes the cell).
    assert!(matches!(
        l.deny(debit(11), T0),
        Denial::MonthlyCapReached { .. }
    ));
    // Now over the rate too: the limiter speaks first.
    assert!(matches!(
        l.deny(debit(11), T0 + 1),
        Denial::RateLimited {
            retry_after_ms: 999,
            ..
        }
    ));
    // Under the cap, over the balance: 402.
    assert!(matches!(
        l.deny(debit(10), T0 + 1_000),
        Denial::InsufficientFunds { .. }
    ));
}

#[test]
fn an_overflowing_debit_is_rejected_before_the_limiter_and_takes_no_cell() {
    let mut l = Ledger::new("limited", T0);
    l.credit(u64::MAX, T0);
    // Spend almost everything ever credited, then refund it: the lifetime debited total
    // sits at u64::MAX - 1 while the balance is full again.
    let seq = l.debit(u64::MAX - 1, T0);
    l.approve(
        CommandKind::Refund {
            debit_seq: seq,
            amount_micros: u64::MAX - 1,
        },
        T0 + 1_000,
    );
    assert_eq!(l.balance(), u64::MAX);
    // A debit of 2 would overflow the lifetime total: rejected, state unchanged...
    assert_eq!(l.reject(debit(2), T0 + 2_000), CommandError::Overflow);
    // ...and it took no rate-limit cell: a debit of 1 in the same second passes.
    l.debit(1, T0 + 2_000);
}
