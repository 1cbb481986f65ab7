//! The change feed end to end through the engine: 10,000 events of 100 agents written
//! concurrently over four rounds, with clean and crash restarts between them, read in
//! pages of 7 by a reader whose cursor outlives every restart. Every acknowledged event
//! comes exactly once, in commit order, and nothing else comes.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tally_core::{AgentId, CommandKind, Event};
use tally_store::{Engine, FeedCursor, ManualClock};

const AGENTS: usize = 100;
/// Create + credit + 98 debits each: 10,000 events.
const DEBITS_PER_AGENT: u64 = 98;
const ROUNDS: u64 = 4;
const PAGE: usize = 7;

/// One acknowledged event: when its command was sent and when its answer came, on one
/// counter shared by every task.
#[derive(Debug, Clone, Copy)]
struct Acked {
    sent: u64,
    answered: u64,
}

struct Reader {
    cursor: FeedCursor,
    seen: Vec<(AgentId, Event)>,
}

impl Reader {
    /// Reads pages until one comes back empty (after a short long-poll).
    async fn drain(&mut self, engine: &Engine) {
        loop {
            let page = engine
                .events(self.cursor, PAGE, Duration::from_millis(50))
                .await
                .expect("reads the feed");
            assert!(page.events.len() <= PAGE);
            assert_eq!(page.ends.len(), page.events.len());
            // A reader that stops after any event resumes at the next one.
            if page.events.len() >= 2 {
                let i = page.events.len() / 2 - 1;
                let resumed = engine
                    .events(page.ends[i], 1, Duration::ZERO)
                    .await
                    .expect("reads the feed");
                assert_eq!(resumed.events.first(), Some(&page.events[i + 1]));
            }
            self.cursor = page.next;
            if page.events.is_empty() {
                return;
            }
            self.seen.extend(page.events);
        }
    }
}

async fn write_round(
    engine: &Engine,
    agents: &[AgentId],
    round: u64,
    clock: &Arc<AtomicU64>,
) -> Vec<(AgentId, u64, Acked)> {
    let per_round = DEBITS_PER_AGENT / ROUNDS + 1;
    let keys = (round * per_round)..((round + 1) * per_round).min(DEBITS_PER_AGENT);
    let mut tasks = Vec::new();
    for a in agents {
        let (engine, a, clock, keys) = (engine.clone(), a.clone(), clock.clone(), keys.clone());
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in keys {
                let sent = clock.fetch_add(1, Ordering::SeqCst);
                let debit = CommandKind::Debit { amount_micros: 1 };
                let r = approve(&engine, cmd(&a, debit, &format!("d{i}"))).await;
                let answered = clock.fetch_add(1, Ordering::SeqCst);
                assert_eq!(r.events, 1);
                acked.push((a.clone(), r.first_seq, Acked { sent, answered }));
            }
            acked
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("writer task"));
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_events_come_once_in_commit_order_across_restarts() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = |g: u32| -> PathBuf { tmp.path().join(format!("gen{g}")) };
    let time = Arc::new(ManualClock::new(T0_MS));
    let mut generation = 0;
    let mut engine = open(&dir(generation), &time);
    let agents: Vec<AgentId> = (0..AGENTS)
        .map(|i| agent(&format!("agent-{i:03}")))
        .collect();
    let order = Arc::new(AtomicU64::new(0));
    let mut acked: HashMap<(AgentId, u64), Acked> = HashMap::new();
    for a in &agents {
        let sent = order.fetch_add(1, Ordering::SeqCst);
        create_funded(&engine, a, "default", 1_000_000).await;
        let answered = order.fetch_add(1, Ordering::SeqCst);
        for seq in [1, 2] {
            acked.insert((a.clone(), seq), Acked { sent, answered });
        }
    }
    let mut reader = Reader {
        cursor: FeedCursor::default(),
        seen: Vec::new(),
    };
    for round in 0..ROUNDS {
        // Read while the round is written, so pages end mid-pass and at the feed's end.
        let writing = write_round(&engine, &agents, round, &order);
        let reading = async {
            for _ in 0..20 {
                let page = engine
                    .events(reader.cursor, PAGE, Duration::from_millis(20))
                    .await
                    .expect("reads the feed");
                reader.cursor = page.next;
                reader.seen.extend(page.events);
            }
        };
        let (written, ()) = tokio::join!(writing, reading);
        for (a, seq, ack) in written {
            acked.insert((a, seq), ack);
        }
        reader.drain(&engine).await;
        // Restart: a crash (the files copied while the engine runs) on even rounds, a
        // clean shutdown on odd ones. The reader keeps its cursor.
        generation += 1;
        if round % 2 == 0 {
            copy_dir(&dir(generation - 1), &dir(generation));
            engine.shutdown().await.expect("shuts down");
        } else {
            engine.shutdown().await.expect("shuts down");
            std::fs::rename(dir(generation - 1), dir(generation)).expect("renames");
        }
        drop(engine);
        engine = open(&dir(generation), &time);
    }
    reader.drain(&engine).await;

    // Exactly the acknowledged events, each once.
    assert_eq!(acked.len(), AGENTS * (2 + DEBITS_PER_AGENT as usize));
    assert_eq!(
        reader.seen.len(),
        acked.len(),
        "every event once, nothing else"
    );
    let mut position: HashMap<(AgentId, u64), usize> = HashMap::new();
    for (i, (a, e)) in reader.seen.iter().enumerate() {
        let id = (a.clone(), e.seq);
        assert!(acked.contains_key(&id), "{id:?} was never acknowledged");
        assert!(position.insert(id.clone(), i).is_none(), "{id:?} twice");
    }
    // Per agent: seqs 1, 2, 3, ... with no gap, and the events are the journal's.
    let mut last: HashMap<&AgentId, u64> = HashMap::new();
    for (a, e) in &reader.seen {
        let prev = last.insert(a, e.seq).unwrap_or(0);
        assert_eq!(e.seq, prev + 1, "{a}'s events in order, no gap");
    }
    for a in &agents {
        let journal = engine.journal(a, 0, 1_000).await.expect("reads");
        let fed: Vec<&Event> = reader
            .seen
            .iter()
            .filter(|(x, _)| x == a)
            .map(|(_, e)| e)
            .collect();
        assert_eq!(fed, journal.iter().collect::<Vec<_>>(), "{a}'s journal");
    }
    // Across agents: an event answered before another was sent comes before it.
    let mut by_answer: Vec<(u64, usize)> = acked
        .iter()
        .map(|(id, ack)| (ack.answered, position[id]))
        .collect();
    by_answer.sort_unstable();
    let mut latest_position = Vec::with_capacity(by_answer.len());
    let mut max = 0;
    for &(_, pos) in &by_answer {
        max = max.max(pos);
        latest_position.push(max);
    }
    for (id, ack) in &acked {
        let answered_before = by_answer.partition_point(|&(answered, _)| answered < ack.sent);
        if answered_before > 0 {
            assert!(
                latest_position[answered_before - 1] < position[id],
                "{id:?} comes after an event answered before it was sent"
            );
        }
    }
    engine.shutdown().await.expect("shuts down");
}
