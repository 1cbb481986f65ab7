//! Kill test of `POST /v1/batch`: the real `tally serve` under concurrent batches that mix
//! debits, credits, holds, captures and voids over several agents, SIGKILLed mid-load and
//! restarted on the same data dir, `BATCH_KILL_ROUNDS` times (default 3). After every
//! restart: every item acknowledged in a batch answer that arrived is in the journal
//! exactly once, whole (its kind, amount, hold); every item of a batch whose answer never
//! came is there wholly or not at all; every entry's balance and held follow from the one
//! before by its own amount alone (a half-applied item cannot); the agent's balance and
//! held are the journal's; sending each unanswered batch again with the same keys replays
//! what was applied and applies the rest once; and the newest acknowledged batches sent
//! again replay item by item.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::process::spawn;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tally_client::{
    BatchAnswer, BatchItem, Capture, Client, Credit, Debit, Error, Hold, JournalEntry, NewAgent,
    RetryPolicy,
};
use tokio::sync::Notify;

const TOKEN: &str = "batch-kill-admin-token";
const AGENTS: [&str; 4] = ["bk0", "bk1", "bk2", "bk3"];
/// Enough that no debit or hold in the test is ever refused for funds.
const CREDIT_MICROS: u64 = 1_000_000_000_000;
const WORKERS: u64 = 4;
const ITEMS_PER_BATCH: usize = 12;
/// Batches answered in a round before the SIGKILL, and the time allowed to reach them.
const ANSWERED_BEFORE_KILL: usize = 40;
const ANSWERED_DEADLINE: Duration = Duration::from_secs(60);
/// Holds outlive the test: an expiry would be a change nobody sent.
const HOLD_TTL_MS: u64 = 3_600_000;
/// About 1 s a round. An answer released before its commit is caught in about half the
/// rounds (measured with that bug planted), so 5 rounds miss it about one run in 30.
const ROUNDS_DEFAULT: usize = 5;

/// What an item asked for, as its journal entry must show it.
#[derive(Debug, Clone)]
struct Sent {
    agent: &'static str,
    key: String,
    /// The journal kind.
    kind: &'static str,
    /// The entry's amount: the captured amount for a capture, the hold's for a void.
    amount_micros: u64,
    /// For captures and voids: the hold they settle.
    hold_seq: Option<u64>,
}

/// Batches answered in this round; the worker that answers the last one before the kill
/// wakes the killer at once, so the kill lands right after an acknowledgement, where an
/// answer released before its commit would be lost.
#[derive(Debug, Default)]
struct Progress {
    answered: AtomicUsize,
    reached: Notify,
}

/// One batch as sent, and its answer when one arrived.
#[derive(Debug, Clone)]
struct SentBatch {
    items: Vec<BatchItem>,
    sent: Vec<Sent>,
    answers: Option<Vec<BatchAnswer>>,
}

/// A hold a worker placed and has not settled yet.
#[derive(Debug, Clone)]
struct OpenHold {
    agent: &'static str,
    hold_id: String,
    seq: u64,
    amount_micros: u64,
}

fn client(base: &str) -> Client {
    Client::builder(base)
        .token(TOKEN)
        // One request per call: a batch cut off by the kill stays unanswered.
        .retry_policy(RetryPolicy {
            attempt_timeout: Some(Duration::from_secs(30)),
            ..RetryPolicy::no_retries()
        })
        .build()
        .expect("valid URL")
}

