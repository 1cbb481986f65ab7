//! Durable debits per second through the engine: N agents, C concurrent submitters, each
//! debit with its own idempotency key, sustained for a fixed time. Prints throughput,
//! the mean batch size per fsync and the commit latency a caller sees (p50/p99).
//!
//! `cargo run --release -p tally-benches --bin durable_debits -- --seconds 60`

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use tally_benches::{histogram_max_bound, histogram_mean, percentile};
use tally_core::{
    AgentId, Command, CommandKind, IdempotencyKey, Outcome, Plan, PlanBook, PlanName, Status,
};
use tally_store::{Engine, EngineConfig, Reply, SystemClock};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    #[arg(long, default_value_t = 1_000)]
    agents: usize,
    #[arg(long, default_value_t = 256)]
    submitters: usize,
    /// Shards (0 = the engine's default: one per two cores).
    #[arg(long, default_value_t = 0)]
    shards: usize,
    #[arg(long, default_value_t = 512)]
    batch_size_max: usize,

    /// Data directory (default: a fresh temporary one).
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let tmp = tempfile::tempdir()?;
    let dir = args.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    let mut config = EngineConfig::new(&dir);
    config.shards = args.shards;
    config.batch_size_max = args.batch_size_max;
    let registry = prometheus::Registry::new();
    let plan = Plan::unlimited(PlanName::new("default")?);
    let engine = Engine::open(
        config,
        PlanBook::new([plan]),
        Arc::new(SystemClock),
        Some(&registry),
    )?;
    let agents: Vec<AgentId> = (0..args.agents)
        .map(|i| AgentId::new(format!("bench-{i}")))
        .collect::<Result<_, _>>()?;
    for a in &agents {
        let create = CommandKind::CreateAgent {
            plan: PlanName::new("default")?,
            status: Status::Active,
        };
        engine
            .submit(Command::new(a.clone(), create).with_key(IdempotencyKey::new("create")?))
            .await?;
        let credit = CommandKind::Credit {
            amount_micros: u64::MAX / 2,
        };
        engine
            .submit(Command::new(a.clone(), credit).with_key(IdempotencyKey::new("credit")?))
            .await?;
    }
    let commits_before = engine.metrics().commits_total.get();
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for s in 0..args.submitters {
        let engine = engine.clone();
        let agents = agents.clone();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies_us = Vec::with_capacity(1 << 16);
            let mut overloaded = 0u64;
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let agent = agents[(s * 7919 + i as usize) % agents.len()].clone();
                let key = IdempotencyKey::new(format!("s{s}-{i}")).expect("valid key");
                let cmd = Command::new(
                    agent,
                    CommandKind::Debit {
                        amount_micros: 1_000,
                    },
                )
                .with_key(key);
                let t = Instant::now();
                match engine.submit(cmd).await {
                    Ok(Reply::Decided {
                        outcome: Outcome::Approved(_),
                        ..
                    }) => latencies_us.push(t.elapsed().as_micros() as u64),
                    Ok(other) => panic!("unexpected answer {other:?}"),
                    Err(tally_store::SubmitError::Overloaded { .. }) => {
                        overloaded += 1;
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    Err(e) => panic!("submit failed: {e}"),
                }
                i += 1;
            }
            (latencies_us, overloaded)
        }));
    }
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    let mut overloaded = 0;
    for t in tasks {
        let (l, o) = t.await?;
        latencies.extend(l);
        overloaded += o;
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let m = engine.metrics();
    let commits = m.commits_total.get() - commits_before;
    println!(
        "durable debits: {} in {elapsed:.1} s = {:.0}/s",
        latencies.len(),
        latencies.len() as f64 / elapsed
    );
    println!(
        "agents {} submitters {} shards {} batch_size_max {}",
        args.agents,
        args.submitters,
        if args.shards == 0 {
            "default (one per two cores)".to_string()
        } else {
            args.shards.to_string()
        },
        args.batch_size_max
    );
    println!(
        "group commits (fsyncs): {commits}, mean entries per fsync {:.1}, mean fsync {:.2} ms, slowest fsync <= {:.1} ms",
        histogram_mean(&m.commit_batch_events),
        histogram_mean(&m.commit_seconds) * 1e3,
        histogram_max_bound(&m.commit_seconds) * 1e3
    );
    println!(
        "commit latency seen by a caller (submit to durable ack): p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
        percentile(&latencies, 50.0) as f64 / 1e3,
        percentile(&latencies, 99.0) as f64 / 1e3,
        percentile(&latencies, 99.9) as f64 / 1e3,
        latencies.last().copied().unwrap_or(0) as f64 / 1e3
    );
    println!("overloaded (queue full) answers: {overloaded}");
    engine.shutdown().await?;
    Ok(())
}
