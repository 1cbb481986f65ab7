//! The mock agents' behaviour: each worker picks an agent at random and does what that
//! kind of agent does (debit, check, hold then capture or void, top up), recording every
//! answer for the report and every key for the invariant check. With `--batch N` a debit
//! is a batch of N debits instead, each item recorded as a single debit would be.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::Rng;
use tokio::time::Instant;

use super::invariants::{AgentLog, Applied};
use super::stats::{Live, Outcome, Stats};
use crate::{
    BatchItem, BatchOutcome, Capture, Client, Credit, Debit, Denial, Error, Hold, Receipt,
};

/// Hold TTL used by the mock agents (they capture or void right away).
pub const HOLD_TTL_MS: u64 = 60_000;

/// The kinds of mock agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Plenty of money, unlimited plan: debits, checks, holds, top-ups.
    Normal,
    /// Zero or low balance and never tops up: mostly 402s.
    Broke,
    /// A plan with a tight bucket, hit far faster than it allows: mostly 429s.
    RateLimited,
}

#[derive(Debug, Clone)]
pub struct MockAgent {
    pub id: String,
    pub kind: Kind,
}

/// What all workers share.
#[derive(Debug)]
pub struct Run {
    pub client: Client,
    pub agents: Vec<MockAgent>,
    pub deadline: Instant,
    pub requests_max: u64,
    pub issued: AtomicU64,
    pub live: Live,
    pub key_prefix: String,
    /// Debits per request (1: single debits).
    pub batch_items: usize,
}

impl Run {
    /// Claims one request of the budget; false once time or requests run out.
    fn claim(&self) -> bool {
        Instant::now() < self.deadline
            && self.issued.fetch_add(1, Ordering::Relaxed) < self.requests_max
    }
}

/// What one worker measured.
#[derive(Debug, Default)]
pub struct WorkerResult {
    pub stats: Stats,
    /// Indexed like `Run::agents`.
    pub logs: Vec<AgentLog>,
}

struct Worker {
    run: Arc<Run>,
    rng: StdRng,
    id: usize,
    keys_made: u64,
    out: WorkerResult,
}

/// Runs one worker until the deadline or the request budget.
pub async fn work(run: Arc<Run>, id: usize, rng: StdRng) -> WorkerResult {
    let agents = run.agents.len();
    let mut worker = Worker {
        run,
        rng,
        id,
        keys_made: 0,
        out: WorkerResult {
            stats: Stats::default(),
            logs: (0..agents).map(|_| AgentLog::default()).collect(),
        },
    };
    while worker.run.claim() {
        let agent = worker.rng.gen_range(0..agents);
        worker.step(agent).await;
    }
    worker.out
}

/// One keyed call, as the report and the invariant check need it.
struct Call {
    /// The name counted in the report.
    operation: &'static str,
    /// The journal kind the change must appear as.
    journal_kind: &'static str,
    agent: usize,
    key: String,
    /// The amount its journal entry must show.
    amount_micros: u64,
    success_status: u16,
    started: Instant,
    /// Log a denied key as one that must never be charged. Off for a duplicate pair in
    /// which the other request was approved: the key is then legitimately charged once.
    log_denial: bool,
}

/// A keyed call's result in one shape: approved receipt, denial, or error.
type Answer = Result<crate::Outcome<Receipt>, Error>;

fn lift(result: Result<Receipt, Error>) -> Answer {
    match result {
        Ok(receipt) => Ok(crate::Outcome::Approved(receipt)),
        Err(Error::Denied(denial)) => Ok(crate::Outcome::Denied(*denial)),
        Err(e) => Err(e),
    }
}

fn denial_outcome(denial: &Denial) -> Outcome {
    match denial {
        Denial::InsufficientFunds { .. } => Outcome::InsufficientFunds,
        Denial::RateLimited { .. } => Outcome::RateLimited,
        Denial::MonthlyCapReached { .. } => Outcome::MonthlyCap,
        Denial::Suspended { .. } => Outcome::Suspended,
    }
}

impl Worker {
    fn key(&mut self) -> String {
        self.keys_made += 1;
        format!("{}-w{}-{}", self.run.key_prefix, self.id, self.keys_made)
    }

    async fn step(&mut self, agent: usize) {
        let kind = self.run.agents[agent].kind;
        let roll = self.rng.gen_range(0..100u32);
        match kind {
            Kind::Normal => match roll {
                0..=44 => self.debits(agent).await,
                45..=49 => {
                    let amount = self.rng.gen_range(100..=20_000);
                    self.duplicate_debit(agent, amount).await;
                }
                50..=64 => {
                    let amount = self.rng.gen_range(100..=20_000);
                    self.check(agent, amount).await;
                }
                65..=94 => {
                    let amount = self.rng.gen_range(1_000..=50_000);
                    self.hold_then_settle(agent, amount).await;
                }
                _ => self.top_up(agent, 500_000).await,
            },
            Kind::Broke | Kind::RateLimited => {
                let debits_pct = if kind == Kind::Broke { 85 } else { 75 };
                if roll < debits_pct {
                    self.debits(agent).await;
                } else {
                    let amount = self.debit_amount(agent);
                    self.check(agent, amount).await;
                }
            }
        }
    }

