//! The simulation's driver of one seed: the engine's generations (open, end by a clean
//! restart, a power loss or after a failure, open the next from the crash image), the
//! steps (a command, an indexer run, a restart, a power loss), and the fault plan of each
//! generation.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tally_core::{
    AgentId, Command, CommandKind, Denial, IdempotencyKey, Outcome, Plan, PlanBook, PlanName,
    Status, TimestampMs,
};
use tally_store::sim::{self, Fault};
use tally_store::{
    Engine, EngineConfig, FeedCursor, ManualClock, Reply, SledStorage, Storage, StoreOptions,
};

use crate::faulty::FaultyStorage;
use crate::model::{AgentModel, Change, Expect};

/// Agents per run; few, so that commands meet each other's state.
pub const AGENTS: usize = 3;
/// Steps (commands, index runs, crashes, restarts) per run.
const STEPS_MIN: usize = 40;
const STEPS_MAX: usize = 90;
/// Operations per generation that may carry a fault.
const FAULT_OPS_MAX: u64 = 300;
/// Opens tried in a row before a run gives up (each may meet a fault of its own).
const OPEN_TRIES_MAX: usize = 30;
const T0_MS: TimestampMs = 1_795_000_000_000;
const HOLD_TTL_MS: u64 = 600_000;

fn plans() -> PlanBook {
    PlanBook::new([Plan::unlimited(
        PlanName::new("default").expect("valid plan name"),
    )])
}

/// Why a generation of the store ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// Clean shutdown, then open the same directory.
    Restart,
    /// Power loss now.
    PowerLoss,
    /// The store failed (a fault): restart the process on the directory as it is, unless
    /// the fault was a power loss.
    AfterFailure,
}

/// One seed's run: its random source, the current generation of the store and its
/// directory, the model, and what the oracle needs to know about the answers.
pub struct Sim {
    pub rng: StdRng,
    pub root: tempfile::TempDir,
    pub generation: u32,
    pub dir: PathBuf,
    pub clock: Arc<ManualClock>,
    pub storage: Option<Arc<FaultyStorage>>,
    pub engine: Option<Engine>,
    pub ids: Vec<AgentId>,
    pub model: Vec<AgentModel>,
    /// Acknowledged approvals, oldest first.
    pub acked: Vec<Change>,
    /// A change whose answer was an error: applied once or not at all.
    pub maybe: Option<Change>,
    /// Keys the engine may hold: every key sent with a change.
    pub sent: HashMap<String, usize>,
    pub next_key: u64,
    pub history: Vec<String>,
    pub fault_one_in: u32,
    pub stats: Stats,
    /// The change feed as read after each recovery, from the cursor of the one before.
    pub feed_cursor: FeedCursor,
    pub fed: HashMap<AgentId, Vec<tally_core::Event>>,
}

/// Counts over a run, for the summary.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub acked: u64,
    pub maybe_kept: u64,
    pub maybe_lost: u64,
    pub power_losses: u64,
    pub failures: u64,
    pub restarts: u64,
    pub index_runs: u64,
    pub replays: u64,
    /// Recoveries that dropped a torn record at the end of the log.
    pub torn_tails: u64,
}

impl std::ops::AddAssign for Stats {
    fn add_assign(&mut self, o: Self) {
        self.acked += o.acked;
        self.maybe_kept += o.maybe_kept;
        self.maybe_lost += o.maybe_lost;
        self.power_losses += o.power_losses;
        self.failures += o.failures;
        self.restarts += o.restarts;
        self.index_runs += o.index_runs;
        self.replays += o.replays;
        self.torn_tails += o.torn_tails;
    }
}

fn config(dir: &Path) -> EngineConfig {
    let mut c = EngineConfig::new(dir);
    c.shards = 2;
    c.sled_cache_bytes = 4 << 20;
    // Time stands still (the clock is the sim's): neither checkpoints nor the hold sweep
    // write at moments the seed did not choose.
    c.checkpoint_interval_ms = u64::MAX;
    c.hold_sweep_interval_ms = u64::MAX;
    c
}

/// A temporary directory on tmpfs when there is one: the model is the disk, so the real
/// fsyncs only cost time.
fn tempdir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::Builder::new().prefix("tally-sim").tempdir_in(shm) {
            return d;
        }
    }
    tempfile::tempdir().expect("a temporary directory")
}

impl Sim {
    pub fn new(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let root = tempdir();
        let dir = root.path().join("gen0");
        let fault_one_in = rng.gen_range(12..80);
        Self {
            rng,
            dir,
            root,
            generation: 0,
            clock: Arc::new(ManualClock::new(T0_MS)),
            storage: None,
            engine: None,
            ids: (0..AGENTS)
                .map(|i| AgentId::new(format!("agent-{i}")).expect("valid agent id"))
                .collect(),
            model: vec![AgentModel::default(); AGENTS],
            acked: Vec::new(),
            maybe: None,
            sent: HashMap::new(),
            next_key: 0,
            history: Vec::new(),
            fault_one_in,
            stats: Stats::default(),
            feed_cursor: FeedCursor::default(),
            fed: HashMap::new(),
        }
    }

