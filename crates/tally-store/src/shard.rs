//! A shard: one thread that owns a subset of agents, decides their commands with
//! `tally-core` in runs, applies each run's journal entries in one batch, and hands the
//! answers to the committer, which releases them only after a group commit (fsync) made
//! the run durable. Denials and checks touch no disk and are answered at once.
//!
//! A shard holds at most its share of `agents_cached_max` agent records in memory. An
//! agent not in memory is loaded from the store (checkpoint + journal tail) when a command
//! or read first needs it: the shard is the only writer of its agents, so what it loads is
//! the whole truth. Records leave memory by a clock (second-chance) sweep, only after the
//! run that wrote them is applied to the store, with their checkpoint applied, no open
//! hold (the hold sweep looks at records in memory; opening loads every agent with one),
//! and a rate limiter that a fresh one would equal. A record whose grant expiry warning is
//! due within the plans' longest warning window stays too: the grant sweep
//! (`grant_sweep.rs`) pokes it only once, ahead of time, and this shard's sweep warns it
//! at its time. Grant expiries need no record in memory: the grant sweep finds them in the
//! store's index.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use tally_core::idempotency::{judge, Seen, Verdict};
use tally_core::{
    decide, evolve, AgentId, AgentState, Command, CommandKind, Event, EventKind, Outcome, PlanBook,
    RateState, Receipt, TimestampMs,
};
use tokio::sync::oneshot;

use crate::clock::Clock;
use crate::config::EngineConfig;
use crate::engine::Reply;
use crate::error::{StoreError, SubmitError};
use crate::idem::{self, Index};
use crate::metrics::EngineMetrics;
use crate::storage::{AgentWrite, Storage, WriteResult};

/// How often an idle shard wakes to sweep holds and write checkpoints.
const IDLE_TICK_MS: u64 = 50;
/// Records the clock looks at per run beyond twice the excess over the cache bound, at
/// most: when most records must stay (open holds, busy limiters), a run pays this much
/// and the shard stays over its bound rather than walk the whole cache every run.
const EVICTION_LOOKS_EXTRA_MAX: usize = 256;
/// On a shared store, how many times a run decides an agent's jobs again after its write
/// met a newer version written by another node, before answering them 503.
pub(crate) const CONFLICT_RETRIES_MAX: u32 = 8;
/// What a caller is told to wait when a shared store is unreachable or failing over.
pub(crate) const UNAVAILABLE_RETRY_AFTER_MS: u64 = 1_000;

pub(crate) type SubmitReply = oneshot::Sender<Result<Reply, SubmitError>>;
pub(crate) type AgentReply = oneshot::Sender<Result<Option<AgentState>, SubmitError>>;

/// Work for a shard.
#[derive(Debug)]
pub(crate) enum Job {
    Submit { cmd: Command, reply: SubmitReply },
    Agent { id: AgentId, reply: AgentReply },
    Shutdown,
}

/// An answer held back until the run it depends on is durable.
#[derive(Debug)]
pub(crate) enum Pending {
    Submit(SubmitReply, Reply),
    Agent(AgentReply, Option<AgentState>),
}

impl Pending {
    fn send(self, failure: Option<&SubmitError>) {
        // A caller that went away (timeout, disconnect) no longer needs its answer; the
        // change itself is durable either way.
        match (self, failure) {
            (Pending::Submit(tx, _), Some(e)) => drop(tx.send(Err(e.clone()))),
            (Pending::Submit(tx, reply), None) => drop(tx.send(Ok(reply))),
            (Pending::Agent(tx, _), Some(e)) => drop(tx.send(Err(e.clone()))),
            (Pending::Agent(tx, agent), None) => drop(tx.send(Ok(agent))),
        }
    }
}

/// What deciding a job gives: an answer for now (denials, checks, errors), or one to give
/// once the run's writes are durable.
pub(crate) enum Answer<T> {
    Now(Result<T, SubmitError>),
    Durable(T),
}

/// A job of a run on a shared store with its answer, kept until its agent's write is
/// applied: when that write met a newer version, the job is decided again from a fresh load.
enum Held {
    Submit {
        cmd: Command,
        reply: SubmitReply,
        answer: Answer<Reply>,
    },
    Agent {
        id: AgentId,
        reply: AgentReply,
        answer: Answer<Option<AgentState>>,
    },
}

impl Held {
    fn agent(&self) -> &AgentId {
        match self {
            Held::Submit { cmd, .. } => &cmd.agent,
            Held::Agent { id, .. } => id,
        }
    }

    /// The job again, its answer dropped, to be decided anew.
    fn retry(self) -> Job {
        match self {
            Held::Submit { cmd, reply, .. } => Job::Submit { cmd, reply },
            Held::Agent { id, reply, .. } => Job::Agent { id, reply },
        }
    }