    /// What this kind of agent spends in one debit.
    fn debit_amount(&mut self, agent: usize) -> u64 {
        match self.run.agents[agent].kind {
            Kind::Normal => self.rng.gen_range(100..=20_000),
            Kind::Broke => self.rng.gen_range(1_000..=20_000),
            Kind::RateLimited => self.rng.gen_range(100..=1_000),
        }
    }

    /// One debit of `agent`, or with `--batch` a batch of debits that starts with it.
    async fn debits(&mut self, agent: usize) {
        let amount = self.debit_amount(agent);
        if self.run.batch_items > 1 {
            self.debit_batch(agent, amount).await;
        } else {
            self.debit(agent, amount).await;
        }
    }

    /// Counts an answer, logs its key, and returns the receipt when approved.
    fn record(&mut self, call: Call, answer: Answer) -> Option<Receipt> {
        let (operation, latency) = (call.operation, call.started.elapsed());
        let (outcome, status, receipt) = self.log(call, answer);
        self.out.stats.record(operation, outcome, status, latency);
        self.run.live.add(outcome);
        receipt
    }

    /// Logs a keyed answer for the invariant check and counts it as a debit if it is one.
    fn log(&mut self, call: Call, answer: Answer) -> (Outcome, Option<u16>, Option<Receipt>) {
        let Call {
            journal_kind,
            agent,
            key,
            amount_micros,
            success_status,
            log_denial,
            ..
        } = call;
        let log = &mut self.out.logs[agent];
        let (outcome, status, receipt) = match answer {
            Ok(crate::Outcome::Approved(receipt)) => {
                if receipt.replayed {
                    self.out.stats.replayed += 1;
                }
                log.applied.push(Applied {
                    seq: receipt.seq,
                    kind: journal_kind,
                    amount_micros,
                    key,
                });
                (Outcome::Approved, Some(success_status), Some(receipt))
            }
            Ok(crate::Outcome::Denied(denial)) => {
                let outcome = denial_outcome(&denial);
                if log_denial {
                    if outcome == Outcome::InsufficientFunds {
                        log.denied_funds.push(key);
                    } else {
                        log.denied_other.push(key);
                    }
                }
                (outcome, Some(denial.status()), None)
            }
            Err(e) => {
                // Whether it was applied is unknown: it may appear at most once.
                log.unknown.push(key);
                let outcome = match e {
                    Error::Transport { .. } => Outcome::Transport,
                    _ => Outcome::Error,
                };
                (outcome, e.status(), None)
            }
        };
        if journal_kind == "debit" {
            self.out.stats.debit(status);
        }
        (outcome, status, receipt)
    }

    async fn debit(&mut self, agent: usize, amount: u64) {
        let key = self.key();
        let debit = Debit::new(amount)
            .task_type("loadtest")
            .idempotency_key(&key);
        let started = Instant::now();
        let answer = self
            .run
            .client
            .debit(&self.run.agents[agent].id, &debit)
            .await;
        self.record(
            Call {
                operation: "debit",
                journal_kind: "debit",
                agent,
                key,
                amount_micros: amount,
                success_status: 201,
                started,
                log_denial: true,
            },
            answer,
        );
    }

    /// A batch of `batch_items` debits: `agent`'s first, then agents picked at random, each
    /// with a fresh key. The request is timed and counted once (as `batch`); each item is
    /// logged and counted (as `batch_debit`) as a single debit would be. When the whole
    /// batch fails, every item's fate is unknown.
    async fn debit_batch(&mut self, agent: usize, amount: u64) {
        let mut calls = Vec::with_capacity(self.run.batch_items);
        let mut items = Vec::with_capacity(self.run.batch_items);
        let started = Instant::now();
        for i in 0..self.run.batch_items {
            let (agent, amount_micros) = if i == 0 {
                (agent, amount)
            } else {
                let other = self.rng.gen_range(0..self.run.agents.len());
                (other, self.debit_amount(other))
            };
            let key = self.key();
            let debit = Debit::new(amount_micros)
                .task_type("loadtest")
                .idempotency_key(&key);
            items.push(BatchItem::debit(&self.run.agents[agent].id, &debit));
            calls.push(Call {
                operation: "batch_debit",
                journal_kind: "debit",
                agent,
                key,
                amount_micros,
                success_status: 201,
                started,
                log_denial: true,
            });
        }
        let answers = self.run.client.batch(&items).await;
        let latency = started.elapsed();
        let (outcome, status) = match &answers {
            Ok(_) => (Outcome::Approved, Some(200)),
            Err(e @ Error::Transport { .. }) => (Outcome::Transport, e.status()),
            Err(e) => (Outcome::Error, e.status()),
        };
        self.out.stats.record("batch", outcome, status, latency);
        self.out.stats.batch(latency);
        self.run.live.add(outcome);
        match answers {
            Ok(answers) => {
                for (call, answer) in calls.into_iter().zip(answers) {
                    let answer = match answer.outcome {
                        BatchOutcome::Applied(receipt) => Ok(crate::Outcome::Approved(receipt)),
                        BatchOutcome::Denied(denial) => Ok(crate::Outcome::Denied(denial)),
                        BatchOutcome::Failed(problem) => Err(Error::Problem(problem)),
                        BatchOutcome::Checked(_) => {
                            Err(Error::InvalidArgument("a check's answer to a debit".into()))
                        }
                    };
                    let (outcome, _, _) = self.log(call, answer);
                    self.out.stats.count("batch_debit", outcome);
                }
            }
            Err(e) => {
                for call in calls {
                    // Each item may or may not have been applied: at most once, then.
                    self.out.logs[call.agent].unknown.push(call.key);
                    self.out.stats.debit(e.status());
                    self.out.stats.count("batch_debit", outcome);
                }
            }
        }
    }

