//! The grant sweep: expires credit grants (and journals their `grant.expiring` warnings)
//! of agents that are not in memory, which the shards' own sweep cannot see.
//!
//! A shard sweeps only the records it holds, and a record with an expiring grant may leave
//! memory (the cache bound) or not be loaded after a restart. So the store keeps an index
//! of grant expiries in expiry order (`Storage::grant_expiries`, sled's `e/` keys, written
//! with the journal entry that issued the grant), and one thread here reads it every
//! `hold_sweep_interval_ms`:
//!
//! - **Expiry.** For every key due (`expires_at_ms ≤ now`) it submits an `ExpireHolds` for
//!   the agent through the shards like any command (the shard loads the agent, the core
//!   expires what is due, the answer comes after the group commit) and only then removes
//!   that agent's keys. A poke that failed leaves its keys for the next pass. A key whose
//!   grant was spent out or already expired by a command of the agent's costs one poke
//!   that journals nothing.
//! - **Warnings.** With `W` the longest `grant_expiring_within_ms` of the plans, it pokes
//!   once every agent with a key in (`warned`, `now + W`], and moves the in-memory cursor
//!   `warned` past it (keys stay). An agent poked before its own warning time is then held
//!   in memory by its shard (`Slot::may_leave`) until the shard's sweep warns it at that
//!   time. The cursor starts at `now` at open, so after a restart a grant in the window is
//!   poked once more: harmless, the core warns once per grant. An agent whose own
//!   thresholds warn earlier than every plan's (`W`) is warned when it is next in memory:
//!   a command of its own, or this poke once its grant is within `W` (none when no plan
//!   warns, `W` = 0).
//!
//! The index shows a grant once the store indexed it (`INDEX_INTERVAL_MS` after its commit
//! at most), so a grant that expires sooner than that after its issue, on an agent that
//! left memory meanwhile, is expired that much late. The thread does nothing while the
//! engine is failed, and stops (without waiting for its answers) when the engine shuts down.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender, TrySendError};
use tally_core::{AgentId, Command, CommandKind, Outcome, PlanBook, TimestampMs};
use tokio::sync::oneshot;

use crate::engine::{shard_of, Reply};
use crate::error::{StoreError, SubmitError};
use crate::shard::{Job, Shared};
use crate::storage::GrantExpiry;

/// Index entries read per page, and so agents poked at once, at most: the pokes of a page
/// sit in the shard queues together, beside the clients' commands.
pub const GRANT_SWEEP_PAGE_MAX: usize = 256;
/// Pages one pass reads, at most, per part (expiry, warnings): past it the rest waits for
/// the next pass (the warning cursor resumes where it stopped; due keys are read again).
pub const GRANT_SWEEP_PAGES_PER_PASS_MAX: usize = 64;
/// How often the thread looks at the clock; a pass runs once `hold_sweep_interval_ms` of
/// the engine's clock went by (a test's manual clock included).
const TICK_MS: u64 = 50;
/// How often a wait for the pokes' answers looks whether the engine is stopping.
const REPLY_POLL_MS: u64 = 1;

/// The longest `grant_expiring_within_ms` of `plans` (0 when none warns): how far ahead
/// the sweep pokes agents for their warnings, and how far ahead a shard keeps a record
/// whose warning is due.
pub(crate) fn warning_lookahead_ms(plans: &PlanBook) -> u64 {
    plans
        .iter()
        .filter_map(|p| p.thresholds.grant_expiring_within_ms)
        .max()
        .unwrap_or(0)
}

/// The running sweep thread.
#[derive(Debug)]
pub(crate) struct GrantSweeper {
    stop: Arc<AtomicBool>,
    /// Dropped to wake the thread when stopping.
    wake: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl GrantSweeper {
    /// Starts the thread; `now_ms` (the open) is where the warning cursor starts.
    pub fn start(
        shared: Arc<Shared>,
        shards: Vec<Sender<Job>>,
        now_ms: TimestampMs,
    ) -> Result<Self, StoreError> {
        let stop = Arc::new(AtomicBool::new(false));
        let (wake, woken) = bounded::<()>(1);
        let sweep = Sweep {
            lookahead_ms: warning_lookahead_ms(&shared.plans),
            shared,
            shards,
            stop: stop.clone(),
            warned: WarnCursor {
                from_ms: now_ms.saturating_add(1),
                after: None,
            },
        };
        let thread = std::thread::Builder::new()
            .name("tally-grant-sweep".into())
            .spawn(move || {
                let shared = sweep.shared.clone();
                let result =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sweep.run(woken)));
                if let Err(panic) = result {
                    let what = crate::error::panic_message(panic.as_ref());
                    shared.fail(format!("the grant sweep thread panicked: {what}"));
                }
            })
            .map_err(|e| StoreError::Io(format!("starting the grant sweep thread: {e}")))?;
        Ok(Self {
            stop,
            wake: Some(wake),
            thread: Some(thread),
        })
    }

    /// Stops the thread and waits for it: at most one poll of its waits, since it leaves
    /// unanswered pokes behind (their keys stay for the next run).
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        drop(self.wake.take());
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the grant sweep thread panicked");
            }
        }
    }
}

