//! Credit grants: the draw order (priority, then earliest expiry, then oldest), expiry at
//! exactly `expires_at`, exactly once, holds and refunds across an expiry (the money
//! returned to an expired grant lapses), the merge of plain credits and the grant limit.

use tally_core::{EventKind, GrantCategory, GrantTerms, GRANTS_PER_AGENT_MAX};

use super::*;

fn terms(expires_at_ms: Option<u64>, priority: u32, category: GrantCategory) -> GrantTerms {
    GrantTerms {
        expires_at_ms,
        priority,
        category,
    }
}

fn issue(amount_micros: u64, terms: GrantTerms) -> CommandKind {
    CommandKind::IssueGrant {
        amount_micros,
        terms,
    }
}

impl Ledger {
    fn grant(&mut self, amount_micros: u64, terms: GrantTerms, now_ms: u64) -> u64 {
        self.approve(issue(amount_micros, terms), now_ms)
    }

    /// The kinds of the events the last approved command wrote.
    pub(super) fn last_kinds(&self, n: usize) -> Vec<&'static str> {
        self.journal[self.journal.len() - n..]
            .iter()
            .map(|e| e.kind.name())
            .collect()
    }

    fn remaining(&self, grant_id: u64) -> Option<u64> {
        self.state()
            .grants
            .get(&grant_id)
            .map(|g| g.remaining_micros)
    }

    /// (grant id, micros) the refundable debit `seq` drew.
    fn draws_of(&self, seq: u64) -> Vec<(u64, u64)> {
        self.state()
            .refundable(seq)
            .expect("refundable")
            .draws
            .iter()
            .map(|d| (d.grant_id, d.micros))
            .collect()
    }
}

const PAID: GrantCategory = GrantCategory::Paid;
const PROMO: GrantCategory = GrantCategory::Promotional;

#[test]
fn spends_draw_by_priority_then_earliest_expiry_then_oldest() {
    let mut l = Ledger::new("open", T0);
    let plain = l.credit(1_000, T0); // priority 100, never expires
    let late = l.grant(10, terms(Some(T0 + 10_000), 50, PROMO), T0);
    let early = l.grant(10, terms(Some(T0 + 5_000), 50, PAID), T0);
    let never = l.grant(10, terms(None, 50, PAID), T0);
    let early_too = l.grant(10, terms(Some(T0 + 5_000), 50, PROMO), T0);
    let first = l.grant(10, terms(Some(T0 + 60_000), 7, PROMO), T0);
    let debit = l.debit(65, T0);
    assert_eq!(
        l.draws_of(debit),
        vec![
            (first, 10),
            (early, 10),
            (early_too, 10),
            (late, 10),
            (never, 10),
            (plain, 15)
        ]
    );
    // Spent-out grants are dropped.
    assert_eq!(l.state().grants.len(), 1);
    assert_eq!(l.remaining(plain), Some(985));
}

#[test]
fn a_grant_is_spendable_until_one_ms_before_expires_at_and_gone_at_it() {
    let expires_at_ms = T0 + 1_000;
    let mut before = Ledger::new("open", T0);
    before.grant(100, terms(Some(expires_at_ms), 100, PROMO), T0);
    before.debit(100, expires_at_ms - 1);
    assert_eq!(before.balance(), 0);
    assert_eq!(before.state().expired_total_micros, 0);

    let mut at = Ledger::new("open", T0);
    let id = at.grant(100, terms(Some(expires_at_ms), 100, PROMO), T0);
    // A denial journals nothing, not even the expiry, and sees the balance without it.
    let denial = at.deny(debit(1), expires_at_ms);
    assert!(matches!(
        denial,
        Denial::InsufficientFunds {
            available_micros: 0,
            ..
        }
    ));
    assert_eq!(at.remaining(id), Some(100));
    // The next write journals the expiry first, then its own entry.
    let seq = at.credit(5, expires_at_ms);
    assert_eq!(at.last_kinds(2), ["grant_expired", "credit"]);
    assert_eq!(seq, at.state().last_seq, "the receipt names the credit");
    assert_eq!(at.remaining(id), None);
    assert_eq!(at.balance(), 5);
    assert_eq!(at.state().expired_total_micros, 100);
}

