//! Memory and restart time with many agents: creates N agents, credits and debits each once
//! (every command keyed, through the engine's shards and group commit), then reports the
//! process's RSS, shuts down, and measures in a fresh process how long `Engine::open` takes
//! to be ready and the RSS after it.
//!
//! `cargo run --release -p tally-benches --bin million_agents -- --agents 1000000`

use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use tally_benches::rss_bytes;
use tally_core::{AgentId, Command, CommandKind, IdempotencyKey, Plan, PlanBook, PlanName, Status};
use tally_store::{Engine, EngineConfig, SystemClock};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value_t = 1_000_000)]
    agents: usize,
    /// Concurrent submitters.
    #[arg(long, default_value_t = 256)]
    submitters: usize,
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
    /// Only open the store at --dir and report (run by the bench itself in a new process).
    #[arg(long)]
    open_only: bool,
    /// `EngineConfig::sled_cache_bytes` in MiB (default: the engine's).
    #[arg(long)]
    sled_cache_mib: Option<u64>,
    /// `EngineConfig::idempotency_memory_keys_max` (default: the engine's).
    #[arg(long)]
    idempotency_memory_keys_max: Option<usize>,
    /// `EngineConfig::index_backlog_events_max` (default: the engine's).
    #[arg(long)]
    index_backlog_events_max: Option<usize>,
    /// `EngineConfig::agents_cached_max` (default: the engine's).
    #[arg(long)]
    agents_cached_max: Option<usize>,
}

/// The engine's config with the bounds given on the command line.
fn config(args: &Args, dir: &std::path::Path) -> EngineConfig {
    let mut c = EngineConfig::new(dir);
    if let Some(mib) = args.sled_cache_mib {
        c.sled_cache_bytes = mib << 20;
    }
    if let Some(n) = args.idempotency_memory_keys_max {
        c.idempotency_memory_keys_max = n;
    }
    if let Some(n) = args.index_backlog_events_max {
        c.index_backlog_events_max = n;
    }
    if let Some(n) = args.agents_cached_max {
        c.agents_cached_max = n;
    }
    c
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn plans() -> anyhow::Result<PlanBook> {
    Ok(PlanBook::new([Plan::unlimited(PlanName::new("default")?)]))
}

async fn open_only(args: &Args, dir: &std::path::Path) -> anyhow::Result<()> {
    let started = Instant::now();
    let engine = Engine::open(config(args, dir), plans()?, Arc::new(SystemClock), None)?;
    let ready = started.elapsed();
    println!(
        "restart: ready in {:.2} s, RSS {:.0} MiB, {} agents",
        ready.as_secs_f64(),
        mib(rss_bytes().unwrap_or(0)),
        engine.metrics().agents.get()
    );
    engine.shutdown().await?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // As `tally serve` does: the figures are the server's.
    tally_store::disable_transparent_huge_pages();
    let tmp = tempfile::tempdir()?;
    let dir = args.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    if args.open_only {
        return open_only(&args, &dir).await;
    }
    let engine = Engine::open(config(&args, &dir), plans()?, Arc::new(SystemClock), None)?;
    println!("opened empty: RSS {:.0} MiB", mib(rss_bytes().unwrap_or(0)));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for s in 0..args.submitters {
        let engine = engine.clone();
        let (n, step) = (args.agents, args.submitters);
        tasks.push(tokio::spawn(async move {
            let key = |k: &str| IdempotencyKey::new(k).expect("valid");
            for i in (s..n).step_by(step) {
                let id = AgentId::new(format!("agent-{i:07}")).expect("valid");
                let kinds = [
                    CommandKind::CreateAgent {
                        plan: PlanName::new("default").expect("valid"),
                        status: Status::Active,
                    },
                    CommandKind::Credit {
                        amount_micros: 1_000_000,
                    },
                    CommandKind::Debit { amount_micros: 1 },
                ];
                for (kind, k) in kinds.into_iter().zip(["c", "t", "d"]) {
                    let reply = engine
                        .submit(Command::new(id.clone(), kind).with_key(key(k)))
                        .await
                        .expect("submits");
                    assert!(
                        matches!(
                            reply,
                            tally_store::Reply::Decided {
                                outcome: tally_core::Outcome::Approved(_),
                                ..
                            }
                        ),
                        "{reply:?}"
                    );
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let built = started.elapsed();
    println!(
        "{} agents created, credited and debited in {:.1} s ({:.0} commands/s); RSS {:.0} MiB",
        args.agents,
        built.as_secs_f64(),
        3.0 * args.agents as f64 / built.as_secs_f64(),
        mib(rss_bytes().unwrap_or(0))
    );
    engine.shutdown().await?;
    drop(engine);
    println!(
        "after shutdown: RSS {:.0} MiB",
        mib(rss_bytes().unwrap_or(0))
    );
    // The restart runs with the same bounds.
    let mut restart = std::process::Command::new(std::env::current_exe()?);
    restart.args(["--open-only", "--dir"]).arg(&dir);
    if let Some(mib) = args.sled_cache_mib {
        restart.arg(format!("--sled-cache-mib={mib}"));
    }
    if let Some(n) = args.idempotency_memory_keys_max {
        restart.arg(format!("--idempotency-memory-keys-max={n}"));
    }
    if let Some(n) = args.index_backlog_events_max {
        restart.arg(format!("--index-backlog-events-max={n}"));
    }
    if let Some(n) = args.agents_cached_max {
        restart.arg(format!("--agents-cached-max={n}"));
    }
    let status = restart.status()?;
    anyhow::ensure!(status.success(), "the restart failed");
    Ok(())
}