    /// Sends one debit twice at once, same key and body, as a client that retries too
    /// eagerly would: the server must apply it once and answer the other with the same
    /// receipt (`Idempotent-Replayed`). A double charge shows up in the invariants as the
    /// key appearing twice.
    async fn duplicate_debit(&mut self, agent: usize, amount: u64) {
        let key = self.key();
        let debit = Debit::new(amount)
            .task_type("loadtest")
            .idempotency_key(&key);
        let run = self.run.clone();
        let id = &run.agents[agent].id;
        self.run.issued.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let (first, second) =
            tokio::join!(run.client.debit(id, &debit), run.client.debit(id, &debit));
        let approved = |a: &Answer| matches!(a, Ok(crate::Outcome::Approved(_)));
        let log_denial = !approved(&first) && !approved(&second);
        for (operation, answer) in [("debit", first), ("duplicate", second)] {
            let call = Call {
                operation,
                journal_kind: "debit",
                agent,
                key: key.clone(),
                amount_micros: amount,
                success_status: 201,
                started,
                log_denial,
            };
            self.record(call, answer);
        }
    }

    async fn check(&mut self, agent: usize, amount: u64) {
        let started = Instant::now();
        let answer = self
            .run
            .client
            .check(&self.run.agents[agent].id, &Debit::new(amount))
            .await;
        let latency = started.elapsed();
        let (outcome, status) = match &answer {
            Ok(crate::Outcome::Approved(_)) => (Outcome::Approved, Some(200)),
            Ok(crate::Outcome::Denied(d)) => (denial_outcome(d), Some(d.status())),
            Err(e @ Error::Transport { .. }) => (Outcome::Transport, e.status()),
            Err(e) => (Outcome::Error, e.status()),
        };
        self.out.stats.record("check", outcome, status, latency);
        self.run.live.add(outcome);
    }

    async fn top_up(&mut self, agent: usize, amount: u64) {
        let key = self.key();
        let credit = Credit::new(amount).idempotency_key(&key);
        let started = Instant::now();
        let answer = lift(
            self.run
                .client
                .credit(&self.run.agents[agent].id, &credit)
                .await,
        );
        self.record(
            Call {
                operation: "credit",
                journal_kind: "credit",
                agent,
                key,
                amount_micros: amount,
                success_status: 201,
                started,
                log_denial: true,
            },
            answer,
        );
    }

    /// Hold, then capture part of it (three times in four) or void it. The second request
    /// is made even past the deadline so that no hold is left open.
    async fn hold_then_settle(&mut self, agent: usize, amount: u64) {
        let key = self.key();
        let hold = Hold::new(amount, HOLD_TTL_MS)
            .task_type("loadtest")
            .idempotency_key(&key);
        let started = Instant::now();
        let answer = self
            .run
            .client
            .hold(&self.run.agents[agent].id, &hold)
            .await;
        let Some(receipt) = self.record(
            Call {
                operation: "hold",
                journal_kind: "hold",
                agent,
                key,
                amount_micros: amount,
                success_status: 201,
                started,
                log_denial: true,
            },
            answer,
        ) else {
            return;
        };
        let Some(hold_id) = receipt.hold_id else {
            return;
        };
        self.run.issued.fetch_add(1, Ordering::Relaxed);
        let key = self.key();
        let started = Instant::now();
        if self.rng.gen_range(0..4) < 3 {
            let captured = self.rng.gen_range(1..=amount);
            let capture = Capture::new(captured).idempotency_key(&key);
            let answer = lift(self.run.client.capture(&hold_id, &capture).await);
            self.record(
                Call {
                    operation: "capture",
                    journal_kind: "capture",
                    agent,
                    key,
                    amount_micros: captured,
                    success_status: 200,
                    started,
                    log_denial: true,
                },
                answer,
            );
        } else {
            let answer = lift(self.run.client.void(&hold_id, Some(&key)).await);
            // A void releases the whole hold: that is the journal entry's amount.
            self.record(
                Call {
                    operation: "void",
                    journal_kind: "void",
                    agent,
                    key,
                    amount_micros: amount,
                    success_status: 200,
                    started,
                    log_denial: true,
                },
                answer,
            );
        }
    }
}
