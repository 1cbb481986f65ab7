//! Threshold crossings: journaled once per crossing, in the same command as the change
//! that crossed them, re-armed when the balance (or the period's spend) comes back, and
//! replaced as a whole by an agent's own thresholds.

use tally_core::{Crossing, EventKind};

use super::*;

/// The crossings journaled by the commands run since `from` (a journal index).
fn crossings_since(l: &Ledger, from: usize) -> Vec<Crossing> {
    l.journal[from..]
        .iter()
        .filter_map(|e| match e.kind {
            EventKind::ThresholdCrossed { crossing } => Some(crossing),
            _ => None,
        })
        .collect()
}

#[test]
fn a_fall_below_the_balance_threshold_is_one_crossing_until_the_balance_comes_back() {
    let mut l = Ledger::new("notified", T0);
    l.credit(600, T0);
    let mark = l.journal.len();
    // 600 → 500: still at the threshold, nothing to say.
    l.debit(100, T0);
    assert_eq!(crossings_since(&l, mark), []);
    // 500 → 499: one micro below is the crossing, journaled after the debit, same command.
    let debit_seq = l.debit(1, T0);
    let crossed = &l.journal[l.journal.len() - 1];
    assert_eq!(crossed.seq, debit_seq + 1);
    assert_eq!(crossed.balance_after_micros, 499);
    assert_eq!(
        crossings_since(&l, mark),
        [Crossing::BalanceBelow {
            threshold_micros: LOW_BALANCE_MICROS
        }]
    );
    // Further falls below are the same episode.
    let mark = l.journal.len();
    l.debit(100, T0);
    assert_eq!(crossings_since(&l, mark), []);
    // Back to exactly the threshold re-arms it; the next fall is a new crossing.
    l.credit(101, T0);
    assert_eq!(l.balance(), LOW_BALANCE_MICROS);
    l.debit(1, T0);
    assert_eq!(crossings_since(&l, mark).len(), 1);
}

#[test]
fn a_hold_crosses_the_balance_threshold_and_its_release_re_arms_it() {
    let mut l = Ledger::new("notified", T0);
    l.credit(900, T0);
    let mark = l.journal.len();
    let hold = l.hold(500, 60_000, T0);
    assert_eq!(crossings_since(&l, mark).len(), 1);
    l.approve(CommandKind::Void { hold_seq: hold }, T0);
    let mark = l.journal.len();
    l.hold(401, 60_000, T0);
    assert_eq!(crossings_since(&l, mark).len(), 1, "re-armed by the void");
}

#[test]
fn cap_spend_crossing_is_once_per_period_at_exactly_the_share() {
    let mut l = Ledger::new("notified", T0);
    l.credit(10_000, T0);
    let mark = l.journal.len();
    l.debit(499, T0);
    assert_eq!(crossings_since(&l, mark), []);
    l.debit(1, T0);
    let crossed = crossings_since(&l, mark);
    assert!(
        matches!(
            crossed.as_slice(),
            [Crossing::CapSpend {
                percent: 50,
                cap_micros: CAP_MICROS,
                threshold_micros: 500,
                spent_micros: 500,
                ..
            }]
        ),
        "{crossed:?}"
    );
    let mark = l.journal.len();
    l.debit(100, T0);
    assert_eq!(crossings_since(&l, mark), [], "once per period");
    // A refund below the share re-arms it.
    let refunded = l.journal[mark].seq;
    l.approve(
        CommandKind::Refund {
            debit_seq: refunded,
            amount_micros: 100,
        },
        T0,
    );
    l.approve(
        CommandKind::Refund {
            debit_seq: refunded - 3,
            amount_micros: 1,
        },
        T0,
    );
    l.debit(1, T0);
    assert_eq!(crossings_since(&l, mark).len(), 1);
    // The next period starts from zero and crosses again.
    let mark = l.journal.len();
    l.debit(500, JAN_1_2027);
    assert_eq!(crossings_since(&l, mark).len(), 1);
}

#[test]
fn one_change_can_cross_both_thresholds_and_says_so_in_order() {
    let mut l = Ledger::new("notified", T0);
    l.credit(900, T0);
    let mark = l.journal.len();
    let seq = l.debit(500, T0);
    let kinds: Vec<_> = l.journal[mark..]
        .iter()
        .map(|e| (e.seq, e.kind.name()))
        .collect();
    assert_eq!(
        kinds,
        [
            (seq, "debit"),
            (seq + 1, "threshold_crossed"),
            (seq + 2, "threshold_crossed")
        ]
    );
    assert!(l.journal[mark + 1..]
        .iter()
        .all(|e| e.balance_after_micros == 400 && e.held_after_micros == 0));
}

#[test]
fn an_agents_own_thresholds_replace_its_plans_and_setting_them_is_not_a_crossing() {
    let mut l = Ledger::new("notified", T0);
    l.credit(300, T0);
    let mark = l.journal.len();
    // Below the plan's 500 already; a threshold of 1,000 set now is not a crossing.
    l.approve(
        CommandKind::SetThresholds {
            thresholds: Some(Thresholds {
                balance_below_micros: Some(100),
                cap_spend_percent: None,
            }),
        },
        T0,
    );
    assert_eq!(crossings_since(&l, mark), []);
    // The plan's cap share no longer applies; the agent's 100 does.
    l.debit(250, T0);
    assert_eq!(
        crossings_since(&l, mark),
        [Crossing::BalanceBelow {
            threshold_micros: 100
        }]
    );
    // Back to the plan's.
    l.approve(CommandKind::SetThresholds { thresholds: None }, T0);
    assert_eq!(l.state().thresholds, None);
    l.credit(1_000, T0);
    let mark = l.journal.len();
    l.debit(600, T0);
    assert_eq!(crossings_since(&l, mark).len(), 2, "balance and cap share");
}

#[test]
fn invalid_thresholds_are_rejected_and_plans_without_thresholds_say_nothing() {
    let mut l = Ledger::new("capped", T0);
    for pct in [0, 101] {
        let e = l.reject(
            CommandKind::SetThresholds {
                thresholds: Some(Thresholds {
                    balance_below_micros: None,
                    cap_spend_percent: Some(pct),
                }),
            },
            T0,
        );
        assert!(matches!(e, CommandError::Invalid(_)), "{e:?}");
    }
    l.credit(1_000, T0);
    l.debit(1_000, T0);
    assert!(l
        .journal
        .iter()
        .all(|e| !matches!(e.kind, EventKind::ThresholdCrossed { .. })));
    let no_cap = Plan::unlimited(plan_name("x")).with_thresholds(Thresholds {
        balance_below_micros: None,
        cap_spend_percent: Some(80),
    });
    assert!(no_cap.is_err(), "a cap share needs a cap");
}
