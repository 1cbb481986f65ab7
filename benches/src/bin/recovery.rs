//! Recovery time and memory: builds a store of N agents and M journal entries (every
//! entry with its own idempotency key, all inside the retention window), then measures
//! the time `Engine::open` takes to be ready and the process's memory; the keys are found
//! in the key index on disk (bounded by `--keys-max`), not read from the journal.
//!
//! `cargo run --release -p tally-benches --bin recovery -- --agents 1000 --entries 2000000`

use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use tally_benches::rss_bytes;
use tally_core::{
    decide, evolve, AgentId, Command, CommandKind, IdempotencyKey, Plan, PlanBook, PlanName,
    RateState, Status,
};
use tally_store::{AgentWrite, Clock, Engine, EngineConfig, SledStorage, Storage, SystemClock};

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value_t = 1_000)]
    agents: usize,
    /// Journal entries in all (spread evenly over the agents).
    #[arg(long, default_value_t = 2_000_000)]
    entries: u64,
    /// Idempotency keys kept on disk at most (the memory bound is the default).
    #[arg(long, default_value_t = 100_000_000)]
    keys_max: u64,
    /// Checkpoint every agent after building (the usual case); without it recovery
    /// replays every journal entry (the worst case).
    #[arg(long)]
    checkpointed: bool,
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
    /// Only open an existing store at --dir (the bench runs this in a fresh process so
    /// the memory of building the store does not count).
    #[arg(long)]
    open_only: bool,
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let tmp = tempfile::tempdir()?;
    let dir = args.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    let plan_name = PlanName::new("default")?;
    let plans = PlanBook::new([Plan::unlimited(plan_name.clone())]);
    if args.open_only {
        return open(&args, &dir, plans);
    }
    let now_ms = SystemClock.now_ms();
    let per_agent = (args.entries / args.agents as u64).max(3);
    let build = Instant::now();
    {
        let storage = SledStorage::open(&dir, 256 * 1024 * 1024)?;
        let mut writes = Vec::new();
        let mut pending = 0u64;
        for i in 0..args.agents {
            let id = AgentId::new(format!("agent-{i:05}"))?;
            let mut rate = RateState::default();
            let mut state = None;
            let mut events_all = Vec::new();
            for n in 0..per_agent {
                let kind = match n {
                    0 => CommandKind::CreateAgent {
                        plan: plan_name.clone(),
                        status: Status::Active,
                    },
                    1 => CommandKind::Credit {
                        amount_micros: u64::MAX / 2,
                    },
                    _ => CommandKind::Debit {
                        amount_micros: 1_000,
                    },
                };
                let cmd =
                    Command::new(id.clone(), kind).with_key(IdempotencyKey::new(format!("k{n}"))?);
                let d = decide(state.as_ref(), &mut rate, &cmd, &plans, now_ms)
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                for e in &d.events {
                    state = Some(evolve(state, &id, e)?);
                }
                events_all.extend(d.events);
            }
            let state = state.expect("created");
            // The record written at creation holds seq 1 unless asked to checkpoint.
            let record = if args.checkpointed {
                state
            } else {
                evolve(None, &id, &events_all[0])?
            };
            pending += events_all.len() as u64;
            writes.push(AgentWrite {
                rate: None,
                rate_before: None,
                agent: id,
                expected_seq: 0,
                events: events_all,
                checkpoint: Some(record),
            });
            if pending >= 50_000 {
                storage.apply(std::mem::take(&mut writes))?;
                pending = 0;
            }
        }
        storage.apply(writes)?;
        storage.sync()?;
        println!(
            "built {} agents x {per_agent} entries = {} entries in {:.1} s ({:.0} MiB on disk)",
            args.agents,
            per_agent * args.agents as u64,
            build.elapsed().as_secs_f64(),
            mib(storage.size_on_disk()?)
        );
    }
    let status = std::process::Command::new(std::env::current_exe()?)
        .args([
            "--open-only",
            "--keys-max",
            &args.keys_max.to_string(),
            "--dir",
        ])
        .arg(&dir)
        .args(args.checkpointed.then_some("--checkpointed"))
        .status()?;
    anyhow::ensure!(status.success(), "the open phase failed");
    Ok(())
}

fn open(args: &Args, dir: &std::path::Path, plans: PlanBook) -> anyhow::Result<()> {
    let rss_before = rss_bytes().unwrap_or(0);
    let mut config = EngineConfig::new(dir);
    config.idempotency_keys_max = args.keys_max;
    let registry = prometheus::Registry::new();
    let started = Instant::now();
    let engine = Engine::open(config, plans, Arc::new(SystemClock), Some(&registry))?;
    let ready = started.elapsed();
    let rss_after = rss_bytes().unwrap_or(0);
    let k = engine.key_index_status();
    println!(
        "recovery ({}): ready in {:.2} s; idempotency keys on disk {} (bound {}), window {} s of {} s, filters {:.1} MiB",
        if args.checkpointed {
            "checkpointed"
        } else {
            "replaying every entry"
        },
        ready.as_secs_f64(),
        k.keys_on_disk,
        k.keys_max,
        k.window_ms / 1_000,
        k.retention_ms / 1_000,
        mib(k.filter_bytes)
    );
    println!(
        "memory: RSS {:.0} MiB before open, {:.0} MiB when ready (+{:.0} MiB)",
        mib(rss_before),
        mib(rss_after),
        mib(rss_after.saturating_sub(rss_before))
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(engine.shutdown())?;
    Ok(())
}
