//! Fills the idempotency key index of a new data directory with N synthetic keys spread over
//! the last 24 hours, for measuring tally with a large index (`benches/wrk/keys.sh`):
//! throughput with fresh keys, memory, and the time a restart takes to be ready.
//!
//! `cargo run --release -p tally-benches --bin preload_keys -- --dir /tmp/d --keys 20000000`

use std::time::Instant;

use clap::Parser;
use tally_store::{Clock, SystemClock};

#[derive(Parser, Debug)]
struct Args {
    /// A data directory with no store in it yet.
    #[arg(long)]
    dir: std::path::PathBuf,
    #[arg(long, default_value_t = 20_000_000)]
    keys: u64,
    /// Whole hours before now the keys are spread over (24: the default window).
    #[arg(long, default_value_t = 24)]
    hours: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        !args.dir.join("db").exists(),
        "{} holds a store already; preload a new directory",
        args.dir.display()
    );
    std::fs::create_dir_all(&args.dir)?;
    let started = Instant::now();
    tally_store::preload_for_bench(&args.dir, args.keys, SystemClock.now_ms(), args.hours)?;
    println!(
        "preloaded {} keys over {} hours into {} in {:.1} s",
        args.keys,
        args.hours,
        args.dir.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
