//! A Redis Cluster failover under load (issue 13): debits run through the engine while a
//! master is killed with SIGKILL; its replica takes over. Callers see 503s (`Unavailable`)
//! meanwhile and retry with the same idempotency key, as a client would, never a wrong
//! answer. Afterwards every agent's journal is dense and replays to its record, money is
//! conserved, and with `wait_replicas = 1` every debit acknowledged before, during and
//! after the kill is in the journal exactly once. Without `WAIT`, Redis's asynchronous
//! replication may lose acknowledged debits in a failover: the second run counts them and
//! prints the count (it is not asserted: it is what the README says may happen).
//!
//! Needs the cluster of `scripts/redis-cluster.sh up` (`TALLY_REDIS_CLUSTER`); skipped,
//! saying so, without it. The killed node is started again at the end (it rejoins as a
//! replica), so the cluster is whole for whatever runs next.

mod common;

use std::collections::HashMap;
use std::process::Command as Process;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tally_core::{evolve, AgentId, CommandKind, EventKind, Outcome};
use tally_store::{Engine, RedisOptions, RedisStorage, Reply, SubmitError, SystemClock};

const AGENTS: usize = 48;
const CREDIT_MICROS: u64 = 10_000_000;
const CLIENTS: usize = 16;
/// Load before the kill, and after it at most (the run stops earlier once enough debits
/// went through after the cluster healed).
const BEFORE_KILL: Duration = Duration::from_millis(1_500);
const AFTER_KILL_MAX: Duration = Duration::from_secs(20);
/// Debits acknowledged after the cluster answered again, before the load stops.
const HEALED_DEBITS: usize = 500;
/// Retries of one debit through 503s.
const ATTEMPTS_MAX: usize = 400;
const CLUSTER_OK_WAIT_MAX: Duration = Duration::from_secs(30);

fn cli(port: &str, args: &[&str]) -> Option<String> {
    let out = Process::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", port])
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn info_field(info: &str, field: &str) -> Option<String> {
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().to_owned())
}

/// A master of the cluster with a replica: (port, pid, its replica's port).
fn a_master(nodes: &[String]) -> (String, u32, String) {
    for node in nodes {
        let port = node.rsplit_once(':').expect("host:port").1;
        let Some(info) = cli(port, &["info", "replication"]) else {
            continue;
        };
        if info_field(&info, "role").as_deref() != Some("master") {
            continue;
        }
        let Some(replica) = info_field(&info, "slave0").and_then(|r| {
            r.split(',')
                .find_map(|kv| kv.strip_prefix("port="))
                .map(str::to_owned)
        }) else {
            continue;
        };
        let server = cli(port, &["info", "server"]).expect("info server");
        let pid = info_field(&server, "process_id")
            .and_then(|p| p.parse().ok())
            .expect("process_id");
        return (port.to_owned(), pid, replica);
    }
    panic!("no master among {nodes:?}");
}