/// The next batch of a worker: fresh keys; settles some of its open holds.
fn next_batch(
    rng: &mut StdRng,
    open: &mut Vec<OpenHold>,
    prefix: &str,
) -> (Vec<BatchItem>, Vec<Sent>) {
    let mut items = Vec::new();
    let mut sent = Vec::new();
    for i in 0..ITEMS_PER_BATCH {
        let key = format!("{prefix}-i{i}");
        let roll = rng.gen_range(0..100u32);
        if roll < 25 && !open.is_empty() {
            let hold = open.swap_remove(rng.gen_range(0..open.len()));
            if roll < 18 {
                let amount = rng.gen_range(1..=hold.amount_micros);
                let capture = Capture::new(amount).idempotency_key(&key);
                items.push(BatchItem::capture(&hold.hold_id, &capture));
                sent.push(Sent {
                    agent: hold.agent,
                    key,
                    kind: "capture",
                    amount_micros: amount,
                    hold_seq: Some(hold.seq),
                });
            } else {
                items.push(BatchItem::void(&hold.hold_id, Some(&key)));
                sent.push(Sent {
                    agent: hold.agent,
                    key,
                    kind: "void",
                    amount_micros: hold.amount_micros,
                    hold_seq: Some(hold.seq),
                });
            }
            continue;
        }
        let agent = AGENTS[rng.gen_range(0..AGENTS.len())];
        let amount = rng.gen_range(1..=50_000);
        let (item, kind) = match roll {
            0..=59 => (
                BatchItem::debit(agent, &Debit::new(amount).idempotency_key(&key)),
                "debit",
            ),
            60..=84 => (
                BatchItem::hold(agent, &Hold::new(amount, HOLD_TTL_MS).idempotency_key(&key)),
                "hold",
            ),
            _ => (
                BatchItem::credit(agent, &Credit::new(amount).idempotency_key(&key)),
                "credit",
            ),
        };
        items.push(item);
        sent.push(Sent {
            agent,
            key,
            kind,
            amount_micros: amount,
            hold_seq: None,
        });
    }
    (items, sent)
}

/// Sends batches until told to stop or the server dies; returns every batch it sent.
async fn work(
    client: Client,
    round: usize,
    worker: u64,
    stop: Arc<AtomicBool>,
    progress: Arc<Progress>,
) -> Vec<SentBatch> {
    let mut rng = StdRng::seed_from_u64(round as u64 * 1_000 + worker);
    let mut open = Vec::new();
    let mut batches = Vec::new();
    for n in 0.. {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let (items, sent) = next_batch(&mut rng, &mut open, &format!("r{round}-w{worker}-b{n}"));
        match client.batch(&items).await {
            Ok(answers) => {
                assert_eq!(answers.len(), items.len());
                for (s, a) in sent.iter().zip(&answers) {
                    assert!(
                        (200..300).contains(&a.status) || a.status == 503,
                        "{} answered {a:?}: nothing here should be refused",
                        s.key
                    );
                    if let (Some(receipt), "hold") = (a.outcome.receipt(), s.kind) {
                        open.push(OpenHold {
                            agent: s.agent,
                            hold_id: receipt.hold_id.clone().expect("a hold names its hold"),
                            seq: receipt.seq,
                            amount_micros: s.amount_micros,
                        });
                    }
                }
                batches.push(SentBatch {
                    items,
                    sent,
                    answers: Some(answers),
                });
                if progress.answered.fetch_add(1, Ordering::Relaxed) + 1 == ANSWERED_BEFORE_KILL {
                    progress.reached.notify_one();
                }
            }
            Err(Error::Transport { .. }) => {
                // The server died with this batch in flight: no answer, fate unknown.
                batches.push(SentBatch {
                    items,
                    sent,
                    answers: None,
                });
                break;
            }
            Err(e) => panic!("batch {n} of worker {worker}: {e}"),
        }
    }
    batches
}

