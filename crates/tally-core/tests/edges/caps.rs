//! Monthly caps: exactly reached and one micro past, open holds counting against the
//! cap, the soft threshold by priority, and period boundaries (Dec 31 → Jan 1, Feb 29).

use super::*;

// ---- monthly cap and soft threshold ------------------------------------------------------

#[test]
fn cap_exactly_reached_is_allowed_and_one_micro_past_is_a_429_until_the_reset() {
    let mut l = Ledger::new("capped", T0);
    l.credit(10_000, T0);
    l.debit(600, T0);
    l.debit(400, T0);
    assert_eq!(l.state().period_spent_micros, CAP_MICROS);
    let denial = l.deny(debit(1), T0);
    assert_eq!(
        denial,
        Denial::MonthlyCapReached {
            cap_micros: CAP_MICROS,
            limit_micros: CAP_MICROS,
            spent_micros: CAP_MICROS,
            held_micros: 0,
            // T0 is in November 2026; the period resets on 2026-12-01T00:00:00Z.
            resets_at_ms: 1_796_083_200_000,
            soft: false,
        }
    );
    // Critical work stops at the hard cap too.
    let critical = l.cmd(debit(1)).with_priority(Priority::Critical);
    assert!(matches!(
        l.deny_cmd(&critical, T0),
        Denial::MonthlyCapReached { soft: false, .. }
    ));
    // At the reset the spend starts again from zero.
    l.debit(CAP_MICROS, 1_796_083_200_000);
    assert_eq!(l.state().period_spent_micros, CAP_MICROS);
}

#[test]
fn open_holds_count_against_the_cap() {
    let mut l = Ledger::new("capped", T0);
    l.credit(10_000, T0);
    l.debit(500, T0);
    let hold_seq = l.hold(500, 10_000, T0);
    let denial = l.deny(debit(1), T0);
    assert!(matches!(
        denial,
        Denial::MonthlyCapReached {
            spent_micros: 500,
            held_micros: 500,
            soft: false,
            ..
        }
    ));
    // Capturing less than the hold frees the difference under the cap.
    l.approve(
        CommandKind::Capture {
            hold_seq,
            amount_micros: 300,
        },
        T0 + 1,
    );
    assert_eq!(l.state().period_spent_micros, 800);
    l.debit(200, T0 + 1);
    assert!(matches!(
        l.deny(debit(1), T0 + 1),
        Denial::MonthlyCapReached { .. }
    ));
}

#[test]
fn soft_threshold_stops_low_priority_only() {
    let mut l = Ledger::new("capped", T0);
    l.credit(10_000, T0);
    // Exactly at the soft limit (80 % of 1,000) low-priority work still passes.
    let low = debit_low(&l, 800);
    assert!(matches!(
        l.run_cmd(&low, T0).expect("decides").outcome,
        Outcome::Approved(_)
    ));
    let denial = l.deny_cmd(&debit_low(&l, 1), T0);
    assert_eq!(
        denial,
        Denial::MonthlyCapReached {
            cap_micros: CAP_MICROS,
            limit_micros: 800,
            spent_micros: 800,
            held_micros: 0,
            resets_at_ms: 1_796_083_200_000,
            soft: true,
        }
    );
    let low_check = l
        .cmd(CommandKind::Check { amount_micros: 1 })
        .with_priority(Priority::Low);
    assert!(matches!(
        l.deny_cmd(&low_check, T0),
        Denial::MonthlyCapReached { soft: true, .. }
    ));
    for priority in [Priority::Normal, Priority::Critical] {
        let cmd = l.cmd(debit(100)).with_priority(priority);
        assert!(
            matches!(
                l.run_cmd(&cmd, T0).expect("decides").outcome,
                Outcome::Approved(_)
            ),
            "{priority:?} goes on past the soft threshold"
        );
    }
    assert_eq!(l.state().period_spent_micros, CAP_MICROS);
}

#[test]
fn soft_threshold_low_priority_one_micro_past_from_below() {
    let mut l = Ledger::new("capped", T0);
    l.credit(10_000, T0);
    l.debit(799, T0);
    // 799 + 2 = 801 > 800: denied for low, while 1 more (800) is fine.
    assert!(matches!(
        l.deny_cmd(&debit_low(&l, 2), T0),
        Denial::MonthlyCapReached {
            soft: true,
            limit_micros: 800,
            ..
        }
    ));
    let low = debit_low(&l, 1);
    assert!(matches!(
        l.run_cmd(&low, T0).expect("decides").outcome,
        Outcome::Approved(_)
    ));
}

