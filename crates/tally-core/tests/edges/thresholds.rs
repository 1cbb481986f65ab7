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
                grant_expiring_within_ms: None,
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
                    grant_expiring_within_ms: None,
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
        grant_expiring_within_ms: None,
    });
    assert!(no_cap.is_err(), "a cap share needs a cap");
}

/// 2026-11-29T13:00:00Z + one day: when the promotional grant below expires.
const GRANT_EXPIRES: u64 = T0 + 86_400_000;
const WITHIN_MS: u64 = 3_600_000;

fn warned_plan_ledger() -> Ledger {
    let mut l = Ledger::new("open", T0);
    l.approve(
        CommandKind::SetThresholds {
            thresholds: Some(Thresholds {
                balance_below_micros: Some(LOW_BALANCE_MICROS),
                cap_spend_percent: None,
                grant_expiring_within_ms: Some(WITHIN_MS),
            }),
        },
        T0,
    );
    l.credit(1_000, T0);
    l.approve(
        CommandKind::IssueGrant {
            amount_micros: 300,
            terms: tally_core::GrantTerms {
                expires_at_ms: Some(GRANT_EXPIRES),
                priority: 100,
                category: tally_core::GrantCategory::Promotional,
            },
        },
        T0,
    );
    l
}

#[test]
fn a_grant_is_warned_about_once_from_exactly_expires_at_minus_the_window() {
    let mut l = warned_plan_ledger();
    let grant_id = l.journal.last().expect("issued").seq;
    let mark = l.journal.len();
    // One ms before the window: a sweep finds nothing to say.
    l.approve(CommandKind::ExpireHolds, GRANT_EXPIRES - WITHIN_MS - 1);
    assert_eq!(crossings_since(&l, mark), []);
    assert_eq!(l.journal.len(), mark, "an idle sweep writes nothing");
    // At exactly expires_at − window a sweep journals the warning, alone.
    l.approve(CommandKind::ExpireHolds, GRANT_EXPIRES - WITHIN_MS);
    assert_eq!(
        crossings_since(&l, mark),
        [Crossing::GrantExpiring {
            grant_id,
            expires_at_ms: GRANT_EXPIRES,
            remaining_micros: 300,
            within_ms: WITHIN_MS,
        }]
    );
    assert!(l.state().grants[&grant_id].expiry_warned);
    // Once: neither the next sweep nor a debit says it again.
    let mark = l.journal.len();
    l.approve(CommandKind::ExpireHolds, GRANT_EXPIRES - 1);
    l.debit(1, GRANT_EXPIRES - 1);
    assert_eq!(crossings_since(&l, mark), []);
    // At expiry the remainder goes (299: the debit drew from the earlier-expiring grant).
    let mark = l.journal.len();
    l.approve(CommandKind::ExpireHolds, GRANT_EXPIRES);
    assert_eq!(l.last_kinds(1), ["grant_expired"]);
    assert_eq!(crossings_since(&l, mark), []);
    assert_eq!(l.balance(), 1_000);
}

#[test]
fn a_command_in_the_window_carries_the_warning_and_an_expiry_can_cross_the_balance() {
    let mut l = warned_plan_ledger();
    let mark = l.journal.len();
    let seq = l.debit(800, GRANT_EXPIRES - 10);
    // The debit drew the 300 of the grant first (earliest expiry), then 500 of the plain.
    assert_eq!(l.balance(), 500);
    let kinds: Vec<_> = l.journal[mark..].iter().map(|e| e.kind.name()).collect();
    assert_eq!(
        kinds,
        ["debit"],
        "the grant is spent out: nothing to warn about"
    );
    let mark = l.journal.len();
    assert_eq!(seq, l.journal[mark - 1].seq);
    // A new grant issued inside the window is warned about by its own command. Priority
    // 200: drawn after the plain credit.
    l.approve(
        CommandKind::IssueGrant {
            amount_micros: 100,
            terms: tally_core::GrantTerms {
                expires_at_ms: Some(GRANT_EXPIRES),
                priority: 200,
                category: tally_core::GrantCategory::Promotional,
            },
        },
        GRANT_EXPIRES - 10,
    );
    assert!(matches!(
        crossings_since(&l, mark).as_slice(),
        [Crossing::GrantExpiring {
            remaining_micros: 100,
            ..
        }]
    ));
    // 600 → 599 (from the plain credit) crosses nothing; the grant's expiry takes the
    // balance to 499: the sweep that expires it journals the crossing.
    l.debit(1, GRANT_EXPIRES - 5);
    let mark = l.journal.len();
    l.approve(CommandKind::ExpireHolds, GRANT_EXPIRES);
    assert_eq!(l.balance(), 499);
    assert_eq!(l.last_kinds(2), ["grant_expired", "threshold_crossed"]);
    assert_eq!(
        crossings_since(&l, mark),
        [Crossing::BalanceBelow {
            threshold_micros: LOW_BALANCE_MICROS
        }]
    );
}

#[test]
fn money_given_back_to_a_spent_out_grant_in_the_window_is_warned_about_with_the_return() {
    let mut l = warned_plan_ledger();
    let grant_id = l.journal.last().expect("issued").seq;
    // The hold reserves the whole grant (earliest expiry first), which leaves the state.
    // Placed just before the window, for as long as a hold may last (one hour).
    let hold_seq = l.hold(300, WITHIN_MS, GRANT_EXPIRES - WITHIN_MS - 1_000);
    assert!(!l.state().grants.contains_key(&grant_id));
    // In the window a debit (drawn from the plain credit) has nothing to warn about.
    let mark = l.journal.len();
    l.debit(1, GRANT_EXPIRES - 3_000);
    assert_eq!(crossings_since(&l, mark), []);
    // The void gives the 300 back: the grant is back, unwarned, inside its window, and
    // the void's own command says so.
    let mark = l.journal.len();
    l.approve(CommandKind::Void { hold_seq }, GRANT_EXPIRES - 2_000);
    assert_eq!(
        crossings_since(&l, mark),
        [Crossing::GrantExpiring {
            grant_id,
            expires_at_ms: GRANT_EXPIRES,
            remaining_micros: 300,
            within_ms: WITHIN_MS,
        }]
    );
}