    pub fn log(&mut self, line: String) {
        self.history.push(line);
    }

    pub fn engine(&self) -> Result<&Engine, String> {
        self.engine
            .as_ref()
            .ok_or_else(|| "no open engine".to_string())
    }

    /// A fault plan for the next generation.
    fn plan(&mut self) -> sim::Plan {
        let mut faults = BTreeMap::new();
        for n in 0..FAULT_OPS_MAX {
            if self.rng.gen_ratio(1, self.fault_one_in) {
                let fault = match self.rng.gen_range(0..3) {
                    0 => Fault::Fail,
                    1 => Fault::CrashBefore,
                    _ => Fault::CrashAfter,
                };
                faults.insert(n, fault);
            }
        }
        // Nothing unsynced survives, all of it does, or a prefix that mostly ends inside the
        // first record (a debit's framed record is about 70 bytes, a new agent's 120).
        let torn_bytes = match self.rng.gen_range(0..5) {
            0 => 0,
            1 => usize::MAX,
            _ => self.rng.gen_range(1..100),
        };
        self.generation += 1;
        sim::Plan {
            faults,
            torn_bytes,
            data_dir: self.dir.clone(),
            image_dir: self.root.path().join(format!("gen{}", self.generation)),
        }
    }

    /// Opens the store at `self.dir`, following the crash images of failed opens.
    fn open(&mut self) -> Result<(), String> {
        for _ in 0..OPEN_TRIES_MAX {
            let plan = self.plan();
            let image = plan.image_dir.clone();
            sim::arm(plan);
            let opened = SledStorage::open_with(&self.dir, &StoreOptions::new(4 << 20))
                .map(|s| Arc::new(FaultyStorage(s)))
                .and_then(|storage| {
                    let engine = Engine::open_with(
                        storage.clone(),
                        config(&self.dir),
                        plans(),
                        self.clock.clone(),
                        None,
                    )?;
                    Ok((storage, engine))
                });
            match opened {
                Ok((storage, engine)) => {
                    self.storage = Some(storage);
                    self.engine = Some(engine);
                    self.log(format!("open gen{}", self.generation));
                    return Ok(());
                }
                Err(e) => {
                    let report = sim::disarm();
                    self.stats.torn_tails += report.torn_tails;
                    self.log(format!("open failed: {}", describe(&report)));
                    if let Some(e) = report.image_error {
                        return Err(format!("making the crash image: {e}"));
                    }
                    if report.crashed_at.is_some() {
                        self.dir = image;
                    } else if report.failed.is_empty() {
                        return Err(format!("recovery failed with no fault: {e}"));
                    }
                }
            }
        }
        Err(format!("no open in {OPEN_TRIES_MAX} tries"))
    }

    /// Ends the generation (`how`) and opens the next one.
    async fn reopen(&mut self, how: Ending) -> Result<(), String> {
        let power_loss = match how {
            Ending::PowerLoss => true,
            Ending::AfterFailure => self.rng.gen_bool(0.5),
            Ending::Restart => false,
        };
        if power_loss {
            sim::crash_now();
        }
        if let Some(engine) = self.engine.take() {
            // After a failure or a power loss this fails; the data dir is no longer read.
            let _ = engine.shutdown().await;
        }
        self.storage = None;
        let report = sim::disarm();
        self.stats.torn_tails += report.torn_tails;
        if let Some(e) = report.image_error.clone() {
            return Err(format!("making the crash image: {e}"));
        }
        let crashed = report.crashed_at.is_some();
        self.log(format!(
            "end of generation ({how:?}): {}",
            describe(&report)
        ));
        if crashed {
            self.stats.power_losses += 1;
            self.dir = self.root.path().join(format!("gen{}", self.generation));
        } else {
            self.stats.restarts += 1;
        }
        self.open()?;
        self.check().await?;
        self.retry_acked().await
    }

    pub fn key(&mut self) -> String {
        self.next_key += 1;
        format!("k{}", self.next_key)
    }

    /// A command the model can predict, for a random agent.
    pub fn next_change(&mut self) -> Change {
        let agent = self.rng.gen_range(0..AGENTS);
        let key = self.key();
        let m = &self.model[agent];
        if !m.created {
            return Change {
                agent,
                key,
                kind: CommandKind::CreateAgent {
                    plan: PlanName::new("default").expect("valid plan name"),
                    status: Status::Active,
                },
                hold_key: None,
                receipt: None,
            };
        }
        let amount_micros = self.rng.gen_range(1..=400);
        let mut hold_key = None;
        let kind = match self.rng.gen_range(0..10) {
            0..=2 => CommandKind::Credit { amount_micros },
            3..=6 => CommandKind::Debit { amount_micros },
            7 => CommandKind::Hold {
                amount_micros,
                ttl_ms: HOLD_TTL_MS,
            },
            _ if !m.holds.is_empty() => {
                let i = self.rng.gen_range(0..m.holds.len());
                let (k, &(hold_seq, amount)) = m.holds.iter().nth(i).expect("in range");
                hold_key = Some(k.clone());
                if self.rng.gen_bool(0.5) {
                    CommandKind::Void { hold_seq }
                } else {
                    CommandKind::Capture {
                        hold_seq,
                        amount_micros: self.rng.gen_range(0..=amount),
                    }
                }
            }
            _ => CommandKind::Debit { amount_micros },
        };
        Change {
            agent,
            key,
            kind,
            hold_key,
            receipt: None,
        }
    }