#[test]
fn the_sweep_expires_a_grant_exactly_once() {
    let mut l = Ledger::new("open", T0);
    let id = l.grant(70, terms(Some(T0 + 1_000), 100, PAID), T0);
    l.credit(30, T0);
    assert_eq!(l.state().next_expiry_ms(), Some(T0 + 1_000));
    // Before its time the sweep writes nothing.
    l.approve(CommandKind::ExpireHolds, T0 + 999);
    assert_eq!(l.remaining(id), Some(70));
    let n = l.journal.len();
    l.approve(CommandKind::ExpireHolds, T0 + 1_000);
    assert_eq!(l.journal.len(), n + 1);
    assert_eq!(
        l.journal[n].kind,
        EventKind::GrantExpired {
            grant_id: id,
            expired_micros: 70
        }
    );
    l.approve(CommandKind::ExpireHolds, T0 + 5_000);
    assert_eq!(l.journal.len(), n + 1, "a second sweep finds nothing");
    assert_eq!((l.balance(), l.state().expired_total_micros), (30, 70));
}

#[test]
fn a_hold_keeps_its_reservation_across_the_expiry_and_its_release_lapses() {
    let mut l = Ledger::new("open", T0);
    let id = l.grant(100, terms(Some(T0 + 1_000), 100, PROMO), T0);
    let hold_seq = l.hold(60, 5_000, T0);
    // At the expiry only the unreserved 40 leave the balance.
    l.approve(CommandKind::ExpireHolds, T0 + 1_000);
    assert_eq!((l.balance(), l.held()), (0, 60));
    assert_eq!(l.state().expired_total_micros, 40);
    // The capture spends 30 of the reservation; the 30 released return to an expired
    // grant, so they lapse, journaled in the same command.
    l.approve(
        CommandKind::Capture {
            hold_seq,
            amount_micros: 30,
        },
        T0 + 2_000,
    );
    assert_eq!(l.last_kinds(2), ["capture", "grant_expired"]);
    assert_eq!((l.balance(), l.held()), (0, 0));
    assert_eq!(l.state().expired_total_micros, 70);
    assert_eq!(l.state().debited_total_micros, 30);
    assert_eq!(l.remaining(id), None);
}

#[test]
fn a_void_before_the_expiry_returns_to_the_grant_and_after_it_lapses() {
    let mut l = Ledger::new("open", T0);
    let id = l.grant(100, terms(Some(T0 + 1_000), 100, PROMO), T0);
    let hold_seq = l.hold(100, 5_000, T0);
    assert_eq!(l.remaining(id), None, "all of it reserved");
    l.approve(CommandKind::Void { hold_seq }, T0 + 999);
    assert_eq!(
        l.remaining(id),
        Some(100),
        "back under its own id and terms"
    );

    let hold_seq = l.hold(100, 5_000, T0 + 999);
    l.approve(CommandKind::Void { hold_seq }, T0 + 1_000);
    assert_eq!(l.last_kinds(2), ["void", "grant_expired"]);
    assert_eq!((l.balance(), l.state().expired_total_micros), (0, 100));
}