    /// Gives the answer now, or queues it for the group commit.
    fn finish(self, run: &mut Run) {
        match self {
            Held::Submit { reply, answer, .. } => match answer {
                Answer::Now(a) => drop(reply.send(a)),
                Answer::Durable(a) => run.replies.push(Pending::Submit(reply, a)),
            },
            Held::Agent { reply, answer, .. } => match answer {
                Answer::Now(a) => drop(reply.send(a)),
                Answer::Durable(a) => run.replies.push(Pending::Agent(reply, a)),
            },
        }
    }

    fn refuse(self, e: SubmitError) {
        match self {
            Held::Submit { reply, .. } => drop(reply.send(Err(e))),
            Held::Agent { reply, .. } => drop(reply.send(Err(e))),
        }
    }
}

/// One shard's applied run, waiting for the group commit.
#[derive(Debug)]
pub(crate) struct CommitBatch {
    pub events: usize,
    pub replies: Vec<Pending>,
}

/// What shards, the committer and the engine share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub storage: Arc<dyn Storage>,
    pub plans: Arc<PlanBook>,
    pub clock: Arc<dyn Clock>,
    pub config: EngineConfig,
    pub metrics: EngineMetrics,
    pub failed: OnceLock<String>,
}

impl Shared {
    pub fn fail(&self, reason: String) -> SubmitError {
        if self.failed.set(reason.clone()).is_ok() {
            tracing::error!(%reason, "storage failed; the engine refuses all further commands until restarted");
        }
        SubmitError::Failed(self.failed.get().cloned().unwrap_or(reason))
    }

    /// What a caller is told about a storage error: a shared store's passing trouble
    /// (unreachable, failing over) is a 503 and the engine goes on; any other error stops it.
    pub fn store_error(&self, e: StoreError) -> SubmitError {
        match e {
            StoreError::Unavailable(reason) => self.unavailable(reason),
            StoreError::Unsupported(what) => SubmitError::Unsupported(what),
            e => self.fail(e.to_string()),
        }
    }

    pub fn unavailable(&self, reason: String) -> SubmitError {
        self.metrics.storage_unavailable_total.inc();
        SubmitError::Unavailable {
            retry_after_ms: UNAVAILABLE_RETRY_AFTER_MS,
            reason,
        }
    }

    pub fn failure(&self) -> Option<SubmitError> {
        self.failed
            .get()
            .cloned()
            .or_else(|| self.storage.failure())
            .map(SubmitError::Failed)
    }

    /// Copies the store's gauges and counters into the metrics.
    pub fn report_storage(&self) {
        let m = &self.metrics;
        m.index_backlog_events
            .set(i64::try_from(self.storage.backlog_events()).unwrap_or(i64::MAX));
        let k = self.storage.key_index_status();
        m.idempotency_keys_on_disk
            .set(i64::try_from(k.keys_on_disk).unwrap_or(i64::MAX));
        m.idempotency_window_seconds
            .set(i64::try_from(k.window_ms / 1_000).unwrap_or(i64::MAX));
        // Counters move by what the store counted since the last report; only the
        // committer and readiness checks report, and a lost race only delays a step.
        let early = k
            .evicted_early
            .saturating_sub(m.idempotency_evicted_early_total.get());
        m.idempotency_evicted_early_total.inc_by(early);
        let lookups = k
            .disk_lookups
            .saturating_sub(m.idempotency_disk_lookups_total.get());
        m.idempotency_disk_lookups_total.inc_by(lookups);
    }
}

/// An agent as a shard holds it.
#[derive(Debug)]
pub(crate) struct Slot {
    /// Always `Some` between commands; taken out only while `evolve` runs.
    state: Option<AgentState>,
    rate: RateState,
    /// When the agent first changed after its last checkpoint.
    dirty_since_ms: Option<u64>,
    /// Used since the clock last passed it: it gets another turn in memory.
    referenced: bool,
    /// On a shared store, the limiter state as read with the record (`None` for an agent
    /// created in this run): what its write compares.
    stored_rate: Option<RateState>,
}

/// The records a shard holds in memory. Boxed: a `Slot` is ~360 bytes and a hash table
/// keeps between 1/8 and 1/2 of its buckets empty, which inline slots paid in full (a
/// million-agent run measured ~40 MiB of empty buckets at the default record cache).
pub(crate) type Slots = HashMap<AgentId, Box<Slot>>;

impl Slot {
    pub fn new(state: AgentState) -> Box<Self> {
        Box::new(Self {
            state: Some(state),
            rate: RateState::default(),
            dirty_since_ms: None,
            referenced: false,
            stored_rate: None,
        })
    }