impl Drop for GrantSweeper {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Where the next warning pass starts: at `from_ms`, or past the key `after`.
#[derive(Debug)]
struct WarnCursor {
    from_ms: TimestampMs,
    after: Option<Vec<u8>>,
}

/// Why a pass ends early: the engine is stopping or failed.
struct Halt;

struct Sweep {
    shared: Arc<Shared>,
    shards: Vec<Sender<Job>>,
    stop: Arc<AtomicBool>,
    lookahead_ms: u64,
    warned: WarnCursor,
}

impl Sweep {
    fn run(mut self, woken: Receiver<()>) {
        let interval_ms = self.shared.config.hold_sweep_interval_ms;
        // From 0, as the shards' sweep: the first pass comes at once, and an interval of
        // `u64::MAX` (tests that must see every write) turns the sweep off as it does theirs.
        let mut last_pass_ms: TimestampMs = 0;
        loop {
            match woken.recv_timeout(Duration::from_millis(TICK_MS)) {
                Err(RecvTimeoutError::Timeout) => {}
                Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
            }
            if self.halted() {
                if self.stop.load(Ordering::Acquire) {
                    return;
                }
                continue;
            }
            let now_ms = self.shared.clock.now_ms();
            if now_ms.saturating_sub(last_pass_ms) < interval_ms {
                continue;
            }
            last_pass_ms = now_ms;
            if self.expire(now_ms).is_err() {
                continue;
            }
            if self.lookahead_ms > 0 {
                let _ = self.warn(now_ms);
            }
        }
    }

    fn halted(&self) -> bool {
        self.stop.load(Ordering::Acquire) || self.shared.failure().is_some()
    }

    /// A storage error of the sweep: a shared store's passing trouble (unreachable,
    /// failing over) ends this pass and the next one tries again; any other fails the
    /// engine, as a client's would.
    fn store_failed(&self, what: &str, e: StoreError) -> Halt {
        match e {
            StoreError::Unavailable(reason) => {
                tracing::warn!(%reason, "{what}: storage unavailable; the grant sweep tries again at its next pass");
            }
            e => {
                self.shared.fail(format!("{what}: {e}"));
            }
        }
        Halt
    }

    /// Reads a page of the index.
    fn page(
        &self,
        from_ms: TimestampMs,
        after: Option<&[u8]>,
        through_ms: TimestampMs,
    ) -> Result<Vec<GrantExpiry>, Halt> {
        self.shared
            .storage
            .grant_expiries(from_ms, after, through_ms, GRANT_SWEEP_PAGE_MAX)
            .map_err(|e| self.store_failed("reading grant expiries", e))
    }