// ---- month boundaries ---------------------------------------------------------------------

#[test]
fn dec_31_to_jan_1_resets_the_spend() {
    let mut l = Ledger::new("capped", DEC_31_LAST_MS - 10_000);
    l.credit(10_000, DEC_31_LAST_MS - 10_000);
    l.debit(CAP_MICROS, DEC_31_LAST_MS);
    assert_eq!(
        l.deny(debit(1), DEC_31_LAST_MS),
        Denial::MonthlyCapReached {
            cap_micros: CAP_MICROS,
            limit_micros: CAP_MICROS,
            spent_micros: CAP_MICROS,
            held_micros: 0,
            resets_at_ms: JAN_1_2027,
            soft: false,
        }
    );
    // One millisecond later it is a new year and a new period.
    l.debit(CAP_MICROS, JAN_1_2027);
    assert_eq!(l.state().period_spent_micros, CAP_MICROS);
    assert_eq!(l.state().period.to_string(), "2027-01");
    // The cap applies per period: January is now full too, until February.
    assert!(matches!(
        l.deny(debit(1), JAN_1_2027 + 1),
        Denial::MonthlyCapReached {
            resets_at_ms: FEB_1_2027,
            ..
        }
    ));
}

#[test]
fn a_refund_lowers_the_spend_of_its_own_period_only() {
    let mut l = Ledger::new("capped", DEC_31_LAST_MS - 10_000);
    l.credit(10_000, DEC_31_LAST_MS - 10_000);
    let december = l.debit(CAP_MICROS, DEC_31_LAST_MS);
    // In December a refund makes room under December's cap again.
    l.approve(
        CommandKind::Refund {
            debit_seq: december,
            amount_micros: 300,
        },
        DEC_31_LAST_MS,
    );
    l.debit(300, DEC_31_LAST_MS);
    // In January, refunding December's debit returns money but not January's cap room.
    l.debit(500, JAN_1_2027);
    l.approve(
        CommandKind::Refund {
            debit_seq: december,
            amount_micros: 500,
        },
        JAN_1_2027,
    );
    assert_eq!(l.state().period_spent_micros, 500);
    assert!(matches!(
        l.deny(debit(501), JAN_1_2027),
        Denial::MonthlyCapReached {
            spent_micros: 500,
            ..
        }
    ));
    l.debit(500, JAN_1_2027);
}

#[test]
fn feb_29_belongs_to_february_and_march_1_resets() {
    let mut l = Ledger::new("capped", FEB_1_2028);
    l.credit(10_000, FEB_1_2028);
    l.debit(400, FEB_1_2028);
    l.debit(600, FEB_29_2028_NOON);
    assert!(matches!(
        l.deny(debit(1), FEB_29_2028_NOON),
        Denial::MonthlyCapReached {
            spent_micros: CAP_MICROS,
            resets_at_ms: MAR_1_2028,
            ..
        }
    ));
    assert!(matches!(
        l.deny(debit(1), MAR_1_2028 - 1),
        Denial::MonthlyCapReached { .. }
    ));
    l.debit(CAP_MICROS, MAR_1_2028);
    assert_eq!(l.state().period.to_string(), "2028-03");
}

#[test]
fn feb_29_with_anchor_day_28_is_in_the_period_that_began_feb_28() {
    let mut l = Ledger::new("capped28", FEB_28_2028 - 1);
    l.credit(10_000, FEB_28_2028 - 1);
    // The last ms of the January period (Jan 28 – Feb 28).
    l.debit(CAP_MICROS, FEB_28_2028 - 1);
    assert!(matches!(
        l.deny(debit(1), FEB_28_2028 - 1),
        Denial::MonthlyCapReached {
            resets_at_ms: FEB_28_2028,
            ..
        }
    ));
    l.debit(600, FEB_28_2028);
    l.debit(400, FEB_29_2028_NOON);
    assert!(matches!(
        l.deny(debit(1), FEB_29_2028_NOON),
        Denial::MonthlyCapReached {
            spent_micros: CAP_MICROS,
            resets_at_ms: MAR_28_2028,
            ..
        }
    ));
    // March 1 is still in the same period with anchor 28.
    assert!(matches!(
        l.deny(debit(1), MAR_1_2028),
        Denial::MonthlyCapReached { .. }
    ));
    l.debit(1, MAR_28_2028);
}