fn wait_cluster_ok(nodes: &[String]) {
    let deadline = Instant::now() + CLUSTER_OK_WAIT_MAX;
    loop {
        let ok = nodes.iter().all(|n| {
            let port = n.rsplit_once(':').expect("host:port").1;
            cli(port, &["cluster", "info"])
                .is_some_and(|i| info_field(&i, "cluster_state").as_deref() == Some("ok"))
        });
        if ok {
            return;
        }
        assert!(Instant::now() < deadline, "the cluster did not heal");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Submits until the answer is not a 503 (the cluster may still be settling from an
/// earlier run); the answer must approve.
async fn submit_through_503s(engine: &Engine, c: &tally_core::Command) {
    for _ in 0..ATTEMPTS_MAX {
        match engine.submit(c.clone()).await {
            Ok(Reply::Decided {
                outcome: Outcome::Approved(_),
                ..
            }) => return,
            Ok(other) => panic!("{c:?}: {other:?}"),
            Err(SubmitError::Unavailable { .. }) => {
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            Err(e) => panic!("{c:?}: {e}"),
        }
    }
    panic!("{c:?}: unavailable for good");
}

struct Outcomes {
    /// Acknowledged debits: agent → (key, amount).
    acked: Vec<(usize, String, u64)>,
    unavailable: u64,
}

async fn run_failover(wait_replicas: u32) -> Option<(Outcomes, usize)> {
    let nodes: Vec<String> = std::env::var("TALLY_REDIS_CLUSTER")
        .ok()?
        .split(',')
        .map(str::to_owned)
        .collect();
    let options = RedisOptions {
        nodes: nodes.clone(),
        wait_replicas,
        ..RedisOptions::default()
    };
    let store = Arc::new(RedisStorage::connect(&options).expect("the cluster answers"));
    let dir = std::env::temp_dir();
    let engine = Engine::open_with(store, config(&dir), plans(), Arc::new(SystemClock), None)
        .expect("engine opens");
    let prefix = unique_prefix();
    let ids: Vec<AgentId> = (0..AGENTS)
        .map(|i| agent(&format!("{prefix}f{i}")))
        .collect();
    for a in &ids {
        let credit = CommandKind::Credit {
            amount_micros: CREDIT_MICROS,
        };
        for c in [cmd(a, create("default"), "c"), cmd(a, credit, "t")] {
            submit_through_503s(&engine, &c).await;
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let (engine, ids, stop, acked) = (engine.clone(), ids.clone(), stop.clone(), acked.clone());
        clients.push(tokio::spawn(async move {
            let mut out = Outcomes {
                acked: Vec::new(),
                unavailable: 0,
            };
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let agent = (c * 7 + i as usize) % AGENTS;
                let amount = 1 + (i % 97);
                let key = format!("c{c}-{i}");
                let debit = cmd(
                    &ids[agent],
                    CommandKind::Debit {
                        amount_micros: amount,
                    },
                    &key,
                );
                let mut attempts = 0;
                loop {
                    match engine.submit(debit.clone()).await {
                        Ok(Reply::Decided {
                            outcome: Outcome::Approved(_),
                            ..
                        }) => {
                            out.acked.push((agent, key, amount));
                            acked.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        Ok(other) => panic!("a debit that fits answered {other:?}"),
                        Err(SubmitError::Unavailable { retry_after_ms, .. }) => {
                            assert!(retry_after_ms > 0, "a 503 says when to retry");
                            out.unavailable += 1;
                            attempts += 1;
                            assert!(attempts < ATTEMPTS_MAX, "{key}: unavailable for good");
                            tokio::time::sleep(Duration::from_millis(25)).await;
                        }
                        Err(e) => panic!("{key}: {e}"),
                    }
                }
            }
            out
        }));
    }
    tokio::time::sleep(BEFORE_KILL).await;
    let (port, pid, replica) = a_master(&nodes);
    let killed_at = Instant::now();
    assert!(Process::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("kill runs")
        .success());
    eprintln!("killed the master on port {port} (pid {pid})");
    // Load goes on through the failover, until enough went through after it or time is up.
    let survivors: Vec<String> = nodes
        .iter()
        .filter(|n| !n.ends_with(&port))
        .cloned()
        .collect();
    let watch_nodes = survivors.clone();
    let healed = tokio::task::spawn_blocking(move || {
        // The replica takes over once the others agree the master failed.
        let deadline = Instant::now() + CLUSTER_OK_WAIT_MAX;
        while cli(&replica, &["info", "replication"])
            .and_then(|i| info_field(&i, "role"))
            .as_deref()
            != Some("master")
        {
            assert!(Instant::now() < deadline, "the replica was never promoted");
            std::thread::sleep(Duration::from_millis(50));
        }
        wait_cluster_ok(&watch_nodes);
    });
    healed.await.expect("watch finishes");
    eprintln!(
        "the replica took over and the cluster answered again {} ms after the kill",
        killed_at.elapsed().as_millis()
    );
    let before = acked.load(Ordering::Relaxed);
    let deadline = Instant::now() + AFTER_KILL_MAX;
    while acked.load(Ordering::Relaxed) < before + HEALED_DEBITS && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut all = Outcomes {
        acked: Vec::new(),
        unavailable: 0,
    };
    for c in clients {
        let out = c.await.expect("client finishes");
        all.acked.extend(out.acked);
        all.unavailable += out.unavailable;
    }
    // The killed node comes back as a replica of its old replica, and the cluster is whole
    // (every replica synced) for what runs next.
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../scripts/redis-cluster.sh"
    );
    assert!(Process::new("bash")
        .args([script, "start-node", &port])
        .status()
        .expect("the script runs")
        .success());

    // Every journal is dense and replays to its record; count what is missing.
    let mut by_key: HashMap<String, u32> = HashMap::new();
    for a in &ids {
        let state = engine.agent(a).await.expect("reads").expect("exists");
        let journal = engine.journal(a, 0, 1_000_000).await.expect("reads");
        let mut replayed = None;
        for (i, e) in journal.iter().enumerate() {
            assert_eq!(e.seq, i as u64 + 1, "dense journal of {a}");
            replayed = Some(evolve(replayed, a, e).expect("the journal replays"));
            if let (EventKind::Debited { .. }, Some(k)) = (&e.kind, &e.idempotency_key) {
                *by_key.entry(format!("{a}/{}", k.as_str())).or_default() += 1;
            }
        }
        assert_eq!(replayed.as_ref(), Some(&state), "{a}: journal vs record");
        state.check_invariants().expect("invariants");
        assert_eq!(
            state.balance_micros + state.debited_total_micros,
            CREDIT_MICROS,
            "{a}: money conserved"
        );
    }
    assert!(by_key.values().all(|n| *n == 1), "no debit twice");
    let lost = all
        .acked
        .iter()
        .filter(|(agent, key, _)| !by_key.contains_key(&format!("{}/{key}", ids[*agent])))
        .count();
    engine.shutdown().await.expect("shuts down");
    Some((all, lost))
}

/// Both runs in one test: they must not kill masters at the same time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_master_killed_under_load_loses_nothing_acknowledged_with_wait() {
    let Some((out, lost)) = run_failover(1).await else {
        redis_store(0);
        return;
    };
    eprintln!(
        "WAIT 1: {} debits acknowledged, {} answers were 503, {lost} acknowledged debits lost",
        out.acked.len(),
        out.unavailable
    );
    assert!(out.unavailable > 0, "the failover was seen as 503s");
    assert_eq!(lost, 0, "with WAIT 1 every acknowledged debit survives");

    // Without WAIT a failover may lose acknowledged debits: counted, not asserted.
    let (out, lost) = run_failover(0).await.expect("the cluster is still named");
    eprintln!(
        "no WAIT: {} debits acknowledged, {} answers were 503, {lost} acknowledged debits lost",
        out.acked.len(),
        out.unavailable
    );
}