/// Every agent's journal, and the checks that need nothing but the server: dense seqs,
/// each entry's balance and held follow from the one before by its own amount, keys at
/// most once, the agent's state is its journal's last entry.
async fn journals(client: &Client) -> HashMap<&'static str, Vec<JournalEntry>> {
    let mut all = HashMap::new();
    for agent in AGENTS {
        let entries = client.journal_all(agent).await.expect("journal");
        let (mut balance, mut held) = (0u64, 0u64);
        let mut holds: HashMap<u64, u64> = HashMap::new();
        let mut keys: HashMap<&str, u64> = HashMap::new();
        for (i, e) in entries.iter().enumerate() {
            assert_eq!(e.seq, i as u64 + 1, "{agent}: journal seqs are dense");
            if let Some(key) = e.idempotency_key.as_deref() {
                if let Some(first) = keys.insert(key, e.seq) {
                    panic!(
                        "{agent}: key {key} applied twice, at seq {first} and {}",
                        e.seq
                    );
                }
            }
            let a = e.amount_micros;
            let settled = |holds: &mut HashMap<u64, u64>| {
                let seq = e.hold_seq.expect("a settlement names its hold");
                holds
                    .remove(&seq)
                    .unwrap_or_else(|| panic!("{agent} seq {}: hold {seq} is not open", e.seq))
            };
            match e.kind.as_str() {
                "agent_created" => {}
                "credit" => balance += a,
                "debit" => balance -= a,
                "hold" => {
                    holds.insert(e.seq, a);
                    balance -= a;
                    held += a;
                }
                "capture" => {
                    let hold = settled(&mut holds);
                    assert!(a <= hold, "{agent} seq {}: captured more than held", e.seq);
                    held -= hold;
                    balance += hold - a;
                }
                "void" | "expire" => {
                    let hold = settled(&mut holds);
                    assert_eq!(
                        a, hold,
                        "{agent} seq {}: a void releases the whole hold",
                        e.seq
                    );
                    held -= hold;
                    balance += hold;
                }
                other => panic!("{agent} seq {}: unexpected kind {other}", e.seq),
            }
            assert_eq!(
                (e.balance_micros, e.held_micros),
                (balance, held),
                "{agent} seq {} ({} {a}): balance and held do not follow from the entry before",
                e.seq,
                e.kind
            );
        }
        let state = client.get_agent(agent).await.expect("agent");
        assert_eq!(
            (state.balance_micros, state.held_micros, state.version),
            (balance, held, entries.len() as u64),
            "{agent}: the agent is its journal"
        );
        assert_eq!(
            state.holds.len(),
            holds.len(),
            "{agent}: open holds are the journal's"
        );
        all.insert(agent, entries);
    }
    all
}

/// The journal entry of each key.
fn by_key<'a>(
    journals: &'a HashMap<&'static str, Vec<JournalEntry>>,
) -> HashMap<(&'static str, &'a str), &'a JournalEntry> {
    journals
        .iter()
        .flat_map(|(agent, entries)| {
            entries
                .iter()
                .filter_map(move |e| e.idempotency_key.as_deref().map(|k| ((*agent, k), e)))
        })
        .collect()
}

/// The item's entry is there whole: its kind, amount and hold.
fn assert_whole(s: &Sent, e: &JournalEntry) {
    assert_eq!(
        (e.kind.as_str(), e.amount_micros, e.hold_seq),
        (s.kind, s.amount_micros, s.hold_seq),
        "{}: the entry is not the whole item",
        s.key
    );
}

