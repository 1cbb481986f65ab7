//! Random command sequences through the durable engine, with clean restarts and crash
//! restarts (a copy of the data directory taken while the engine still runs) at random
//! points, compared step by step with the same commands decided by `tally-core` in memory.
//! The core itself is checked against an independent reference model in `tally-core`'s
//! tests; this test shows the engine adds durability without changing a single answer:
//! after every step and every restart the outcomes, balances, holds and journals agree.
//!
//! Rate-limit state is volatile by design, so the in-memory side forgets it on restart too.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use proptest::prelude::*;
use tally_core::{
    decide, evolve, AgentId, AgentState, Command, CommandKind, Event, Outcome, Plan, PlanBook,
    PlanName, Priority, RateBucket, RateState, Receipt, Status,
};
use tally_store::{Engine, EngineConfig, ManualClock, Reply};

const AGENTS: usize = 3;

#[derive(Debug, Clone)]
enum Op {
    Create {
        agent: usize,
        plan: usize,
    },
    Credit {
        agent: usize,
        amount: u64,
    },
    Debit {
        agent: usize,
        amount: u64,
        low: bool,
    },
    Check {
        agent: usize,
        amount: u64,
    },
    Hold {
        agent: usize,
        amount: u64,
        ttl_ms: u64,
    },
    /// Capture the n-th hold placed so far (by any agent), some share of it.
    Capture {
        nth: usize,
        per_mille: u64,
    },
    Void {
        nth: usize,
    },
    /// Refund the n-th debit so far, some amount.
    Refund {
        nth: usize,
        amount: u64,
    },
    Suspend {
        agent: usize,
        suspended: bool,
    },
    /// Send the n-th keyed command again with its key.
    Retry {
        nth: usize,
    },
    Advance {
        ms: u64,
    },
    Restart {
        crash: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let agent = 0..AGENTS;
    let amount = prop_oneof![1u64..2_000, Just(u64::MAX), 0u64..3];
    prop_oneof![
        2 => (agent.clone(), 0..3usize).prop_map(|(agent, plan)| Op::Create { agent, plan }),
        3 => (agent.clone(), prop_oneof![1u64..5_000, Just(u64::MAX)]).prop_map(|(agent, amount)| Op::Credit { agent, amount }),
        6 => (agent.clone(), amount.clone(), any::<bool>()).prop_map(|(agent, amount, low)| Op::Debit { agent, amount, low }),
        1 => (agent.clone(), amount.clone()).prop_map(|(agent, amount)| Op::Check { agent, amount }),
        3 => (agent.clone(), 1u64..1_500, 1u64..4_000).prop_map(|(agent, amount, ttl_ms)| Op::Hold { agent, amount, ttl_ms }),
        2 => (0..8usize, 0u64..=1_100).prop_map(|(nth, per_mille)| Op::Capture { nth, per_mille }),
        1 => (0..8usize).prop_map(|nth| Op::Void { nth }),
        2 => (0..8usize, 1u64..800).prop_map(|(nth, amount)| Op::Refund { nth, amount }),
        1 => (agent, prop::bool::weighted(0.3)).prop_map(|(agent, suspended)| Op::Suspend { agent, suspended }),
        2 => (0..40usize).prop_map(|nth| Op::Retry { nth }),
        3 => prop_oneof![1u64..500, 1_000u64..5_000, Just(20 * 86_400_000)].prop_map(|ms| Op::Advance { ms }),
        1 => any::<bool>().prop_map(|crash| Op::Restart { crash }),
    ]
}

fn test_plans() -> PlanBook {
    let open = Plan::unlimited(PlanName::new("default").expect("valid"));
    let mut capped = Plan::unlimited(PlanName::new("capped").expect("valid"));
    capped.monthly_cap_micros = Some(3_000);
    capped.soft_threshold_pct = Some(50);
    capped.anchor_day = 15;
    let mut limited = Plan::unlimited(PlanName::new("limited").expect("valid"));
    limited.buckets = vec![RateBucket::new("default", 3, 1_000, 2).expect("valid")];
    PlanBook::new([open, capped, limited])
}

const PLAN_NAMES: [&str; 3] = ["default", "capped", "limited"];

fn engine_config(dir: &Path) -> EngineConfig {
    let mut c = config(dir);
    // Sweeps would write at moments the in-memory side cannot see; holds still expire
    // before every spend, which both sides do.
    c.hold_sweep_interval_ms = u64::MAX;
    c
}

/// The same commands, decided by the core in memory.
#[derive(Default)]
struct Mirror {
    agents: BTreeMap<AgentId, (AgentState, RateState)>,
    journal: BTreeMap<AgentId, Vec<Event>>,
    keys: BTreeMap<(AgentId, String), (u128, Receipt)>,
}

/// The engine's default retention window of idempotency keys.
const RETENTION_MS: u64 = tally_core::idempotency::RETENTION_MS_DEFAULT;

impl Mirror {
    fn expire_due(&mut self, agent: &AgentId, plans: &PlanBook, now_ms: u64) {
        let Some((state, rate)) = self.agents.get_mut(agent) else {
            return;
        };
        if state.next_hold_expiry_ms().is_none_or(|at| at > now_ms) {
            return;
        }
        let cmd = Command::new(agent.clone(), CommandKind::ExpireHolds);
        let d = decide(Some(state), rate, &cmd, plans, now_ms).expect("expiry decides");
        self.apply(agent, d.events);
    }