// ---- anchor day changes -------------------------------------------------------------------

/// The same plans, but with `capped`'s periods starting on `anchor_day`: a config change
/// followed by a restart.
fn plans_with_capped_anchor(anchor_day: u8) -> PlanBook {
    PlanBook::new(plans().iter().cloned().map(|mut p| {
        if p.name.as_str() == "capped" {
            p.anchor_day = anchor_day;
        }
        p
    }))
}

#[test]
fn a_plan_change_to_a_later_anchor_day_does_not_reopen_the_cap() {
    // January's period under anchor 1 (Jan 1 – Feb 1) is full on Jan 10.
    let mut l = Ledger::new("capped", JAN_10_2027_NOON);
    l.credit(10_000, JAN_10_2027_NOON);
    l.debit(CAP_MICROS, JAN_10_2027_NOON);
    // Under anchor 28, Jan 10 falls in the period that began Dec 28, older than the one
    // the agent already spends in: the spend keeps counting in January's period, which
    // now ends when January's period under anchor 28 does.
    l.set_plan("capped28", JAN_10_2027_NOON);
    let full = Denial::MonthlyCapReached {
        cap_micros: CAP_MICROS,
        limit_micros: CAP_MICROS,
        spent_micros: CAP_MICROS,
        held_micros: 0,
        resets_at_ms: FEB_28_2027,
        soft: false,
    };
    assert_eq!(l.deny(debit(1), JAN_10_2027_NOON + 1), full);
    assert_eq!(l.deny(debit(1), JAN_28_2027), full);
    assert_eq!(l.deny(debit(1), FEB_28_2027 - 1), full);
    l.debit(CAP_MICROS, FEB_28_2027);
    assert_eq!(l.state().period.to_string(), "2027-02");
    assert_eq!(l.state().period_spent_micros, CAP_MICROS);
}

#[test]
fn a_config_change_to_a_later_anchor_day_does_not_reopen_the_cap() {
    let mut l = Ledger::new("capped", JAN_10_2027_NOON);
    l.credit(10_000, JAN_10_2027_NOON);
    l.debit(600, JAN_10_2027_NOON);
    // Restarted with `capped` now starting its periods on the 28th.
    l.plans = plans_with_capped_anchor(28);
    assert!(matches!(
        l.deny(debit(401), JAN_10_2027_NOON + 1),
        Denial::MonthlyCapReached {
            spent_micros: 600,
            resets_at_ms: FEB_28_2027,
            ..
        }
    ));
    // What is spent now counts in the same period, and a refund of it makes room again.
    let seq = l.debit(400, JAN_10_2027_NOON + 2);
    assert_eq!(l.state().period.to_string(), "2027-01");
    assert_eq!(l.state().period_spent_micros, CAP_MICROS);
    l.approve(
        CommandKind::Refund {
            debit_seq: seq,
            amount_micros: 100,
        },
        JAN_28_2027,
    );
    l.debit(100, JAN_28_2027);
    assert!(matches!(
        l.deny(debit(1), JAN_28_2027),
        Denial::MonthlyCapReached { .. }
    ));
}

#[test]
fn a_plan_change_to_an_earlier_anchor_day_starts_the_newer_period_at_once() {
    // Under anchor 28, Jan 10 is in the period that began Dec 28 (named 2026-12).
    let mut l = Ledger::new("capped28", JAN_10_2027_NOON);
    l.credit(10_000, JAN_10_2027_NOON);
    l.debit(CAP_MICROS, JAN_10_2027_NOON);
    assert_eq!(l.state().period.to_string(), "2026-12");
    // Under anchor 1 it is in January's period, a newer one: it starts now, with its own
    // cap, and ends Feb 1. No period holds more than the cap.
    l.set_plan("capped", JAN_10_2027_NOON);
    l.debit(CAP_MICROS, JAN_10_2027_NOON + 1);
    assert_eq!(l.state().period.to_string(), "2027-01");
    assert!(matches!(
        l.deny(debit(1), JAN_10_2027_NOON + 2),
        Denial::MonthlyCapReached {
            resets_at_ms: FEB_1_2027,
            ..
        }
    ));
}