    pub fn command(&self, c: &Change) -> Command {
        Command::new(self.ids[c.agent].clone(), c.kind.clone())
            .with_key(IdempotencyKey::new(c.key.clone()).expect("valid key"))
    }

    /// Sends one change and checks its answer against the model. `Ok(false)`: the store
    /// failed and the generation must end.
    async fn step_change(&mut self) -> Result<bool, String> {
        let c = self.next_change();
        let expect = self.model[c.agent].expect(&c.kind);
        self.sent.insert(c.key.clone(), c.agent);
        let reply = self.engine()?.submit(self.command(&c)).await;
        let m = &self.model[c.agent];
        match (reply, expect) {
            (
                Ok(Reply::Decided {
                    outcome: Outcome::Approved(r),
                    replayed: false,
                    ..
                }),
                Expect::Approved,
            ) => {
                let mut c = c;
                c.receipt = Some(r);
                let mut after = m.clone();
                after.apply(&c, r.first_seq)?;
                if (r.balance_after_micros, r.held_after_micros, r.events)
                    != (after.balance_micros, after.held_micros, 1)
                {
                    return Err(format!(
                        "{} {:?}: receipt {r:?}, model balance {} held {}",
                        c.key, c.kind, after.balance_micros, after.held_micros
                    ));
                }
                self.log(format!(
                    "{} agent-{} {:?}: approved, balance {}",
                    c.key, c.agent, c.kind, r.balance_after_micros
                ));
                self.model[c.agent] = after;
                self.acked.push(c);
                self.stats.acked += 1;
                Ok(true)
            }
            (
                Ok(Reply::Decided {
                    outcome: Outcome::Denied(Denial::InsufficientFunds { .. }),
                    replayed: false,
                    ..
                }),
                Expect::Denied,
            ) => {
                self.log(format!("{} agent-{} {:?}: denied", c.key, c.agent, c.kind));
                Ok(true)
            }
            (Err(tally_store::SubmitError::Failed(_)), _) => {
                self.log(format!(
                    "{} agent-{} {:?}: error (maybe applied)",
                    c.key, c.agent, c.kind
                ));
                if expect == Expect::Approved {
                    self.maybe = Some(c);
                }
                self.stats.failures += 1;
                Ok(false)
            }
            (other, expect) => Err(format!(
                "{} {:?}: model expects {expect:?}, engine answered {other:?}",
                c.key, c.kind
            )),
        }
    }

    /// One indexer run (WAL into sled, segments deleted), waited for.
    async fn step_index(&mut self) -> Result<bool, String> {
        let ticket = sim::index_now();
        let started = Instant::now();
        while sim::index_served() < ticket {
            if self.storage.as_ref().is_some_and(|s| s.failure().is_some()) {
                break;
            }
            if started.elapsed() > Duration::from_secs(10) {
                return Err("the indexer did not run".into());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        self.stats.index_runs += 1;
        let report = sim::report();
        self.log(format!("index: {}", describe(&report)));
        Ok(report.crashed_at.is_none() && self.engine()?.is_ready())
    }

    /// Runs the seed: open, the steps (any of which may end the generation), then a clean
    /// restart whose check must show everything acknowledged.
    pub async fn run(&mut self) -> Result<(), String> {
        self.open()?;
        let steps = self.rng.gen_range(STEPS_MIN..=STEPS_MAX);
        for _ in 0..steps {
            let roll = self.rng.gen_range(0..100);
            let healthy = match roll {
                0..=2 => {
                    self.reopen(Ending::PowerLoss).await?;
                    true
                }
                3..=4 => {
                    self.reopen(Ending::Restart).await?;
                    true
                }
                5..=19 => self.step_index().await?,
                _ => self.step_change().await?,
            };
            let crashed = sim::report().crashed_at.is_some();
            if !healthy || crashed || !self.engine()?.is_ready() {
                self.reopen(Ending::AfterFailure).await?;
            }
        }
        // The end: a clean restart must show everything.
        self.reopen(Ending::Restart).await?;
        if let Some(engine) = self.engine.take() {
            engine.shutdown().await.map_err(|e| e.to_string())?;
        }
        self.storage = None;
        self.stats.torn_tails += sim::disarm().torn_tails;
        Ok(())
    }
}

pub fn describe(r: &sim::Report) -> String {
    let mut s = format!("{} ops", r.ops);
    for (n, op) in &r.failed {
        s.push_str(&format!(", op {n} ({op:?}) failed"));
    }
    match r.crashed_at {
        Some((n, Some(op))) => s.push_str(&format!(", power lost at op {n} ({op:?})")),
        Some((n, None)) => s.push_str(&format!(", power lost after {n} ops")),
        None => {}
    }
    s
}
