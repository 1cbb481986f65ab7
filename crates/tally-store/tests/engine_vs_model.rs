//! The core's model test, run through the durable engine with restarts (issue 4, first
//! check): the same random ops (`ops.rs`) and the same independent reference model
//! (`reference.rs`, `world.rs`), compiled here from `tally-core/tests/model/`, but every
//! command goes to a real `tally_store::Engine` (sled files, `ManualClock`) and the
//! `Restart` op closes the store and opens it again, alternating a clean shutdown and a
//! crash (a copy of the data directory taken while the engine still runs; the next engine
//! opens the copy). After every step the engine's answer and the agents it returns agree with
//! the model exactly as in the core's test (answer kind and fields: a receipt's amount,
//! balance, held and new hold's expiry, a denial's fields, the `RateLimit` status of an
//! approval or a check; then balances, held, holds, refundable debits, totals,
//! current-period spend, version, invariants, conservation per agent and globally); after a restart the reopened engine shows the same agents and the
//! same journals as before it, and these still agree with the model.
//!
//! Where the engine differs from a bare `decide` by design, the harness does the
//! equivalent on the model's side, explicitly:
//! - Before every spend (debit, hold, check) the engine releases the agent's due holds and
//!   expires its due grants as an `ExpireHolds` command of its own, journaled, even when
//!   the spend is then denied or rejected. The model is sent the same `ExpireHolds` first
//!   whenever one of its holds or grants is due, and the step must have written exactly those entries plus the command's own.
//!   The engine's background sweep is turned off (`hold_sweep_interval_ms = u64::MAX`): it
//!   writes at moments the model cannot see.
//! - State-changing commands need an idempotency key; each gets a fresh one, so the
//!   engine never replays and the model needs none. Checks go without a key. After each
//!   restart the last fresh approval still inside the retention window is sent again with
//!   its key (its stored receipt comes back, marked replayed, and nothing changes), and
//!   its key with a different request is refused (`KeyReused`, nothing changes): the model
//!   is left untouched by both.
//! - Rate-limit state lives in memory only and starts fresh after a restart; the model
//!   forgets its TATs at each `Restart`, as in the core's test.
//!
//! The same test runs on a shared store (the engine's shared-store mode: nothing kept in
//! memory between runs, every write a compare-and-set): an in-memory one always, and a real
//! Redis Cluster when `TALLY_REDIS_CLUSTER` names one. A restart there is a new engine on
//! the same store, and the limiter state is stored with each agent, so the model keeps its
//! TATs across restarts.

mod common;
#[path = "../../tally-core/tests/model/ops.rs"]
mod ops;
#[path = "../../tally-core/tests/model/reference.rs"]
mod reference;
#[path = "../../tally-core/tests/model/world.rs"]
mod world;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use proptest::prelude::*;
use tally_core::{
    evolve, AgentId, AgentState, Command, CommandError, CommandKind, Event, IdempotencyKey,
    Outcome, Priority, Receipt,
};
use tally_store::{Clock, Engine, ManualClock, Reply, Storage};

use ops::*;
use reference::*;
use world::*;

fn fail(e: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(e.to_string())
}

/// Where the engine under test keeps the ledger.
#[derive(Clone)]
enum Backend {
    Sled,
    /// Kept across restarts; a restart opens a new engine on it.
    Shared(Arc<dyn Storage>),
}

fn open(
    backend: &Backend,
    dir: &Path,
    clock: &Arc<ManualClock>,
    agents_cached_max: usize,
) -> Engine {
    let mut config = common::config(dir);
    config.hold_sweep_interval_ms = u64::MAX;
    config.agents_cached_max = agents_cached_max;
    match backend {
        Backend::Sled => Engine::open(config, plan_book(), clock.clone(), None),
        Backend::Shared(store) => {
            Engine::open_with(store.clone(), config, plan_book(), clock.clone(), None)
        }
    }
    .expect("engine opens")
}

