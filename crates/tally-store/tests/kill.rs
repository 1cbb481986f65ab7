//! The kill test: a child process runs concurrent debits with unique idempotency keys and
//! prints each one it sends and each one acknowledged; it is SIGKILLed at a random moment,
//! many times in a row on the same data directory. After every kill the store is reopened
//! and checked: every acknowledged debit is in the journal exactly once, an unacknowledged
//! one retried with its key is never applied twice, and every balance equals credits minus
//! debits from the journal.
//!
//! The child is this same test binary, re-run with `--ignored --exact kill_child`.
//! `KILLTEST_ROUNDS` sets the number of kills (default 20). Every round must end in our
//! SIGKILL (a child that exits on its own, e.g. a panic at start, fails the test) and must
//! acknowledge debits, unless it was killed before it was ready (the reason is printed).
//! The child's stderr goes to a file that is printed when the test fails.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command as Process, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rand::{Rng, SeedableRng};
use tally_core::{AgentId, CommandKind, Event, EventKind, Outcome};
use tally_store::{Engine, FeedCursor, ManualClock, Reply, SystemClock};

const AGENTS: usize = 8;
const TASKS: usize = 32;
const CREDIT_MICROS: u64 = 1_000_000_000_000;

fn agent_name(i: usize) -> String {
    format!("kill-agent-{i}")
}

fn debit(agent_i: usize, key: &str, amount: u64) -> tally_core::Command {
    cmd(
        &agent(&agent_name(agent_i)),
        CommandKind::Debit {
            amount_micros: amount,
        },
        key,
    )
}

/// Time after READY within which a round may end without an acknowledgement: a few fsyncs.
const ACK_GRACE_MS: u128 = 100;

/// Parses `SEND agent key amount` / `ACK agent key seq` lines.
#[derive(Default)]
struct Seen {
    sent: BTreeMap<String, (usize, u64)>,
    acked: BTreeMap<String, u64>,
}

/// What one child did: its lines, how it ended, and how long it ran ready.
struct Round {
    seen: Seen,
    status: ExitStatus,
    /// From READY to the kill; `None` when killed before READY.
    ready_for: Option<Duration>,
}

/// Prints the child's stderr file when the test fails while this is alive.
struct ShowStderrOnFailure(PathBuf);

impl Drop for ShowStderrOnFailure {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let text = std::fs::read_to_string(&self.0).unwrap_or_else(|e| format!("({e})"));
            eprintln!(
                "--- stderr of the kill test's child ({}) ---\n{text}\n--- end ---",
                self.0.display()
            );
        }
    }
}

#[test]
#[ignore = "entry point of the kill test's child process"]
fn kill_child() {
    let dir = std::env::var("KILLTEST_DIR").expect("run by the kill test, which sets KILLTEST_DIR");
    let round: u64 = std::env::var("KILLTEST_ROUND")
        .expect("set")
        .parse()
        .expect("a number");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let engine = Engine::open(config(dir.as_ref()), plans(), Arc::new(SystemClock), None)
            .expect("opens");
        for i in 0..AGENTS {
            let a = agent(&agent_name(i));
            // Keyed, so every round after the first just replays these.
            let _ = engine
                .submit(cmd(&a, create("default"), "create"))
                .await
                .expect("submits");
            let _ = engine
                .submit(cmd(
                    &a,
                    CommandKind::Credit {
                        amount_micros: CREDIT_MICROS,
                    },
                    "credit",
                ))
                .await
                .expect("submits");
        }
        let out = Arc::new(std::sync::Mutex::new(std::io::stdout()));
        writeln!(out.lock().expect("stdout"), "READY").expect("writes");
        let mut tasks = Vec::new();
        for t in 0..TASKS {
            let engine = engine.clone();
            let out = out.clone();
            tasks.push(tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(round * 1_000 + t as u64);
                for i in 0u64.. {
                    let a = rng.gen_range(0..AGENTS);
                    let amount = rng.gen_range(1..=1_000_000);
                    let key = format!("r{round}-t{t}-{i}");
                    writeln!(out.lock().expect("stdout"), "SEND {a} {key} {amount}")
                        .expect("writes");
                    if let Reply::Decided {
                        outcome: Outcome::Approved(r),
                        ..
                    } = engine
                        .submit(debit(a, &key, amount))
                        .await
                        .expect("submits")
                    {
                        writeln!(out.lock().expect("stdout"), "ACK {a} {key} {}", r.first_seq)
                            .expect("writes");
                    }
                }
            }));
        }
        for t in tasks {
            t.await.expect("runs until killed");
        }
    });
}

