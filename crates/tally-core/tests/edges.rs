//! Edge cases of the ledger rules, each driven through `decide` and applied with
//! `evolve`: exact balances, one micro short, `u64::MAX`, zero amounts, caps exactly
//! reached and one micro past, the soft threshold by priority, holds at exactly their
//! TTL, over-captures and over-refunds, the decision order, 402 `retry_after_ms`, and
//! month boundaries (Dec 31 → Jan 1, Feb 29).

use tally_core::{
    decide, evolve, AgentId, AgentState, Command, CommandError, CommandKind, Decision, Denial,
    Event, Outcome, Plan, PlanBook, PlanName, Priority, RateBucket, RateState, Status,
};

/// 2026-11-29T13:00:00Z, a Sunday afternoon with nothing special about it.
const T0: u64 = 1_795_957_200_000;
/// 2026-12-31T23:59:59.999Z and the next millisecond, 2027-01-01T00:00:00Z.
const DEC_31_LAST_MS: u64 = 1_798_761_599_999;
const JAN_1_2027: u64 = 1_798_761_600_000;
const FEB_1_2027: u64 = 1_801_440_000_000;
/// 2028 is a leap year.
const FEB_1_2028: u64 = 1_832_976_000_000;
const FEB_28_2028: u64 = 1_835_308_800_000;
const FEB_29_2028_NOON: u64 = 1_835_438_400_000;
const MAR_1_2028: u64 = 1_835_481_600_000;
const MAR_28_2028: u64 = 1_837_814_400_000;

const CAP_MICROS: u64 = 1_000;

fn plan_name(name: &str) -> PlanName {
    PlanName::new(name).expect("valid plan name")
}

/// "open": no limits; "capped": cap 1,000 with an 80 % soft threshold; "capped28": the
/// same cap with periods starting on the 28th; "limited": one request per second.
fn plans() -> PlanBook {
    let open = Plan::unlimited(plan_name("open"));
    let mut capped = Plan::unlimited(plan_name("capped"));
    capped.monthly_cap_micros = Some(CAP_MICROS);
    capped.soft_threshold_pct = Some(80);
    let mut capped28 = capped.clone();
    capped28.name = plan_name("capped28");
    capped28.anchor_day = 28;
    let mut limited = Plan::unlimited(plan_name("limited"));
    limited.buckets = vec![RateBucket::new("default", 1, 1_000, 1).expect("valid bucket")];
    for p in [&open, &capped, &capped28, &limited] {
        p.validate().expect("test plans are valid");
    }
    PlanBook::new([open, capped, capped28, limited])
}

/// One agent driven through `decide`, with every approved event applied by `evolve`
/// and the journal kept so that a replay can be compared with the live state.
struct Ledger {
    id: AgentId,
    state: Option<AgentState>,
    rate: RateState,
    plans: PlanBook,
    journal: Vec<Event>,
}

impl Ledger {
    fn new(plan: &str, now_ms: u64) -> Self {
        let mut ledger = Self {
            id: AgentId::new("agent-1").expect("valid id"),
            state: None,
            rate: RateState::default(),
            plans: plans(),
            journal: Vec::new(),
        };
        ledger.approve(
            CommandKind::CreateAgent {
                plan: plan_name(plan),
                status: Status::Active,
            },
            now_ms,
        );
        ledger
    }

    fn state(&self) -> &AgentState {
        self.state.as_ref().expect("agent exists")
    }

    fn cmd(&self, kind: CommandKind) -> Command {
        Command::new(self.id.clone(), kind)
    }

    /// Decides and applies; checks invariants and that a replay of the journal from
    /// nothing gives the same state. A denial or error must leave the state untouched.
    fn run_cmd(&mut self, cmd: &Command, now_ms: u64) -> Result<Decision, CommandError> {
        let before = self.state.clone();
        let result = decide(
            self.state.as_ref(),
            &mut self.rate,
            cmd,
            &self.plans,
            now_ms,
        );
        match &result {
            Ok(decision) => {
                if !matches!(decision.outcome, Outcome::Approved(_)) {
                    assert!(decision.events.is_empty(), "a denial writes nothing");
                }
                for event in &decision.events {
                    let next = evolve(self.state.take(), &self.id, event).expect("evolves");
                    self.state = Some(next);
                    self.journal.push(event.clone());
                }
            }
            Err(_) => assert_eq!(self.state, before, "an error changes nothing"),
        }
        if let Some(s) = &self.state {
            s.check_invariants().expect("invariants hold");
            let mut replayed = None;
            for event in &self.journal {
                replayed = Some(evolve(replayed, &self.id, event).expect("replays"));
            }
            assert_eq!(replayed.as_ref(), Some(s), "replay equals the live state");
        }
        result
    }

    fn run(&mut self, kind: CommandKind, now_ms: u64) -> Result<Decision, CommandError> {
        let cmd = self.cmd(kind);
        self.run_cmd(&cmd, now_ms)
    }

    /// Runs a command that must be approved; returns the seq of its first event.
    fn approve(&mut self, kind: CommandKind, now_ms: u64) -> u64 {
        let label = format!("{kind:?}");
        match self.run(kind, now_ms) {
            Ok(Decision {
                outcome: Outcome::Approved(receipt),
                ..
            }) => receipt.first_seq,
            other => panic!("{label} should be approved, got {other:?}"),
        }
    }

    fn deny(&mut self, kind: CommandKind, now_ms: u64) -> Denial {
        let cmd = self.cmd(kind);
        self.deny_cmd(&cmd, now_ms)
    }

    fn deny_cmd(&mut self, cmd: &Command, now_ms: u64) -> Denial {
        let before = self.state.clone();
        match self.run_cmd(cmd, now_ms) {
            Ok(Decision {
                outcome: Outcome::Denied(denial),
                events,
                ..
            }) => {
                assert!(events.is_empty());
                assert_eq!(self.state, before, "a denial changes nothing");
                denial
            }
            other => panic!("{:?} should be denied, got {other:?}", cmd.kind),
        }
    }

    fn reject(&mut self, kind: CommandKind, now_ms: u64) -> CommandError {
        let label = format!("{kind:?}");
        match self.run(kind, now_ms) {
            Err(e) => e,
            Ok(d) => panic!("{label} should be rejected, got {d:?}"),
        }
    }

    fn credit(&mut self, amount_micros: u64, now_ms: u64) -> u64 {
        self.approve(CommandKind::Credit { amount_micros }, now_ms)
    }

    fn debit(&mut self, amount_micros: u64, now_ms: u64) -> u64 {
        self.approve(CommandKind::Debit { amount_micros }, now_ms)
    }

    fn hold(&mut self, amount_micros: u64, ttl_ms: u64, now_ms: u64) -> u64 {
        self.approve(
            CommandKind::Hold {
                amount_micros,
                ttl_ms,
            },
            now_ms,
        )
    }

    fn set_status(&mut self, status: Status, now_ms: u64) {
        self.approve(
            CommandKind::UpdateAgent {
                plan: None,
                status: Some(status),
            },
            now_ms,
        );
    }

    fn balance(&self) -> u64 {
        self.state().balance_micros
    }

    fn held(&self) -> u64 {
        self.state().held_micros
    }
}

fn debit(amount_micros: u64) -> CommandKind {
    CommandKind::Debit { amount_micros }
}

fn debit_low(ledger: &Ledger, amount_micros: u64) -> Command {
    ledger
        .cmd(debit(amount_micros))
        .with_priority(Priority::Low)
}

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