    /// Whether the record may leave memory once its checkpoint is applied: loading it
    /// again gives the same record and a fresh limiter that answers as this one would, and
    /// no grant expiry warning is due within `warning_lookahead_ms` (the grant sweep has
    /// poked it, or will, only once). The warning check walks the agent's grants (at most
    /// `GRANTS_PER_AGENT_MAX`) and only when some plan warns at all.
    fn may_leave(&self, now_ms: u64, plans: &PlanBook, warning_lookahead_ms: u64) -> bool {
        let state = self.state();
        if !state.holds.is_empty() || !self.rate.is_idle(now_ms) {
            return false;
        }
        warning_lookahead_ms == 0
            || plans
                .get(&state.plan)
                .and_then(|plan| tally_core::threshold::next_warning_ms(state, plan))
                .is_none_or(|at| at > now_ms.saturating_add(warning_lookahead_ms))
    }

    fn state(&self) -> &AgentState {
        self.state
            .as_ref()
            .expect("a slot holds its state between commands")
    }
}

/// The writes and held-back answers of the run being decided.
#[derive(Default)]
struct Run {
    writes: Vec<AgentWrite>,
    by_agent: HashMap<AgentId, usize>,
    checkpoints: BTreeSet<AgentId>,
    replies: Vec<Pending>,
    events: usize,
}

impl Run {
    /// A run whose agent map has the room of an earlier run's (see [`Shard::commit`]).
    fn with_room(by_agent: HashMap<AgentId, usize>) -> Self {
        debug_assert!(by_agent.is_empty());
        Run {
            by_agent,
            ..Run::default()
        }
    }

    fn write_for(&mut self, agent: &AgentId, expected_seq: u64) -> &mut AgentWrite {
        // Looked up before inserting: most commands of a run are for an agent it has
        // already, and an entry would clone the id first.
        let i = match self.by_agent.get(agent) {
            Some(&i) => i,
            None => {
                self.writes.push(AgentWrite {
                    rate: None,
                    rate_before: None,
                    agent: agent.clone(),
                    expected_seq,
                    events: Vec::new(),
                    checkpoint: None,
                });
                self.by_agent.insert(agent.clone(), self.writes.len() - 1);
                self.writes.len() - 1
            }
        };
        &mut self.writes[i]
    }