#[test]
fn a_refund_returns_from_the_last_draw_back_and_what_meets_an_expired_grant_lapses() {
    let mut l = Ledger::new("open", T0);
    let expiring = l.grant(50, terms(Some(T0 + 1_000), 10, PROMO), T0);
    let plain = l.credit(100, T0);
    let seq = l.debit(120, T0);
    assert_eq!(l.draws_of(seq), vec![(expiring, 50), (plain, 70)]);
    // Before the expiry: 80 back = 70 to the plain grant, 10 to the expiring one, which
    // comes back (it was spent out) with its terms.
    l.approve(
        CommandKind::Refund {
            debit_seq: seq,
            amount_micros: 80,
        },
        T0 + 500,
    );
    assert_eq!(l.remaining(plain), Some(100));
    assert_eq!(l.remaining(expiring), Some(10));
    assert_eq!(
        l.state().grants[&expiring].terms,
        terms(Some(T0 + 1_000), 10, PROMO)
    );
    assert_eq!(l.draws_of(seq), vec![(expiring, 40)]);
    // After it: the 10 left in it expire first; the refund of the other 40 lapses.
    l.approve(
        CommandKind::Refund {
            debit_seq: seq,
            amount_micros: 40,
        },
        T0 + 2_000,
    );
    assert_eq!(
        l.last_kinds(3),
        ["grant_expired", "refund", "grant_expired"]
    );
    let s = l.state();
    assert_eq!((s.balance_micros, s.expired_total_micros), (100, 50));
    assert_eq!(s.refunded_total_micros, 120);
    assert_eq!(l.remaining(expiring), None);
}

#[test]
fn plain_credits_merge_into_one_grant_and_so_do_never_expiring_grants_of_equal_terms() {
    let mut l = Ledger::new("open", T0);
    let first = l.credit(10, T0);
    l.credit(20, T0);
    l.grant(30, GrantTerms::PLAIN, T0);
    let promo = l.grant(5, terms(None, 100, PROMO), T0);
    l.grant(6, terms(None, 100, PROMO), T0);
    let s = l.state();
    assert_eq!(s.grants.len(), 2);
    assert_eq!(s.grants[&first].remaining_micros, 60);
    assert_eq!(s.grants[&first].amount_micros, 60);
    assert_eq!(s.grants[&promo].remaining_micros, 11);
    assert_eq!(s.balance_in(PROMO), 11);
}

#[test]
fn the_grant_limit_is_exact_and_merges_always_fit() {
    let mut l = Ledger::new("open", T0);
    l.credit(1, T0);
    for i in 1..GRANTS_PER_AGENT_MAX as u64 {
        l.grant(1, terms(Some(T0 + 10_000 + i), 100, PAID), T0);
    }
    assert_eq!(l.state().grants.len(), GRANTS_PER_AGENT_MAX);
    assert_eq!(
        l.reject(issue(1, terms(Some(T0 + 99_000), 100, PAID)), T0),
        CommandError::TooManyGrants {
            max: GRANTS_PER_AGENT_MAX
        }
    );
    assert_eq!(
        l.reject(issue(1, terms(None, 1, PROMO)), T0),
        CommandError::TooManyGrants {
            max: GRANTS_PER_AGENT_MAX
        }
    );
    l.credit(5, T0);
    // Once one expires, there is room again (the expiry is journaled first).
    l.grant(1, terms(Some(T0 + 99_000), 100, PAID), T0 + 10_001);
    assert_eq!(l.last_kinds(2), ["grant_expired", "grant"]);
    assert_eq!(l.state().grants.len(), GRANTS_PER_AGENT_MAX);
}

#[test]
fn a_grant_must_expire_after_now() {
    let mut l = Ledger::new("open", T0);
    for at in [T0 - 1, T0] {
        assert_eq!(
            l.reject(issue(1, terms(Some(at), 100, PAID)), T0),
            CommandError::GrantExpiryNotInFuture {
                expires_at_ms: at,
                now_ms: T0
            }
        );
    }
    assert_eq!(
        l.reject(issue(0, GrantTerms::PLAIN), T0),
        CommandError::ZeroAmount
    );
    l.grant(1, terms(Some(T0 + 1), 100, PAID), T0);
}