fn run_child_and_kill(dir: &Path, stderr: &Path, round: u64, kill_after: Duration) -> Round {
    let exe = std::env::current_exe().expect("test binary");
    let stderr = std::fs::File::create(stderr).expect("creates the child's stderr file");
    let mut child = Process::new(exe)
        .args([
            "--ignored",
            "--exact",
            "kill_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("KILLTEST_DIR", dir)
        .env("KILLTEST_ROUND", round.to_string())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("child starts");
    let stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut seen = Seen::default();
        let mut ready_at = None;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            // libtest prints its "test kill_child ... " prefix on the first line.
            let line = line.trim_start_matches("test kill_child ... ");
            let parts: Vec<&str> = line.split_whitespace().collect();
            match parts.as_slice() {
                ["READY"] => ready_at = Some(Instant::now()),
                ["SEND", a, key, amount] => {
                    seen.sent.insert(
                        key.to_string(),
                        (a.parse().expect("n"), amount.parse().expect("n")),
                    );
                }
                ["ACK", _, key, seq] => {
                    seen.acked.insert(key.to_string(), seq.parse().expect("n"));
                }
                // A line cut by the kill.
                _ => {}
            }
        }
        (seen, ready_at)
    });
    // Kill at a random moment (startup and recovery included: they must survive too).
    std::thread::sleep(kill_after);
    let killed_at = Instant::now();
    // Ok also for a child that already exited (and is not yet reaped): the status tells.
    child.kill().expect("sends SIGKILL");
    let status = child.wait().expect("reaped");
    let (seen, ready_at) = reader.join().expect("reader");
    assert!(
        ready_at.is_some() || seen.sent.is_empty(),
        "child must announce READY before sending"
    );
    Round {
        seen,
        status,
        ready_for: ready_at.map(|t| killed_at.saturating_duration_since(t)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_no_acknowledged_debit() {
    let rounds: u64 = std::env::var("KILLTEST_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(20);
    let dir = tempfile::tempdir().expect("tempdir");
    let logs = tempfile::tempdir().expect("tempdir");
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut all_acked: BTreeMap<String, u64> = BTreeMap::new();
    let mut total_acks = 0;
    // The change feed, read after every restart from the cursor of the one before: it
    // must hold each agent's journal exactly, however the kills fell.
    let mut feed_cursor = FeedCursor::default();
    let mut fed: BTreeMap<AgentId, Vec<Event>> = BTreeMap::new();
    for round in 0..rounds {
        let kill_after = Duration::from_millis(rng.gen_range(300..900));
        let stderr = logs.path().join(format!("child-{round}.stderr"));
        let _show = ShowStderrOnFailure(stderr.clone());
        let Round {
            seen,
            status,
            ready_for,
        } = run_child_and_kill(dir.path(), &stderr, round, kill_after);
        assert_eq!(
            status.signal(),
            Some(9),
            "round {round}: the child must end by our SIGKILL, not on its own ({status})"
        );
        match ready_for {
            _ if !seen.acked.is_empty() => {}
            None => eprintln!(
                "round {round}: no acknowledgement: killed after {kill_after:?}, \
                 before READY (during start-up or recovery)"
            ),
            Some(t) if t.as_millis() < ACK_GRACE_MS => eprintln!(
                "round {round}: no acknowledgement: killed {t:?} after READY \
                 (less than {ACK_GRACE_MS} ms)"
            ),
            Some(t) => panic!(
                "round {round}: the child was ready for {t:?} and acknowledged nothing \
                 ({} sent)",
                seen.sent.len()
            ),
        }
        total_acks += seen.acked.len();
        all_acked.extend(seen.acked.iter().map(|(k, v)| (k.clone(), *v)));

        let clock = Arc::new(ManualClock::new(SystemClock.now_ms_for_tests()));
        let engine = open(dir.path(), &clock);
        loop {
            // Opening indexed the whole WAL, so the feed has everything now.
            let page = engine
                .events(feed_cursor, 1_000, Duration::ZERO)
                .await
                .expect("reads the feed");
            feed_cursor = page.next;
            if page.events.is_empty() {
                break;
            }
            for (a, e) in page.events {
                fed.entry(a).or_default().push(e);
            }
        }
        let mut keys_in_journal: BTreeMap<String, (usize, u64)> = BTreeMap::new();
        for i in 0..AGENTS {
            let a = agent(&agent_name(i));
            let Some(state) = engine.agent(&a).await.expect("reads") else {
                assert!(
                    all_acked.is_empty(),
                    "agents exist once anything was acknowledged"
                );
                continue;
            };
            let journal = engine.journal(&a, 0, usize::MAX).await.expect("reads");
            assert_eq!(
                journal.len() as u64,
                state.last_seq,
                "journal is dense from 1"
            );
            assert_eq!(
                fed.get(&a).map_or(&[][..], Vec::as_slice),
                &journal[..],
                "round {round}: the feed holds {a}'s journal, each entry once"
            );
            let (mut credited, mut debited) = (0u64, 0u64);
            for e in &journal {
                match e.kind {
                    EventKind::Credited { amount_micros } => credited += amount_micros,
                    EventKind::Debited { amount_micros, .. } => {
                        debited += amount_micros;
                        let key = e
                            .idempotency_key
                            .as_ref()
                            .expect("debits are keyed")
                            .to_string();
                        let entry = keys_in_journal.entry(key).or_insert((i, e.seq));
                        assert_eq!(*entry, (i, e.seq), "a key is applied at most once");
                    }
                    _ => {}
                }
            }
            assert_eq!(
                state.balance_micros,
                credited - debited,
                "balance = credits - debits from the journal"
            );
            state
                .check_invariants()
                .expect("invariants hold after recovery");
        }
        for (key, seq) in &all_acked {
            let (_, journal_seq) = keys_in_journal
                .get(key)
                .unwrap_or_else(|| panic!("acknowledged {key} was lost"));
            assert_eq!(
                journal_seq, seq,
                "acknowledged {key} is where it was acknowledged"
            );
        }
        // Retry everything sent this round but not acknowledged: applied at most once.
        for (key, (a, amount)) in seen
            .sent
            .iter()
            .filter(|(k, _)| !seen.acked.contains_key(*k))
        {
            let reply = engine
                .submit(debit(*a, key, *amount))
                .await
                .expect("submits");
            match (keys_in_journal.get(key), reply) {
                (
                    Some((_, seq)),
                    Reply::Decided {
                        outcome: Outcome::Approved(r),
                        replayed: true,
                        ..
                    },
                ) => {
                    assert_eq!(r.first_seq, *seq, "the replay answers the stored change");
                }
                (Some(_), other) => {
                    panic!("{key} was applied before the kill but its retry got {other:?}")
                }
                (
                    None,
                    Reply::Decided {
                        replayed: false, ..
                    },
                ) => {}
                (None, other) => panic!("{key} was never applied but its retry got {other:?}"),
            }
            let again = engine
                .submit(debit(*a, key, *amount))
                .await
                .expect("submits");
            assert!(matches!(
                again,
                Reply::Decided { replayed: true, .. }
                    | Reply::Decided {
                        outcome: Outcome::Denied(_),
                        ..
                    }
            ));
        }
        engine.shutdown().await.expect("shuts down");
        drop(engine);
    }
    assert!(
        total_acks > 0,
        "the child acknowledged debits before being killed"
    );
    std::io::stderr().flush().ok();
    eprintln!("kill test: {rounds} rounds, {total_acks} acknowledged debits checked");
}

trait NowForTests {
    fn now_ms_for_tests(&self) -> u64;
}

impl NowForTests for SystemClock {
    fn now_ms_for_tests(&self) -> u64 {
        use tally_store::Clock;
        self.now_ms()
    }
}
