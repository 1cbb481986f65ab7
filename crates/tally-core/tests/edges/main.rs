//! Edge cases of the ledger rules, each driven through `decide` and applied with
//! `evolve`: exact balances, one micro short, `u64::MAX`, zero amounts, caps exactly
//! reached and one micro past, the soft threshold by priority, holds at exactly their
//! TTL, over-captures and over-refunds, the decision order, 402 `retry_after_ms`, and
//! month boundaries (Dec 31 → Jan 1, Feb 29).

use tally_core::{
    decide, evolve, AgentId, AgentState, Command, CommandError, CommandKind, Decision, Denial,
    Event, Outcome, Plan, PlanBook, PlanName, Priority, RateBucket, RateState, Status, Thresholds,
};

/// 2026-11-29T13:00:00Z, a Sunday afternoon with nothing special about it.
const T0: u64 = 1_795_957_200_000;
/// 2026-12-31T23:59:59.999Z and the next millisecond, 2027-01-01T00:00:00Z.
const DEC_31_LAST_MS: u64 = 1_798_761_599_999;
const JAN_1_2027: u64 = 1_798_761_600_000;
const FEB_1_2027: u64 = 1_801_440_000_000;
/// 2027-01-10T12:00:00Z, 2027-01-28T00:00:00Z and 2027-02-28T00:00:00Z: mid-period for
/// anchor day 1, and two period starts for anchor day 28.
const JAN_10_2027_NOON: u64 = 1_799_582_400_000;
const JAN_28_2027: u64 = 1_801_094_400_000;
const FEB_28_2027: u64 = 1_803_772_800_000;
/// 2028 is a leap year.
const FEB_1_2028: u64 = 1_832_976_000_000;
const FEB_28_2028: u64 = 1_835_308_800_000;
const FEB_29_2028_NOON: u64 = 1_835_438_400_000;
const MAR_1_2028: u64 = 1_835_481_600_000;
const MAR_28_2028: u64 = 1_837_814_400_000;

const CAP_MICROS: u64 = 1_000;
/// The "notified" plan's low-balance threshold.
const LOW_BALANCE_MICROS: u64 = 500;

fn plan_name(name: &str) -> PlanName {
    PlanName::new(name).expect("valid plan name")
}

/// "open": no limits; "capped": cap 1,000 with an 80 % soft threshold; "capped28": the
/// same cap with periods starting on the 28th; "limited": one request per second;
/// "notified": "capped" with notifications below 500 micros and at 50 % of the cap.
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
    let mut notified = capped.clone();
    notified.name = plan_name("notified");
    let notified = notified
        .with_thresholds(Thresholds {
            balance_below_micros: Some(LOW_BALANCE_MICROS),
            cap_spend_percent: Some(50),
            grant_expiring_within_ms: None,
        })
        .expect("valid thresholds");
    for p in [&open, &capped, &capped28, &limited] {
        p.validate().expect("test plans are valid");
    }
    PlanBook::new([open, capped, capped28, limited, notified])
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

    /// Runs a command that must be approved; returns the seq of its own event (after the
    /// expiries of due grants journaled ahead of it).
    fn approve(&mut self, kind: CommandKind, now_ms: u64) -> u64 {
        let label = format!("{kind:?}");
        match self.run(kind, now_ms) {
            Ok(Decision {
                outcome: Outcome::Approved(receipt),
                ..
            }) => receipt.seq,
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

    fn set_plan(&mut self, plan: &str, now_ms: u64) {
        self.approve(
            CommandKind::UpdateAgent {
                plan: Some(plan_name(plan)),
                status: None,
            },
            now_ms,
        );
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

mod amounts;
mod api_keys;
mod caps;
mod grants;
mod holds;
mod order;
mod thresholds;