fn replay(id: &AgentId, journal: &[Event]) -> Result<Option<AgentState>, TestCaseError> {
    let mut state = None;
    for event in journal {
        state = Some(evolve(state, id, event).map_err(fail)?);
    }
    Ok(state)
}

/// The durable engine next to the model's side.
struct Harness {
    m: ModelWorld,
    clock: Arc<ManualClock>,
    root: tempfile::TempDir,
    generation: usize,
    engine: Option<Engine>,
    /// Whether the next restart is a crash; restarts alternate.
    crash_next: bool,
    /// The agents as the engine last returned them, and their journals as read back.
    states: Vec<Option<AgentState>>,
    journals: Vec<Vec<Event>>,
    steps: u64,
    /// The last fresh approval that wrote entries, with its receipt.
    last_keyed: Option<(Command, Receipt)>,
    /// `EngineConfig::agents_cached_max` of every engine opened.
    agents_cached_max: usize,
    backend: Backend,
}

impl Harness {
    fn new(
        start_ms: u64,
        crash_first: bool,
        agents_cached_max: usize,
        backend: Backend,
        id_prefix: &str,
    ) -> Self {
        let root = tempfile::tempdir().expect("tempdir");
        let clock = Arc::new(ManualClock::new(start_ms));
        let engine = open(
            &backend,
            &root.path().join("gen0"),
            &clock,
            agents_cached_max,
        );
        Self {
            m: ModelWorld::new(start_ms).with_id_prefix(id_prefix),
            clock,
            root,
            generation: 0,
            engine: Some(engine),
            crash_next: crash_first,
            states: vec![None; AGENTS],
            journals: vec![Vec::new(); AGENTS],
            steps: 0,
            last_keyed: None,
            agents_cached_max,
            backend,
        }
    }

    fn engine(&self) -> &Engine {
        self.engine.as_ref().expect("an open engine")
    }

    fn dir(&self, generation: usize) -> PathBuf {
        self.root.path().join(format!("gen{generation}"))
    }

    /// Reads every agent; a read waits for the runs before it, so the journal is on disk.
    async fn read_states(&self) -> Result<Vec<Option<AgentState>>, TestCaseError> {
        let mut states = Vec::with_capacity(AGENTS);
        for id in &self.m.ids {
            states.push(self.engine().agent(id).await.map_err(fail)?);
        }
        Ok(states)
    }