    /// Pokes the agents of every key due at `now_ms` and removes the keys of those whose
    /// poke was decided at or after their expiry.
    fn expire(&mut self, now_ms: TimestampMs) -> Result<(), Halt> {
        let mut after: Option<Vec<u8>> = None;
        for _ in 0..GRANT_SWEEP_PAGES_PER_PASS_MAX {
            let page = self.page(0, after.as_deref(), now_ms)?;
            let Some(last) = page.last() else {
                return Ok(());
            };
            after = Some(last.key.clone());
            let agents = distinct_agents(&page, &HashSet::new());
            let decided = self.poke_all(&agents)?;
            let decided_at: HashMap<&AgentId, TimestampMs> = agents
                .iter()
                .zip(&decided)
                .filter_map(|(a, at)| at.map(|at| (a, at)))
                .collect();
            // The shard decided at its own `now`; a key past it (a clock that stepped back)
            // was not yet due there and stays.
            let done: Vec<Vec<u8>> = page
                .iter()
                .filter(|e| {
                    decided_at
                        .get(&e.agent)
                        .is_some_and(|&at| e.expires_at_ms <= at)
                })
                .map(|e| e.key.clone())
                .collect();
            if !done.is_empty() {
                self.shared
                    .storage
                    .remove_grant_expiries(&done)
                    .map_err(|e| self.store_failed("removing grant expiries", e))?;
            }
            if page.len() < GRANT_SWEEP_PAGE_MAX {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Pokes, once, every agent with a key in (`warned`, `now_ms + lookahead_ms`] and
    /// moves the cursor past what was poked; a failed poke stops the pass before its key.
    fn warn(&mut self, now_ms: TimestampMs) -> Result<(), Halt> {
        let through_ms = now_ms.saturating_add(self.lookahead_ms);
        let mut poked: HashSet<AgentId> = HashSet::new();
        for _ in 0..GRANT_SWEEP_PAGES_PER_PASS_MAX {
            let page = self.page(
                self.warned.from_ms,
                self.warned.after.as_deref(),
                through_ms,
            )?;
            let agents = distinct_agents(&page, &poked);
            let decided = self.poke_all(&agents)?;
            let failed: HashSet<&AgentId> = agents
                .iter()
                .zip(&decided)
                .filter(|(_, at)| at.is_none())
                .map(|(a, _)| a)
                .collect();
            for e in &page {
                if failed.contains(&e.agent) {
                    return Ok(());
                }
                self.warned.after = Some(e.key.clone());
            }
            if page.len() < GRANT_SWEEP_PAGE_MAX {
                self.warned = WarnCursor {
                    from_ms: through_ms.saturating_add(1),
                    after: None,
                };
                return Ok(());
            }
            poked.extend(agents);
        }
        Ok(())
    }

    /// Submits an `ExpireHolds` for each agent, all queued before any is waited for, and
    /// returns for each when its shard decided it (its changes durable by then), or `None`
    /// when the poke failed (a full queue, a rejection) and should be tried again.
    fn poke_all(&self, agents: &[AgentId]) -> Result<Vec<Option<TimestampMs>>, Halt> {
        let mut waiting = Vec::with_capacity(agents.len());
        for agent in agents {
            if self.halted() {
                return Err(Halt);
            }
            let (tx, rx) = oneshot::channel();
            let job = Job::Submit {
                cmd: Command::new(agent.clone(), CommandKind::ExpireHolds),
                reply: tx,
            };
            let shard = &self.shards[shard_of(agent, self.shards.len())];
            match shard.try_send(job) {
                Ok(()) => waiting.push(Some(rx)),
                // Busy: this agent waits for the next pass, the clients go first.
                Err(TrySendError::Full(_)) => {
                    self.shared.metrics.grant_sweep_pokes_failed_total.inc();
                    waiting.push(None);
                }
                Err(TrySendError::Disconnected(_)) => return Err(Halt),
            }
        }
        let mut decided = Vec::with_capacity(agents.len());
        for (agent, rx) in agents.iter().zip(waiting) {
            let Some(rx) = rx else {
                decided.push(None);
                continue;
            };
            let at_ms = match self.answer(rx)? {
                Ok(Reply::Decided {
                    outcome: Outcome::Approved(receipt),
                    ..
                }) => {
                    self.shared.metrics.grant_sweep_pokes_total.inc();
                    Some(receipt.at_ms)
                }
                Ok(other) => {
                    // The agent's plan left the config, say: its grants expire once the
                    // poke is decided again (the shard's own sweep logs the same).
                    tracing::warn!(%agent, answer = ?other, "the grant sweep could not expire grants");
                    self.shared.metrics.grant_sweep_pokes_failed_total.inc();
                    None
                }
                Err(SubmitError::Failed(_) | SubmitError::ShuttingDown) => return Err(Halt),
                Err(e) => {
                    tracing::warn!(%agent, error = %e, "the grant sweep could not expire grants");
                    self.shared.metrics.grant_sweep_pokes_failed_total.inc();
                    None
                }
            };
            decided.push(at_ms);
        }
        Ok(decided)
    }

    /// Waits for one poke's answer, looking for a stop between looks: an answer can wait
    /// on a group commit, and the shutdown must not wait for it.
    fn answer(
        &self,
        mut rx: oneshot::Receiver<Result<Reply, SubmitError>>,
    ) -> Result<Result<Reply, SubmitError>, Halt> {
        loop {
            match rx.try_recv() {
                Ok(answer) => return Ok(answer),
                Err(oneshot::error::TryRecvError::Closed) => return Err(Halt),
                Err(oneshot::error::TryRecvError::Empty) => {
                    if self.stop.load(Ordering::Acquire) {
                        return Err(Halt);
                    }
                    std::thread::sleep(Duration::from_millis(REPLY_POLL_MS));
                }
            }
        }
    }
}

/// The agents of `page` not in `skip`, once each, in the page's order.
fn distinct_agents(page: &[GrantExpiry], skip: &HashSet<AgentId>) -> Vec<AgentId> {
    let mut seen = HashSet::new();
    page.iter()
        .filter(|e| !skip.contains(&e.agent) && seen.insert(&e.agent))
        .map(|e| e.agent.clone())
        .collect()
}