#[test]
fn spends_and_refunds_journal_the_part_that_was_promotional() {
    let mut l = Ledger::new("open", T0);
    let promo = l.grant(30, terms(None, 10, PROMO), T0);
    let plain = l.credit(100, T0);
    let last = |l: &Ledger| l.journal.last().expect("an event").kind.clone();

    let first = l.debit(50, T0);
    assert_eq!(l.draws_of(first), vec![(promo, 30), (plain, 20)]);
    assert!(matches!(last(&l), EventKind::DebitedSplit { .. }));
    assert_eq!(
        (last(&l).name(), last(&l).promotional_micros()),
        ("debit", 30)
    );
    // Drawn from paid money only: the shape a debit had before grants.
    l.debit(20, T0);
    assert!(matches!(last(&l), EventKind::Debited { .. }));
    assert_eq!(last(&l).promotional_micros(), 0);

    // 25 back from the last draw: 20 paid, then 5 promotional.
    l.approve(
        CommandKind::Refund {
            debit_seq: first,
            amount_micros: 25,
        },
        T0,
    );
    assert_eq!(
        (last(&l).name(), last(&l).promotional_micros()),
        ("refund", 5)
    );
    assert_eq!(l.remaining(promo), Some(5));

    // A capture spends the front of its reservation: the 5 promotional, then paid.
    let hold_seq = l.hold(40, 5_000, T0);
    l.approve(
        CommandKind::Capture {
            hold_seq,
            amount_micros: 8,
        },
        T0,
    );
    assert_eq!(
        (last(&l).name(), last(&l).promotional_micros()),
        ("capture", 5)
    );
    assert_eq!(l.state().debited_promotional_total_micros, 35);
    let hold_seq = l.hold(10, 5_000, T0);
    l.approve(
        CommandKind::Capture {
            hold_seq,
            amount_micros: 10,
        },
        T0,
    );
    assert!(matches!(last(&l), EventKind::HoldCaptured { .. }));
}

#[test]
fn evolve_rejects_a_wrong_promotional_part_and_replays_older_unsplit_spends() {
    let mut l = Ledger::new("open", T0);
    l.grant(30, terms(None, 10, PROMO), T0);
    l.credit(100, T0);
    let seq = l.debit(50, T0);
    let split = l.journal.last().expect("the debit").clone();
    let before: Vec<Event> = l.journal[..l.journal.len() - 1].to_vec();
    let replay = |events: &[Event]| {
        events
            .iter()
            .try_fold(None, |s, e| evolve(s, &l.id, e).map(Some))
    };
    let state = replay(&before).expect("replays");
    let period = l.state().period;

    let mut wrong = split.clone();
    wrong.kind = EventKind::DebitedSplit {
        amount_micros: 50,
        period,
        promotional_micros: 29,
    };
    assert!(evolve(state.clone(), &l.id, &wrong).is_err());
    // A build before the split journaled this debit without it: it still replays, and
    // the state (draws, promotional total) is the same as with the split.
    let mut unsplit = split.clone();
    unsplit.kind = EventKind::Debited {
        amount_micros: 50,
        period,
    };
    let from_unsplit = evolve(state.clone(), &l.id, &unsplit).expect("older journals replay");
    let from_split = evolve(state, &l.id, &split).expect("replays");
    assert_eq!(from_unsplit, from_split);
    assert_eq!(from_split.debited_promotional_total_micros, 30);
    assert_eq!(seq, split.seq);
}

#[test]
fn a_record_with_one_credit_and_a_few_debits_holds_no_spare_room() {
    // Every cached agent record pays for its collections' spare capacity; from empty the
    // standard growth reserves four grants, four refundable debits and four draws each.
    let mut l = Ledger::new("open", T0);
    l.credit(1_000, T0);
    l.debit(1, T0);
    let s = l.state();
    assert_eq!((s.grants.len(), s.grants.capacity()), (1, 1));
    assert_eq!((s.refundable.len(), s.refundable.capacity()), (1, 1));
    assert_eq!(s.refundable[0].draws.capacity(), 1);
    for n in 2..=3 {
        l.debit(1, T0);
        assert_eq!(l.state().refundable.capacity(), n, "exact while small");
    }
    // Past four the usual doubling keeps a busy agent's pushes cheap.
    for _ in 0..6 {
        l.debit(1, T0);
    }
    let s = l.state();
    assert_eq!(s.refundable.len(), 9);
    assert!(s.refundable.capacity() >= 9);
    assert_eq!(s.balance_micros, 1_000 - 9);
}