    async fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        if self.m.move_clock(op) {
            self.clock.set(self.m.now_ms);
            return Ok(());
        }
        if let Op::Restart = op {
            return self.restart().await;
        }
        self.command(op).await
    }

    /// The model's side of the engine's expiry before a spend: the number of entries it
    /// writes.
    fn expire_due(&mut self, agent: usize) -> Result<u64, TestCaseError> {
        let now_ms = self.m.now_ms;
        let due = self.m.model.get(&self.m.key(agent)).is_some_and(|m| {
            m.holds.values().any(|h| h.expires_at_ms <= now_ms)
                || m.grants
                    .values()
                    .any(|g| g.terms.expires_at_ms.is_some_and(|at| at <= now_ms))
        });
        if !due {
            return Ok(0);
        }
        match self
            .m
            .expect(agent, &CommandKind::ExpireHolds, Priority::Normal)
        {
            Ok(Expect::Approved { events, .. }) => Ok(u64::from(events)),
            // The engine logs a failed expiry and goes on; nothing changed.
            Err(_) => Ok(0),
            Ok(other) => Err(fail(format!("expiry answered {other:?}"))),
        }
    }

    async fn command(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let (agent, kind, prio) = self.m.command(op).expect("an agent command");
        let now_ms = self.m.now_ms;
        prop_assert_eq!(self.clock.now_ms(), now_ms);
        let id = self.m.ids[agent].clone();
        let expired = if kind.spends() {
            self.expire_due(agent)?
        } else {
            0
        };
        let seq_before = self.m.model.get(&self.m.key(agent)).map_or(0, |m| m.seq);
        let expected = self.m.expect(agent, &kind, prio);
        let mut cmd = Command::new(id.clone(), kind.clone()).with_priority(prio);
        if !matches!(kind, CommandKind::Check { .. }) {
            self.steps += 1;
            let key = IdempotencyKey::new(format!("step-{}", self.steps)).expect("valid key");
            cmd = cmd.with_key(key);
        }
        let reply = self.engine().submit(cmd.clone()).await.map_err(fail)?;
        let actual: Result<(Expect, Option<Receipt>), CommandError> = match &reply {
            Reply::Rejected(e) => Err(e.clone()),
            Reply::Decided {
                outcome,
                rate,
                replayed: false,
            } => Ok((
                expect_of(outcome, rate.as_ref()),
                match outcome {
                    Outcome::Approved(r) => Some(*r),
                    _ => None,
                },
            )),
            other => {
                return Err(fail(format!(
                    "{kind:?} at {now_ms}: fresh key answered {other:?}"
                )))
            }
        };
        let written = match (&expected, &actual) {
            (Err(want), Err(got)) => {
                prop_assert_eq!(want, got, "{:?} at {}", kind, now_ms);
                0
            }
            (Ok(want), Ok((got, receipt))) => {
                prop_assert_eq!(want, got, "{:?} at {}", kind, now_ms);
                match (want, receipt) {
                    (Expect::Approved { events, .. }, Some(r)) => {
                        prop_assert_eq!(r.at_ms, now_ms);
                        if *events > 0 {
                            prop_assert_eq!(r.first_seq, seq_before + 1, "receipt's first seq");
                            prop_assert_eq!(r.last_seq, seq_before + u64::from(*events));
                            if cmd.idempotency_key.is_some() {
                                self.last_keyed = Some((cmd.clone(), *r));
                            }
                        }
                        u64::from(*events)
                    }
                    _ => 0,
                }
            }
            _ => {
                return Err(fail(format!(
                    "{kind:?} at {now_ms}: model {expected:?}, engine {reply:?}"
                )))
            }
        };
        self.after_step(agent, expired + written, &kind).await
    }

    /// Reads the agents and the new journal entries back: the step wrote exactly
    /// `entries` entries for `agent` (dense, stamped `now`), which take it from its state
    /// before to its state after; no other agent changed; the whole journal replays to the
    /// live state; and everything agrees with the model.
    async fn after_step(
        &mut self,
        agent: usize,
        entries: u64,
        kind: &CommandKind,
    ) -> Result<(), TestCaseError> {
        let now_ms = self.m.now_ms;
        let id = self.m.ids[agent].clone();
        let states = self.read_states().await?;
        for (i, (before, after)) in self.states.iter().zip(&states).enumerate() {
            if i != agent {
                prop_assert_eq!(before, after, "agent {} untouched by {:?}", i, kind);
            }
        }
        let after_seq = self.journals[agent].last().map_or(0, |e| e.seq);
        let new = self
            .engine()
            .journal(&id, after_seq, usize::MAX)
            .await
            .map_err(fail)?;
        prop_assert_eq!(new.len() as u64, entries, "entries written by {:?}", kind);
        let mut state = self.states[agent].take();
        for (i, event) in new.iter().enumerate() {
            prop_assert_eq!(event.seq, after_seq + 1 + i as u64, "dense seqs");
            prop_assert_eq!(event.at_ms, now_ms);
            state = Some(evolve(state, &id, event).map_err(fail)?);
        }
        prop_assert_eq!(&state, &states[agent], "{:?}: entries vs live agent", kind);
        self.journals[agent].extend(new);
        self.states = states;
        // Replaying this agent's journal from nothing gives exactly its live state.
        let replayed = replay(&id, &self.journals[agent])?;
        prop_assert_eq!(&replayed, &self.states[agent], "replay of agent {}", agent);
        self.m.check_all(&self.states)
    }

    /// Closes the store (a clean shutdown or a crash) and opens it again.
    async fn restart(&mut self) -> Result<(), TestCaseError> {
        let crash = self.crash_next;
        self.crash_next = !crash;
        let (old, new) = (self.dir(self.generation), self.dir(self.generation + 1));
        self.generation += 1;
        let engine = self.engine.take().expect("an open engine");
        if let Backend::Shared(_) = &self.backend {
            // Nothing lives in the node: every answered change is in the shared store.
            engine.shutdown().await.map_err(fail)?;
            drop(engine);
        } else if crash {
            // Denials and rejections are answered before the run they were decided in is
            // written, and that run may hold hold expiries: `after_step` read every agent,
            // which waits for it. Take the files as a crash would leave them.
            common::copy_dir(&old, &new);
            // The old engine then stops in its own directory, which nothing opens again:
            // the copy has none of what its shutdown writes, and its threads do not pile
            // up over hundreds of cases (as they would if it were leaked).
            engine.shutdown().await.map_err(fail)?;
            drop(engine);
        } else {
            engine.shutdown().await.map_err(fail)?;
            drop(engine);
            std::fs::rename(&old, &new).map_err(fail)?;
        }
        self.engine = Some(open(
            &self.backend,
            &new,
            &self.clock,
            self.agents_cached_max,
        ));
        if let Backend::Sled = self.backend {
            self.m.forget_rates();
        }
        // The reopened engine shows exactly the agents and journals acknowledged before.
        let states = self.read_states().await?;
        for (i, state) in states.iter().enumerate() {
            prop_assert_eq!(state, &self.states[i], "agent {} after restart", i);
            let journal = self
                .engine()
                .journal(&self.m.ids[i], 0, usize::MAX)
                .await
                .map_err(fail)?;
            prop_assert_eq!(
                &journal,
                &self.journals[i],
                "journal of agent {} after restart",
                i
            );
            let rebuilt = replay(&self.m.ids[i], &journal)?;
            prop_assert_eq!(&rebuilt, state, "restart of agent {}", i);
        }
        self.m.check_all(&self.states)?;
        self.retry_last_keyed().await
    }

    /// The idempotency index survived: the last fresh approval, sent again with its key
    /// inside the retention window, gets its stored receipt back; its key with another
    /// request is refused. Neither changes anything, in the engine or in the model.
    async fn retry_last_keyed(&mut self) -> Result<(), TestCaseError> {
        let Some((cmd, receipt)) = self.last_keyed.clone() else {
            return Ok(());
        };
        // Well inside the window, so that the boundary itself is not what is tested here.
        let retention_ms = common::config(self.root.path()).idempotency_retention_ms;
        if self.m.now_ms - receipt.at_ms >= retention_ms / 2 {
            return Ok(());
        }
        let got = self.engine().submit(cmd.clone()).await.map_err(fail)?;
        prop_assert_eq!(
            got,
            Reply::Decided {
                outcome: Outcome::Approved(receipt),
                rate: None,
                replayed: true,
            },
            "retry of {:?} after restart",
            cmd
        );
        let other = match cmd.kind {
            CommandKind::Credit { amount_micros: 1 } => 2,
            _ => 1,
        };
        let mut reused = Command::new(
            cmd.agent.clone(),
            CommandKind::Credit {
                amount_micros: other,
            },
        );
        reused.idempotency_key = cmd.idempotency_key.clone();
        let got = self.engine().submit(reused).await.map_err(fail)?;
        prop_assert_eq!(got, Reply::KeyReused, "key of {:?} reused", cmd);
        let states = self.read_states().await?;
        prop_assert_eq!(&states, &self.states, "a replay changes nothing");
        for i in 0..AGENTS {
            let after_seq = self.journals[i].last().map_or(0, |e| e.seq);
            let new = self
                .engine()
                .journal(&self.m.ids[i], after_seq, usize::MAX)
                .await
                .map_err(fail)?;
            prop_assert!(new.is_empty(), "a replay writes nothing: {:?}", new);
        }
        Ok(())
    }

    async fn close(mut self) -> Result<(), TestCaseError> {
        if let Some(engine) = self.engine.take() {
            engine.shutdown().await.map_err(fail)?;
        }
        Ok(())
    }
}