    fn apply(&mut self, agent: &AgentId, events: Vec<Event>) {
        for e in &events {
            let state = self
                .agents
                .remove(agent)
                .map(|(s, r)| (Some(s), r))
                .unwrap_or_default();
            let next = evolve(state.0, agent, e).expect("core events evolve");
            self.agents.insert(agent.clone(), (next, state.1));
        }
        self.journal
            .entry(agent.clone())
            .or_default()
            .extend(events);
    }

    /// What the engine must answer for `cmd`.
    fn submit(&mut self, cmd: &Command, plans: &PlanBook, now_ms: u64) -> Reply {
        let key = cmd
            .idempotency_key
            .as_ref()
            .map(|k| (cmd.agent.clone(), k.to_string()));
        if let Some(k) = &key {
            let live = self
                .keys
                .get(k)
                .filter(|(_, r)| now_ms - r.at_ms < RETENTION_MS);
            if let Some((fp, receipt)) = live {
                return if *fp == cmd.fingerprint() {
                    Reply::Decided {
                        outcome: Outcome::Approved(*receipt),
                        rate: None,
                        replayed: true,
                    }
                } else {
                    Reply::KeyReused
                };
            }
        }
        if cmd.kind.spends() {
            self.expire_due(&cmd.agent, plans, now_ms);
        }
        let mut fresh = RateState::default();
        let (state, rate) = match self.agents.get_mut(&cmd.agent) {
            Some((s, r)) => (Some(&*s), r),
            None => (None, &mut fresh),
        };
        match decide(state, rate, cmd, plans, now_ms) {
            Err(e) => Reply::Rejected(e),
            Ok(d) => {
                if let (Some(k), Outcome::Approved(r), false) =
                    (key, &d.outcome, d.events.is_empty())
                {
                    self.keys.insert(k, (cmd.fingerprint(), *r));
                }
                let reply = Reply::Decided {
                    outcome: d.outcome.clone(),
                    rate: d.rate.clone(),
                    replayed: false,
                };
                if !d.events.is_empty() {
                    self.apply(&cmd.agent, d.events);
                }
                reply
            }
        }
    }
}

async fn check_agree(engine: &Engine, mirror: &Mirror) {
    for i in 0..AGENTS {
        let a = agent(&format!("p{i}"));
        let stored = engine.agent(&a).await.expect("reads");
        let expected = mirror.agents.get(&a).map(|(s, _)| s.clone());
        assert_eq!(stored, expected, "agent {a}");
        if let Some(s) = &stored {
            s.check_invariants().expect("invariants");
            let journal = engine.journal(&a, 0, usize::MAX).await.expect("reads");
            assert_eq!(Some(&journal), mirror.journal.get(&a), "journal of {a}");
        }
    }
}

fn run(ops: Vec<Op>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let root = tempfile::tempdir().expect("tempdir");
        let mut generation = 0;
        let dir_of = |g: usize| -> PathBuf { root.path().join(format!("gen{g}")) };
        let plans = test_plans();
        let clock = Arc::new(ManualClock::new(T0_MS));
        let open_engine = |dir: &Path| {
            Engine::open(engine_config(dir), test_plans(), clock.clone(), None).expect("opens")
        };
        let mut engine = open_engine(&dir_of(0));
        let mut mirror = Mirror::default();
        let mut sent: Vec<Command> = Vec::new();
        let mut holds: Vec<(AgentId, u64, u64)> = Vec::new();
        let mut debits: Vec<(AgentId, u64)> = Vec::new();
        for (n, op) in ops.into_iter().enumerate() {
            let now_ms = tally_store::Clock::now_ms(clock.as_ref());
            let key = format!("k{n}");
            let a = |i: usize| agent(&format!("p{i}"));
            let command = match op {
                Op::Create { agent, plan } => Some(cmd(&a(agent), create(PLAN_NAMES[plan]), &key)),
                Op::Credit { agent, amount } => Some(cmd(
                    &a(agent),
                    CommandKind::Credit {
                        amount_micros: amount,
                    },
                    &key,
                )),
                Op::Debit { agent, amount, low } => Some(
                    cmd(
                        &a(agent),
                        CommandKind::Debit {
                            amount_micros: amount,
                        },
                        &key,
                    )
                    .with_priority(if low {
                        Priority::Low
                    } else {
                        Priority::Critical
                    }),
                ),
                Op::Check { agent, amount } => Some(Command::new(
                    a(agent),
                    CommandKind::Check {
                        amount_micros: amount,
                    },
                )),
                Op::Hold {
                    agent,
                    amount,
                    ttl_ms,
                } => Some(cmd(
                    &a(agent),
                    CommandKind::Hold {
                        amount_micros: amount,
                        ttl_ms,
                    },
                    &key,
                )),
                Op::Capture { nth, per_mille } => holds.get(nth).map(|(ag, seq, amount)| {
                    let amount_micros = amount * per_mille / 1_000;
                    cmd(
                        ag,
                        CommandKind::Capture {
                            hold_seq: *seq,
                            amount_micros,
                        },
                        &key,
                    )
                }),
                Op::Void { nth } => holds
                    .get(nth)
                    .map(|(ag, seq, _)| cmd(ag, CommandKind::Void { hold_seq: *seq }, &key)),
                Op::Refund { nth, amount } => debits.get(nth).map(|(ag, seq)| {
                    cmd(
                        ag,
                        CommandKind::Refund {
                            debit_seq: *seq,
                            amount_micros: amount,
                        },
                        &key,
                    )
                }),
                Op::Suspend { agent, suspended } => Some(cmd(
                    &a(agent),
                    CommandKind::UpdateAgent {
                        plan: None,
                        status: Some(if suspended {
                            Status::Suspended
                        } else {
                            Status::Active
                        }),
                    },
                    &key,
                )),
                Op::Retry { nth } => sent.get(nth).cloned(),
                Op::Advance { ms } => {
                    clock.advance(ms);
                    None
                }
                Op::Restart { crash } => {
                    generation += 1;
                    if crash {
                        // Denials and rejections are answered before the run they were
                        // decided in is written, and that run may hold hold expiries. Let
                        // it finish (a read waits for the runs before it), then take the
                        // files as a crash would leave them.
                        for i in 0..AGENTS {
                            engine.agent(&a(i)).await.expect("reads");
                        }
                        common::copy_dir(&dir_of(generation - 1), &dir_of(generation));
                        // The old engine's directory is never opened again; stop it so
                        // its threads do not pile up over many cases.
                        engine.shutdown().await.expect("shuts down");
                        drop(engine);
                    } else {
                        engine.shutdown().await.expect("shuts down");
                        drop(engine);
                        std::fs::rename(dir_of(generation - 1), dir_of(generation))
                            .expect("renames");
                    }
                    engine = open_engine(&dir_of(generation));
                    for (_, rate) in mirror.agents.values_mut() {
                        *rate = RateState::default();
                    }
                    check_agree(&engine, &mirror).await;
                    None
                }
            };
            let Some(command) = command else { continue };
            let expected = mirror.submit(&command, &plans, now_ms);
            let got = engine.submit(command.clone()).await.expect("submits");
            assert_eq!(got, expected, "step {n}: {command:?}");
            if std::env::var("ENGINE_VS_CORE_TRACE").is_ok() {
                eprintln!("{n}: {:?} -> {got:?}", command.kind);
            }
            if let Reply::Decided {
                outcome: Outcome::Approved(r),
                replayed: false,
                ..
            } = got
            {
                match command.kind {
                    CommandKind::Hold { amount_micros, .. } => {
                        holds.push((command.agent.clone(), r.first_seq, amount_micros))
                    }
                    CommandKind::Debit { .. } => debits.push((command.agent.clone(), r.first_seq)),
                    CommandKind::Capture { .. } => {
                        debits.push((command.agent.clone(), r.first_seq))
                    }
                    _ => {}
                }
            }
            if command.idempotency_key.is_some() {
                sent.push(command);
            }
        }
        check_agree(&engine, &mirror).await;
        engine.shutdown().await.expect("shuts down");
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: proptest_cases(48), max_shrink_iters: 200, ..ProptestConfig::default() })]

    #[test]
    fn engine_with_restarts_agrees_with_the_core(ops in proptest::collection::vec(op(), 1..80)) {
        // Every run starts with one agent on each plan and some money, so that most
        // commands reach the interesting rules rather than "unknown agent".
        let mut prologue: Vec<Op> = (0..AGENTS).map(|i| Op::Create { agent: i, plan: i }).collect();
        prologue.extend((0..AGENTS).map(|i| Op::Credit { agent: i, amount: 10_000 }));
        prologue.extend(ops);
        run(prologue);
    }
}