    /// Events of `agent` in this run with `first_seq ≤ seq < first_seq + n`.
    fn events(&self, agent: &AgentId, first_seq: u64, n: u64) -> Vec<Event> {
        self.by_agent
            .get(agent)
            .map(|&i| {
                self.writes[i]
                    .events
                    .iter()
                    .filter(|e| e.seq >= first_seq && e.seq < first_seq + n)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }
}

pub(crate) struct Shard {
    shared: Arc<Shared>,
    agents: Slots,
    /// The agents in memory, in the order the clock visits them.
    clock: VecDeque<AgentId>,
    /// Most records in memory (see the module's note for what may exceed it).
    cached_max: usize,
    /// The plans' longest grant expiry warning window (see [`Slot::may_leave`]).
    warning_lookahead_ms: u64,
    /// Chosen to leave memory once this run is applied.
    leaving: Vec<AgentId>,
    index: Index,
    /// The bound of `index` (a fresh one per run on a shared store).
    index_keys_max: usize,
    /// Other nodes write this store too (see [`Shard::run_shared`]).
    shared_store: bool,
    /// On a shared store, for the run being decided: agents read and found missing, and
    /// the idempotency records read for its keyed commands (by slot).
    absent: HashSet<AgentId>,
    prefetched_keys: HashMap<u128, Option<crate::storage::KeyEntry>>,
    rx: Receiver<Job>,
    commit_tx: Sender<CommitBatch>,
    now_ms: u64,
    last_sweep_ms: u64,
    last_checkpoint_scan_ms: u64,
    reported_index_len: i64,
    /// The last run's agent map, emptied, for the next run's (see [`Run::with_room`]).
    spare_by_agent: HashMap<AgentId, usize>,
}

impl Shard {
    pub fn new(
        shared: Arc<Shared>,
        agents: Slots,
        cached_max: usize,
        (index, index_keys_max): (Index, usize),
        rx: Receiver<Job>,
        commit_tx: Sender<CommitBatch>,
    ) -> Self {
        let shared_store = shared.storage.shared();
        let warning_lookahead_ms = crate::grant_sweep::warning_lookahead_ms(&shared.plans);
        Self {
            shared,
            clock: agents.keys().cloned().collect(),
            agents,
            cached_max: cached_max.max(1),
            warning_lookahead_ms,
            leaving: Vec::new(),
            index,
            index_keys_max,
            shared_store,
            absent: HashSet::new(),
            prefetched_keys: HashMap::new(),
            rx,
            commit_tx,
            now_ms: 0,
            last_sweep_ms: 0,
            last_checkpoint_scan_ms: 0,
            reported_index_len: 0,
            spare_by_agent: HashMap::new(),
        }
        .with_index_reported()
    }

    /// Counts the recovered index in the shared gauge once.
    fn with_index_reported(mut self) -> Self {
        self.report_index_len();
        self
    }

    /// The shard's loop: take a run of jobs, decide them, commit, until shut down.
    pub fn run(mut self) {
        let batch_max = self.shared.config.batch_size_max.max(1);
        let mut jobs = Vec::with_capacity(batch_max);
        loop {
            let mut stop = false;
            match self.rx.recv_timeout(Duration::from_millis(IDLE_TICK_MS)) {
                Ok(job) => jobs.push(job),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => stop = true,
            }
            while jobs.len() < batch_max {
                match self.rx.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => break,
                }
            }
            self.now_ms = self.now_ms.max(self.shared.clock.now_ms());
            if self.shared_store {
                if self.run_shared(&mut jobs) || stop {
                    return;
                }
                continue;
            }
            let mut run = Run::with_room(std::mem::take(&mut self.spare_by_agent));
            for job in jobs.drain(..) {
                match job {
                    Job::Submit { cmd, reply } => self.submit(cmd, reply, &mut run),
                    Job::Agent { id, reply } => self.read_agent(id, reply, &mut run),
                    Job::Shutdown => stop = true,
                }
            }
            self.housekeeping(&mut run, stop);
            self.commit(run);
            if stop {
                return;
            }
            self.evict();
        }
    }

    /// Decides a run of jobs on a shared store (several nodes write the same agents):
    /// every agent is loaded afresh, every answer waits until its agent's write is applied
    /// with a version check, and the jobs of an agent whose write met a newer version are
    /// decided again (at most `CONFLICT_RETRIES_MAX` times, then answered 503). True when a
    /// shutdown was asked for.
    fn run_shared(&mut self, jobs: &mut Vec<Job>) -> bool {
        let mut stop = false;
        let mut todo = std::mem::take(jobs);
        let mut retries = 0;
        while !todo.is_empty() {
            self.forget_all();
            self.prefetch(&todo);
            let mut run = Run::with_room(std::mem::take(&mut self.spare_by_agent));
            let mut held = Vec::with_capacity(todo.len());
            for job in todo.drain(..) {
                match job {
                    Job::Submit { cmd, reply } => {
                        let answer = self.decide_submit(&cmd, &mut run);
                        held.push(Held::Submit { cmd, reply, answer });
                    }
                    Job::Agent { id, reply } => {
                        let answer = self.read(&id);
                        held.push(Held::Agent { id, reply, answer });
                    }
                    Job::Shutdown => stop = true,
                }
            }
            match self.apply_shared(&mut run) {
                Ok(unapplied) => {
                    let conflicts = unapplied
                        .values()
                        .filter(|r| **r == WriteResult::Conflict)
                        .count();
                    self.shared
                        .metrics
                        .storage_conflicts_total
                        .inc_by(conflicts as u64);
                    for h in held {
                        match unapplied.get(h.agent()) {
                            Some(WriteResult::Conflict) => todo.push(h.retry()),
                            Some(WriteResult::Unavailable(reason)) => {
                                h.refuse(self.shared.unavailable(reason.clone()));
                            }
                            _ => h.finish(&mut run),
                        }
                    }
                }
                Err(e) => {
                    for h in held {
                        h.refuse(e.clone());
                    }
                }
            }
            self.commit(run);
            if !todo.is_empty() {
                retries += 1;
                if retries > CONFLICT_RETRIES_MAX {
                    let e = self.shared.unavailable(format!(
                        "the agent's writes met newer versions written by other nodes {CONFLICT_RETRIES_MAX} times in a row"
                    ));
                    for job in todo.drain(..) {
                        match job {
                            Job::Submit { reply, .. } => drop(reply.send(Err(e.clone()))),
                            Job::Agent { reply, .. } => drop(reply.send(Err(e.clone()))),
                            Job::Shutdown => stop = true,
                        }
                    }
                }
            }
        }
        stop
    }

    /// Reads every agent of a run on a shared store, and the idempotency records its keyed
    /// commands name, one call each (about a round trip per master), so that deciding the
    /// run waits on no more reads. What fails here is read again by the job that needs it,
    /// which answers 503 if that fails too.
    fn prefetch(&mut self, jobs: &[Job]) {
        let mut ids = Vec::new();
        // A run holds up to `batch_size_max` jobs: a set, not a scan of `ids`, per job.
        let mut seen = HashSet::new();
        let mut lookups = Vec::new();
        for job in jobs {
            let (id, key) = match job {
                Job::Submit { cmd, .. } => (&cmd.agent, cmd.idempotency_key.as_ref()),
                Job::Agent { id, .. } => (id, None),
                Job::Shutdown => continue,
            };
            if seen.insert(id) {
                ids.push(id.clone());
            }
            if let Some(key) = key {
                lookups.push((id.clone(), key.clone(), idem::slot(id, key)));
            }
        }
        if let Ok(records) = self.shared.storage.records(&ids) {
            for (id, found) in ids.into_iter().zip(records) {
                match found {
                    Some((state, rate)) => {
                        self.shared.metrics.agents_loaded_total.inc();
                        let mut slot = Slot::new(state);
                        slot.stored_rate = Some(rate.clone());
                        slot.rate = rate;
                        self.agents.insert(id, slot);
                    }
                    None => {
                        self.absent.insert(id);
                    }
                }
            }
        }
        if lookups.is_empty() {
            return;
        }
        if let Ok(found) = self.shared.storage.find_keys(&lookups, self.now_ms) {
            self.prefetched_keys = lookups
                .into_iter()
                .zip(found)
                .map(|((_, _, slot), entry)| (slot, entry))
                .collect();
        }
    }

    /// Forgets every agent and key in memory: on a shared store, another node may have
    /// changed any of them since they were read.
    fn forget_all(&mut self) {
        self.absent.clear();
        self.prefetched_keys.clear();
        self.agents.clear();
        self.clock.clear();
        self.leaving.clear();
        self.index = Index::new(
            self.shared.config.idempotency_retention_ms,
            self.index_keys_max,
        );
    }

    /// Applies a shared-store run's writes, each with its agent's record and limiter state,
    /// and returns the agents whose write was not applied, with why.
    fn apply_shared(
        &mut self,
        run: &mut Run,
    ) -> Result<HashMap<AgentId, WriteResult>, SubmitError> {
        // A denial for funds takes a limiter cell and journals nothing: the limiter is
        // written alone, so that every node sees the cell taken.
        for (id, slot) in &self.agents {
            if slot.stored_rate.as_ref() != Some(&slot.rate) && slot.state.is_some() {
                run.write_for(id, slot.state().last_seq);
            }
        }
        if run.writes.is_empty() {
            return Ok(HashMap::new());
        }
        let mut writes = std::mem::take(&mut run.writes);
        for w in &mut writes {
            let slot = self
                .agents
                .get(&w.agent)
                .expect("an agent written in this run is in memory");
            w.checkpoint = Some(slot.state().clone());
            w.rate = Some(slot.rate.clone());
            w.rate_before = slot.stored_rate.clone();
        }
        let agents: Vec<AgentId> = writes.iter().map(|w| w.agent.clone()).collect();
        let results = self
            .shared
            .storage
            .apply_each(writes)
            .map_err(|e| self.shared.store_error(e))?;
        if results.len() != agents.len() {
            return Err(self.shared.fail(format!(
                "the store answered {} results for {} agent writes",
                results.len(),
                agents.len()
            )));
        }
        Ok(agents
            .into_iter()
            .zip(results)
            .filter(|(_, r)| *r != WriteResult::Applied)
            .collect())
    }

    fn submit(&mut self, cmd: Command, reply: SubmitReply, run: &mut Run) {
        match self.decide_submit(&cmd, run) {
            Answer::Now(answer) => drop(reply.send(answer)),
            Answer::Durable(answer) => run.replies.push(Pending::Submit(reply, answer)),
        }
    }

    /// Decides `cmd`: an answer to give now (denials, checks, errors) or one to give once
    /// the run's writes are durable.
    fn decide_submit(&mut self, cmd: &Command, run: &mut Run) -> Answer<Reply> {
        if let Some(e) = self.shared.failure() {
            return Answer::Now(Err(e));
        }
        let now_ms = self.now_ms;
        let keyed = cmd
            .idempotency_key
            .as_ref()
            .map(|k| (k, idem::slot(&cmd.agent, k), cmd.fingerprint()));
        if let Some((key, slot, fingerprint)) = keyed {
            let judged = match self.index.judge(slot, fingerprint, now_ms) {
                // Not in memory: the cache holds the newest use of every key it has, so
                // only a key it does not have is looked for in the store.
                (Verdict::New, None) => {
                    let found = match self.prefetched_keys.get(&slot) {
                        Some(found) => Ok(*found),
                        None => self.shared.storage.find_key(&cmd.agent, key, slot, now_ms),
                    };
                    match found {
                        Ok(found) => {
                            let seen = found.map(|e| Seen {
                                fingerprint: e.fingerprint,
                                at_ms: e.at_ms,
                            });
                            let retention_ms = self.shared.config.idempotency_retention_ms;
                            (judge(seen, fingerprint, now_ms, retention_ms), found)
                        }
                        Err(e) => return Answer::Now(Err(self.shared.store_error(e))),
                    }
                }
                in_memory => in_memory,
            };
            match judged {
                (Verdict::New, _) => {}
                (Verdict::Conflict, _) => return Answer::Now(Ok(Reply::KeyReused)),
                (Verdict::Replay, entry) => {
                    let entry = entry.expect("a replay verdict comes with its entry");
                    return match self.replay(&cmd.agent, entry, run) {
                        Ok(receipt) => Answer::Durable(Reply::Decided {
                            outcome: Outcome::Approved(receipt),
                            rate: None,
                            replayed: true,
                        }),
                        Err(e) => Answer::Now(Err(e)),
                    };
                }
            }
        }
        if let Err(e) = self.resident(&cmd.agent) {
            return Answer::Now(Err(e));
        }
        if cmd.kind.spends() {
            // Money in holds that expired is the agent's again before it spends, and money
            // of grants that expired is gone.
            self.expire_holds(&cmd.agent, run);
        }
        let mut fresh_rate = RateState::default();
        let (state, rate) = match self.agents.get_mut(&cmd.agent) {
            Some(slot) => (slot.state.as_ref(), &mut slot.rate),
            None => (None, &mut fresh_rate),
        };
        let decision = match decide(state, rate, cmd, &self.shared.plans, now_ms) {
            Ok(d) => d,
            Err(e) => return Answer::Now(Ok(Reply::Rejected(e))),
        };
        let answer = Reply::Decided {
            outcome: decision.outcome.clone(),
            rate: decision.rate.clone(),
            replayed: false,
        };
        if decision.events.is_empty() {
            return Answer::Now(Ok(answer));
        }
        let first_seq = decision.events[0].seq;
        let n = decision.events.len();
        if let Err(e) = self.apply(&cmd.agent, decision.events, run) {
            return Answer::Now(Err(e));
        }
        if let Some((_, slot, fingerprint)) = keyed {
            let entry = idem::Entry {
                fingerprint,
                first_seq,
                events: n as u32,
                at_ms: now_ms,
            };
            // A key that leaves the cache is still on disk (or staged) for its window.
            self.index.insert(slot, entry, now_ms);
            self.shared.storage.note_key(slot, now_ms);
        }
        Answer::Durable(answer)
    }

    /// Evolves the agent with decided events and adds them to the run's writes.
    fn apply(
        &mut self,
        agent: &AgentId,
        events: Vec<Event>,
        run: &mut Run,
    ) -> Result<(), SubmitError> {
        let now_ms = self.now_ms;
        let created = matches!(events[0].kind, EventKind::AgentCreated { .. });
        let slot = match self.agents.get_mut(agent) {
            Some(slot) => slot,
            None if created => {
                if !self.shared_store {
                    // On a shared store, other nodes create agents too: the gauge is read
                    // from the store at open.
                    self.shared.metrics.agents.inc();
                }
                self.clock.push_back(agent.clone());
                self.agents.entry(agent.clone()).or_insert_with(|| {
                    Box::new(Slot {
                        state: None,
                        rate: RateState::default(),
                        dirty_since_ms: None,
                        referenced: true,
                        stored_rate: None,
                    })
                })
            }
            None => {
                return Err(self
                    .shared
                    .fail(format!("events for unknown agent {agent}")))
            }
        };
        let expected_seq = slot.state.as_ref().map_or(0, |s| s.last_seq);
        for e in &events {
            if self.shared_store {
                // Other nodes open and close holds too, and this write may yet conflict.
            } else if matches!(e.kind, EventKind::HoldPlaced { .. }) {
                self.shared.metrics.open_holds.inc();
            } else if e.kind.closed_hold().is_some() {
                self.shared.metrics.open_holds.dec();
            }
            match evolve(slot.state.take(), agent, e) {
                Ok(next) => slot.state = Some(next),
                Err(broken) => return Err(self.shared.fail(broken.to_string())),
            }
        }
        slot.dirty_since_ms.get_or_insert(now_ms);
        if created {
            run.checkpoints.insert(agent.clone());
        }
        run.events += events.len();
        let write = run.write_for(agent, expected_seq);
        if write.events.is_empty() {
            write.events = events;
        } else {
            write.events.extend(events);
        }
        Ok(())
    }

    /// Releases the agent's holds that are due and expires its due credit grants, as an
    /// `ExpireHolds` command (the core journals both, and the expiry warnings of grants
    /// that are due).
    fn expire_holds(&mut self, agent: &AgentId, run: &mut Run) {
        let now_ms = self.now_ms;
        let Some(slot) = self.agents.get_mut(agent) else {
            return;
        };
        if sweep_due_ms(slot.state(), &self.shared.plans).is_none_or(|at| at > now_ms) {
            return;
        }
        let cmd = Command::new(agent.clone(), CommandKind::ExpireHolds);
        match decide(
            slot.state.as_ref(),
            &mut slot.rate,
            &cmd,
            &self.shared.plans,
            now_ms,
        ) {
            Ok(d) if !d.events.is_empty() => {
                if let Err(e) = self.apply(agent, d.events, run) {
                    tracing::error!(%agent, error = %e, "expiring holds failed");
                }
            }
            Ok(_) => {}
            // The agent's plan disappeared from the config; its holds expire at the next
            // restart with a plan, and nothing is lost meanwhile.
            Err(e) => tracing::warn!(%agent, error = %e, "cannot expire holds"),
        }
    }

    /// Rebuilds the receipt of a stored change from its journal entries.
    fn replay(
        &self,
        agent: &AgentId,
        entry: idem::Entry,
        run: &Run,
    ) -> Result<Receipt, SubmitError> {
        let n = u64::from(entry.events);
        let mut events = run.events(agent, entry.first_seq, n);
        if events.is_empty() {
            // The entries may not be durable yet: this answer waits for the group commit.
            events = self
                .shared
                .storage
                .journal_staged(agent, entry.first_seq - 1, n as usize)
                .map_err(|e| self.shared.store_error(e))?;
        }
        if events.len() as u64 != n {
            return Err(self.shared.fail(format!(
                "idempotency index points at {n} journal entries of {agent} from {}, found {}",
                entry.first_seq,
                events.len()
            )));
        }
        Ok(Receipt::from_events(&events, 0, 0, entry.at_ms))
    }

    fn read_agent(&mut self, id: AgentId, reply: AgentReply, run: &mut Run) {
        match self.read(&id) {
            Answer::Now(answer) => drop(reply.send(answer)),
            Answer::Durable(state) => run.replies.push(Pending::Agent(reply, state)),
        }
    }

    fn read(&mut self, id: &AgentId) -> Answer<Option<AgentState>> {
        if let Some(e) = self.shared.failure() {
            return Answer::Now(Err(e));
        }
        if let Err(e) = self.resident(id) {
            return Answer::Now(Err(e));
        }
        // Held back like a write, so a read never shows a change that is not yet durable.
        Answer::Durable(self.agents.get(id).map(|s| s.state().clone()))
    }

    /// Sweeps expired holds and writes due checkpoints (all dirty ones when stopping).
    fn housekeeping(&mut self, run: &mut Run, stopping: bool) {
        let now_ms = self.now_ms;
        if self.shared.failure().is_some() {
            return;
        }
        if now_ms.saturating_sub(self.last_sweep_ms) >= self.shared.config.hold_sweep_interval_ms {
            self.last_sweep_ms = now_ms;
            let due: Vec<AgentId> = self
                .agents
                .iter()
                .filter(|(_, s)| {
                    sweep_due_ms(s.state(), &self.shared.plans).is_some_and(|at| at <= now_ms)
                })
                .map(|(id, _)| id.clone())
                .collect();
            for id in due {
                self.expire_holds(&id, run);
            }
            self.index.evict(now_ms);
        }
        if !stopping {
            self.choose_leaving(run);
        }
        let interval = self.shared.config.checkpoint_interval_ms;
        let scan = stopping
            || now_ms.saturating_sub(self.last_checkpoint_scan_ms)
                >= (interval / 4).max(IDLE_TICK_MS);
        if scan {
            self.last_checkpoint_scan_ms = now_ms;
            for (id, slot) in &self.agents {
                if slot
                    .dirty_since_ms
                    .is_some_and(|since| stopping || now_ms.saturating_sub(since) >= interval)
                {
                    run.checkpoints.insert(id.clone());
                }
            }
        }
        for id in std::mem::take(&mut run.checkpoints) {
            if let Some(slot) = self.agents.get_mut(&id) {
                let state = slot.state().clone();
                slot.dirty_since_ms = None;
                let last_seq = state.last_seq;
                run.write_for(&id, last_seq).checkpoint = Some(state);
                self.shared.metrics.checkpoints_total.inc();
            }
        }
    }

    /// Makes `id` resident, loading it from the store if it is not in memory; false for an
    /// unknown agent.
    fn resident(&mut self, id: &AgentId) -> Result<bool, SubmitError> {
        if let Some(slot) = self.agents.get_mut(id) {
            slot.referenced = true;
            return Ok(true);
        }
        if self.absent.contains(id) {
            return Ok(false);
        }
        let loaded = if self.shared_store {
            self.shared.storage.record(id)
        } else {
            crate::recovery::load_agent(self.shared.storage.as_ref(), id)
                .map(|found| found.map(|state| (state, RateState::default())))
        };
        match loaded {
            Ok(Some((state, rate))) => {
                self.shared.metrics.agents_loaded_total.inc();
                let mut slot = Slot::new(state);
                if self.shared_store {
                    slot.stored_rate = Some(rate.clone());
                }
                slot.rate = rate;
                slot.referenced = true;
                self.agents.insert(id.clone(), slot);
                self.clock.push_back(id.clone());
                Ok(true)
            }
            Ok(None) => Ok(false),
            Err(e @ (StoreError::Unavailable(_) | StoreError::Unsupported(_))) => {
                Err(self.shared.store_error(e))
            }
            Err(e) => Err(self.shared.fail(format!("loading agent {id}: {e}"))),
        }
    }

    /// Picks records to leave memory after this run, as many as the shard holds over its
    /// bound: the clock passes over records used since its last visit (clearing the mark)
    /// and those that must stay. A dirty pick gets its checkpoint in this run.
    fn choose_leaving(&mut self, run: &mut Run) {
        let excess = self.agents.len().saturating_sub(self.cached_max);
        if excess == 0 {
            return;
        }
        let now_ms = self.now_ms;
        let looks_max = self
            .clock
            .len()
            .min(excess.saturating_mul(2) + EVICTION_LOOKS_EXTRA_MAX);
        for _ in 0..looks_max {
            if self.leaving.len() >= excess {
                break;
            }
            let Some(id) = self.clock.pop_front() else {
                break;
            };
            let Some(slot) = self.agents.get_mut(&id) else {
                continue;
            };
            if slot.referenced
                || !slot.may_leave(now_ms, &self.shared.plans, self.warning_lookahead_ms)
            {
                slot.referenced = false;
                self.clock.push_back(id);
                continue;
            }
            if slot.dirty_since_ms.is_some() {
                run.checkpoints.insert(id.clone());
            }
            self.leaving.push(id);
        }
    }

    /// Drops the records chosen by [`Shard::choose_leaving`], now that the run holding their
    /// checkpoints is applied to the store (where [`Shard::resident`] finds them again).
    fn evict(&mut self) {
        if self.leaving.is_empty() {
            return;
        }
        let now_ms = self.now_ms;
        let failed = self.shared.failure().is_some();
        for id in std::mem::take(&mut self.leaving) {
            let Some(slot) = self.agents.get(&id) else {
                continue;
            };
            if failed
                || slot.dirty_since_ms.is_some()
                || !slot.may_leave(now_ms, &self.shared.plans, self.warning_lookahead_ms)
            {
                self.clock.push_back(id);
                continue;
            }
            self.agents.remove(&id);
            self.shared.metrics.agents_evicted_total.inc();
        }
    }

    /// Applies the run's writes in one batch and queues its answers for the group commit.
    fn commit(&mut self, mut run: Run) {
        self.report_index_len();
        run.by_agent.clear();
        // A sweep may have written many agents' checkpoints; jobs are at most a batch.
        run.by_agent.shrink_to(self.shared.config.batch_size_max);
        self.spare_by_agent = std::mem::take(&mut run.by_agent);
        if run.writes.is_empty() && run.replies.is_empty() {
            return;
        }
        if !run.writes.is_empty() {
            if let Err(e) = self.shared.storage.apply(std::mem::take(&mut run.writes)) {
                let failure = self.shared.fail(e.to_string());
                for p in run.replies {
                    p.send(Some(&failure));
                }
                return;
            }
        }
        let batch = CommitBatch {
            events: run.events,
            replies: run.replies,
        };
        if let Err(unsent) = self.commit_tx.send(batch) {
            let failure = self.shared.fail("the committer stopped".into());
            for p in unsent.0.replies {
                p.send(Some(&failure));
            }
        }
    }

    /// Adds this shard's change in index size to the shared gauge.
    fn report_index_len(&mut self) {
        let len = self.index.len() as i64;
        self.shared
            .metrics
            .idempotency_records
            .add(len - self.reported_index_len);
        self.reported_index_len = len;
    }
}

/// The group committer: waits for applied runs, makes them durable with one `sync`, then
/// releases their answers. Everything a run depends on was applied before it was queued,
/// so one sync after draining the queue covers every answer drained.
pub(crate) fn run_committer(rx: Receiver<CommitBatch>, shared: Arc<Shared>) {
    let mut batches = Vec::new();
    while let Ok(first) = rx.recv() {
        batches.push(first);
        while let Ok(more) = rx.try_recv() {
            batches.push(more);
        }
        let events: usize = batches.iter().map(|b| b.events).sum();
        let failure = if events > 0 {
            let started = Instant::now();
            let result = shared.storage.sync();
            shared
                .metrics
                .commit_seconds
                .observe(started.elapsed().as_secs_f64());
            shared.metrics.commit_batch_events.observe(events as f64);
            shared.metrics.commits_total.inc();
            shared.report_storage();
            result.err().map(|e| shared.store_error(e))
        } else {
            shared.failure()
        };
        for batch in batches.drain(..) {
            for p in batch.replies {
                p.send(failure.as_ref());
            }
        }
    }
}

/// When the sweep has something to do for an agent: a hold or a grant expires, or a
/// grant's expiry warning is due under its plan's (or its own) thresholds.
fn sweep_due_ms(state: &AgentState, plans: &PlanBook) -> Option<TimestampMs> {
    let warning = plans
        .get(&state.plan)
        .and_then(|plan| tally_core::threshold::next_warning_ms(state, plan));
    match (state.next_expiry_ms(), warning) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}