fn run(
    start_ms: u64,
    plans: &[usize],
    last_plan: Option<usize>,
    ops: &[Op],
    crash_first: bool,
    agents_cached_max: usize,
    backend: Backend,
) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let id_prefix = match backend {
        Backend::Sled => String::new(),
        Backend::Shared(_) => common::unique_prefix(),
    };
    rt.block_on(async move {
        let mut h = Harness::new(
            start_ms,
            crash_first,
            agents_cached_max,
            backend,
            &id_prefix,
        );
        // The first agents exist from the start; the last one maybe only once an op
        // creates it.
        for (agent, plan) in plans.iter().chain(&last_plan).enumerate() {
            h.apply(&Op::Create { agent, plan: *plan }).await?;
        }
        for op in ops {
            h.apply(op).await?;
        }
        h.close().await
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(128), max_shrink_iters: 400, ..ProptestConfig::default() })]

    #[test]
    fn engine_with_restarts_agrees_with_the_reference_model(
        start in start_ms(),
        plans in proptest::collection::vec(0..PLANS.len(), AGENTS - 1),
        last_plan in proptest::option::weighted(0.6, 0..PLANS.len()),
        ops in proptest::collection::vec(op(), 1..160),
        crash_first in any::<bool>(),
    ) {
        run(start, &plans, last_plan, &ops, crash_first, tally_store::AGENTS_CACHED_MAX_DEFAULT, Backend::Sled)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(64), max_shrink_iters: 400, ..ProptestConfig::default() })]

    /// Two records in memory over two shards, for more agents than that: nearly every
    /// command and read loads its agent from the store, and records leave memory between
    /// runs (those with open holds or a busy limiter stay).
    #[test]
    fn engine_with_a_cache_of_two_records_agrees_with_the_reference_model(
        start in start_ms(),
        plans in proptest::collection::vec(0..PLANS.len(), AGENTS - 1),
        last_plan in proptest::option::weighted(0.6, 0..PLANS.len()),
        ops in proptest::collection::vec(op(), 1..160),
        crash_first in any::<bool>(),
    ) {
        run(start, &plans, last_plan, &ops, crash_first, 2, Backend::Sled)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(64), max_shrink_iters: 400, ..ProptestConfig::default() })]

    /// The engine's shared-store mode on an in-memory shared store.
    #[test]
    fn engine_on_a_shared_store_agrees_with_the_reference_model(
        start in start_ms(),
        plans in proptest::collection::vec(0..PLANS.len(), AGENTS - 1),
        last_plan in proptest::option::weighted(0.6, 0..PLANS.len()),
        ops in proptest::collection::vec(op(), 1..160),
        crash_first in any::<bool>(),
    ) {
        let retention_ms = common::config(Path::new(".")).idempotency_retention_ms;
        let store = Arc::new(common::shared_mem::SharedMem::new(retention_ms));
        run(start, &plans, last_plan, &ops, crash_first, 2, Backend::Shared(store))?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(24), max_shrink_iters: 100, ..ProptestConfig::default() })]

    /// The engine on a real Redis Cluster (`TALLY_REDIS_CLUSTER`); each case's agents have
    /// ids of their own.
    #[test]
    fn engine_on_redis_cluster_agrees_with_the_reference_model(
        start in start_ms(),
        plans in proptest::collection::vec(0..PLANS.len(), AGENTS - 1),
        last_plan in proptest::option::weighted(0.6, 0..PLANS.len()),
        ops in proptest::collection::vec(op(), 1..160),
        crash_first in any::<bool>(),
    ) {
        let Some(store) = common::redis_store(common::config(Path::new(".")).idempotency_retention_ms) else {
            return Ok(());
        };
        run(start, &plans, last_plan, &ops, crash_first, 2, Backend::Shared(store))?;
    }
}