/// Every acknowledged item is there once and whole, at its receipt's seq; every item of
/// an unanswered batch is there whole or not at all; no keyed entry is unexplained.
fn check_items(
    journals: &HashMap<&'static str, Vec<JournalEntry>>,
    batches: &[SentBatch],
) -> (usize, usize) {
    let entries = by_key(journals);
    let mut explained = 0;
    let (mut acknowledged, mut unknown_applied) = (0, 0);
    for batch in batches {
        for (i, s) in batch.sent.iter().enumerate() {
            let entry = entries.get(&(s.agent, s.key.as_str()));
            let receipt = batch
                .answers
                .as_ref()
                .and_then(|answers| answers[i].outcome.receipt());
            match (receipt, entry) {
                (Some(receipt), Some(e)) => {
                    assert_whole(s, e);
                    assert_eq!(e.seq, receipt.seq, "{}: at its receipt's seq", s.key);
                    acknowledged += 1;
                }
                (Some(_), None) => panic!("acknowledged item {} ({}) lost", s.key, s.kind),
                (None, Some(e)) => {
                    assert_whole(s, e);
                    unknown_applied += 1;
                }
                (None, None) => {}
            }
            explained += usize::from(entry.is_some());
        }
    }
    let setup = 2 * AGENTS.len();
    assert_eq!(
        entries.len(),
        explained + setup,
        "every keyed entry is an item the test sent (or the set-up)"
    );
    (acknowledged, unknown_applied)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_batch_never_applies_part_of_an_item() {
    let rounds: usize = std::env::var("BATCH_KILL_ROUNDS")
        .ok()
        .map(|r| r.parse().expect("BATCH_KILL_ROUNDS is a number"))
        .unwrap_or(ROUNDS_DEFAULT);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut p = spawn(dir.path(), Some(TOKEN));
    let c = client(&p.base);
    for agent in AGENTS {
        let new = NewAgent::new(agent).idempotency_key(format!("create-{agent}"));
        c.create_agent(&new).await.expect("created");
        let credit = Credit::new(CREDIT_MICROS).idempotency_key(format!("credit-{agent}"));
        c.credit(agent, &credit).await.expect("credited");
    }
    let mut all: Vec<SentBatch> = Vec::new();
    for round in 0..rounds {
        let c = client(&p.base);
        let stop = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(Progress::default());
        let workers: Vec<_> = (0..WORKERS)
            .map(|w| {
                let (c, stop, progress) = (c.clone(), stop.clone(), progress.clone());
                tokio::spawn(work(c, round, w, stop, progress))
            })
            .collect();
        // A dead server or worker must fail the test, not hang it.
        let deadline = std::time::Instant::now() + ANSWERED_DEADLINE;
        loop {
            tokio::select! {
                _ = progress.reached.notified() => break,
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
            if workers.iter().any(|w| w.is_finished()) || std::time::Instant::now() >= deadline {
                let server = p.child.try_wait();
                p.kill();
                panic!(
                    "round {round}: {} of {ANSWERED_BEFORE_KILL} batches answered; server: {server:?}",
                    progress.answered.load(Ordering::Relaxed)
                );
            }
        }
        p.kill();
        stop.store(true, Ordering::Relaxed);
        let mut round_batches = Vec::new();
        // Each worker's last answered batch: the newest acknowledgements, the likeliest
        // to live only in the log when the kill came.
        let mut newest = Vec::new();
        for w in workers {
            let batches = w.await.expect("worker");
            newest.extend(batches.iter().rev().find(|b| b.answers.is_some()).cloned());
            round_batches.extend(batches);
        }

        p = spawn(dir.path(), Some(TOKEN));
        let c = client(&p.base);
        all.extend(round_batches.iter().cloned());
        let before = journals(&c).await;
        let (acknowledged, unknown_applied) = check_items(&before, &all);
        let entries = by_key(&before);

        // The unanswered batches again, same keys: what was applied replays, at its seq.
        let unanswered: Vec<usize> = (0..all.len())
            .filter(|&i| all[i].answers.is_none())
            .collect();
        let mut replayed = 0;
        for &b in &unanswered {
            let answers = c
                .batch(&all[b].items)
                .await
                .expect("answered after the restart");
            for (s, a) in all[b].sent.iter().zip(&answers) {
                let receipt = a
                    .outcome
                    .receipt()
                    .unwrap_or_else(|| panic!("{} resent: {a:?}", s.key));
                match entries.get(&(s.agent, s.key.as_str())) {
                    Some(e) => {
                        assert!(receipt.replayed, "{} was applied: it must replay", s.key);
                        assert_eq!(receipt.seq, e.seq, "{}: replayed at its seq", s.key);
                        replayed += 1;
                    }
                    None => assert!(!receipt.replayed, "{} was not applied before", s.key),
                }
            }
            all[b].answers = Some(answers);
        }
        // Acknowledged batches again: every applied item replays at its seq after the
        // restart; nothing applies twice.
        for batch in &newest {
            let answers = c.batch(&batch.items).await.expect("answered");
            let before = batch.answers.as_ref().expect("answered batches only");
            for ((s, old), new) in batch.sent.iter().zip(before).zip(&answers) {
                if let Some(old) = old.outcome.receipt() {
                    let new = new.outcome.receipt();
                    assert_eq!(
                        new.map(|r| (r.replayed, r.seq)),
                        Some((true, old.seq)),
                        "{}: an acknowledged item sent again after the restart must replay",
                        s.key
                    );
                }
            }
        }
        let after = journals(&c).await;
        let (now_acknowledged, _) = check_items(&after, &all);
        assert_eq!(replayed, unknown_applied);
        eprintln!(
            "round {round}: {acknowledged} acknowledged items checked, {unknown_applied} \
             unanswered items found applied (and replayed), {} unanswered batches resent; \
             {now_acknowledged} items acknowledged in all",
            unanswered.len()
        );
    }
    p.kill();
}
